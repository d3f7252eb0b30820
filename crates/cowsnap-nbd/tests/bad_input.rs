//! Bad input over real sockets: truncated handshakes, unknown options, bad magic,
//! out-of-range and oversized requests. Each gets the protocol's answer, and the server
//! keeps serving other clients. Also: out-of-order replies, clients vanishing with requests
//! in flight, and graceful shutdown draining in-flight requests.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small constants"
)]

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{wait_for, Fixture, RawClient, Reply};
use cowsnap_core::dev::{BlockDevice, FaultyDevice, GatedDevice, MemDevice, OpKind};
use cowsnap_nbd::codec::consts::*;
use cowsnap_nbd::codec::reply::{decode_block_status, decode_error_payload};
use cowsnap_nbd::{DeviceExport, Export, ServerConfig};

const SIZE: u64 = 4 << 20;
/// Where [`healthy`] writes, away from the other tests' data.
const HEALTHY_AT: u64 = 3 << 20;

fn mem_fixture() -> (Fixture, Arc<dyn BlockDevice>) {
    let e = Arc::new(DeviceExport::memory(MemDevice::new(SIZE)));
    let dev = e.device().clone();
    let ro: Arc<dyn Export> = Arc::new(DeviceExport::memory(MemDevice::new(SIZE)).read_only(true));
    (Fixture::new(vec![("disk", e), ("ro", ro)]), dev)
}

/// A well-behaved client still works: write then read back.
fn healthy(fx: &Fixture) {
    let mut c = RawClient::connect(&fx.sock);
    let (size, _) = c.go("disk", true, false);
    assert_eq!(size, SIZE);
    c.request(CMD_WRITE, 0, 1, HEALTHY_AT, 512);
    c.send(&[0x5a; 512]);
    assert_eq!(
        c.reply(0),
        Reply::Simple {
            error: 0,
            cookie: 1,
            data: vec![]
        }
    );
    c.request(CMD_READ, 0, 2, HEALTHY_AT, 512);
    let Reply::Chunk {
        flags,
        ty,
        cookie,
        payload,
    } = c.reply(0)
    else {
        panic!("structured read expected")
    };
    assert_eq!(
        (flags, ty, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 2)
    );
    assert_eq!(&payload[..8], &HEALTHY_AT.to_be_bytes());
    assert!(payload[8..].iter().all(|&b| b == 0x5a));
    c.request(CMD_DISC, 0, 3, 0, 0);
    assert!(c.is_closed());
}

#[test]
fn truncated_handshakes_leave_the_server_serving() {
    let (fx, _) = mem_fixture();
    // Greeting only, then gone.
    drop(RawClient::connect(&fx.sock));
    // Half the client flags.
    let mut c = RawClient::connect(&fx.sock);
    c.send(&[0, 0]);
    drop(c);
    // Flags and half an option header.
    let mut c = RawClient::connect(&fx.sock);
    c.send(&1u32.to_be_bytes());
    c.send(&IHAVEOPT.to_be_bytes()[..5]);
    drop(c);
    // A GO whose payload never completes.
    let mut c = RawClient::connect(&fx.sock);
    c.send(&1u32.to_be_bytes());
    let mut opt = IHAVEOPT.to_be_bytes().to_vec();
    opt.extend_from_slice(&OPT_GO.to_be_bytes());
    opt.extend_from_slice(&100u32.to_be_bytes());
    opt.extend_from_slice(&[0, 0, 0]);
    c.send(&opt);
    drop(c);
    healthy(&fx);
    wait_for("idle server", || fx.server.connections() == 0);
}

