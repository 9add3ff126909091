//! The filesystem store for artifacts and attachments under `DATA_PATH`. Uploads stream
//! to a temporary file and are renamed into place only when complete and valid, so a
//! reader never sees half a file and memory use does not grow with the file size.

use crate::error::{ApiError, ApiResult};
use actix_multipart::Multipart;
use actix_web::http::StatusCode;
use futures_util::StreamExt;
use std::path::{Path, PathBuf};
use testflinger_archive::{Layout, Limit, Limits, Summary};
use tokio::io::AsyncWriteExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Artifact,
    Attachments,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Kind::Artifact => "artifacts",
            Kind::Attachments => "attachments",
        }
    }
}

#[derive(Debug, Clone)]
pub struct FileStore {
    root: PathBuf,
    pub max_bytes: u64,
    /// What an uploaded archive may hold once unpacked.
    pub limits: Limits,
}

impl FileStore {
    /// Creates the store's folders. Fails when `DATA_PATH` cannot be created.
    pub fn open(root: &Path, max_bytes: u64, limits: Limits) -> std::io::Result<FileStore> {
        for d in ["artifacts", "attachments", "tmp", "logs"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        Ok(FileStore {
            root: root.to_path_buf(),
            max_bytes,
            limits,
        })
    }

    /// The folder of a job's compacted log files (see [`crate::logs`]).
    pub fn log_dir(&self, id: &str) -> PathBuf {
        self.root.join("logs").join(id)
    }

    /// A job's compacted log file of `log_type` for `attempt`.
    pub fn log_path(&self, id: &str, log_type: &str, attempt: u64) -> PathBuf {
        self.log_dir(id).join(format!("{log_type}.{attempt}.jsonl"))
    }

    /// A temporary file (renamed into place when complete).
    pub fn tmp_path(&self, name: &str) -> PathBuf {
        self.root.join("tmp").join(name)
    }

    pub fn path(&self, kind: Kind, id: &str) -> PathBuf {
        self.root.join(kind.dir()).join(format!("{id}.tar.gz"))
    }

    /// Streams the multipart field `file` to the store, then checks it as a gzip tar
    /// ([`check_archive`]) before it replaces the previous one. 400 without such a
    /// field or for an archive refused by the checker, 413 past the upload size limit
    /// or an archive limit.
    pub async fn save_upload(&self, kind: Kind, id: &str, payload: Multipart) -> ApiResult<u64> {
        let (tmp, written) = self.receive(kind, id, payload).await?;
        tokio::fs::rename(&tmp, self.path(kind, id)).await?;
        Ok(written)
    }

    /// An artifact's file: `<id>.tar.gz` for one stored before artifacts were committed
    /// by name (`name` empty), else the committed `name` in the artifacts folder.
    pub fn artifact_file(&self, id: &str, name: &str) -> PathBuf {
        if name.is_empty() || name.contains('/') || !name.starts_with(id) {
            return self.path(Kind::Artifact, id);
        }
        self.root.join(Kind::Artifact.dir()).join(name)
    }

    /// Receives and checks an artifact upload like [`FileStore::save_upload`], and puts
    /// it in the artifacts folder under a name of its own (`<id>.<random>.tar.gz`),
    /// not yet the job's: [`crate::store::Store::commit_artifact`] makes it so, checking
    /// the uploader still holds the job in the same step.
    pub async fn stage_artifact(&self, id: &str, payload: Multipart) -> ApiResult<PathBuf> {
        let (tmp, _) = self.receive(Kind::Artifact, id, payload).await?;
        let staged = self
            .root
            .join(Kind::Artifact.dir())
            .join(format!("{id}.{}.tar.gz", uuid::Uuid::new_v4().simple()));
        if let Err(e) = tokio::fs::rename(&tmp, &staged).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e.into());
        }
        Ok(staged)
    }

    /// The file of job `id`'s committed artifact (see [`FileStore::stage_artifact`]), if
    /// any. Reads the name again once if the file went: a new upload replaced it
    /// meanwhile.
    pub async fn open_artifact(
        &self,
        store: &crate::store::Store,
        id: &str,
    ) -> ApiResult<Option<tokio::fs::File>> {
        for _ in 0..2 {
            let name = store.job_artifact(id).await?;
            match tokio::fs::File::open(self.artifact_file(id, &name)).await {
                Ok(f) => return Ok(Some(f)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(None)
    }

    /// Removes the artifact a commit replaced (`previous`, or the unnamed one).
    pub async fn drop_replaced_artifact(&self, id: &str, previous: &str) {
        let old = self.artifact_file(id, previous);
        if let Err(e) = tokio::fs::remove_file(&old).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(job.id = %id, error = %e, "replaced artifact not removed; the retention sweep will");
        }
    }

    /// Streams the multipart field `file` to a temporary file and checks it as a gzip
    /// tar; returns its path and size.
    async fn receive(
        &self,
        kind: Kind,
        id: &str,
        mut payload: Multipart,
    ) -> ApiResult<(PathBuf, u64)> {
        let tmp = self.root.join("tmp").join(format!(
            "{id}.{}.{}",
            kind.dir(),
            uuid::Uuid::new_v4().simple()
        ));
        let result = self.write_field(&tmp, &mut payload).await;
        let written = match result {
            Ok(n) => n,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        // Every upload is a gzip tar: an artifact is served with `Content-Encoding: gzip`,
        // attachments are unpacked by the agent with the same checker.
        let check_path = tmp.clone();
        let limits = self.limits;
        let verdict = tokio::task::spawn_blocking(move || check_archive(&check_path, kind, limits))
            .await
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("archive check panicked: {e}")))
            .and_then(|r| r);
        if let Err(e) = verdict {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        Ok((tmp, written))
    }

    async fn write_field(&self, tmp: &Path, payload: &mut Multipart) -> ApiResult<u64> {
        let mut written: u64 = 0;
        let mut found = false;
        while let Some(field) = payload.next().await {
            let mut field =
                field.map_err(|e| ApiError::BadRequest(format!("bad multipart body: {e}")))?;
            if field.name() != Some("file") {
                // Drain and ignore other fields.
                while let Some(chunk) = field.next().await {
                    chunk.map_err(|e| ApiError::BadRequest(format!("bad multipart body: {e}")))?;
                }
                continue;
            }
            found = true;
            let mut f = tokio::fs::File::create(tmp).await?;
            while let Some(chunk) = field.next().await {
                let chunk =
                    chunk.map_err(|e| ApiError::BadRequest(format!("upload interrupted: {e}")))?;
                written += chunk.len() as u64;
                if written > self.max_bytes {
                    return Err(ApiError::TooLarge(format!(
                        "upload larger than the limit of {} bytes",
                        self.max_bytes
                    )));
                }
                f.write_all(&chunk).await?;
            }
            f.flush().await?;
            f.sync_all().await?;
        }
        if !found {
            return Err(ApiError::BadRequest(
                "multipart field 'file' is missing".into(),
            ));
        }
        Ok(written)
    }

    /// Deletes files older than `max_age` (retention), and jobs' log folders whose
    /// newest file is. Returns how many went.
    pub fn sweep(&self, max_age: std::time::Duration) -> usize {
        let mut gone = 0;
        let old = |m: std::io::Result<std::fs::Metadata>| {
            m.and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > max_age)
        };
        if let Ok(rd) = std::fs::read_dir(self.root.join("logs")) {
            for job in rd.flatten() {
                let all_old = std::fs::read_dir(job.path())
                    .map(|files| files.flatten().all(|f| old(f.metadata())))
                    .unwrap_or(false);
                if all_old && std::fs::remove_dir_all(job.path()).is_ok() {
                    gone += 1;
                }
            }
        }
        for d in ["artifacts", "attachments", "tmp"] {
            let Ok(rd) = std::fs::read_dir(self.root.join(d)) else {
                continue;
            };
            for e in rd.flatten() {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > max_age);
                if old && std::fs::remove_file(e.path()).is_ok() {
                    gone += 1;
                }
            }
        }
        gone
    }
}

