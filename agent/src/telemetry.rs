//! The tracing subscriber: `RUST_LOG` wins over the config's `logging_level`;
//! `logging_quiet` keeps only warnings and errors.

use crate::config::Config;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber (stderr). Calling it twice is harmless.
pub fn init(cfg: &Config) {
    let level = if cfg.logging_quiet {
        "warn".to_string()
    } else {
        match cfg.logging_level.to_ascii_lowercase().as_str() {
            "critical" | "fatal" => "error".to_string(),
            "warning" => "warn".to_string(),
            other => other.to_string(),
        }
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal (and never with NO_COLOR): a log redirected to a
        // file or journald stays plain text.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .try_init();
}
