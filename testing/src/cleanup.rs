//! Removing what a test made on the shared services: its Redis keys, its broker queues,
//! its directories.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;
use testflinger_broker::{Broker, BrokerConfig};

/// Removes, when dropped, the keys under one Redis prefix (`<prefix>:*`), the broker
/// queues it was told about and its directories. Drop blocks (bounded) until done; it
/// may run inside an async runtime.
#[derive(Debug)]
pub struct Cleanup {
    amqp_uri: String,
    redis: Option<(String, String)>,
    queues: Mutex<Vec<String>>,
    dirs: Vec<PathBuf>,
}

impl Default for Cleanup {
    fn default() -> Self {
        Cleanup::new()
    }
}

impl Cleanup {
    /// Nothing to remove yet; queues are deleted on [`crate::amqp_uri`]'s broker.
    pub fn new() -> Cleanup {
        Cleanup {
            amqp_uri: crate::amqp_uri(),
            redis: None,
            queues: Mutex::new(Vec::new()),
            dirs: Vec::new(),
        }
    }

    /// Deletes the queues on this broker instead.
    pub fn amqp(mut self, uri: &str) -> Cleanup {
        self.amqp_uri = uri.to_string();
        self
    }

    /// Deletes the keys `<prefix>:*` of the Redis at `url`.
    pub fn redis_prefix(mut self, url: &str, prefix: &str) -> Cleanup {
        self.redis = Some((url.to_string(), prefix.to_string()));
        self
    }

    /// Removes the directory `path` (and all below it).
    pub fn dir(mut self, path: impl Into<PathBuf>) -> Cleanup {
        self.dirs.push(path.into());
        self
    }

    /// Deletes the broker queue `name` too.
    pub fn queue(&self, name: impl Into<String>) {
        self.queues.lock().expect("lock").push(name.into());
    }

    /// The queues still to delete; they are no longer deleted on drop.
    pub fn take_queues(&self) -> Vec<String> {
        std::mem::take(&mut *self.queues.lock().expect("lock"))
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut *self.queues.lock().unwrap_or_else(|e| e.into_inner()));
        delete_queues(&self.amqp_uri, queues);
        if let Some((url, prefix)) = &self.redis {
            delete_keys(url, prefix);
        }
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Deletes the keys `<prefix>:*` of the Redis at `url` (blocking, bounded; errors are
/// ignored: the Redis may be gone).
pub fn delete_keys(url: &str, prefix: &str) {
    let timeout = Some(Duration::from_secs(5));
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(mut con) = client.get_connection_with_timeout(Duration::from_secs(2)) else {
        return;
    };
    let _ = con.set_read_timeout(timeout);
    let _ = con.set_write_timeout(timeout);
    let mut cursor: u64 = 0;
    loop {
        let r: redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(500)
            .query(&mut con);
        let Ok((next, keys)) = r else { return };
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query(&mut con);
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

/// Deletes broker queues (blocking, bounded; errors are ignored). Runs on a thread of
/// its own with its own runtime, so that it may be called from inside a runtime.
pub fn delete_queues(amqp_uri: &str, queues: Vec<String>) {
    if queues.is_empty() {
        return;
    }
    let uri = amqp_uri.to_string();
    let _ = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let Ok(broker) = Broker::new(BrokerConfig::new(uri)) else {
                return;
            };
            for q in &queues {
                let _ = tokio::time::timeout(Duration::from_secs(5), broker.delete_queue(q)).await;
            }
        });
    })
    .join();
}
