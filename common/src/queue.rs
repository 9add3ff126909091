//! Queue-name rules. A job queue is also a RabbitMQ queue name, so the broker's limits
//! apply: at most 255 bytes there; we keep 200 to leave room for suffixes. Names starting
//! with `amq.` are reserved by RabbitMQ, and `testflinger.` by our own topology.

/// Longest accepted queue name, in bytes.
pub const MAX_QUEUE_NAME_BYTES: usize = 200;

/// Checks a job queue name; the error says what is wrong with it.
pub fn validate_queue_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("queue name must not be empty".into());
    }
    if name.len() > MAX_QUEUE_NAME_BYTES {
        return Err(format!(
            "queue name is {} bytes long; at most {MAX_QUEUE_NAME_BYTES} are allowed",
            name.len()
        ));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(format!(
            "queue name contains the non-printable character U+{:04X}",
            c as u32
        ));
    }
    for reserved in ["amq.", "testflinger."] {
        if name.starts_with(reserved) {
            return Err(format!(
                "queue name must not start with '{reserved}' (reserved)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        assert!(validate_queue_name("rpi4-lab").is_ok());
        assert!(validate_queue_name("ünïcode queue").is_ok());
        assert!(validate_queue_name("").is_err());
        assert!(validate_queue_name(&"x".repeat(201)).is_err());
        assert!(validate_queue_name(&"x".repeat(200)).is_ok());
        assert!(validate_queue_name("a\nb").is_err());
        assert!(validate_queue_name("amq.gen").is_err());
        assert!(validate_queue_name("testflinger.submit").is_err());
    }
}
