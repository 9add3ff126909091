//! Gzip tar archives checked, unpacked and packed under limits: the one archive checker
//! of the project. The server checks uploads with [`check`]; the agent unpacks
//! attachments with [`unpack`], which is the same walk writing files; so the two can
//! never disagree about what an archive holds.
//!
//! Layout:
//! - [`check`]: reads an archive from any reader, refuses it or says what it holds.
//! - [`unpack`]: the same walk, from a file on disk into a new folder, keeping file
//!   modes (without setuid, setgid and sticky bits).
//! - [`pack_dir`]: a folder packed as a gzip tar, streamed to a writer.
//! - `hostile` (feature `hostile`): hostile archives for tests.
//!
//! The rules (issue 13; upstream Testflinger's attachments layout):
//! - **Every gzip member is read** (`cat a.tar.gz b.tar.gz` is one archive: gzip and
//!   GNU tar read every member). Zero blocks between tar streams are skipped, so a tar
//!   stream in a later member is checked too; anything else after the archive is refused.
//! - **Entry types**: regular files and folders; a pax global header (`git archive`
//!   writes one) is skipped. Links are refused, symbolic and hard: a link inside the
//!   folder could point outside it and a later member write through it, and neither
//!   upstream's CLI nor our agent puts links in an archive. Devices, fifos and sparse
//!   files are refused.
//! - **Paths**: relative, without `..`; for [`Layout::Attachments`] the first component
//!   is one of [`ATTACHMENT_ROOTS`].
//! - **Limits** ([`Limits`]): the number of entries, and the unpacked size: every byte
//!   the gzip members expand to (tar headers and padding included). A member's declared
//!   size is checked against the limit before its data is read, so a member of 10 GiB of
//!   zeros is refused after its 512-byte header. Between two members at most
//!   [`HEADER_BUDGET`] bytes of headers, long names, pax records and zero padding are
//!   read.
//! - **Memory** does not grow with the archive: the inflate window, a copy buffer, and at
//!   most [`HEADER_BUDGET`] for one long name or pax record.

use flate2::read::MultiGzDecoder;
use std::cell::Cell;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

#[cfg(any(test, feature = "hostile"))]
pub mod hostile;

/// The top-level folders an attachments archive may hold (upstream's layout: one per
/// phase that takes attachments).
pub const ATTACHMENT_ROOTS: [&str; 3] = ["provision", "firmware_update", "test"];

/// Most bytes read between two members (tar headers, a GNU long name, a pax record,
/// zero padding). Bounds the memory a long name takes and the zeros a lying header can
/// hide behind. 1 MiB: a path is at most 4 KiB on Linux; GNU tar pads to 10 KiB.
pub const HEADER_BUDGET: u64 = 1 << 20;

/// Bits of a member's mode that are kept: permissions only (no setuid, setgid, sticky).
const MODE_MASK: u32 = 0o777;

/// The limits an archive must stay within.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most entries (files, folders, pax global headers).
    pub max_entries: u64,
    /// Most bytes the gzip members expand to, tar headers and padding included.
    pub max_unpacked_bytes: u64,
}

impl Limits {
    /// 100 000 entries.
    pub const DEFAULT_MAX_ENTRIES: u64 = 100_000;
    /// 8 GiB: four times the server's default largest upload
    /// (`TESTFLINGER_MAX_UPLOAD_BYTES`, 2 GiB), room for firmware images that compress.
    pub const DEFAULT_MAX_UNPACKED_BYTES: u64 = 8 << 30;
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_entries: Limits::DEFAULT_MAX_ENTRIES,
            max_unpacked_bytes: Limits::DEFAULT_MAX_UNPACKED_BYTES,
        }
    }
}

/// Which paths an archive may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Attachments (`POST /v1/job/<id>/attachments`): under [`ATTACHMENT_ROOTS`].
    Attachments,
    /// Artifacts (`POST /v1/result/<id>/artifact`): any relative path.
    Artifact,
}

