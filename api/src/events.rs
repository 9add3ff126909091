//! Job events: every state change is published to topic exchange `testflinger.events`
//! with routing key `job.<queue>.<state>`, and PUT to the job's `job_status_webhook` when
//! its host is allowed. Neither blocks the request that caused the change.
//!
//! Order: [`emit`] queues the event before the request answers, and one task publishes
//! the queue in order on one channel, so a subscriber sees one job's events in the order
//! the changes happened (per API replica). Webhook calls are serialised per job, so a
//! receiver gets the same order; a slow receiver delays only its own job's events.
//!
//! Bounds: nothing here grows with what clients send. The publishing queue holds at most
//! [`BACKLOG`] events and [`BACKLOG_BYTES`] bytes; webhook calls wait in one queue per
//! job with calls pending (its delivery task ends when the queue is empty), at most
//! [`WEBHOOK_JOB_BACKLOG`] per job and `TESTFLINGER_WEBHOOK_BACKLOG` (calls being made
//! included) and [`WEBHOOK_BACKLOG_BYTES`] bytes all jobs together, so the delivery
//! tasks are bounded too. An event past a bound is dropped, logged, and counted in
//! `/metrics` (`testflinger_events_dropped_total`, `testflinger_webhook_dropped_total`).

use crate::net::{Net, parse_nets};
use crate::settings::Settings;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use testflinger_broker::topology::{EVENTS_EXCHANGE, event_routing_key};
use testflinger_broker::{Broker, OutgoingMessage};
use testflinger_common::protocol::JobEvent;
use tokio::sync::mpsc;

/// Most events waiting to be published before new ones are dropped (counted).
pub const BACKLOG: usize = 100_000;
/// Most bytes of events (and their webhook bodies) waiting to be published.
pub const BACKLOG_BYTES: usize = 64 << 20;
/// Default of `TESTFLINGER_WEBHOOK_BACKLOG`: most webhook calls waiting or being made,
/// all jobs together.
pub use crate::settings::DEFAULT_WEBHOOK_BACKLOG;
/// Most webhook calls waiting for one job (besides the one being made).
pub const WEBHOOK_JOB_BACKLOG: usize = 64;
/// Most bytes of webhook calls (URL and body) waiting, all jobs together.
pub const WEBHOOK_BACKLOG_BYTES: usize = 64 << 20;
/// Publisher slot used for events, so they share one channel and keep their order.
const EVENTS_SLOT: usize = 0;

/// One message for the events exchange, and what (if anything) goes to the job's webhook.
struct Queued {
    job_id: String,
    routing_key: String,
    body: Vec<u8>,
    /// `(url, body)` PUT to the job's webhook after the message.
    webhook: Option<(String, Vec<u8>)>,
}

impl Queued {
    fn bytes(&self) -> usize {
        self.body.len() + self.webhook.as_ref().map_or(0, |(u, b)| u.len() + b.len())
    }
}

/// What was dropped and what waits, for `/metrics`.
#[derive(Debug, Default)]
pub struct EventStats {
    events_dropped: AtomicU64,
    webhook_dropped: AtomicU64,
    /// Bytes in the publishing queue.
    queued_bytes: AtomicUsize,
    /// Webhook calls waiting or being made.
    webhook_waiting: AtomicUsize,
}

impl EventStats {
    /// Events not published because the publishing queue was full.
    pub fn events_dropped(&self) -> u64 {
        self.events_dropped.load(Ordering::Relaxed)
    }

    /// Webhook calls not made because a webhook queue was full.
    pub fn webhook_dropped(&self) -> u64 {
        self.webhook_dropped.load(Ordering::Relaxed)
    }

    /// Webhook calls waiting or being made now.
    pub fn webhook_waiting(&self) -> usize {
        self.webhook_waiting.load(Ordering::Relaxed)
    }
}

/// Where state changes are reported. Cheap to clone.
#[derive(Clone, Debug)]
pub struct EventSink {
    tx: mpsc::Sender<Queued>,
    stats: Arc<EventStats>,
    /// `TESTFLINGER_EVENTS`: publish to `testflinger.events` (webhooks are called anyway).
    enabled: bool,
}

