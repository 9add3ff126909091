//! Job events: every state change is published to topic exchange `testflinger.events`
//! with routing key `job.<queue>.<state>`, and PUT to the job's `job_status_webhook` when
//! its host is allowed. Neither blocks the request that caused the change.
//!
//! Order: [`emit`] queues the event before the request answers, and one task publishes
//! the queue in order on one channel, so a subscriber sees one job's events in the order
//! the changes happened (per API replica). Webhook calls are serialised per job, so a
//! receiver gets the same order; a slow receiver delays only its own job's events.

use crate::settings::Settings;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use testflinger_broker::topology::{EVENTS_EXCHANGE, event_routing_key};
use testflinger_broker::{Broker, OutgoingMessage};
use testflinger_common::protocol::JobEvent;
use tokio::sync::mpsc;

/// Most events waiting to be published before new ones are dropped (with a warning).
const BACKLOG: usize = 100_000;
/// Publisher slot used for events, so they share one channel and keep their order.
const EVENTS_SLOT: usize = 0;

/// One message for the events exchange, and what (if anything) goes to the job's webhook.
struct Queued {
    job_id: String,
    routing_key: String,
    body: Vec<u8>,
    /// `(url, body)` PUT to the job's webhook after the message.
    webhook: Option<(String, Vec<u8>)>,
    /// The job's last message: its webhook task may end after it.
    terminal: bool,
}

/// Where state changes are reported. Cheap to clone.
#[derive(Clone, Debug)]
pub struct EventSink {
    tx: mpsc::Sender<Queued>,
}

impl EventSink {
    /// Starts the publishing task; it ends when every sink is dropped.
    pub fn start(
        broker: Broker,
        http: reqwest::Client,
        settings: Arc<Settings>,
    ) -> (EventSink, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(BACKLOG);
        let task = tokio::spawn(run(rx, broker, http, settings));
        (EventSink { tx }, task)
    }
}

/// Reports a state change. Never blocks; drops the event (logged) if the backlog is full.
#[allow(clippy::too_many_arguments)]
pub fn emit(
    app: &crate::state::AppState,
    job_id: &str,
    queue: &str,
    state: &str,
    previous: Option<&str>,
    attempt: u64,
    agent: Option<&str>,
    reason: Option<&str>,
    webhook: Option<String>,
) {
    if !app.settings.events && webhook.is_none() {
        return;
    }
    let event = JobEvent {
        job_id: job_id.to_string(),
        job_queue: queue.to_string(),
        job_state: state.to_string(),
        previous_state: previous.filter(|p| !p.is_empty()).map(str::to_string),
        attempt,
        agent_id: agent.filter(|a| !a.is_empty()).map(str::to_string),
        timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        reason: reason.filter(|r| !r.is_empty()).map(str::to_string),
    };
    let body = serde_json::to_vec(&event).unwrap_or_default();
    let queued = Queued {
        job_id: event.job_id.clone(),
        routing_key: event_routing_key(&event.job_queue, &event.job_state),
        webhook: webhook.map(|url| (url, body.clone())),
        body,
        terminal: matches!(event.job_state.as_str(), "complete" | "cancelled"),
    };
    if let Err(e) = app.events.tx.try_send(queued) {
        tracing::warn!(job.id = %job_id, error = %e, "job event dropped");
    }
}

/// One phase event as upstream's agent reports it (`POST /v1/job/<id>/events`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentEvent {
    pub event_name: String,
    pub timestamp: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Relays upstream agents' phase events: each new one is published to
/// `testflinger.events` with routing key `job.<queue>.event.<event_name>` (body: the
/// event plus `job_id`, `job_queue`, `agent_id`), and `webhook_body` (upstream's shape:
/// the agent's post without `job_status_webhook`) is PUT once to the job's webhook when
/// it is given and its host is allowed. Never blocks.
pub fn relay_agent_events(
    app: &crate::state::AppState,
    job_id: &str,
    queue: &str,
    agent: Option<&str>,
    new_events: &[AgentEvent],
    webhook: Option<(String, Vec<u8>)>,
) {
    let n = new_events.len();
    for (i, e) in new_events.iter().enumerate() {
        let body = serde_json::json!({
            "job_id": job_id,
            "job_queue": queue,
            "agent_id": agent,
            "event_name": e.event_name,
            "timestamp": e.timestamp,
            "detail": e.detail,
        });
        let queued = Queued {
            job_id: job_id.to_string(),
            routing_key: event_routing_key(queue, &format!("event.{}", e.event_name)),
            body: serde_json::to_vec(&body).unwrap_or_default(),
            webhook: if i + 1 == n { webhook.clone() } else { None },
            terminal: false,
        };
        if let Err(err) = app.events.tx.try_send(queued) {
            tracing::warn!(job.id = %job_id, error = %err, "agent event dropped");
        }
    }
}

