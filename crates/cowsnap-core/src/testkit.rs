//! The test kit: what every crate's tests share. Compiled only for this crate's own tests
//! and with the `test-util` cargo feature, which the other crates enable in their
//! `[dev-dependencies]`; the library proper never contains it.
//!
//! * **Seeds.** A randomised test calls [`seed`] once: it reads [`SEED_ENV`]
//!   (`COWSNAP_SEED`) or picks a fresh seed, and prints it as
//!   `TEST: seed N (rerun with COWSNAP_SEED=N)`; the harness shows the line when the test
//!   fails. [`SplitMix`] is a small generator for tests that need no `rand`.
//! * **Data.** [`pattern`] gives bytes that depend on a seed and on the sector they are
//!   written to, so a misplaced sector never compares equal.
//! * **Temporary directories.** [`scratch`] makes a directory that is removed when its
//!   [`Scratch`] drops, including when the test panics; set [`KEEP_ENV`]
//!   (`COWSNAP_KEEP_SCRATCH=1`) to keep the directories of failed tests for a look (their
//!   paths are printed).
//! * **External tools.** [`require_tools`] checks that the tools a test drives exist. A
//!   missing tool prints a `SKIP` line and the test returns early, except under CI: when
//!   [`CI_ENV`] (`CI`, which `.ci/run` exports) is set, a missing tool fails the test, so
//!   CI never passes by skipping.
//! * **Waiting.** [`wait_for`] waits until another thread reached a point the test can
//!   observe (a gate's arrival count, a wait counter), so threads are ordered by events
//!   rather than by sleeps; it fails after a minute (a deadlock).
//! * **Devices.** [`FaultyDevice`](crate::dev::FaultyDevice),
//!   [`GatedDevice`](crate::dev::GatedDevice), [`CrashDevice`](crate::dev::CrashDevice)
//!   and [`PowerDomain`](crate::dev::PowerDomain) in [`dev`](crate::dev) are behind the
//!   same feature.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The variable that fixes the seed of every randomised test.
pub const SEED_ENV: &str = "COWSNAP_SEED";

/// The variable that, when set (and not `0` or `false`), makes a missing tool a failure.
pub const CI_ENV: &str = "CI";

/// The variable that, when set (and not `0` or `false`), keeps the scratch directories of
/// failed tests.
pub const KEEP_ENV: &str = "COWSNAP_KEEP_SCRATCH";

fn flag(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// True under CI ([`CI_ENV`] set): a missing tool then fails a test.
pub fn ci() -> bool {
    flag(CI_ENV)
}

/// The name of the running test (the harness names each test's thread after it).
fn test_name() -> String {
    std::thread::current().name().unwrap_or("test").to_string()
}

/// The seed of a randomised test: [`SEED_ENV`] if set, otherwise a fresh one. Prints it
/// as `TEST: seed N (rerun with COWSNAP_SEED=N)`. Call it once, on the test's thread.
///
/// # Panics
/// When [`SEED_ENV`] is set to something that is not a number.
pub fn seed() -> u64 {
    let seed = match std::env::var(SEED_ENV) {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{SEED_ENV}={s:?} is not a number")),
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            SplitMix(t ^ u64::from(std::process::id()).rotate_left(32)).next_u64()
        }
    };
    eprintln!(
        "{}: seed {seed} (rerun with {SEED_ENV}={seed})",
        test_name()
    );
    seed
}

/// Waits until `cond` holds, polling; fails the test after 60 s, naming `what`. Use it to
/// observe that another thread reached a blocking point, never to assert timing.
///
/// # Panics
/// When `cond` does not hold within 60 s.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    let mut polls = 0u32;
    while !cond() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "{what}: not reached in 60 s (deadlock?)"
        );
        // Spin briefly (the other thread is usually almost there), then poll every
        // millisecond so that a long wait leaves the CPU to the threads doing the work.
        polls += 1;
        if polls < 1000 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

/// [`wait_for`] with an anonymous condition.
pub fn wait_until(cond: impl FnMut() -> bool) {
    wait_for("condition", cond);
}

/// A tiny seeded generator (SplitMix64), good enough to pick test inputs.
#[derive(Clone, Debug)]
pub struct SplitMix(pub u64);