/// A job's change of state as a use case decided it (`crate::jobs`): what
/// [`EventSink::publish`] reports, on `testflinger.events` and to the job's webhook.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub job_id: String,
    pub queue: String,
    pub state: testflinger_common::JobState,
    pub previous: Option<testflinger_common::JobState>,
    pub attempt: u64,
    pub agent: Option<String>,
    pub reason: Option<String>,
    /// The job's `job_status_webhook`, if it has one.
    pub webhook: Option<String>,
}

impl EventSink {
    /// Starts the publishing task. It ends when every sink is dropped or `close` is
    /// cancelled; then it first publishes what is queued (later events are dropped and
    /// counted).
    pub fn start(
        broker: Broker,
        http: WebhookClients,
        settings: Arc<Settings>,
        close: tokio_util::sync::CancellationToken,
    ) -> (EventSink, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(BACKLOG);
        let stats = Arc::new(EventStats::default());
        let enabled = settings.events;
        let task = tokio::spawn(run(rx, broker, http, settings, stats.clone(), close));
        (EventSink { tx, stats, enabled }, task)
    }

    /// Reports a state change. Never blocks; drops the event (logged, counted) if the
    /// backlog is full.
    pub fn publish(&self, t: &Transition) {
        if !self.enabled && t.webhook.is_none() {
            return;
        }
        let event = JobEvent {
            job_id: t.job_id.clone(),
            job_queue: t.queue.clone(),
            job_state: t.state.as_str().to_string(),
            previous_state: t.previous.map(|p| p.as_str().to_string()),
            attempt: t.attempt,
            agent_id: t.agent.clone().filter(|a| !a.is_empty()),
            timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            reason: t.reason.clone().filter(|r| !r.is_empty()),
        };
        let body = serde_json::to_vec(&event).unwrap_or_default();
        self.enqueue(Queued {
            job_id: event.job_id.clone(),
            routing_key: event_routing_key(&event.job_queue, &event.job_state),
            webhook: t.webhook.clone().map(|url| (url, body.clone())),
            body,
        });
    }

    pub fn stats(&self) -> &EventStats {
        &self.stats
    }

    /// Queues `q` unless the queue is full (then it is dropped and counted). Never waits.
    fn enqueue(&self, q: Queued) {
        let bytes = q.bytes();
        let before = self.stats.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        let job = q.job_id.clone();
        let refused = if before + bytes > BACKLOG_BYTES {
            Some("the events backlog is full (bytes)".to_string())
        } else {
            self.tx.try_send(q).err().map(|e| e.to_string())
        };
        if let Some(e) = refused {
            self.stats.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            self.stats.events_dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(job.id = %job, error = %e, "job event dropped");
        }
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
    sink: &EventSink,
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
        };
        sink.enqueue(queued);
    }
}

async fn run(
    mut rx: mpsc::Receiver<Queued>,
    broker: Broker,
    http: WebhookClients,
    settings: Arc<Settings>,
    stats: Arc<EventStats>,
    close: tokio_util::sync::CancellationToken,
) {
    let allowed = settings.webhook_hosts();
    let hooks = Arc::new(Mutex::new(Hooks::default()));
    let mut batch: Vec<Queued> = Vec::with_capacity(256);
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, 256) => n,
            // Closing: no new event is taken; the ones queued are still received.
            _ = close.cancelled(), if !rx.is_closed() => {
                rx.close();
                continue;
            }
        };
        if n == 0 {
            break;
        }
        let bytes: usize = batch.iter().map(Queued::bytes).sum();
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
            let call = Call { url, body };
            let queued = Hooks::push(&hooks, &q.job_id, call, settings.webhook_backlog, &stats);
            match queued {
                Pushed::Queued => {}
                Pushed::Start => {
                    tokio::spawn(deliver_in_order(
                        http.clone(),
                        q.job_id,
                        hooks.clone(),
                        stats.clone(),
                    ));
                }
                Pushed::Dropped(why) => {
                    stats.webhook_dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(job.id = %q.job_id, reason = why, "webhook event dropped");
                }
            }
        }
        stats.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// One webhook call.
