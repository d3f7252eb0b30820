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
//! * **Fuzz corpora.** [`replay_corpus`] runs a fuzz target's entry point on stable Rust:
//!   every file of its checked-in corpus (`fuzz/seeds/TARGET/`), then seeded mutations of
//!   them. [`fuzz::load_metadata`] is the entry point of the `load_metadata` target.
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

/// The checked-in corpus of the fuzz target `target`: `fuzz/seeds/TARGET/` of the source
/// tree.
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds")
        .join(target)
}

/// Runs `entry` (a fuzz target's entry point, which panics on a bug) on every file of the
/// target's corpus ([`corpus_dir`]), then on `rounds` seeded mutations of each (see
/// [`seed`]). A panic is reported with the input that caused it and then fails the test.
///
/// # Panics
/// When the corpus is missing or empty, or `entry` panics.
pub fn replay_corpus(target: &str, rounds: usize, entry: impl Fn(&[u8])) {
    let dir = corpus_dir(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fuzz corpus {}: {e}", dir.display()))
        .map(|f| {
            let f = f.expect("corpus entry");
            let name = f.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(f.path()).expect("read a corpus file"))
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "fuzz corpus {} is empty", dir.display());
    let run = |what: &dyn Fn() -> String, input: &[u8]| {
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| entry(input)))
        {
            let shown = &input[..input.len().min(256)];
            eprintln!(
                "{target}: {} ({} bytes) panicked; first bytes: {}",
                what(),
                input.len(),
                shown.escape_ascii()
            );
            std::panic::resume_unwind(panic);
        }
    };
    for (name, data) in &files {
        run(&|| format!("corpus file {name}"), data);
    }
    let seed = seed();
    let mut rng = SplitMix(seed);
    for round in 0..rounds {
        for (i, (name, data)) in files.iter().enumerate() {
            let other = &files[(i + 1 + round) % files.len()].1;
            let input = mutate(&mut rng, data, other);
            run(
                &|| format!("mutation {round} of {name} (seed {seed})"),
                &input,
            );
        }
    }
}

/// One to four random edits of `data`: bit flips, boundary values, inserted, removed or
/// repeated bytes, truncation, or a splice with `other`.
fn mutate(rng: &mut SplitMix, data: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    for _ in 0..=rng.below(4) {
        let at = |rng: &mut SplitMix, len: usize| rng.below(len as u64 + 1) as usize;
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = at(rng, v.len() - 1);
                v[i] ^= 1 << rng.below(8);
            }
            1 if v.len() >= 4 => {
                let i = at(rng, v.len() - 4);
                let value: u32 = match rng.below(5) {
                    0 => 0,
                    1 => 1,
                    2 => u32::MAX,
                    3 => 0x8000_0000,
                    _ => v.len() as u32,
                };
                v[i..i + 4].copy_from_slice(&value.to_be_bytes());
            }
            2 => {
                let i = at(rng, v.len());
                let n = rng.below(16) as usize;
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                v.splice(i..i, bytes);
            }
            3 if !v.is_empty() => {
                let i = at(rng, v.len() - 1);
                let n = (rng.below(32) as usize).min(v.len() - i);
                v.drain(i..i + n);
            }
            4 => {
                let n = at(rng, v.len());
                v.truncate(n);
            }
            5 if !v.is_empty() => {
                let i = at(rng, v.len() - 1);
                let n = (rng.below(64) as usize + 1).min(v.len() - i);
                let piece = v[i..i + n].to_vec();
                v.splice(i..i, piece);
            }
            _ => {
                let cut = at(rng, v.len());
                let from = at(rng, other.len());
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
        }
    }
    v
}

/// Entry points of the fuzz targets of this crate (`fuzz/fuzz_targets/`).
pub mod fuzz {
    use std::sync::Arc;

    use crate::copy::Copier;
    use crate::dev::{BlockDevice, MemDevice};
    use crate::exception::persistent::{format, inspect};
    use crate::exception::{ExceptionStore, PersistentStore};
    use crate::targets::{Origin, Snapshot};
    use crate::units::{Chunk, ChunkSize};

