//! Unit tests of the `STARTTLS` rules in each [`TlsMode`], and of options met by a shutdown.

use super::*;
use crate::codec::cursor::Cursor;

fn catalog() -> Catalog {
    Catalog {
        exports: vec![ExportInfo {
            name: "disk".into(),
            description: String::new(),
            size: 1 << 20,
            read_only: false,
            multi_conn: true,
        }],
        default_export: None,
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

fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

fn meta_data(name: &str, query: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&(query.len() as u32).to_be_bytes());
    d.extend_from_slice(query.as_bytes());
    d
}

/// (option, reply type, data) of each option reply in `out`.
fn replies(out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut c = Cursor::new(out);
    let mut v = Vec::new();
    while c.remaining() > 0 {
        assert_eq!(c.u64().unwrap(), REPLY_MAGIC);
        let option = c.u32().unwrap();
        let ty = c.u32().unwrap();
        let len = c.u32().unwrap();
        v.push((option, ty, c.bytes(len as usize).unwrap().to_vec()));
    }
    v
}

fn started(mode: TlsMode) -> Handshake {
    let mut h = Handshake::new(catalog()).with_tls(mode);
    assert_eq!(h.take_output().len(), 18);
    h.push_input(&1u32.to_be_bytes());
    assert_eq!(h.advance(), Ok(Status::NeedInput));
    h
}

fn send(h: &mut Handshake, bytes: &[u8]) -> (Result<Status, HandshakeError>, Vec<(u32, u32)>) {
    h.push_input(bytes);
    let s = h.advance();
    let r = replies(&h.take_output())
        .into_iter()
        .map(|(o, t, _)| (o, t))
        .collect();
    (s, r)
}

/// STARTTLS, acknowledged, then the TLS handshake "succeeds".
fn start_tls(h: &mut Handshake) {
    let (s, r) = send(h, &opt(OPT_STARTTLS, &[]));
    assert_eq!(s, Ok(Status::StartTls));
    assert_eq!(r, vec![(OPT_STARTTLS, REP_ACK)]);
    h.tls_started();
    assert!(h.tls_active());
}

#[test]
fn required_mode_answers_tls_reqd_to_every_option_before_tls() {
    let mut h = started(TlsMode::Required);
    for (o, data) in [
        (OPT_LIST, Vec::new()),
        (OPT_INFO, go_data("disk")),
        (OPT_GO, go_data("disk")),
        (OPT_STRUCTURED_REPLY, Vec::new()),
        (OPT_LIST_META_CONTEXT, meta_data("disk", "base:allocation")),
        (OPT_SET_META_CONTEXT, meta_data("disk", "base:allocation")),
        (OPT_EXTENDED_HEADERS, Vec::new()),
        (0x0765_4321, vec![1, 2, 3, 4]),
    ] {
        let (s, r) = send(&mut h, &opt(o, &data));
        assert_eq!(s, Ok(Status::NeedInput), "option {o}");
        assert_eq!(r, vec![(o, REP_ERR_TLS_REQD)], "option {o}");
    }
    // The error message tells the user what to do.
    h.push_input(&opt(OPT_GO, &go_data("disk")));
    assert_eq!(h.advance(), Ok(Status::NeedInput));
    let reps = replies(&h.take_output());
    let msg = String::from_utf8(reps[0].2.clone()).unwrap();
    assert!(msg.contains("requires TLS"), "{msg}");
    // Nothing negotiated in plain text survives: structured replies were refused.
    assert!(!h.structured());
    start_tls(&mut h);
    let (s, r) = send(&mut h, &opt(OPT_STRUCTURED_REPLY, &[]));
    assert_eq!(s, Ok(Status::NeedInput));
    assert_eq!(r, vec![(OPT_STRUCTURED_REPLY, REP_ACK)]);
    let (s, r) = send(&mut h, &opt(OPT_GO, &go_data("disk")));
    let Ok(Status::Transmission(neg)) = s else {
        panic!("{s:?}")
    };
    assert!(neg.structured);
    assert_eq!(r.last(), Some(&(OPT_GO, REP_ACK)));
}

#[test]
fn required_mode_export_name_before_tls_ends_the_session() {
    let mut h = started(TlsMode::Required);
    let (s, r) = send(&mut h, &opt(OPT_EXPORT_NAME, b"disk"));
    assert_eq!(s, Err(HandshakeError::TlsRequired));
    assert!(r.is_empty());
    assert_eq!(h.advance(), Err(HandshakeError::Finished));
}

#[test]
fn required_mode_export_name_inside_tls_works() {
    let mut h = started(TlsMode::Required);
    start_tls(&mut h);
    h.push_input(&opt(OPT_EXPORT_NAME, b"disk"));
    assert!(matches!(h.advance(), Ok(Status::Transmission(_))));
    // Size, flags and the 124 zero bytes (the client did not ask for NO_ZEROES).
    assert_eq!(h.take_output().len(), 8 + 2 + 124);
}

#[test]
fn abort_is_allowed_before_tls() {
    let mut h = started(TlsMode::Required);
    let (s, r) = send(&mut h, &opt(OPT_ABORT, &[]));
    assert_eq!(s, Ok(Status::Aborted));
    assert_eq!(r, vec![(OPT_ABORT, REP_ACK)]);
}

#[test]
fn starttls_inside_tls_or_with_data_is_invalid() {
    let mut h = started(TlsMode::Required);
    let (s, r) = send(&mut h, &opt(OPT_STARTTLS, &[1]));
    assert_eq!(s, Ok(Status::NeedInput));
    assert_eq!(r, vec![(OPT_STARTTLS, REP_ERR_INVALID)]);
    start_tls(&mut h);
    let (s, r) = send(&mut h, &opt(OPT_STARTTLS, &[]));
    assert_eq!(s, Ok(Status::NeedInput));
    assert_eq!(r, vec![(OPT_STARTTLS, REP_ERR_INVALID)]);
    // Never TLS_REQD once TLS is up.
    let (_, r) = send(&mut h, &opt(0x0765_4321, &[]));
    assert_eq!(r, vec![(0x0765_4321, REP_ERR_UNSUP)]);
}

#[test]
fn starttls_waits_for_the_caller_and_keeps_early_bytes_out_of_the_options() {
    let mut h = started(TlsMode::Required);
    // The client's TLS ClientHello may already be in the buffer behind STARTTLS.
    let mut bytes = opt(OPT_STARTTLS, &[]);
    bytes.extend_from_slice(&[0x16, 0x03, 0x01, 0x00, 0x05]);
    let (s, _) = send(&mut h, &bytes);
    assert_eq!(s, Ok(Status::StartTls));
    // Until the caller reports the TLS handshake done, nothing else is parsed.
    assert_eq!(h.advance(), Ok(Status::StartTls));
    assert_eq!(h.take_leftover(), vec![0x16, 0x03, 0x01, 0x00, 0x05]);
    h.tls_started();
    assert_eq!(h.advance(), Ok(Status::NeedInput));
}

#[test]
fn starttls_forgets_what_was_negotiated_in_plain_text() {
    let mut h = started(TlsMode::Optional);
    let (_, r) = send(&mut h, &opt(OPT_STRUCTURED_REPLY, &[]));
    assert_eq!(r, vec![(OPT_STRUCTURED_REPLY, REP_ACK)]);
    let (_, r) = send(
        &mut h,
        &opt(OPT_SET_META_CONTEXT, &meta_data("disk", "base:allocation")),
    );
    assert_eq!(r.last(), Some(&(OPT_SET_META_CONTEXT, REP_ACK)));
    assert!(h.structured());
    start_tls(&mut h);
    assert!(!h.structured());
    let (s, _) = send(&mut h, &opt(OPT_GO, &go_data("disk")));
    let Ok(Status::Transmission(neg)) = s else {
        panic!("{s:?}")
    };
    assert!(!neg.structured);
    assert_eq!(neg.base_allocation, None);
    assert_eq!(neg.flags & FLAG_SEND_DF, 0);
}

#[test]
fn optional_mode_serves_plain_clients_too() {
    let mut h = started(TlsMode::Optional);
    let (s, r) = send(&mut h, &opt(OPT_LIST, &[]));
    assert_eq!(s, Ok(Status::NeedInput));
    assert_eq!(r, vec![(OPT_LIST, REP_SERVER), (OPT_LIST, REP_ACK)]);
    let (s, _) = send(&mut h, &opt(OPT_GO, &go_data("disk")));
    assert!(matches!(s, Ok(Status::Transmission(_))));
}

#[test]
fn off_mode_refuses_starttls_and_never_sends_tls_reqd() {
    let mut h = started(TlsMode::Off);
    let (s, r) = send(&mut h, &opt(OPT_STARTTLS, &[]));
    assert_eq!(s, Ok(Status::NeedInput));
    assert_eq!(r, vec![(OPT_STARTTLS, REP_ERR_UNSUP)]);
    // tls_started outside a STARTTLS does nothing.
    h.tls_started();
    assert!(!h.tls_active());
    h.push_input(&opt(OPT_EXPORT_NAME, b"disk"));
    assert!(matches!(h.advance(), Ok(Status::Transmission(_))));
}

#[test]
fn huge_options_before_tls_are_skipped_in_pieces() {
    let mut h = started(TlsMode::Required);
    let mut big = IHAVEOPT.to_be_bytes().to_vec();
    big.extend_from_slice(&OPT_GO.to_be_bytes());
    big.extend_from_slice(&(1u32 << 24).to_be_bytes());
    let (s, r) = send(&mut h, &big);
    assert_eq!((s, r.len()), (Ok(Status::NeedInput), 0));
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..15 {
        let (s, r) = send(&mut h, &chunk);
        assert_eq!((s, r.len()), (Ok(Status::NeedInput), 0));
        assert!(h.input.len() <= chunk.len());
    }
    let (_, r) = send(&mut h, &chunk);
    assert_eq!(r, vec![(OPT_GO, REP_ERR_TLS_REQD)]);
    // STARTTLS with an oversized payload is too big, not a TLS start.
    let mut big = IHAVEOPT.to_be_bytes().to_vec();
    big.extend_from_slice(&OPT_STARTTLS.to_be_bytes());
    big.extend_from_slice(&(MAX_OPTION_DATA + 1).to_be_bytes());
    big.extend_from_slice(&vec![0u8; MAX_OPTION_DATA as usize + 1]);
    let (s, r) = send(&mut h, &big);
    assert_eq!(s, Ok(Status::NeedInput));
    assert_eq!(r, vec![(OPT_STARTTLS, REP_ERR_TOO_BIG)]);
    start_tls(&mut h);
}

#[test]
fn once_shutdown_began_options_get_err_shutdown_and_end_the_handshake() {
    // An option answered normally, then shutdown begins.
    let mut h = started(TlsMode::Off);
    let (s, r) = send(&mut h, &opt(OPT_LIST, &[]));
    assert_eq!(s, Ok(Status::NeedInput));
    assert_eq!(r.last(), Some(&(OPT_LIST, REP_ACK)));
    h.shutting_down();
    let (s, r) = send(&mut h, &opt(OPT_GO, &go_data("disk")));
    assert_eq!(s, Ok(Status::Aborted));
    assert_eq!(r, vec![(OPT_GO, REP_ERR_SHUTDOWN)]);
    // EXPORT_NAME has no error reply: the handshake ends with an error.
    let mut h = started(TlsMode::Off);
    h.shutting_down();
    let (s, r) = send(&mut h, &opt(OPT_EXPORT_NAME, b"disk"));
    assert_eq!(s, Err(HandshakeError::ShuttingDown));
    assert!(r.is_empty());
    // ABORT is still acknowledged.
    let mut h = started(TlsMode::Off);
    h.shutting_down();
    let (s, r) = send(&mut h, &opt(OPT_ABORT, &[]));
    assert_eq!(s, Ok(Status::Aborted));
    assert_eq!(r, vec![(OPT_ABORT, REP_ACK)]);
}
