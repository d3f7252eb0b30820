//! Stacks of layers under volumes, through the real daemon and real clients: ext4 through
//! a FUSE file and a loop device on a `bbr` layer over emulated bad blocks (`test-dust`)
//! with a live snapshot; relocations that outlive a restart; read errors that are reported
//! and never relocated; spares running out; a COW failing under a snapshot and under a
//! merge; the CLI's refusals; the manifest's version.
//!
//! The bad blocks are dm-dust's: a read of a bad block fails with EIO (the device is
//! enabled), a write fails while the block's write-fail count is above 0 (each failure
//! counts it down) and otherwise succeeds and clears the block. So the ext4 test marks
//! bad only blocks that the next writes cover whole, and that the snapshot has already
//! copied out: a read of a bad block would be (rightly) a lost sector.

#![allow(
    clippy::too_many_lines,
    reason = "a scenario test reads best top to bottom"
)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::{ci, has_volume, identical, image_of, need_tools, qemu_io, run, seed, wait_for, Pool};
use cowsnap_core::testkit::{pattern, SplitMix};

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// One `qemu-io` command on `target` that must fail with EIO.
fn qemu_io_eio(target: &str, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", cmd, target])
        .output()
        .unwrap();
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        !out.status.success() && all.contains("Input/output error"),
        "{cmd:?} on {target} should fail with EIO: {} {all}",
        out.status
    );
}

/// `cowsnap layer message VOLUME LAYER WORDS...`, which must succeed; its answer.
/// Creates origin `name` of `size` on `test-dust 8 enabled` under `bbr` (the layer spec
/// given, e.g. `bbr 1M`).
fn dust_bbr_origin(pool: &Pool, name: &str, size: &str, bbr: &str) {
    pool.ok(&[
        "origin",
        "create",
        name,
        "--size",
        size,
        "--layer",
        "test-dust 8 enabled",
        "--layer",
        bbr,
    ]);
}

/// Creates snapshot `name` of `origin` with a COW of `size` on the layer `layer`.
fn snapshot_on_layer(pool: &Pool, name: &str, origin: &str, size: &str, layer: &str) {
    pool.ok(&[
        "snapshot",
        "create",
        name,
        "--origin",
        origin,
        "--cow-size",
        size,
        "--cow-layer",
        layer,
    ]);
}

fn message(pool: &Pool, volume: &str, layer: &str, words: &str) -> String {
    let mut args = vec!["layer", "message", volume, layer];
    args.extend(words.split_whitespace());
    pool.ok(&args).trim().to_string()
}

/// `cowsnap status --json VOLUME`.
fn status_json(pool: &Pool, volume: &str) -> serde_json::Value {
    serde_json::from_str(&pool.ok(&["status", "--json", volume])).unwrap()
}

/// The `detail` of `volume`'s layer whose target is `target`.
fn detail(pool: &Pool, volume: &str, target: &str) -> serde_json::Value {
    let v = status_json(pool, volume);
    v["layers"]
        .as_array()
        .unwrap_or_else(|| panic!("{volume} has no layers: {v}"))
        .iter()
        .find(|l| l["target"] == target)
        .unwrap_or_else(|| panic!("{volume} has no {target} layer: {v}"))["detail"]
        .clone()
}

fn u64_of(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {key} in {v}"))
}

fn manifest_version(pool: &Pool) -> u64 {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pool.path("pool.json")).unwrap()).unwrap();
    m["version"].as_u64().unwrap()
}

fn sha256_of(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    text(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Shell commands run when dropped, to leave no mount or loop device behind.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.0 {
            let _ = Command::new("sh").args(["-c", c]).status();
        }
    }
}

fn losetup(file: &Path, read_only: bool) -> String {
    let mut c = Command::new("losetup");
    if read_only {
        c.arg("-r");
    }
    text(&run(c.args(["-f", "--show", file.to_str().unwrap()])).stdout)
        .trim()
        .to_string()
}