/// Checks the archive stored at `path` with the project's archive checker
/// ([`testflinger_archive::check`]: every gzip member, entry types, paths, limits),
/// reading it from disk in pieces. The error is the answer to send: 400 for what is not
/// an acceptable gzip tar, 413 past a limit (naming the member, the limit and the
/// setting), 500 when the file cannot be read.
pub fn check_archive(path: &Path, kind: Kind, limits: Limits) -> ApiResult<Summary> {
    let (layout, what) = match kind {
        Kind::Attachments => (Layout::Attachments, "attachments"),
        Kind::Artifact => (Layout::Artifact, "artifact"),
    };
    let f = std::fs::File::open(path)?;
    let e = match testflinger_archive::check(f, layout, limits) {
        Ok(summary) => return Ok(summary),
        Err(e) => e,
    };
    let (status, setting) = match e.limit() {
        Some(Limit::Entries) => (
            StatusCode::PAYLOAD_TOO_LARGE,
            " (server setting TESTFLINGER_ARCHIVE_MAX_ENTRIES)",
        ),
        Some(Limit::UnpackedBytes) => (
            StatusCode::PAYLOAD_TOO_LARGE,
            " (server setting TESTFLINGER_ARCHIVE_MAX_UNPACKED_BYTES)",
        ),
        None if e.is_archive_fault() => (StatusCode::BAD_REQUEST, ""),
        None => {
            return Err(ApiError::Internal(
                anyhow::Error::new(e).context("checking an uploaded archive"),
            ));
        }
    };
    let msg = format!("Invalid {what} archive: {e}{setting}");
    Err(match kind {
        // Plain text, as upstream answers this route; 400 (not 422): upstream's CLI
        // cancels the job on 400, and a refused archive will not get better.
        Kind::Attachments => ApiError::Text(status, format!("{msg}\n")),
        Kind::Artifact => ApiError::Json(status, msg),
    })
}
