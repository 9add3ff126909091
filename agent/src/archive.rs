//! The agent's side of [`testflinger_archive`] (the checker the server uses too):
//! attachments unpacked from the downloaded file, artifacts packed into a file. Both
//! stream from and to disk; neither holds an archive in memory.

use std::io;
use std::path::Path;
use testflinger_archive::{ArchiveError, Layout, Limit, Limits, Packed, Summary};

/// Unpacks the attachments archive at `archive` into `dest` (which must not exist) with
/// the server's rules and `limits`: every gzip member, regular files and folders under
/// `provision/`, `firmware_update/` or `test/`, modes kept without setuid/setgid. A
/// refused archive leaves nothing in `dest`.
///
/// Errors: the refusal, its message naming the member and, past a limit, the agent key
/// that sets it (`archive_max_entries`, `archive_max_unpacked_bytes`).
pub fn unpack_attachments(archive: &Path, dest: &Path, limits: Limits) -> Result<Summary, String> {
    testflinger_archive::unpack(archive, dest, Layout::Attachments, limits).map_err(describe)
}

fn describe(e: ArchiveError) -> String {
    match e.limit() {
        Some(Limit::Entries) => format!("{e} (agent key archive_max_entries)"),
        Some(Limit::UnpackedBytes) => format!("{e} (agent key archive_max_unpacked_bytes)"),
        None => e.to_string(),
    }
}

/// Whether `dir` exists and holds at least one entry.
pub fn non_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

/// Packs `dir` as a gzip tar whose single top-level entry is `artifacts/`, written to
/// the file `out` (created or truncated, synced). Links, devices and fifos are left out
/// (the server refuses archives holding them); [`Packed::skipped`] lists them.
///
/// Errors: `dir` cannot be read or `out` written.
pub fn pack_artifacts(dir: &Path, out: &Path) -> io::Result<Packed> {
    let file = std::fs::File::create(out)?;
    let (file, packed) = testflinger_archive::pack_dir(dir, "artifacts", io::BufWriter::new(file))?;
    file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(packed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use testflinger_archive::hostile;

    #[test]
    fn a_refusal_past_a_limit_names_the_agent_key() {
        let dir = tempfile::tempdir().expect("tmp");
        let archive = dir.path().join("a.tar.gz");
        let files: Vec<Vec<u8>> = (0..3)
            .map(|i| hostile::file(&format!("test/{i}"), b"x", 0o644))
            .collect();
        std::fs::write(&archive, hostile::targz(&files)).expect("write");
        let limits = Limits {
            max_entries: 2,
            ..Limits::default()
        };
        let e = unpack_attachments(&archive, &dir.path().join("out"), limits).expect_err("refused");
        assert!(e.contains("member 'test/2'"), "{e}");
        assert!(e.contains("(agent key archive_max_entries)"), "{e}");
        assert!(!dir.path().join("out").exists());
    }

    #[test]
    fn packs_with_artifacts_top_into_a_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let src = dir.path().join("artifacts");
        std::fs::create_dir_all(&src).expect("mkdir");
        std::fs::write(src.join("r.txt"), b"result").expect("write");
        let out = dir.path().join("a.tar.gz");
        let packed = pack_artifacts(&src, &out).expect("pack");
        assert_eq!(packed.files, 1);
        let s = testflinger_archive::check(
            std::fs::File::open(&out).expect("open"),
            Layout::Artifact,
            Limits::default(),
        )
        .expect("the server's checker accepts it");
        assert_eq!(s.files, 1);
    }
}
