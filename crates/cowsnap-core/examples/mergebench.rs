//! Merge throughput on real files, against a plain copy of the same chunks in the same run.
//!
//! For each chunk size it makes a persistent snapshot of a written origin file, fills the
//! COW with copy-outs (origin writes of one chunk each to random distinct chunks, from
//! `--writers` threads) until it holds `--cow-mib` of data, flushes, drops the page cache
//! (`sync`, then `3` into `/proc/sys/vm/drop_caches`; root only, the output says whether it
//! happened) and times `Origin::start_merge` to `Done` with no client I/O. The yardstick
//! copies the same chunks between the same files with plain `pread`/`pwrite`, in the order
//! the merge moves them (the last metadata area first, each area's entries from its tail in
//! batches of `batch_bytes`, a batch in table order), with the same read and write sizes as
//! the merger, one `fdatasync` of the origin per batch and one at the end. It runs just
//! before and just after the merge (each after a drop of the page cache); the ratio is to
//! the mean of the two. Then, on the same origin: the 4 KiB random writer alone (`--writers`
//! threads through `Origin::write_at`, no snapshot) for `--alone-secs`, and a
//! second merge of a fresh COW filled the same way with that writer running throughout.
//!
//! Every device call is counted and timed per thread kind (the merger thread, the others),
//! so the output also tells where the merger's time goes (COW reads, origin writes, origin
//! flushes, COW flushes and FUA area writes, and the rest: CPU and locks) and how many
//! flushes it issued per merged chunk, beside what the kernel's ordering would issue (one
//! origin flush and one flushed FUA area write per run of entries consecutive in both the
//! origin and the COW, i.e. per chunk for scattered chunks).
//!
//! Files are opened `O_DIRECT` (as `cowsnap serve --direct`); `--buffered` uses the page
//! cache instead (its writer figures are then page-cache figures).
//!
//! ```text
//! cargo build --release -p cowsnap-core --example mergebench
//! target/release/examples/mergebench --dir /work/bench-tmp --chunk-kib 4,64 --cow-mib 1024
//! ```
//!
//! Prints one JSON line per measurement on stdout and a summary on stderr.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cowsnap_core::copy::Copier;
use cowsnap_core::dev::{AlignedBuf, BlockDevice, FileDevice, Fua};
use cowsnap_core::exception::persistent::format::{Geometry, ENTRY_BYTES};
use cowsnap_core::exception::PersistentStore;
use cowsnap_core::targets::{MergeSettings, MergeState, MergeStatus, Origin, Snapshot};
use cowsnap_core::testkit::SplitMix;
use cowsnap_core::units::{mem_usize, ChunkSize};
use serde_json::{json, Value};

type Res<T> = Result<T, String>;

const USAGE: &str = "usage:
  mergebench [--dir DIR] [--origin-gib G] [--cow-mib M] [--chunk-kib K[,K...]]
             [--writers W] [--alone-secs S] [--seed X] [--buffered] [--no-writer]
      DIR (default /work/bench-tmp) gets origin.img (G GiB, default 4) and one COW at a time;
      each chunk size K (KiB, default 4,64) gets a COW of M MiB of data (default 1024)";

/// What the merger reads from the COW in one piece (the engine's `SEGMENT_BYTES`).
const SEGMENT_BYTES: u64 = 4 << 20;
/// The first 8 bytes of every 4 KiB block: a tag xor the block's byte offset.
const ORIGINAL: u64 = 0x4f52_4947_494e_414c;
const FILLED: u64 = 0x4649_4c4c_4544_2121;
const WRITTEN: u64 = 0x5752_4954_5445_4e21;
/// Chunks whose first block is checked after a merge.
const VERIFY_SAMPLES: usize = 1024;
const MIB: f64 = 1_048_576.0;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = Config::parse(&args).and_then(|cfg| run(&cfg));
    if let Err(e) = result {
        eprintln!("mergebench: {e}\n\n{USAGE}");
        std::process::exit(2);
    }
}

