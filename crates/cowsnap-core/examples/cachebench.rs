//! Memory and activation time of the exception index, measured on large kernel-format COWs.
//!
//! It writes persistent COW files in the kernel's format (header and metadata areas only,
//! the data chunks left as holes) holding millions of exceptions with random, distinct
//! `old` chunks and the dense `new` layout, then activates a snapshot on them in a fresh
//! process and reports the time, the growth of `VmRSS`/`VmHWM`, the index's status and its
//! page cache's statistics. The index lives in a sidecar directory (`--index DIR`, by
//! default `FILE.cxi`): without a valid one, activation rebuilds it from a full scan of
//! the COW (`--fresh-index` deletes it first to force that); with one, it replays only the
//! entries after it. Results and exact commands: `bench/experiments/cache-index.md` (the
//! old in-memory table: `bench/experiments/cache-baseline.md`).
//!
//! `mkcow`'s `old` chunks are prefix-stable: with the same seed and origin, the first K
//! exceptions of a COW of N are those of a COW of K (a partial Fisher-Yates shuffle fixes
//! position i at step i). Writing a COW of N over one of K thus models a crash after the
//! index covered K entries: the sidecar stays valid and activation replays N - K.
//!
//! Build and run (release, from the workspace):
//!
//! ```text
//! cargo build --release -p cowsnap-core --example cachebench
//! B=target/release/examples/cachebench
//! $B mkcow /tmp/c.cow --chunk-sectors 8 --exceptions 1048576 --origin-chunks 16777216
//! $B activate /tmp/c.cow --fresh-index [--cold]        # rebuild
//! $B activate /tmp/c.cow --repeat 3 [--cold]           # with the sidecar
//! $B seqread /tmp/c.cow [--cold]
//! $B lookup /tmp/c.cow --n 1000000 --cache-mib 8
//! ```
//!
//! Every subcommand prints one JSON line per measurement on stdout. `--cold` drops the
//! COW's and the sidecar's pages from the page cache (`fdatasync` +
//! `POSIX_FADV_DONTNEED`) before measuring.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cowsnap_core::copy::Copier;
use cowsnap_core::dev::{BlockDevice, FileDevice};
use cowsnap_core::exception::index::{IndexConfig, PageCache, Tuning};
use cowsnap_core::exception::persistent::format::{self, Geometry, HeaderState, ENTRY_BYTES};
use cowsnap_core::exception::{Exception, PersistentStore};
use cowsnap_core::targets::{Origin, Snapshot};
use cowsnap_core::testkit::SplitMix;
use cowsnap_core::units::{mem_usize, Chunk, ChunkSize};

type Res<T> = Result<T, String>;

const USAGE: &str = "usage:
  cachebench mkcow FILE --chunk-sectors S --exceptions N --origin-chunks M [--seed X]
      write a kernel-format COW (FILE) with N random exceptions over an origin of M chunks,
      and the sparse origin FILE.origin
      (the olds are prefix-stable: the first K of N are the olds of K, same seed and M)
  cachebench activate FILE [--index DIR] [--cache-mib C] [--fresh-index] [--repeat K] [--cold]
      activate a snapshot on FILE K times (default 1), each in a fresh child process, with
      its index in DIR (default FILE.cxi) and a page cache of C MiB (default 64);
      --fresh-index deletes DIR first (a rebuild)
  cachebench seqread FILE [--cold]
      read every metadata area of FILE in order, one chunk-sized buffered read each
  cachebench lookup FILE --n N [--index DIR] [--cache-mib C] [--seed X]
      after activation, time N random hits, N hits on a hot set of 4096, and N misses
      (best of 5 rounds each)";

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
            let a = Args::parse(
                rest,
                &["--repeat", "--index", "--cache-mib"],
                &["--cold", "--fresh-index"],
            )?;
            activate_repeat(&a, a.num_or("--repeat", 1)?)
        }
        "activate-once" => {
            let a = Args::parse(
                rest,
                &["--index", "--cache-mib"],
                &["--cold", "--fresh-index"],
            )?;
            activate_once(&a.file, &a.index_opts()?, a.has("--cold"))
        }
        "seqread" => {
            let a = Args::parse(rest, &[], &["--cold"])?;
            seqread(&a.file, a.has("--cold"))
        }
        "lookup" => {
            let a = Args::parse(rest, &["--n", "--seed", "--index", "--cache-mib"], &[])?;
            lookup(
                &a.file,
                &a.index_opts()?,
                a.num("--n")?,
                a.num_or("--seed", DEFAULT_SEED)?,
            )
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

    /// `--index`, `--cache-mib` and `--fresh-index`.
    fn index_opts(&self) -> Res<IndexOpts> {
        Ok(IndexOpts {
            dir: self
                .values
                .get("--index")
                .cloned()
                .unwrap_or_else(|| format!("{}.cxi", self.file)),
            cache_mib: self.num_or("--cache-mib", DEFAULT_CACHE_MIB)?,
            fresh: self.has("--fresh-index"),
        })
    }
}

