//! Consumers with manual ack (prefetch per consumer), and the messages they yield.

use crate::BrokerError;
use futures_util::stream::{SelectAll, StreamExt};
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use std::collections::BTreeMap;

/// One message taken from a queue, not yet acknowledged.
pub struct Incoming {
    pub body: Vec<u8>,
    /// The queue's name when delivered from the default exchange (job queues).
    pub routing_key: String,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub content_type: Option<String>,
    pub priority: Option<u8>,
    pub redelivered: bool,
    /// Delivery mode 2: the broker keeps it on disk.
    pub persistent: bool,
    /// String-valued headers.
    pub headers: BTreeMap<String, String>,
    delivery: Delivery,
    // Keeps a basic.get channel open until the message is settled.
    _channel: Option<Channel>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("routing_key", &self.routing_key)
            .field("message_id", &self.message_id)
            .field("redelivered", &self.redelivered)
            .finish_non_exhaustive()
    }
}

impl Incoming {
    pub(crate) fn new(d: Delivery, channel: Option<Channel>) -> Incoming {
        let p = &d.properties;
        let s = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|x| x.as_str().to_string());
        let mut headers = BTreeMap::new();
        if let Some(h) = p.headers() {
            for (k, v) in h.inner() {
                let text = match v {
                    AMQPValue::LongString(s) => {
                        Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                    }
                    AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
                    AMQPValue::LongLongInt(n) => Some(n.to_string()),
                    AMQPValue::LongInt(n) => Some(n.to_string()),
                    _ => None,
                };
                if let Some(t) = text {
                    headers.insert(k.as_str().to_string(), t);
                }
            }
        }
        Incoming {
            body: d.data.clone(),
            routing_key: d.routing_key.as_str().to_string(),
            message_id: s(p.message_id()),
            correlation_id: s(p.correlation_id()),
            reply_to: s(p.reply_to()),
            content_type: s(p.content_type()),
            priority: *p.priority(),
            redelivered: d.redelivered,
            persistent: *p.delivery_mode() == Some(2),
            headers,
            delivery: d,
            _channel: channel,
        }
    }

    /// Done with it: the broker forgets the message.
    pub async fn ack(&self) -> Result<(), BrokerError> {
        self.delivery.ack(BasicAckOptions::default()).await?;
        Ok(())
    }

    /// Give it back to the queue for someone else.
    pub async fn requeue(&self) -> Result<(), BrokerError> {
        self.delivery
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await?;
        Ok(())
    }

    /// Refuse it: a job queue dead-letters it to `testflinger.dead`.
    pub async fn reject(&self) -> Result<(), BrokerError> {
        self.delivery
            .reject(BasicRejectOptions { requeue: false })
            .await?;
        Ok(())
    }
}

/// A stream of [`Incoming`] messages from one or more queues on one channel.
pub struct Consumer {
    channel: Channel,
    streams: SelectAll<lapin::Consumer>,
}

impl Consumer {
    pub(crate) async fn start(
        channel: Channel,
        queues: &[String],
        prefetch: u16,
        tag: &str,
    ) -> Result<Consumer, BrokerError> {
        // global = false: `prefetch` per consumer, i.e. per queue. Quorum queues refuse a
        // channel-wide (global) prefetch. A consumer of N queues may thus hold N
        // deliveries at once; the agent handles them one at a time and closes the
        // channel when it takes a job, which gives the others back (see the agent).
        channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await?;
        let mut streams = SelectAll::new();
        for (i, q) in queues.iter().enumerate() {
            let c = channel
                .basic_consume(
                    q.as_str().into(),
                    format!("{tag}-{i}").into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            streams.push(c);
        }
        Ok(Consumer { channel, streams })
    }

    pub(crate) async fn start_plain(
        channel: Channel,
        queue: &str,
        prefetch: u16,
        tag: &str,
    ) -> Result<Consumer, BrokerError> {
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Self::start(channel, &[queue.to_string()], prefetch, tag).await
    }

    /// Consumes (without acks) an agent's named control queue, which must exist.
    pub(crate) async fn start_control(
        channel: Channel,
        agent_id: &str,
    ) -> Result<Consumer, BrokerError> {
        let name = crate::topology::control_queue(agent_id);
        let c = channel
            .basic_consume(
                name.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let mut streams = SelectAll::new();
        streams.push(c);
        Ok(Consumer { channel, streams })
    }

    pub(crate) async fn start_subscription(
        channel: Channel,
        exchange: &str,
        binding_key: &str,
    ) -> Result<Consumer, BrokerError> {
        let (consumer, name) = Self::start_private(channel).await?;
        consumer
            .channel
            .queue_bind(
                name.as_str().into(),
                exchange.into(),
                binding_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(consumer)
    }

    /// A server-named, exclusive, auto-delete queue consumed without acks (replies,
    /// subscriptions). Returns the consumer and the queue's name.
    pub(crate) async fn start_private(channel: Channel) -> Result<(Consumer, String), BrokerError> {
        let q = channel
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
        let name = q.name().as_str().to_string();
        let c = channel
            .basic_consume(
                q.name().clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let mut streams = SelectAll::new();
        streams.push(c);
        Ok((Consumer { channel, streams }, name))
    }

    /// The next message; `None` when the channel closed (reconnect and consume again).
    pub async fn next(&mut self) -> Option<Result<Incoming, BrokerError>> {
        let item = self.streams.next().await?;
        Some(
            item.map(|d| Incoming::new(d, None))
                .map_err(BrokerError::from),
        )
    }

    /// Stops consuming; unacknowledged messages go back to their queues.
    pub async fn close(self) {
        let _ = self.channel.close(200, "consumer closed".into()).await;
    }
}
