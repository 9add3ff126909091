//! `testflinger-server`: the Testflinger v1 HTTP API.
//!
//! Reads its settings from `TESTFLINGER_CONFIG` and the environment (see
//! `testflinger_api::settings`), serves until SIGTERM or ctrl-c, then drains requests.
//! Exits 1 with a one-line message when settings are invalid or Redis is unreachable.
//!
//! `testflinger-server broker-permissions ROLE [AGENT_ID QUEUE...]` prints the RabbitMQ
//! permissions (configure, write, read regexes, one per line) of a role's user, for
//! deployment scripts: ROLE is `api`, `agent` (with its id and job queues), `submitter` or
//! `events`. Exits 2 on a bad role.

use testflinger_api::settings::Settings;
use testflinger_api::startup::Application;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("broker-permissions") {
        std::process::exit(print_permissions(&args[1..]));
    }
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

fn print_permissions(args: &[String]) -> i32 {
    use testflinger_broker::permissions;
    let p = match args.first().map(String::as_str) {
        Some("api") => permissions::api(),
        Some("submitter") => permissions::submitter(),
        Some("events") => permissions::events_subscriber(),
        Some("agent") if args.len() >= 2 => permissions::agent(&args[1], &args[2..]),
        _ => {
            eprintln!(
                "testflinger-server broker-permissions: expected ROLE: api, agent AGENT_ID [QUEUE...], submitter or events"
            );
            return 2;
        }
    };
    println!("{}\n{}\n{}", p.configure, p.write, p.read);
    0
}
