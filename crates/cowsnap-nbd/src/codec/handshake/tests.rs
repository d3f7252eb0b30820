//! Unit tests of the handshake state machine: every option, and malformed input.

use super::*;
use crate::codec::cursor::Cursor;

fn catalog() -> Catalog {
    Catalog {
        exports: vec![
            ExportInfo {
                name: "origin".into(),
                description: "the origin".into(),
                size: 1 << 20,
                read_only: false,
                multi_conn: true,
            },
            ExportInfo {
                name: "snap".into(),
                description: String::new(),
                size: 1 << 20,
                read_only: true,
                multi_conn: false,
            },
        ],
        default_export: Some("origin".into()),
        block_sizes: BlockSizes::default(),
    }
}

fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// One option reply as decoded from the server's output.
#[derive(Debug, PartialEq, Eq)]
struct Rep {
    option: u32,
    ty: u32,
    data: Vec<u8>,
}

fn replies(out: &[u8]) -> Vec<Rep> {
    let mut c = Cursor::new(out);
    let mut v = Vec::new();
    while c.remaining() > 0 {
        assert_eq!(c.u64().unwrap(), REPLY_MAGIC);
        let option = c.u32().unwrap();
        let ty = c.u32().unwrap();
        let len = c.u32().unwrap();
        v.push(Rep {
            option,
            ty,
            data: c.bytes(len as usize).unwrap().to_vec(),
        });
    }
    v
}

/// A handshake past the greeting and the client flags.
fn started(flags: u32) -> Handshake {
    let mut h = Handshake::new(catalog());
    let greeting = h.take_output();
    assert_eq!(greeting.len(), 18);
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    assert_eq!(&greeting[8..16], b"IHAVEOPT");
    assert_eq!(&greeting[16..], &[0, 3]);
    h.push_input(&flags.to_be_bytes());
    assert_eq!(h.advance(), Ok(Status::NeedInput));
    h
}

fn send(h: &mut Handshake, bytes: &[u8]) -> (Result<Status, HandshakeError>, Vec<Rep>) {
    h.push_input(bytes);
    let s = h.advance();
    (s, replies(&h.take_output()))
}

/// Sends an option that must leave the handshake waiting for more.
fn send_ok(h: &mut Handshake, bytes: &[u8]) -> Vec<Rep> {
    let (s, r) = send(h, bytes);
    assert_eq!(s, Ok(Status::NeedInput));
    r
}

fn info_items(reps: &[Rep]) -> Vec<(u16, Vec<u8>)> {
    reps.iter()
        .filter(|r| r.ty == REP_INFO)
        .map(|r| {
            let mut c = Cursor::new(&r.data);
            let t = c.u16().unwrap();
            (t, c.bytes(c.remaining()).unwrap().to_vec())
        })
        .collect()
}

#[test]
fn unknown_client_flags_end_the_session() {
    let mut h = Handshake::new(catalog());
    h.push_input(&4u32.to_be_bytes());
    assert_eq!(h.advance(), Err(HandshakeError::BadClientFlags(4)));
    assert_eq!(h.advance(), Err(HandshakeError::Finished));
}

#[test]
fn input_may_arrive_one_byte_at_a_time() {
    let mut h = Handshake::new(catalog());
    let mut stream = 1u32.to_be_bytes().to_vec();
    stream.extend(opt(OPT_STRUCTURED_REPLY, &[]));
    stream.extend(opt(OPT_GO, &go_data("snap", &[])));
    stream.extend_from_slice(b"early request bytes");
    let mut last = Ok(Status::NeedInput);
    for b in &stream {
        h.push_input(&[*b]);
        last = h.advance();
        if matches!(last, Ok(Status::Transmission(_))) {
            break;
        }
    }
    let Ok(Status::Transmission(n)) = last else {
        panic!("no transmission: {last:?}");
    };
    assert_eq!(n.export, "snap");
    assert!(n.structured);
    assert_eq!(h.take_leftover(), b"");
}

