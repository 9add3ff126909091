//! Agents as the API shows them: their records, read once for every view (upstream's
//! `GET /v1/agents/data`, queue views, the exclusion check at submit, `/metrics`).

use crate::error::ApiResult;
use crate::store::Store;
use serde_json::{Map, Value, json};
use std::collections::HashMap;

/// An agent record as the API shows it.
pub fn agent_json(h: HashMap<String, String>) -> Value {
    let mut o = Map::new();
    for key in [
        "name",
        "state",
        "location",
        "provision_type",
        "identifier",
        "job_id",
        "comment",
        "updated_at",
    ] {
        if let Some(v) = h.get(key) {
            o.insert(key.into(), json!(v));
        }
    }
    let queues: Value = h
        .get("queues")
        .and_then(|q| serde_json::from_str(q).ok())
        .unwrap_or_else(|| json!([]));
    o.insert("queues".into(), queues);
    if let Some(t) = h.get("provision_streak_type") {
        o.insert("provision_streak_type".into(), json!(t));
        let n: i64 = h
            .get("provision_streak_count")
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        o.insert("provision_streak_count".into(), json!(n));
    }
    o.insert("restricted_to".into(), json!({}));
    Value::Object(o)
}

/// Every known agent, oldest registration first.
pub async fn all_agents(store: &Store) -> ApiResult<Vec<Value>> {
    let mut out = Vec::new();
    let mut gone = Vec::new();
    for (n, h) in store.agent_records().await? {
        if h.is_empty() {
            gone.push(n.clone());
        } else {
            out.push(agent_json(h));
        }
    }
    store.forget_agents(&gone).await?;
    Ok(out)
}

pub async fn agents_on_queue(store: &Store, queue: &str) -> ApiResult<Vec<Value>> {
    Ok(all_agents(store)
        .await?
        .into_iter()
        .filter(|a| {
            a.get("queues")
                .and_then(Value::as_array)
                .is_some_and(|qs| qs.iter().any(|q| q == queue))
        })
        .collect())
}
