//! The job schema reference (docs/src/reference/job.md) names every job field.

use testflinger_common::introspect::struct_fields;
use testflinger_common::job::{Attachment, Job, ReserveData, TestData};
use testflinger_testing::reference;

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
    reference("job.md", "job field", "common/src/job.rs").assert_names(&items, 21);
}