#[test]
fn leftover_input_after_go_is_kept() {
    let mut h = started(1);
    let mut bytes = opt(OPT_GO, &go_data("origin", &[]));
    bytes.extend_from_slice(b"req");
    let (s, _) = send(&mut h, &bytes);
    assert!(matches!(s, Ok(Status::Transmission(_))));
    assert_eq!(h.take_leftover(), b"req");
}

#[test]
fn bad_option_magic_ends_the_session() {
    let mut h = started(1);
    let mut bad = opt(OPT_LIST, &[]);
    bad[0] ^= 0xff;
    h.push_input(&bad);
    assert!(matches!(
        h.advance(),
        Err(HandshakeError::BadOptionMagic(_))
    ));
}

#[test]
fn export_name_enters_transmission_with_zero_padding() {
    let mut h = started(1);
    h.push_input(&opt(OPT_EXPORT_NAME, b"origin"));
    let Ok(Status::Transmission(n)) = h.advance() else {
        panic!()
    };
    let out = h.take_output();
    assert_eq!(out.len(), 8 + 2 + 124);
    assert_eq!(&out[..8], &(1u64 << 20).to_be_bytes());
    let flags = u16::from_be_bytes([out[8], out[9]]);
    assert_eq!(flags, n.flags);
    assert_eq!(flags & FLAG_SEND_DF, 0, "DF without structured replies");
    assert_ne!(flags & FLAG_CAN_MULTI_CONN, 0);
    assert!(out[10..].iter().all(|&b| b == 0));
    assert!(!n.structured);
    assert_eq!(n.base_allocation, None);
}

#[test]
fn export_name_honours_no_zeroes_and_default_export() {
    let mut h = started(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    h.push_input(&opt(OPT_EXPORT_NAME, b""));
    let Ok(Status::Transmission(n)) = h.advance() else {
        panic!()
    };
    assert_eq!(n.export, "origin");
    assert_eq!(h.take_output().len(), 10);
}

#[test]
fn export_name_of_unknown_export_is_a_hard_disconnect() {
    let mut h = started(1);
    h.push_input(&opt(OPT_EXPORT_NAME, b"nope"));
    assert_eq!(
        h.advance(),
        Err(HandshakeError::UnknownExport("nope".into()))
    );
    let mut h = started(1);
    h.push_input(&opt(OPT_EXPORT_NAME, &[0xff, 0xfe]));
    assert!(matches!(h.advance(), Err(HandshakeError::UnknownExport(_))));
}

#[test]
fn abort_is_acknowledged() {
    let mut h = started(1);
    let (s, r) = send(&mut h, &opt(OPT_ABORT, b"ignored"));
    assert_eq!(s, Ok(Status::Aborted));
    assert_eq!(
        r,
        vec![Rep {
            option: OPT_ABORT,
            ty: REP_ACK,
            data: vec![]
        }]
    );
}

#[test]
fn list_sends_every_export_then_ack() {
    let mut h = started(1);
    let (s, r) = send(&mut h, &opt(OPT_LIST, &[]));
    assert_eq!(s, Ok(Status::NeedInput));
    assert_eq!(r.len(), 3);
    let mut first = 6u32.to_be_bytes().to_vec();
    first.extend_from_slice(b"originthe origin");
    assert_eq!(
        r[0],
        Rep {
            option: OPT_LIST,
            ty: REP_SERVER,
            data: first
        }
    );
    assert_eq!(&r[1].data[4..], b"snap");
    assert_eq!(r[2].ty, REP_ACK);
    assert!(r[2].data.is_empty());

    let (_, r) = send(&mut h, &opt(OPT_LIST, b"x"));
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].ty, REP_ERR_INVALID);
}