/// Writes `data` over the start of `path` (created if missing, never truncated: an
/// existing file's blocks are overwritten in place) and syncs it.
fn write_in_place(path: &Path, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// The physical 4 KiB blocks of `path` (`filefrag -v -b4096`).
fn physical_blocks(path: &Path) -> Vec<u64> {
    let out =
        text(&run(Command::new("filefrag").args(["-v", "-b4096", path.to_str().unwrap()])).stdout);
    let mut blocks = Vec::new();
    for line in out.lines() {
        // `   0:        0..     299:   40277624..  40277923:    300:    last,eof`
        let fields: Vec<&str> = line.split(':').map(str::trim).collect();
        if fields.len() < 4 || fields[0].parse::<u64>().is_err() {
            continue;
        }
        let (a, b) = fields[2].split_once("..").unwrap();
        let (a, b): (u64, u64) = (a.trim().parse().unwrap(), b.trim().parse().unwrap());
        blocks.extend(a..=b);
    }
    assert!(!blocks.is_empty(), "no extent in {out}");
    blocks
}

fn fuse_and_loop_or_skip() -> bool {
    if Path::new("/dev/fuse").exists() && Path::new("/dev/loop-control").exists() {
        return true;
    }
    assert!(!ci(), "/dev/fuse or /dev/loop-control missing under CI");
    eprintln!("SKIP: no /dev/fuse or loop devices");
    false
}

/// A file of the ext4 test: its name, content and sha256 as written.
struct TestFile {
    path: PathBuf,
    data: Vec<u8>,
    sum: String,
}

impl TestFile {
    fn write(dir: &Path, name: &str, data: Vec<u8>) -> TestFile {
        let path = dir.join(name);
        write_in_place(&path, &data);
        let sum = sha256_of(&path);
        TestFile { path, data, sum }
    }

    /// Under mount point `dir` (the same name elsewhere).
    fn check_under(&self, dir: &Path, data: &[u8], sum: &str) {
        let p = dir.join(self.path.file_name().unwrap());
        assert_eq!(sha256_of(&p), sum, "{}", p.display());
        assert!(std::fs::read(&p).unwrap() == data, "{}", p.display());
    }
}

#[test]
fn ext4_on_bbr_over_bad_blocks_through_fuse_and_loop_with_a_live_snapshot() {
    need_tools(&[
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "mount",
        "umount",
        "fsfreeze",
        "filefrag",
        "sha256sum",
        "qemu-img",
        "fusermount3",
    ]);
    if !fuse_and_loop_or_skip() {
        return;
    }
    let seed = seed();
    let mut rng = SplitMix(seed);
    let pool = Pool::new("layers-ext4");
    dust_bbr_origin(&pool, "disk", "64M", "bbr 8M");
    let files = pool.dir.with_extension("files");
    std::fs::create_dir_all(&files).unwrap();
    let d = pool.serve_with(&["--fuse", files.to_str().unwrap()], &[]);
    let (m1, m2) = (pool.dir.with_extension("m1"), pool.dir.with_extension("m2"));
    std::fs::create_dir_all(&m1).unwrap();
    std::fs::create_dir_all(&m2).unwrap();
    let dev = losetup(&files.join("disk"), false);
    let mut cleanup = Cleanup(vec![
        format!("umount {} 2>/dev/null", m2.display()),
        format!("umount {} 2>/dev/null", m1.display()),
        format!("losetup -d {dev} 2>/dev/null"),
    ]);
    // 4 KiB blocks: a file system block is a dust block and a bbr chunk.
    run(Command::new("mkfs.ext4").args([
        "-q",
        "-b",
        "4096",
        "-E",
        "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
        &dev,
    ]));
    run(Command::new("mount").args([&dev, m1.to_str().unwrap()]));

    // Files whose sizes are whole blocks: they are overwritten in place below, and a
    // partial last block would be read (a bad block's read fails).
    let mut a: Vec<TestFile> = (0..6)
        .map(|i| {
            let len = (16 + rng.below(200)) * 4096;
            TestFile::write(&m1, &format!("a{i}"), pattern(seed ^ i, 0, len))
        })
        .collect();
    run(&mut Command::new("sync"));
    // The snapshot of a frozen file system, and its image as taken.
    run(Command::new("fsfreeze").args(["-f", m1.to_str().unwrap()]));
    let created = pool.run(&[
        "snapshot",
        "create",
        "snap",
        "--origin",
        "disk",
        "--cow-size",
        "32M",
    ]);
    run(Command::new("fsfreeze").args(["-u", m1.to_str().unwrap()]));
    assert!(created.status.success(), "{created:?}");
    let snap_img = pool.dir.with_extension("snap.img");
    image_of(&pool.uri("snap"), &snap_img);
    let snap_files: Vec<(Vec<u8>, String)> =
        a.iter().map(|f| (f.data.clone(), f.sum.clone())).collect();

    // Overwritten once: the snapshot copies their chunks out (reads of healthy blocks).
    for (i, f) in a.iter_mut().enumerate() {
        let data = pattern(seed ^ (0x100 + i as u64), 0, f.data.len() as u64);
        *f = TestFile::write(&m1, &format!("a{i}"), data);
    }
    run(&mut Command::new("sync"));

    // Now their blocks go bad, one file after another, each then overwritten: the
    // overwrite fails on the device and bbr relocates it. Meanwhile another thread
    // writes new files of any size, which land on healthy free blocks.
    let b_lens: Vec<u64> = (0..6).map(|_| 1 + rng.below(900 << 10)).collect();
    let writer = {
        let m1 = m1.clone();
        std::thread::spawn(move || {
            (0u64..)
                .zip(b_lens)
                .map(|(i, len)| {
                    TestFile::write(&m1, &format!("b{i}"), pattern(seed ^ (0x300 + i), 0, len))
                })
                .collect::<Vec<_>>()
        })
    };
    let mut failing = 0;
    for (i, f) in a.iter_mut().enumerate() {
        for blk in physical_blocks(&f.path) {
            if rng.below(4) == 0 {
                let fails = rng.below(4);
                failing += u64::from(fails > 0);
                message(
                    &pool,
                    "disk",
                    "test-dust",
                    &format!("addbadblock {blk} {fails}"),
                );
            }
        }
        let data = pattern(seed ^ (0x200 + i as u64), 0, f.data.len() as u64);
        *f = TestFile::write(&m1, &format!("a{i}"), data);
    }
    let b = writer.join().unwrap();
    assert!(failing > 0, "no block with write failures was picked");
    run(&mut Command::new("sync"));
    let bbr = detail(&pool, "disk", "bbr");
    eprintln!("{failing} blocks failed writes; bbr: {bbr}");
    // Every write error of a chunk was relocated. A request over several failing blocks
    // fails once (dust counts a failure on each of them); bbr writes its pieces again one
    // by one, so a block whose failures were used up takes its write in place: at most
    // one relocation each.
    let relocations = u64_of(&bbr, "relocations");
    assert!((1..=failing).contains(&relocations), "{failing}: {bbr}");
    // Two requests failing on one chunk count two errors for its one relocation.
    assert!(u64_of(&bbr, "write_errors") >= relocations, "{bbr}");
    assert_eq!(bbr["state"], "ok", "{bbr}");
    assert_eq!(u64_of(&bbr, "unreadable_sectors"), 0, "{bbr}");
    assert_eq!(u64_of(&bbr, "spare_failures"), 0, "{bbr}");
    let dust = detail(&pool, "disk", "test-dust");
    // dust fails a request once however many of its blocks fail; bbr writes the pieces
    // of a failed request again one by one, and relocates each piece that fails again.
    assert!(u64_of(&dust, "write_errors") >= relocations, "{dust}");
    assert_eq!(u64_of(&dust, "read_errors"), 0, "{dust}");
    let line = pool.ok(&["status", "disk"]);
    assert!(
        line.lines()
            .any(|l| l.starts_with("disk/1: 0 131072 bbr ") && l.ends_with(" 0 ok")),
        "{line}"
    );

    run(Command::new("umount").arg(&m1));
    let fsck = Command::new("e2fsck")
        .args(["-f", "-n", &dev])
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -f -n on the origin: {fsck:?}"
    );
    run(Command::new("mount").args([&dev, m1.to_str().unwrap()]));
    for f in a.iter().chain(&b) {
        f.check_under(&m1, &f.data, &f.sum);
    }

    // The snapshot: its image as taken, a clean file system with the first files.
    assert!(
        identical(snap_img.to_str().unwrap(), &pool.uri("snap")),
        "the snapshot moved"
    );
    let s = status_json(&pool, "snap");
    assert!(s.get("invalid_reason").is_none(), "{s}");
    assert_ne!(s["status"], "Invalid", "{s}");
    let snap_dev = losetup(&files.join("snap"), true);
    cleanup
        .0
        .insert(1, format!("losetup -d {snap_dev} 2>/dev/null"));
    let fsck = Command::new("e2fsck")
        .args(["-f", "-n", &snap_dev])
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -f -n on the snapshot: {fsck:?}"
    );
    run(Command::new("mount").args(["-o", "ro", &snap_dev, m2.to_str().unwrap()]));
    for (f, (data, sum)) in a.iter().zip(&snap_files) {
        f.check_under(&m2, data, sum);
    }
    assert!(!m2.join("b0").exists());
    drop(cleanup);
    d.stop_ok();
}

