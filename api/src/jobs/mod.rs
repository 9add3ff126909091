//! What happens to a job: the use cases between the routes and the store (DESIGN.md
//! "Outcomes, retries and device health": these rules live here, never in routes).
//!
//! Each use case is a method of [`Jobs`], which holds only the narrow handles it needs
//! (the [`Store`], the [`Broker`], the [`EventSink`], the settings and counters): it
//! loads a typed record, decides with the state machine in `testflinger_common`, writes
//! through one store call, and hands the resulting [`Transition`] to the events. Routes,
//! the submit-queue consumer, the reaper and the web UI are thin callers.
//!
//! - [`submit`]: admission (`POST /v1/job`, the submit queue) and the wake-up publish;
//! - [`claim`]: an agent takes a job (push claim, upstream's pull), secrets resolved;
//! - [`report`]: the holder reports state, status and device info;
//! - [`cancel`]: a user cancels; attachments arrive or never come;
//! - [`requeue`]: the holder gives a job back, or its lease expired (the reaper): the
//!   job waits again or ends after `max_attempts`.

pub mod cancel;
pub mod claim;
pub mod report;
pub mod requeue;
pub mod submit;

use crate::events::EventSink;
use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::store::Store;
use std::sync::Arc;
use testflinger_broker::Broker;

pub use crate::events::Transition;

/// The handles every use case works with. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Jobs {
    pub store: Store,
    pub broker: Broker,
    pub events: EventSink,
    pub settings: Arc<Settings>,
    pub metrics: Arc<Metrics>,
    /// Authentication is on (`JWT_SIGNING_KEY`): unregistered queues get no broker queue.
    pub auth_enabled: bool,
    /// Wakes the log compactor (a job ended: its log moves to the file store now).
    pub compact_now: Arc<tokio::sync::Notify>,
}
