//! Pool commands: `init`, `origin create|add`, `snapshot create|remove`, `list`, `status`.
//!
//! Snapshot commands, `list` and `status` go to the running daemon through the control
//! socket when there is one, so they act on the live volumes; otherwise they take the
//! pool's lock and act on the files. Both paths print the same output. `--json` output is
//! the [`VolumeInfo`] structure documented in docs/cli.md.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand};
use cowsnap_core::copy::Copier;
use cowsnap_core::units::{parse_size, ChunkSize};
use cowsnap_pool::{LayerRequest, Pool, PoolLock, VolumeInfo, VolumeKind};

use crate::control::{self, Reply, Request, SnapshotSpec};

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s)
}

/// `--cow-size`: bytes, or a percentage of the origin.
#[derive(Clone, Copy, Debug)]
pub enum CowSize {
    /// Bytes.
    Bytes(u64),
    /// Percent of the origin's size.
    Percent(u64),
}

fn cow_size_arg(s: &str) -> Result<CowSize, String> {
    match s.strip_suffix('%') {
        Some(p) => match p.trim().parse::<u64>() {
            Ok(p) if (1..=1000).contains(&p) => Ok(CowSize::Percent(p)),
            _ => Err(format!("{s:?}: a percentage is 1% to 1000% of the origin")),
        },
        None => parse_size(s).map(CowSize::Bytes),
    }
}

fn chunk_arg(s: &str) -> Result<ChunkSize, String> {
    let bytes = parse_size(s)?;
    ChunkSize::from_bytes(bytes).map_err(|e| e.to_string())
}

/// `cowsnap origin ...`
#[derive(Debug, Subcommand)]
pub enum OriginCommand {
    /// Create a new sparse origin image inside the pool.
    ///
    /// Examples:
    ///   cowsnap --pool /srv/pool origin create vm1 --size 20G
    ///   cowsnap --pool /srv/pool origin create rig --size 1G --layer "test-dust 8" --layer bbr
    #[command(after_help = crate::layer::LAYERS_HELP)]
    Create {
        /// Volume name (also its NBD export name).
        name: String,
        /// Size, with K/M/G/T suffixes (binary).
        #[arg(long, value_parser = size_arg)]
        size: u64,
        /// A layer between the image and the origin, `TARGET ARGS` (repeat, bottom first;
        /// see below).
        #[arg(long = "layer", value_name = "SPEC")]
        layers: Vec<String>,
    },
    /// Add an existing image file or block device as an origin (never deleted by cowsnap).
    ///
    /// Example: cowsnap --pool /srv/pool origin add data --path /dev/vg/data
    #[command(after_help = crate::layer::LAYERS_HELP)]
    Add {
        /// Volume name.
        name: String,
        /// The image file or block device.
        #[arg(long)]
        path: PathBuf,
        /// A layer between the file and the origin, `TARGET ARGS` (repeat, bottom first).
        #[arg(long = "layer", value_name = "SPEC")]
        layers: Vec<String>,
    },
}

/// `cowsnap snapshot ...`
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Create a snapshot of an origin: its content frozen now.
    ///
    /// With a running daemon the snapshot is taken live: every write acknowledged before
    /// the command started is in it. Examples:
    ///   cowsnap --pool P snapshot create before-upgrade --origin vm1 --cow-size 2G
    ///   cowsnap --pool P snapshot create lvsnap --origin data --cow /dev/vg/snap-cow
    Create(SnapshotCreate),
    /// Remove a snapshot (its COW file too, if the pool created it).
    ///
    /// Refused while the snapshot has NBD clients or open FUSE files (they would get I/O
    /// errors), and for a snapshot whose merge has started (its origin would stay half
    /// merged), unless --force.
    Remove {
        /// Snapshot name.
        name: String,
        /// Remove it anyway: its open readers get I/O errors; a merge that started leaves
        /// its origin half merged.
        #[arg(long)]
        force: bool,
    },
    /// Roll the origin back to the snapshot (lvconvert --merge): from now on the origin
    /// shows the snapshot's content (its own writes included) while the data moves back in
    /// the background; the snapshot is removed when it is done. Other snapshots of the
    /// origin stay exact. A daemon stopped mid-merge resumes it at its next start.
    ///
    /// Examples:
    ///   cowsnap --pool P snapshot merge before-upgrade --wait
    ///   cowsnap --pool P snapshot merge before-upgrade --now --rate 100M
    Merge(crate::merge::SnapshotMerge),
}

