//! Names and arguments of every queue and exchange, built in one place.
//!
//! Every declaration here is idempotent: the API and each agent declare what they use on
//! start, with the same arguments, so whichever starts first creates it.

use crate::BrokerError;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

/// Broker-native submission queue (validated path).
pub const SUBMIT_QUEUE: &str = "testflinger.submit";
/// Fanout exchange in front of [`SUBMIT_QUEUE`]: other systems publish here (any routing
/// key), so their broker user needs write on this exchange only, not on the default
/// exchange (which reaches every job queue).
pub const SUBMIT_EXCHANGE: &str = "testflinger.submit";
/// Prefix of each agent's control queue, `testflinger.control.<agent id>`.
pub const CONTROL_QUEUE_PREFIX: &str = "testflinger.control.";
/// A control queue nobody consumes is deleted by the broker after this long (ms); the
/// API declares it again whenever the agent registers (at each agent start).
pub const CONTROL_QUEUE_EXPIRES_MS: u32 = 3600 * 1000;
/// Commands older than this (ms) are dropped: the heartbeat carries the same news.
pub const CONTROL_MESSAGE_TTL_MS: u32 = 60 * 1000;
/// Topic exchange of job life-cycle events, routing key `job.<queue>.<state>`.
pub const EVENTS_EXCHANGE: &str = "testflinger.events";
/// Direct exchange of commands for one agent, routing key = agent id.
pub const CONTROL_EXCHANGE: &str = "testflinger.control";
/// Dead-letter exchange (fanout) for job queues.
pub const DEAD_LETTER_EXCHANGE: &str = "testflinger.dlx";
/// Where dead-lettered job messages end up.
pub const DEAD_QUEUE: &str = "testflinger.dead";
/// Invalid broker submissions, with the reason in header `x-rejection-reason`.
pub const REJECTED_QUEUE: &str = "testflinger.rejected";
/// Highest AMQP priority a job message carries (`job_priority` is clamped to it).
pub const MAX_PRIORITY: u8 = 10;
/// Header set on every job message the API publishes (value `api`): an agent that meets
/// a marked message whose job the API does not know (expired, or the record was lost)
/// drops it instead of registering it as a raw-published job.
pub const PUBLISHED_BY_HEADER: &str = "x-testflinger-published-by";

/// The control queue of one agent: bound to [`CONTROL_EXCHANGE`] with the agent id.
pub fn control_queue(agent_id: &str) -> String {
    format!("{CONTROL_QUEUE_PREFIX}{agent_id}")
}

/// Routing key of a job event.
pub fn event_routing_key(queue: &str, state: &str) -> String {
    // Topic routing keys use '.' as separator: keep queue names with dots matchable by
    // replacing them, so `job.*.complete` still matches every queue.
    format!("job.{}.{}", queue.replace('.', "_"), state)
}

/// AMQP priority of a job with `job_priority` p.
pub fn message_priority(job_priority: i64) -> u8 {
    job_priority.clamp(0, i64::from(MAX_PRIORITY)) as u8
}

/// Kind of queue used for job queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// Classic queue with `x-max-priority`: exact priority order within 0..=10.
    #[default]
    Classic,
    /// Quorum queue, for clustered RabbitMQ. Before RabbitMQ 4.0 quorum queues ignore
    /// priorities (the Redis position index still orders them for display).
    Quorum,
}

impl std::str::FromStr for QueueType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "classic" => Ok(QueueType::Classic),
            "quorum" => Ok(QueueType::Quorum),
            other => Err(format!(
                "unknown queue type '{other}' (use classic or quorum)"
            )),
        }
    }
}

fn job_queue_args(kind: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(DEAD_LETTER_EXCHANGE.into()),
    );
    match kind {
        QueueType::Classic => {
            args.insert(
                "x-max-priority".into(),
                AMQPValue::ShortShortUInt(MAX_PRIORITY),
            );
        }
        QueueType::Quorum => {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
    }
    args
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// Declares the shared exchanges and queues (not the per-job queues).
pub async fn declare_shared(ch: &Channel) -> Result<(), BrokerError> {
    let ex = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    ch.exchange_declare(
        DEAD_LETTER_EXCHANGE.into(),
        ExchangeKind::Fanout,
        ex,
        FieldTable::default(),
    )
    .await?;
    ch.exchange_declare(
        EVENTS_EXCHANGE.into(),
        ExchangeKind::Topic,
        ex,
        FieldTable::default(),
    )
    .await?;
    ch.exchange_declare(
        CONTROL_EXCHANGE.into(),
        ExchangeKind::Direct,
        ex,
        FieldTable::default(),
    )
    .await?;
    ch.exchange_declare(
        SUBMIT_EXCHANGE.into(),
        ExchangeKind::Fanout,
        ex,
        FieldTable::default(),
    )
    .await?;
    for q in [DEAD_QUEUE, SUBMIT_QUEUE, REJECTED_QUEUE] {
        ch.queue_declare(q.into(), durable(), FieldTable::default())
            .await?;
    }
    ch.queue_bind(
        DEAD_QUEUE.into(),
        DEAD_LETTER_EXCHANGE.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        SUBMIT_QUEUE.into(),
        SUBMIT_EXCHANGE.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

/// Declares an agent's control queue (durable, deleted after an hour unused, commands
/// kept a minute) and binds
/// it to [`CONTROL_EXCHANGE`] with the agent id. The API does it when the agent
/// registers, so the agent's own broker user needs no access to the exchange (with it,
/// an agent could bind its queue with another agent's id and read its commands).
pub async fn declare_control_queue(ch: &Channel, agent_id: &str) -> Result<(), BrokerError> {
    let name = control_queue(agent_id);
    let mut args = FieldTable::default();
    args.insert(
        "x-expires".into(),
        AMQPValue::LongUInt(CONTROL_QUEUE_EXPIRES_MS),
    );
    args.insert(
        "x-message-ttl".into(),
        AMQPValue::LongUInt(CONTROL_MESSAGE_TTL_MS),
    );
    ch.queue_declare(name.as_str().into(), durable(), args)
        .await?;
    ch.queue_bind(
        name.as_str().into(),
        CONTROL_EXCHANGE.into(),
        agent_id.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

/// Declares one job queue, named exactly like `job_queue`.
pub async fn declare_job_queue(
    ch: &Channel,
    name: &str,
    kind: QueueType,
) -> Result<(), BrokerError> {
    ch.queue_declare(name.into(), durable(), job_queue_args(kind))
        .await?;
    Ok(())
}