#[test]
fn relocations_outlive_a_restart_that_forgets_the_bad_blocks() {
    need_tools(&["qemu-io"]);
    let seed = seed();
    let mut rng = SplitMix(seed);
    let pool = Pool::new("layers-restart");
    dust_bbr_origin(&pool, "disk", "16M", "bbr 2M");
    let d = pool.serve();
    let disk = pool.uri("disk");
    qemu_io(&disk, &["write -P 0x11 0 8M"]);
    // Distinct blocks of the first 8 MiB, each failing its next 1 to 3 writes.
    let mut bad = std::collections::BTreeSet::new();
    while bad.len() < 24 {
        bad.insert(rng.below(2048));
    }
    for &blk in &bad {
        let fails = 1 + rng.below(3);
        message(&pool, "disk", "0", &format!("addbadblock {blk} {fails}"));
    }
    // One write per bad block, its own pattern; then a 256 KiB write over several.
    let cmds: Vec<String> = bad
        .iter()
        .map(|&blk| format!("write -P 0x{:02x} {} 4k", 0x20 + blk % 0x40, blk * 4096))
        .collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&disk, &refs);
    let first = *bad.iter().next().unwrap();
    let span = (first * 4096) & !0x3ffff;
    qemu_io(&disk, &[&format!("write -P 0x77 {span} 256k"), "flush"]);
    let relocated = u64_of(&detail(&pool, "disk", "bbr"), "relocations");
    assert_eq!(relocated, bad.len() as u64, "every bad block was relocated");
    // A 512-byte write into a relocated chunk goes to its spare.
    let last = *bad.iter().next_back().unwrap();
    qemu_io(
        &disk,
        &[&format!("write -P 0x99 {} 512", last * 4096 + 1024)],
    );
    let expect = |blk: u64| {
        if blk * 4096 >= span && blk * 4096 < span + (256 << 10) {
            0x77
        } else {
            0x20 + blk % 0x40
        }
    };
    let check = |when: &str| {
        let mut cmds: Vec<String> = bad
            .iter()
            .filter(|&&b| b != last)
            .map(|&b| format!("read -P 0x{:02x} {} 4k", expect(b), b * 4096))
            .collect();
        let at = last * 4096;
        cmds.push(format!("read -P 0x{:02x} {at} 1024", expect(last)));
        cmds.push(format!("read -P 0x99 {} 512", at + 1024));
        cmds.push(format!("read -P 0x{:02x} {} 2560", expect(last), at + 1536));
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        let out = qemu_io(&disk, &refs);
        assert!(
            !out.contains("Pattern verification failed"),
            "{when}: {out}"
        );
    };
    check("before the restart");
    d.stop_ok();

    // The device below holds the old data there: the spares hold the new.
    let img = std::fs::read(pool.path("disk.img")).unwrap();
    for &blk in &bad {
        let at = usize::try_from(blk * 4096).unwrap();
        assert!(
            img[at..at + 4096].iter().all(|&x| x == 0x11),
            "block {blk} was written to the failing device"
        );
    }
    let d = pool.serve();
    assert_eq!(message(&pool, "disk", "test-dust", "listbadblocks"), "");
    let bbr = detail(&pool, "disk", "bbr");
    assert_eq!(u64_of(&bbr, "relocations"), relocated, "{bbr}");
    assert_eq!(u64_of(&bbr, "relocated_now"), 0, "{bbr}");
    assert_eq!(bbr["state"], "ok", "{bbr}");
    check("after the restart");
    // Relocated chunks stay writable, on their spares.
    qemu_io(
        &disk,
        &[
            &format!("write -P 0x5a {} 4k", first * 4096),
            &format!("read -P 0x5a {} 4k", first * 4096),
        ],
    );
    d.stop_ok();
}

