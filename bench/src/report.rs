//! One table row per scenario on stdout, one JSON line per scenario in `--json`.

use anyhow::Context;
use serde_json::{Map, Value, json};
use std::io::Write;
use std::path::PathBuf;

/// A goal a figure is judged against.
#[derive(Debug, Clone, Copy)]
pub enum Goal {
    AtMost(f64),
    AtLeast(f64),
}

impl Goal {
    fn met(self, v: f64) -> bool {
        match self {
            Goal::AtMost(g) => v <= g,
            Goal::AtLeast(g) => v >= g,
        }
    }
    fn text(self) -> String {
        match self {
            Goal::AtMost(g) => format!("<= {}", fmt(g)),
            Goal::AtLeast(g) => format!(">= {}", fmt(g)),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
    pub goal: Option<Goal>,
}

/// What a scenario measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub scenario: &'static str,
    pub params: Map<String, Value>,
    pub figures: Vec<Figure>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(scenario: &'static str) -> Report {
        Report {
            scenario,
            params: Map::new(),
            figures: Vec::new(),
            notes: Vec::new(),
        }
    }
    pub fn param(&mut self, k: &str, v: impl Into<Value>) -> &mut Self {
        self.params.insert(k.into(), v.into());
        self
    }
    pub fn fig(&mut self, name: &str, value: f64, unit: &'static str) -> &mut Self {
        self.figures.push(Figure {
            name: name.into(),
            value,
            unit,
            goal: None,
        });
        self
    }
    pub fn goal(&mut self, name: &str, value: f64, unit: &'static str, goal: Goal) -> &mut Self {
        self.figures.push(Figure {
            name: name.into(),
            value,
            unit,
            goal: Some(goal),
        });
        self
    }
    pub fn note(&mut self, n: impl Into<String>) -> &mut Self {
        self.notes.push(n.into());
        self
    }
}

/// Rounds for display: 3 significant digits below 100, integers above.
pub fn fmt(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 || (v.fract() == 0.0 && a < 1e15) {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

pub struct Output {
    json: Option<PathBuf>,
    quick: bool,
    rows: Vec<String>,
    rev: String,
}

impl Output {
    pub fn new(json: Option<PathBuf>, quick: bool) -> Output {
        let rev = std::process::Command::new("git")
            .args(["describe", "--always", "--dirty", "--abbrev=10"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        Output {
            json,
            quick,
            rows: Vec::new(),
            rev,
        }
    }

    /// Prints the scenario's row now and keeps it for the final table; appends the JSON line.
    pub fn record(&mut self, r: &Report) -> anyhow::Result<()> {
        let figs: Vec<String> = r
            .figures
            .iter()
            .map(|f| {
                let goal = f
                    .goal
                    .map(|g| {
                        let verdict = if g.met(f.value) { "met" } else { "MISSED" };
                        let unit = if f.unit.is_empty() {
                            String::new()
                        } else {
                            format!(" {}", f.unit)
                        };
                        format!(" (goal {}{unit}: {verdict})", g.text())
                    })
                    .unwrap_or_default();
                let unit = if f.unit.is_empty() {
                    String::new()
                } else {
                    format!(" {}", f.unit)
                };
                format!("{} {}{unit}{goal}", f.name, fmt(f.value))
            })
            .collect();
        let params: Vec<String> = r.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut tail = params.join(" ");
        if !r.notes.is_empty() {
            tail.push_str(" — ");
            tail.push_str(&r.notes.join("; "));
        }
        let row = format!("| {} | {} | {} |", r.scenario, figs.join("; "), tail);
        println!("{row}");
        self.rows.push(row);
        let mut figures = Map::new();
        let mut units = Map::new();
        let mut goals = Map::new();
        for f in &r.figures {
            figures.insert(f.name.clone(), json!(f.value));
            units.insert(f.name.clone(), json!(f.unit));
            if let Some(g) = f.goal {
                goals.insert(
                    f.name.clone(),
                    json!({"goal": g.text(), "met": g.met(f.value)}),
                );
            }
        }
        self.write_json(json!({
            "scenario": r.scenario,
            "quick": self.quick,
            "params": r.params,
            "figures": figures,
            "units": units,
            "goals": goals,
            "notes": r.notes,
            "git_rev": self.rev,
            "date": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }))
    }

    pub fn failed(&mut self, scenario: &str, why: &str) {
        let one_line = why.lines().next().unwrap_or(why);
        let row = format!("| {scenario} | cannot run: {one_line} | |");
        println!("{row}");
        self.rows.push(row);
        if let Err(e) = self.write_json(json!({
            "scenario": scenario,
            "quick": self.quick,
            "error": why,
            "git_rev": self.rev,
            "date": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        })) {
            eprintln!("testflinger-bench: cannot write the JSON line: {e:#}");
        }
    }

    fn write_json(&self, v: Value) -> anyhow::Result<()> {
        let Some(path) = &self.json else {
            return Ok(());
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        writeln!(f, "{v}").with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    pub fn print_table(&self) {
        println!();
        println!("| scenario | figures | parameters |");
        println!("|---|---|---|");
        for r in &self.rows {
            println!("{r}");
        }
    }
}
