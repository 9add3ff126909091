//! The job schema reference (docs/src/reference/job.md) names every job field.

use testflinger_common::introspect::{check_documented, struct_fields};
use testflinger_common::job::{Attachment, Job, ReserveData, TestData};

fn fields<T: for<'de> serde::Deserialize<'de>>(prefix: &str) -> Vec<String> {
    struct_fields::<T>()
        .expect("a derived struct")
        .iter()
        .map(|f| format!("{prefix}{f}"))
        .collect()
}

#[test]
fn every_job_field_is_in_the_reference() {
    let mut items = fields::<Job>("");
    items.extend(fields::<TestData>("test_data."));
    items.extend(fields::<Attachment>("test_data.attachments[]."));
    items.extend(fields::<ReserveData>("reserve_data."));
    assert!(
        items.len() > 20,
        "the probe found too few fields: {items:?}"
    );
    let page = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/src/reference/job.md");
    let text = std::fs::read_to_string(page).expect("docs/src/reference/job.md");
    if let Err(e) = check_documented(
        &text,
        &items,
        "job field",
        "common/src/job.rs",
        "docs/src/reference/job.md",
    ) {
        panic!("{e}");
    }
}