struct Call {
    url: String,
    body: Vec<u8>,
}

impl Call {
    fn bytes(&self) -> usize {
        self.url.len() + self.body.len()
    }
}

/// Webhook calls waiting, per job with calls pending. A job is here while its delivery
/// task runs; the task removes it when it finds its queue empty (under the lock, so a
/// call is either seen by that task or starts a new one).
#[derive(Default)]
struct Hooks {
    jobs: HashMap<String, VecDeque<Call>>,
    /// Calls waiting or being made, all jobs together.
    waiting: usize,
    /// Their bytes.
    bytes: usize,
}

enum Pushed {
    /// Behind the job's other calls: its task will make it.
    Queued,
    /// The job's first call: start its task.
    Start,
    /// A bound was reached: the call is not made.
    Dropped(&'static str),
}

impl Hooks {
    fn push(
        hooks: &Mutex<Hooks>,
        job: &str,
        call: Call,
        backlog: usize,
        stats: &EventStats,
    ) -> Pushed {
        let Ok(mut h) = hooks.lock() else {
            return Pushed::Dropped("webhook queue unavailable");
        };
        if h.waiting >= backlog {
            return Pushed::Dropped("TESTFLINGER_WEBHOOK_BACKLOG calls are waiting");
        }
        if h.bytes + call.bytes() > WEBHOOK_BACKLOG_BYTES {
            return Pushed::Dropped("the webhook backlog is full (bytes)");
        }
        let bytes = call.bytes();
        let pushed = match h.jobs.get_mut(job) {
            Some(calls) if calls.len() >= WEBHOOK_JOB_BACKLOG => {
                return Pushed::Dropped("this job's webhook calls are full");
            }
            Some(calls) => {
                calls.push_back(call);
                Pushed::Queued
            }
            None => {
                h.jobs.insert(job.to_string(), VecDeque::from([call]));
                Pushed::Start
            }
        };
        h.waiting += 1;
        h.bytes += bytes;
        stats.webhook_waiting.store(h.waiting, Ordering::Relaxed);
        pushed
    }

    /// The job's next call, or `None` (and the job removed) when it has none.
    fn next(hooks: &Mutex<Hooks>, job: &str) -> Option<Call> {
        let mut h = hooks.lock().ok()?;
        let call = h.jobs.get_mut(job).and_then(VecDeque::pop_front);
        if call.is_none() {
            h.jobs.remove(job);
        }
        call
    }

    /// A call was made (or given up): it no longer counts.
    fn done(hooks: &Mutex<Hooks>, bytes: usize, stats: &EventStats) {
        if let Ok(mut h) = hooks.lock() {
            h.waiting = h.waiting.saturating_sub(1);
            h.bytes = h.bytes.saturating_sub(bytes);
            stats.webhook_waiting.store(h.waiting, Ordering::Relaxed);
        }
    }
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
    /// The resolver of connections to `port`: it lets through the addresses the
    /// allow-list names without a port, and those it names with this very port
    /// (`127.0.0.1:8080` exempts 127.0.0.1 from the blocked ranges on port 8080 only).
    pub fn for_port(settings: &Settings, port: Option<u16>) -> WebhookResolver {
        let listed = listed_addresses(settings)
            .into_iter()
            .filter(|(_, p)| p.is_none() || *p == port)
            .map(|(ip, _)| ip)
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

/// The addresses the allow-list names, each with the port it names (if any).
fn listed_addresses(settings: &Settings) -> Vec<(IpAddr, Option<u16>)> {
    let bare = |s: &str| {
        s.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok()
    };
    settings
        .webhook_hosts()
        .iter()
        .filter_map(|h| match bare(h) {
            Some(ip) => Some((ip, None)),
            None => {
                let (host, port) = h.rsplit_once(':')?;
                Some((bare(host)?, Some(port.parse().ok()?)))
            }
        })
        .collect()
}

/// The webhook HTTP clients (no redirect followed, 10 s timeout), one per port: a
/// connection to a host name goes through the resolver of its URL's port
/// ([`WebhookResolver::for_port`]), so an allow-list entry naming an address with a
/// port exempts that address on that port only, whatever other entry names a host
/// that resolves to it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct WebhookClients {
    by_port: Arc<std::collections::HashMap<u16, reqwest::Client>>,
    other: reqwest::Client,
}

impl WebhookClients {
    pub fn new(settings: &Settings) -> Result<WebhookClients, reqwest::Error> {
        let client = |port: Option<u16>| {
            reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .redirect(reqwest::redirect::Policy::none())
                .dns_resolver(Arc::new(WebhookResolver::for_port(settings, port)))
                .build()
        };
        let mut by_port = std::collections::HashMap::new();
        for (_, port) in listed_addresses(settings) {
            if let Some(p) = port
                && !by_port.contains_key(&p)
            {
                by_port.insert(p, client(Some(p))?);
            }
        }
        Ok(WebhookClients {
            by_port: Arc::new(by_port),
            other: client(None)?,
        })
    }

