//! Who is looking: the one place that decides what a page may show.
//!
//! Every page handler takes a [`Viewer`] and passes the data it read through it. Auth is
//! not built yet, so with auth off (today, always) the viewer is anonymous and may see
//! and cancel everything, as upstream's UI without auth. When auth lands, build the
//! viewer from the request's credentials in [`Viewer::from_request`] and narrow the
//! `may_*` answers (e.g. restricted queues, the owner of a job); no page needs changing.

use crate::state::AppState;
use actix_web::HttpRequest;

#[derive(Debug, Clone)]
pub struct Viewer {
    /// The authenticated client, when auth is on and the request carries credentials.
    pub client_id: Option<String>,
}

impl Viewer {
    /// The viewer of a request. With auth off: anonymous, allowed everything.
    pub fn from_request(_req: &HttpRequest, _app: &AppState) -> Viewer {
        Viewer { client_id: None }
    }

    /// May this viewer see jobs of `queue` (their rows, definition and output)?
    pub fn may_see_queue(&self, _queue: &str) -> bool {
        true
    }

    /// May this viewer see the agent `name` and its records?
    pub fn may_see_agent(&self, _name: &str) -> bool {
        true
    }

    /// May this viewer cancel a job of `queue` (owned by `owner`, when recorded)?
    pub fn may_cancel(&self, _queue: &str, _owner: Option<&str>) -> bool {
        true
    }
}