struct Config {
    dir: PathBuf,
    origin_bytes: u64,
    cow_bytes: u64,
    chunks: Vec<ChunkSize>,
    writers: usize,
    alone: Duration,
    seed: u64,
    direct: bool,
    writer_phase: bool,
}

impl Config {
    fn parse(args: &[String]) -> Res<Config> {
        let mut v: HashMap<&str, &str> = HashMap::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--buffered" | "--no-writer" => {
                    v.insert(a, "");
                }
                "--dir" | "--origin-gib" | "--cow-mib" | "--chunk-kib" | "--writers"
                | "--alone-secs" | "--seed" => {
                    let val = it.next().ok_or_else(|| format!("{a} needs a value"))?;
                    v.insert(a, val);
                }
                _ => return Err(format!("unexpected argument {a:?}")),
            }
        }
        let num = |k: &str, d: u64| -> Res<u64> {
            v.get(k)
                .map_or(Ok(d), |s| s.parse().map_err(|_| format!("{k}: {s:?}")))
        };
        let chunks = v
            .get("--chunk-kib")
            .unwrap_or(&"4,64")
            .split(',')
            .map(|k| {
                let kib: u64 = k.parse().map_err(|_| format!("--chunk-kib: {k:?}"))?;
                ChunkSize::from_sectors(kib * 2).map_err(|e| e.to_string())
            })
            .collect::<Res<Vec<_>>>()?;
        Ok(Config {
            dir: PathBuf::from(v.get("--dir").unwrap_or(&"/work/bench-tmp")),
            origin_bytes: num("--origin-gib", 4)? << 30,
            cow_bytes: num("--cow-mib", 1024)? << 20,
            chunks,
            writers: mem_usize(num("--writers", 16)?.max(1)),
            alone: Duration::from_secs(num("--alone-secs", 10)?),
            seed: num("--seed", 0x006d_6572_6765)?,
            direct: !v.contains_key("--buffered"),
            writer_phase: !v.contains_key("--no-writer"),
        })
    }

    fn origin_path(&self) -> PathBuf {
        self.dir.join("origin.img")
    }

    fn open(&self, path: &Path) -> Res<Arc<Counted>> {
        let dev = if self.direct {
            FileDevice::open_direct(path)
        } else {
            FileDevice::open(path)
        }
        .map_err(|e| e.to_string())?;
        Ok(Arc::new(Counted::new(Arc::new(dev))))
    }

    /// A plain file handle, `O_DIRECT` as the devices.
    fn raw(&self, path: &Path) -> Res<File> {
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        if self.direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(path).map_err(|e| format!("{}: {e}", path.display()))
    }
}

fn run(cfg: &Config) -> Res<()> {
    std::fs::create_dir_all(&cfg.dir).map_err(|e| format!("{}: {e}", cfg.dir.display()))?;
    let t = Instant::now();
    make_origin(&cfg.origin_path(), cfg.origin_bytes)?;
    emit(
        &json!({"cmd": "origin", "bytes": cfg.origin_bytes, "direct": cfg.direct,
        "secs": t.elapsed().as_secs_f64()}),
    );
    for &cs in &cfg.chunks {
        let batch = merge_alone(cfg, cs)?;
        if cfg.writer_phase {
            merge_with_writer(cfg, cs, batch)?;
        }
    }
    Ok(())
}

fn emit(v: &Value) {
    println!("{v}");
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    #[allow(clippy::cast_precision_loss, reason = "display only")]
    let b = bytes as f64;
    b / MIB / d.as_secs_f64()
}

fn per(n: u64, d: u64) -> f64 {
    #[allow(clippy::cast_precision_loss, reason = "display only")]
    let r = if d == 0 { 0.0 } else { n as f64 / d as f64 };
    r
}

