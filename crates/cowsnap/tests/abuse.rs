//! Thousands of NBD connections against the real daemon: the extra ones are refused at
//! once, its threads and memory stay bounded, and it keeps answering commands and clients.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cowsnap");

/// Opens N connections to a unix socket and holds them; prints how many the server
/// closed at once and how many it kept, then waits for a line on stdin.
const FLOOD: &str = r#"
import resource, socket, sys, time
path, n = sys.argv[1], int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, n + 64), max(hard, n + 64)))
held = []
for i in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    held.append(s)
time.sleep(1.0)
closed = kept = 0
for s in held:
    s.setblocking(False)
    try:
        d = s.recv(16)
        if d == b"":
            closed += 1
        else:
            kept += 1
    except BlockingIOError:
        kept += 1
print(closed, kept, flush=True)
sys.stdin.readline()
"#;

fn proc_field(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn two_thousand_connections_leave_the_daemon_bounded_and_responsive() {
    let dir: PathBuf = std::env::temp_dir().join(format!("csa-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cs = |args: &[&str]| {
        Command::new(BIN)
            .env("COWSNAP_POOL", &dir)
            .args(args)
            .output()
            .unwrap()
    };
    assert!(cs(&["init"]).status.success());
    assert!(cs(&["origin", "create", "o", "--size", "16M"])
        .status
        .success());
    let mut daemon = Command::new(BIN)
        .env("COWSNAP_POOL", &dir)
        .args(["serve", "--max-connections", "64"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = daemon.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.starts_with("cowsnap: serving") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("serve did not start");
    let pid = daemon.id();
    let threads0 = proc_field(pid, "Threads:");
    let rss0 = proc_field(pid, "VmRSS:");

    let script = dir.join("flood.py");
    std::fs::write(&script, FLOOD).unwrap();
    let mut flood = Command::new("/usr/bin/python3")
        .args([
            script.to_str().unwrap(),
            dir.join("nbd.sock").to_str().unwrap(),
            "2000",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3");
    let mut line = String::new();
    BufReader::new(flood.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let counts: Vec<u64> = line
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(
        counts,
        vec![2000 - 64, 64],
        "closed at once, kept (limit 64)"
    );

    // Held: 64 connections in the handshake, one thread each, and little memory.
    let threads = proc_field(pid, "Threads:");
    let rss = proc_field(pid, "VmRSS:");
    assert!(
        threads <= threads0 + 64 + 2,
        "{threads0} -> {threads} threads"
    );
    assert!(rss < rss0 + 64 * 1024, "VmRSS {rss0} -> {rss} kB");
    // Commands still answer at once.
    let t = Instant::now();
    assert!(cs(&["list"]).status.success());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "list took {:?}",
        t.elapsed()
    );

    // The flood goes away: a real client is served again.
    writeln!(flood.stdin.take().unwrap()).unwrap();
    flood.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = Command::new("nbdinfo")
            .arg(format!(
                "nbd+unix:///o?socket={}",
                dir.join("nbd.sock").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("nbdinfo (libnbd-bin)")
            .success();
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nbdinfo is still refused after the flood"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    assert!(daemon.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}
