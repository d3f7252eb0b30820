//! `cowsnap serve`: the daemon that exports every volume of a pool over NBD.
//!
//! It takes the pool's lock (a second daemon is refused), activates every origin and
//! snapshot, exports each as an NBD export named after the volume, listens on
//! `POOL/nbd.sock` (mode 0600) unless told otherwise or socket-activated, and answers pool
//! commands on `POOL/control.sock`. With `--fuse DIR` each volume is also the file
//! `DIR/NAME`. At most `--max-connections` NBD connections are open at once. SIGTERM or
//! SIGINT stop it cleanly: no new connections, requests in flight finish, requests that
//! arrived but were not started get `ESHUTDOWN`, every export and COW is flushed, the
//! sockets are removed.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use cowsnap_core::copy::Copier;
use cowsnap_core::pool::{ActivePool, Pool, PoolLock, VolumeKind};
use cowsnap_core::target::Origin;
use cowsnap_core::units::Chunk;
use cowsnap_fuse::VolumeSource;
use cowsnap_nbd::{activation, DeviceExport, Export, Server, ServerConfig};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::control::{self, Reply, Request};

/// Arguments of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where to listen, repeatable: `unix:PATH` or `tcp:HOST:PORT`. Default: the unix
    /// socket POOL/nbd.sock (mode 0600); TCP only when asked. Under systemd socket
    /// activation (LISTEN_FDS) the inherited sockets are used instead.
    #[arg(long = "listen", value_name = "ADDR")]
    pub listen: Vec<String>,
    /// Export this volume read-only (repeatable).
    #[arg(long = "read-only", value_name = "NAME")]
    pub read_only: Vec<String>,
    /// Bypass the page cache: open origin images and COW files with O_DIRECT (like
    /// `qemu-nbd --cache=none`). Flushes still make data durable.
    #[arg(long)]
    pub direct: bool,
    /// Worker threads per NBD connection: how many of its requests run at once. They are
    /// started as requests arrive and end when idle: an idle connection holds one thread.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: u16,
    /// Most NBD connections open at once, counting those still in the handshake; a client
    /// beyond it is disconnected at once (one log line per 10 s says how many were).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_connections: u32,
    /// Also show every volume as the file DIR/NAME (FUSE; made if missing), which
    /// `losetup` can attach: `losetup -f --show DIR/NAME`.
    #[arg(long, value_name = "DIR")]
    pub fuse: Option<PathBuf>,
}

/// The pool's volumes as FUSE files.
struct PoolVolumes {
    active: Arc<ActivePool>,
    read_only: Arc<HashSet<String>>,
}

impl VolumeSource for PoolVolumes {
    fn names(&self) -> Vec<String> {
        self.active.volume_names()
    }
    fn get(&self, name: &str) -> Option<(Arc<dyn cowsnap_core::dev::BlockDevice>, bool)> {
        self.active
            .volume(name)
            .map(|(_, dev)| (dev, self.read_only.contains(name)))
    }
}

enum Addr {
    Unix(PathBuf),
    Tcp(String),
}

fn parse_addr(s: &str) -> Result<Addr> {
    if let Some(p) = s.strip_prefix("unix:") {
        if p.is_empty() {
            bail!("--listen {s}: empty socket path");
        }
        Ok(Addr::Unix(PathBuf::from(p)))
    } else if let Some(hp) = s.strip_prefix("tcp:") {
        if !hp.contains(':') {
            bail!("--listen {s}: expected tcp:HOST:PORT");
        }
        Ok(Addr::Tcp(hp.to_string()))
    } else {
        bail!("--listen {s}: expected unix:PATH or tcp:HOST:PORT")
    }
}

/// Removes a stale socket file at `path`; refuses one a live server still answers on.
fn clear_socket_path(path: &Path) -> Result<()> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!("{} is in use by a running server", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    Ok(())
}

fn private(path: &Path) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))
}