/// Which limit an archive passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// [`Limits::max_entries`]
    Entries,
    /// [`Limits::max_unpacked_bytes`]
    UnpackedBytes,
}

/// What an accepted archive holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Entries read (files, folders, pax global headers).
    pub entries: u64,
    /// Regular files.
    pub files: u64,
    /// Bytes of the regular files.
    pub file_bytes: u64,
    /// Bytes the gzip members expanded to.
    pub unpacked_bytes: u64,
}

/// Why an archive was refused, sorted by what the sender can do. [`ArchiveError::Write`]
/// and [`ArchiveError::Read`] are local failures (the disk), not the archive's fault.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Not gzip, not tar, truncated, or something after the archive.
    #[error("not a gzip tar archive ({place}): {detail}")]
    Format { place: String, detail: String },
    /// A member whose path or type is not allowed.
    #[error("member '{member}' {reason}")]
    Refused { member: String, reason: String },
    /// A limit was passed; nothing past it was read.
    /// `at` names the member (`member 'test/big' (10737418240 bytes)`).
    #[error("{}", limit_message(*.limit, *.max, at))]
    TooBig { limit: Limit, max: u64, at: String },
    /// The archive file could not be read.
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    /// Unpacking could not write to `path`.
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

impl ArchiveError {
    /// The limit passed, if that is the reason.
    pub fn limit(&self) -> Option<Limit> {
        match self {
            ArchiveError::TooBig { limit, .. } => Some(*limit),
            _ => None,
        }
    }

    /// Whether the archive itself is at fault (the sender can fix it), as opposed to
    /// the local disk.
    pub fn is_archive_fault(&self) -> bool {
        !matches!(self, ArchiveError::Read { .. } | ArchiveError::Write { .. })
    }
}

fn limit_message(limit: Limit, max: u64, at: &str) -> String {
    match limit {
        Limit::Entries => format!("{at} is past the limit of {max} entries"),
        Limit::UnpackedBytes => {
            format!("{at} takes the archive past the limit of {max} unpacked bytes")
        }
    }
}

/// Reads every gzip member of `reader` as one tar stream and checks it against the
/// rules of the module docs. Reading stops at the first fault.
///
/// Errors: [`ArchiveError::Format`], [`ArchiveError::Refused`], [`ArchiveError::TooBig`].
pub fn check<R: Read>(reader: R, layout: Layout, limits: Limits) -> Result<Summary, ArchiveError> {
    walk(reader, layout, limits, &mut Discard)
}

/// Unpacks the gzip tar at `archive` into `dest`, which must not exist yet, under the
/// same rules as [`check`]. Members go into a sibling folder first (`.<name>.unpacking`),
/// renamed to `dest` only when the whole archive passed: a refused archive leaves
/// nothing. File and folder modes are kept, masked to `0o777`.
///
/// Errors: those of [`check`]; [`ArchiveError::Read`] when `archive` cannot be opened;
/// [`ArchiveError::Write`] when the disk refuses a file, or `dest` exists.
pub fn unpack(
    archive: &Path,
    dest: &Path,
    layout: Layout,
    limits: Limits,
) -> Result<Summary, ArchiveError> {
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ArchiveError::Write { path, source }
    };
    let file = std::fs::File::open(archive).map_err(|source| ArchiveError::Read {
        path: archive.to_path_buf(),
        source,
    })?;
    if dest.exists() {
        return Err(ArchiveError::Write {
            path: dest.to_path_buf(),
            source: io::Error::new(io::ErrorKind::AlreadyExists, "the folder exists already"),
        });
    }
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "archive".into());
    let staging = dest.with_file_name(format!(".{name}.unpacking"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(write_err(&staging))?;
    }
    std::fs::create_dir_all(&staging).map_err(write_err(&staging))?;
    let mut sink = Unpacker {
        root: staging.clone(),
        dirs: Vec::new(),
    };
    let result = walk(file, layout, limits, &mut sink).and_then(|summary| {
        // Folder modes last: a read-only folder must not stop its own members.
        sink.dirs
            .sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (p, mode) in &sink.dirs {
            let path = staging.join(p);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))
                .map_err(write_err(&path))?;
        }
        std::fs::rename(&staging, dest).map_err(write_err(dest))?;
        Ok(summary)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

/// What [`pack_dir`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Packed {
    /// Regular files packed.
    pub files: u64,
    /// Their bytes.
    pub file_bytes: u64,
    /// Entries left out (links, devices, fifos, unreadable files), with the reason:
    /// [`check`] would refuse an archive holding them.
    pub skipped: Vec<(PathBuf, String)>,
}

