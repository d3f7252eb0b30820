//! The NBD protocol as a sans-IO codec: bytes in, typed messages and encoded replies out.
//!
//! Nothing here touches a socket, a thread or a device. [`handshake`] is the option-haggling
//! state machine, [`request`] decodes and checks transmission requests, [`reply`] encodes
//! (and decodes) simple and structured replies, and [`consts`] holds the protocol's numbers.
//! Decoders read through [`cursor::Cursor`] and return errors on malformed input; none of
//! them panics on wire data.

pub mod consts;
pub mod cursor;
pub mod handshake;
pub mod reply;
pub mod request;

pub use handshake::{
    transmission_flags, BlockSizes, Catalog, ExportInfo, Handshake, HandshakeError, Negotiated,
    Status, TlsMode,
};
pub use reply::{ReadReply, ReplyHeader};
pub use request::{
    validate, Command, HeaderError, Limits, Rejection, RequestHeader, REQUEST_HEADER_LEN,
};

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small constants"
)]
mod fuzz {
    //! Arbitrary wire data never makes a decoder panic.

    use super::consts::*;
    use super::*;
    use proptest::prelude::*;

    fn catalog() -> Catalog {
        Catalog {
            exports: vec![ExportInfo {
                name: "a".into(),
                description: "d".into(),
                size: 1 << 20,
                read_only: false,
                multi_conn: true,
            }],
            default_export: None,
            block_sizes: BlockSizes::default(),
        }
    }

    /// Options with plausible headers and arbitrary payloads, so parsing goes deep.
    fn option() -> impl Strategy<Value = Vec<u8>> {
        (0u32..13, proptest::collection::vec(any::<u8>(), 0..64)).prop_map(|(o, data)| {
            let mut v = IHAVEOPT.to_be_bytes().to_vec();
            v.extend_from_slice(&o.to_be_bytes());
            v.extend_from_slice(&(data.len() as u32).to_be_bytes());
            v.extend_from_slice(&data);
            v
        })
    }

    proptest! {
        #[test]
        fn handshake_survives_arbitrary_bytes(
            raw in proptest::collection::vec(any::<u8>(), 0..512),
            split in 1usize..64,
        ) {
            let mut h = Handshake::new(catalog());
            for chunk in raw.chunks(split) {
                h.push_input(chunk);
                if !matches!(h.advance(), Ok(Status::NeedInput)) {
                    break;
                }
            }
        }

        #[test]
        fn handshake_survives_arbitrary_options(
            opts in proptest::collection::vec(option(), 0..12),
            split in 1usize..40,
        ) {
            let mut h = Handshake::new(catalog());
            let mut stream = 1u32.to_be_bytes().to_vec();
            for o in &opts {
                stream.extend_from_slice(o);
            }
            let mut out = Vec::new();
            let mut still_haggling = true;
            for chunk in stream.chunks(split) {
                h.push_input(chunk);
                let st = h.advance();
                out.extend(h.take_output());
                if !matches!(st, Ok(Status::NeedInput)) {
                    still_haggling = false;
                    break;
                }
            }
            // While haggling, the output after the greeting is well-formed option replies,
            // each naming an option the client sent.
            if still_haggling {
                let mut c = cursor::Cursor::new(out.get(18..).unwrap_or_default());
                while c.remaining() > 0 {
                    prop_assert_eq!(c.u64(), Ok(REPLY_MAGIC));
                    let opt = c.u32().expect("option");
                    prop_assert!(opt < 13);
                    let _ty = c.u32().expect("type");
                    let len = c.u32().expect("length");
                    prop_assert!(c.bytes(len as usize).is_ok());
                }
            }
        }

        #[test]
        fn requests_survive_arbitrary_headers(raw in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = RequestHeader::decode(&raw);
            let mut hdr = raw.clone();
            hdr.resize(28, 0);
            hdr[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            RequestHeader::decode(&hdr).expect("magic is right");
            // Limits bytes: flags 0xded, structured replies, base:allocation, default
            // block sizes; whatever passes validation must lie inside the export.
            let mut input = vec![0x0d, 0xec];
            input.extend_from_slice(&hdr);
            crate::fuzzing::request(&input);
        }

        #[test]
        fn reply_decoders_survive_arbitrary_bytes(raw in proptest::collection::vec(any::<u8>(), 0..64), ty in any::<u16>()) {
            let _ = ReplyHeader::decode(&raw);
            let _ = reply::decode_error_payload(ty, &raw);
            let _ = reply::decode_block_status(&raw);
        }
    }
}
