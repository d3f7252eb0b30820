//! Fuzzes the NBD handshake (option haggling, with and without TLS, during shutdown) and
//! the requests that follow it: `cowsnap_nbd::fuzzing::handshake`, which the stable corpus
//! replay (`crates/cowsnap-nbd/tests/fuzz_corpus.rs`) runs too.
//!
//! Run from this directory with `cargo +nightly fuzz run nbd_handshake corpus/nbd_handshake seeds/nbd_handshake`:
//! `seeds/` is the checked-in corpus, `corpus/` (ignored) collects what the fuzzer finds.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cowsnap_nbd::fuzzing::handshake(data);
});