/// Default page cache budget of `activate` and `lookup`, in MiB.
const DEFAULT_CACHE_MIB: u64 = 64;

/// Where the index lives and how much page cache it gets.
struct IndexOpts {
    dir: String,
    cache_mib: u64,
    /// Delete `dir` before loading (forces a rebuild).
    fresh: bool,
}

impl IndexOpts {
    fn config(&self) -> IndexConfig {
        IndexConfig {
            dir: Some(self.dir.clone().into()),
            cache: PageCache::new(self.cache_mib << 20),
            tuning: Tuning::DEFAULT,
            identity: 0,
            temporary_in: None,
            fault: None,
        }
    }

    /// The arguments that give these options to a child.
    fn args(&self) -> Vec<String> {
        let mut v = vec![
            "--index".to_string(),
            self.dir.clone(),
            "--cache-mib".to_string(),
            self.cache_mib.to_string(),
        ];
        if self.fresh {
            v.push("--fresh-index".into());
        }
        v
    }

    /// Deletes the sidecar directory when asked to.
    fn prepare(&self) -> Res<()> {
        if self.fresh {
            match std::fs::remove_dir_all(&self.dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("{}: {e}", self.dir)),
            }
        }
        Ok(())
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
    let mut rng = SplitMix(seed);
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

/// THE STEP UNDER TEST: `Snapshot::load_with` opens the index in its sidecar (replaying
/// the entries after it) or rebuilds it from a full scan, then the origin starts routing
/// writes to the snapshot.
fn activate(origin: &Origin, store: PersistentStore, cfg: IndexConfig) -> Res<Arc<Snapshot>> {
    let snap = Snapshot::load_with(origin, Arc::new(store), cfg).map_err(|e| e.to_string())?;
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

/// [`evict`]s every file of the directory `dir`, if it exists.
fn evict_dir(dir: &str) -> Res<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{dir}: {e}")),
    };
    for e in entries {
        let path = e.map_err(err(dir))?.path();
        if path.is_file() {
            evict(&path.display().to_string())?;
        }
    }
    Ok(())
}

