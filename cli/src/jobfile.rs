//! Job files: YAML or JSON in, a JSON object out, exactly as the user wrote it (the
//! server is the judge of what is valid); and the packing of `local` attachments.

use anyhow::{Context, anyhow, bail};
use flate2::{Compression, write::GzEncoder};
use serde_json::Value;
use std::path::{Component, Path, PathBuf};

/// Parses a job document. JSON is tried first when the text looks like JSON, so that
/// its errors point at the right place; everything else is YAML.
pub fn parse(text: &str, origin: &str) -> anyhow::Result<Value> {
    let value = if text.trim_start().starts_with('{') {
        serde_json::from_str::<Value>(text).map_err(|e| {
            anyhow!(
                "invalid job file {origin}: {} at line {} column {}",
                strip_position(&e.to_string()),
                e.line(),
                e.column()
            )
        })?
    } else {
        serde_saphyr::from_str::<Value>(text).map_err(|e| {
            let msg = e
                .to_string()
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("invalid YAML")
                .to_string();
            match e.location() {
                Some(loc) => anyhow!(
                    "invalid job file {origin}: {} at line {} column {}",
                    strip_position(&msg),
                    loc.line(),
                    loc.column()
                ),
                None => anyhow!("invalid job file {origin}: {msg}"),
            }
        })?
    };
    match value {
        Value::Object(_) => Ok(value),
        Value::Null => bail!("invalid job file {origin}: the file is empty"),
        _ => bail!("invalid job file {origin}: a job must be a mapping of keys to values"),
    }
}

/// Drops the position a parser already put in its message (`error: line 2 column 6: `
/// before, ` at line 2 column 6` after), since the caller appends it once.
fn strip_position(msg: &str) -> &str {
    let mut msg = msg.trim();
    msg = msg.strip_prefix("error:").unwrap_or(msg).trim_start();
    if msg.starts_with("line ")
        && let Some(i) = msg.find(": ")
    {
        msg = &msg[i + 2..];
    }
    match msg.find(" at line ") {
        Some(i) => &msg[..i],
        None => msg,
    }
}

/// The `*_data` sections that may carry attachments, and the archive folder of each.
const ATTACHMENT_SECTIONS: [(&str, &str); 3] = [
    ("provision_data", "provision"),
    ("firmware_update_data", "firmware_update"),
    ("test_data", "test"),
];

/// Packs every attachment with a `local` path into a gzip tar (`<phase>/<agent path>`)
/// and rewrites the entry to `{agent: <agent path>}`. Returns `None` when there is
/// nothing to upload.
pub fn pack_attachments(job: &mut Value, relative_to: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    let mut builder: Option<tar::Builder<GzEncoder<Vec<u8>>>> = None;
    for (section, folder) in ATTACHMENT_SECTIONS {
        let Some(entries) = job
            .get_mut(section)
            .and_then(|s| s.get_mut("attachments"))
            .and_then(Value::as_array_mut)
        else {
            continue;
        };
        for entry in entries.iter_mut() {
            let Some(obj) = entry.as_object_mut() else {
                continue;
            };
            let Some(local) = obj.get("local").and_then(Value::as_str).map(PathBuf::from) else {
                continue;
            };
            let local = if local.is_absolute() {
                local
            } else {
                relative_to.join(local)
            };
            let agent = match obj.get("agent").and_then(Value::as_str) {
                Some(a) => PathBuf::from(a.trim_start_matches('/')),
                None => match local.strip_prefix(relative_to) {
                    Ok(rel) => rel.to_path_buf(),
                    Err(_) => PathBuf::from(local.file_name().ok_or_else(|| {
                        anyhow!("attachment {} has no file name", local.display())
                    })?),
                },
            };
            if agent.as_os_str().is_empty()
                || agent
                    .components()
                    .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
            {
                bail!(
                    "attachment {}: agent path '{}' must stay inside the job's folder",
                    local.display(),
                    agent.display()
                );
            }
            let meta = std::fs::metadata(&local)
                .with_context(|| format!("cannot read attachment {}", local.display()))?;
            let archive = builder.get_or_insert_with(|| {
                tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()))
            });
            let name = Path::new(folder).join(&agent);
            if meta.is_dir() {
                archive.append_dir_all(&name, &local)
            } else {
                archive.append_path_with_name(&local, &name)
            }
            .with_context(|| format!("cannot pack attachment {}", local.display()))?;
            obj.remove("local");
            obj.insert(
                "agent".into(),
                Value::String(agent.to_string_lossy().into_owned()),
            );
        }
    }
    match builder {
        None => Ok(None),
        Some(b) => {
            let gz = b
                .into_inner()
                .context("cannot finish the attachments archive")?;
            Ok(Some(
                gz.finish()
                    .context("cannot finish the attachments archive")?,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn yaml_error_has_line_and_column() {
        let err = parse("job_queue: q\ntest_data: [\n", "job.yaml")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("line"), "{err}");
        assert!(err.contains("column"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        assert_eq!(
            err,
            "invalid job file job.yaml: unclosed bracket '[' at line 2 column 12"
        );
    }

    #[test]
    fn json_and_yaml() -> anyhow::Result<()> {
        let v = parse("{\"job_queue\": \"q\", \"x\": 1}", "-")?;
        assert_eq!(v["x"], 1);
        let v = parse("job_queue: q\nreserve_data:\n  timeout: 2h\n", "-")?;
        assert_eq!(v["reserve_data"]["timeout"], "2h");
        assert!(parse("- a\n", "-").is_err());
        Ok(())
    }

    #[test]
    fn packs_local_attachments() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("data"))?;
        std::fs::write(dir.path().join("data/a.txt"), b"hello")?;
        std::fs::write(dir.path().join("b.bin"), b"bye")?;
        let mut job = serde_json::json!({
            "job_queue": "q",
            "test_data": {"attachments": [
                {"local": "data/a.txt"},
                {"local": "b.bin", "agent": "/opt/b.bin"},
                {"agent": "untouched"},
            ]}
        });
        let gz = pack_attachments(&mut job, dir.path())?.context("an archive")?;
        assert_eq!(
            job["test_data"]["attachments"],
            serde_json::json!([{"agent": "data/a.txt"}, {"agent": "opt/b.bin"}, {"agent": "untouched"}])
        );
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&gz[..]));
        let mut names = Vec::new();
        for entry in archive.entries()? {
            let mut entry = entry?;
            let mut body = String::new();
            entry.read_to_string(&mut body)?;
            names.push((entry.path()?.to_string_lossy().into_owned(), body));
        }
        assert_eq!(
            names,
            vec![
                ("test/data/a.txt".to_string(), "hello".to_string()),
                ("test/opt/b.bin".to_string(), "bye".to_string())
            ]
        );
        Ok(())
    }
}