#[test]
fn a_client_silent_in_the_handshake_is_dropped() {
    let e: Arc<dyn Export> = Arc::new(DeviceExport::memory(MemDevice::new(SIZE)));
    let cfg = ServerConfig {
        handshake_timeout: Some(Duration::from_millis(200)),
        ..ServerConfig::default()
    };
    let fx = Fixture::with_config(vec![("disk", e)], cfg);
    let mut c = RawClient::connect(&fx.sock);
    let t = Instant::now();
    assert!(c.is_closed());
    assert!(t.elapsed() < Duration::from_secs(10));
    // The timeout does not apply once transmission starts.
    let mut c = RawClient::connect(&fx.sock);
    c.go("disk", true, false);
    std::thread::sleep(Duration::from_millis(500));
    c.request(CMD_FLUSH, 0, 1, 0, 0);
    assert_eq!(
        c.reply(0),
        Reply::Simple {
            error: 0,
            cookie: 1,
            data: vec![]
        }
    );
}

#[test]
fn unknown_options_get_err_unsup_and_negotiation_goes_on() {
    let (fx, _) = mem_fixture();
    let mut c = RawClient::connect(&fx.sock);
    c.send(&1u32.to_be_bytes());
    // What nbd-tester-client -h sends, then extended headers, STARTTLS, a withdrawn one.
    for (opt, data) in [
        (0x0765_4321u32, &[1u8, 2, 3, 4][..]),
        (OPT_EXTENDED_HEADERS, &[][..]),
        (OPT_STARTTLS, &[][..]),
        (4, &[9u8; 100][..]),
    ] {
        c.option(opt, data);
        let (o, ty, _) = c.option_reply();
        assert_eq!((o, ty), (opt, REP_ERR_UNSUP));
    }
    // LIST with data is invalid, without data lists both exports.
    c.option(OPT_LIST, b"junk");
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);
    c.option(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (o, ty, data) = c.option_reply();
        assert_eq!(o, OPT_LIST);
        if ty == REP_ACK {
            break;
        }
        assert_eq!(ty, REP_SERVER);
        let n = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(data[4..4 + n].to_vec()).unwrap());
    }
    assert_eq!(names, ["disk", "ro"]);
    // GO on a missing export: an error, and the session continues.
    let mut d = 4u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"nope");
    d.extend_from_slice(&0u16.to_be_bytes());
    c.option(OPT_GO, &d);
    assert_eq!(c.option_reply().1, REP_ERR_UNKNOWN);
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.option_reply(), (OPT_ABORT, REP_ACK, vec![]));
    assert!(c.is_closed());
    healthy(&fx);
}

#[test]
fn protocol_violations_in_the_handshake_close_only_that_connection() {
    let (fx, _) = mem_fixture();
    let before = fx.server.stats().protocol_errors.load(Ordering::Relaxed);
    // Unknown client flags.
    let mut c = RawClient::connect(&fx.sock);
    c.send(&0x8000_0001u32.to_be_bytes());
    assert!(c.is_closed());
    // Bad option magic.
    let mut c = RawClient::connect(&fx.sock);
    c.send(&1u32.to_be_bytes());
    c.send(&[0u8; 16]);
    assert!(c.is_closed());
    // EXPORT_NAME of a missing export: nothing to answer with but a disconnect.
    let mut c = RawClient::connect(&fx.sock);
    c.send(&1u32.to_be_bytes());
    c.option(OPT_EXPORT_NAME, b"missing");
    assert!(c.is_closed());
    assert_eq!(
        fx.server.stats().protocol_errors.load(Ordering::Relaxed),
        before + 3
    );
    healthy(&fx);
}

#[test]
fn export_name_path_without_structured_replies() {
    let (fx, dev) = mem_fixture();
    let mut c = RawClient::connect(&fx.sock);
    c.send(&1u32.to_be_bytes()); // no NO_ZEROES: expect the 124 zero bytes
    c.option(OPT_EXPORT_NAME, b"disk");
    let r = c.read_exact(8 + 2 + 124);
    assert_eq!(&r[..8], &SIZE.to_be_bytes());
    let flags = u16::from_be_bytes([r[8], r[9]]);
    assert_eq!(flags & FLAG_SEND_DF, 0);
    assert_ne!(flags & FLAG_SEND_FLUSH, 0);
    assert!(r[10..].iter().all(|&b| b == 0));
    // Simple replies: data follows the header.
    dev.write_at(&[7u8; 1024], 0, cowsnap_core::dev::Fua::No)
        .unwrap();
    c.request(CMD_READ, 0, 77, 0, 1024);
    assert_eq!(
        c.reply(1024),
        Reply::Simple {
            error: 0,
            cookie: 77,
            data: vec![7u8; 1024]
        }
    );
    // Block status without a context: EINVAL, simple reply.
    c.request(CMD_BLOCK_STATUS, 0, 78, 0, 4096);
    assert_eq!(
        c.reply(0),
        Reply::Simple {
            error: EINVAL,
            cookie: 78,
            data: vec![]
        }
    );
}