/// The index's status and its cache's statistics, as JSON.
fn index_json(snap: &Snapshot) -> Res<(String, String)> {
    let index = snap.exceptions().index();
    Ok((
        serde_json::to_string(&index.status()).map_err(|e| e.to_string())?,
        serde_json::to_string(&index.cache().stats()).map_err(|e| e.to_string())?,
    ))
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

/// One activation in this process: one JSON line. The snapshot is then deactivated and
/// dropped, which writes the index's final checkpoint (`drop_ms`).
fn activate_once(file: &str, opts: &IndexOpts, cold: bool) -> Res<()> {
    opts.prepare()?;
    if cold {
        evict(file)?;
        evict_dir(&opts.dir)?;
    }
    let t0 = Instant::now();
    let (origin, store) = open(file)?;
    let opened = t0.elapsed();
    let (rss0, hwm0) = mem_status()?;
    let t1 = Instant::now();
    let snap = activate(&origin, store, opts.config())?;
    let took = t1.elapsed();
    let (rss1, hwm1) = mem_status()?;
    let n = snap.exceptions().completed_count();
    let (status, cache) = index_json(&snap)?;
    let t2 = Instant::now();
    origin.deactivate(&snap).map_err(|e| e.to_string())?;
    drop(snap);
    drop(origin);
    let dropped = t2.elapsed();
    let (_, hwm2) = mem_status()?;
    let (drss, dhwm) = (diff(rss1, rss0), diff(hwm1, hwm0));
    println!(
        "{{\"cmd\":\"activate\",\"file\":{file:?},\"cold\":{cold},\"fresh_index\":{},\"cache_mib\":{},\"exceptions\":{n},\"open_ms\":{:.1},\"activate_ms\":{:.1},\"drop_ms\":{:.1},\"rss_before\":{rss0},\"rss_after\":{rss1},\"hwm_before\":{hwm0},\"hwm_after\":{hwm1},\"hwm_after_drop\":{hwm2},\"rss_growth\":{drss},\"hwm_growth\":{dhwm},\"hwm_growth_with_drop\":{},\"rss_per_exc\":{:.2},\"hwm_per_exc\":{:.2},\"index\":{status},\"cache\":{cache}}}",
        opts.fresh,
        opts.cache_mib,
        ms(opened),
        ms(took),
        ms(dropped),
        diff(hwm2, hwm0),
        per(drss, n),
        per(dhwm, n),
    );
    Ok(())
}

/// `k` activations, each in a fresh child process (`activate-once`); prints each child's
/// line, and the best and median activation time on stderr.
fn activate_repeat(a: &Args, k: u64) -> Res<()> {
    let exe = std::env::current_exe().map_err(err("current_exe"))?;
    let opts = a.index_opts()?;
    let mut times = Vec::new();
    for _ in 0..k {
        let mut cmd = Command::new(&exe);
        cmd.arg("activate-once").arg(&a.file).args(opts.args());
        if a.has("--cold") {
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

/// One lookup phase: the best of [`ROUNDS`] timings of one lookup of each key, the keys
/// found, and the page cache's hits and misses over all rounds.
struct Phase {
    ns: f64,
    first_ns: f64,
    found: u64,
    cache_hits: u64,
    cache_misses: u64,
}

fn time_lookups(snap: &Snapshot, keys: &[Chunk]) -> Res<Phase> {
    let cache = snap.exceptions().index().cache();
    let before = cache.stats();
    let mut best = Duration::MAX;
    let mut first = None;
    let mut found = 0;
    for _ in 0..ROUNDS {
        let t = Instant::now();
        found = 0u64;
        for &k in keys {
            let r = snap
                .exceptions()
                .lookup(black_box(k))
                .map_err(|e| format!("lookup {k}: {e}"))?;
            found += u64::from(black_box(r).is_some());
        }
        let took = t.elapsed();
        first.get_or_insert(took);
        best = best.min(took);
    }
    let after = cache.stats();
    let ns = |d: Duration| {
        per(
            i128::try_from(d.as_nanos()).unwrap_or(i128::MAX),
            keys.len() as u64,
        )
    };
    Ok(Phase {
        ns: ns(best),
        first_ns: ns(first.unwrap_or_default()),
        found,
        cache_hits: after.hits - before.hits,
        cache_misses: after.misses - before.misses,
    })
}

impl Phase {
    /// `"name":{...}` for the output line, `null` when there were no keys.
    fn json(&self, name: &str, keys: usize) -> String {
        if keys == 0 {
            return format!("\"{name}\":null");
        }
        format!(
            "\"{name}\":{{\"keys\":{keys},\"ns\":{:.1},\"first_round_ns\":{:.1},\"cache_hits\":{},\"cache_misses\":{}}}",
            self.ns, self.first_ns, self.cache_hits, self.cache_misses
        )
    }
}

/// Keys in the hot set of `lookup`.
const HOT_KEYS: usize = 4096;

/// Random hits, hits on a hot set, and misses, after activation.
fn lookup(file: &str, opts: &IndexOpts, n: u64, seed: u64) -> Res<()> {
    opts.prepare()?;
    let (origin, store) = open(file)?;
    let cs = store.geometry().chunk_size();
    let snap = activate(&origin, store, opts.config())?;
    let (status, _) = index_json(&snap)?;
    let f = File::open(file).map_err(err(file))?;
    let geo = geometry_of(&f, file)?;
    let mut olds = Vec::new();
    scan_areas(&f, file, &geo, &mut |o| olds.push(o))?;
    let origin_chunks = cs.chunks_covering(origin.device().size());
    let mut rng = SplitMix(seed ^ 0x100C_0F00);
    let mut hits = Vec::with_capacity(mem_usize(n));
    let mut hot = Vec::with_capacity(mem_usize(n));
    if !olds.is_empty() {
        for _ in 0..n {
            hits.push(Chunk(olds[mem_usize(rng.below(olds.len() as u64))]));
        }
        let set: Vec<Chunk> = (0..HOT_KEYS)
            .map(|_| Chunk(olds[mem_usize(rng.below(olds.len() as u64))]))
            .collect();
        hot.extend((0..mem_usize(n)).map(|i| set[i % HOT_KEYS]));
    }
    let mut misses = Vec::with_capacity(mem_usize(n));
    if (olds.len() as u64) < origin_chunks {
        while (misses.len() as u64) < n {
            let c = Chunk(rng.below(origin_chunks));
            if !snap.exceptions().index().contains(c) {
                misses.push(c);
            }
        }
    }
    let (rss0, _) = mem_status()?;
    let hit = time_lookups(&snap, &hits)?;
    let hot_hit = time_lookups(&snap, &hot)?;
    let miss = time_lookups(&snap, &misses)?;
    if hit.found != hits.len() as u64 || hot_hit.found != hot.len() as u64 || miss.found != 0 {
        return Err(format!(
            "wrong lookups: {} of {} hits found, {} of {} hot hits, {} misses found",
            hit.found,
            hits.len(),
            hot_hit.found,
            hot.len(),
            miss.found
        ));
    }
    let (rss1, _) = mem_status()?;
    let (_, cache) = index_json(&snap)?;
    println!(
        "{{\"cmd\":\"lookup\",\"file\":{file:?},\"exceptions\":{},\"rounds\":{ROUNDS},\"cache_mib\":{},\"rss_growth_during_lookups\":{},{},{},{},\"index\":{status},\"cache\":{cache}}}",
        olds.len(),
        opts.cache_mib,
        diff(rss1, rss0),
        hit.json("random_hit", hits.len()),
        hot_hit.json("hot_hit", hot.len()),
        miss.json("miss", misses.len()),
    );
    Ok(())
}
