//! Merge driven through the real daemon with real NBD clients: `snapshot merge` rolls the
//! origin back while `qemu-io` writes through it and another snapshot stays exact; a
//! paused merge already shows the snapshot; a merge of an origin in use is deferred to
//! the next start; and a merge killed with SIGKILL again and again resumes at every
//! restart and ends with the snapshot's content plus every flushed write made through it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

use common::{has_volume, identical, image_of, qemu_io, require_tools, run, seed, wait_for, Pool};
use cowsnap_core::testkit::SplitMix;

fn volumes(pool: &Pool) -> serde_json::Value {
    serde_json::from_str(&pool.ok(&["list", "--json"])).unwrap()
}

/// What a merging origin and its merging snapshot refuse.
fn refusals_while_merging(pool: &Pool) {
    for (args, why) in [
        (
            &[
                "snapshot",
                "create",
                "c",
                "--origin",
                "disk",
                "--cow-size",
                "8M",
            ][..],
            "merging snapshot",
        ),
        (&["snapshot", "remove", "a"][..], "is merging"),
        (&["snapshot", "merge", "b"][..], "already merging"),
    ] {
        let e = pool.refused(args);
        assert!(e.contains(why), "{args:?}: {e}");
    }
}

/// The `nbdinfo --map` line of the extent holding byte `at` of `uri`.
fn extent_at(uri: &str, at: u64) -> String {
    let out = run(Command::new("nbdinfo").args(["--map", uri]));
    let map = String::from_utf8_lossy(&out.stdout).into_owned();
    map.lines()
        .find(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .take(2)
                .filter_map(|x| x.parse().ok())
                .collect();
            f.len() == 2 && f[0] <= at && at < f[0] + f[1]
        })
        .unwrap_or_else(|| panic!("no extent at {at} in {map}"))
        .to_string()
}

#[test]
fn a_live_merge_rolls_the_origin_back_and_keeps_another_snapshot_exact() {
    if !require_tools(&["qemu-io", "qemu-img", "nbdinfo"]) {
        return;
    }
    let pool = Pool::new("merge-live");
    pool.ok(&["origin", "create", "disk", "--size", "32M"]);
    let d = pool.serve();
    let disk = pool.uri("disk");
    qemu_io(&disk, &["write -P 0xaa 0 8M"]);
    pool.ok(&[
        "snapshot",
        "create",
        "a",
        "--origin",
        "disk",
        "--cow-size",
        "16M",
    ]);
    qemu_io(&disk, &["write -P 0xbb 1M 6M", "write -P 0x11 20M 2M"]);
    // One snapshot write where the origin's file has a hole.
    qemu_io(
        &pool.uri("a"),
        &["write -P 0xcc 2M 1M", "write -P 0xc4 24M 1M"],
    );
    pool.ok(&[
        "snapshot",
        "create",
        "b",
        "--origin",
        "disk",
        "--cow-size",
        "16M",
        "--chunk-size",
        "16K",
    ]);
    qemu_io(&disk, &["write -P 0xdd 0 4M"]);
    let (a_img, b_img) = (
        pool.dir.with_extension("a.img"),
        pool.dir.with_extension("b.img"),
    );
    image_of(&pool.uri("a"), &a_img);
    image_of(&pool.uri("b"), &b_img);

    // Paused: the origin shows the snapshot at once; nothing else may touch it.
    let out = pool.ok(&["snapshot", "merge", "a", "--paused"]);
    assert!(out.contains("merging snapshot a into disk"), "{out}");
    assert!(identical(a_img.to_str().unwrap(), &disk));
    // Block status follows the view, not the origin file's holes.
    let extent = extent_at(&disk, 24 << 20);
    assert!(
        !extent.contains("zero"),
        "24M reads the snapshot's data: {extent}"
    );
    let status = pool.ok(&["status", "a"]);
    assert!(status.starts_with("a: 0 65536 snapshot-merge "), "{status}");
    assert!(status.contains("merge paused 0.0%"), "{status}");
    refusals_while_merging(&pool);
    let m: serde_json::Value =
        serde_json::from_str(&pool.ok(&["merge", "status", "a", "--json"])).unwrap();
    assert_eq!(m["state"], "paused");
    assert!(m["remaining"].as_u64().unwrap() > 1000, "{m}");

    // Writes through the origin while it merges: the result is the snapshot plus them.
    pool.ok(&["merge", "rate", "a", "4M"]);
    pool.ok(&["merge", "resume", "a"]);
    qemu_io(
        &disk,
        &["write -P 0xee 3M 64k", "write -P 0xef 30M 1M", "flush"],
    );
    qemu_io(
        a_img.to_str().unwrap(),
        &["write -P 0xee 3M 64k", "write -P 0xef 30M 1M"],
    );
    pool.ok(&["merge", "rate", "a", "none"]);
    wait_for("the merge to finish", || !has_volume(&pool, "a"));
    assert!(
        identical(a_img.to_str().unwrap(), &disk),
        "origin != snapshot + writes"
    );
    assert!(
        identical(b_img.to_str().unwrap(), &pool.uri("b")),
        "snapshot b moved"
    );
    assert!(!pool.path("a.cow").exists(), "the merged COW is deleted");
    let origin = &volumes(&pool)[0];
    assert!(origin.get("merge").is_none(), "{origin}");
    // The merged origin writes normally, still copying out to b.
    qemu_io(&disk, &["write -P 0x99 0 1M"]);
    assert!(identical(b_img.to_str().unwrap(), &pool.uri("b")));
    let (st, out) = d.stop();
    assert!(st.success(), "{out:?}");
    assert!(
        out.iter()
            .any(|l| l.contains("snapshot a is merged into origin disk and removed")),
        "{out:?}"
    );
}