/// Writes every byte of a new origin file: 1 MiB pieces, each 4 KiB block tagged.
fn make_origin(path: &Path, size: u64) -> Res<()> {
    let f = File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.set_len(size).map_err(|e| e.to_string())?;
    let mut rng = SplitMix(7);
    let mut buf: Vec<u8> = (0..1 << 20)
        .map(|_| rng.next_u64().to_le_bytes()[0])
        .collect();
    let mut off = 0;
    while off < size {
        tag_blocks(&mut buf, ORIGINAL, off);
        f.write_all_at(&buf, off).map_err(|e| e.to_string())?;
        off += buf.len() as u64;
    }
    f.sync_all().map_err(|e| e.to_string())
}

/// Sets the first 8 bytes of each 4 KiB block of `buf` (at byte `off` of a device).
fn tag_blocks(buf: &mut [u8], tag: u64, off: u64) {
    for (i, b) in buf.chunks_mut(4096).enumerate() {
        b[..8].copy_from_slice(&(tag ^ (off + i as u64 * 4096)).to_le_bytes());
    }
}

/// `sync`, then drops the page cache. False when that is not allowed (not root).
fn drop_caches() -> bool {
    rustix::fs::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

// ---- devices that count and time their calls ----

/// Calls of one kind: count, bytes, nanoseconds.
#[derive(Default)]
struct Op {
    n: AtomicU64,
    bytes: AtomicU64,
    ns: AtomicU64,
}

impl Op {
    fn add(&self, bytes: u64, t: Instant) {
        self.n.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.ns.fetch_add(ns, Ordering::Relaxed);
    }

    fn json(&self) -> Value {
        json!({"n": self.n.load(Ordering::Relaxed), "bytes": self.bytes.load(Ordering::Relaxed),
            "ms": per(self.ns.load(Ordering::Relaxed), 1_000_000)})
    }

    fn reset(&self) {
        self.n.store(0, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
        self.ns.store(0, Ordering::Relaxed);
    }
}

/// One thread kind's calls.
#[derive(Default)]
struct Ops {
    reads: Op,
    writes: Op,
    fua_writes: Op,
    flushes: Op,
}

impl Ops {
    fn json(&self) -> Value {
        json!({"reads": self.reads.json(), "writes": self.writes.json(),
            "fua_writes": self.fua_writes.json(), "flushes": self.flushes.json()})
    }

    fn reset(&self) {
        for o in [&self.reads, &self.writes, &self.fua_writes, &self.flushes] {
            o.reset();
        }
    }

    fn ms(&self) -> f64 {
        [&self.reads, &self.writes, &self.fua_writes, &self.flushes]
            .iter()
            .map(|o| per(o.ns.load(Ordering::Relaxed), 1_000_000))
            .sum()
    }
}

/// A device that counts and times every call, the merger thread's apart.
#[derive(Debug)]
struct Counted {
    inner: Arc<dyn BlockDevice>,
    stats: Arc<[Ops; 2]>,
}

impl std::fmt::Debug for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ops")
    }
}

impl Counted {
    fn new(inner: Arc<dyn BlockDevice>) -> Counted {
        Counted {
            inner,
            stats: Arc::new([Ops::default(), Ops::default()]),
        }
    }

    fn ops(&self) -> &Ops {
        let merger = std::thread::current().name() == Some("cowsnap-merge");
        &self.stats[usize::from(!merger)]
    }

    fn merger(&self) -> &Ops {
        &self.stats[0]
    }

    fn others(&self) -> &Ops {
        &self.stats[1]
    }

    fn reset(&self) {
        self.stats[0].reset();
        self.stats[1].reset();
    }
}

impl BlockDevice for Counted {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> cowsnap_core::Result<()> {
        let t = Instant::now();
        let r = self.inner.read_at(buf, offset);
        self.ops().reads.add(buf.len() as u64, t);
        r
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: Fua) -> cowsnap_core::Result<()> {
        let t = Instant::now();
        let r = self.inner.write_at(buf, offset, fua);
        let ops = self.ops();
        match fua {
            Fua::Yes => ops.fua_writes.add(buf.len() as u64, t),
            Fua::No => ops.writes.add(buf.len() as u64, t),
        }
        r
    }