#[test]
fn bad_request_magic_ends_only_that_session() {
    let (fx, _) = mem_fixture();
    let before = fx.server.stats().protocol_errors.load(Ordering::Relaxed);
    let mut c = RawClient::connect(&fx.sock);
    c.go("disk", true, false);
    let mut bad = cowsnap_nbd::codec::RequestHeader {
        flags: 0,
        kind: CMD_READ,
        cookie: 1,
        offset: 0,
        length: 512,
    }
    .encode();
    bad[3] ^= 1;
    c.send(&bad);
    assert!(c.is_closed());
    assert_eq!(
        fx.server.stats().protocol_errors.load(Ordering::Relaxed),
        before + 1
    );
    healthy(&fx);
}

fn expect_simple_error(c: &mut RawClient, cookie: u64, errno: u32) {
    assert_eq!(
        c.reply(0),
        Reply::Simple {
            error: errno,
            cookie,
            data: vec![]
        },
        "cookie {cookie}"
    );
}

#[test]
fn out_of_range_and_malformed_requests_get_errors_simple_mode() {
    let (fx, _) = mem_fixture();
    let mut c = RawClient::connect(&fx.sock);
    c.send(&1u32.to_be_bytes());
    c.option(OPT_EXPORT_NAME, b"disk");
    c.read_exact(134);

    c.request(CMD_READ, 0, 1, SIZE, 512);
    expect_simple_error(&mut c, 1, EINVAL);
    c.request(CMD_WRITE, 0, 2, SIZE - 512, 1024);
    c.send(&[1u8; 1024]); // payload is consumed
    expect_simple_error(&mut c, 2, ENOSPC);
    c.request(CMD_WRITE_ZEROES, 0, 3, SIZE, 512);
    expect_simple_error(&mut c, 3, ENOSPC);
    c.request(CMD_TRIM, 0, 4, u64::MAX - 511, 512);
    expect_simple_error(&mut c, 4, EINVAL);
    c.request(CMD_READ, 0, 5, 1, 512); // misaligned
    expect_simple_error(&mut c, 5, EINVAL);
    c.request(42, 0, 6, 0, 512); // unknown command
    expect_simple_error(&mut c, 6, EINVAL);
    c.request(CMD_READ, 1 << 9, 7, 0, 512); // unknown flag
    expect_simple_error(&mut c, 7, EINVAL);
    c.request(CMD_READ, CMD_FLAG_DF, 8, 0, 512); // DF without structured replies
    expect_simple_error(&mut c, 8, EINVAL);
    c.request(CMD_FLUSH, 0, 9, 4096, 0);
    expect_simple_error(&mut c, 9, EINVAL);
    // Oversized: a READ beyond the 32 MiB maximum, and a WRITE whose payload is sent.
    c.request(CMD_READ, 0, 10, 0, (32 << 20) + 512);
    expect_simple_error(&mut c, 10, EINVAL);
    c.request(CMD_WRITE, 0, 11, 0, (32 << 20) + 512);
    c.send(&vec![0xee; (32 << 20) + 512]);
    expect_simple_error(&mut c, 11, EINVAL);
    // The session goes on and nothing was written by the refused writes.
    c.request(CMD_READ, 0, 12, 0, 4096);
    assert_eq!(
        c.reply(4096),
        Reply::Simple {
            error: 0,
            cookie: 12,
            data: vec![0u8; 4096]
        }
    );
    healthy(&fx);
}