#[test]
fn read_errors_are_reported_and_listed_never_relocated() {
    need_tools(&["qemu-io"]);
    let pool = Pool::new("layers-unreadable");
    dust_bbr_origin(&pool, "disk", "8M", "bbr 1M");
    let d = pool.serve();
    let disk = pool.uri("disk");
    qemu_io(&disk, &["write -P 0x31 0 1M"]);
    // Block 40: bytes 160K..164K, sectors 320..328. No write failure: only reads fail.
    message(&pool, "disk", "test-dust", "addbadblock 40");
    qemu_io_eio(&disk, "read 160k 4k");
    qemu_io_eio(&disk, "read 128k 64k");
    assert_eq!(message(&pool, "disk", "bbr", "list-unreadable"), "320 8");
    let bbr = detail(&pool, "disk", "bbr");
    assert_eq!(u64_of(&bbr, "unreadable_sectors"), 8, "{bbr}");
    assert_eq!(u64_of(&bbr, "relocations"), 0, "{bbr}");
    assert!(u64_of(&bbr, "read_errors") > 0, "{bbr}");
    assert!(pool
        .ok(&["status", "disk"])
        .contains("disk/1: 0 16384 bbr 0 "));
    // The device reads again, but the data was reported lost: it stays unreadable, also
    // after a restart, and its neighbours read.
    message(&pool, "disk", "test-dust", "removebadblock 40");
    qemu_io_eio(&disk, "read 160k 4k");
    d.stop_ok();
    let d = pool.serve();
    assert_eq!(message(&pool, "disk", "bbr", "list-unreadable"), "320 8");
    qemu_io_eio(&disk, "read 160k 512");
    qemu_io(&disk, &["read -P 0x31 0 160k", "read -P 0x31 164k 860k"]);
    // A write takes sectors off the list, one by one.
    qemu_io(&disk, &["write -P 0x32 160k 512", "read -P 0x32 160k 512"]);
    assert_eq!(message(&pool, "disk", "bbr", "list-unreadable"), "321 7");
    qemu_io_eio(&disk, "read 160k 4k");
    qemu_io(
        &disk,
        &[
            "write -P 0x33 160.5k 3.5k",
            "read -P 0x32 160k 512",
            "read -P 0x33 160.5k 3.5k",
        ],
    );
    assert_eq!(message(&pool, "disk", "bbr", "list-unreadable"), "");
    let bbr = detail(&pool, "disk", "bbr");
    assert_eq!(u64_of(&bbr, "unreadable_sectors"), 0, "{bbr}");
    assert_eq!(u64_of(&bbr, "relocations"), 0, "{bbr}");
    assert_eq!(bbr["state"], "ok", "{bbr}");
    d.stop_ok();
}

