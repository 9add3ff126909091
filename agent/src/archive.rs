//! Gzip tar archives: attachments in (extracted safely), artifacts out.

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use std::io;
use std::path::{Component, Path, PathBuf};

/// Top-level folders an attachments archive may contain.
const ATTACHMENT_ROOTS: [&str; 3] = ["provision", "firmware_update", "test"];

/// Why an attachments archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("unsafe entry '{0}' in the attachments archive")]
    Unsafe(String),
    #[error("cannot read the archive: {0}")]
    Io(#[from] io::Error),
}

/// Extracts a gzip tar of attachments into `dest`. Only regular files and directories
/// under `provision/`, `firmware_update/` or `test/` are accepted; absolute paths,
/// `..`, links and device files are refused before anything is written.
pub fn extract_attachments(gz: &[u8], dest: &Path) -> Result<(), ArchiveError> {
    // First pass: check every entry, so a bad archive leaves nothing behind.
    let mut planned: Vec<(PathBuf, bool)> = Vec::new();
    let mut archive = tar::Archive::new(GzDecoder::new(gz));
    for entry in archive.entries()? {
        let entry = entry?;
        let path = entry.path()?.into_owned();
        let shown = path.display().to_string();
        let kind = entry.header().entry_type();
        let is_dir = kind.is_dir();
        if !(is_dir || kind.is_file()) {
            return Err(ArchiveError::Unsafe(shown));
        }
        let mut clean = PathBuf::new();
        for c in path.components() {
            match c {
                Component::Normal(p) => clean.push(p),
                Component::CurDir => {}
                _ => return Err(ArchiveError::Unsafe(shown)),
            }
        }
        let root_ok = clean
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .is_some_and(|r| ATTACHMENT_ROOTS.contains(&r));
        if !root_ok {
            return Err(ArchiveError::Unsafe(shown));
        }
        planned.push((clean, is_dir));
    }
    std::fs::create_dir_all(dest)?;
    let mut archive = tar::Archive::new(GzDecoder::new(gz));
    for (entry, (clean, is_dir)) in archive.entries()?.zip(planned) {
        let mut entry = entry?;
        let target = dest.join(&clean);
        if is_dir {
            std::fs::create_dir_all(&target)?;
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut out = std::fs::File::create(&target)?;
        io::copy(&mut entry, &mut out)?;
    }
    Ok(())
}

/// Whether `dir` exists and holds at least one entry.
pub fn non_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

/// Packs `dir` as a gzip tar whose single top-level entry is `artifacts/`.
pub fn pack_artifacts(dir: &Path) -> io::Result<Vec<u8>> {
    let enc = GzEncoder::new(Vec::new(), Compression::default());
    let mut b = tar::Builder::new(enc);
    b.follow_symlinks(false);
    b.append_dir_all("artifacts", dir)?;
    b.into_inner()?.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tarball(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let enc = GzEncoder::new(Vec::new(), Compression::default());
        let mut b = tar::Builder::new(enc);
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            // set_path refuses `..`; write the raw name to build hostile archives.
            let bytes = name.as_bytes();
            h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
            h.set_cksum();
            b.append(&h, *data).expect("append");
        }
        b.into_inner().expect("tar").finish().expect("gz")
    }

    #[test]
    fn extracts_allowed_roots() {
        let dir = tempfile::tempdir().expect("tmp");
        let gz = tarball(&[("test/a.txt", b"hello"), ("provision/b/c", b"x")]);
        extract_attachments(&gz, dir.path()).expect("extract");
        assert_eq!(
            std::fs::read(dir.path().join("test/a.txt")).expect("read"),
            b"hello"
        );
    }

    #[test]
    fn refuses_traversal_and_other_roots() {
        let dir = tempfile::tempdir().expect("tmp");
        for bad in ["test/../../evil", "/etc/evil", "other/file"] {
            let gz = tarball(&[("test/ok", b"1"), (bad, b"x")]);
            assert!(extract_attachments(&gz, dir.path()).is_err(), "{bad}");
            assert!(!dir.path().join("test/ok").exists(), "{bad} left files");
        }
    }

    #[test]
    fn packs_with_artifacts_top() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("r.txt"), b"result").expect("write");
        let gz = pack_artifacts(dir.path()).expect("pack");
        let mut a = tar::Archive::new(GzDecoder::new(&gz[..]));
        let names: Vec<String> = a
            .entries()
            .expect("entries")
            .map(|e| e.expect("e").path().expect("p").display().to_string())
            .collect();
        assert!(
            names.iter().all(|n| n.starts_with("artifacts")),
            "{names:?}"
        );
        assert!(names.iter().any(|n| n == "artifacts/r.txt"), "{names:?}");
    }
}