/// Arguments of `snapshot create`.
#[derive(Debug, Args)]
pub struct SnapshotCreate {
    /// Snapshot name.
    name: String,
    /// The origin to snapshot.
    #[arg(long)]
    origin: String,
    /// Size of a new COW file inside the pool: K/M/G/T, or a percentage of the origin
    /// (20%). It holds the old copies of changed origin chunks plus metadata; when full,
    /// the snapshot becomes invalid. More than the origin can ever need is capped, with a
    /// warning.
    #[arg(long, value_parser = cow_size_arg, required_unless_present = "cow", conflicts_with = "cow")]
    cow_size: Option<CowSize>,
    /// Adopt an existing COW file or device: one written by the Linux kernel (an LVM
    /// snapshot's COW volume) keeps its exceptions and its chunk size. A file without a
    /// COW header is refused unless --format is given.
    #[arg(long)]
    cow: Option<PathBuf>,
    /// With --cow: format a file that has no COW header yet as a new, empty COW. Refused
    /// unless every byte of it is zero, so no data can be overwritten.
    #[arg(long, requires = "cow")]
    format: bool,
    /// Chunk size, a power of two from 4K to 1G. Default: an adopted COW's own, else 4K.
    /// An adopted COW's header wins over a different one given here, with a warning.
    #[arg(long, value_parser = chunk_arg)]
    chunk_size: Option<ChunkSize>,
    /// Transient store: exceptions only in the daemon's memory, lost when it stops.
    #[arg(long, conflicts_with = "overflow")]
    transient: bool,
    /// When a snapshot write finds the COW full, fail it and mark the snapshot
    /// `Overflow` (reads keep working) instead of invalidating the snapshot (store `PO`).
    #[arg(long)]
    overflow: bool,
    /// A layer between the COW file and the store, `TARGET ARGS` (repeat, bottom first):
    /// the test-* layers make a COW fail on purpose (see `cowsnap layer add --help`).
    #[arg(long = "cow-layer", value_name = "SPEC")]
    cow_layers: Vec<String>,
    /// Print the new snapshot's status as JSON.
    #[arg(long)]
    json: bool,
}

/// Resolves `--pool`/`$COWSNAP_POOL`.
pub fn pool_dir(pool: Option<&Path>) -> Result<PathBuf> {
    pool.map(Path::to_path_buf).ok_or_else(|| {
        anyhow!("no pool given: pass --pool DIR or set COWSNAP_POOL (create one with `cowsnap --pool DIR init`)")
    })
}

/// How a command reaches the pool when no daemon answered at first.
pub(crate) enum Access {
    /// It holds the pool's lock.
    Locked(PoolLock),
    /// A daemon started serving the pool while it waited: go through the daemon.
    Daemon,
}

/// Waits for the pool's lock while another process holds it, up to `--timeout` (commands
/// take turns, as lvm's do), saying once whom it waits for; between short waits it asks
/// whether a daemon now serves the pool (one starting up holds the lock for good).
pub(crate) fn wait_for_pool(dir: &Path) -> Result<Access> {
    let first = match PoolLock::acquire(dir) {
        Ok(lock) => return Ok(Access::Locked(lock)),
        Err(e) => e,
    };
    let timeout = control::timeout();
    eprintln!(
        "cowsnap: {first}: waiting up to {} s for it",
        timeout.as_secs()
    );
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match PoolLock::acquire_waiting(
            dir,
            left.min(std::time::Duration::from_millis(250)),
            &mut |_| {},
        ) {
            Ok(lock) => return Ok(Access::Locked(lock)),
            Err(e) if left.is_zero() => return Err(e.into()),
            Err(_) => {
                if control::call(dir, &Request::List)?.is_some() {
                    return Ok(Access::Daemon);
                }
            }
        }
    }
}

/// Takes the pool's lock ([`wait_for_pool`]) and opens the pool.
pub(crate) fn locked(dir: &Path) -> Result<(PoolLock, Pool)> {
    let lock = match wait_for_pool(dir)? {
        Access::Locked(lock) => lock,
        Access::Daemon => bail!(
            "a daemon started serving pool {} while this command waited for it: run the command again to go through the daemon",
            dir.display()
        ),
    };
    let pool = Pool::open(dir)?;
    for n in pool.notes() {
        eprintln!("cowsnap: {n}");
    }
    Ok((lock, pool))
}

