//! The broker client: connections from a deadpool-lapin pool, and our own pool of
//! long-lived confirm-mode channels on top (deadpool-lapin pools connections, not
//! channels; a channel per request caps publishing at ~3k/s, see notes/crates.md).

use crate::topology::{self, QueueType};
use crate::{BrokerError, Consumer};
use deadpool_lapin::{Config as PoolSettings, PoolConfig, Runtime};
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, ConnectionProperties};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// Settings of a [`Broker`].
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub uri: String,
    /// Long-lived confirm channels used for publishing.
    pub publish_channels: usize,
    /// How long to wait for a connection before answering "unavailable".
    pub connect_timeout: Duration,
    /// How long to wait for a publisher confirm.
    pub confirm_timeout: Duration,
    pub queue_type: QueueType,
    /// Connections kept (deadpool-lapin pool size).
    pub connections: usize,
    /// Largest AMQP frame asked of the broker, unless the URI sets `frame_max`. lapin
    /// keeps two buffers of 32 frames per connection, so the broker's default (128 KiB)
    /// costs 8 MiB of memory per connection; messages larger than a frame are split.
    pub frame_max: u32,
}

impl BrokerConfig {
    pub fn new(uri: impl Into<String>) -> Self {
        BrokerConfig {
            uri: uri.into(),
            publish_channels: 8,
            connect_timeout: Duration::from_secs(2),
            confirm_timeout: Duration::from_secs(10),
            queue_type: QueueType::Classic,
            connections: 2,
            frame_max: 16 * 1024,
        }
    }
}

/// A message to publish.
#[derive(Debug, Clone, Default)]
pub struct OutgoingMessage<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub body: &'a [u8],
    pub message_id: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
    pub reply_to: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub priority: Option<u8>,
    pub persistent: bool,
    pub headers: Vec<(&'a str, String)>,
    /// Ask the broker to return the message when no queue takes it (then publishing
    /// fails with [`BrokerError::Refused`]).
    pub mandatory: bool,
}

struct Backoff {
    failures: u32,
    retry_at: Option<Instant>,
    last_error: String,
}

struct Inner {
    cfg: BrokerConfig,
    pool: deadpool_lapin::Pool,
    slots: Vec<Mutex<Option<Channel>>>,
    next: AtomicUsize,
    declared: std::sync::Mutex<HashSet<String>>,
    shared_declared: std::sync::atomic::AtomicBool,
    backoff: std::sync::Mutex<Backoff>,
}

/// A cheap-to-clone handle on the broker. Create it inside the long-lived tokio runtime.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

impl Broker {
    /// Builds the client. Does not connect: the first use does, so a server can start
    /// while RabbitMQ is still down and report "unavailable" until it is up.
    ///
    /// Fails only on a malformed configuration. Must run inside a tokio runtime.
    pub fn new(cfg: BrokerConfig) -> Result<Broker, BrokerError> {
        let settings = PoolSettings {
            url: Some(with_frame_max(&cfg.uri, cfg.frame_max)),
            pool: Some(PoolConfig::new(cfg.connections.max(1))),
        };
        let pool = settings
            .create_pool(ConnectionProperties::default, Runtime::Tokio1)
            .map_err(|e| BrokerError::Protocol(format!("bad AMQP settings: {e}")))?;
        let slots = (0..cfg.publish_channels.max(1))
            .map(|_| Mutex::new(None))
            .collect();
        Ok(Broker {
            inner: Arc::new(Inner {
                cfg,
                pool,
                slots,
                next: AtomicUsize::new(0),
                declared: std::sync::Mutex::new(HashSet::new()),
                shared_declared: false.into(),
                backoff: std::sync::Mutex::new(Backoff {
                    failures: 0,
                    retry_at: None,
                    last_error: String::new(),
                }),
            }),
        })
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.inner.cfg
    }

