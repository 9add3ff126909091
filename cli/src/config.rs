//! The INI config file (`[testflinger-cli]` section) and server resolution.
//!
//! Read: `-c/--configfile`, else `$XDG_CONFIG_HOME/testflinger-cli.conf` (XDG default
//! `~/.config`). Env: `TESTFLINGER_SERVER` (after the file's `server`).

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};

pub const SECTION: &str = "testflinger-cli";
pub const DEFAULT_SERVER: &str = "https://testflinger.canonical.com";

/// `$XDG_CONFIG_HOME`, else `$HOME/.config`.
pub fn config_home() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_default();
    PathBuf::from(home).join(".config")
}

pub fn default_path() -> PathBuf {
    config_home().join("testflinger-cli.conf")
}

/// An INI file kept in order so that `config key=value` rewrites only one line's worth.
#[derive(Debug, Default)]
pub struct ConfigFile {
    pub path: PathBuf,
    sections: Vec<(String, Vec<(String, String)>)>,
}

impl ConfigFile {
    /// Loads the file; a missing file is an empty config.
    pub fn load(path: &Path) -> anyhow::Result<ConfigFile> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", path.display()));
            }
        };
        let mut cfg = ConfigFile {
            path: path.to_path_buf(),
            sections: Vec::new(),
        };
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                cfg.sections.push((name.trim().to_string(), Vec::new()));
                continue;
            }
            let Some((k, v)) = line.split_once('=').or_else(|| line.split_once(':')) else {
                bail!("{}:{}: expected `key = value`", path.display(), n + 1);
            };
            let Some((_, entries)) = cfg.sections.last_mut() else {
                bail!("{}:{}: key outside of a [section]", path.display(), n + 1);
            };
            entries.push((k.trim().to_string(), v.trim().to_string()));
        }
        Ok(cfg)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.get_in(SECTION, key)
    }

    /// A key of another section (such as `[AUTH]` in the stored login).
    pub fn get_in(&self, section: &str, key: &str) -> Option<&str> {
        self.sections
            .iter()
            .filter(|(s, _)| s == section)
            .flat_map(|(_, e)| e.iter())
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.sections
            .iter()
            .filter(|(s, _)| s == SECTION)
            .flat_map(|(_, e)| e.iter())
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn set(&mut self, key: &str, value: &str) {
        self.set_in(SECTION, key, value);
    }

    /// Sets a key of `section`, adding the section when needed.
    pub fn set_in(&mut self, section: &str, key: &str, value: &str) {
        if let Some((_, entries)) = self.sections.iter_mut().find(|(s, _)| s == section) {
            if let Some(entry) = entries.iter_mut().find(|(k, _)| k == key) {
                entry.1 = value.to_string();
            } else {
                entries.push((key.to_string(), value.to_string()));
            }
        } else {
            self.sections.push((
                section.to_string(),
                vec![(key.to_string(), value.to_string())],
            ));
        }
    }

    pub fn save(&self) -> anyhow::Result<()> {
        let mut text = String::new();
        for (name, entries) in &self.sections {
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(&format!("[{name}]\n"));
            for (k, v) in entries {
                text.push_str(&format!("{k} = {v}\n"));
            }
        }
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::write(&self.path, text)
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// The server URL: `--server`, else config `server`, else `TESTFLINGER_SERVER`, else the
/// public server. Must be http(s).
pub fn resolve_server(flag: Option<&str>, cfg: &ConfigFile) -> anyhow::Result<String> {
    let env = std::env::var("TESTFLINGER_SERVER")
        .ok()
        .filter(|s| !s.is_empty());
    let server = flag
        .map(str::to_string)
        .or_else(|| cfg.get("server").map(str::to_string))
        .or(env)
        .unwrap_or_else(|| DEFAULT_SERVER.to_string());
    if !(server.starts_with("http://") || server.starts_with("https://")) {
        bail!("server URL must start with http:// or https:// (got '{server}')");
    }
    Ok(server.trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_and_reload() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("sub/tf.conf");
        let mut cfg = ConfigFile::load(&path)?;
        assert_eq!(cfg.get("server"), None);
        cfg.set("server", "http://a:1");
        cfg.set("server", "http://b:2");
        cfg.save()?;
        let cfg = ConfigFile::load(&path)?;
        assert_eq!(cfg.get("server"), Some("http://b:2"));
        assert_eq!(
            resolve_server(None, &cfg)?,
            "http://b:2",
            "the config wins over the default"
        );
        assert_eq!(resolve_server(Some("http://c/"), &cfg)?, "http://c");
        assert!(resolve_server(Some("ftp://c"), &cfg).is_err());
        Ok(())
    }
}