/// Packs `dir` as a gzip tar whose single top-level folder is `top` (e.g. `artifacts`),
/// streamed to `out` (files are read in 64 KiB pieces, never whole). Modes are kept
/// (masked to `0o777`); symbolic links are not followed but left out, as are devices
/// and fifos (see [`Packed::skipped`]). A file that grows while it is packed is cut at
/// the size it had when its header was written; one that shrinks is padded with zeros.
///
/// Errors: reading `dir` or writing `out` failed.
pub fn pack_dir<W: Write>(dir: &Path, top: &str, out: W) -> io::Result<(W, Packed)> {
    let enc = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    let mut b = tar::Builder::new(enc);
    let mut packed = Packed::default();
    let meta = std::fs::metadata(dir)?;
    append_dir(&mut b, Path::new(top), &meta)?;
    pack_into(&mut b, dir, Path::new(top), &mut packed)?;
    let out = b.into_inner()?.finish()?;
    Ok((out, packed))
}

fn pack_into<W: Write>(
    b: &mut tar::Builder<W>,
    dir: &Path,
    at: &Path,
    packed: &mut Packed,
) -> io::Result<()> {
    let mut names: Vec<_> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let inside = at.join(&name);
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                packed.skipped.push((inside, e.to_string()));
                continue;
            }
        };
        let ft = meta.file_type();
        if ft.is_dir() {
            append_dir(b, &inside, &meta)?;
            pack_into(b, &path, &inside, packed)?;
        } else if ft.is_file() {
            let file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) => {
                    packed.skipped.push((inside, e.to_string()));
                    continue;
                }
            };
            let size = meta.len();
            let mut h = header(&meta, tar::EntryType::Regular, size);
            let data = file.take(size).chain(io::repeat(0)).take(size);
            b.append_data(&mut h, &inside, data)?;
            packed.files += 1;
            packed.file_bytes += size;
        } else {
            let what = if ft.is_symlink() {
                "a symbolic link"
            } else {
                "not a regular file or folder"
            };
            packed.skipped.push((inside, what.into()));
        }
    }
    Ok(())
}

fn append_dir<W: Write>(
    b: &mut tar::Builder<W>,
    path: &Path,
    meta: &std::fs::Metadata,
) -> io::Result<()> {
    let mut h = header(meta, tar::EntryType::Directory, 0);
    b.append_data(&mut h, path, io::empty())
}

fn header(meta: &std::fs::Metadata, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(meta.permissions().mode() & MODE_MASK);
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    h.set_mtime(mtime);
    h
}

/// What the walk does with each accepted member.
trait Visit {
    fn dir(&mut self, path: &Path, mode: u32) -> Result<(), ArchiveError>;
    /// Where a file's data goes; `None` discards it.
    fn file(&mut self, path: &Path, mode: u32) -> Result<Option<std::fs::File>, ArchiveError>;
}

struct Discard;

impl Visit for Discard {
    fn dir(&mut self, _: &Path, _: u32) -> Result<(), ArchiveError> {
        Ok(())
    }
    fn file(&mut self, _: &Path, _: u32) -> Result<Option<std::fs::File>, ArchiveError> {
        Ok(None)
    }
}