pub(crate) fn daemon_reply(reply: Reply) -> Result<Reply> {
    if reply.ok {
        Ok(reply)
    } else {
        bail!(reply.error.unwrap_or_else(|| "the daemon refused".into()))
    }
}

/// `cowsnap init`.
pub fn init(dir: &Path) -> Result<ExitCode> {
    Pool::init(dir)?;
    println!("initialised pool {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

/// `cowsnap origin ...`.
pub fn origin(dir: &Path, cmd: OriginCommand) -> Result<ExitCode> {
    if control::call(dir, &Request::List)?.is_some() {
        bail!("a daemon is serving this pool: stop it to add origins (origins are added offline)");
    }
    let (_lock, mut pool) = locked(dir)?;
    match cmd {
        OriginCommand::Create { name, size, layers } => {
            let e = pool.create_origin(&name, size, &parse_layers(&layers)?)?;
            println!(
                "created origin {name}: {} ({size} bytes)",
                pool.resolve(&e.path).display()
            );
        }
        OriginCommand::Add { name, path, layers } => {
            let e = pool.add_origin(&name, &path, &parse_layers(&layers)?)?;
            println!("added origin {name}: {}", e.path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `cowsnap snapshot ...`.
pub fn snapshot(dir: &Path, cmd: SnapshotCommand) -> Result<ExitCode> {
    match cmd {
        SnapshotCommand::Create(a) => {
            let spec = SnapshotSpec {
                name: a.name.clone(),
                origin: a.origin.clone(),
                cow_size: match a.cow_size {
                    Some(CowSize::Bytes(b)) => Some(b),
                    _ => None,
                },
                cow_percent: match a.cow_size {
                    Some(CowSize::Percent(p)) => Some(p),
                    _ => None,
                },
                cow_path: a.cow.clone(),
                chunk_sectors: a.chunk_size.map(|c| c.sectors()),
                transient: a.transient,
                overflow: a.overflow,
                format: a.format,
                cow_layers: a.cow_layers.clone(),
            };
            let req = Request::CreateSnapshot(spec.clone());
            let (info, warning) = match control::call(dir, &req)? {
                Some(reply) => {
                    let mut r = daemon_reply(reply)?;
                    let info = r
                        .volumes
                        .pop()
                        .ok_or_else(|| anyhow!("the daemon sent no status"))?;
                    (info, r.warning)
                }
                None => {
                    let (_lock, mut pool) = locked(dir)?;
                    let (entry, warning) = pool.create_snapshot(&spec.to_request()?)?;
                    let info = pool
                        .list_offline(Arc::new(Copier::default()), Some(&entry.name))?
                        .pop()
                        .ok_or_else(|| anyhow!("snapshot vanished"))?;
                    (info, warning)
                }
            };
            if let Some(w) = warning {
                eprintln!("cowsnap: warning: {w}");
            }
            if a.json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!(
                    "created snapshot {} of {} ({} store, {} chunks): {}",
                    info.name,
                    info.origin.as_deref().unwrap_or("?"),
                    info.store.as_deref().unwrap_or("?"),
                    info.chunk_size.map(human).unwrap_or_default(),
                    info.path
                );
            }
        }
        SnapshotCommand::Merge(a) => return crate::merge::start(dir, a),
        SnapshotCommand::Remove { name, force } => {
            let req = Request::RemoveSnapshot {
                name: name.clone(),
                force,
            };
            let warnings = match control::call(dir, &req)? {
                Some(reply) => daemon_reply(reply)?.warning.into_iter().collect(),
                None => {
                    let (_lock, mut pool) = locked(dir)?;
                    pool.remove_snapshot(&name, force)?
                }
            };
            for w in warnings {
                eprintln!("cowsnap: warning: {w}");
            }
            println!("removed snapshot {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_layers(specs: &[String]) -> Result<Vec<LayerRequest>> {
    Ok(specs
        .iter()
        .map(|s| LayerRequest::parse(s))
        .collect::<std::result::Result<_, _>>()?)
}

/// Every volume's status, or only `only`'s, from the daemon or from the files.
pub(crate) fn volumes(dir: &Path, only: Option<&str>) -> Result<Vec<VolumeInfo>> {
    let req = match only {
        Some(name) => Request::Status { name: name.into() },
        None => Request::List,
    };
    loop {
        if let Some(reply) = control::call(dir, &req)? {
            return Ok(daemon_reply(reply)?.volumes);
        }
        // A daemon that started while this waited for the pool answers the next round.
        if let Access::Locked(lock) = wait_for_pool(dir)? {
            let pool = Pool::open(dir)?;
            for n in pool.notes() {
                eprintln!("cowsnap: {n}");
            }
            let out = pool.list_offline(Arc::new(Copier::default()), only)?;
            drop(lock);
            return Ok(out);
        }
    }
}

/// `cowsnap list`.
pub fn list(dir: &Path, json: bool) -> Result<ExitCode> {
    let vols = volumes(dir, None)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&vols)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:<8} {:>8} {:<12} {:<5} {:>6}  STATUS",
        "NAME", "KIND", "SIZE", "ORIGIN", "STORE", "CHUNK"
    );
    for v in &vols {
        println!(
            "{:<20} {:<8} {:>8} {:<12} {:<5} {:>6}  {}",
            v.name,
            kind_name(v.kind),
            human(v.size),
            v.origin.as_deref().unwrap_or("-"),
            v.store.as_deref().unwrap_or("-"),
            v.chunk_size.map(human).unwrap_or_else(|| "-".into()),
            match (&v.merge, v.kind) {
                (Some(m), VolumeKind::Origin) =>
                    format!("merging {} {:.1}%", m.snapshot, m.percent),
                (None, VolumeKind::Origin) => "active".to_string(),
                (Some(m), VolumeKind::Snapshot) =>
                    format!("{} (merge {} {:.1}%)", v.status, m.state, m.percent),
                (None, VolumeKind::Snapshot) => match v.use_percent {
                    Some(p) => format!("{} ({p:.1}% used)", v.status),
                    None => v.status.clone(),
                },
            } + &layers_note(v)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `cowsnap status [NAME]`: dmsetup-style lines `NAME: 0 <sectors> <target> <status>`.
pub fn status(dir: &Path, name: Option<&str>, json: bool) -> Result<ExitCode> {
    let vols = volumes(dir, name)?;
    if let (Some(n), true) = (name, vols.is_empty()) {
        bail!("no volume called {n:?} in pool {}", dir.display());
    }
    if json {
        let out = if name.is_some() {
            serde_json::to_string_pretty(&vols[0])?
        } else {
            serde_json::to_string_pretty(&vols)?
        };
        println!("{out}");
        return Ok(ExitCode::SUCCESS);
    }
    for v in &vols {
        let merging = v
            .merge
            .as_ref()
            .is_some_and(|m| m.state != "next_activation");
        let target = match v.kind {
            VolumeKind::Origin => "snapshot-origin",
            VolumeKind::Snapshot if merging => "snapshot-merge",
            VolumeKind::Snapshot => "snapshot",
        };
        match (&v.merge, v.kind) {
            (Some(m), VolumeKind::Snapshot) => println!(
                "{}: 0 {} {target} {}  # merge {} {:.1}%",
                v.name,
                v.size / 512,
                v.status,
                m.state,
                m.percent
            ),
            _ => println!("{}: 0 {} {target} {}", v.name, v.size / 512, v.status),
        }
        for l in &v.layers {
            println!("{}", crate::layer::line(&v.name, l, true));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `  [on test-dust, bbr ok]`: the layers under a volume, bottom first, with a `bbr`'s state.
fn layers_note(v: &VolumeInfo) -> String {
    if v.layers.is_empty() {
        return String::new();
    }
    let names: Vec<String> = v
        .layers
        .iter()
        .map(|l| match (&l.detail, l.target.as_str()) {
            (Some(d), "bbr") => format!("bbr {}", d["state"].as_str().unwrap_or("?")),
            _ => l.target.clone(),
        })
        .collect();
    format!("  [on {}]", names.join(", "))
}

fn kind_name(k: VolumeKind) -> &'static str {
    match k {
        VolumeKind::Origin => "origin",
        VolumeKind::Snapshot => "snapshot",
    }
}

/// Bytes with a binary suffix: 4096 -> 4K, 1073741824 -> 1G, 1536 -> 1536.
pub fn human(n: u64) -> String {
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if n >= 1 << shift && n % (1 << shift) == 0 {
            return format!("{}{suffix}", n >> shift);
        }
    }
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(4096), "4K");
        assert_eq!(human(1 << 30), "1G");
        assert_eq!(human(1536), "1536");
        assert_eq!(human(0), "0");
    }
}
