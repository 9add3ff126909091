//! The environment of phase processes: an allow-list, never the agent's own.
//!
//! A phase runs the job's commands, which the job's submitter wrote; it must not see the
//! agent's broker URI (`AMQP_URI`, with its password), its API token or anything else
//! the agent process holds. Phases get only the variables below from the agent's
//! environment, plus what the agent adds on purpose (the config's string values, the
//! job's resolved secrets in the test phase).

/// Variables passed through from the agent's environment: locale, paths, terminal,
/// time zone and proxies (lab networks often need them). `LC_*` passes too.
pub const INHERITED: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "TERM",
    "TZ",
    "TMPDIR",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
];

/// Whether a variable of the agent's environment may reach a phase.
pub fn allowed(name: &str) -> bool {
    INHERITED.contains(&name) || name.starts_with("LC_")
}

/// The allowed part of the agent's environment (variables that are not valid UTF-8 are
/// left out).
pub fn inherited() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| allowed(k))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::allowed;

    #[test]
    fn credentials_never_pass() {
        for name in [
            "AMQP_URI",
            "REDIS_URL",
            "JWT_SIGNING_KEY",
            "TESTFLINGER_SECRET_KEY",
            "TESTFLINGER_CLIENT_ID",
            "TESTFLINGER_ADMIN_SECRET",
            "RABBITMQ_DEFAULT_PASS",
            "AWS_SECRET_ACCESS_KEY",
        ] {
            assert!(!allowed(name), "{name}");
        }
        assert!(allowed("PATH") && allowed("LC_ALL") && allowed("https_proxy"));
    }
}