#[test]
fn unknown_options_get_unsup_and_parsing_continues() {
    let mut h = started(1);
    for o in [
        OPT_EXTENDED_HEADERS,
        OPT_STARTTLS,
        4,
        0x0765_4321,
        0,
        u32::MAX,
    ] {
        let (s, r) = send(&mut h, &opt(o, &[1, 2, 3, 4]));
        assert_eq!(s, Ok(Status::NeedInput));
        assert_eq!(r.len(), 1, "option {o}");
        assert_eq!(r[0].option, o);
        assert_eq!(r[0].ty, REP_ERR_UNSUP);
    }
    // A large unknown option arriving in pieces is skipped without being buffered.
    let mut big = IHAVEOPT.to_be_bytes().to_vec();
    big.extend_from_slice(&99u32.to_be_bytes());
    big.extend_from_slice(&(1u32 << 30).to_be_bytes());
    let (s, r) = send(&mut h, &big);
    assert_eq!((s, r.len()), (Ok(Status::NeedInput), 0));
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..1023 {
        h.push_input(&chunk);
        assert_eq!(h.advance(), Ok(Status::NeedInput));
        assert!(h.input.len() <= chunk.len());
    }
    let (_, r) = send(&mut h, &chunk);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].ty, REP_ERR_UNSUP);
    // Still in sync.
    let (s, _) = send(&mut h, &opt(OPT_GO, &go_data("origin", &[])));
    assert!(matches!(s, Ok(Status::Transmission(_))));
}

#[test]
fn oversized_known_option_gets_too_big() {
    let mut h = started(1);
    let (s, r) = send(
        &mut h,
        &opt(OPT_INFO, &vec![0u8; MAX_OPTION_DATA as usize + 1]),
    );
    assert_eq!(s, Ok(Status::NeedInput));
    assert_eq!(r[0].ty, REP_ERR_TOO_BIG);
}

#[test]
fn structured_reply_is_acked_and_rejects_data() {
    let mut h = started(1);
    let (_, r) = send(&mut h, &opt(OPT_STRUCTURED_REPLY, b"x"));
    assert_eq!(r[0].ty, REP_ERR_INVALID);
    assert!(!h.structured());
    let (_, r) = send(&mut h, &opt(OPT_STRUCTURED_REPLY, &[]));
    assert_eq!(
        r,
        vec![Rep {
            option: OPT_STRUCTURED_REPLY,
            ty: REP_ACK,
            data: vec![]
        }]
    );
    assert!(h.structured());
}

#[test]
fn info_reports_export_and_block_size_then_go_matches() {
    let mut h = started(1);
    send_ok(&mut h, &opt(OPT_STRUCTURED_REPLY, &[]));
    let req = go_data("origin", &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION]);
    let (s, r) = send(&mut h, &opt(OPT_INFO, &req));
    assert_eq!(s, Ok(Status::NeedInput));
    assert_eq!(r.last().unwrap().ty, REP_ACK);
    assert!(r.iter().all(|x| x.option == OPT_INFO));
    let items = info_items(&r);
    let export = &items.iter().find(|i| i.0 == INFO_EXPORT).unwrap().1;
    assert_eq!(
        export.len(),
        10,
        "NBD_INFO_EXPORT must be 12 bytes with its type"
    );
    assert_eq!(&export[..8], &(1u64 << 20).to_be_bytes());
    let flags = u16::from_be_bytes([export[8], export[9]]);
    assert_ne!(flags & FLAG_SEND_DF, 0);
    let bs = &items.iter().find(|i| i.0 == INFO_BLOCK_SIZE).unwrap().1;
    assert_eq!(bs.len(), 12);
    let mut c = Cursor::new(bs);
    assert_eq!(
        (c.u32().unwrap(), c.u32().unwrap(), c.u32().unwrap()),
        (512, 4096, 32 << 20)
    );
    assert_eq!(
        items.iter().find(|i| i.0 == INFO_NAME).unwrap().1,
        b"origin"
    );
    assert_eq!(
        items.iter().find(|i| i.0 == INFO_DESCRIPTION).unwrap().1,
        b"the origin"
    );

    let (s, r2) = send(&mut h, &opt(OPT_GO, &req));
    let Ok(Status::Transmission(n)) = s else {
        panic!()
    };
    assert_eq!(info_items(&r2), items, "INFO then GO must agree");
    assert_eq!(n.flags, flags);
    assert!(n.block_sizes_requested);
    assert_eq!(n.block_sizes.min, 512);
}