    fn flush(&self) -> cowsnap_core::Result<()> {
        let t = Instant::now();
        let r = self.inner.flush();
        self.ops().flushes.add(0, t);
        r
    }

    fn discard(&self, offset: u64, len: u64) -> cowsnap_core::Result<()> {
        self.inner.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: Fua) -> cowsnap_core::Result<()> {
        self.inner.write_zeroes(offset, len, fua)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

// ---- the COW: fill, table, merge order ----

/// An origin with one active persistent snapshot on a new COW file.
struct Setup {
    odev: Arc<Counted>,
    cdev: Arc<Counted>,
    origin: Arc<Origin>,
    snap: Arc<Snapshot>,
    cow_path: PathBuf,
}

impl Setup {
    fn new(cfg: &Config, cs: ChunkSize, name: &str) -> Res<Setup> {
        let cow_path = cfg.dir.join(name);
        let geo = Geometry::new(cs);
        let n = cfg.cow_bytes / cs.bytes();
        let chunks = n + n / geo.exceptions_per_area() + 16;
        FileDevice::create(&cow_path, chunks * cs.bytes()).map_err(|e| e.to_string())?;
        let odev = cfg.open(&cfg.origin_path())?;
        let cdev = cfg.open(&cow_path)?;
        let origin = Origin::new(odev.clone(), Arc::new(Copier::default()));
        let store =
            PersistentStore::open(cdev.clone(), Some(cs), false).map_err(|e| e.to_string())?;
        let snap = Snapshot::load(&origin, Arc::new(store)).map_err(|e| e.to_string())?;
        origin.activate(&snap).map_err(|e| e.to_string())?;
        Ok(Setup {
            odev,
            cdev,
            origin,
            snap,
            cow_path,
        })
    }

    fn reset(&self) {
        self.odev.reset();
        self.cdev.reset();
    }

    /// Ends the merge and deletes the COW.
    fn finish(self) -> Res<()> {
        self.origin.end_merge().map_err(|e| e.to_string())?;
        drop(self.snap);
        drop(self.origin);
        std::fs::remove_file(&self.cow_path).map_err(|e| e.to_string())
    }
}

/// `n` random distinct chunks of `m` (a partial Fisher-Yates shuffle).
fn distinct_chunks(n: u64, m: u64, seed: u64) -> Vec<u64> {
    let mut all: Vec<u64> = (0..m).collect();
    let mut rng = SplitMix(seed);
    for i in 0..n {
        let j = i + rng.below(m - i);
        all.swap(mem_usize(i), mem_usize(j));
    }
    all.truncate(mem_usize(n));
    all
}

/// Origin writes of one whole chunk to each of `chunks`, from `threads` threads: each
/// copies the chunk out to the snapshot first.
fn fill(s: &Setup, cs: ChunkSize, chunks: &[u64], threads: usize) -> Res<Duration> {
    let t = Instant::now();
    let next = AtomicU64::new(0);
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                sc.spawn(|| -> Res<()> {
                    let mut buf = AlignedBuf::zeroed(cs.bytes_usize());
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&c) = chunks.get(mem_usize(i)) else {
                            return Ok(());
                        };
                        let off = c * cs.bytes();
                        tag_blocks(&mut buf, FILLED, off);
                        s.origin
                            .write_at(&buf, off, Fua::No)
                            .map_err(|e| e.to_string())?;
                    }
                })
            })
            .collect();
        hs.into_iter()
            .try_for_each(|h| h.join().map_err(|_| "a fill thread panicked".to_string())?)
    })?;
    s.origin.flush().map_err(|e| e.to_string())?;
    s.snap.cow().flush().map_err(|e| e.to_string())?;
    Ok(t.elapsed())
}

/// A COW's table: `(old, new)` per entry, area by area.
type Table = Vec<Vec<(u64, u64)>>;

