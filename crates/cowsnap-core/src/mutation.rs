//! Mutation switches: named ways to remove one safety rule, so a test can show that it
//! notices the rule missing (`scripts/mutation-check.sh`).
//!
//! Each switch sits in the code beside the rule it removes, as
//! `if mutation::active("name") { ... }`. Without the `mutations` cargo feature,
//! [`active`] is a constant `false` and the compiler removes the branch: release builds and
//! ordinary test builds contain no switch. With the feature, the switch named by the
//! environment variable [`ENV`] is on for the whole process (and the daemons it starts,
//! which inherit the environment). Unlike rewriting the source, a switch survives
//! formatting and refactoring, and every mutation runs from one build.

/// The environment variable naming the one switch that is on.
pub const ENV: &str = "COWSNAP_MUTATION";

/// True when the mutation `name` is switched on (only ever with the `mutations` feature).
#[cfg(feature = "mutations")]
pub fn active(name: &str) -> bool {
    static ON: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ON.get_or_init(|| std::env::var(ENV).ok())
        .as_deref()
        .is_some_and(|on| on == name)
}

/// True when the mutation `name` is switched on (only ever with the `mutations` feature).
#[cfg(not(feature = "mutations"))]
#[inline(always)]
pub const fn active(_name: &str) -> bool {
    false
}
