//! Entry points for fuzzing the codec: each takes arbitrary bytes as a client would send
//! them and drives a decoder the way the server does. They return nothing; a panic is the
//! bug. The cargo-fuzz targets in `fuzz/` and the corpus replay test
//! (`tests/fuzz_corpus.rs`) call these same functions.

use crate::codec::consts::*;
use crate::codec::reply::{decode_block_status, decode_error_payload};
use crate::codec::{
    validate, BlockSizes, Catalog, Command, ExportInfo, Handshake, Limits, Negotiated, ReplyHeader,
    RequestHeader, Status, TlsMode, REQUEST_HEADER_LEN,
};

/// Export size the entry points serve.
const SIZE: u64 = 1 << 20;

fn catalog(default_export: bool) -> Catalog {
    let export = |name: &str, read_only| ExportInfo {
        name: name.into(),
        description: format!("{name} disk"),
        size: SIZE,
        read_only,
        multi_conn: true,
    };
    Catalog {
        exports: vec![export("disk", false), export("ro", true)],
        default_export: default_export.then(|| "disk".to_string()),
        block_sizes: BlockSizes::default(),
    }
}

/// The handshake, then transmission: byte 0 picks the TLS mode, whether shutdown has
/// begun and how the rest is cut into reads; the rest is the client's byte stream. After
/// `STARTTLS` the stream goes on as if TLS were up (it is the decrypted stream). Once transmission starts, what follows
/// is decoded as requests with the negotiated limits. Returns what was negotiated, if
/// transmission started (tests check that a corpus goes that deep).
pub fn handshake(data: &[u8]) -> Option<Negotiated> {
    let (&ctl, stream) = data.split_first()?;
    let tls = match ctl & 3 {
        0 => TlsMode::Off,
        1 => TlsMode::Optional,
        _ => TlsMode::Required,
    };
    let mut h = Handshake::new(catalog(ctl & 4 != 0)).with_tls(tls);
    if ctl & 8 != 0 {
        h.shutting_down();
    }
    let split = usize::from(ctl >> 4) + 1;
    let mut chunks = stream.chunks(split);
    let negotiated = loop {
        match h.advance() {
            Ok(Status::NeedInput) => {}
            Ok(Status::Transmission(n)) => break n,
            Ok(Status::StartTls) => {
                // The server would run TLS on what follows; here the bytes already received
                // and the rest of the stream are what TLS decrypted.
                let early = h.take_leftover();
                h.tls_started();
                h.push_input(&early);
                continue;
            }
            Ok(Status::Aborted) | Err(_) => return None,
        }
        let out = h.take_output();
        assert!(out.len() <= 64 << 20, "a reply of {} bytes", out.len());
        match chunks.next() {
            Some(c) => h.push_input(c),
            None => return None,
        }
    };
    assert!(negotiated.size == SIZE, "negotiated {negotiated:?}");
    let mut rest = h.take_leftover();
    for c in chunks {
        rest.extend_from_slice(c);
    }
    let limits = Limits {
        size: negotiated.size,
        flags: negotiated.flags,
        structured: negotiated.structured,
        base_allocation: negotiated.base_allocation,
        block_sizes: negotiated.block_sizes,
    };
    requests_with(&rest, &limits);
    Some(negotiated)
}

/// Transmission requests: bytes 0 and 1 pick the limits (flags, structured replies, block
/// sizes); the rest is a stream of request headers, each `WRITE` followed by its payload.
/// The same bytes also go through the reply decoders that clients and tests use.
pub fn request(data: &[u8]) {
    let [a, b, rest @ ..] = data else {
        return;
    };
    let block_sizes = match b & 3 {
        0 => BlockSizes::default(),
        1 => BlockSizes {
            min: 1,
            preferred: 4096,
            max: 32 << 20,
        },
        2 => BlockSizes {
            min: 4096,
            preferred: 4096,
            max: 64 << 10,
        },
        _ => BlockSizes {
            min: 512,
            preferred: 512,
            max: 512,
        },
    };
    let limits = Limits {
        size: SIZE,
        flags: u16::from(*a) << 8 | u16::from(*b) | FLAG_HAS_FLAGS,
        structured: b & 4 != 0,
        base_allocation: (b & 8 != 0).then_some(1),
        block_sizes,
    };
    requests_with(rest, &limits);
    let _ = ReplyHeader::decode(rest);
    let _ = decode_error_payload(u16::from_be_bytes([*a, *b]), rest);
    let _ = decode_block_status(rest);
}

/// Decodes and checks requests until the stream ends or a header is bad (where the
/// server would hang up). Whatever passes lies inside the export.
fn requests_with(mut stream: &[u8], limits: &Limits) {
    while stream.len() >= REQUEST_HEADER_LEN {
        let Ok(h) = RequestHeader::decode(stream) else {
            return;
        };
        stream = &stream[REQUEST_HEADER_LEN..];
        if let Ok(cmd) = validate(&h, limits) {
            let (offset, length) = match cmd {
                Command::Read { offset, length }
                | Command::Write { offset, length, .. }
                | Command::Trim { offset, length, .. }
                | Command::Cache { offset, length }
                | Command::WriteZeroes { offset, length, .. }
                | Command::BlockStatus { offset, length, .. } => (offset, length),
                Command::Flush | Command::Disconnect => (0, 0),
            };
            assert!(
                offset + u64::from(length) <= limits.size,
                "{cmd:?} passed validation outside a {} byte export",
                limits.size
            );
        }
        let payload = usize::try_from(h.payload_len()).unwrap_or(usize::MAX);
        stream = stream.get(payload..).unwrap_or_default();
    }
}
