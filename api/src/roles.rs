//! Who a client is: upstream Testflinger's roles and the permissions an access token
//! carries (reference §1.4), and our agent identity (DESIGN.md "Who may do what"). Plain
//! data, below everything that checks it (`auth`) or stores it (`store`).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A client's role. Upstream's four.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Manager,
    #[default]
    Contributor,
    Agent,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Manager => "manager",
            Role::Contributor => "contributor",
            Role::Agent => "agent",
        }
    }

    /// Roles a client of this role may hand out: an admin any; a manager any but admin;
    /// others none.
    pub fn may_grant(self, other: Role) -> bool {
        match self {
            Role::Admin => true,
            Role::Manager => other != Role::Admin,
            _ => false,
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "manager" => Ok(Role::Manager),
            "contributor" => Ok(Role::Contributor),
            "agent" => Ok(Role::Agent),
            other => Err(format!(
                "'{other}' is not a role; one of admin, manager, contributor, agent"
            )),
        }
    }
}

/// Roles of upstream's route table.
pub const AGENT: &[Role] = &[Role::Agent];
pub const ADMIN_MANAGER: &[Role] = &[Role::Admin, Role::Manager];
pub const ADMIN_MANAGER_AGENT: &[Role] = &[Role::Admin, Role::Manager, Role::Agent];
pub const ADMIN: &[Role] = &[Role::Admin];
/// Authenticated users (not agents): secrets.
pub const USERS: &[Role] = &[Role::Admin, Role::Manager, Role::Contributor];

/// What a client may do; carried in its access token (claim `permissions`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Permissions {
    pub client_id: String,
    #[serde(default)]
    pub role: Role,
    /// Highest `job_priority` per queue; `*` for every queue.
    #[serde(default)]
    pub max_priority: BTreeMap<String, i64>,
    /// Restricted queues this client may submit to.
    #[serde(default)]
    pub allowed_queues: Vec<String>,
    /// Longest reservation in seconds per queue; `*` for every queue.
    #[serde(default)]
    pub max_reservation_time: BTreeMap<String, u64>,
}

/// The one agent (device) an `agent` credential stands for (our rule, DESIGN.md "Who
/// may do what"): its `agent_id` (the client record's `agent_id`, recorded by an admin,
/// else the client id) and the queues an admin or manager let it serve (`None`: none
/// set, so the queues its own agent record lists).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentIdentity {
    pub agent_id: String,
    pub queues: Option<Vec<String>>,
}

impl Permissions {
    pub fn limit<T: Copy + Ord>(map: &BTreeMap<String, T>, queue: &str) -> Option<T> {
        [map.get(queue), map.get("*")]
            .into_iter()
            .flatten()
            .copied()
            .max()
    }
}
