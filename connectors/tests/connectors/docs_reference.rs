//! The device configuration reference (docs/src/reference/device-config.md) names every
//! key of `DeviceConfig`. Its `#[serde(flatten)]` field hides the key list from serde,
//! so the keys are read from the struct's source.

use testflinger_common::introspect::{check_documented, source_struct_fields};

#[test]
fn every_device_config_key_is_in_the_reference() {
    let src = include_str!("../../src/config.rs");
    let keys = source_struct_fields(src, "DeviceConfig").expect("struct DeviceConfig");
    assert!(keys.len() >= 15, "found too few keys: {keys:?}");
    let page = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/src/reference/device-config.md"
    );
    let text = std::fs::read_to_string(page).expect("docs/src/reference/device-config.md");
    if let Err(e) = check_documented(
        &text,
        &keys,
        "device config key",
        "connectors/src/config.rs",
        "docs/src/reference/device-config.md",
    ) {
        panic!("{e}");
    }
}
