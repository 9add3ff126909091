use super::*;
use crate::hostile::{self, bomb, file, member, targz, two_members};
use tar::EntryType;

const GIB: u64 = 1 << 30;

fn limits(max_entries: u64, max_unpacked_bytes: u64) -> Limits {
    Limits {
        max_entries,
        max_unpacked_bytes,
    }
}

fn check_att(gz: &[u8]) -> Result<Summary, ArchiveError> {
    check(gz, Layout::Attachments, Limits::default())
}

fn refused_member(r: Result<Summary, ArchiveError>) -> (String, String) {
    match r {
        Err(ArchiveError::Refused { member, reason }) => (member, reason),
        other => panic!("expected a refused member, got {other:?}"),
    }
}

#[test]
fn a_plain_attachments_archive_passes_with_its_summary() {
    let gz = targz(&[
        member("./", EntryType::Directory, 0, &[], ""),
        member("test/", EntryType::Directory, 0, &[], ""),
        file("test/a.txt", b"hello", 0o644),
        file("provision/img", &[1; 1000], 0o600),
        file("./firmware_update/fw", b"x", 0o644),
    ]);
    let s = check_att(&gz).expect("accepted");
    assert_eq!(s.entries, 5);
    assert_eq!(s.files, 3);
    assert_eq!(s.file_bytes, 1006);
    // 4 headers, 3 padded data blocks (1000 bytes take 2), 2 end blocks... and gzip's
    // padding of the stream to no particular size: at least this much was read.
    assert!(s.unpacked_bytes >= (5 + 4 + 2) * 512, "{s:?}");
    // `./` as a file, or a file at the top: refused.
    let (m, _) = refused_member(check_att(&targz(&[file("./", b"x", 0o644)])));
    assert_eq!(m, "./");
}

