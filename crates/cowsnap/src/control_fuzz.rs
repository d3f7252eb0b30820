//! The fuzz entry point of the control protocol: one request line as a client sends it,
//! decoded as the daemon decodes it ([`decode_request`]). The cargo-fuzz target
//! `fuzz/fuzz_targets/control_request.rs` compiles this file and `control.rs` as modules
//! of its own (the `cowsnap` package has no library); the tests below replay the
//! checked-in corpus through it on stable Rust.

use crate::control::{decode_request, Request};

/// Decodes the input's first line; a request that decodes must survive its own
/// validation and a round trip through its encoding. Panics are the bugs.
pub fn request(data: &[u8]) {
    let line = data.split(|&b| b == b'\n').next().unwrap_or_default();
    let Ok(req) = decode_request(line) else {
        return;
    };
    if let Request::CreateSnapshot(spec) = &req {
        let _ = spec.to_request();
    }
    let text = serde_json::to_string(&req).expect("a decoded request encodes");
    assert!(
        decode_request(text.as_bytes()).is_ok(),
        "{text} does not decode again"
    );
}

#[cfg(test)]
mod tests {
    use cowsnap_core::testkit::{corpus_dir, replay_corpus};

    use super::*;

    #[test]
    fn the_control_corpus_and_its_mutations_never_panic() {
        replay_corpus("control_request", 300, request);
    }

    #[test]
    fn the_corpus_holds_every_request_kind() {
        let mut kinds = std::collections::HashSet::new();
        for f in std::fs::read_dir(corpus_dir("control_request")).expect("corpus") {
            let data = std::fs::read(f.expect("entry").path()).expect("read");
            if let Ok(req) = decode_request(&data) {
                kinds.insert(std::mem::discriminant(&req));
            }
        }
        assert_eq!(
            kinds.len(),
            6,
            "list, status, create, remove, merge and merge-control requests"
        );
    }
}
