//! Hostile archives for tests of the server and the agent (feature `hostile`): raw tar
//! members with any name and type, several gzip members, and gzip bombs built without
//! compressing the bytes they expand to.
//!
//! A bomb is one gzip member whose deflate stream is the same compressed piece (1 MiB of
//! zeros, about 1 KiB) written again and again: each piece comes from a fresh encoder
//! ended by a sync flush, so it is a byte-aligned run of non-final blocks that refers
//! only to its own data and any number of them can follow each other. The gzip trailer's
//! CRC-32 is combined from the pieces' CRCs. 10 GiB of zeros cost about 10 MB and well
//! under a second to build.

use flate2::Compression;
use flate2::write::DeflateEncoder;
use std::io::Write;

/// One tar member (header and padded data) with the name written as raw bytes, so names
/// such as `../x` or `/etc/passwd` can be built (`tar::Header::set_path` refuses them).
/// `size` is the size the header declares; `data` (padded to 512) follows it.
///
/// Panics when `name` or `link` is longer than 100 bytes (test helper).
pub fn member(name: &str, kind: tar::EntryType, size: u64, data: &[u8], link: &str) -> Vec<u8> {
    member_with_mode(name, kind, size, data, link, 0o644)
}

/// Like [`member`] with the given mode.
pub fn member_with_mode(
    name: &str,
    kind: tar::EntryType,
    size: u64,
    data: &[u8],
    link: &str,
    mode: u32,
) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(mode);
    h.set_entry_type(kind);
    let old = h.as_old_mut();
    old.name[..name.len()].copy_from_slice(name.as_bytes());
    old.linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// A regular file member holding `data`, with mode `mode`.
pub fn file(name: &str, data: &[u8], mode: u32) -> Vec<u8> {
    member_with_mode(
        name,
        tar::EntryType::Regular,
        data.len() as u64,
        data,
        "",
        mode,
    )
}

/// The end of a tar stream: two zero blocks.
pub fn end() -> Vec<u8> {
    vec![0; 1024]
}

/// One gzip member holding `bytes`.
///
/// Panics if compression fails (in memory: it does not).
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), Compression::fast());
    e.write_all(bytes).expect("gzip in memory");
    e.finish().expect("gzip in memory")
}

/// A gzip tar of `members` followed by the end of the stream, in one gzip member.
pub fn targz(members: &[Vec<u8>]) -> Vec<u8> {
    let mut tar = members.concat();
    tar.extend(end());
    gzip(&tar)
}

/// Two complete gzip tars one after the other (`cat a.tar.gz b.tar.gz`): tools that read
/// only the first gzip member see `first` alone.
pub fn two_members(first: &[Vec<u8>], second: &[Vec<u8>]) -> Vec<u8> {
    let mut out = targz(first);
    out.extend(targz(second));
    out
}

/// One gzip member expanding to `prefix` followed by `zeros` zero bytes, built in
/// pieces (module docs). Panics if compression fails (in memory: it does not).
pub fn zeros_after(prefix: &[u8], zeros: u64) -> Vec<u8> {
    const PIECE: u64 = 1 << 20;
    let raw = |data: &[u8]| {
        let mut e = DeflateEncoder::new(Vec::new(), Compression::best());
        e.write_all(data).expect("deflate in memory");
        // Sync flush: byte-aligned, non-final blocks.
        e.flush().expect("deflate in memory");
        e.get_ref().clone()
    };
    let crc_of = |data: &[u8]| {
        let mut c = flate2::Crc::new();
        c.update(data);
        c
    };
    let piece = vec![0u8; PIECE as usize];
    let piece_z = raw(&piece);
    let piece_crc = crc_of(&piece);
    let rest = (zeros % PIECE) as usize;
    let mut crc = crc_of(prefix);
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
    out.extend(raw(prefix));
    for _ in 0..zeros / PIECE {
        out.extend_from_slice(&piece_z);
        crc.combine(&piece_crc);
    }
    out.extend(raw(&piece[..rest]));
    crc.combine(&crc_of(&piece[..rest]));
    // The final (empty) block.
    out.extend(
        DeflateEncoder::new(Vec::new(), Compression::best())
            .finish()
            .expect("deflate in memory"),
    );
    out.extend(crc.sum().to_le_bytes());
    out.extend(((prefix.len() as u64 + zeros) as u32).to_le_bytes());
    out
}

/// A gzip bomb: one gzip member holding a tar with one regular file `name` of
/// `size` zero bytes (and the end of the tar stream).
pub fn bomb(name: &str, size: u64) -> Vec<u8> {
    let header = member(name, tar::EntryType::Regular, size, &[], "");
    let padding = (512 - size % 512) % 512;
    zeros_after(&header, size + padding + 1024)
}

/// A bomb whose header lies: `name` declares 1 byte, then `zeros` zero bytes follow,
/// which a tar reader skipping zero blocks reads through.
pub fn lying_bomb(name: &str, zeros: u64) -> Vec<u8> {
    let header = member(name, tar::EntryType::Regular, 1, &[], "");
    zeros_after(&header, zeros)
}