#[test]
fn a_second_gzip_member_is_read_and_its_traversal_refused() {
    let gz = two_members(
        &[file("test/ok", b"1", 0o644)],
        &[file("../x", b"evil", 0o644)],
    );
    // A reader of the first member alone sees a harmless archive (the old checker).
    let mut first = tar::Archive::new(flate2::read::GzDecoder::new(&gz[..]));
    let names: Vec<String> = first
        .entries()
        .expect("entries")
        .map(|e| {
            e.expect("entry")
                .path()
                .expect("path")
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(names, ["test/ok"]);
    let (m, why) = refused_member(check_att(&gz));
    assert_eq!(m, "../x");
    assert!(why.contains(".."), "{why}");
    // The same in an artifact.
    let (m, _) = refused_member(check(&gz[..], Layout::Artifact, Limits::default()));
    assert_eq!(m, "../x");
}

#[test]
fn a_second_member_continuing_the_tar_stream_is_read_too() {
    // First member without the end blocks: the tar stream goes on in the second.
    let mut gz = hostile::gzip(&file("test/ok", b"1", 0o644));
    gz.extend(targz(&[file("test/../../x", b"evil", 0o644)]));
    let (m, _) = refused_member(check_att(&gz));
    assert_eq!(m, "test/../../x");
}

#[test]
fn unsafe_paths_are_refused_naming_the_member() {
    for (name, why) in [
        ("/etc/passwd", "absolute"),
        ("test/../../evil", ".."),
        ("../evil", ".."),
        ("other/x", "provision/"),
        ("testing/x", "provision/"),
        ("x", "provision/"),
    ] {
        let gz = targz(&[file("test/ok", b"1", 0o644), file(name, b"x", 0o644)]);
        let (m, reason) = refused_member(check_att(&gz));
        assert_eq!(m, name);
        assert!(reason.contains(why), "{name}: {reason}");
        let msg = check_att(&gz).expect_err("refused").to_string();
        assert!(msg.contains(name), "{msg}");
    }
    // Artifacts take any relative path, and the root folder itself.
    let gz = targz(&[
        member("./", EntryType::Directory, 0, &[], ""),
        file("artifacts/x", b"1", 0o644),
        file("y", b"1", 0o644),
    ]);
    check(&gz[..], Layout::Artifact, Limits::default()).expect("artifact");
    let gz = targz(&[file("/abs", b"1", 0o644)]);
    let (m, _) = refused_member(check(&gz[..], Layout::Artifact, Limits::default()));
    assert_eq!(m, "/abs");
}

#[test]
fn links_devices_fifos_and_sparse_files_are_refused() {
    for (kind, link, why) in [
        (EntryType::Symlink, "/etc", "symbolic link"),
        (EntryType::Link, "test/ok", "hard link"),
        (EntryType::Char, "", "device"),
        (EntryType::Block, "", "device"),
        (EntryType::Fifo, "", "fifo"),
    ] {
        let gz = targz(&[
            file("test/ok", b"1", 0o644),
            member("test/l", kind, 0, &[], link),
        ]);
        let (m, reason) = refused_member(check_att(&gz));
        assert_eq!(m, "test/l");
        assert!(reason.contains(why), "{kind:?}: {reason}");
    }
}

#[test]
fn a_pax_global_header_is_skipped() {
    let record = b"52 comment=0123456789012345678901234567890123456789\n";
    let gz = targz(&[
        member(
            "pax_global_header",
            EntryType::XGlobalHeader,
            record.len() as u64,
            record,
            "",
        ),
        file("test/a", b"1", 0o644),
    ]);
    assert_eq!(check_att(&gz).expect("accepted").files, 1);
}

#[test]
fn a_bomb_is_refused_at_its_header_without_reading_its_data() {
    let gz = bomb("test/zeros", 10 * GIB);
    assert!(gz.len() < 16 << 20, "the bomb is small: {}", gz.len());
    // It is a valid gzip: the first mebibytes decompress to the header and zeros.
    let mut head = vec![0u8; 4 << 20];
    flate2::read::GzDecoder::new(&gz[..])
        .read_exact(&mut head)
        .expect("decompresses");
    let started = std::time::Instant::now();
    let e = check_att(&gz).expect_err("refused");
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    assert_eq!(e.limit(), Some(Limit::UnpackedBytes), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("test/zeros"), "{msg}");
    assert!(msg.contains(&(10 * GIB).to_string()), "{msg}");
    assert!(
        msg.contains(&Limits::DEFAULT_MAX_UNPACKED_BYTES.to_string()),
        "{msg}"
    );
}

#[test]
fn zeros_behind_a_lying_header_are_cut_off_after_the_header_budget() {
    let gz = hostile::lying_bomb("test/small", GIB);
    let e = check_att(&gz).expect_err("refused");
    assert!(matches!(e, ArchiveError::Format { .. }), "{e:?}");
    assert!(e.to_string().contains("test/small"), "{e}");
    assert!(e.to_string().contains("padding"), "{e}");
    // Under a small limit the same archive passes the limit first.
    let e = check(&gz[..], Layout::Attachments, limits(10, 64 * 1024)).expect_err("refused");
    assert_eq!(e.limit(), Some(Limit::UnpackedBytes), "{e}");
}

#[test]
fn a_long_name_past_the_header_budget_is_refused() {
    let long = vec![b'a'; (HEADER_BUDGET as usize) * 2];
    let gz = targz(&[
        member(
            "././@LongLink",
            EntryType::GNULongName,
            long.len() as u64,
            &long,
            "",
        ),
        file("test/x", b"1", 0o644),
    ]);
    let e = check_att(&gz).expect_err("refused");
    assert!(matches!(e, ArchiveError::Format { .. }), "{e:?}");
}

#[test]
fn the_entry_limit_names_the_first_member_past_it() {
    let files: Vec<Vec<u8>> = (0..11)
        .map(|i| file(&format!("test/f{i}"), b"x", 0o644))
        .collect();
    let gz = targz(&files);
    check(&gz[..], Layout::Attachments, limits(11, GIB)).expect("11 entries fit");
    let e = check(&gz[..], Layout::Attachments, limits(10, GIB)).expect_err("refused");
    assert_eq!(e.limit(), Some(Limit::Entries));
    assert!(e.to_string().contains("test/f10"), "{e}");
    assert!(e.to_string().contains("10 entries"), "{e}");
}

#[test]
fn the_size_limit_counts_every_member() {
    let gz = targz(&[
        file("test/a", &[1; 4096], 0o644),
        file("test/b", &[2; 4096], 0o644),
        file("test/c", &[3; 4096], 0o644),
    ]);
    let e = check(&gz[..], Layout::Attachments, limits(100, 10_000)).expect_err("refused");
    assert_eq!(e.limit(), Some(Limit::UnpackedBytes));
    // a: header at 0, data to 4608; b: header, data to 9216; c would end at 13824.
    assert!(e.to_string().contains("test/c"), "{e}");
    assert!(e.to_string().contains("10000"), "{e}");
    check(&gz[..], Layout::Attachments, limits(100, 20_000)).expect("fits");
}

#[test]
fn what_is_not_a_gzip_tar_is_refused() {
    for (what, bytes) in [
        ("not gzip", b"not a tarball at all".to_vec()),
        ("gzip, not tar", hostile::gzip(&[7; 2000])),
        ("empty", Vec::new()),
        ("truncated", {
            let gz = targz(&[file("test/a", &[1; 100_000], 0o644)]);
            gz[..gz.len() / 2].to_vec()
        }),
        ("garbage after", {
            let mut gz = targz(&[file("test/a", b"1", 0o644)]);
            gz.extend_from_slice(b"garbage");
            gz
        }),
    ] {
        let r = check_att(&bytes);
        assert!(
            matches!(r, Err(ArchiveError::Format { .. })),
            "{what}: {r:?}"
        );
    }
}

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).expect("meta").permissions().mode() & 0o7777
}

