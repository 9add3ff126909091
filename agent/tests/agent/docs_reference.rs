//! The agent configuration reference (docs/src/reference/agent-config.md) names every key
//! of the agent's `Config`.

use testflinger_agent::config::Config;
use testflinger_common::introspect::struct_fields;
use testflinger_testing::reference;

#[test]
fn every_agent_config_key_is_in_the_reference() {
    let keys = struct_fields::<Config>().expect("Config is a derived struct");
    reference("agent-config.md", "agent config key", "agent/src/config.rs").assert_names(keys, 20);
}
