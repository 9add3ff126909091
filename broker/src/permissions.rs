//! Least privilege on the broker: the RabbitMQ permissions (configure, write, read
//! regular expressions, as `rabbitmqctl set_permissions` takes them) of each component's
//! user. Deployments create one user per role from these; no component needs the
//! broker's administrator.
//!
//! RabbitMQ checks a publish against the *exchange* (`amq.default` for the default
//! exchange, which reaches every queue), a consume against the queue, a bind against the
//! queue (write) and the exchange (read), a declare against the declared name
//! (configure). Passive declares need nothing.

use crate::topology::{CONTROL_QUEUE_PREFIX, DEAD_LETTER_EXCHANGE, SUBMIT_EXCHANGE, control_queue};

/// One user's permissions in a vhost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub configure: String,
    pub write: String,
    pub read: String,
}

/// Matches nothing (RabbitMQ's idiom).
pub const NOTHING: &str = "^$";

/// A name quoted for a RabbitMQ (Erlang `re`) regular expression.
pub fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        if "\\^$.|?*+()[]{}".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn exactly(names: &[String]) -> String {
    if names.is_empty() {
        return NOTHING.into();
    }
    let alts: Vec<String> = names.iter().map(|n| escape(n)).collect();
    format!("^({})$", alts.join("|"))
}

/// The API: it declares the topology and every job queue, publishes jobs, events,
/// commands and replies, consumes the submit queue and takes jobs for legacy agents.
pub fn api() -> Permissions {
    Permissions {
        configure: ".*".into(),
        write: ".*".into(),
        read: ".*".into(),
    }
}

/// One agent: it may declare and consume its own job queues and read its control queue
/// (declared and bound by the API), and publish nothing. It cannot publish to a job
/// queue, read another agent's control queue, or bind anything to the control exchange.
///
/// Declaring a job queue names its dead-letter exchange (`x-dead-letter-exchange`), for
/// which RabbitMQ wants write on that exchange: the agent's only write permission is
/// `testflinger.dlx` (whose one binding leads to `testflinger.dead`, which no agent may
/// read), so an agent can put messages in the dead-letter queue and nowhere else.
pub fn agent(agent_id: &str, job_queues: &[String]) -> Permissions {
    let mut own: Vec<String> = job_queues.to_vec();
    let control = control_queue(agent_id);
    own.push(control.clone());
    Permissions {
        configure: exactly(&own),
        write: exactly(&[DEAD_LETTER_EXCHANGE.to_string()]),
        read: exactly(&own),
    }
}

/// Another system that submits jobs over AMQP: it may publish to the submit exchange
/// only, and use a private server-named reply queue (`amq.gen-*`) for the answers.
pub fn submitter() -> Permissions {
    Permissions {
        configure: r"^amq\.gen-.*$".into(),
        write: format!("^{}$", escape(SUBMIT_EXCHANGE)),
        read: r"^amq\.gen-.*$".into(),
    }
}

/// A subscriber of job events: a private queue bound to `testflinger.events`.
pub fn events_subscriber() -> Permissions {
    Permissions {
        configure: r"^amq\.gen-.*$".into(),
        write: r"^amq\.gen-.*$".into(),
        read: format!(
            r"^(amq\.gen-.*|{})$",
            escape(crate::topology::EVENTS_EXCHANGE)
        ),
    }
}

/// Whether a queue name is some agent's control queue.
pub fn is_control_queue(name: &str) -> bool {
    name.starts_with(CONTROL_QUEUE_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_regexes_name_only_its_queues() {
        let p = agent("dev.1", &["rpi4".into(), "lab-a".into()]);
        assert_eq!(p.read, r"^(rpi4|lab-a|testflinger\.control\.dev\.1)$");
        assert_eq!(p.write, r"^(testflinger\.dlx)$");
        assert_eq!(agent("x", &[]).read, r"^(testflinger\.control\.x)$");
    }

    #[test]
    fn submitters_write_only_the_submit_exchange() {
        assert_eq!(submitter().write, r"^testflinger\.submit$");
    }
}
