//! Everything that speaks AMQP. This is the only crate that depends on lapin.
//!
//! Layout:
//! - [`topology`]: names and arguments of every queue and exchange, declared idempotently.
//! - [`Broker`]: a connection pool (deadpool-lapin) plus our own pool of long-lived
//!   confirm-mode channels, with reconnect and back-off; publishing that waits for the
//!   broker's confirm; `basic.get`; a readiness probe.
//! - [`permissions`]: the RabbitMQ permissions of each component's user (least privilege).
//! - [`consume`]: consumers with manual ack and a prefetch per consumer (one consumer
//!   per queue; quorum queues refuse a channel-wide prefetch), yielding [`Incoming`]
//!   messages.

mod client;
pub mod consume;
pub mod permissions;
pub mod topology;

pub use client::{Broker, BrokerConfig, OutgoingMessage, is_access_refused};
pub use consume::{Consumer, Incoming};
pub use topology::QueueType;

/// What can go wrong talking to RabbitMQ, sorted by what the caller can do.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker cannot be reached now (connection refused, timed out, in back-off).
    /// Retry later; nothing was published.
    #[error("message broker unavailable: {0}")]
    Unavailable(String),
    /// The broker refused to take the message (negative confirm or returned as
    /// unroutable). Nothing was queued.
    #[error("message broker refused the message: {0}")]
    Refused(String),
    /// A protocol or channel error (for example a queue declared with other arguments).
    #[error("message broker error: {0}")]
    Protocol(String),
    /// The message was handed to the broker but its fate is unknown (no confirm in
    /// time, or the channel closed before the confirm): it may or may not be queued.
    /// Callers that must not lose it keep it and publish again (duplicates are harmless
    /// where the consumer deduplicates, as a job claim does).
    #[error("publish outcome unknown: {0}")]
    Unconfirmed(String),
}

impl From<lapin::Error> for BrokerError {
    fn from(e: lapin::Error) -> Self {
        use lapin::ErrorKind;
        let text = e.to_string();
        match e.kind() {
            ErrorKind::IOError(_)
            | ErrorKind::InvalidConnectionState(_)
            | ErrorKind::InvalidChannelState(..) => BrokerError::Unavailable(text),
            // A cluster node that holds the queue is down: "not now", not a bug.
            _ if text.contains("is down or inaccessible") => BrokerError::Unavailable(text),
            _ => BrokerError::Protocol(text),
        }
    }
}
