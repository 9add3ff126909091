//! Builds the server from settings. Main and the tests both use [`Application`]; the
//! caller owns the listener, so tests bind port 0.

use crate::files::FileStore;
use crate::settings::Settings;
use crate::state::AppState;
use crate::store::Store;
use actix_web::dev::{Server, ServerHandle};
use actix_web::{App, HttpServer, middleware, web};
use anyhow::Context;
use std::net::TcpListener;
use std::sync::Arc;
use testflinger_broker::{Broker, BrokerConfig};
use tokio_util::sync::CancellationToken;

pub struct Application {
    port: u16,
    server: Server,
    pub state: AppState,
    background: Vec<tokio::task::JoinHandle<()>>,
    events_task: tokio::task::JoinHandle<()>,
    events_close: CancellationToken,
    shutdown: CancellationToken,
}

/// How long shutdown waits for each background task, and for the queued events.
pub const DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

impl Application {
    /// Connects to Redis, prepares the broker client and the file store, binds.
    ///
    /// Fails when Redis is unreachable, `DATA_PATH` cannot be created or the address
    /// cannot be bound. RabbitMQ may be down: submissions answer 503 until it is up.
    /// Must run inside a tokio runtime that outlives the server.
    pub async fn build(
        settings: Settings,
        listener: Option<TcpListener>,
    ) -> anyhow::Result<Application> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store = Store::connect(
            &settings.redis_url,
            &settings.redis_prefix,
            settings.retention,
        )
        .await
        .with_context(|| format!("cannot reach Redis at {}", redact(&settings.redis_url)))?;
        match store.persistence().await {
            Some((aof, fsync)) => {
                for w in crate::store::persistence_warnings(&aof, &fsync) {
                    tracing::warn!("{w}");
                }
            }
            None => tracing::info!(
                "cannot read Redis' persistence settings (CONFIG GET refused); make sure it runs with appendonly yes and appendfsync always"
            ),
        }
        let mut bcfg = BrokerConfig::new(settings.amqp_uri.clone());
        bcfg.queue_type = settings.queue_type.parse().map_err(anyhow::Error::msg)?;
        bcfg.confirm_timeout = std::time::Duration::from_millis(settings.confirm_timeout_ms);
        let broker = Broker::new(bcfg).context("bad AMQP settings")?;
        let limits = testflinger_archive::Limits {
            max_entries: settings.archive_max_entries,
            max_unpacked_bytes: settings.archive_max_unpacked_bytes,
        };
        let files = FileStore::open(&settings.data_path, settings.max_upload_bytes, limits)
            .with_context(|| format!("cannot create DATA_PATH {}", settings.data_path.display()))?;
        // Webhooks only: a redirect would let a webhook host send us anywhere, past the
        // allow-list, so none is followed; host names are resolved by a resolver that
        // drops blocked addresses (TESTFLINGER_WEBHOOK_BLOCKED_NETS).
        let http = crate::events::WebhookClients::new(&settings).context("http client")?;
        let listener = match listener {
            Some(l) => l,
            None => TcpListener::bind(&settings.bind)
                .with_context(|| format!("cannot listen on {}", settings.bind))?,
        };
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if settings.send_timeout_ms > 0 {
            // Inherited by every accepted connection: a client that stops reading an
            // answer (zero window) or vanishes is dropped after this long.
            socket2::SockRef::from(&listener)
                .set_tcp_user_timeout(Some(std::time::Duration::from_millis(
                    settings.send_timeout_ms,
                )))
                .context("cannot set TCP_USER_TIMEOUT (TESTFLINGER_SEND_TIMEOUT_MS)")?;
        }
        let port = listener.local_addr()?.port();
        let workers = settings.workers;
        let auth = Arc::new(
            crate::auth::Auth::new(
                settings.jwt_signing_key.as_ref().map(|k| k.0.as_str()),
                settings.jwt_leeway,
                settings.access_ttl,
            )
            .with_max_hashes(settings.login_max_hashes),
        );
        if auth.enabled() {
            bootstrap_admin(&store, &settings).await?;
        } else {
            tracing::warn!(
                "AUTHENTICATION IS OFF: JWT_SIGNING_KEY is not set, so anyone who can reach this server may claim jobs, read their secrets, cancel any job and change agents. Run it like this only on a trusted network."
            );
        }
        let settings = Arc::new(settings);
        let events_close = CancellationToken::new();
        let (events, events_task) = crate::events::EventSink::start(
            broker.clone(),
            http.clone(),
            settings.clone(),
            events_close.clone(),
        );
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let logs = crate::logs::Logs::default();
        let jobs = crate::jobs::Jobs {
            store: store.clone(),
            broker: broker.clone(),
            events: events.clone(),
            settings: settings.clone(),
            metrics: metrics.clone(),
            auth_enabled: auth.enabled(),
            compact_now: logs.compact_now.clone(),
        };
        let state = AppState {
            store,
            broker,
            files,
            settings,
            http,
            events,
            metrics,
            auth,
            logs,
            jobs,
        };
        let data = web::Data::new(state.clone());
        let docs_dir = state.settings.docs_dir.clone();
        let limits = web::Data::new(crate::limits::Limits::from_settings(&state.settings));
        let ms = std::time::Duration::from_millis;
        let keep_alive = match state.settings.keep_alive_ms {
            0 => actix_web::http::KeepAlive::Disabled,
            n => actix_web::http::KeepAlive::Timeout(ms(n)),
        };
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(limits.clone())
                .app_data(web::PayloadConfig::new(16 * 1024 * 1024))
                .wrap(middleware::from_fn(crate::limits::guard))
                .wrap(middleware::NormalizePath::new(
                    middleware::TrailingSlash::MergeOnly,
                ))
                // Outermost: CSP, nosniff, framing on every answer (ui::headers).
                .wrap(middleware::from_fn(crate::ui::headers::security_headers))
                .route("/metrics", web::get().to(crate::routes::metrics::metrics))
                .configure(crate::routes::configure)
                .configure(crate::ui::configure)
                .configure(|cfg| crate::docs_site::configure(cfg, &docs_dir))
                .default_service(web::to(crate::routes::not_found))
        })
        .workers(workers)
        .client_request_timeout(ms(state.settings.header_timeout_ms))
        .client_disconnect_timeout(ms(state.settings.disconnect_timeout_ms))
        .keep_alive(keep_alive)
        .listen(listener)?
        .run();
        // Connect and declare the topology now, so the first submission does not pay it.
        let warm = state.broker.clone();
        let warm_up = tokio::spawn(async move {
            if let Err(e) = warm.ready().await {
                tracing::warn!(error = %e, "RabbitMQ not reachable yet; submissions answer 503 until it is");
            }
        });
        // Shutdown is an input of every background task (as in mini-redis): each ends
        // between passes when it is cancelled, and `run_until_stopped` waits for them.
        let shutdown = CancellationToken::new();
        let interval = std::time::Duration::from_millis(state.settings.reaper_interval_ms.max(50));
        let mut background = vec![
            warm_up,
            tokio::spawn(crate::reaper::run(state.clone(), shutdown.clone())),
            tokio::spawn(crate::logs::run_compactor(
                state.store.clone(),
                state.files.clone(),
                state.metrics.clone(),
                state.logs.clone(),
                interval,
                shutdown.clone(),
            )),
            tokio::spawn(crate::logs::run_subscriber(
                state.store.clone(),
                state.logs.clone(),
                shutdown.clone(),
            )),
            tokio::spawn(crate::reaper::run_reconciler(
                state.clone(),
                std::time::Duration::from_millis(state.settings.reconcile_interval_ms.max(100)),
                shutdown.clone(),
            )),
        ];
        if state.settings.submit_consumer {
            background.push(tokio::spawn(crate::admission::run(
                state.clone(),
                shutdown.clone(),
            )));
        }
        Ok(Application {
            port,
            server,
            state,
            background,
            events_task,
            events_close,
            shutdown,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until SIGTERM/ctrl-c (actix handles both gracefully) or `handle().stop()`,
    /// then shuts down in order: the background tasks are told to stop and finish the
    /// pass under way (at most [`DRAIN`] each), then the events queued so far are
    /// published (at most [`DRAIN`]; the ones left are only webhooks and events, whose
    /// jobs' state is in Redis).
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let r = self.server.await;
        self.shutdown.cancel();
        for t in self.background {
            let abort = t.abort_handle();
            if tokio::time::timeout(DRAIN, t).await.is_err() {
                tracing::warn!("a background task did not stop in time: aborted");
                abort.abort();
            }
        }
        // The publisher takes no new event and publishes what is queued, then ends.
        self.events_close.cancel();
        let abort = self.events_task.abort_handle();
        if tokio::time::timeout(DRAIN, self.events_task).await.is_err() {
            tracing::warn!("events still queued at shutdown were not all published: aborted");
            abort.abort();
        }
        r
    }

    /// A token cancelled at shutdown (tests use it to stop the background tasks).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// Creates the administrator named by `TESTFLINGER_ADMIN_ID` when
/// `TESTFLINGER_ADMIN_SECRET` is set, or resets its secret and role when they changed.
async fn bootstrap_admin(store: &Store, settings: &Settings) -> anyhow::Result<()> {
    let Some(secret) = settings.admin_secret.as_ref().map(|s| s.0.clone()) else {
        tracing::info!(
            "authentication on; no TESTFLINGER_ADMIN_SECRET, so no bootstrap administrator"
        );
        return Ok(());
    };
    let id = settings.admin_id.as_str();
    let existing = store.client(id).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(rec) = &existing
        && rec.permissions.role == crate::auth::Role::Admin
        && crate::auth::verify_secret(secret.clone(), rec.secret_hash.clone())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
    {
        return Ok(());
    }
    let hash = crate::auth::hash_secret(secret)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    store
        .put_client(
            id,
            &crate::store::ClientUpdate {
                secret_hash: Some(hash),
                role: Some(crate::auth::Role::Admin),
                max_priority: Some([("*".to_string(), 1_000_000)].into()),
                max_reservation_time: Some([("*".to_string(), 30 * 24 * 3600)].into()),
                email: None,
                agent_id: None,
                agent_queues: None,
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    tracing::info!(client_id = id, "bootstrap administrator ready");
    Ok(())
}

/// A URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match url.split_once('@') {
        Some((creds, host)) if creds.contains("://") => {
            let scheme = creds.split("://").next().unwrap_or("");
            format!("{scheme}://***@{host}")
        }
        _ => url.to_string(),
    }
}
