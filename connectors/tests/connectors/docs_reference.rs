//! The device configuration reference (docs/src/reference/device-config.md) names every
//! key of `DeviceConfig`. Its `#[serde(flatten)]` field hides the key list from serde,
//! so the keys are read from the struct's source.

use testflinger_common::introspect::source_struct_fields;
use testflinger_testing::reference;

#[test]
fn every_device_config_key_is_in_the_reference() {
    let src = include_str!("../../src/config.rs");
    let keys = source_struct_fields(src, "DeviceConfig").expect("struct DeviceConfig");
    reference(
        "device-config.md",
        "device config key",
        "connectors/src/config.rs",
    )
    .assert_names(&keys, 15);
}