struct Unpacker {
    root: PathBuf,
    dirs: Vec<(PathBuf, u32)>,
}

impl Visit for Unpacker {
    fn dir(&mut self, path: &Path, mode: u32) -> Result<(), ArchiveError> {
        let full = self.root.join(path);
        std::fs::create_dir_all(&full).map_err(|source| ArchiveError::Write {
            path: full.clone(),
            source,
        })?;
        self.dirs.push((path.to_path_buf(), mode));
        Ok(())
    }

    fn file(&mut self, path: &Path, mode: u32) -> Result<Option<std::fs::File>, ArchiveError> {
        let full = self.root.join(path);
        let werr = |source| ArchiveError::Write {
            path: full.clone(),
            source,
        };
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent).map_err(werr)?;
        }
        let f = std::fs::File::create(&full).map_err(werr)?;
        // On the open file: a mode without write permission does not stop our writes.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(werr)?;
        Ok(Some(f))
    }
}

/// Counts the bytes the tar reader takes from the decompressor and refuses to hand out
/// more than `ceiling`: the walk raises the ceiling by what each step may read.
#[derive(Default)]
struct Gauge {
    read: Cell<u64>,
    ceiling: Cell<u64>,
    tripped: Cell<bool>,
}

struct Meter<R> {
    inner: R,
    gauge: Rc<Gauge>,
}

impl<R: Read> Read for Meter<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let g = &self.gauge;
        let room = g.ceiling.get().saturating_sub(g.read.get());
        if room == 0 {
            // At the ceiling: fine if the stream ends here, refused if it goes on.
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? == 0 {
                return Ok(0);
            }
            g.tripped.set(true);
            return Err(io::Error::other("archive limit reached"));
        }
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        g.read.set(g.read.get() + n as u64);
        Ok(n)
    }
}

/// Where the walk is, for messages: the member being read, or the one before.
fn place(member: &str) -> String {
    if member.is_empty() {
        "at the start".into()
    } else {
        format!("after member '{member}'")
    }
}