fn expect_error_chunk(c: &mut RawClient, cookie: u64, errno: u32) {
    match c.reply(0) {
        Reply::Chunk {
            flags,
            ty,
            cookie: k,
            payload,
        } => {
            assert_eq!((flags, k), (REPLY_FLAG_DONE, cookie));
            let e = decode_error_payload(ty, &payload).expect("error chunk");
            assert_eq!(e.error, errno, "cookie {cookie}: {}", e.message);
            assert!(!e.message.is_empty());
        }
        other => panic!("cookie {cookie}: expected an error chunk, got {other:?}"),
    }
}

#[test]
fn errors_are_structured_when_negotiated_and_read_only_is_eperm() {
    let (fx, _) = mem_fixture();
    let mut c = RawClient::connect(&fx.sock);
    let (_, flags) = c.go("disk", true, true);
    assert_ne!(flags & FLAG_SEND_DF, 0);
    c.request(CMD_READ, 0, 1, SIZE, 512);
    expect_error_chunk(&mut c, 1, EINVAL);
    c.request(CMD_BLOCK_STATUS, 0, 2, SIZE - 512, 1024);
    expect_error_chunk(&mut c, 2, EINVAL);
    c.request(CMD_WRITE, 0, 3, SIZE, 512);
    c.send(&[0u8; 512]);
    expect_error_chunk(&mut c, 3, ENOSPC);
    // Block status works, with REQ_ONE a single extent no longer than asked.
    c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 4, 0, 8192);
    let Reply::Chunk { ty, payload, .. } = c.reply(0) else {
        panic!()
    };
    assert_eq!(ty, REPLY_TYPE_BLOCK_STATUS);
    assert_eq!(
        decode_block_status(&payload),
        Some((1, vec![(8192, STATE_ZERO)]))
    );

    let mut r = RawClient::connect(&fx.sock);
    let (_, flags) = r.go("ro", true, false);
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    r.request(CMD_WRITE, 0, 1, 0, 512);
    r.send(&[1u8; 512]);
    expect_error_chunk(&mut r, 1, EPERM);
    r.request(CMD_TRIM, 0, 2, 0, 512);
    expect_error_chunk(&mut r, 2, EPERM);
    r.request(CMD_WRITE_ZEROES, 0, 3, 0, 512);
    expect_error_chunk(&mut r, 3, EPERM);
    r.request(CMD_FLUSH, 0, 4, 0, 0);
    assert_eq!(
        r.reply(0),
        Reply::Simple {
            error: 0,
            cookie: 4,
            data: vec![]
        }
    );
}

#[test]
fn a_write_too_large_to_skip_is_answered_then_the_connection_closes() {
    let e: Arc<dyn Export> = Arc::new(DeviceExport::memory(MemDevice::new(SIZE)));
    let cfg = ServerConfig {
        max_discard: 1 << 20,
        ..ServerConfig::default()
    };
    let fx = Fixture::with_config(vec![("disk", e)], cfg);
    let mut c = RawClient::connect(&fx.sock);
    c.go("disk", false, false);
    c.request(CMD_WRITE, 0, 9, 0, u32::MAX);
    expect_simple_error(&mut c, 9, EINVAL);
    assert!(c.is_closed());
    healthy(&fx);
}

#[test]
fn device_errors_reach_the_client_and_the_session_goes_on() {
    let faulty = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(SIZE))));
    faulty.add_rule(cowsnap_core::dev::FaultRule::Range {
        kind: OpKind::Read,
        start: 0,
        end: 4096,
    });
    let fx = Fixture::new(vec![("disk", Arc::new(DeviceExport::new(faulty)))]);
    let mut c = RawClient::connect(&fx.sock);
    c.go("disk", true, false);
    c.request(CMD_READ, 0, 1, 0, 512);
    expect_error_chunk(&mut c, 1, EIO);
    c.request(CMD_READ, 0, 2, HEALTHY_AT, 512);
    assert!(matches!(
        c.reply(0),
        Reply::Chunk {
            ty: REPLY_TYPE_OFFSET_DATA,
            cookie: 2,
            ..
        }
    ));
}

