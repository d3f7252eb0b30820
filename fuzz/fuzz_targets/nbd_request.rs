//! Fuzzes the NBD request decoder and checks (and the reply decoders clients use):
//! `cowsnap_nbd::fuzzing::request`, which the stable corpus replay
//! (`crates/cowsnap-nbd/tests/fuzz_corpus.rs`) runs too.
//!
//! Run from this directory with `cargo +nightly fuzz run nbd_request corpus/nbd_request seeds/nbd_request`:
//! `seeds/` is the checked-in corpus, `corpus/` (ignored) collects what the fuzzer finds.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cowsnap_nbd::fuzzing::request(data));
