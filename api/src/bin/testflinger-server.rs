//! `testflinger-server`: the Testflinger v1 HTTP API.
//!
//! Reads its settings from `TESTFLINGER_CONFIG` and the environment (see
//! `testflinger_api::settings`), serves until SIGTERM or ctrl-c, then drains requests.
//! Exits 1 with a one-line message when settings are invalid or Redis is unreachable.

use testflinger_api::settings::Settings;
use testflinger_api::startup::Application;

#[tokio::main]
async fn main() {
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("testflinger-server: invalid configuration: {e}");
            std::process::exit(1);
        }
    };
    testflinger_api::telemetry::init(&settings.log_format);
    let bind = settings.bind.clone();
    let app = match Application::build(settings, None).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("testflinger-server: {e:#}");
            std::process::exit(1);
        }
    };
    tracing::info!(bind = %bind, port = app.port(), "testflinger-server listening");
    if let Err(e) = app.run_until_stopped().await {
        eprintln!("testflinger-server: {e}");
        std::process::exit(1);
    }
}
