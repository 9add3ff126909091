//! The server settings reference (docs/src/reference/server-settings.md) names every
//! setting of `Settings`.

use testflinger_api::settings::Settings;
use testflinger_common::introspect::struct_fields;
use testflinger_testing::reference;

#[test]
fn every_server_setting_is_in_the_reference() {
    let fields = struct_fields::<Settings>().expect("Settings is a derived struct");
    let vars: Vec<String> = fields
        .iter()
        .map(|f| match *f {
            // Read under their own (upstream's) names, without the prefix.
            "amqp_uri" | "redis_url" | "data_path" | "jwt_signing_key" | "jwt_leeway" => {
                f.to_ascii_uppercase()
            }
            _ => format!("TESTFLINGER_{}", f.to_ascii_uppercase()),
        })
        .collect();
    reference(
        "server-settings.md",
        "server setting",
        "api/src/settings.rs",
    )
    .also("README.md's Configuration table")
    .assert_names(&vars, 17);
}
