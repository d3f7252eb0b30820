//! The pool's lock, as a user meets it: commands at once take turns instead of failing,
//! the holder is always named (never an empty pid), a daemon starts while a monitoring
//! loop reads the pool, and a second daemon is still refused at once.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{need_tools, Pool};

#[test]
fn commands_at_once_take_turns() {
    let pool = Pool::new("lock-turns");
    pool.ok(&["origin", "create", "o", "--size", "4M"]);
    let children: Vec<_> = (0..8)
        .map(|i| {
            let mut c = pool.cmd();
            c.args(if i % 2 == 0 {
                ["list", "--json"]
            } else {
                ["status", "--json"]
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_held_pool_names_its_holder_and_a_command_waits_for_its_timeout() {
    need_tools(&["flock"]);
    let pool = Pool::new("lock-holder");
    let lock = pool.dir.join("daemon.lock");
    std::fs::write(&lock, b"").unwrap();
    // Another program holds the lock (and wrote no pid).
    // Its own process group: `flock` and the `sleep` it runs (which inherits the lock)
    // are killed together.
    let mut holder = Command::new("flock")
        .arg(&lock)
        .args(["sleep", "30"])
        .process_group(0)
        .spawn()
        .unwrap();
    common::wait_for("flock to hold the lock", || {
        std::fs::read_dir(format!("/proc/{}/task", holder.id())).is_ok()
            && pool
                .cmd()
                .args(["--timeout=0", "list"])
                .output()
                .is_ok_and(|o| !o.status.success())
    });
    let start = Instant::now();
    let out = pool.cmd().args(["--timeout=2", "list"]).output().unwrap();
    let took = start.elapsed();
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", holder.id())])
        .status();
    let _ = holder.wait();
    assert!(!out.status.success());
    assert!(took >= Duration::from_secs(2), "it did not wait: {took:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("waiting up to 2 s"), "{err}");
    assert!(
        err.contains("in use by another cowsnap process (pid ") && !err.contains("(pid )"),
        "{err}"
    );
    assert!(
        err.contains("flock") || err.contains("sleep"),
        "the holder is named: {err}"
    );
    // Released: the next command goes through.
    pool.ok(&["list"]);
}

#[test]
fn a_daemon_starts_while_a_monitoring_loop_reads_the_pool_and_a_second_one_is_refused() {
    let pool = Pool::new("lock-monitor");
    pool.ok(&["origin", "create", "o", "--size", "4M"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let monitor = {
        let stop = stop.clone();
        let mut cmd = pool.cmd();
        cmd.args(["status"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = cmd.status();
                runs += 1;
            }
            runs
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let d = pool.serve();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(monitor.join().unwrap() > 0);
    let start = Instant::now();
    let second = pool.run(&["serve"]);
    assert!(!second.status.success());
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "a second daemon waited"
    );
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("in use by another cowsnap process (pid "),
        "{err}"
    );
    d.stop_ok();
}