#[test]
fn replies_come_out_of_order() {
    let gated = Arc::new(GatedDevice::new(Arc::new(MemDevice::new(SIZE))));
    let gate = gated.gate(OpKind::Read, 0, 4096, 1);
    let fx = Fixture::new(vec![("disk", Arc::new(DeviceExport::new(gated)))]);
    let mut c = RawClient::connect(&fx.sock);
    c.go("disk", true, false);
    c.request(CMD_READ, 0, 100, 0, 4096); // held at the gate
    gate.wait_arrived(1);
    c.request(CMD_WRITE, CMD_FLAG_FUA, 101, 1 << 20, 512);
    c.send(&[3u8; 512]);
    c.request(CMD_READ, 0, 102, 1 << 20, 512);
    // The later requests complete while the first is held.
    let mut seen = Vec::new();
    for _ in 0..2 {
        match c.reply(0) {
            Reply::Simple { cookie, error, .. } => {
                assert_eq!(error, 0);
                seen.push(cookie)
            }
            Reply::Chunk {
                cookie, payload, ..
            } => {
                assert!(payload[8..].iter().all(|&b| b == 3));
                seen.push(cookie)
            }
        }
    }
    seen.sort();
    assert_eq!(seen, [101, 102]);
    gate.release();
    assert!(matches!(c.reply(0), Reply::Chunk { cookie: 100, .. }));
}

#[test]
fn clients_vanishing_with_requests_in_flight_harm_nothing() {
    let (fx, dev) = mem_fixture();
    for round in 0..5u8 {
        let mut c = RawClient::connect(&fx.sock);
        c.go("disk", round % 2 == 0, false);
        for i in 0..40u64 {
            c.request(CMD_WRITE, 0, i, i * 4096, 4096);
            c.send(&[round + 1; 4096]);
            c.request(CMD_READ, 0, 1000 + i, i * 4096, 4096);
        }
        // Half a request, then gone without reading a reply or sending DISC.
        c.send(&[0x25, 0x60]);
        drop(c);
    }
    wait_for("connections to close", || fx.server.connections() == 0);
    healthy(&fx);
    // Data written is whole 4 KiB blocks of a single round: never torn.
    let mut buf = vec![0u8; 4096];
    for i in 0..40u64 {
        dev.read_at(&mut buf, i * 4096).unwrap();
        assert!(buf.iter().all(|&b| b == buf[0]), "block {i} torn");
    }
}

#[test]
fn shutdown_drains_in_flight_requests_and_flushes() {
    let faulty = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(SIZE))));
    let gated = Arc::new(GatedDevice::new(faulty.clone()));
    let gate = gated.gate(OpKind::Write, 0, 4096, 1);
    let fx = Fixture::new(vec![("disk", Arc::new(DeviceExport::new(gated)))]);
    let mut c = RawClient::connect(&fx.sock);
    c.go("disk", true, false);
    c.request(CMD_WRITE, 0, 1, 0, 4096);
    c.send(&[9u8; 4096]);
    gate.wait_arrived(1);
    let flushes_before = faulty.count(OpKind::Flush);
    let handle = fx.server.shutdown_handle();
    let stopper = std::thread::spawn(move || handle.shutdown());
    // New connections are refused once the listener is gone.
    wait_for("listener removal", || !fx.sock.exists());
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !stopper.is_finished(),
        "shutdown must wait for the held write"
    );
    gate.release();
    assert_eq!(
        c.reply(0),
        Reply::Simple {
            error: 0,
            cookie: 1,
            data: vec![]
        }
    );
    assert!(c.is_closed());
    stopper.join().unwrap().unwrap();
    assert!(faulty.count(OpKind::Flush) > flushes_before);
    let mut buf = [0u8; 4096];
    faulty.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [9u8; 4096]);
    assert_eq!(fx.server.connections(), 0);
}