    /// Opens a fresh channel on a pooled connection, honouring the back-off.
    pub(crate) async fn open_channel(&self) -> Result<Channel, BrokerError> {
        let inner = &self.inner;
        if let Ok(b) = inner.backoff.lock()
            && let Some(at) = b.retry_at
            && Instant::now() < at
        {
            return Err(BrokerError::Unavailable(format!(
                "{} (next retry in {} ms)",
                b.last_error,
                at.saturating_duration_since(Instant::now()).as_millis()
            )));
        }
        let result = tokio::time::timeout(inner.cfg.connect_timeout, async {
            let conn = inner
                .pool
                .get()
                .await
                .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
            conn.create_channel().await.map_err(BrokerError::from)
        })
        .await
        .unwrap_or_else(|_| {
            Err(BrokerError::Unavailable(format!(
                "no connection within {} ms",
                inner.cfg.connect_timeout.as_millis()
            )))
        });
        if let Ok(mut b) = inner.backoff.lock() {
            match &result {
                Ok(_) => {
                    b.failures = 0;
                    b.retry_at = None;
                }
                Err(e) => {
                    b.failures = b.failures.saturating_add(1);
                    let ms = (50u64 << b.failures.min(7)).min(5_000);
                    b.retry_at = Some(Instant::now() + Duration::from_millis(ms));
                    b.last_error = e.to_string();
                }
            }
        }
        let ch = result?;
        if !inner.shared_declared.load(Ordering::Acquire) {
            match topology::declare_shared(&ch).await {
                Ok(()) => inner.shared_declared.store(true, Ordering::Release),
                // A least-privilege user (an agent's) may not declare the shared
                // topology: the API's user does. The refusal closed this channel.
                Err(e) if is_access_refused(&e) => {
                    tracing::debug!(error = %e, "not allowed to declare the shared topology; leaving it to the API");
                    inner.shared_declared.store(true, Ordering::Release);
                    return Box::pin(self.open_channel()).await;
                }
                Err(e) => {
                    // A shared queue whose cluster node is down must not stop job
                    // traffic: say so, try again with the next channel, and give the
                    // caller a fresh channel (the broker closed this one).
                    tracing::warn!(error = %e, "shared topology not declared; retrying later");
                    let _ = ch.close(200, "declare failed".into()).await;
                    let conn = tokio::time::timeout(inner.cfg.connect_timeout, inner.pool.get())
                        .await
                        .map_err(|_| BrokerError::Unavailable("no connection in time".into()))?
                        .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
                    return Ok(conn.create_channel().await?);
                }
            }
        }
        Ok(ch)
    }

    /// Declares and binds an agent's control queue (see
    /// [`topology::declare_control_queue`]); the API calls it when an agent registers.
    pub async fn ensure_control_queue(&self, agent_id: &str) -> Result<(), BrokerError> {
        let ch = self.open_channel().await?;
        let r = topology::declare_control_queue(&ch, agent_id).await;
        let _ = ch.close(200, "declared".into()).await;
        r
    }

    /// Declares a job queue once per process (the declaration is idempotent anyway).
    pub async fn ensure_job_queue(&self, name: &str) -> Result<(), BrokerError> {
        if self
            .inner
            .declared
            .lock()
            .map(|d| d.contains(name))
            .unwrap_or(false)
        {
            return Ok(());
        }
        let ch = self.open_channel().await?;
        let r = topology::declare_job_queue(&ch, name, self.inner.cfg.queue_type).await;
        let _ = ch.close(200, "declared".into()).await;
        r?;
        if let Ok(mut d) = self.inner.declared.lock() {
            d.insert(name.to_string());
        }
        Ok(())
    }

    /// Forgets which queues were declared (after a test deletes them, say).
    pub fn forget_declared(&self, name: &str) {
        if let Ok(mut d) = self.inner.declared.lock() {
            d.remove(name);
        }
    }

    /// Forgets every declaration (queues and the shared topology): the next use declares
    /// them again. Called when a channel or connection was lost.
    pub fn forget_all_declared(&self) {
        if let Ok(mut d) = self.inner.declared.lock() {
            d.clear();
        }
        self.inner.shared_declared.store(false, Ordering::Release);
    }

    /// The long-lived confirm channel of a slot, reopened when it was closed.
    async fn slot_channel(&self, i: usize) -> Result<Channel, BrokerError> {
        let mut slot = self.inner.slots[i % self.inner.slots.len()].lock().await;
        match slot.as_ref() {
            Some(ch) if ch.status().connected() => Ok(ch.clone()),
            stale => {
                if stale.is_some() {
                    // The channel died (broker restart, a deleted queue, a reconnect): what we
                    // declared may be gone too.
                    self.forget_all_declared();
                }
                let ch = self.open_channel().await?;
                ch.confirm_select(ConfirmSelectOptions::default()).await?;
                *slot = Some(ch.clone());
                Ok(ch)
            }
        }
    }