impl SplitMix {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`; slightly biased, which tests do not mind).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// `len` bytes of the pattern `seed` as found at byte `offset` of a device: each 512-byte
/// sector holds different pseudo-random bytes, determined by `seed` and the sector's index.
pub fn pattern(seed: u64, offset: u64, len: u64) -> Vec<u8> {
    let first = offset / 512;
    let end = (offset + len).div_ceil(512);
    let mut v = Vec::with_capacity(((end - first) * 512) as usize);
    for sector in first..end {
        let mut x = seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(sector.wrapping_mul(0xD1B5_4A32_D192_ED03))
            | 1;
        for _ in 0..64 {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(&x.to_le_bytes());
        }
    }
    let skip = (offset - first * 512) as usize;
    v.drain(..skip);
    v.truncate(len as usize);
    v
}

/// A temporary directory, removed when dropped, also when the test panics, unless
/// [`KEEP_ENV`] asks to keep it then.
#[derive(Debug)]
pub struct Scratch {
    dir: Option<tempfile::TempDir>,
}

/// A fresh directory under the system's temporary directory, its name starting with
/// `cowsnap-TAG-`.
pub fn scratch(tag: &str) -> Scratch {
    let dir = tempfile::Builder::new()
        .prefix(&format!("cowsnap-{tag}-"))
        .tempdir()
        .expect("create a scratch directory");
    Scratch { dir: Some(dir) }
}

impl Scratch {
    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("scratch directory").path()
    }

    /// `DIR/name`.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path().join(name)
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        self.path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        if std::thread::panicking() && flag(KEEP_ENV) {
            let kept = dir.keep();
            let _ = writeln!(
                std::io::stderr(),
                "{}: kept {} ({KEEP_ENV} is set)",
                test_name(),
                kept.display()
            );
        }
    }
}

/// True when `tool` is an executable on `PATH`. Two names are probes rather than
/// programs: `python3-nbd` (Debian's `/usr/bin/python3` with the libnbd module) and
/// `fio-nbd` (fio built with its NBD engine).
pub fn have_tool(tool: &str) -> bool {
    match tool {
        "python3-nbd" => Command::new("/usr/bin/python3")
            .args(["-c", "import nbd"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        "fio-nbd" => Command::new("fio")
            .arg("--enghelp")
            .stderr(Stdio::null())
            .output()
            .is_ok_and(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l.trim() == "nbd")
            }),
        _ => std::env::var_os("PATH").is_some_and(|path| {
            std::env::split_paths(&path).any(|d| {
                std::fs::metadata(d.join(tool)).is_ok_and(|m| {
                    m.is_file()
                        && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
                })
            })
        }),
    }
}

/// True when every tool in `tools` is there (see [`have_tool`]). Otherwise: under CI
/// ([`CI_ENV`]) the test fails; elsewhere a `SKIP TEST: missing ...` line goes straight to
/// stderr (past the harness's capture) and the result is false, for the test to return.
///
/// # Panics
/// Under CI, when a tool is missing.
pub fn require_tools(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have_tool(t)).collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "{}: missing {} (Debian: apt-get install qemu-utils libnbd-bin python3-libnbd fio nbdkit fuse3 e2fsprogs openssl)",
        test_name(),
        missing.join(", ")
    );
    assert!(
        !ci(),
        "{CI_ENV} is set and a required tool is missing: {msg}"
    );
    let _ = writeln!(std::io::stderr(), "SKIP {msg}");
    false
}

/// [`require_tools`] for one tool.
pub fn require_tool(tool: &str) -> bool {
    require_tools(&[tool])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_depends_on_the_sector_and_slices_consistently() {
        let whole = pattern(7, 0, 4096);
        assert_eq!(whole.len(), 4096);
        assert_eq!(pattern(7, 1024, 512), whole[1024..1536]);
        assert_eq!(pattern(7, 100, 1000), whole[100..1100]);
        assert_ne!(whole[..512], whole[512..1024]);
        assert_ne!(pattern(8, 0, 512), whole[..512]);
    }

    #[test]
    fn scratch_directories_go_away() {
        let s = scratch("kit");
        let p = s.path().to_path_buf();
        std::fs::write(s.join("f"), b"x").unwrap();
        assert!(p.is_dir());
        drop(s);
        assert!(!p.exists());
    }

    #[test]
    fn a_present_tool_is_found_and_an_absent_one_is_not() {
        assert!(have_tool("sh"));
        assert!(!have_tool("cowsnap-no-such-tool"));
    }

    #[test]
    fn split_mix_is_deterministic() {
        let (mut a, mut b) = (SplitMix(5), SplitMix(5));
        assert_eq!(a.next_u64(), b.next_u64());
        assert!(a.below(10) < 10);
    }
}
