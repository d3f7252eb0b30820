//! Crash tests of the control plane: the real daemon is stopped dead at every step of
//! snapshot create and remove (and offline origin create) while a writer runs, then
//! restarted, and the pool is checked exactly:
//!
//! * every origin write acknowledged (each is FUA) is on the origin;
//! * a snapshot that exists after the crash is valid and is exactly the origin at one point
//!   in the writer's sequence (a snapshot that existed before the operation: at its own
//!   point in time, all zeros here);
//! * a snapshot that does not exist left no file behind, and its name can be used again.
//!
//! The daemon aborts at a step when `COWSNAP_CRASH_AT` names it (see
//! `cowsnap_pool::CRASH_POINTS`); the random-kill test instead sends SIGKILL at a
//! random moment of a create/remove loop (it prints its seed; `COWSNAP_SEED` replays and
//! `COWSNAP_CRASH_TRIALS` sets the number of trials).

#![allow(
    clippy::cast_possible_truncation,
    clippy::too_many_lines,
    reason = "test sizes are small constants; a scenario test reads best top to bottom"
)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use common::{need_tools, seed, wait_for, Daemon, Pool};
use cowsnap_core::testkit::SplitMix;
use cowsnap_pool::CRASH_POINTS;
/// The origin: this many 4 KiB blocks.
const BLOCKS: u64 = 1024;
const BLOCK: usize = 4096;

/// The writer: FUA writes in sequence, block `seq * 7 % BLOCKS`, each block carrying its
/// sequence number; prints every acknowledged sequence number.
const WRITER: &str = r#"
import nbd, struct, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
blocks = int(sys.argv[2])
seq = 0
while True:
    buf = struct.pack('<Q', seq + 1) * 512
    try:
        h.pwrite(buf, (seq * 7 % blocks) * 4096, nbd.CMD_FLAG_FUA)
    except Exception as e:
        print('stopped', e, flush=True)
        break
    print(seq, flush=True)
    seq += 1
"#;

fn block_of(seq: u64) -> u64 {
    seq * 7 % BLOCKS
}

/// The value a block holds after write `seq` (0 means never written).
fn tag(block: &[u8]) -> u64 {
    u64::from_le_bytes(block[..8].try_into().unwrap())
}

/// A pool with the origin `o` the writer writes.
fn new_pool(tag: &str) -> Pool {
    let p = Pool::new(tag);
    p.ok(&[
        "origin",
        "create",
        "o",
        "--size",
        &format!("{}", BLOCKS * 4096),
    ]);
    p
}

/// `snapshot create NAME` of the origin with an 8 MiB COW; it must succeed.
fn create_snapshot(pool: &Pool, name: &str) {
    pool.ok(&[
        "snapshot",
        "create",
        name,
        "--origin",
        "o",
        "--cow-size",
        "8M",
    ]);
}

