//! `provision_data`: the shapes of the device types' provision data.

use super::validation::{ValidationError, describe_value};
use serde_json::{Map, Value};

/// What a `provision_data` variant accepts: its keys (any other key rules the variant
/// out), the ones it requires, and a check of the values.
struct ProvisionVariant {
    name: &'static str,
    keys: &'static [&'static str],
    required: &'static [&'static str],
    check: fn(&Map<String, Value>) -> bool,
}

fn is_str(m: &Map<String, Value>, k: &str) -> bool {
    m.get(k).is_none_or(Value::is_string)
}

fn is_bool(m: &Map<String, Value>, k: &str) -> bool {
    m.get(k).is_none_or(Value::is_boolean)
}

fn objects(m: &Map<String, Value>, k: &str, min: usize) -> bool {
    m.get(k).is_none_or(|v| {
        v.as_array()
            .is_some_and(|a| a.len() >= min && a.iter().all(Value::is_object))
    })
}

/// The `provision_data` shapes of the device types, as upstream's server validates them
/// (reference section 2: "must fully validate against at least one variant"), with ours:
/// `qemu` takes `{url}` (cm3's shape) and `fake` prints whatever variant it gets.
const PROVISION_VARIANTS: &[ProvisionVariant] = &[
    ProvisionVariant {
        name: "cm3, qemu",
        keys: &["url"],
        required: &["url"],
        check: |m| is_str(m, "url"),
    },
    ProvisionVariant {
        name: "maas",
        keys: &["distro", "kernel", "user_data", "disks", "ephemeral"],
        required: &[],
        check: |m| {
            is_str(m, "distro")
                && is_str(m, "kernel")
                && is_str(m, "user_data")
                && objects(m, "disks", 0)
                && is_bool(m, "ephemeral")
        },
    },
    ProvisionVariant {
        name: "multi",
        keys: &["jobs"],
        required: &["jobs"],
        check: |m| objects(m, "jobs", 1),
    },
    ProvisionVariant {
        name: "muxpi",
        keys: &[
            "url",
            "use_attachment",
            "attachments",
            "create_user",
            "boot_check_url",
            "media",
        ],
        required: &[],
        check: |m| {
            (m.contains_key("url") || m.contains_key("use_attachment"))
                && is_str(m, "url")
                && objects(m, "attachments", 0)
                && m.get("media")
                    .is_none_or(|v| v.as_str().is_some_and(|s| s == "sd" || s == "usb"))
        },
    },
    ProvisionVariant {
        name: "noprovision",
        keys: &["skip"],
        required: &[],
        check: |m| is_bool(m, "skip"),
    },
    ProvisionVariant {
        name: "oem_autoinstall",
        keys: &[
            "url",
            "attachments",
            "token_file",
            "user_data",
            "redeploy_cfg",
            "authorized_keys",
            "control_host_iso_url",
            "control_host_iso_type",
            "update_user_data",
        ],
        required: &[],
        check: |m| is_str(m, "url") && objects(m, "attachments", 0),
    },
    ProvisionVariant {
        name: "oem_script",
        keys: &["url"],
        required: &["url"],
        check: |m| is_str(m, "url"),
    },
    ProvisionVariant {
        name: "control_host",
        keys: &[
            "provisioning_timeout",
            "url",
            "urls",
            "attachments",
            "use_attachment",
            "robot_tasks",
            "preset",
        ],
        required: &[],
        check: |m| {
            is_str(m, "url")
                && objects(m, "attachments", 0)
                && m.get("urls")
                    .is_none_or(|v| v.as_array().is_some_and(|a| a.iter().all(Value::is_string)))
        },
    },
];

/// `provision_data`: `null` (no provisioning) or an object that fully matches one of the
/// device types' shapes ([`PROVISION_VARIANTS`]); otherwise a 422 naming the field, what
/// was given and the accepted shapes.
pub fn validate_provision_data(p: &Value) -> Result<(), ValidationError> {
    let m = match p {
        Value::Null => return Ok(()),
        Value::Object(m) => m,
        other => {
            return Err(ValidationError::new(
                "provision_data",
                format!(
                    "got {}; accepted: null or an object of a device type's provision data",
                    describe_value(other)
                ),
            ));
        }
    };
    let fits = PROVISION_VARIANTS.iter().any(|v| {
        m.keys().all(|k| v.keys.contains(&k.as_str()))
            && v.required.iter().all(|r| m.contains_key(*r))
            && (v.check)(m)
    });
    if fits {
        return Ok(());
    }
    let shapes: Vec<String> = PROVISION_VARIANTS
        .iter()
        .map(|v| format!("{} {{{}}}", v.name, v.keys.join(", ")))
        .collect();
    Err(ValidationError::new(
        "provision_data",
        format!(
            "got {}, which matches no device type's provision data; accepted (all keys of one of): {}",
            describe_value(p),
            shapes.join("; ")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::super::Job;
    use serde_json::json;

    #[test]
    fn provision_data_matches_a_device_types_shape() {
        for ok in [
            json!(null),
            json!({}),
            json!({"url": "http://x/img.qcow2"}),
            json!({"distro": "noble"}),
            json!({"distro": "noble", "ephemeral": true}),
            json!({"skip": true}),
            json!({"jobs": [{"job_queue": "a"}]}),
            json!({"use_attachment": "image.img", "media": "usb"}),
        ] {
            let job = json!({"job_queue": "q", "provision_data": ok});
            assert!(Job::from_value(job.clone()).is_ok(), "{job}");
        }
        for bad in [
            json!({"skip": true, "foo": 1}),
            json!({"jobs": []}),
            json!({"url": 5}),
            json!({"media": "floppy", "url": "x"}),
            json!("http://x"),
            json!({"distro": "noble", "ephemeral": "yes"}),
        ] {
            let job = json!({"job_queue": "q", "provision_data": bad});
            let e = Job::from_value(job.clone()).expect_err("refused");
            assert_eq!(e.field, "provision_data", "{job}");
            assert!(e.message.contains("accepted"), "{e}");
            assert!(e.message.contains("got "), "{e}");
        }
    }
}
