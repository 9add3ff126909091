//! The agent configuration reference (docs/src/reference/agent-config.md) names every key
//! of the agent's `Config`.

use testflinger_agent::config::Config;
use testflinger_common::introspect::{check_documented, struct_fields};

#[test]
fn every_agent_config_key_is_in_the_reference() {
    let fields = struct_fields::<Config>().expect("Config is a derived struct");
    assert!(
        fields.len() >= 20,
        "the probe found too few keys: {fields:?}"
    );
    let keys: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
    let page = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/src/reference/agent-config.md"
    );
    let text = std::fs::read_to_string(page).expect("docs/src/reference/agent-config.md");
    if let Err(e) = check_documented(
        &text,
        &keys,
        "agent config key",
        "agent/src/config.rs",
        "docs/src/reference/agent-config.md",
    ) {
        panic!("{e}");
    }
}
