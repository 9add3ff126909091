//! Public keys for a reservation: raw keys as given, `lp:`/`gh:` keys fetched from a key
//! service (Launchpad and GitHub by default; `ssh_key_service` overrides the URL).

use crate::api::{chain, http_client};
use crate::error::{ConnectorError, Result};
use std::time::Duration;
use testflinger_common::job::SshKey;

pub const LAUNCHPAD_URL: &str = "https://launchpad.net/~{user}/+sshkeys";
pub const GITHUB_URL: &str = "https://github.com/{user}.keys";

/// The URL a key source is fetched from, `None` for a raw key.
pub fn key_url(key: &SshKey, service: Option<&str>) -> Option<String> {
    let (provider, user, default) = match key {
        SshKey::Launchpad(u) => ("lp", u, LAUNCHPAD_URL),
        SshKey::GitHub(u) => ("gh", u, GITHUB_URL),
        SshKey::Raw(_) => return None,
    };
    let template = service.unwrap_or(default);
    Some(
        template
            .replace("{provider}", provider)
            .replace("{user}", &percent_encode(user)),
    )
}

/// Resolves every key source to OpenSSH public key lines, in order, without duplicates.
///
/// Fails when a key service cannot be reached, answers an error, or lists no key.
pub async fn resolve(keys: &[SshKey], service: Option<&str>) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    let mut client = None;
    for key in keys {
        let lines = match (key, key_url(key, service)) {
            (SshKey::Raw(k), _) => vec![k.trim().to_string()],
            (_, Some(url)) => {
                let client = match &client {
                    Some(c) => c,
                    None => client.insert(http_client(Duration::from_secs(15))?),
                };
                fetch(client, key, &url).await?
            }
            (_, None) => Vec::new(),
        };
        for l in lines {
            if !out.contains(&l) {
                out.push(l);
            }
        }
    }
    Ok(out)
}

async fn fetch(client: &reqwest::Client, key: &SshKey, url: &str) -> Result<Vec<String>> {
    let fail = |why: String| {
        ConnectorError::KeyFetch(format!(
            "cannot fetch SSH keys for {key} from {url}: {why} (check the key service, \
             device config ssh_key_service, or give a raw public key)"
        ))
    };
    let resp = client.get(url).send().await.map_err(|e| fail(chain(&e)))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(fail(format!("the service answered {status}")));
    }
    let body = resp.text().await.map_err(|e| fail(chain(&e)))?;
    let keys: Vec<String> = body
        .lines()
        .map(str::trim)
        .filter(|l| {
            l.parse::<SshKey>()
                .is_ok_and(|k| matches!(k, SshKey::Raw(_)))
        })
        .map(str::to_string)
        .collect();
    if keys.is_empty() {
        return Err(ConnectorError::KeyFetch(format!(
            "no SSH public keys found for {key} at {url}"
        )));
    }
    Ok(keys)
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let lp = SshKey::Launchpad("alice".into());
        let gh = SshKey::GitHub("bo b/..".into());
        assert_eq!(
            key_url(&lp, None).as_deref(),
            Some("https://launchpad.net/~alice/+sshkeys")
        );
        assert_eq!(
            key_url(&gh, None).as_deref(),
            Some("https://github.com/bo%20b%2F...keys")
        );
        assert_eq!(
            key_url(&lp, Some("http://k/{provider}/{user}")).as_deref(),
            Some("http://k/lp/alice")
        );
        assert_eq!(key_url(&SshKey::Raw("ssh-ed25519 AAAA".into()), None), None);
    }
}