    /// The client for a call to `url`.
    pub fn for_url(&self, url: &str) -> &reqwest::Client {
        reqwest::Url::parse(url)
            .ok()
            .and_then(|u| u.port_or_known_default())
            .and_then(|p| self.by_port.get(&p))
            .unwrap_or(&self.other)
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

/// Makes one job's webhook calls in order; ends when it has none left.
async fn deliver_in_order(
    http: WebhookClients,
    job: String,
    hooks: Arc<Mutex<Hooks>>,
    stats: Arc<EventStats>,
) {
    while let Some(call) = Hooks::next(&hooks, &job) {
        deliver(http.for_url(&call.url), &call.url, &call.body, &job).await;
        Hooks::done(&hooks, call.bytes(), &stats);
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
    use super::{Call, EventStats, Hooks, Pushed, WEBHOOK_JOB_BACKLOG};
    use std::sync::Mutex;

    fn call() -> Call {
        Call {
            url: "http://ci.example/hook".into(),
            body: b"{}".to_vec(),
        }
    }

    #[test]
    fn webhook_calls_are_bounded_per_job_and_in_all() {
        let hooks = Mutex::new(Hooks::default());
        let stats = EventStats::default();
        // One job: its first call starts its task, then at most WEBHOOK_JOB_BACKLOG wait.
        let mut kept = 0;
        for _ in 0..WEBHOOK_JOB_BACKLOG + 10 {
            match Hooks::push(&hooks, "j", call(), 1000, &stats) {
                Pushed::Start | Pushed::Queued => kept += 1,
                Pushed::Dropped(_) => {}
            }
        }
        assert_eq!(kept, WEBHOOK_JOB_BACKLOG);
        // Many jobs: one task each, never more than the backlog.
        let hooks = Mutex::new(Hooks::default());
        let started = (0..100)
            .filter(|i| {
                matches!(
                    Hooks::push(&hooks, &format!("j{i}"), call(), 10, &stats),
                    Pushed::Start
                )
            })
            .count();
        assert_eq!(started, 10);
        assert_eq!(hooks.lock().expect("lock").jobs.len(), 10);
        assert_eq!(stats.webhook_waiting(), 10);
        // A job's task takes its calls, then leaves; the slot is free once a call is made.
        let c = Hooks::next(&hooks, "j3").expect("its call");
        assert!(Hooks::next(&hooks, "j3").is_none());
        assert_eq!(hooks.lock().expect("lock").jobs.len(), 9);
        Hooks::done(&hooks, c.bytes(), &stats);
        assert_eq!(stats.webhook_waiting(), 9);
        assert!(matches!(
            Hooks::push(&hooks, "new", call(), 10, &stats),
            Pushed::Start
        ));
    }

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
