//! Job events of one queue, read from topic exchange `testflinger.events` through an
//! exclusive, auto-deleted queue of our own.

use anyhow::{Context, anyhow};
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use std::collections::VecDeque;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use testflinger_broker::topology::{EVENTS_EXCHANGE, event_routing_key};
use tokio::sync::mpsc;

/// One state change as the API published it.
#[derive(Debug, Clone)]
pub struct Event {
    pub job_id: String,
    pub state: String,
    /// The API's timestamp of the change (Unix ms; the API records milliseconds).
    pub ts_ms: f64,
    /// When we received it (Unix ms).
    pub recv_ms: f64,
}

pub fn unix_ms(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

pub fn now_ms() -> f64 {
    unix_ms(SystemTime::now())
}

pub struct EventTap {
    conn: lapin::Connection,
    rx: mpsc::UnboundedReceiver<Event>,
    held: VecDeque<Event>,
}

impl EventTap {
    /// Subscribes to every event of job queue `queue`.
    pub async fn start(amqp_uri: &str, queue: &str) -> anyhow::Result<EventTap> {
        let conn = crate::harness::amqp_connect(amqp_uri).await?;
        let ch = conn.create_channel().await?;
        // The API declares the exchange too; declaring it here lets us bind first.
        ch.exchange_declare(
            EVENTS_EXCHANGE.into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .context("declaring the events exchange")?;
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        ch.queue_bind(
            q.name().clone(),
            EVENTS_EXCHANGE.into(),
            event_routing_key(queue, "*").as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let mut consumer = ch
            .basic_consume(
                q.name().clone(),
                "bench-events".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let _ch = ch;
            while let Some(Ok(d)) = consumer.next().await {
                let recv_ms = now_ms();
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&d.data) else {
                    continue;
                };
                let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
                let ts_ms = chrono::DateTime::parse_from_rfc3339(&s("timestamp"))
                    .map(|t| t.timestamp_micros() as f64 / 1000.0)
                    .unwrap_or(f64::NAN);
                let ev = Event {
                    job_id: s("job_id"),
                    state: s("job_state"),
                    ts_ms,
                    recv_ms,
                };
                if tx.send(ev).is_err() {
                    break;
                }
            }
        });
        Ok(EventTap {
            conn,
            rx,
            held: VecDeque::new(),
        })
    }

    /// The next event, or `None` after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> anyhow::Result<Option<Event>> {
        if let Some(e) = self.held.pop_front() {
            return Ok(Some(e));
        }
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Ok(Some(e)) => Ok(Some(e)),
            Ok(None) => Err(anyhow!("the events subscription ended")),
            Err(_) => Ok(None),
        }
    }

    /// Waits for `state` of `job_id`; other events are kept for later `next` calls.
    pub async fn wait_for(
        &mut self,
        job_id: &str,
        state: &str,
        timeout: Duration,
    ) -> anyhow::Result<Event> {
        if let Some(i) = self
            .held
            .iter()
            .position(|e| e.job_id == job_id && e.state == state)
            && let Some(e) = self.held.remove(i)
        {
            return Ok(e);
        }
        let end = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(end, self.rx.recv()).await {
                Ok(Some(e)) if e.job_id == job_id && e.state == state => return Ok(e),
                Ok(Some(e)) => {
                    if self.held.len() < 100_000 {
                        self.held.push_back(e);
                    }
                }
                Ok(None) => return Err(anyhow!("the events subscription ended")),
                Err(_) => {
                    return Err(anyhow!(
                        "no '{state}' event for job {job_id} within {} s",
                        timeout.as_secs()
                    ));
                }
            }
        }
    }

    /// Forgets events kept by `wait_for`.
    pub fn clear(&mut self) {
        self.held.clear();
    }

    pub async fn close(self) {
        let _ = self.conn.close(200, "bench done".into()).await;
    }
}
