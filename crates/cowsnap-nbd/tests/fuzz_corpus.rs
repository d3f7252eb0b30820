//! The NBD fuzz targets on stable Rust: each target's checked-in corpus
//! (`fuzz/seeds/TARGET/`) and seeded mutations of it go through the entry point the
//! cargo-fuzz target calls; a decoder that panics fails the test.

#![allow(clippy::unwrap_used)]

use cowsnap_core::testkit::{corpus_dir, replay_corpus};
use cowsnap_nbd::fuzzing;

#[test]
fn the_handshake_corpus_and_its_mutations_never_panic() {
    replay_corpus("nbd_handshake", 300, |data| {
        fuzzing::handshake(data);
    });
}

#[test]
fn the_request_corpus_and_its_mutations_never_panic() {
    replay_corpus("nbd_request", 300, fuzzing::request);
}

/// The corpus goes past the handshake: with structured replies and `base:allocation`,
/// after STARTTLS, and by `NBD_OPT_EXPORT_NAME`.
#[test]
fn the_handshake_corpus_reaches_transmission() {
    let run = |name: &str| {
        fuzzing::handshake(&std::fs::read(corpus_dir("nbd_handshake").join(name)).unwrap())
    };
    let n = run("go-structured-meta-requests").expect("transmission");
    assert!(n.structured && n.base_allocation.is_some(), "{n:?}");
    assert!(run("starttls-required").is_some());
    assert!(run("starttls-optional-trickle").is_some());
    assert!(run("export-name-oldstyle-flags").is_some());
    assert!(run("list-info-abort").is_none());
}