fn export_for(
    active: &ActivePool,
    name: &str,
    read_only: &HashSet<String>,
) -> Result<Arc<dyn Export>> {
    let (kind, dev) = active
        .volume(name)
        .ok_or_else(|| anyhow!("no volume called {name:?}"))?;
    let info = active
        .info(name)
        .ok_or_else(|| anyhow!("no volume called {name:?}"))?;
    let mut e = DeviceExport::new(dev)
        .read_only(read_only.contains(name))
        // A flush is a device-wide fdatasync, so it covers every connection's writes.
        .multi_conn(true)
        .description(format!("cowsnap {} {name}", kind_word(kind)));
    let path = PathBuf::from(&info.path);
    let regular = std::fs::metadata(&path)
        .map(|m| m.is_file())
        .unwrap_or(false);
    e = match (kind, active.origin(name)) {
        // An origin reads its image file directly: its holes are exact, and punching one
        // zeroes fast where no snapshot has to copy the range out first.
        (VolumeKind::Origin, Some(origin)) if regular => e
            .seek_holes(&path)?
            .fast_zero_by_punching(Arc::new(move |offset, len| {
                nothing_to_copy_out(&origin, offset, len)
            })),
        // A snapshot's view mixes COW and origin: report zeros only where it reads zeros.
        // Zeroing it writes zeros into the COW, which is never fast.
        _ => e.scan_zeroes(),
    };
    Ok(Arc::new(e))
}

/// True when writing `offset..offset+len` of `origin` copies nothing out: every valid
/// snapshot already holds (or is taking) its own copy of each chunk. A hint only: a
/// snapshot created a moment later makes the write copy after all.
fn nothing_to_copy_out(origin: &Origin, offset: u64, len: u64) -> bool {
    origin.snapshots().iter().all(|s| {
        !s.is_valid()
            || s.chunk_size()
                .chunk_range(offset, len)
                .all(|c| !s.exceptions().needs_copy(Chunk(c)))
    })
}

fn kind_word(k: VolumeKind) -> &'static str {
    match k {
        VolumeKind::Origin => "origin",
        VolumeKind::Snapshot => "snapshot",
    }
}

