//! Memory and activation time of the exception table, measured on large kernel-format COWs.
//!
//! It writes persistent COW files in the kernel's format (header and metadata areas only,
//! the data chunks left as holes) holding millions of exceptions with random, distinct
//! `old` chunks and the dense `new` layout, then activates a snapshot on them in a fresh
//! process and reports the time and the growth of `VmRSS`/`VmHWM`. It is the baseline for
//! the bounded exception cache with its on-disk sidecar index: the step being replaced is
//! [`activate`], one small function, so switching to the new API is a one-place change.
//! Results and exact commands: `bench/experiments/cache-baseline.md`.
//!
//! Build and run (release, from the workspace):
//!
//! ```text
//! cargo build --release -p cowsnap-core --example cachebench
//! B=target/release/examples/cachebench
//! $B mkcow /tmp/c.cow --chunk-sectors 8 --exceptions 1048576 --origin-chunks 16777216
//! $B activate /tmp/c.cow --repeat 3 [--cold]
//! $B seqread /tmp/c.cow [--cold]
//! $B lookup /tmp/c.cow --n 1000000
//! ```
//!
//! Every subcommand prints one JSON line per measurement on stdout. `--cold` drops the
//! COW's pages from the page cache (`fdatasync` + `POSIX_FADV_DONTNEED`) before measuring.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cowsnap_core::copy::Copier;
use cowsnap_core::dev::{BlockDevice, FileDevice};
use cowsnap_core::exception::persistent::format::{self, Geometry, HeaderState, ENTRY_BYTES};
use cowsnap_core::exception::{Exception, PersistentStore};
use cowsnap_core::targets::{Origin, Snapshot};
use cowsnap_core::units::{mem_usize, Chunk, ChunkSize};

type Res<T> = Result<T, String>;

const USAGE: &str = "usage:
  cachebench mkcow FILE --chunk-sectors S --exceptions N --origin-chunks M [--seed X]
      write a kernel-format COW (FILE) with N random exceptions over an origin of M chunks,
      and the sparse origin FILE.origin
  cachebench activate FILE [--repeat K] [--cold]
      activate a snapshot on FILE K times (default 1), each in a fresh child process
  cachebench seqread FILE [--cold]
      read every metadata area of FILE in order, one chunk-sized buffered read each
  cachebench lookup FILE --n N [--seed X]
      after activation, time N random hit and N random miss lookups (best of 5 rounds)";

/// Lookup rounds; the best is reported.
const ROUNDS: usize = 5;
/// Default seed of `mkcow` and `lookup`.
const DEFAULT_SEED: u64 = 0x5EED_CAFE;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        eprintln!("cachebench: {e}\n\n{USAGE}");
        std::process::exit(2);
    }
}

fn run(args: &[String]) -> Res<()> {
    let Some((cmd, rest)) = args.split_first() else {
        return Err("no subcommand".into());
    };
    match cmd.as_str() {
        "mkcow" => {
            let a = Args::parse(
                rest,
                &[
                    "--chunk-sectors",
                    "--exceptions",
                    "--origin-chunks",
                    "--seed",
                ],
                &[],
            )?;
            mkcow(
                &a.file,
                a.num("--chunk-sectors")?,
                a.num("--exceptions")?,
                a.num("--origin-chunks")?,
                a.num_or("--seed", DEFAULT_SEED)?,
            )
        }
        "activate" => {
            let a = Args::parse(rest, &["--repeat"], &["--cold"])?;
            activate_repeat(&a.file, a.num_or("--repeat", 1)?, a.has("--cold"))
        }
        "activate-once" => {
            let a = Args::parse(rest, &[], &["--cold"])?;
            activate_once(&a.file, a.has("--cold"))
        }
        "seqread" => {
            let a = Args::parse(rest, &[], &["--cold"])?;
            seqread(&a.file, a.has("--cold"))
        }
        "lookup" => {
            let a = Args::parse(rest, &["--n", "--seed"], &[])?;
            lookup(&a.file, a.num("--n")?, a.num_or("--seed", DEFAULT_SEED)?)
        }
        other => Err(format!("unknown subcommand {other:?}")),
    }
}

/// `FILE` then `--flag value` options and `--switch`es, parsed by hand.
struct Args {
    file: String,
    values: HashMap<String, String>,
}