    /// The persistent metadata loader: the input is a COW image whose first byte picks a
    /// chunk size to ask for and whether to force a valid header. Opening, loading, the
    /// snapshot loader and the inspection tools must return errors, never panic.
    pub fn load_metadata(data: &[u8]) {
        let Some((&ctl, rest)) = data.split_first() else {
            return;
        };
        let mut img = rest.to_vec();
        let chunk = ChunkSize::from_sectors(8 << (ctl & 3)).ok();
        if ctl & 4 != 0 && img.len() >= 16 {
            if let Some(cs) = chunk {
                img[..16].copy_from_slice(&format::encode_header(ctl & 8 != 0, cs)[..16]);
            }
        }
        let _ = inspect::check(&MemDevice::from_bytes(&img));
        let _ = inspect::dump(&MemDevice::from_bytes(&img));
        let _ = inspect::export(
            &MemDevice::new(1 << 20),
            &MemDevice::from_bytes(&img),
            &MemDevice::new(1 << 20),
            &mut |_, _| {},
        );
        let cow = Arc::new(MemDevice::from_bytes(&img));
        if let Ok(store) = PersistentStore::open(cow, chunk, ctl & 16 != 0) {
            let store = Arc::new(store);
            let origin = Origin::new(
                Arc::new(MemDevice::new(64 << 20)),
                Arc::new(Copier::default()),
            );
            if let Ok(snap) = Snapshot::load(&origin, store.clone()) {
                let _ = origin.activate(&snap);
                let mut buf = [0u8; 4096];
                let _ = snap.read_at(&mut buf, 0);
                let _ = store.prepare(Chunk(1));
                let _ = snap.status().to_string();
            }
        }
    }
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
    fn the_load_metadata_corpus_and_its_mutations_never_panic() {
        replay_corpus("load_metadata", 200, fuzz::load_metadata);
    }

    #[test]
    fn mutations_change_the_input_and_stay_reproducible() {
        let data = pattern(1, 0, 512);
        let (mut a, mut b) = (SplitMix(9), SplitMix(9));
        let changed = (0..20)
            .filter(|_| mutate(&mut a, &data, b"other") != data)
            .count();
        assert!(
            changed > 10,
            "only {changed} of 20 mutations changed the input"
        );
        for _ in 0..20 {
            mutate(&mut b, &data, b"other");
        }
        assert_eq!(a.next_u64(), b.next_u64(), "same seed, same mutations");
    }

    #[test]
    fn split_mix_is_deterministic() {
        let (mut a, mut b) = (SplitMix(5), SplitMix(5));
        assert_eq!(a.next_u64(), b.next_u64());
        assert!(a.below(10) < 10);
    }
}

/// Tagged sectors, for crash tests that must tell which write a sector holds: every
/// 16-byte record of a sector is an 8-byte tag (the write's) and the sector's number, so a
/// torn or misplaced sector is seen too.
pub mod tagged {
    /// The tag of write number `i`: `W` and seven digits.
    pub fn tag(i: usize) -> [u8; 8] {
        let s = format!("W{:07}", i % 10_000_000);
        let mut t = [0u8; 8];
        t.copy_from_slice(s.as_bytes());
        t
    }

    /// Sectors `start..start+count` stamped with `tag`.
    pub fn sectors(tag: &[u8; 8], start: u64, count: u64) -> Vec<u8> {
        let mut v = Vec::with_capacity(crate::units::mem_usize(count * 512));
        for s in start..start + count {
            for _ in 0..32 {
                v.extend_from_slice(tag);
                v.extend_from_slice(&s.to_le_bytes());
            }
        }
        v
    }

    /// The tag one sector's bytes hold, checking that they are one whole record of `sector`.
    pub fn sector_tag(data: &[u8], sector: u64) -> Result<[u8; 8], String> {
        let mut t = [0u8; 8];
        t.copy_from_slice(&data[..8]);
        for rec in data.chunks(16) {
            if rec[..8] != t || rec[8..] != sector.to_le_bytes() {
                return Err(format!(
                    "sector {sector} is not one whole record: starts {:?}",
                    String::from_utf8_lossy(&data[..16])
                ));
            }
        }
        Ok(t)
    }
}