fn handle(
    req: Request,
    active: &ActivePool,
    server: &Server,
    read_only: &HashSet<String>,
) -> Reply {
    let result = (|| -> Result<Reply> {
        match req {
            Request::List => Ok(Reply::volumes(active.list())),
            Request::Status { name } => {
                let info = active
                    .info(&name)
                    .ok_or_else(|| anyhow!("no volume called {name:?}"))?;
                Ok(Reply::volumes(vec![info]))
            }
            Request::CreateSnapshot(spec) => {
                let name = spec.name.clone();
                let req = spec.to_request()?;
                let (info, warning) = active.create_snapshot(&req)?;
                server
                    .add_export(name.clone(), export_for(active, &name, read_only)?)
                    .map_err(|e| anyhow!("{e}"))?;
                eprintln!("cowsnap: created snapshot {name}");
                Ok(Reply {
                    warning,
                    ..Reply::volumes(vec![info])
                })
            }
            Request::RemoveSnapshot { name } => {
                if active.snapshot(&name).is_none() {
                    bail!("no snapshot called {name:?}");
                }
                server.remove_export(&name);
                active.remove_snapshot(&name)?;
                eprintln!("cowsnap: removed snapshot {name}");
                Ok(Reply::volumes(Vec::new()))
            }
        }
    })();
    result.unwrap_or_else(|e| Reply::error(format!("{e:#}")))
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(dir: &Path, args: ServeArgs) -> Result<ExitCode> {
    let addrs: Vec<Addr> = args
        .listen
        .iter()
        .map(|s| parse_addr(s))
        .collect::<Result<_>>()?;
    // Take inherited sockets first: this edits the environment, which is only safe
    // before any thread starts.
    let inherited = if activation::is_socket_activated() {
        Some(activation::listeners_from_env()?)
    } else {
        None
    };
    let _lock = PoolLock::acquire(dir)?;
    let mut pool = Pool::open(dir)?;
    pool.set_direct(args.direct);
    let (active, warnings) = ActivePool::activate(pool, Arc::new(Copier::default()))?;
    let active = Arc::new(active);
    for w in &warnings {
        eprintln!("cowsnap: warning: {w}");
    }
    let read_only: HashSet<String> = args.read_only.iter().cloned().collect();
    for n in &read_only {
        if active.volume(n).is_none() {
            bail!("--read-only {n}: no volume called {n:?} in this pool");
        }
    }
    let read_only = Arc::new(read_only);
    let log: cowsnap_nbd::server::LogFn = Arc::new(|line: &str| eprintln!("cowsnap: nbd: {line}"));
    let server = Arc::new(Server::new(ServerConfig {
        log: Some(log),
        workers: usize::from(args.workers),
        max_connections: args.max_connections as usize,
        ..ServerConfig::default()
    }));
    for name in active.volume_names() {
        server
            .add_export(name.clone(), export_for(&active, &name, &read_only)?)
            .map_err(|e| anyhow!("{e}"))?;
    }

    let mut sockets = Vec::new();
    let mut endpoints = Vec::new();
    if let Some(listeners) = inherited {
        for l in listeners {
            endpoints.push("an inherited socket (LISTEN_FDS) for export {NAME}".to_string());
            server.listen(l)?;
        }
    } else {
        let addrs = if addrs.is_empty() {
            vec![Addr::Unix(dir.join("nbd.sock"))]
        } else {
            addrs
        };
        for a in addrs {
            match a {
                Addr::Unix(p) => {
                    clear_socket_path(&p)?;
                    server
                        .listen_unix(&p)
                        .with_context(|| format!("listening on {}", p.display()))?;
                    private(&p)?;
                    endpoints.push(format!("nbd+unix:///{{NAME}}?socket={}", p.display()));
                    sockets.push(p);
                }
                Addr::Tcp(hp) => {
                    let bound = server
                        .listen_tcp(hp.as_str())
                        .with_context(|| format!("listening on tcp:{hp}"))?;
                    endpoints.push(format!("nbd://{bound}/{{NAME}}"));
                }
            }
        }
    }

    let ctl_path = control::socket_path(dir);
    clear_socket_path(&ctl_path)?;
    let ctl = UnixListener::bind(&ctl_path)
        .with_context(|| format!("binding the control socket {}", ctl_path.display()))?;
    private(&ctl_path)?;
    sockets.push(ctl_path);
    {
        let (active, server, read_only) = (active.clone(), server.clone(), read_only.clone());
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for stream in ctl.incoming().flatten() {
                    let r =
                        control::serve_one(stream, |req| handle(req, &active, &server, &read_only));
                    if let Err(e) = r {
                        eprintln!("cowsnap: control: {e:#}");
                    }
                }
            })?;
    }

    let fuse = match &args.fuse {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the FUSE directory {}", dir.display()))?;
            let source = Arc::new(PoolVolumes {
                active: active.clone(),
                read_only: read_only.clone(),
            });
            let m = cowsnap_fuse::mount(source, dir)
                .with_context(|| format!("mounting the volume files on {}", dir.display()))?;
            endpoints.push(format!("file {}/{{NAME}}", dir.display()));
            Some(m)
        }
        None => None,
    };

    let mut signals = Signals::new([SIGTERM, SIGINT]).context("installing signal handlers")?;
    println!("cowsnap: serving pool {}", dir.display());
    for name in active.volume_names() {
        for ep in &endpoints {
            println!("  {name}: {}", ep.replace("{NAME}", &name));
        }
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let sig = signals.forever().next();
    eprintln!(
        "cowsnap: stopping on signal {}",
        sig.map(|s| s.to_string()).unwrap_or_default()
    );
    drop(fuse);
    let flushed = server.shutdown();
    let flushed_all = active.flush_all();
    for s in &sockets {
        let _ = std::fs::remove_file(s);
    }
    flushed.context("flushing exports")?;
    flushed_all.context("flushing the pool")?;
    eprintln!("cowsnap: stopped");
    Ok(ExitCode::SUCCESS)
}
