//! The filesystem store for artifacts and attachments under `DATA_PATH`. Uploads stream
//! to a temporary file and are renamed into place only when complete and valid, so a
//! reader never sees half a file and memory use does not grow with the file size.

use crate::error::{ApiError, ApiResult};
use actix_multipart::Multipart;
use futures_util::StreamExt;
use std::path::{Component, Path, PathBuf};
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
}

impl FileStore {
    /// Creates the store's folders. Fails when `DATA_PATH` cannot be created.
    pub fn open(root: &Path, max_bytes: u64) -> std::io::Result<FileStore> {
        for d in ["artifacts", "attachments", "tmp", "logs"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        Ok(FileStore {
            root: root.to_path_buf(),
            max_bytes,
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

    /// Streams the multipart field `file` to the store. 400 without such a field, 413
    /// past the size limit, 422 for an attachment archive with unsafe member paths.
    pub async fn save_upload(
        &self,
        kind: Kind,
        id: &str,
        mut payload: Multipart,
    ) -> ApiResult<u64> {
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
        if kind == Kind::Attachments {
            let check_path = tmp.clone();
            let verdict =
                tokio::task::spawn_blocking(move || check_attachment_archive(&check_path))
                    .await
                    .map_err(|e| {
                        ApiError::Internal(anyhow::anyhow!("archive check panicked: {e}"))
                    })?;
            if let Err(msg) = verdict {
                let _ = tokio::fs::remove_file(&tmp).await;
                // 400: upstream's CLI cancels the job on 400 (and only then); a 422 left
                // the job waiting for attachments that would never come.
                return Err(ApiError::Text(
                    actix_web::http::StatusCode::BAD_REQUEST,
                    format!("Invalid attachments archive: {msg}\n"),
                ));
            }
        }
        tokio::fs::rename(&tmp, self.path(kind, id)).await?;
        Ok(written)
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

/// Every member of an attachments archive must be a relative path under `provision/`,
/// `firmware_update/` or `test/`, without `..`, and a plain file or folder.
pub fn check_attachment_archive(path: &Path) -> Result<(), String> {
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let entries = ar
        .entries()
        .map_err(|e| format!("not a gzip tar archive: {e}"))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("not a gzip tar archive: {e}"))?;
        let p = entry
            .path()
            .map_err(|e| format!("bad member name: {e}"))?
            .into_owned();
        let shown = p.display().to_string();
        let mut comps = p.components().filter(|c| !matches!(c, Component::CurDir));
        match comps.next() {
            Some(Component::Normal(top))
                if ["provision", "firmware_update", "test"]
                    .contains(&top.to_string_lossy().as_ref()) => {}
            Some(Component::RootDir | Component::Prefix(_)) => {
                return Err(format!("member '{shown}' has an absolute path"));
            }
            _ => {
                return Err(format!(
                    "member '{shown}' is not under provision/, firmware_update/ or test/"
                ));
            }
        }
        if comps.any(|c| matches!(c, Component::ParentDir)) {
            return Err(format!("member '{shown}' contains '..'"));
        }
        let t = entry.header().entry_type();
        if !(t.is_file() || t.is_dir()) {
            return Err(format!("member '{shown}' is not a regular file or folder"));
        }
    }
    Ok(())
}