/// The table on disk, in order: `(old, new)` per entry, area by area.
fn read_table(path: &Path, geo: &Geometry) -> Res<Table> {
    let f = File::open(path).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; geo.chunk_size().bytes_usize()];
    let mut areas = Vec::new();
    for a in 0.. {
        f.read_exact_at(&mut buf, geo.area_offset(a))
            .map_err(|e| e.to_string())?;
        let mut area = Vec::new();
        for e in buf.chunks_exact(ENTRY_BYTES) {
            let old = u64::from_le_bytes(e[..8].try_into().map_err(|_| "entry")?);
            let new = u64::from_le_bytes(e[8..].try_into().map_err(|_| "entry")?);
            if new == 0 {
                break;
            }
            area.push((old, new));
        }
        let full = area.len() as u64 == geo.exceptions_per_area();
        if !area.is_empty() {
            areas.push(area);
        }
        if !full {
            break;
        }
    }
    Ok(areas)
}

/// The merger's batches, in its order: the last area first, each area from its tail in
/// batches of `batch` entries, a batch in table order.
fn merge_order(areas: &[Vec<(u64, u64)>], batch: usize) -> Vec<&[(u64, u64)]> {
    let mut out = Vec::new();
    for area in areas.iter().rev() {
        let mut end = area.len();
        while end > 0 {
            let start = end.saturating_sub(batch);
            out.push(&area[start..end]);
            end = start;
        }
    }
    out
}

/// The kernel's merge steps: runs of entries consecutive in both `old` and `new` inside
/// one area (each costs it one origin flush and one flushed FUA area write).
fn kernel_runs(areas: &[Vec<(u64, u64)>]) -> u64 {
    areas
        .iter()
        .map(|a| {
            1 + a
                .windows(2)
                .filter(|w| w[1].0 != w[0].0 + 1 || w[1].1 != w[0].1 + 1)
                .count() as u64
        })
        .sum()
}

/// The first 8 bytes of the first block of each chunk of `sample`.
fn first_tags(dev: &dyn BlockDevice, cs: ChunkSize, sample: &[u64]) -> Res<Vec<u64>> {
    let mut buf = AlignedBuf::zeroed(4096);
    sample
        .iter()
        .map(|&c| {
            dev.read_at(&mut buf, c * cs.bytes())
                .map_err(|e| e.to_string())?;
            Ok(u64::from_le_bytes(buf[..8].try_into().map_err(|_| "tag")?))
        })
        .collect()
}

// ---- the measurements ----

/// One merge: start to `Done`, with every device call counted.
struct Timed {
    took: Duration,
    status: MergeStatus,
}

fn timed_merge(s: &Setup, settings: MergeSettings, during: impl FnOnce()) -> Res<Timed> {
    s.reset();
    let t = Instant::now();
    let merge = s
        .origin
        .start_merge(&s.snap, settings)
        .map_err(|e| e.to_string())?;
    during();
    let state = merge.wait();
    let took = t.elapsed();
    if state != MergeState::Done {
        return Err(format!("the merge ended {state:?}"));
    }
    Ok(Timed {
        took,
        status: merge.status(),
    })
}

/// What a merge did, and where the merger's time went.
fn merge_json(s: &Setup, m: &Timed, runs: u64) -> Value {
    let st = &m.status;
    let (o, c) = (s.odev.merger(), s.cdev.merger());
    let cow_syncs = c.flushes.n.load(Ordering::Relaxed) + c.fua_writes.n.load(Ordering::Relaxed);
    let origin_flushes = o.flushes.n.load(Ordering::Relaxed);
    let device_ms = o.ms() + c.ms();
    let total_ms = m.took.as_secs_f64() * 1e3;
    json!({
        "secs": m.took.as_secs_f64(),
        "merged_bytes": st.merged_bytes,
        "merged_chunks": st.merged_chunks,
        "mib_s": mib_s(st.merged_bytes, m.took),
        "batches": st.origin_flushes,
        "origin_flushes": origin_flushes,
        "cow_flushes": c.flushes.n.load(Ordering::Relaxed),
        "cow_fua_area_writes": c.fua_writes.n.load(Ordering::Relaxed),
        "origin_flushes_per_chunk": per(origin_flushes, st.merged_chunks),
        "syncs_per_chunk": per(origin_flushes + cow_syncs, st.merged_chunks),
        "kernel_runs": runs,
        "kernel_origin_flushes_per_chunk": per(runs, st.merged_chunks),
        "kernel_syncs_per_chunk": per(2 * runs, st.merged_chunks),
        "merger_origin": o.json(),
        "merger_cow": c.json(),
        "merger_ms_outside_devices": total_ms - device_ms,
    })
}