fn walk<R: Read>(
    reader: R,
    layout: Layout,
    limits: Limits,
    visit: &mut dyn Visit,
) -> Result<Summary, ArchiveError> {
    let gauge = Rc::new(Gauge::default());
    let meter = Meter {
        inner: MultiGzDecoder::new(reader),
        gauge: gauge.clone(),
    };
    let mut archive = tar::Archive::new(meter);
    archive.set_ignore_zeros(true);
    let mut summary = Summary::default();
    // The last member read, for messages.
    let mut last = String::new();
    let format = |e: io::Error, place: String| ArchiveError::Format {
        place,
        detail: e.to_string(),
    };
    let mut entries = archive.entries().map_err(|e| format(e, place("")))?;
    loop {
        let step_start = gauge.read.get();
        gauge.ceiling.set(
            limits
                .max_unpacked_bytes
                .min(step_start.saturating_add(HEADER_BUDGET)),
        );
        let Some(entry) = entries.next() else { break };
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) if gauge.tripped.get() => {
                return Err(if gauge.read.get() >= limits.max_unpacked_bytes {
                    ArchiveError::TooBig {
                        limit: Limit::UnpackedBytes,
                        max: limits.max_unpacked_bytes,
                        at: format!("the member {}", place(&last)),
                    }
                } else {
                    ArchiveError::Format {
                        place: place(&last),
                        detail: format!(
                            "more than {HEADER_BUDGET} bytes of tar headers, long names or padding in a row ({e})"
                        ),
                    }
                });
            }
            Err(e) => return Err(format(e, place(&last))),
        };
        let member = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        summary.entries += 1;
        if summary.entries > limits.max_entries {
            return Err(ArchiveError::TooBig {
                limit: Limit::Entries,
                max: limits.max_entries,
                at: format!("member '{member}'"),
            });
        }
        let size = entry.size();
        if gauge.read.get().saturating_add(size) > limits.max_unpacked_bytes {
            return Err(ArchiveError::TooBig {
                limit: Limit::UnpackedBytes,
                max: limits.max_unpacked_bytes,
                at: format!("member '{member}' ({size} bytes)"),
            });
        }
        gauge.ceiling.set(limits.max_unpacked_bytes);
        let refused = |reason: &str| ArchiveError::Refused {
            member: member.clone(),
            reason: reason.to_string(),
        };
        let kind = entry.header().entry_type();
        let mode = entry.header().mode().unwrap_or(0o644) & MODE_MASK;
        let mut out = None;
        match kind {
            tar::EntryType::XGlobalHeader if size <= HEADER_BUDGET => {}
            tar::EntryType::XGlobalHeader => {
                return Err(refused(&format!(
                    "is a pax global header of {size} bytes (at most {HEADER_BUDGET})"
                )));
            }
            tar::EntryType::Directory => {
                let path = clean_path(&member, layout, true).map_err(|r| refused(&r))?;
                if !path.as_os_str().is_empty() {
                    visit.dir(&path, mode)?;
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let path = clean_path(&member, layout, false).map_err(|r| refused(&r))?;
                out = visit.file(&path, mode)?.map(|f| (f, path));
                summary.files += 1;
                summary.file_bytes += size;
            }
            tar::EntryType::Symlink => {
                return Err(refused("is a symbolic link (links are refused)"));
            }
            tar::EntryType::Link => return Err(refused("is a hard link (links are refused)")),
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                return Err(refused(
                    "is a device or a fifo (only regular files and folders are accepted)",
                ));
            }
            tar::EntryType::GNUSparse => {
                return Err(refused(
                    "is a sparse file (only regular files and folders are accepted)",
                ));
            }
            other => {
                return Err(refused(&format!(
                    "has the entry type {:?} (only regular files and folders are accepted)",
                    other.as_byte() as char
                )));
            }
        }
        // The data: into the file, or read and dropped; a short stream is a format fault.
        copy_data(&mut entry, out.as_mut(), &member)?;
        last = member;
    }
    summary.unpacked_bytes = gauge.read.get();
    Ok(summary)
}

fn copy_data(
    from: &mut impl Read,
    mut to: Option<&mut (std::fs::File, PathBuf)>,
    member: &str,
) -> Result<(), ArchiveError> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(ArchiveError::Format {
                    place: format!("in member '{member}'"),
                    detail: e.to_string(),
                });
            }
        };
        if let Some((f, path)) = to.as_mut() {
            f.write_all(&buf[..n])
                .map_err(|source| ArchiveError::Write {
                    path: path.clone(),
                    source,
                })?;
        }
    }
}

/// The member's path made relative and plain (`.` components dropped), or why it is
/// refused. An empty result is the archive's root (`./`, as `tar -C dir .` writes it),
/// allowed for a folder only (it unpacks to nothing).
fn clean_path(member: &str, layout: Layout, is_dir: bool) -> Result<PathBuf, String> {
    let mut clean = PathBuf::new();
    for c in Path::new(member).components() {
        match c {
            Component::Normal(p) => clean.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err("contains '..'".into()),
            Component::RootDir | Component::Prefix(_) => {
                return Err("has an absolute path".into());
            }
        }
    }
    if clean.as_os_str().is_empty() {
        return if is_dir {
            Ok(clean)
        } else {
            Err("is a file without a name".into())
        };
    }
    if layout == Layout::Attachments {
        let top = clean.components().next().map(|c| c.as_os_str());
        if !top.is_some_and(|t| ATTACHMENT_ROOTS.iter().any(|r| t == *r)) {
            return Err("is not under provision/, firmware_update/ or test/".into());
        }
    }
    Ok(clean)
}

#[cfg(test)]
mod tests;
