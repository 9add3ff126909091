//! Terminal output helpers: one-line errors and the in-place status line.

use std::io::{IsTerminal, Write};

/// Prints an error and its causes as one line on stderr.
pub fn print_error(err: &anyhow::Error) {
    let mut line = String::new();
    for (i, cause) in err.chain().enumerate() {
        let text = one_line(&cause.to_string());
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if i > 0 && !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    eprintln!("error: {line}");
}

/// Collapses whitespace runs (newlines included) into single spaces.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A status line that is redrawn in place on a terminal and printed as plain lines
/// (only when it changes) otherwise.
pub struct StatusLine {
    tty: bool,
    shown: Option<String>,
    on_screen: bool,
}

impl StatusLine {
    pub fn new() -> Self {
        StatusLine {
            tty: std::io::stdout().is_terminal(),
            shown: None,
            on_screen: false,
        }
    }

    /// Shows `text` as the current status.
    pub fn set(&mut self, text: &str) {
        if self.shown.as_deref() == Some(text) {
            return;
        }
        let mut out = std::io::stdout().lock();
        if self.tty {
            let _ = write!(out, "\r\x1b[2K{text}");
            self.on_screen = true;
        } else {
            let _ = writeln!(out, "{text}");
        }
        let _ = out.flush();
        self.shown = Some(text.to_string());
    }

    /// Removes the status line from the terminal before other output is printed.
    pub fn clear(&mut self) {
        if self.tty && self.on_screen {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "\r\x1b[2K");
            let _ = out.flush();
            self.on_screen = false;
        }
        self.shown = None;
    }
}

/// Writes text to stdout at once (log output arrives in pieces without newlines).
pub fn print_raw(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}
