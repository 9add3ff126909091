//! Reference pages that must name every item of a struct (settings, config keys, job
//! fields).

use std::path::Path;
use testflinger_common::introspect::check_documented;

/// A check that the page `docs/src/reference/<page>` names every item (in backticks).
#[derive(Debug, Clone)]
pub struct Reference {
    page: String,
    what: &'static str,
    source: &'static str,
    also: Option<&'static str>,
}

/// The reference page `page` (in `docs/src/reference/`) of the `what`s (e.g. "agent
/// config key") defined in `source` (a path from the workspace root, for the message).
pub fn reference(page: &str, what: &'static str, source: &'static str) -> Reference {
    Reference {
        page: format!("docs/src/reference/{page}"),
        what,
        source,
        also: None,
    }
}

impl Reference {
    /// Another place that lists the items, named in the failure message.
    pub fn also(mut self, place: &'static str) -> Reference {
        self.also = Some(place);
        self
    }

    /// Panics unless the page names every one of `items`, or when there are fewer than
    /// `at_least` of them (the probe that found them is broken).
    #[track_caller]
    pub fn assert_names<S: AsRef<str>>(&self, items: &[S], at_least: usize) {
        let items: Vec<String> = items.iter().map(|i| i.as_ref().to_string()).collect();
        assert!(
            items.len() >= at_least,
            "the probe found too few {}s: {items:?}",
            self.what
        );
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let text = std::fs::read_to_string(root.join(&self.page))
            .unwrap_or_else(|e| panic!("{}: {e}", self.page));
        let fix_in = match self.also {
            Some(also) => format!("{} (and {also})", self.page),
            None => self.page.clone(),
        };
        if let Err(e) = check_documented(&text, &items, self.what, self.source, &fix_in) {
            panic!("{e}");
        }
    }
}