    /// Hands one message to the channel; returns the pending confirm.
    async fn send(
        ch: &Channel,
        msg: &OutgoingMessage<'_>,
    ) -> Result<lapin::PublisherConfirm, BrokerError> {
        let mut props = BasicProperties::default();
        if msg.persistent {
            props = props.with_delivery_mode(2);
        }
        if let Some(id) = msg.message_id {
            props = props.with_message_id(id.into());
        }
        if let Some(c) = msg.correlation_id {
            props = props.with_correlation_id(c.into());
        }
        if let Some(r) = msg.reply_to {
            props = props.with_reply_to(r.into());
        }
        if let Some(ct) = msg.content_type {
            props = props.with_content_type(ct.into());
        }
        if let Some(p) = msg.priority {
            props = props.with_priority(p);
        }
        if !msg.headers.is_empty() {
            let mut t = FieldTable::default();
            for (k, v) in &msg.headers {
                t.insert((*k).into(), AMQPValue::LongString(v.as_str().into()));
            }
            props = props.with_headers(t);
        }
        let opts = BasicPublishOptions {
            mandatory: msg.mandatory,
            ..BasicPublishOptions::default()
        };
        Ok(ch
            .basic_publish(
                msg.exchange.into(),
                msg.routing_key.into(),
                opts,
                msg.body,
                props,
            )
            .await?)
    }

    async fn confirmed(
        &self,
        confirm: lapin::PublisherConfirm,
        routing_key: &str,
    ) -> Result<(), BrokerError> {
        let confirmation = tokio::time::timeout(self.inner.cfg.confirm_timeout, confirm)
            .await
            .map_err(|_| BrokerError::Unconfirmed("no publisher confirm in time".into()))?
            .map_err(|e| {
                BrokerError::Unconfirmed(format!("channel failed before the confirm: {e}"))
            })?;
        match confirmation {
            lapin::Confirmation::Ack(None) | lapin::Confirmation::NotRequested => Ok(()),
            lapin::Confirmation::Ack(Some(_)) => Err(BrokerError::Refused(format!(
                "no queue named '{routing_key}' took the message"
            ))),
            lapin::Confirmation::Nack(_) => Err(BrokerError::Refused("negative confirm".into())),
        }
    }

    /// Publishes and waits for the broker's confirm. `Ok` means the broker has the
    /// message (persisted, for a persistent message to a durable queue).
    pub async fn publish(&self, msg: OutgoingMessage<'_>) -> Result<(), BrokerError> {
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let ch = self.slot_channel(i).await?;
        let confirm = Self::send(&ch, &msg).await?;
        self.confirmed(confirm, msg.routing_key).await
    }