/// The yardstick: the same chunks copied in the same order with the same read and write
/// sizes by `pread`/`pwrite`, one `fdatasync` of the origin per batch and one at the end.
fn plain_copy(cfg: &Config, cow: &Path, cs: ChunkSize, batches: &[&[(u64, u64)]]) -> Res<Value> {
    let (o, c) = (cfg.raw(&cfg.origin_path())?, cfg.raw(cow)?);
    let cb = cs.bytes();
    let io = |e: std::io::Error| e.to_string();
    let (mut bytes, mut syncs, mut reads, mut writes) = (0u64, 0u64, 0u64, 0u64);
    let t = Instant::now();
    for batch in batches {
        let mut i = 0;
        while i < batch.len() {
            let mut j = i + 1;
            while j < batch.len()
                && batch[j].1 == batch[j - 1].1 + 1
                && (j + 1 - i) as u64 * cb <= SEGMENT_BYTES
            {
                j += 1;
            }
            let seg = &batch[i..j];
            i = j;
            let mut buf = AlignedBuf::zeroed(mem_usize(seg.len() as u64 * cb));
            c.read_exact_at(&mut buf, seg[0].1 * cb).map_err(io)?;
            reads += 1;
            let mut k = 0;
            while k < seg.len() {
                let mut l = k + 1;
                while l < seg.len() && seg[l].0 == seg[l - 1].0 + 1 {
                    l += 1;
                }
                let from = mem_usize(k as u64 * cb);
                let to = mem_usize(l as u64 * cb);
                o.write_all_at(&buf[from..to], seg[k].0 * cb).map_err(io)?;
                writes += 1;
                bytes += (l - k) as u64 * cb;
                k = l;
            }
        }
        o.sync_data().map_err(io)?;
        syncs += 1;
    }
    o.sync_data().map_err(io)?;
    syncs += 1;
    let took = t.elapsed();
    Ok(
        json!({"secs": took.as_secs_f64(), "bytes": bytes, "mib_s": mib_s(bytes, took),
        "reads": reads, "writes": writes, "fdatasyncs": syncs}),
    )
}

/// A new snapshot filled with `cfg.cow_bytes` of copy-outs; its table by area.
fn filled(cfg: &Config, cs: ChunkSize, name: &str) -> Res<(Setup, Table)> {
    let s = Setup::new(cfg, cs, name)?;
    let m = cfg.origin_bytes / cs.bytes();
    let n = cfg.cow_bytes / cs.bytes();
    let chunks = distinct_chunks(n, m, cfg.seed ^ cs.bytes());
    let took = fill(&s, cs, &chunks, cfg.writers)?;
    let geo = Geometry::new(cs);
    let areas = read_table(&s.cow_path, &geo)?;
    let entries: usize = areas.iter().map(Vec::len).sum();
    if entries as u64 != n {
        return Err(format!("the COW holds {entries} entries, not {n}"));
    }
    emit(
        &json!({"cmd": "fill", "cow": name, "chunk_kib": cs.bytes() / 1024, "chunks": n,
        "secs": took.as_secs_f64(), "copy_outs_per_s": per(n * 1000, u64::try_from(took.as_millis()).unwrap_or(1).max(1))}),
    );
    Ok((s, areas))
}

fn settings() -> MergeSettings {
    MergeSettings::default()
}