async fn run(
    mut rx: mpsc::Receiver<Queued>,
    broker: Broker,
    http: reqwest::Client,
    settings: Arc<Settings>,
) {
    let allowed = settings.webhook_hosts();
    let mut hooks: HashMap<String, mpsc::UnboundedSender<(String, Vec<u8>)>> = HashMap::new();
    let mut batch: Vec<Queued> = Vec::with_capacity(256);
    while rx.recv_many(&mut batch, 256).await > 0 {
        if settings.events {
            let msgs: Vec<OutgoingMessage<'_>> = batch
                .iter()
                .map(|q| OutgoingMessage {
                    exchange: EVENTS_EXCHANGE,
                    routing_key: &q.routing_key,
                    body: &q.body,
                    content_type: Some("application/json"),
                    persistent: true,
                    ..OutgoingMessage::default()
                })
                .collect();
            if let Err(e) = broker.publish_in_order(EVENTS_SLOT, &msgs).await {
                tracing::warn!(error = %e, count = msgs.len(), "job events not published");
            }
        }
        for q in batch.drain(..) {
            let Some((url, body)) = q.webhook else {
                continue;
            };
            if !webhook_allowed(&allowed, &url) {
                tracing::warn!(job.id = %q.job_id, "webhook host not in TESTFLINGER_WEBHOOK_ALLOWED_HOSTS; event not sent");
                continue;
            }
            let job = q.job_id.clone();
            let tx = hooks.entry(job.clone()).or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(deliver_in_order(http.clone(), job.clone(), rx));
                tx
            });
            if tx.send((url, body)).is_err() {
                hooks.remove(&job);
            } else if q.terminal {
                // Dropping the sender lets the job's task finish after its last event.
                hooks.remove(&job);
            }
        }
    }
}

/// An address range in CIDR notation (`10.0.0.0/8`, `fe80::/10`; a bare address is a
/// range of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    /// Whether `ip` is in the range (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Parses a comma-separated list of ranges (`TESTFLINGER_WEBHOOK_BLOCKED_NETS`). The
/// error names the entry and the accepted shape.
pub fn parse_nets(list: &str) -> Result<Vec<Net>, String> {
    let mut out = Vec::new();
    for raw in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bad = || {
            format!(
                "'{raw}' is not an address range; expected ADDRESS/PREFIX such as 10.0.0.0/8 or fe80::/10"
            )
        };
        let (a, p) = raw.split_once('/').unwrap_or((raw, ""));
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse::<u8>().ok().filter(|n| *n <= max).ok_or_else(bad)?
        };
        out.push(Net { addr, prefix });
    }
    Ok(out)
}

/// The webhook client's DNS resolver: resolves with the system resolver, then keeps only
/// the addresses outside `TESTFLINGER_WEBHOOK_BLOCKED_NETS` or named themselves in
/// `TESTFLINGER_WEBHOOK_ALLOWED_HOSTS`. The connection goes to a kept address, so an
/// allowed host name whose DNS leads to a loopback or metadata address (rebinding) is not
/// reached. Addresses written in the URL are checked by [`webhook_allowed`] alone (the
/// allow-list must name them).
#[derive(Debug, Clone)]
pub struct WebhookResolver {
    blocked: Arc<Vec<Net>>,
    listed: Arc<Vec<IpAddr>>,
}

impl WebhookResolver {
    pub fn new(settings: &Settings) -> WebhookResolver {
        let listed = settings
            .webhook_hosts()
            .iter()
            .filter_map(|h| {
                let bare = |s: &str| {
                    s.trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<IpAddr>()
                        .ok()
                };
                bare(h).or_else(|| h.rsplit_once(':').and_then(|(host, _)| bare(host)))
            })
            .collect();
        WebhookResolver {
            blocked: Arc::new(parse_nets(&settings.webhook_blocked_nets).unwrap_or_default()),
            listed: Arc::new(listed),
        }
    }

