//! The server settings reference (docs/src/reference/server-settings.md) names every
//! setting of `Settings`.

use testflinger_api::settings::Settings;
use testflinger_common::introspect::{check_documented, struct_fields};

#[test]
fn every_server_setting_is_in_the_reference() {
    let fields = struct_fields::<Settings>().expect("Settings is a derived struct");
    assert!(
        fields.len() >= 17,
        "the probe found too few settings: {fields:?}"
    );
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
    let page = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/src/reference/server-settings.md"
    );
    let text = std::fs::read_to_string(page).expect("docs/src/reference/server-settings.md");
    if let Err(e) = check_documented(
        &text,
        &vars,
        "server setting",
        "api/src/settings.rs",
        "docs/src/reference/server-settings.md (and README.md's Configuration table)",
    ) {
        panic!("{e}");
    }
}
