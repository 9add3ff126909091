//! One module per scenario; [`run`] dispatches.

mod artifact;
mod dispatch;
mod e2e;
mod logs;
mod memory;
mod raw_publish;
mod scale;
mod stream;
mod submit;

use crate::harness::Ctx;
use crate::report::Report;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    RawPublish,
    Submit,
    Dispatch,
    E2e,
    Stream,
    Artifact,
    Memory,
    Logs,
    Scale,
}

/// The order `all` runs them in: the baselines first, the heavy ones last.
pub const ALL: [Scenario; 9] = [
    Scenario::RawPublish,
    Scenario::Submit,
    Scenario::Dispatch,
    Scenario::E2e,
    Scenario::Stream,
    Scenario::Artifact,
    Scenario::Memory,
    Scenario::Logs,
    Scenario::Scale,
];

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::RawPublish => "raw-publish",
            Scenario::Submit => "submit",
            Scenario::Dispatch => "dispatch",
            Scenario::E2e => "e2e",
            Scenario::Stream => "stream",
            Scenario::Artifact => "artifact",
            Scenario::Memory => "memory",
            Scenario::Logs => "logs",
            Scenario::Scale => "scale",
        }
    }
}

/// Parses scenario names; `all` expands to [`ALL`]. Duplicates run once.
pub fn parse_list(names: &[String]) -> Result<Vec<Scenario>, String> {
    let mut out: Vec<Scenario> = Vec::new();
    for n in names {
        let add: Vec<Scenario> = if n == "all" {
            ALL.to_vec()
        } else {
            vec![ALL.iter().copied().find(|s| s.name() == n).ok_or_else(|| {
                format!(
                    "unknown scenario '{n}' (use {} or all)",
                    ALL.map(Scenario::name).join(", ")
                )
            })?]
        };
        for s in add {
            if !out.contains(&s) {
                out.push(s);
            }
        }
    }
    Ok(out)
}

pub async fn run(s: Scenario, ctx: &mut Ctx) -> anyhow::Result<Report> {
    match s {
        Scenario::RawPublish => raw_publish::run(ctx).await,
        Scenario::Submit => submit::run(ctx).await,
        Scenario::Dispatch => dispatch::run(ctx).await,
        Scenario::E2e => e2e::run(ctx).await,
        Scenario::Stream => stream::run(ctx).await,
        Scenario::Artifact => artifact::run(ctx).await,
        Scenario::Memory => memory::run(ctx).await,
        Scenario::Logs => logs::run(ctx).await,
        Scenario::Scale => scale::run(ctx).await,
    }
}

/// Stops processes concurrently.
pub async fn stop_all(procs: Vec<crate::harness::Proc>) {
    futures_util::future::join_all(procs.into_iter().map(|p| p.stop())).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists() {
        let l = parse_list(&["submit".into(), "all".into()]).expect("valid");
        assert_eq!(l[0], Scenario::Submit);
        assert_eq!(l.len(), ALL.len());
        assert!(parse_list(&["nope".into()]).is_err());
    }
}