#[test]
fn unpack_keeps_modes_without_setuid_and_leaves_nothing_when_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let gz = targz(&[
        hostile::member_with_mode("test/ro/", EntryType::Directory, 0, &[], "", 0o555),
        file("test/ro/run.sh", b"#!/bin/sh\n", 0o4755),
        file("test/secret", b"s", 0o600),
    ]);
    let archive = tmp.path().join("a.tar.gz");
    std::fs::write(&archive, &gz).expect("write");
    let dest = tmp.path().join("attachments");
    let s = unpack(&archive, &dest, Layout::Attachments, Limits::default()).expect("unpack");
    assert_eq!(s.files, 2);
    assert_eq!(mode_of(&dest.join("test/ro/run.sh")), 0o755);
    assert_eq!(mode_of(&dest.join("test/secret")), 0o600);
    assert_eq!(mode_of(&dest.join("test/ro")), 0o555);
    assert_eq!(
        std::fs::read(dest.join("test/ro/run.sh")).expect("read"),
        b"#!/bin/sh\n"
    );
    // dest exists now: refused.
    assert!(matches!(
        unpack(&archive, &dest, Layout::Attachments, Limits::default()),
        Err(ArchiveError::Write { .. })
    ));

    let bad = two_members(
        &[file("test/ok", b"1", 0o644)],
        &[file("../x", b"e", 0o644)],
    );
    std::fs::write(&archive, &bad).expect("write");
    let dest2 = tmp.path().join("other");
    let (m, _) = refused_member(unpack(
        &archive,
        &dest2,
        Layout::Attachments,
        Limits::default(),
    ));
    assert_eq!(m, "../x");
    assert!(!dest2.exists());
    assert!(!tmp.path().join(".other.unpacking").exists());
    assert!(!tmp.path().join("x").exists());

    std::fs::write(&archive, bomb("test/zeros", 10 * GIB)).expect("write");
    let e = unpack(&archive, &dest2, Layout::Attachments, Limits::default()).expect_err("bomb");
    assert_eq!(e.limit(), Some(Limit::UnpackedBytes));
    assert!(!dest2.exists());
}

#[test]
fn pack_dir_round_trips_through_the_checker_with_modes_and_leaves_links_out() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("artifacts");
    std::fs::create_dir_all(src.join("sub")).expect("mkdir");
    std::fs::write(src.join("run.sh"), b"#!/bin/sh\necho hi\n").expect("write");
    std::fs::set_permissions(src.join("run.sh"), std::fs::Permissions::from_mode(0o750))
        .expect("chmod");
    std::fs::write(src.join("sub/data.bin"), vec![9u8; 300_000]).expect("write");
    std::os::unix::fs::symlink("/etc/passwd", src.join("link")).expect("symlink");
    let out = tmp.path().join("artifacts.tar.gz");
    let f = std::fs::File::create(&out).expect("create");
    let (_, packed) = pack_dir(&src, "artifacts", f).expect("pack");
    assert_eq!(packed.files, 2);
    assert_eq!(packed.file_bytes, 300_000 + 18);
    assert_eq!(packed.skipped.len(), 1, "{:?}", packed.skipped);
    assert_eq!(packed.skipped[0].0, Path::new("artifacts/link"));
    let gz = std::fs::read(&out).expect("read");
    check(&gz[..], Layout::Artifact, Limits::default()).expect("our own artifacts pass");
    let back = tmp.path().join("back");
    unpack(&out, &back, Layout::Artifact, Limits::default()).expect("unpack");
    assert_eq!(mode_of(&back.join("artifacts/run.sh")), 0o750);
    assert_eq!(
        std::fs::read(back.join("artifacts/sub/data.bin")).expect("read"),
        vec![9u8; 300_000]
    );
    assert!(!back.join("artifacts/link").exists());
}