    /// Publishes messages in order on one channel (so subscribers see them in that
    /// order), then waits for all confirms. `slot` picks the channel: callers that need
    /// one order use one slot.
    pub async fn publish_in_order(
        &self,
        slot: usize,
        msgs: &[OutgoingMessage<'_>],
    ) -> Result<(), BrokerError> {
        let ch = self.slot_channel(slot).await?;
        let mut pending = Vec::with_capacity(msgs.len());
        for m in msgs {
            pending.push((Self::send(&ch, m).await?, m.routing_key));
        }
        for (confirm, key) in pending {
            self.confirmed(confirm, key).await?;
        }
        Ok(())
    }

    /// Publishes a job message (persistent, `message_id` = job id, priority clamped)
    /// to the queue named like the job's queue, declaring it first if needed.
    pub async fn publish_job(
        &self,
        queue: &str,
        job_id: &str,
        job_priority: i64,
        body: &[u8],
    ) -> Result<(), BrokerError> {
        let mut tries = 0;
        loop {
            tries += 1;
            self.ensure_job_queue(queue).await?;
            let r = self
                .publish(OutgoingMessage {
                    exchange: "",
                    routing_key: queue,
                    body,
                    message_id: Some(job_id),
                    content_type: Some("application/json"),
                    priority: Some(topology::message_priority(job_priority)),
                    persistent: true,
                    mandatory: true,
                    headers: vec![(topology::PUBLISHED_BY_HEADER, "api".to_string())],
                    ..OutgoingMessage::default()
                })
                .await;
            match r {
                // The queue was deleted behind our cache (returned as unroutable), or the
                // channel failed: declare it again and retry once.
                Err(BrokerError::Refused(_)) | Err(BrokerError::Protocol(_)) if tries < 2 => {
                    self.forget_declared(queue);
                }
                other => return other,
            }
        }
    }

    /// Takes one message from a queue (`basic.get`, manual ack), or `None` when empty.
    pub async fn get(&self, queue: &str) -> Result<Option<crate::Incoming>, BrokerError> {
        // Our own shared queues are declared with the topology; job queues on first use.
        if !queue.starts_with("testflinger.") {
            self.ensure_job_queue(queue).await?;
        }
        let ch = self.open_channel().await?;
        match ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?
        {
            Some(m) => Ok(Some(crate::Incoming::new(m.delivery, Some(ch)))),
            None => {
                let _ = ch.close(200, "empty".into()).await;
                Ok(None)
            }
        }
    }

    /// Starts consuming `queues` on one channel, `prefetch` per queue (per consumer).
    pub async fn consume(
        &self,
        queues: &[String],
        prefetch: u16,
        tag: &str,
    ) -> Result<Consumer, BrokerError> {
        for q in queues {
            self.ensure_job_queue(q).await?;
        }
        let ch = self.open_channel().await?;
        Consumer::start(ch, queues, prefetch, tag).await
    }

    /// Consumes the agent's commands (no acks): from a private queue bound to
    /// `testflinger.control` with the agent id when this user may bind one, else (a
    /// least-privilege agent user) from `testflinger.control.<agent id>`, which the API
    /// declared and bound when the agent registered.
    pub async fn consume_control(&self, agent_id: &str) -> Result<Consumer, BrokerError> {
        match self.subscribe(topology::CONTROL_EXCHANGE, agent_id).await {
            Err(e) if is_access_refused(&e) => {
                let ch = self.open_channel().await?;
                Consumer::start_control(ch, agent_id).await
            }
            other => other,
        }
    }

    /// Declares and consumes one of our shared queues (such as the submit queue).
    pub async fn consume_shared(
        &self,
        queue: &str,
        prefetch: u16,
        tag: &str,
    ) -> Result<Consumer, BrokerError> {
        let ch = self.open_channel().await?;
        Consumer::start_plain(ch, queue, prefetch, tag).await
    }

    /// Subscribes to an exchange with a private (exclusive, auto-delete) queue bound with
    /// `binding_key`; for event subscribers and tests.
    pub async fn subscribe(
        &self,
        exchange: &str,
        binding_key: &str,
    ) -> Result<Consumer, BrokerError> {
        let ch = self.open_channel().await?;
        Consumer::start_subscription(ch, exchange, binding_key).await
    }

    /// Sends a command to one agent on `testflinger.control` (routing key = agent id),
    /// waiting for the broker's confirm. Not persistent: an agent that is not listening
    /// learns the same from its heartbeat or its next poll.
    pub async fn send_control(&self, agent_id: &str, body: &[u8]) -> Result<(), BrokerError> {
        self.publish(OutgoingMessage {
            exchange: topology::CONTROL_EXCHANGE,
            routing_key: agent_id,
            body,
            content_type: Some("application/json"),
            ..OutgoingMessage::default()
        })
        .await
    }

    /// A private reply queue (exclusive, auto-delete): its name, for `reply_to`, and
    /// its consumer.
    pub async fn reply_queue(&self) -> Result<(String, Consumer), BrokerError> {
        let ch = self.open_channel().await?;
        let (c, name) = Consumer::start_private(ch).await?;
        Ok((name, c))
    }

    /// Whether the broker answers now: opens and closes a channel.
    pub async fn ready(&self) -> Result<(), BrokerError> {
        let ch = self.open_channel().await?;
        let _ = ch.close(200, "probe".into()).await;
        Ok(())
    }

    /// Deletes a queue (tests and benchmarks clean up their own queues with it).
    pub async fn delete_queue(&self, name: &str) -> Result<(), BrokerError> {
        let ch = self.open_channel().await?;
        ch.queue_delete(name.into(), lapin::options::QueueDeleteOptions::default())
            .await?;
        let _ = ch.close(200, "deleted".into()).await;
        self.forget_declared(name);
        Ok(())
    }

    /// Number of ready messages in a job queue (tests and the bench use it).
    pub async fn message_count(&self, name: &str) -> Result<u32, BrokerError> {
        let ch = self.open_channel().await?;
        let q = ch
            .queue_declare(
                name.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let _ = ch.close(200, "count".into()).await;
        Ok(q.message_count())
    }
}

/// Whether the broker refused an operation for lack of permission (ACCESS_REFUSED, 403).
pub fn is_access_refused(e: &BrokerError) -> bool {
    e.to_string().contains("ACCESS_REFUSED")
}

/// Adds `frame_max` to an AMQP URI's query unless it has one.
fn with_frame_max(uri: &str, frame_max: u32) -> String {
    if uri.contains("frame_max=") {
        return uri.to_string();
    }
    let sep = if uri.contains('?') { '&' } else { '?' };
    format!("{uri}{sep}frame_max={frame_max}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn frame_max_is_added_once() {
        assert_eq!(
            super::with_frame_max("amqp://h:5672/%2f", 16384),
            "amqp://h:5672/%2f?frame_max=16384"
        );
        assert_eq!(
            super::with_frame_max("amqp://h/%2f?heartbeat=10", 8192),
            "amqp://h/%2f?heartbeat=10&frame_max=8192"
        );
        assert_eq!(
            super::with_frame_max("amqp://h/?frame_max=4096", 8192),
            "amqp://h/?frame_max=4096"
        );
    }
}