#[test]
fn spares_run_out_and_the_daemon_serves_on() {
    need_tools(&["qemu-io"]);
    let pool = Pool::new("layers-exhausted");
    // 16 KiB of 4 KiB chunks: the header, a table area and 2 spares.
    dust_bbr_origin(&pool, "small", "8M", "bbr 16K");
    pool.ok(&["origin", "create", "other", "--size", "8M"]);
    let d = pool.serve();
    let small = pool.uri("small");
    let bbr = detail(&pool, "small", "bbr");
    assert_eq!(bbr["spares"]["total_sectors"], 32, "{bbr}");
    for blk in 1..=3 {
        message(&pool, "small", "test-dust", &format!("addbadblock {blk} 5"));
    }
    qemu_io(&small, &["write -P 0x41 4k 4k", "write -P 0x42 8k 4k"]);
    qemu_io_eio(&small, "write -P 0x43 12k 4k");
    let bbr = detail(&pool, "small", "bbr");
    assert_eq!(bbr["state"], "exhausted", "{bbr}");
    assert_eq!(u64_of(&bbr, "relocations"), 2, "{bbr}");
    let line = pool.ok(&["status", "small"]);
    assert!(
        line.contains("small/1: 0 16384 bbr 2 0 32/32 0 exhausted"),
        "{line}"
    );
    // Still failing: no spare for it.
    qemu_io_eio(&small, "write -P 0x43 12k 4k");
    // Relocated chunks read and write; healthy chunks too; so does the other volume.
    let ok = [
        "read -P 0x41 4k 4k",
        "read -P 0x42 8k 4k",
        "write -P 0x44 8k 4k",
        "read -P 0x44 8k 4k",
        "write -P 0x45 1M 64k",
        "read -P 0x45 1M 64k",
    ];
    qemu_io(&small, &ok);
    qemu_io(
        &pool.uri("other"),
        &["write -P 0x46 0 1M", "read -P 0x46 0 1M"],
    );
    d.stop_ok();
    // A restart still has no spare left, and says so.
    let d = pool.serve();
    let bbr = detail(&pool, "small", "bbr");
    assert_eq!(bbr["state"], "exhausted", "after a restart: {bbr}");
    qemu_io(
        &small,
        &[
            "read -P 0x41 4k 4k",
            "read -P 0x44 8k 4k",
            "read -P 0x45 1M 64k",
        ],
    );
    // The bad blocks went with the restart: block 3 fails again, and finds no spare.
    message(&pool, "small", "test-dust", "addbadblock 3 5");
    qemu_io_eio(&small, "write -P 0x43 12k 4k");
    d.stop_ok();
}

#[test]
fn a_failing_cow_invalidates_its_snapshot_with_the_reason_and_the_daemon_serves_on() {
    need_tools(&["qemu-io", "qemu-img"]);
    let pool = Pool::new("layers-cow-fails");
    pool.ok(&["origin", "create", "o", "--size", "16M"]);
    pool.ok(&["origin", "create", "other", "--size", "8M"]);
    let d = pool.serve();
    let o = pool.uri("o");
    qemu_io(&o, &["write -P 0x51 0 2M"]);
    snapshot_on_layer(&pool, "s", "o", "8M", "test-flakey 1000000 1 error_writes");
    pool.ok(&[
        "snapshot",
        "create",
        "t",
        "--origin",
        "o",
        "--cow-size",
        "8M",
    ]);
    qemu_io(&o, &["write -P 0x52 0 1M"]);
    qemu_io(&pool.uri("s"), &["read -P 0x51 0 2M"]);
    let t_img = pool.dir.with_extension("t.img");
    image_of(&pool.uri("t"), &t_img);
    let table = pool.ok(&["layer", "table", "s"]);
    assert_eq!(
        table.trim(),
        "s/0: 0 16384 test-flakey 1000000 1 1 error_writes"
    );

    assert!(message(&pool, "s", "test-flakey", "down").contains("down"));
    // The copy-out to s fails: s is invalid, the origin's write succeeds.
    qemu_io(&o, &["write -P 0x53 4M 1M", "flush"]);
    let s = status_json(&pool, "s");
    assert_eq!(s["status"], "Invalid", "{s}");
    let reason = s["invalid_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("copy-out failed") && reason.contains("Input/output error"),
        "{s}"
    );
    let line = pool.ok(&["status", "s"]);
    assert!(line.starts_with("s: 0 32768 snapshot Invalid"), "{line}");
    assert!(
        line.contains("s/0: 0 16384 test-flakey forced down"),
        "{line}"
    );
    qemu_io_eio(&pool.uri("s"), "read 0 4k");
    // Everything else is served as before.
    qemu_io(
        &o,
        &[
            "read -P 0x52 0 1M",
            "read -P 0x51 1M 1M",
            "read -P 0x53 4M 1M",
            "write -P 0x54 8M 1M",
            "read -P 0x54 8M 1M",
        ],
    );
    assert!(!identical(t_img.to_str().unwrap(), &o));
    assert!(
        identical(t_img.to_str().unwrap(), &pool.uri("t")),
        "t moved"
    );
    let t = status_json(&pool, "t");
    assert!(t.get("invalid_reason").is_none(), "{t}");
    assert_ne!(t["status"], "Invalid", "{t}");
    qemu_io(
        &pool.uri("other"),
        &["write -P 0x55 0 1M", "read -P 0x55 0 1M"],
    );
    d.stop_ok();
    // Still invalid at the next starts, with its reason, although its COW's header could
    // not be marked (the layer failed that write too) and the new stack's flakey is up:
    // as valid, it would show the origin's new data where it missed copy-outs.
    for round in 0..2 {
        let d = pool.serve();
        let s = status_json(&pool, "s");
        assert_eq!(s["status"], "Invalid", "round {round}: {s}");
        let why = s["invalid_reason"].as_str().unwrap_or_default();
        assert!(why.contains("copy-out failed"), "round {round}: {s}");
        qemu_io_eio(&pool.uri("s"), "read 4M 4k");
        qemu_io(&o, &["read -P 0x53 4M 1M"]);
        assert!(
            identical(t_img.to_str().unwrap(), &pool.uri("t")),
            "t moved"
        );
        d.stop_ok();
    }
    pool.ok(&["snapshot", "remove", "s"]);
    assert!(!has_volume(&pool, "s"));
}