/// A libnbd client connected to `uri`, idle, until killed.
fn hold_open(uri: &str) -> std::process::Child {
    let mut holder = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import nbd,sys,time\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\nprint('connected',flush=True)\ntime.sleep(60)",
            uri,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "connected");
    holder
}

#[test]
fn a_deferred_merge_whose_snapshot_became_invalid_is_dropped_and_the_origin_served() {
    if !require_tools(&["qemu-io", "python3-nbd"]) {
        return;
    }
    let pool = Pool::new("merge-deferred-invalid");
    pool.ok(&["origin", "create", "disk", "--size", "16M"]);
    let d = pool.serve();
    pool.ok(&[
        "snapshot",
        "create",
        "s",
        "--origin",
        "disk",
        "--cow-size",
        "1M",
    ]);
    let mut holder = hold_open(&pool.uri("disk"));
    pool.ok(&["snapshot", "merge", "s"]);
    let _ = holder.kill();
    let _ = holder.wait();
    // More copy-outs than the COW holds: the snapshot becomes invalid before its merge.
    qemu_io(&pool.uri("disk"), &["write -P 0x31 0 4M"]);
    assert!(pool.ok(&["status", "s"]).contains("Invalid"));
    d.stop_ok();
    let d = pool.serve();
    assert!(
        d.output()
            .iter()
            .any(|l| l.contains("the request is dropped")),
        "{:?}",
        d.output()
    );
    // Nothing was merged: the origin is served, writable, with its own data.
    qemu_io(
        &pool.uri("disk"),
        &["write -P 0x32 8M 1M", "read -P 0x31 0 4M"],
    );
    let v = volumes(&pool);
    let s = v
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "s")
        .unwrap();
    assert_eq!(s["status"], "Invalid");
    assert!(s.get("merge").is_none(), "{s}");
    d.stop_ok();
}

