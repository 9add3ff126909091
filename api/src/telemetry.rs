//! One tracing subscriber for every binary: `RUST_LOG` filters (default `info`), JSON
//! output with `json`.

use tracing_subscriber::EnvFilter;

pub fn init(format: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,lapin=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal (and never with NO_COLOR): a log redirected to a
        // file or journald stays plain text.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        );
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
