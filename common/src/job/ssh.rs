//! `reserve_data.ssh_keys`: where a reservation's SSH public keys come from.

use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;
use std::str::FromStr;

/// An SSH public key source for a reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SshKey {
    /// `lp:<user>`: the user's keys on Launchpad.
    Launchpad(String),
    /// `gh:<user>`: the user's keys on GitHub.
    GitHub(String),
    /// A literal OpenSSH public key line.
    Raw(String),
}

const RAW_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ssh-dss",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

impl FromStr for SshKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let user_ok = |u: &str| !u.is_empty() && !u.chars().any(char::is_whitespace);
        if let Some(u) = s.strip_prefix("lp:") {
            return if user_ok(u) {
                Ok(SshKey::Launchpad(u.into()))
            } else {
                Err(format!("'{s}' is not a valid key: 'lp:' needs a user name"))
            };
        }
        if let Some(u) = s.strip_prefix("gh:") {
            return if user_ok(u) {
                Ok(SshKey::GitHub(u.into()))
            } else {
                Err(format!("'{s}' is not a valid key: 'gh:' needs a user name"))
            };
        }
        let mut parts = s.split_whitespace();
        let kind = parts.next().unwrap_or_default();
        let blob = parts.next().unwrap_or_default();
        let b64 = |b: &str| {
            b.len() >= 16
                && b.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/' || c == '=')
        };
        if RAW_KEY_TYPES.contains(&kind) && b64(blob) && !s.contains('\n') {
            Ok(SshKey::Raw(s.to_string()))
        } else {
            Err(format!(
                "'{}' is not a valid key: use lp:<user>, gh:<user> or an OpenSSH public key line",
                s.chars().take(40).collect::<String>()
            ))
        }
    }
}

impl fmt::Display for SshKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SshKey::Launchpad(u) => write!(f, "lp:{u}"),
            SshKey::GitHub(u) => write!(f, "gh:{u}"),
            SshKey::Raw(k) => f.write_str(k),
        }
    }
}

impl Serialize for SshKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SshKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
