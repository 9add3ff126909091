//! Credentials, as upstream's CLI handles them (reference §6.1-6.2).
//!
//! Sources, first found wins: `--client-id/--secret-key`, the config file's
//! `client_id`/`secret_key`, `TESTFLINGER_CLIENT_ID`/`TESTFLINGER_SECRET_KEY`; else the
//! refresh token stored by `testflinger login` in
//! `$XDG_CONFIG_HOME/testflinger-cli/<server host>/auth.conf` (`[AUTH] client_id,
//! refresh_token`). Without any, requests go out unauthenticated (anonymous).
//!
//! The access token is fetched on the first request that needs the server and renewed
//! shortly before it expires, so long `poll` loops keep working.

use crate::config::ConfigFile;
use anyhow::{Context, anyhow, bail};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Client credentials from the command line, the config file or the environment.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    pub client_id: Option<String>,
    pub secret_key: Option<String>,
}

impl Credentials {
    /// Flags > config > environment, each of the two values separately.
    pub fn resolve(flag_id: Option<&str>, flag_secret: Option<&str>, cfg: &ConfigFile) -> Self {
        let pick = |flag: Option<&str>, key: &str, env: &str| {
            flag.map(str::to_string)
                .or_else(|| cfg.get(key).map(str::to_string))
                .or_else(|| std::env::var(env).ok())
                .filter(|v| !v.is_empty())
        };
        Credentials {
            client_id: pick(flag_id, "client_id", "TESTFLINGER_CLIENT_ID"),
            secret_key: pick(flag_secret, "secret_key", "TESTFLINGER_SECRET_KEY"),
        }
    }
}

/// Where `login` keeps the refresh token for `server`.
pub fn auth_file(server: &str) -> PathBuf {
    let host = server
        .split("://")
        .nth(1)
        .unwrap_or(server)
        .split('/')
        .next()
        .unwrap_or("server")
        .replace(':', "_");
    crate::config::config_home()
        .join("testflinger-cli")
        .join(host)
        .join("auth.conf")
}

/// The stored login (`client_id`, `refresh_token`), if any.
pub fn stored_login(server: &str) -> Option<(String, String)> {
    let cfg = ConfigFile::load(&auth_file(server)).ok()?;
    let get = |k: &str| {
        cfg.get_in("AUTH", k)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    Some((get("client_id")?, get("refresh_token")?))
}

fn save_login(server: &str, client_id: &str, refresh_token: &str) -> anyhow::Result<()> {
    let path = auth_file(server);
    let mut cfg = ConfigFile::load(&path)?;
    cfg.set_in("AUTH", "client_id", client_id);
    cfg.set_in("AUTH", "refresh_token", refresh_token);
    cfg.save()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(())
}

/// The state of one process's authentication.
#[derive(Debug, Default)]
pub struct Session {
    creds: Credentials,
    stored: Option<(String, String)>,
    access: Option<(String, Instant)>,
}

impl Session {
    pub fn new(creds: Credentials, server: &str) -> Session {
        // A stored login of another client than the one named is not used.
        let stored = stored_login(server)
            .filter(|(id, _)| creds.client_id.as_deref().is_none_or(|c| c == id));
        Session {
            stored,
            creds,
            access: None,
        }
    }

    /// The client this process acts as, if it has credentials or a stored login.
    pub fn client_id(&self) -> Option<&str> {
        self.creds
            .client_id
            .as_deref()
            .or(self.stored.as_ref().map(|(id, _)| id.as_str()))
    }

    fn has_secret(&self) -> bool {
        self.creds.client_id.is_some() && self.creds.secret_key.is_some()
    }

    /// A valid access token, or `None` when this process has no credentials at all.
    pub async fn bearer(
        &mut self,
        http: &reqwest::Client,
        server: &str,
    ) -> anyhow::Result<Option<String>> {
        if let Some((t, until)) = &self.access
            && Instant::now() < *until
        {
            return Ok(Some(t.clone()));
        }
        let v = if self.has_secret() {
            let v = self.token(http, server).await?;
            if let (Some(id), Some(r)) = (
                self.creds.client_id.clone(),
                v.get("refresh_token").and_then(Value::as_str),
            ) {
                save_login(server, &id, r)?;
                self.stored = Some((id, r.to_string()));
            }
            v
        } else if let Some((_, refresh)) = &self.stored {
            let r = http
                .post(format!("{server}/v1/oauth2/refresh"))
                .json(&json!({"refresh_token": refresh}))
                .send()
                .await
                .with_context(|| format!("cannot reach the server at {server}"))?;
            if !r.status().is_success() {
                bail!(
                    "the stored login for {server} was refused ({}): run `testflinger login` again",
                    r.status()
                );
            }
            r.json::<Value>().await.context("invalid token answer")?
        } else {
            return Ok(None);
        };
        let token = v
            .get("access_token")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("the server sent no access_token"))?
            .to_string();
        let ttl = v.get("expires_in").and_then(Value::as_u64).unwrap_or(600);
        // Renew a little early so a request never carries an expired token.
        let until = Instant::now() + Duration::from_secs(ttl.saturating_sub(30).max(1));
        self.access = Some((token.clone(), until));
        Ok(Some(token))
    }

    /// `POST /v1/oauth2/token` with the client id and secret (HTTP Basic).
    pub async fn token(&self, http: &reqwest::Client, server: &str) -> anyhow::Result<Value> {
        let (Some(id), Some(secret)) = (&self.creds.client_id, &self.creds.secret_key) else {
            bail!(
                "no credentials: give --client-id and --secret-key (or TESTFLINGER_CLIENT_ID and TESTFLINGER_SECRET_KEY)"
            );
        };
        let r = http
            .post(format!("{server}/v1/oauth2/token"))
            .basic_auth(id, Some(secret))
            .send()
            .await
            .with_context(|| format!("cannot reach the server at {server}"))?;
        let status = r.status();
        let body = r.bytes().await.unwrap_or_default();
        if !status.is_success() {
            bail!(
                "authentication as '{id}' failed ({status}): {}",
                crate::client::server_message(&body)
            );
        }
        serde_json::from_slice(&body).context("invalid token answer")
    }

    /// `testflinger login`: exchanges the credentials and stores the refresh token.
    pub async fn login(&mut self, http: &reqwest::Client, server: &str) -> anyhow::Result<String> {
        self.access = None;
        self.bearer(http, server)
            .await?
            .ok_or_else(|| anyhow!("no credentials: give --client-id and --secret-key"))?;
        Ok(self.client_id().unwrap_or_default().to_string())
    }
}