impl Args {
    fn parse(args: &[String], valued: &[&str], switches: &[&str]) -> Res<Args> {
        let mut file = None;
        let mut values = HashMap::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if valued.contains(&a.as_str()) {
                let v = it.next().ok_or_else(|| format!("{a} needs a value"))?;
                values.insert(a.clone(), v.clone());
            } else if switches.contains(&a.as_str()) {
                values.insert(a.clone(), String::new());
            } else if a.starts_with("--") || file.is_some() {
                return Err(format!("unexpected argument {a:?}"));
            } else {
                file = Some(a.clone());
            }
        }
        let file = file.ok_or("FILE is missing")?;
        Ok(Args { file, values })
    }

    fn num(&self, flag: &str) -> Res<u64> {
        let v = self
            .values
            .get(flag)
            .ok_or_else(|| format!("{flag} is required"))?;
        v.parse()
            .map_err(|_| format!("{flag}: {v:?} is not a number"))
    }

    fn num_or(&self, flag: &str, default: u64) -> Res<u64> {
        if self.values.contains_key(flag) {
            self.num(flag)
        } else {
            Ok(default)
        }
    }

    fn has(&self, flag: &str) -> bool {
        self.values.contains_key(flag)
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): small, fast, and the same on every machine.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`; the modulo bias is negligible for `n` far below 2^64).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn origin_path(file: &str) -> String {
    format!("{file}.origin")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn err(what: &str) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Writes the COW `file` (kernel format, valid header, `n` exceptions in the areas, data
/// chunks as holes) and the sparse origin `file.origin` of `m` chunks.
fn mkcow(file: &str, chunk_sectors: u64, n: u64, m: u64, seed: u64) -> Res<()> {
    let cs = ChunkSize::from_sectors(chunk_sectors).map_err(|e| e.to_string())?;
    if n > m {
        return Err(format!(
            "{n} distinct exceptions do not fit an origin of {m} chunks"
        ));
    }
    let geo = Geometry::new(cs);
    let epa = geo.exceptions_per_area();
    let t0 = Instant::now();
    // A partial Fisher-Yates shuffle of 0..m: its first n values are random and distinct.
    let mut olds: Vec<u64> = (0..m).collect();
    let mut rng = SplitMix64(seed);
    for i in 0..n {
        let j = i + rng.below(m - i);
        olds.swap(mem_usize(i), mem_usize(j));
    }
    olds.truncate(mem_usize(n));
    let shuffle = t0.elapsed();

    // Areas 0..=n/epa: when n is a multiple of epa, the last one holds no entry and is the
    // zero area a full area must be followed by; otherwise its zero entry after the last
    // exception is the terminator.
    let areas = n / epa + 1;
    let last_new = n
        .checked_sub(1)
        .map(|k| geo.dense_chunk(k / epa, k % epa).0);
    let cow_chunks = last_new
        .map_or(0, |c| c + 2)
        .max(geo.area_location(areas - 1).0 + 1);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(file)
        .map_err(err(file))?;
    f.set_len(cow_chunks * cs.bytes()).map_err(err(file))?;
    f.write_all_at(&format::encode_header(true, cs), 0)
        .map_err(err(file))?;
    let mut buf = vec![0u8; cs.bytes_usize()];
    let mut entries = Vec::with_capacity(mem_usize(epa));
    for a in 0..areas {
        let start = a * epa;
        let end = n.min(start + epa);
        entries.clear();
        entries.extend(
            (start..end)
                .map(|k| Exception::new(olds[mem_usize(k)], geo.dense_chunk(a, k - start).0)),
        );
        buf.fill(0);
        format::encode_entries(&mut buf, &entries);
        f.write_all_at(&buf, geo.area_offset(a))
            .map_err(err(file))?;
    }
    let written = t0.elapsed();
    f.sync_all().map_err(err(file))?;
    let origin = origin_path(file);
    let o = File::create(&origin).map_err(err(&origin))?;
    o.set_len(m * cs.bytes()).map_err(err(&origin))?;
    println!(
        "{{\"cmd\":\"mkcow\",\"file\":{file:?},\"chunk_sectors\":{chunk_sectors},\"exceptions\":{n},\"origin_chunks\":{m},\"seed\":{seed},\"areas\":{areas},\"cow_bytes\":{},\"shuffle_ms\":{:.0},\"write_ms\":{:.0},\"total_ms\":{:.0}}}",
        cow_chunks * cs.bytes(),
        ms(shuffle),
        ms(written - shuffle),
        ms(t0.elapsed()),
    );
    Ok(())
}

/// THE STEP UNDER TEST. Today: `Snapshot::load` reads every area and builds the whole
/// in-memory `ExceptionTable`, then the origin starts routing writes to the snapshot.
/// For the bounded cache with its sidecar index, replace the body (e.g. the new load call
/// taking a cache budget and the sidecar's path); everything around it stays.
fn activate(origin: &Origin, store: PersistentStore) -> Res<Arc<Snapshot>> {
    let snap = Snapshot::load(origin, Arc::new(store)).map_err(|e| e.to_string())?;
    origin.activate(&snap).map_err(|e| e.to_string())?;
    Ok(snap)
}

/// Opens the origin and the COW of `file` as devices, and the persistent store.
fn open(file: &str) -> Res<(Arc<Origin>, PersistentStore)> {
    let origin = origin_path(file);
    let odev: Arc<dyn BlockDevice> =
        Arc::new(FileDevice::open(&origin).map_err(|e| format!("{origin}: {e}"))?);
    let cow: Arc<dyn BlockDevice> =
        Arc::new(FileDevice::open(file).map_err(|e| format!("{file}: {e}"))?);
    let store = PersistentStore::open(cow, None, false).map_err(|e| e.to_string())?;
    Ok((Origin::new(odev, Arc::new(Copier::default())), store))
}

/// `VmRSS` and `VmHWM` of this process, in bytes.
fn mem_status() -> Res<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/self/status").map_err(err("/proc/self/status"))?;
    let field = |name: &str| -> Res<u64> {
        let line = s
            .lines()
            .find(|l| l.starts_with(name))
            .ok_or_else(|| format!("no {name} in /proc/self/status"))?;
        let kb: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .map_err(|_| format!("bad line {line:?}"))?;
        Ok(kb * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Drops `path`'s pages from the page cache (after writing back any dirty ones).
fn evict(path: &str) -> Res<()> {
    let f = File::open(path).map_err(err(path))?;
    f.sync_data().map_err(err(path))?;
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)
        .map_err(|e| format!("{path}: fadvise: {e}"))
}

fn diff(after: u64, before: u64) -> i128 {
    i128::from(after) - i128::from(before)
}

fn per(bytes: i128, n: u64) -> f64 {
    if n == 0 {
        0.0
    } else {
        // Display only: the precision of an f64 is plenty.
        #[allow(clippy::cast_precision_loss, reason = "display only")]
        let r = bytes as f64 / n as f64;
        r
    }
}

/// One activation in this process: one JSON line.
fn activate_once(file: &str, cold: bool) -> Res<()> {
    if cold {
        evict(file)?;
    }
    let t0 = Instant::now();
    let (origin, store) = open(file)?;
    let opened = t0.elapsed();
    let (rss0, hwm0) = mem_status()?;
    let t1 = Instant::now();
    let snap = activate(&origin, store)?;
    let took = t1.elapsed();
    let (rss1, hwm1) = mem_status()?;
    let n = snap.exceptions().completed_count();
    let runs = snap
        .exceptions()
        .with_table(cowsnap_core::exception::ExceptionTable::runs);
    let (drss, dhwm) = (diff(rss1, rss0), diff(hwm1, hwm0));
    println!(
        "{{\"cmd\":\"activate\",\"file\":{file:?},\"cold\":{cold},\"exceptions\":{n},\"runs\":{runs},\"open_ms\":{:.1},\"activate_ms\":{:.1},\"rss_before\":{rss0},\"rss_after\":{rss1},\"hwm_before\":{hwm0},\"hwm_after\":{hwm1},\"rss_growth\":{drss},\"hwm_growth\":{dhwm},\"rss_per_exc\":{:.1},\"hwm_per_exc\":{:.1}}}",
        ms(opened),
        ms(took),
        per(drss, n),
        per(dhwm, n),
    );
    Ok(())
}

/// `k` activations, each in a fresh child process (`activate-once`); prints each child's
/// line, and the best and median activation time on stderr.
fn activate_repeat(file: &str, k: u64, cold: bool) -> Res<()> {
    let exe = std::env::current_exe().map_err(err("current_exe"))?;
    let mut times = Vec::new();
    for _ in 0..k {
        let mut cmd = Command::new(&exe);
        cmd.arg("activate-once").arg(file);
        if cold {
            cmd.arg("--cold");
        }
        let out = cmd.output().map_err(err("spawning activate-once"))?;
        if !out.status.success() {
            return Err(format!(
                "activate-once failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let line = String::from_utf8_lossy(&out.stdout);
        print!("{line}");
        if let Some(v) = json_number(&line, "activate_ms") {
            times.push(v);
        }
    }
    times.sort_by(f64::total_cmp);
    if let (Some(best), Some(median)) = (times.first(), times.get(times.len() / 2)) {
        eprintln!("activate_ms: best {best:.1}, median {median:.1} of {k}");
    }
    Ok(())
}

/// The number after `"key":` in a flat JSON line.
fn json_number(line: &str, key: &str) -> Option<f64> {
    let pat = format!("\"{key}\":");
    let rest = &line[line.find(&pat)? + pat.len()..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The geometry recorded in `file`'s header.
fn geometry_of(f: &File, file: &str) -> Res<Geometry> {
    let mut h = [0u8; 512];
    f.read_exact_at(&mut h, 0).map_err(err(file))?;
    match format::decode_header(&h, file).map_err(|e| e.to_string())? {
        HeaderState::Formatted { chunk_size, .. } => Ok(Geometry::new(chunk_size)),
        HeaderState::Fresh => Err(format!("{file}: not formatted")),
    }
}

/// Reads area 0, 1, ... of `file` (one chunk each, in order) up to the first that is not
/// full, passing each `old` to `f`. Returns the number of areas read.
fn scan_areas(f: &File, file: &str, geo: &Geometry, each: &mut dyn FnMut(u64)) -> Res<u64> {
    let mut buf = vec![0u8; geo.chunk_size().bytes_usize()];
    let mut a = 0;
    loop {
        f.read_exact_at(&mut buf, geo.area_offset(a))
            .map_err(err(file))?;
        a += 1;
        let mut full = true;
        for e in buf.chunks_exact(ENTRY_BYTES) {
            let old = u64::from_le_bytes(e[..8].try_into().map_err(|_| "entry")?);
            let new = u64::from_le_bytes(e[8..].try_into().map_err(|_| "entry")?);
            if new == 0 {
                full = false;
                break;
            }
            each(old);
        }
        if !full {
            return Ok(a);
        }
    }
}

/// The yardstick of a rebuild scan: every area read in order, buffered.
fn seqread(file: &str, cold: bool) -> Res<()> {
    if cold {
        evict(file)?;
    }
    let f = File::open(file).map_err(err(file))?;
    let geo = geometry_of(&f, file)?;
    let t0 = Instant::now();
    let mut n = 0u64;
    let areas = scan_areas(&f, file, &geo, &mut |_| n += 1)?;
    let took = t0.elapsed();
    let bytes = areas * geo.chunk_size().bytes();
    #[allow(clippy::cast_precision_loss, reason = "display only")]
    let mib_s = bytes as f64 / 1_048_576.0 / took.as_secs_f64();
    println!(
        "{{\"cmd\":\"seqread\",\"file\":{file:?},\"cold\":{cold},\"exceptions\":{n},\"areas\":{areas},\"bytes\":{bytes},\"ms\":{:.1},\"mib_s\":{mib_s:.1}}}",
        ms(took)
    );
    Ok(())
}

/// Best of [`ROUNDS`] timings of one lookup of each key; returns (ns per lookup, hits).
fn time_lookups(snap: &Snapshot, keys: &[Chunk]) -> (f64, u64) {
    let mut best = Duration::MAX;
    let mut found = 0;
    for _ in 0..ROUNDS {
        let t = Instant::now();
        found = 0u64;
        for &k in keys {
            found += u64::from(black_box(snap.exceptions().lookup(black_box(k))).is_some());
        }
        best = best.min(t.elapsed());
    }
    (
        per(
            i128::try_from(best.as_nanos()).unwrap_or(i128::MAX),
            keys.len() as u64,
        ),
        found,
    )
}

/// Random hit and miss lookups after activation.
fn lookup(file: &str, n: u64, seed: u64) -> Res<()> {
    let (origin, store) = open(file)?;
    let cs = store.geometry().chunk_size();
    let snap = activate(&origin, store)?;
    let f = File::open(file).map_err(err(file))?;
    let geo = geometry_of(&f, file)?;
    let mut olds = Vec::new();
    scan_areas(&f, file, &geo, &mut |o| olds.push(o))?;
    let origin_chunks = cs.chunks_covering(origin.device().size());
    let mut rng = SplitMix64(seed ^ 0x100C_0F00);
    let mut hits = Vec::with_capacity(mem_usize(n));
    if !olds.is_empty() {
        for _ in 0..n {
            hits.push(Chunk(olds[mem_usize(rng.below(olds.len() as u64))]));
        }
    }
    let mut misses = Vec::with_capacity(mem_usize(n));
    if (olds.len() as u64) < origin_chunks {
        while (misses.len() as u64) < n {
            let c = Chunk(rng.below(origin_chunks));
            if snap.exceptions().lookup(c).is_none() {
                misses.push(c);
            }
        }
    }
    let (hit_ns, hit_found) = time_lookups(&snap, &hits);
    let (miss_ns, miss_found) = time_lookups(&snap, &misses);
    if hit_found != hits.len() as u64 || miss_found != 0 {
        return Err(format!(
            "wrong lookups: {hit_found} of {} hits found, {miss_found} misses found",
            hits.len()
        ));
    }
    let json_ns = |ns: f64, keys: &[Chunk]| {
        if keys.is_empty() {
            "null".to_string()
        } else {
            format!("{ns:.1}")
        }
    };
    println!(
        "{{\"cmd\":\"lookup\",\"file\":{file:?},\"exceptions\":{},\"hits\":{},\"misses\":{},\"hit_ns\":{},\"miss_ns\":{},\"rounds\":{ROUNDS}}}",
        olds.len(),
        hits.len(),
        misses.len(),
        json_ns(hit_ns, &hits),
        json_ns(miss_ns, &misses),
    );
    Ok(())
}