/// Requests the client sent before shutdown began but the server had not read yet (its one
/// worker was busy) are answered with ESHUTDOWN, in both reply modes, not dropped; the
/// request being executed completes; then the connection closes.
#[test]
fn requests_unread_when_shutdown_begins_get_eshutdown() {
    for structured in [true, false] {
        let dev = Arc::new(MemDevice::new(SIZE));
        let gated = Arc::new(GatedDevice::new(dev.clone()));
        let gate = gated.gate(OpKind::Write, 0, 4096, 1);
        let fx = Fixture::with_config(
            vec![("disk", Arc::new(DeviceExport::new(gated)))],
            ServerConfig {
                workers: 1,
                ..ServerConfig::default()
            },
        );
        let mut c = RawClient::connect(&fx.sock);
        c.go("disk", structured, false);
        c.request(CMD_WRITE, 0, 1, 0, 4096);
        c.send(&[9u8; 4096]);
        gate.wait_arrived(1);
        // Sent while the only worker is held: not read yet.
        c.request(CMD_READ, 0, 2, 8192, 4096);
        c.request(CMD_WRITE, 0, 3, 8192, 4096);
        c.send(&[7u8; 4096]);
        // Written to a Unix socket: queued for the server by the time `send` returns.
        c.request(CMD_FLUSH, 0, 4, 0, 0);
        let handle = fx.server.shutdown_handle();
        let h2 = handle.clone();
        let stopper = std::thread::spawn(move || h2.shutdown());
        wait_for("shutdown to begin", || handle.is_stopping());
        // Shutdown removes the listener before it shuts the connections' read sides.
        wait_for("listener removal", || !fx.sock.exists());
        gate.release();
        let mut replies: Vec<(u64, u32)> = Vec::new();
        for _ in 0..4 {
            match c.reply(0) {
                Reply::Simple { error, cookie, .. } => replies.push((cookie, error)),
                Reply::Chunk {
                    cookie,
                    ty,
                    payload,
                    ..
                } => {
                    assert_eq!(ty, REPLY_TYPE_ERROR, "cookie {cookie}");
                    let e = decode_error_payload(ty, &payload).expect("error payload");
                    assert!(e.message.contains("shutting down"), "{}", e.message);
                    replies.push((cookie, e.error));
                }
            }
        }
        replies.sort();
        assert_eq!(
            replies,
            [(1, 0), (2, ESHUTDOWN), (3, ESHUTDOWN), (4, ESHUTDOWN)],
            "structured={structured}"
        );
        assert!(c.is_closed());
        stopper.join().unwrap().unwrap();
        // The held write went through; the refused one did not.
        let mut buf = [0u8; 4096];
        dev.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [9u8; 4096]);
        dev.read_at(&mut buf, 8192).unwrap();
        assert_eq!(buf, [0u8; 4096]);
        assert_eq!(fx.server.connections(), 0);
    }
}

#[test]
fn tcp_listener_serves_too() {
    let server = cowsnap_nbd::Server::new(ServerConfig::default());
    server
        .add_export("disk", Arc::new(DeviceExport::memory(MemDevice::new(SIZE))))
        .unwrap();
    let addr = server.listen_tcp("127.0.0.1:0").unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    use std::io::{Read, Write};
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut o = IHAVEOPT.to_be_bytes().to_vec();
    o.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    o.extend_from_slice(&4u32.to_be_bytes());
    o.extend_from_slice(b"disk");
    s.write_all(&o).unwrap();
    let mut r = [0u8; 10];
    s.read_exact(&mut r).unwrap();
    assert_eq!(&r[..8], &SIZE.to_be_bytes());
    server.shutdown().unwrap();
}

/// A 512-byte READ at 0 with `cookie` is answered with data (structured replies).
fn assert_read_is_served(c: &mut RawClient, cookie: u64) {
    c.request(CMD_READ, 0, cookie, 0, 512);
    let reply = c.reply(0);
    assert!(
        matches!(reply, Reply::Chunk { ty: REPLY_TYPE_OFFSET_DATA, cookie: got, .. } if got == cookie),
        "{reply:?}"
    );
}