#[test]
fn go_on_a_read_only_export_and_default_name() {
    let mut h = started(1);
    let (s, r) = send(&mut h, &opt(OPT_GO, &go_data("snap", &[])));
    let Ok(Status::Transmission(n)) = s else {
        panic!()
    };
    assert_ne!(n.flags & FLAG_READ_ONLY, 0);
    assert_eq!(n.flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES), 0);
    assert_eq!(n.flags & FLAG_CAN_MULTI_CONN, 0);
    assert_eq!(r.last().unwrap().ty, REP_ACK);
    assert!(!n.block_sizes_requested);

    // The empty name resolves to the default export and the canonical name is sent.
    let mut h = started(1);
    let (s, r) = send(&mut h, &opt(OPT_GO, &go_data("", &[])));
    let Ok(Status::Transmission(n)) = s else {
        panic!()
    };
    assert_eq!(n.export, "origin");
    assert!(info_items(&r).contains(&(INFO_NAME, b"origin".to_vec())));
}

#[test]
fn info_and_go_errors() {
    let mut h = started(1);
    let (s, r) = send(&mut h, &opt(OPT_GO, &go_data("missing", &[])));
    assert_eq!(s, Ok(Status::NeedInput));
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].ty, REP_ERR_UNKNOWN);
    // Malformed payloads: name longer than the data, count mismatch, short data.
    let mut bad = go_data("origin", &[]);
    bad[3] = 200;
    for data in [
        bad,
        {
            let mut d = go_data("origin", &[INFO_NAME]);
            d.pop();
            d
        },
        {
            let mut d = go_data("origin", &[]);
            d.push(0);
            d
        },
        vec![0, 0],
        vec![],
        {
            let mut d = 2u32.to_be_bytes().to_vec();
            d.extend_from_slice(&[0xc3, 0x28, 0, 0]);
            d
        },
    ] {
        let (s, r) = send(&mut h, &opt(OPT_INFO, &data));
        assert_eq!(s, Ok(Status::NeedInput));
        assert_eq!(r.len(), 1, "{data:?}");
        assert_eq!(r[0].ty, REP_ERR_INVALID, "{data:?}");
    }
    // Still usable afterwards.
    let (s, _) = send(&mut h, &opt(OPT_GO, &go_data("origin", &[])));
    assert!(matches!(s, Ok(Status::Transmission(_))));
}

#[test]
fn list_meta_context() {
    let mut h = started(1);
    send_ok(&mut h, &opt(OPT_STRUCTURED_REPLY, &[]));
    for queries in [
        &[][..],
        &["base:"],
        &["base:allocation"],
        &["qemu:", "base:"],
    ] {
        let (_, r) = send(
            &mut h,
            &opt(OPT_LIST_META_CONTEXT, &meta_data("origin", queries)),
        );
        assert_eq!(r.len(), 2, "{queries:?}");
        assert_eq!(r[0].ty, REP_META_CONTEXT);
        assert_eq!(&r[0].data[..4], &[0, 0, 0, 0]);
        assert_eq!(&r[0].data[4..], b"base:allocation");
        assert_eq!(r[1].ty, REP_ACK);
    }
    // Unknown namespaces are ignored: just the ACK.
    let (_, r) = send(
        &mut h,
        &opt(OPT_LIST_META_CONTEXT, &meta_data("origin", &["qemu:"])),
    );
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].ty, REP_ACK);
    let (_, r) = send(
        &mut h,
        &opt(OPT_LIST_META_CONTEXT, &meta_data("missing", &[])),
    );
    assert_eq!(r[0].ty, REP_ERR_UNKNOWN);
    let (_, r) = send(
        &mut h,
        &opt(OPT_LIST_META_CONTEXT, &meta_data("origin", &["nocolon"])),
    );
    assert_eq!(r[0].ty, REP_ERR_INVALID);
}

