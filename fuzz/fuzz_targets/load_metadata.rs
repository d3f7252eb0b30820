//! Fuzzes the persistent metadata loader: the input is a COW image (its first byte picks
//! a chunk size to ask for and whether to force a valid header). Opening, loading, the
//! snapshot loader and the inspection tools must return errors, never panic. The entry
//! point is `cowsnap_core::testkit::fuzz::load_metadata`, which the stable corpus replay
//! (a cowsnap-core unit test) runs too.
//!
//! Run from this directory with `cargo +nightly fuzz run load_metadata corpus/load_metadata seeds/load_metadata`:
//! `seeds/` is the checked-in corpus, `corpus/` (ignored) collects what the fuzzer finds.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cowsnap_core::testkit::fuzz::load_metadata(data));