#[test]
fn a_merge_of_an_origin_in_use_waits_for_the_next_start_unless_forced() {
    if !require_tools(&["qemu-io", "qemu-img"]) {
        return;
    }
    let pool = Pool::new("merge-deferred");
    pool.ok(&["origin", "create", "disk", "--size", "8M"]);
    let d = pool.serve();
    qemu_io(&pool.uri("disk"), &["write -P 0x01 0 8M"]);
    pool.ok(&[
        "snapshot",
        "create",
        "s",
        "--origin",
        "disk",
        "--cow-size",
        "8M",
    ]);
    qemu_io(&pool.uri("disk"), &["write -P 0x02 1M 2M"]);
    let s_img = pool.dir.with_extension("s.img");
    image_of(&pool.uri("s"), &s_img);
    // A client holding the origin open (libnbd, connected, idle).
    let mut holder = hold_open(&pool.uri("disk"));
    let out = pool.run(&["snapshot", "merge", "s"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("in use") && stderr.contains("--now"),
        "{stderr}"
    );
    assert!(stdout.contains("deferred"), "{stdout}");
    let m: serde_json::Value =
        serde_json::from_str(&pool.ok(&["merge", "status", "s", "--json"])).unwrap();
    assert_eq!(m["state"], "next_activation");
    // Still served as before: the origin holds its own data.
    assert!(!identical(s_img.to_str().unwrap(), &pool.uri("disk")));
    let _ = holder.kill();
    let _ = holder.wait();
    d.stop_ok();
    // The next start merges.
    let d = pool.serve();
    wait_for("the deferred merge to finish", || !has_volume(&pool, "s"));
    assert!(identical(s_img.to_str().unwrap(), &pool.uri("disk")));
    d.stop_ok();
}

#[test]
fn a_merge_killed_again_and_again_resumes_and_loses_no_flushed_write() {
    if !require_tools(&["qemu-io", "qemu-img", "fio"]) {
        return;
    }
    let seed = seed();
    let mut rng = SplitMix(seed);
    eprintln!("TEST: seed {seed} (rerun with COWSNAP_SEED={seed})");
    let pool = Pool::new("merge-kill");
    pool.ok(&["origin", "create", "disk", "--size", "64M"]);
    let d = pool.serve();
    let disk = pool.uri("disk");
    qemu_io(&disk, &["write -P 0x5a 0 64M"]);
    pool.ok(&[
        "snapshot",
        "create",
        "s",
        "--origin",
        "disk",
        "--cow-size",
        "48M",
    ]);
    // Scattered 4 KiB copy-outs: thousands of entries over several metadata areas.
    for i in 0..6u64 {
        let off = rng.below(60 << 20) & !4095;
        qemu_io(&disk, &[&format!("write -P 0x{:02x} {off} 1M", 0x60 + i)]);
    }
    run(Command::new("fio").args([
        "--name=scatter",
        "--ioengine=nbd",
        &format!("--uri={disk}"),
        "--rw=randwrite",
        "--bs=4k",
        "--size=64M",
        "--io_size=24M",
        &format!("--randseed={}", seed % 1_000_000),
        "--output=/dev/null",
    ]));
    qemu_io(&pool.uri("s"), &["write -P 0x77 10M 2M"]);
    let want = pool.dir.with_extension("want.img");
    image_of(&pool.uri("s"), &want);
    let want = want.to_str().unwrap().to_string();

    pool.ok(&["snapshot", "merge", "s", "--rate", "2M"]);
    let mut d = Some(d);
    for round in 0..5u64 {
        // A flushed write through the merging origin, then a kill at a random moment.
        let off = rng.below(63 << 20) & !4095;
        let cmd = format!("write -P 0x{:02x} {off} 512k", 0x80 + round);
        qemu_io(&disk, &[&cmd, "flush"]);
        qemu_io(&want, &[&cmd]);
        std::thread::sleep(Duration::from_millis(200 + rng.below(600)));
        let daemon = d.take().unwrap();
        run(Command::new("kill").args(["-KILL", &daemon.pid().to_string()]));
        daemon.wait_crash();
        d = Some(pool.serve());
        assert!(
            has_volume(&pool, "s"),
            "round {round}: the merge was not that fast"
        );
        let m: serde_json::Value =
            serde_json::from_str(&pool.ok(&["merge", "status", "s", "--json"])).unwrap();
        assert_eq!(m["state"], "running", "round {round}: {m}");
        assert!(
            identical(&want, &disk),
            "round {round}: the origin is not the snapshot plus the flushed writes"
        );
    }
    pool.ok(&["merge", "rate", "s", "0"]);
    wait_for("the merge to finish", || !has_volume(&pool, "s"));
    assert!(identical(&want, &disk), "after the merge");
    d.take().unwrap().stop_ok();
}

#[test]
fn a_merge_of_an_origin_open_through_fuse_is_deferred_unless_forced() {
    if !require_tools(&["qemu-io", "qemu-img", "fusermount3"]) {
        return;
    }
    if !Path::new("/dev/fuse").exists() {
        assert!(!common::ci(), "/dev/fuse missing under CI");
        eprintln!("SKIP: no /dev/fuse");
        return;
    }
    let pool = Pool::new("merge-fuse");
    pool.ok(&["origin", "create", "disk", "--size", "8M"]);
    let files = pool.dir.with_extension("files");
    std::fs::create_dir_all(&files).unwrap();
    let d = pool.serve_with(&["--fuse", files.to_str().unwrap()], &[]);
    pool.ok(&[
        "snapshot",
        "create",
        "s",
        "--origin",
        "disk",
        "--cow-size",
        "8M",
    ]);
    qemu_io(&pool.uri("disk"), &["write -P 0x42 0 1M"]);
    let s_img = pool.dir.with_extension("s.img");
    image_of(&pool.uri("s"), &s_img);
    let open = std::fs::File::open(files.join("disk")).unwrap();
    let out = pool.run(&["snapshot", "merge", "s"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("through FUSE"), "{stderr}");
    drop(open);
    let m: serde_json::Value =
        serde_json::from_str(&pool.ok(&["merge", "status", "s", "--json"])).unwrap();
    assert_eq!(m["state"], "next_activation");
    // The user insists: the deferred merge runs now, and readers of the file see the
    // snapshot's content.
    pool.ok(&["snapshot", "merge", "s", "--now", "--wait"]);
    assert!(!has_volume(&pool, "s"));
    assert!(identical(
        s_img.to_str().unwrap(),
        files.join("disk").to_str().unwrap()
    ));
    // A deferred merge also starts by itself at the next start.
    pool.ok(&[
        "snapshot",
        "create",
        "t",
        "--origin",
        "disk",
        "--cow-size",
        "8M",
    ]);
    qemu_io(&pool.uri("disk"), &["write -P 0x43 2M 1M"]);
    image_of(&pool.uri("t"), &s_img);
    let open = std::fs::File::open(files.join("disk")).unwrap();
    pool.ok(&["snapshot", "merge", "t"]);
    drop(open);
    d.stop_ok();
    let d = pool.serve_with(&["--fuse", files.to_str().unwrap()], &[]);
    wait_for("the deferred merge to finish", || !has_volume(&pool, "t"));
    assert!(identical(
        s_img.to_str().unwrap(),
        files.join("disk").to_str().unwrap()
    ));
    d.stop_ok();
}

#[test]
fn removing_an_open_snapshot_or_a_started_merge_needs_force() {
    if !require_tools(&["qemu-io", "python3-nbd"]) {
        return;
    }
    let pool = Pool::new("remove-force");
    pool.ok(&["origin", "create", "disk", "--size", "8M"]);
    let d = pool.serve();
    pool.ok(&[
        "snapshot",
        "create",
        "s",
        "--origin",
        "disk",
        "--cow-size",
        "8M",
    ]);
    // A client reading the snapshot: removing it would fail the client's I/O.
    let mut holder = hold_open(&pool.uri("s"));
    let e = pool.refused(&["snapshot", "remove", "s"]);
    assert!(
        e.contains("in use") && e.contains("NBD connection") && e.contains("--force"),
        "{e}"
    );
    assert!(has_volume(&pool, "s"));
    pool.ok(&["snapshot", "remove", "s", "--force"]);
    assert!(!has_volume(&pool, "s"));
    let _ = holder.kill();
    let _ = holder.wait();
    // A merge that started, stopped with the daemon: removing its snapshot offline would
    // leave the origin half merged.
    pool.ok(&[
        "snapshot",
        "create",
        "t",
        "--origin",
        "disk",
        "--cow-size",
        "8M",
    ]);
    qemu_io(&pool.uri("disk"), &["write -P 0x51 0 2M"]);
    pool.ok(&["snapshot", "merge", "t", "--paused"]);
    d.stop_ok();
    let e = pool.refused(&["snapshot", "remove", "t"]);
    assert!(e.contains("half merged") && e.contains("--force"), "{e}");
    let out = pool.run(&["snapshot", "remove", "t", "--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("half merged"));
    assert!(!has_volume(&pool, "t"));
}