    /// Whether a connection to `ip` is allowed.
    pub fn address_allowed(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.listed.iter().any(|l| l.to_canonical() == ip)
            || !self.blocked.iter().any(|n| n.contains(ip))
    }
}

impl reqwest::dns::Resolve for WebhookResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let me = self.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let all: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let (kept, refused): (Vec<_>, Vec<_>) =
                all.into_iter().partition(|a| me.address_allowed(a.ip()));
            if kept.is_empty() {
                let list: Vec<String> = refused.iter().map(|a| a.ip().to_string()).collect();
                tracing::warn!(host = %host, addresses = ?list, "webhook host resolves only to blocked addresses (TESTFLINGER_WEBHOOK_BLOCKED_NETS); event not sent");
                return Err(format!(
                    "webhook host {host} resolves only to blocked addresses ({}); see TESTFLINGER_WEBHOOK_BLOCKED_NETS",
                    list.join(", ")
                )
                .into());
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Whether `url`'s host (or `host:port`) is in the allow-list.
pub fn webhook_allowed(allowed: &[String], url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    let Some(host) = u.host_str().map(str::to_ascii_lowercase) else {
        return false;
    };
    let port = u
        .port_or_known_default()
        .map(|p| p.to_string())
        .unwrap_or_default();
    allowed.iter().any(|h| match h.rsplit_once(':') {
        Some((hh, p)) if p.chars().all(|c| c.is_ascii_digit()) => hh == host && p == port,
        _ => h == &host,
    })
}

async fn deliver_in_order(
    http: reqwest::Client,
    job: String,
    mut rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
) {
    while let Some((url, body)) = rx.recv().await {
        deliver(&http, &url, &body, &job).await;
    }
}

/// PUTs one event: 5 s timeout, up to 3 tries with growing pauses; a 4xx is final.
async fn deliver(http: &reqwest::Client, url: &str, body: &[u8], job_id: &str) {
    for attempt in 0..3u32 {
        let r = http
            .put(url)
            .header("content-type", "application/json")
            .timeout(Duration::from_secs(5))
            .body(body.to_vec())
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => return,
            Ok(resp) if resp.status().is_client_error() => {
                tracing::warn!(job.id = %job_id, status = %resp.status(), "webhook refused the event");
                return;
            }
            Ok(resp) => tracing::warn!(job.id = %job_id, status = %resp.status(), "webhook failed"),
            Err(e) => tracing::warn!(job.id = %job_id, error = %e, "webhook unreachable"),
        }
        tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn allow_list() {
        let allowed = vec!["ci.example".to_string(), "127.0.0.1:8080".to_string()];
        assert!(super::webhook_allowed(&allowed, "https://ci.example/hook"));
        assert!(super::webhook_allowed(&allowed, "http://127.0.0.1:8080/x"));
        assert!(!super::webhook_allowed(&allowed, "http://127.0.0.1:9090/x"));
        assert!(!super::webhook_allowed(&allowed, "http://evil.example/x"));
        assert!(!super::webhook_allowed(&allowed, "not a url"));
    }

    #[test]
    fn blocked_nets() {
        let nets =
            super::parse_nets(crate::settings::DEFAULT_BLOCKED_NETS).expect("defaults parse");
        let blocked = |ip: &str| nets.iter().any(|n| n.contains(ip.parse().expect("ip")));
        assert!(blocked("127.0.0.1"));
        assert!(blocked("127.255.0.9"));
        assert!(blocked("169.254.169.254"));
        assert!(blocked("::1"));
        assert!(blocked("::ffff:127.0.0.1"));
        assert!(blocked("fe80::1"));
        assert!(!blocked("10.1.2.3"));
        assert!(!blocked("192.0.2.7"));
        assert!(!blocked("2001:db8::1"));
        assert!(super::parse_nets("10.0.0.0/33").is_err());
        assert!(super::parse_nets("ten/8").is_err());
        assert_eq!(super::parse_nets(" , ").expect("empty"), vec![]);
    }
}