/// Merge alone, then the plain copy; returns the batch size in chunks.
fn merge_alone(cfg: &Config, cs: ChunkSize) -> Res<usize> {
    let kib = cs.bytes() / 1024;
    let name = format!("cow-{kib}k.img");
    let (s, areas) = filled(cfg, cs, &name)?;
    let runs = kernel_runs(&areas);
    let sample: Vec<u64> = areas
        .iter()
        .flatten()
        .step_by((areas.iter().map(Vec::len).sum::<usize>() / VERIFY_SAMPLES).max(1))
        .map(|e| e.0)
        .collect();
    // What the snapshot holds there: the origin's data before the fill.
    let want = first_tags(&**s.snap.cow(), cs, &areas_news(&areas, &sample))?;
    let batch = mem_usize((settings().batch_bytes / cs.bytes()).max(1));
    let order = merge_order(&areas, batch);
    drop_caches();
    let before = plain_copy(cfg, &s.cow_path, cs, &order)?;
    let dropped = drop_caches();
    let m = timed_merge(&s, settings(), || {})?;
    let got = first_tags(&*s.odev, cs, &sample)?;
    let verified = got == want;
    let mut merged = merge_json(&s, &m, runs);
    if order.len() as u64 != m.status.origin_flushes {
        return Err(format!(
            "the merge made {} batches, the model {}",
            m.status.origin_flushes,
            order.len()
        ));
    }
    drop_caches();
    let after = plain_copy(cfg, &s.cow_path, cs, &order)?;
    let plain_mib_s =
        (before["mib_s"].as_f64().unwrap_or(0.0) + after["mib_s"].as_f64().unwrap_or(0.0)) / 2.0;
    let ratio = merged["mib_s"].as_f64().unwrap_or(0.0) / plain_mib_s;
    merged["caches_dropped"] = json!(dropped);
    merged["verified_samples"] = json!(sample.len());
    merged["verified"] = json!(verified);
    emit(
        &json!({"cmd": "merge", "chunk_kib": kib, "direct": cfg.direct, "batch_chunks": batch,
        "merge": merged, "plain_before": before, "plain_after": after,
        "plain_mib_s": plain_mib_s, "merge_over_plain": ratio}),
    );
    summary_alone(kib, &merged, plain_mib_s, ratio);
    if !verified {
        return Err("the merged origin does not hold the snapshot's data".into());
    }
    s.finish()?;
    Ok(batch)
}

/// The COW chunk of each old chunk of `sample`.
fn areas_news(areas: &[Vec<(u64, u64)>], sample: &[u64]) -> Vec<u64> {
    let map: HashMap<u64, u64> = areas.iter().flatten().copied().collect();
    sample.iter().map(|o| map[o]).collect()
}

fn summary_alone(kib: u64, m: &Value, plain: f64, ratio: f64) {
    eprintln!(
        "{kib} KiB chunks: merge {:.1} MiB/s ({} MiB in {:.1} s, {} batches, {} origin flushes, {:.4} origin flushes and {:.4} syncs per chunk; kernel model {:.3} and {:.3}), plain copy {plain:.1} MiB/s (mean of before and after): merge/plain {ratio:.2}",
        m["mib_s"].as_f64().unwrap_or(0.0),
        m["merged_bytes"].as_u64().unwrap_or(0) >> 20,
        m["secs"].as_f64().unwrap_or(0.0),
        m["batches"],
        m["origin_flushes"],
        m["origin_flushes_per_chunk"].as_f64().unwrap_or(0.0),
        m["syncs_per_chunk"].as_f64().unwrap_or(0.0),
        m["kernel_origin_flushes_per_chunk"].as_f64().unwrap_or(0.0),
        m["kernel_syncs_per_chunk"].as_f64().unwrap_or(0.0),
    );
    eprintln!(
        "  merger time: origin {}, cow {}, outside the devices {:.0} ms",
        m["merger_origin"],
        m["merger_cow"],
        m["merger_ms_outside_devices"].as_f64().unwrap_or(0.0)
    );
}

