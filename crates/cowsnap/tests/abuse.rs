//! Thousands of NBD connections against the real daemon: the extra ones are refused at
//! once, its threads and memory stay bounded, and it keeps answering commands and clients.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{need_tools, proc_field, Pool};

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

#[test]
fn two_thousand_connections_leave_the_daemon_bounded_and_responsive() {
    need_tools(&["nbdinfo", "python3-nbd"]);
    let pool = Pool::new("flood");
    pool.ok(&["origin", "create", "o", "--size", "16M"]);
    let daemon = pool.serve_with(&["--max-connections", "64"], &[]);
    let pid = daemon.pid();
    let threads0 = proc_field(pid, "Threads:");
    let rss0 = proc_field(pid, "VmRSS:");

    let script = pool.path("flood.py");
    std::fs::write(&script, FLOOD).unwrap();
    let mut flood = Command::new("/usr/bin/python3")
        .args([
            script.to_str().unwrap(),
            pool.path("nbd.sock").to_str().unwrap(),
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
    pool.ok(&["list"]);
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
            .arg(pool.uri("o"))
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
    daemon.stop_ok();
}
