//! Fuzzes the control socket's request decoding: `control_fuzz::request`, which the stable
//! corpus replay (a unit test of the `cowsnap` binary) runs too. The `cowsnap` package is a
//! binary only, so its two source files are compiled here as modules.
//!
//! Run from this directory with `cargo +nightly fuzz run control_request corpus/control_request seeds/control_request`:
//! `seeds/` is the checked-in corpus, `corpus/` (ignored) collects what the fuzzer finds.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../crates/cowsnap/src/control.rs"]
mod control;
#[path = "../../crates/cowsnap/src/control_fuzz.rs"]
mod control_fuzz;

fuzz_target!(|data: &[u8]| control_fuzz::request(data));