/// The pool's volumes as (name, status).
fn volumes(pool: &Pool) -> Vec<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(&pool.ok(&["list", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["name"].as_str().unwrap().to_string(),
                x["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Files of the volume `name` in the pool directory (final or staged names).
fn files_of(pool: &Pool, name: &str) -> Vec<String> {
    std::fs::read_dir(&pool.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| {
            f == &format!("{name}.cow")
                || f == &format!("{name}.img")
                || f.starts_with(&format!(".{name}."))
        })
        .collect()
}

/// A volume's whole content, read over NBD.
fn read(pool: &Pool, export: &str) -> Vec<u8> {
    let out = pool.dir.join(format!("dump-{export}.raw"));
    let st = Command::new("nbdcopy")
        .args([&pool.uri(export), out.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success(), "nbdcopy {export}");
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

/// Starts `cowsnap serve`, with `crash_at` in its environment; waits until it serves.
fn serve(pool: &Pool, crash_at: Option<&str>) -> Daemon {
    match crash_at {
        Some(at) => pool.serve_with(&[], &[("COWSNAP_CRASH_AT", at)]),
        None => pool.serve(),
    }
}

/// The writer, and the sequence numbers it saw acknowledged.
struct Writer {
    child: Child,
    acked: mpsc::Receiver<u64>,
    last: Option<u64>,
}

impl Writer {
    fn start(pool: &Pool) -> Writer {
        let script = pool.dir.join("writer.py");
        std::fs::write(&script, WRITER).unwrap();
        let mut child = Command::new("/usr/bin/python3")
            .args([
                script.to_str().unwrap(),
                &pool.uri("o"),
                &BLOCKS.to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 with the nbd module (python3-libnbd)");
        let out = child.stdout.take().unwrap();
        let (tx, acked) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(n) = line.parse::<u64>() {
                    let _ = tx.send(n);
                }
            }
        });
        Writer {
            child,
            acked,
            last: None,
        }
    }

    /// Waits until `n` more writes were acknowledged; returns the last one.
    fn wait_for(&mut self, n: u64) -> u64 {
        let goal = self.last.map_or(n - 1, |l| l + n);
        while self.last.is_none_or(|l| l < goal) {
            let seq = self
                .acked
                .recv_timeout(Duration::from_secs(30))
                .expect("the writer stalled");
            self.last = Some(seq);
        }
        goal
    }

    /// Stops it (if the daemon did not); returns the last acknowledged write.
    fn finish(mut self) -> Option<u64> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        while let Ok(seq) = self.acked.try_recv() {
            self.last = Some(seq);
        }
        self.last
    }
}

/// Checks the origin: every acknowledged write is there; a block may also hold the one
/// write in flight when the daemon died (`last + 1`).
fn check_origin(data: &[u8], last: u64) {
    let mut want = vec![0u64; BLOCKS as usize];
    for seq in 0..=last {
        want[block_of(seq) as usize] = seq + 1;
    }
    for (b, blk) in data.chunks(BLOCK).enumerate() {
        let got = tag(blk);
        let in_flight = block_of(last + 1) == b as u64 && got == last + 2;
        assert!(
            got == want[b] || in_flight,
            "origin block {b}: holds write {got}, acknowledged write {} lost",
            want[b]
        );
    }
}

/// Checks that a snapshot is the origin at one point of the write sequence, at or after
/// write `at_least` and no later than `at_most`; returns that point.
fn check_point_in_time(data: &[u8], at_least: Option<u64>, at_most: u64) -> u64 {
    let tags: Vec<u64> = data.chunks(BLOCK).map(tag).collect();
    let k = tags.iter().copied().max().unwrap_or(0);
    let mut want = vec![0u64; BLOCKS as usize];
    for seq in 0..k {
        want[block_of(seq) as usize] = seq + 1;
    }
    assert_eq!(
        tags, want,
        "the snapshot is not one point in time (latest write {k})"
    );
    if let Some(min) = at_least {
        assert!(
            k > min,
            "the snapshot misses write {min}, acknowledged before it was asked for"
        );
    }
    assert!(
        k <= at_most + 2,
        "the snapshot holds write {k}, after the daemon died"
    );
    k
}

fn need_client_tools() {
    need_tools(&["nbdcopy", "python3-nbd"]);
}

/// One live snapshot operation killed at `point`, with the writer running.
fn live_crash(point: &str) {
    let pool = new_pool("live");
    let removing = point.starts_with("remove-snapshot");
    if removing {
        // Made offline: its point in time is the zeroed origin.
        create_snapshot(&pool, "s");
    }
    let daemon = serve(&pool, Some(point));
    let mut writer = Writer::start(&pool);
    let before = writer.wait_for(100);
    let op: Vec<&str> = if removing {
        vec!["snapshot", "remove", "s"]
    } else {
        vec![
            "snapshot",
            "create",
            "s",
            "--origin",
            "o",
            "--cow-size",
            "8M",
        ]
    };
    let out = pool.cmd().args(&op).output().unwrap();
    assert!(
        !out.status.success(),
        "{point}: the command succeeded though the daemon died"
    );
    daemon.wait_crash();
    let last = writer.finish().unwrap();

    let daemon = serve(&pool, None);
    check_origin(&read(&pool, "o"), last);
    let vols = volumes(&pool);
    match vols.iter().find(|(n, _)| n == "s") {
        Some((_, status)) => {
            assert!(status.contains('/'), "{point}: snapshot s is {status}");
            let data = read(&pool, "s");
            if removing {
                assert!(
                    data.iter().all(|&b| b == 0),
                    "{point}: the snapshot missed copy-outs"
                );
            } else {
                check_point_in_time(&data, Some(before), last);
            }
            assert_eq!(files_of(&pool, "s"), vec!["s.cow".to_string()], "{point}");
        }
        None => {
            assert!(
                files_of(&pool, "s").is_empty(),
                "{point}: left {:?}",
                files_of(&pool, "s")
            );
            create_snapshot(&pool, "s");
        }
    }
    // A create exists after the crash once its manifest commit was reached; every step
    // of a removal comes after its first commit (the mark), so the removal is finished.
    let exists = vols.iter().any(|(n, _)| n == "s");
    let committed = ["create-snapshot:committed", "create-snapshot:published"].contains(&point);
    assert_eq!(exists, !removing && committed, "{point}: {vols:?}");
    daemon.stop_ok();
}

#[test]
fn a_live_create_or_remove_killed_at_any_step_loses_nothing() {
    need_client_tools();
    let points: Vec<&str> = CRASH_POINTS
        .iter()
        .copied()
        .filter(|p| p.starts_with("create-snapshot") || p.starts_with("remove-snapshot"))
        .collect();
    assert!(points.len() >= 10, "{points:?}");
    for p in points {
        eprintln!("crash point {p}");
        live_crash(p);
    }
}

/// A live `--format` adoption of a zeroed file outside the pool killed at `point`: after
/// the restart the snapshot exists (and is one point in time) or the file holds no valid
/// COW header.
fn adopt_crash(point: &str) {
    let pool = new_pool("adopt");
    let ext = pool.dir.with_extension("ext.cow");
    std::fs::File::create(&ext)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let ext_s = ext.to_str().unwrap();
    let daemon = serve(&pool, Some(point));
    let mut writer = Writer::start(&pool);
    let before = writer.wait_for(100);
    let op = [
        "snapshot", "create", "s", "--origin", "o", "--cow", ext_s, "--format",
    ];
    let out = pool.cmd().args(op).output().unwrap();
    assert!(
        !out.status.success(),
        "{point}: the command succeeded though the daemon died"
    );
    daemon.wait_crash();
    let last = writer.finish().unwrap();

    let daemon = serve(&pool, None);
    check_origin(&read(&pool, "o"), last);
    let vols = volumes(&pool);
    let header = std::fs::read(&ext).unwrap();
    let valid_cow = &header[..4] == b"SnAp" && header[4] != 0;
    match vols.iter().find(|(n, _)| n == "s") {
        Some((_, status)) => {
            assert!(status.contains('/'), "{point}: snapshot s is {status}");
            check_point_in_time(&read(&pool, "s"), Some(before), last);
            assert!(valid_cow, "{point}");
        }
        None => assert!(
            !valid_cow,
            "{point}: a valid COW header was left outside the pool"
        ),
    }
    let committed = ["create-snapshot:committed", "create-snapshot:published"].contains(&point);
    assert_eq!(
        vols.iter().any(|(n, _)| n == "s"),
        committed,
        "{point}: {vols:?}"
    );
    daemon.stop_ok();
    let _ = std::fs::remove_file(&ext);
}

#[test]
fn a_live_format_adoption_killed_at_any_step_leaves_no_valid_cow_outside_the_pool() {
    need_client_tools();
    let points = [
        "adopt-format:guarded",
        "create-snapshot:loaded",
        "create-snapshot:activated",
        "create-snapshot:committed",
        "create-snapshot:published",
    ];
    for p in points {
        assert!(CRASH_POINTS.contains(&p), "{p}");
        eprintln!("crash point {p}");
        adopt_crash(p);
    }
}

#[test]
fn a_removal_finished_at_start_and_killed_at_any_step_is_finished_at_the_next() {
    // The removal that the next start finishes goes through the same steps; a crash in
    // any of them leaves it to the start after.
    let steps: Vec<&str> = CRASH_POINTS
        .iter()
        .copied()
        .filter(|p| p.starts_with("remove-snapshot") && *p != "remove-snapshot:marked")
        .filter(|p| *p != "remove-snapshot:deactivated")
        .collect();
    for point in steps {
        let pool = new_pool("recover");
        create_snapshot(&pool, "s");
        // Leave the removal marked, then crash the start that finishes it.
        let out = pool
            .cmd()
            .env("COWSNAP_CRASH_AT", "remove-snapshot:marked")
            .args(["snapshot", "remove", "s"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let out = pool
            .cmd()
            .env("COWSNAP_CRASH_AT", point)
            .args(["list"])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{point}: the finishing start did not reach it"
        );
        let vols = volumes(&pool);
        assert!(!vols.iter().any(|(n, _)| n == "s"), "{point}: {vols:?}");
        assert!(
            files_of(&pool, "s").is_empty(),
            "{point}: left {:?}",
            files_of(&pool, "s")
        );
        create_snapshot(&pool, "s");
    }
}

#[test]
fn an_offline_origin_create_killed_at_any_step_leaves_the_name_usable() {
    for point in CRASH_POINTS
        .iter()
        .filter(|p| p.starts_with("create-origin"))
    {
        let pool = new_pool("origin");
        let out = pool
            .cmd()
            .env("COWSNAP_CRASH_AT", point)
            .args(["origin", "create", "n", "--size", "1M"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{point}: did not crash");
        let vols = volumes(&pool);
        if vols.iter().any(|(n, _)| n == "n") {
            assert_eq!(files_of(&pool, "n"), vec!["n.img".to_string()], "{point}");
        } else {
            assert!(
                files_of(&pool, "n").is_empty(),
                "{point}: {:?}",
                files_of(&pool, "n")
            );
            pool.ok(&["origin", "create", "n", "--size", "1M"]);
        }
        assert_eq!(
            vols.iter().any(|(n, _)| n == "n"),
            *point == "create-origin:committed",
            "{point}"
        );
    }
}

#[test]
fn sigkill_at_random_moments_of_a_create_remove_loop() {
    need_client_tools();
    let seed = seed();
    let trials: u64 = std::env::var("COWSNAP_CRASH_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    eprintln!("{trials} trials (COWSNAP_CRASH_TRIALS)");
    let mut rng = SplitMix(seed);
    for trial in 0..trials {
        let pool = new_pool("random");
        create_snapshot(&pool, "base");
        let daemon = serve(&pool, None);
        let mut writer = Writer::start(&pool);
        writer.wait_for(50);
        let pid = daemon.pid();
        let delay = Duration::from_millis(rng.below(1500));
        let killed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = killed.clone();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            flag.store(true, Ordering::SeqCst);
        });
        // Create and remove snapshots until the daemon dies (after that the commands
        // would act on the files offline).
        let mut i = 0;
        while !killed.load(Ordering::SeqCst) {
            let name = format!("t{}", i % 3);
            let created = pool
                .cmd()
                .args([
                    "snapshot",
                    "create",
                    &name,
                    "--origin",
                    "o",
                    "--cow-size",
                    "8M",
                ])
                .output()
                .unwrap()
                .status
                .success();
            if killed.load(Ordering::SeqCst) {
                break;
            }
            let removed = created
                && pool
                    .cmd()
                    .args(["snapshot", "remove", &name])
                    .output()
                    .unwrap()
                    .status
                    .success();
            if !removed {
                break;
            }
            i += 1;
        }
        killer.join().unwrap();
        daemon.wait_crash();
        let last = writer.finish().unwrap();
        let daemon = serve(&pool, None);
        check_origin(&read(&pool, "o"), last);
        let vols = volumes(&pool);
        for (name, status) in &vols {
            if name == "o" {
                continue;
            }
            assert!(
                status.contains('/'),
                "trial {trial} (seed {seed}): {name} is {status}"
            );
            let data = read(&pool, name);
            if name == "base" {
                assert!(
                    data.iter().all(|&b| b == 0),
                    "trial {trial} (seed {seed}): base changed"
                );
            } else {
                check_point_in_time(&data, None, last);
            }
        }
        for t in ["t0", "t1", "t2"] {
            if !vols.iter().any(|(n, _)| n == t) {
                assert!(
                    files_of(&pool, t).is_empty(),
                    "trial {trial} (seed {seed}): {t} left {:?}",
                    files_of(&pool, t)
                );
            }
        }
        daemon.stop_ok();
        eprintln!(
            "trial {trial}: {i} create/remove pairs before the kill; {} volumes after",
            vols.len()
        );
    }
}

/// A merge killed at each of its control-plane steps: recorded in the manifest, origin
/// switched, and each step of the removal that ends it. The next start finishes it: the
/// origin holds the snapshot's content and nothing of the snapshot is left.
#[test]
fn a_merge_killed_at_any_control_step_finishes_at_the_next_start() {
    need_tools(&["qemu-io", "nbdcopy", "python3-nbd"]);
    let points: Vec<&str> = CRASH_POINTS
        .iter()
        .copied()
        .filter(|p| p.starts_with("merge-snapshot") || p.starts_with("remove-snapshot"))
        .filter(|p| *p != "remove-snapshot:deactivated")
        .collect();
    assert!(points.len() >= 7, "{points:?}");
    for point in points {
        eprintln!("crash point {point}");
        let pool = new_pool("merge");
        create_snapshot(&pool, "s");
        let daemon = serve(&pool, Some(point));
        for (target, cmd) in [
            ("o", "write -P 0x11 0 256k"),
            ("s", "write -P 0x22 64k 64k"),
            ("o", "write -P 0x33 1M 128k"),
        ] {
            common::run(std::process::Command::new("qemu-io").args([
                "-f",
                "raw",
                "-c",
                cmd,
                &pool.uri(target),
            ]));
        }
        let want = read(&pool, "s");
        // Killed in the request (recorded, switched) or on the merger's thread when the
        // merge ends (the removal's steps): the command may or may not see its reply.
        let _ = pool.run(&["snapshot", "merge", "s", "--now"]);
        daemon.wait_crash();
        let daemon = serve(&pool, None);
        wait_for("the merge to finish after the restart", || {
            !volumes(&pool).iter().any(|(n, _)| n == "s")
        });
        assert!(
            read(&pool, "o") == want,
            "{point}: the origin is not the snapshot"
        );
        assert!(
            files_of(&pool, "s").is_empty(),
            "{point}: left {:?}",
            files_of(&pool, "s")
        );
        daemon.stop_ok();
    }
}

/// The spare files of origin `o`'s bbr layer: its final name, staged names and list.
fn spare_files(pool: &Pool) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(&pool.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.starts_with("o.spares") || f.starts_with(".o.spares"))
        .collect();
    v.sort();
    v
}

fn has_bbr(pool: &Pool) -> bool {
    pool.ok(&["layer", "table", "o"]).contains(" bbr ")
}

/// `layer add` and `layer remove` of a bbr layer (the steps that make or delete its spare
/// file and change the manifest), killed at each step: afterwards the stack either has
/// the layer with its spare file, or has neither, and the operation can be done again.
#[test]
fn a_layer_add_or_remove_killed_at_any_step_leaves_a_consistent_stack() {
    for point in CRASH_POINTS
        .iter()
        .filter(|p| p.ends_with("-layer:staged") || p.ends_with("-layer:committed"))
    {
        let pool = new_pool("layer");
        let adding = point.starts_with("add-layer");
        if !adding {
            pool.ok(&["layer", "add", "o", "bbr 1M"]);
        }
        let args: &[&str] = if adding {
            &["layer", "add", "o", "bbr 1M"]
        } else {
            &["layer", "remove", "o", "bbr"]
        };
        let out = pool
            .cmd()
            .env("COWSNAP_CRASH_AT", point)
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{point}: did not crash");
        // The next command opens the pool and settles its files.
        let present = has_bbr(&pool);
        let files = spare_files(&pool);
        if present {
            assert_eq!(files, vec!["o.spares".to_string()], "{point}");
            let daemon = pool.serve();
            let st = pool.ok(&["status", "o"]);
            assert!(
                st.contains("o/0: 0 ") && st.contains(" bbr "),
                "{point}: {st}"
            );
            daemon.stop_ok();
            pool.ok(&["layer", "remove", "o", "bbr"]);
        } else {
            assert!(files.is_empty(), "{point}: {files:?}");
            pool.ok(&["layer", "add", "o", "bbr 1M"]);
        }
        let committed = *point == "add-layer:committed";
        let removed = *point == "remove-layer:committed";
        assert_eq!(present, committed || (!adding && !removed), "{point}");
    }
}