#[test]
fn a_merge_whose_cow_fails_reports_merge_failed_and_resumes_once_repaired() {
    need_tools(&["qemu-io", "qemu-img"]);
    let pool = Pool::new("layers-merge-fails");
    pool.ok(&["origin", "create", "disk", "--size", "8M"]);
    pool.ok(&["origin", "create", "other", "--size", "8M"]);
    let d = pool.serve();
    let disk = pool.uri("disk");
    qemu_io(&disk, &["write -P 0x61 0 4M"]);
    snapshot_on_layer(&pool, "s", "disk", "4M", "test-dust 8 enabled");
    qemu_io(
        &pool.uri("s"),
        &["write -P 0x62 1M 64k", "write -P 0x63 3M 32k"],
    );
    qemu_io(&disk, &["write -P 0x64 2M 16k"]);
    let s_img = pool.dir.with_extension("s.img");
    image_of(&pool.uri("s"), &s_img);
    // The COW's data chunks (after its header and first table area) go bad.
    let exceptions = u64_of(&status_json(&pool, "s"), "exceptions");
    assert_eq!(exceptions, 28);
    for blk in 2..2 + exceptions {
        message(&pool, "s", "test-dust", &format!("addbadblock {blk}"));
    }
    pool.ok(&["snapshot", "merge", "s", "--now"]);
    wait_for("the merge to fail", || {
        pool.ok(&["status", "s"]).contains("Merge failed")
    });
    let m: serde_json::Value =
        serde_json::from_str(&pool.ok(&["merge", "status", "s", "--json"])).unwrap();
    assert_eq!(m["state"], "failed", "{m}");
    assert!(
        m["reason"]
            .as_str()
            .is_some_and(|r| r.contains("Input/output error")),
        "{m}"
    );
    // The origin answers where the COW is not needed; other volumes are served.
    qemu_io(&disk, &["read -P 0x61 0 1M", "read -P 0x61 3584k 512k"]);
    qemu_io(
        &pool.uri("other"),
        &["write -P 0x65 0 1M", "read -P 0x65 0 1M"],
    );
    // Repaired: the merge resumes and ends with the snapshot's content.
    assert!(message(&pool, "s", "test-dust", "disable").contains("disabling"));
    pool.ok(&["merge", "resume", "s"]);
    wait_for("the merge to finish", || !has_volume(&pool, "s"));
    assert!(
        identical(s_img.to_str().unwrap(), &disk),
        "the merged origin is not the snapshot"
    );
    let (st, out) = d.stop();
    assert!(st.success(), "{out:?}");
    assert!(
        out.iter()
            .any(|l| l.contains("the merge of snapshot s failed")),
        "{out:?}"
    );
}

