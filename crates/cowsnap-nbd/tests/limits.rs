//! Connection limits: many idle sockets cost a bounded number of threads, connections
//! beyond `max_connections` are closed at once with one rate-limited log line, workers
//! start only as requests arrive, and `nbdinfo` is served again once the crowd is gone.
//!
//! One test in its own binary, so that `/proc/self/task` counts this server's threads and
//! no other test's.

#![allow(
    clippy::cast_possible_truncation,
    clippy::too_many_lines,
    reason = "test sizes are small constants; a scenario test reads best top to bottom"
)]

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{run, run_ok, wait_for, Fixture, RawClient, Reply};
use cowsnap_core::dev::MemDevice;
use cowsnap_nbd::codec::consts::{CMD_READ, REPLY_TYPE_OFFSET_DATA};
use cowsnap_nbd::{DeviceExport, ServerConfig};

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("read /proc/self/task")
        .count()
}

#[test]
fn connections_beyond_the_limit_are_closed_and_threads_stay_bounded() {
    let nbdinfo_ok = Command::new("nbdinfo").arg("--version").output();
    assert!(
        nbdinfo_ok.is_ok_and(|o| o.status.success()),
        "nbdinfo is missing: apt-get install -y libnbd-bin"
    );
    const MAX: usize = 32;
    const WORKERS: usize = 16;
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = log.clone();
    let config = ServerConfig {
        workers: WORKERS,
        max_connections: MAX,
        log: Some(Arc::new(move |l: &str| sink.lock().unwrap().push(l.into()))),
        ..ServerConfig::default()
    };
    let fx = Fixture::with_config(
        vec![(
            "disk",
            Arc::new(DeviceExport::memory(MemDevice::new(16 << 20))),
        )],
        config,
    );
    let stats = fx.server.stats();
    let base = threads();

    // 300 sockets that never say anything.
    let mut crowd: Vec<UnixStream> = (0..300)
        .map(|_| UnixStream::connect(&fx.sock).expect("connect"))
        .collect();
    wait_for("all 300 are accepted or refused", || {
        stats.connections.load(Ordering::SeqCst) + stats.refused.load(Ordering::SeqCst) == 300
    });
    assert_eq!(fx.server.connections(), MAX);
    assert_eq!(stats.refused.load(Ordering::SeqCst), 300 - MAX as u64);
    let during = threads();
    assert!(
        during <= base + MAX + 2,
        "{during} threads with {MAX} connections in the handshake (base {base})"
    );
    // The first MAX got the greeting; the others were closed without one.
    let (mut greeted, mut closed) = (0, 0);
    for s in &mut crowd {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; 18];
        match s.read(&mut g) {
            Ok(0) | Err(_) => closed += 1,
            Ok(_) => {
                assert_eq!(&g[..8], b"NBDMAGIC");
                greeted += 1;
            }
        }
    }
    assert_eq!((greeted, closed), (MAX, 300 - MAX));
    // One log line for the whole flood, saying what to do.
    let refusals: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("refused a connection"))
        .cloned()
        .collect();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert!(refusals[0].contains("--max-connections"), "{refusals:?}");
    // At the limit a real client is turned away too...
    let full = run(
        Command::new("nbdinfo").arg(fx.uri("disk")),
        Duration::from_secs(60),
    );
    assert!(
        !full.status.success(),
        "nbdinfo was served beyond the limit"
    );

    // ...and served once the crowd is gone.
    drop(crowd);
    wait_for("the crowd's connections end", || {
        fx.server.connections() == 0
    });
    let info = run_ok(Command::new("nbdinfo").arg(fx.uri("disk")));
    assert!(info.contains("export-size: 16777216"), "{info}");

    // Connections in transmission hold one thread until they send requests, and again
    // once idle after a burst, not `workers` each.
    wait_for("nbdinfo's connection ends", || fx.server.connections() == 0);
    let base = threads();
    let mut clients: Vec<RawClient> = (0..20).map(|_| RawClient::connect(&fx.sock)).collect();
    for c in &mut clients {
        c.go("disk", true, false);
    }
    let idle = threads();
    assert!(
        idle <= base + 20 + 2,
        "{idle} threads for 20 idle connections (base {base})"
    );
    for c in &mut clients {
        // A burst of 16 pipelined reads, then silence.
        for cookie in 0..16u64 {
            c.request(CMD_READ, 0, cookie, cookie * 4096, 4096);
        }
        for _ in 0..16 {
            match c.reply(4096) {
                Reply::Chunk { ty, .. } => assert_eq!(ty, REPLY_TYPE_OFFSET_DATA),
                r => panic!("unexpected reply {r:?}"),
            }
        }
    }
    let busy = threads();
    assert!(
        busy > idle && busy <= base + 20 * WORKERS + 2,
        "{busy} threads after a burst (base {base}, idle {idle})"
    );
    // Workers idle for IDLE_WORKER_EXIT end.
    wait_for("idle workers end", || threads() <= base + 20 + 2);
    drop(clients);
    wait_for("the clients' connections end", || {
        fx.server.connections() == 0
    });
}