#[test]
fn set_meta_context_selects_base_allocation_for_the_same_export() {
    let mut h = started(1);
    // Before structured replies: invalid.
    let (_, r) = send(
        &mut h,
        &opt(
            OPT_SET_META_CONTEXT,
            &meta_data("origin", &["base:allocation"]),
        ),
    );
    assert_eq!(r[0].ty, REP_ERR_INVALID);
    send_ok(&mut h, &opt(OPT_STRUCTURED_REPLY, &[]));
    let (_, r) = send(
        &mut h,
        &opt(
            OPT_SET_META_CONTEXT,
            &meta_data(
                "origin",
                &["base:allocation", "base:allocation", "qemu:dirty"],
            ),
        ),
    );
    assert_eq!(r.len(), 2, "exactly one context, as qemu requires");
    assert_eq!(r[0].ty, REP_META_CONTEXT);
    assert_eq!(&r[0].data[..4], &BASE_ALLOCATION_ID.to_be_bytes());
    assert_eq!(&r[0].data[4..], b"base:allocation");
    assert_eq!(r[1].ty, REP_ACK);
    let (s, _) = send(&mut h, &opt(OPT_GO, &go_data("origin", &[])));
    let Ok(Status::Transmission(n)) = s else {
        panic!()
    };
    assert_eq!(n.base_allocation, Some(BASE_ALLOCATION_ID));
}

#[test]
fn meta_context_for_another_export_or_reset_is_not_active() {
    let mut h = started(1);
    send_ok(&mut h, &opt(OPT_STRUCTURED_REPLY, &[]));
    send_ok(
        &mut h,
        &opt(
            OPT_SET_META_CONTEXT,
            &meta_data("snap", &["base:allocation"]),
        ),
    );
    let (s, _) = send(&mut h, &opt(OPT_GO, &go_data("origin", &[])));
    let Ok(Status::Transmission(n)) = s else {
        panic!()
    };
    assert_eq!(n.base_allocation, None);

    // A later SET with no queries (or a failing one) clears the selection.
    let mut h = started(1);
    send_ok(&mut h, &opt(OPT_STRUCTURED_REPLY, &[]));
    send_ok(
        &mut h,
        &opt(
            OPT_SET_META_CONTEXT,
            &meta_data("origin", &["base:allocation"]),
        ),
    );
    let (_, r) = send(&mut h, &opt(OPT_SET_META_CONTEXT, &[0, 0, 0, 9]));
    assert_eq!(r[0].ty, REP_ERR_INVALID);
    let (s, _) = send(&mut h, &opt(OPT_GO, &go_data("origin", &[])));
    let Ok(Status::Transmission(n)) = s else {
        panic!()
    };
    assert_eq!(n.base_allocation, None);
}

#[test]
fn malformed_meta_context_payloads_are_invalid() {
    let mut h = started(1);
    send_ok(&mut h, &opt(OPT_STRUCTURED_REPLY, &[]));
    let mut too_many = meta_data("origin", &["base:allocation"]);
    too_many[10] = 9; // query count 9, only one present
    let mut trailing = meta_data("origin", &[]);
    trailing.push(1);
    let mut long_query = (6u32).to_be_bytes().to_vec();
    long_query.extend_from_slice(b"origin");
    long_query.extend_from_slice(&1u32.to_be_bytes());
    long_query.extend_from_slice(&u32::MAX.to_be_bytes());
    for data in [
        too_many,
        trailing,
        long_query,
        vec![],
        vec![0, 0, 0, 1, b'a'],
    ] {
        for o in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
            let (s, r) = send(&mut h, &opt(o, &data));
            assert_eq!(s, Ok(Status::NeedInput));
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].ty, REP_ERR_INVALID, "{o} {data:?}");
        }
    }
}

#[test]
fn block_size_minimum_falls_back_for_odd_sizes() {
    let mut c = catalog();
    c.exports[0].size = 1000;
    assert_eq!(c.block_sizes_for(&c.exports[0]).min, 1);
    assert_eq!(c.block_sizes_for(&c.exports[1]).min, 512);
    // No default and two exports: the empty name is unknown.
    c.default_export = None;
    assert!(c.find("").is_none());
    c.exports.truncate(1);
    assert_eq!(c.find("").unwrap().name, "origin");
}