/// A new connection's GO for `name` is answered ERR_UNKNOWN.
fn assert_go_is_unknown(fx: &Fixture, name: &str) {
    let mut n = RawClient::connect(&fx.sock);
    n.send(&1u32.to_be_bytes());
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    n.option(OPT_GO, &d);
    assert_eq!(n.option_reply().1, REP_ERR_UNKNOWN);
}

/// The server takes its catalog when a connection starts (before the greeting). An export
/// removed after that is still agreed to by that handshake, and the client that was told
/// yes must then be served, not dropped: the connection serves the export the handshake
/// offered, as it would one that was already open.
#[test]
fn a_client_told_yes_is_served_though_its_export_went_away_during_the_handshake() {
    let (fx, _) = mem_fixture();
    let mut c = RawClient::connect(&fx.sock);
    assert!(fx.server.remove_export("disk").is_some());
    let (size, _) = c.go("disk", true, false);
    assert_eq!(size, SIZE);
    assert_read_is_served(&mut c, 7);
    // New connections no longer see it.
    assert_go_is_unknown(&fx, "disk");
}

#[test]
fn exports_can_change_while_serving() {
    let (fx, _) = mem_fixture();
    let mut old = RawClient::connect(&fx.sock);
    old.go("disk", true, false);
    // Added: new connections see it at once.
    fx.server
        .add_export(
            "late",
            Arc::new(DeviceExport::memory(MemDevice::new(SIZE / 2))),
        )
        .unwrap();
    assert!(fx
        .server
        .add_export("late", Arc::new(DeviceExport::memory(MemDevice::new(512))))
        .is_err());
    let mut c = RawClient::connect(&fx.sock);
    assert_eq!(c.go("late", true, false).0, SIZE / 2);
    // Removed: new GOs get ERR_UNKNOWN, open connections keep working.
    assert!(fx.server.remove_export("disk").is_some());
    assert_go_is_unknown(&fx, "disk");
    assert_read_is_served(&mut old, 5);
    assert_eq!(fx.server.export_names(), ["ro", "late"]);
}

#[test]
fn shutdown_closes_idle_connections_promptly() {
    let (fx, _) = mem_fixture();
    let _greeted = RawClient::connect(&fx.sock); // silent in the handshake
    let mut idle = RawClient::connect(&fx.sock);
    idle.go("disk", true, false);
    wait_for("both connections", || fx.server.connections() == 2);
    let t = Instant::now();
    fx.server.shutdown().unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(idle.is_closed());
    assert_eq!(fx.server.connections(), 0);
    // Idempotent.
    fx.server.shutdown().unwrap();
}

/// An export with a bug: it panics on reads at offset 0.
#[derive(Debug)]
struct Buggy(MemDevice);

impl BlockDevice for Buggy {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> cowsnap_core::Result<()> {
        assert!(offset != 0, "deliberate bug in a test export");
        self.0.read_at(buf, offset)
    }
    fn write_at(
        &self,
        buf: &[u8],
        offset: u64,
        fua: cowsnap_core::dev::Fua,
    ) -> cowsnap_core::Result<()> {
        self.0.write_at(buf, offset, fua)
    }
    fn flush(&self) -> cowsnap_core::Result<()> {
        Ok(())
    }
}

impl Export for Buggy {}

#[test]
fn a_panicking_export_answers_eio_and_the_session_goes_on() {
    let fx = Fixture::new(vec![("disk", Arc::new(Buggy(MemDevice::new(SIZE))))]);
    let mut c = RawClient::connect(&fx.sock);
    c.go("disk", true, false);
    for cookie in 1..=8 {
        c.request(CMD_READ, 0, cookie, 0, 512);
        expect_error_chunk(&mut c, cookie, EIO);
    }
    c.request(CMD_READ, 0, 9, 4096, 512);
    assert!(matches!(
        c.reply(0),
        Reply::Chunk {
            ty: REPLY_TYPE_OFFSET_DATA,
            cookie: 9,
            ..
        }
    ));
}