#[test]
fn bad_layer_specs_and_misuses_are_refused_clearly() {
    need_tools(&["qemu-io"]);
    let pool = Pool::new("layers-cli");
    for (spec, why) in [
        ("bogus 1", "unknown target \"bogus\""),
        ("linear 0", "linear takes START SECTORS"),
        ("linear 0 99999999", "past the end"),
        ("bbr 4K", "too small"),
        ("bbr 1M 4K 9", "at most two arguments"),
        ("bbr 1M 3K", "chunk size"),
        ("bbr lots", "spare size"),
        ("test-flakey", "test-flakey takes UP DOWN"),
    ] {
        let e = pool.refused(&["origin", "create", "x", "--size", "8M", "--layer", spec]);
        assert!(e.contains(why), "{spec:?}: {e}");
    }
    let e = pool.refused(&["origin", "create", "x", "--size", "8M", "--layer", "bogus"]);
    for known in ["linear", "test-dust", "test-flakey", "bbr"] {
        assert!(e.contains(known), "the known targets include {known}: {e}");
    }
    let e = pool.refused(&[
        "origin", "create", "x", "--size", "8M", "--layer", "bbr", "--layer", "bbr",
    ]);
    assert!(e.contains("at most one bbr"), "{e}");
    // Nothing was made by the refused creations.
    assert!(!has_volume(&pool, "x"));
    let mut names: Vec<String> = std::fs::read_dir(&pool.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains('x'))
        .collect();
    names.sort();
    assert!(names.is_empty(), "left behind: {names:?}");

    dust_bbr_origin(&pool, "disk", "8M", "bbr 1M");
    let e = pool.refused(&[
        "snapshot",
        "create",
        "s",
        "--origin",
        "disk",
        "--cow-size",
        "1M",
        "--cow-layer",
        "bbr",
    ]);
    assert!(e.contains("bbr layer goes under an origin"), "{e}");
    let e = pool.refused(&["layer", "message", "disk", "bbr", "status"]);
    assert!(e.contains("no daemon serves this pool"), "{e}");
    let e = pool.refused(&["layer", "status"]);
    assert!(e.contains("no daemon serves this pool"), "{e}");
    let e = pool.refused(&["layer", "add", "disk", "linear 0 8"]);
    assert!(e.contains("a linear layer"), "{e}");
    let e = pool.refused(&["layer", "add", "disk", "bbr"]);
    assert!(e.contains("at most one bbr"), "{e}");
    let e = pool.refused(&["layer", "remove", "disk", "7"]);
    assert!(
        e.contains("has no layer \"7\"") && e.contains("1 bbr"),
        "{e}"
    );
    let table = pool.ok(&["layer", "table", "disk"]);
    assert_eq!(
        table,
        "disk/0: 0 16384 test-dust 8 0 enabled\ndisk/1: 0 16384 bbr disk.spares 8\n"
    );

    let d = pool.serve();
    let e = pool.refused(&["layer", "message", "disk", "bbr", "frobnicate"]);
    assert!(e.contains("list-unreadable"), "{e}");
    let e = pool.refused(&[
        "layer",
        "message",
        "disk",
        "test-dust",
        "addbadblock",
        "99999",
    ]);
    assert!(e.contains("out of range"), "{e}");
    let e = pool.refused(&["layer", "message", "disk", "5", "status"]);
    assert!(e.contains("no layer"), "{e}");
    let e = pool.refused(&["layer", "add", "disk", "test-zero"]);
    assert!(e.contains("a daemon is serving this pool"), "{e}");
    message(&pool, "disk", "test-dust", "addbadblock 3 1");
    qemu_io(&pool.uri("disk"), &["write -P 0x71 12k 4k"]);
    assert_eq!(
        u64_of(&detail(&pool, "disk", "bbr"), "relocations"),
        1,
        "the write was relocated"
    );
    d.stop_ok();

    let e = pool.refused(&["layer", "remove", "disk", "bbr"]);
    assert!(
        e.contains("1 relocated chunks") && e.contains("--force"),
        "{e}"
    );
    assert!(pool.path("disk.spares").exists());
    let out = pool.run(&["layer", "remove", "disk", "bbr", "--force"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("forgotten"),
        "{}",
        text(&out.stderr)
    );
    assert!(!pool.path("disk.spares").exists());
    assert!(!pool.path("disk.spares.unreadable").exists());
    assert_eq!(
        pool.ok(&["layer", "table", "disk"]),
        "disk/0: 0 16384 test-dust 8 0 enabled\n"
    );
}

#[test]
fn a_bbr_made_again_after_a_crashed_removal_inherits_no_unreadable_sector() {
    need_tools(&["qemu-io"]);
    let pool = Pool::new("layers-stale-list");
    dust_bbr_origin(&pool, "disk", "8M", "bbr 1M");
    let d = pool.serve();
    let disk = pool.uri("disk");
    qemu_io(&disk, &["write -P 0x21 0 64k"]);
    message(&pool, "disk", "test-dust", "addbadblock 2");
    qemu_io_eio(&disk, "read 8k 4k");
    assert_eq!(message(&pool, "disk", "bbr", "list-unreadable"), "16 8");
    d.stop_ok();
    // The removal commits, then the process dies before it deletes the list.
    let out = pool
        .cmd()
        .env("COWSNAP_CRASH_AT", "remove-layer:committed")
        .args(["layer", "remove", "disk", "bbr", "--force"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "the crash point was not reached");
    pool.ok(&["layer", "add", "disk", "bbr 1M"]);
    let d = pool.serve();
    // A new layer over a device that reads: nothing was lost.
    assert_eq!(message(&pool, "disk", "bbr", "list-unreadable"), "");
    qemu_io(&disk, &["read -P 0x21 0 64k"]);
    d.stop_ok();
}

#[test]
fn layers_make_the_manifest_version_4_and_their_removal_brings_back_2() {
    let pool = Pool::new("layers-manifest");
    pool.ok(&["origin", "create", "plain", "--size", "8M"]);
    assert_eq!(manifest_version(&pool), 2);
    pool.ok(&[
        "origin",
        "create",
        "disk",
        "--size",
        "8M",
        "--layer",
        "test-delay 0",
        "--layer",
        "bbr 1M",
    ]);
    assert_eq!(manifest_version(&pool), 4);
    snapshot_on_layer(&pool, "s", "plain", "1M", "test-delay 0");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pool.path("pool.json")).unwrap()).unwrap();
    assert_eq!(m["origins"][1]["layers"][1]["target"], "bbr", "{m}");
    assert_eq!(
        m["snapshots"][0]["cow_layers"][0]["target"], "test-delay",
        "{m}"
    );
    // A bbr that relocated nothing goes without --force, with its spare file.
    pool.ok(&["layer", "remove", "disk", "bbr"]);
    assert!(!pool.path("disk.spares").exists());
    pool.ok(&["layer", "remove", "disk", "test-delay"]);
    assert_eq!(manifest_version(&pool), 4, "the snapshot's COW has a layer");
    pool.ok(&["layer", "remove", "s", "0"]);
    assert_eq!(manifest_version(&pool), 2);
    assert_eq!(pool.ok(&["layer", "table"]), "");
    pool.ok(&["layer", "add", "s", "test-zero"]);
    assert_eq!(manifest_version(&pool), 4);
    pool.ok(&["layer", "remove", "s", "test-zero"]);
    assert_eq!(manifest_version(&pool), 2);
}

