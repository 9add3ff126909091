//! What every handler shares.

use crate::files::FileStore;
use crate::settings::Settings;
use crate::store::Store;
use testflinger_broker::Broker;

#[derive(Clone, Debug)]
pub struct AppState {
    pub store: Store,
    pub broker: Broker,
    pub files: FileStore,
    pub settings: std::sync::Arc<Settings>,
    /// Webhook calls only (see [`crate::events::WebhookClients`]).
    pub http: crate::events::WebhookClients,
    pub events: crate::events::EventSink,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// Authentication and roles (off without `JWT_SIGNING_KEY`).
    pub auth: std::sync::Arc<crate::auth::Auth>,
    /// SSE fan-out of log events and the log compactor's wake-up.
    pub logs: crate::logs::Logs,
    /// The use cases of jobs (see [`crate::jobs`]).
    pub jobs: crate::jobs::Jobs,
}

impl AppState {
    pub fn lease_ms(&self) -> u64 {
        self.settings.lease_ttl * 1000
    }
}
