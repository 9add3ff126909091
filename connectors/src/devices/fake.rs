//! `fake` (alias `fake_connector`): provisions nothing. Provision prints the job's
//! `provision_data` (firmware_update likewise); every other stage is the default, so a
//! lab or a test setup can run whole jobs without hardware.

use super::Device;
use crate::context::Ctx;
use crate::error::Result;
use serde_json::Value;

pub struct Fake;

fn print_section(title: &str, data: &Value) {
    println!("*** {title} ***");
    println!(
        "{}",
        serde_json::to_string_pretty(data).unwrap_or_else(|_| data.to_string())
    );
}

impl Device for Fake {
    async fn provision(&self, ctx: &Ctx) -> Result<i32> {
        println!("Fake device connector: nothing is provisioned.");
        print_section(
            "provision_data",
            ctx.job.provision_data.as_ref().unwrap_or(&Value::Null),
        );
        Ok(0)
    }

    async fn firmware_update(&self, ctx: &Ctx) -> Result<i32> {
        println!("Fake device connector: no firmware is updated.");
        let data = ctx
            .job
            .firmware_update_data
            .clone()
            .map(Value::Object)
            .unwrap_or(Value::Null);
        print_section("firmware_update_data", &data);
        Ok(0)
    }
}