/// A copy tool trusts block status: a chunk relocated off a hole of the origin's file must
/// not be reported as a hole (the file's holes are not the volume's under layers), or
/// `qemu-img convert` copies zeros in its place. Likewise a `linear` origin's holes are
/// not its file's at the same offsets.
#[test]
fn block_status_of_an_origin_on_layers_is_the_volumes_not_its_files() {
    need_tools(&["qemu-io", "qemu-img"]);
    let pool = Pool::new("layers-holes");
    dust_bbr_origin(&pool, "disk", "8M", "bbr 1M");
    pool.ok(&[
        "origin",
        "create",
        "lin",
        "--size",
        "8M",
        "--layer",
        "linear 2048 4096",
    ]);
    let d = pool.serve();
    let disk = pool.uri("disk");
    // Block 5 fails its first write: the data goes to a spare, the file keeps its hole.
    message(&pool, "disk", "test-dust", "addbadblock 5 1");
    qemu_io(&disk, &["write -P 0x5a 20k 4k"]);
    assert_eq!(u64_of(&detail(&pool, "disk", "bbr"), "relocations"), 1);
    let file = std::fs::read(pool.path("disk.img")).unwrap();
    assert!(
        file[20 << 10..24 << 10].iter().all(|&b| b == 0),
        "the file has no data there"
    );
    let copy = pool.dir.with_extension("disk-copy.img");
    image_of(&disk, &copy);
    let got = std::fs::read(&copy).unwrap();
    assert!(
        got[20 << 10..24 << 10].iter().all(|&b| b == 0x5a),
        "the relocated chunk was copied as a hole"
    );
    // `lin` is sectors 2048.. of its file: data at its offset 0 is at 1 MiB in the file,
    // where the file's first MiB (a hole) says nothing.
    let lin = pool.uri("lin");
    qemu_io(&lin, &["write -P 0x6b 0 64k"]);
    let copy = pool.dir.with_extension("lin-copy.img");
    image_of(&lin, &copy);
    let got = std::fs::read(&copy).unwrap();
    assert!(
        got[..64 << 10].iter().all(|&b| b == 0x6b),
        "linear data copied as a hole"
    );
    d.stop_ok();
}

/// The files a process has open (the targets of its `/proc/PID/fd` links).
fn open_files(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .map(|p| p.display().to_string())
        .collect()
}

/// A snapshot on COW layers, removed live, lets go of its COW file at once (its space is
/// freed, and nothing holds its lock), as a snapshot without layers does.
#[test]
fn a_removed_snapshot_on_layers_closes_its_cow() {
    need_tools(&["qemu-io"]);
    let pool = Pool::new("layers-close");
    pool.ok(&["origin", "create", "o", "--size", "8M"]);
    let d = pool.serve();
    snapshot_on_layer(&pool, "s", "o", "4M", "test-delay 0");
    qemu_io(&pool.uri("o"), &["write -P 0x12 0 1M"]);
    let cow = std::fs::canonicalize(pool.path("s.cow"))
        .unwrap()
        .display()
        .to_string();
    assert!(
        open_files(d.pid()).iter().any(|f| f.starts_with(&cow)),
        "the daemon holds the COW while the snapshot lives"
    );
    pool.ok(&["snapshot", "remove", "s"]);
    let held: Vec<String> = open_files(d.pid())
        .into_iter()
        .filter(|f| f.contains("s.cow"))
        .collect();
    assert!(held.is_empty(), "the removed COW is still open: {held:?}");
    d.stop_ok();
}

/// A spare file is one of the pool's files (no volume may adopt it); a snapshot's COW
/// layers show offline too; a bbr layer whose spare file is broken is removable, but only
/// with --force (it may have held relocations).
#[test]
fn spare_files_are_the_pools_and_a_broken_bbr_is_removable_with_force() {
    let pool = Pool::new("layers-spares");
    dust_bbr_origin(&pool, "o", "8M", "bbr 1M");
    let spares = pool.path("o.spares");
    let e = pool.refused(&["origin", "add", "x", "--path", spares.to_str().unwrap()]);
    assert!(
        e.contains("pool's own files") || e.contains("already used"),
        "{e}"
    );
    snapshot_on_layer(&pool, "s", "o", "2M", "test-delay 0");
    let table = pool.ok(&["layer", "table", "s"]);
    assert!(table.contains("s/0: 0 4096 test-delay"), "{table}");
    assert!(pool.ok(&["list"]).contains("[on test-delay]"));
    // The spare file loses its table: the layer cannot tell what it relocated.
    std::fs::write(&spares, vec![0xffu8; 4096]).unwrap();
    let e = pool.refused(&["layer", "remove", "o", "bbr"]);
    assert!(e.contains("--force"), "{e}");
    let out = pool.ok(&["layer", "remove", "o", "bbr", "--force"]);
    assert!(out.contains("removed layer"), "{out}");
    assert!(!spares.exists());
}