/// 4 KiB random writes through `Origin::write_at` from `threads` threads until `stop`.
fn writers<'s>(
    sc: &'s std::thread::Scope<'s, '_>,
    origin: &'s Origin,
    threads: usize,
    stop: &'s AtomicBool,
    ops: &'s AtomicU64,
    seed: u64,
) -> Vec<std::thread::ScopedJoinHandle<'s, Res<()>>> {
    let blocks = origin.size() / 4096;
    (0..threads as u64)
        .map(|t| {
            sc.spawn(move || {
                let mut rng = SplitMix(seed ^ t);
                let mut buf = AlignedBuf::zeroed(4096);
                while !stop.load(Ordering::Relaxed) {
                    let off = rng.below(blocks) * 4096;
                    tag_blocks(&mut buf, WRITTEN, off);
                    origin
                        .write_at(&buf, off, Fua::No)
                        .map_err(|e| e.to_string())?;
                    ops.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect()
}

fn join_all(hs: Vec<std::thread::ScopedJoinHandle<'_, Res<()>>>) -> Res<()> {
    hs.into_iter()
        .try_for_each(|h| h.join().map_err(|_| "a writer panicked".to_string())?)
}

/// The writer alone for `cfg.alone`, on the origin without snapshots; IOPS.
fn writer_alone(cfg: &Config) -> Res<f64> {
    let odev = cfg.open(&cfg.origin_path())?;
    let origin = Origin::new(odev, Arc::new(Copier::default()));
    let (stop, ops) = (AtomicBool::new(false), AtomicU64::new(0));
    std::thread::scope(|sc| {
        let hs = writers(sc, &origin, cfg.writers, &stop, &ops, cfg.seed);
        std::thread::sleep(Duration::from_secs(1));
        let (t, before) = (Instant::now(), ops.load(Ordering::Relaxed));
        std::thread::sleep(cfg.alone);
        let n = ops.load(Ordering::Relaxed) - before;
        let took = t.elapsed();
        stop.store(true, Ordering::Relaxed);
        join_all(hs)?;
        Ok(per(n, 1) / took.as_secs_f64())
    })
}

/// The writer alone, then a merge of a fresh COW with the writer running throughout.
fn merge_with_writer(cfg: &Config, cs: ChunkSize, batch: usize) -> Res<()> {
    let kib = cs.bytes() / 1024;
    let alone = writer_alone(cfg)?;
    let name = format!("cow-{kib}k-w.img");
    let (s, areas) = filled(cfg, cs, &name)?;
    let runs = kernel_runs(&areas);
    let dropped = drop_caches();
    let (stop, ops) = (AtomicBool::new(false), AtomicU64::new(0));
    // The writers start once the merge has begun: before, their writes would copy out to
    // the snapshot and fill its COW.
    let (m, n) = std::thread::scope(|sc| -> Res<(Timed, u64)> {
        let mut hs = Vec::new();
        let m = timed_merge(&s, settings(), || {
            hs = writers(sc, &s.origin, cfg.writers, &stop, &ops, cfg.seed ^ 0x77);
        });
        let n = ops.load(Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
        join_all(hs)?;
        Ok((m?, n))
    })?;
    let during = per(n, 1) / m.took.as_secs_f64();
    let mut merged = merge_json(&s, &m, runs);
    merged["caches_dropped"] = json!(dropped);
    emit(
        &json!({"cmd": "merge_with_writer", "chunk_kib": kib, "direct": cfg.direct,
        "writer_threads": cfg.writers, "batch_chunks": batch, "merge": merged,
        "writer_iops_during_merge": during, "writer_iops_alone": alone,
        "writer_ops_during_merge": n, "others_origin": s.odev.others().json(),
        "others_cow": s.cdev.others().json()}),
    );
    eprintln!(
        "{kib} KiB chunks with the writer: merge {:.1} MiB/s ({:.1} s), writer {during:.0} IOPS during the merge, {alone:.0} IOPS alone ({:.2}x)",
        merged["mib_s"].as_f64().unwrap_or(0.0),
        m.took.as_secs_f64(),
        during / alone
    );
    s.finish()
}
