//! `cowsnap serve`: the daemon that exports every volume of a pool over NBD.
//!
//! It takes the pool's lock (a second daemon is refused), activates every origin and
//! snapshot, exports each as an NBD export named after the volume, listens on
//! `POOL/nbd.sock` (mode 0600) unless told otherwise or socket-activated, and answers pool
//! commands on `POOL/control.sock`. With `--fuse DIR` each volume is also the file
//! `DIR/NAME`. TCP listeners get TLS and the plain-text-on-a-network refusal from
//! [`crate::tcp`]. At most `--max-connections` NBD connections are open at once. SIGTERM or
//! SIGINT stop it cleanly: no new connections, requests in flight finish, requests that
//! arrived but were not started get `ESHUTDOWN`, every export and COW is flushed, the
//! sockets are removed. An invalid snapshot is not flushed (it has nothing to keep) and
//! does not fail the stop: it is logged, and the exit status is 0 unless flushing a valid
//! volume failed.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use cowsnap_core::copy::Copier;
use cowsnap_core::dev::{BlockDevice, FileId, Fua};
use cowsnap_core::targets::Origin;
use cowsnap_core::units::Chunk;
use cowsnap_fuse::OpenFiles;
use cowsnap_fuse::VolumeSource;
use cowsnap_nbd::{activation, DeviceExport, Export, Server, ServerConfig};
use cowsnap_pool::{ActivePool, Pool, PoolLock, VolumeKind};
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
    /// Memory for the snapshots' exception indexes, shared by the whole pool (K/M/G
    /// suffixes): the pages of their on-disk indexes kept in memory. Each snapshot holds
    /// besides about one bit per origin chunk (which chunks are remapped) and up to 32 Ki
    /// recent exceptions; the rest of its exceptions stays on disk under POOL/index/,
    /// however many there are. A lookup that misses costs one 4 KiB read.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = cache_size_arg)]
    pub cache_size: u64,
    /// TLS for TCP listeners.
    #[command(flatten)]
    pub tls: crate::tcp::TlsArgs,
}

fn cache_size_arg(s: &str) -> Result<u64, String> {
    let bytes = cowsnap_core::units::parse_size(s)?;
    if bytes < 64 * 1024 {
        return Err(format!(
            "{s} is too small: the index cache needs at least 64K (16 pages of 4 KiB)"
        ));
    }
    Ok(bytes)
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
    fn get(&self, name: &str) -> Option<(Arc<dyn BlockDevice>, bool)> {
        self.active
            .volume_for_io(name)
            .map(|(dev, forced)| (dev, forced || self.read_only.contains(name)))
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
    let forced = active.read_only_reason(name);
    let dev: Arc<dyn BlockDevice> = match kind {
        VolumeKind::Snapshot => Arc::new(StopTolerant {
            dev,
            stopping: &STOPPING,
        }),
        VolumeKind::Origin => dev,
    };
    let mut e = DeviceExport::new(dev)
        .read_only(read_only.contains(name) || forced.is_some())
        // A flush is a device-wide fdatasync, so it covers every connection's writes.
        .multi_conn(true)
        .description(format!("cowsnap {} {name}", kind_word(kind)));
    let path = PathBuf::from(&info.path);
    // Holes are read from the image by path: only when the path still names the file the
    // pool opened (a replaced file would report another file's holes).
    // Only a volume that is its file: under layers (a linear offset, bbr's relocated
    // chunks, test-zero) the file's holes are not the volume's, and punching the file
    // would not zero a relocated chunk.
    let regular = (info.layers.is_empty()
        || cowsnap_core::mutation::active("layered-origin-file-holes"))
        && std::fs::metadata(&path).is_ok_and(|m| {
            m.is_file() && FileId::of(&m).is_some() && FileId::of(&m) == active.file_id(name)
        });
    e = match (kind, active.origin(name)) {
        // An origin reads its image file directly: its holes are exact, and punching one
        // zeroes fast where no snapshot has to copy the range out first.
        // While a snapshot merges into it the origin reads the COW too: then its zeros are
        // found by reading, and zeroing goes through the merge (never a punched hole).
        (VolumeKind::Origin, Some(origin)) if regular => {
            let unmerged = origin.clone();
            e.seek_holes(&path)?
                .holes_valid_while(Arc::new(move || unmerged.merge().is_none()))
                .fast_zero_by_punching(Arc::new(move |offset, len| {
                    origin.merge().is_none() && nothing_to_copy_out(&origin, offset, len)
                }))
        }
        // A snapshot's view mixes COW and origin: report zeros only where it reads zeros.
        // Zeroing it writes zeros into the COW, which is never fast.
        _ => e.scan_zeroes(),
    };
    Ok(Arc::new(e))
}

/// The pool's lock for a daemon: a daemon serving the pool already is refused at once; a
/// command holding it for a moment (a `status` in a monitoring loop) is waited for.
fn take_pool(dir: &Path) -> Result<PoolLock> {
    match PoolLock::acquire(dir) {
        Ok(lock) => Ok(lock),
        Err(e)
            if crate::control::call(dir, &crate::control::Request::List)
                .ok()
                .flatten()
                .is_some() =>
        {
            Err(e.into())
        }
        Err(_) => Ok(PoolLock::acquire_waiting(
            dir,
            crate::control::timeout(),
            &mut |m| eprintln!("cowsnap: {m}"),
        )?),
    }
}

/// Set when the daemon stops: from then on an invalid snapshot's flush succeeds.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// A snapshot whose flush, once `stopping` is set, tolerates the snapshot being invalid:
/// an invalid snapshot has nothing left to make durable (its reads and writes fail). Any
/// other flush failure, and every failure before the stop, goes through.
#[derive(Debug)]
struct StopTolerant {
    dev: Arc<dyn BlockDevice>,
    stopping: &'static AtomicBool,
}

impl BlockDevice for StopTolerant {
    fn size(&self) -> u64 {
        self.dev.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> cowsnap_core::Result<()> {
        self.dev.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: Fua) -> cowsnap_core::Result<()> {
        self.dev.write_at(buf, offset, fua)
    }
    fn flush(&self) -> cowsnap_core::Result<()> {
        match self.dev.flush() {
            Err(cowsnap_core::Error::Invalid(_)) if self.stopping.load(Ordering::SeqCst) => Ok(()),
            r => r,
        }
    }
    fn discard(&self, offset: u64, len: u64) -> cowsnap_core::Result<()> {
        self.dev.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: Fua) -> cowsnap_core::Result<()> {
        self.dev.write_zeroes(offset, len, fua)
    }
    fn describe(&self) -> String {
        self.dev.describe()
    }
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
    active: &Arc<ActivePool>,
    server: &Server,
    read_only: &HashSet<String>,
    open_files: &OpenFiles,
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
            Request::RemoveSnapshot { name, force } => {
                if !active.has_snapshot(&name) {
                    bail!("no snapshot called {name:?}");
                }
                let users = users_of(server, open_files, &[&name]);
                if !force && !users.is_empty() {
                    bail!(
                        "snapshot {name:?} is in use ({}): removed, its readers would get I/O errors. Close them, or pass --force",
                        users.join(", ")
                    );
                }
                let origin = active.info(&name).and_then(|i| i.origin);
                let was_read_only = origin
                    .as_deref()
                    .is_some_and(|o| active.read_only_reason(o).is_some());
                let export = server.remove_export(&name);
                let warnings = match active.remove_snapshot(&name, force) {
                    Ok(w) => w,
                    Err(e) => {
                        // Nothing changed unless the snapshot left the table: serve it again.
                        if let (Some(x), Some(_)) = (export, active.snapshot(&name)) {
                            let _ = server.add_export(name.clone(), x);
                        }
                        return Err(e.into());
                    }
                };
                // Removing a failed snapshot can make its origin writable again.
                if let Some(o) = origin.filter(|_| was_read_only) {
                    if active.origin(&o).is_some() && active.read_only_reason(&o).is_none() {
                        if let Ok(x) = export_for(active, &o, read_only) {
                            server.remove_export(&o);
                            let _ = server.add_export(o.clone(), x);
                        }
                    }
                }
                for w in &warnings {
                    eprintln!("cowsnap: warning: {w}");
                }
                eprintln!("cowsnap: removed snapshot {name}");
                Ok(Reply {
                    warning: (!warnings.is_empty()).then(|| warnings.join("; ")),
                    ..Reply::volumes(Vec::new())
                })
            }
            Request::MergeSnapshot {
                name,
                now,
                paused,
                rate,
            } => merge_snapshot(active, server, open_files, &name, now, paused, rate),
            Request::MergeControl { name, action } => {
                let info = active.merge_control(&name, action)?;
                eprintln!("cowsnap: merge of snapshot {name}: {}", info.state);
                Ok(Reply {
                    merge: Some(info),
                    ..Reply::volumes(Vec::new())
                })
            }
            Request::LayerMessage {
                volume,
                layer,
                words,
            } => {
                let words: Vec<&str> = words.iter().map(String::as_str).collect();
                let answer = active.layer_message(&volume, &layer, &words)?;
                eprintln!(
                    "cowsnap: message to layer {layer} of {volume}: {}",
                    words.join(" ")
                );
                Ok(Reply {
                    message: Some(answer),
                    ..Reply::volumes(Vec::new())
                })
            }
        }
    })();
    result.unwrap_or_else(|e| Reply::error(format!("{e:#}")))
}

/// Who has the volumes `names` open: NBD connections and FUSE files, one phrase per
/// volume and kind (empty: nobody).
fn users_of(server: &Server, open_files: &OpenFiles, names: &[&str]) -> Vec<String> {
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    let mut users = Vec::new();
    for v in names {
        if let Some(n) = server.export_users(v).filter(|n| *n > 0) {
            users.push(format!("{v} has {n} NBD connection{}", plural(n)));
        }
        let n = open_files.count(v) as usize;
        if n > 0 {
            users.push(format!("{v} is open {n} time{} through FUSE", plural(n)));
        }
    }
    users
}

/// `snapshot merge`: merges now when neither the origin nor the snapshot has NBD clients
/// or open FUSE files (or with `now`); otherwise records the merge for the next start, as lvm2 defers a merge
/// of an open origin, and says so. A merge that starts takes the snapshot's export away.
fn merge_snapshot(
    active: &Arc<ActivePool>,
    server: &Server,
    open_files: &OpenFiles,
    name: &str,
    now: bool,
    paused: bool,
    rate: Option<u64>,
) -> Result<Reply> {
    let origin = active
        .info(name)
        .and_then(|i| i.origin)
        .ok_or_else(|| anyhow!("no snapshot called {name:?}"))?;
    let users = users_of(server, open_files, &[origin.as_str(), name]);
    let deferred = !now && !users.is_empty();
    let info = active.merge_snapshot(name, !deferred, paused, rate)?;
    let warning = if deferred {
        eprintln!(
            "cowsnap: merge of snapshot {name} into {origin} deferred to the next start ({})",
            users.join(", ")
        );
        Some(format!(
            "{} in use ({}): the merge will start when the daemon next starts (it is recorded); \
             to merge now, pass --now: readers of {origin} then see its content change under them",
            origin,
            users.join(", ")
        ))
    } else {
        // The snapshot is no longer served: its content is the origin's now.
        server.remove_export(name);
        None
    };
    Ok(Reply {
        warning,
        merge: Some(info),
        ..Reply::volumes(Vec::new())
    })
}

/// Listens on the inherited sockets, or else on `addrs` (the pool's `nbd.sock` when there
/// are none); `tls_on` when the server has TLS settings. Returns the Unix socket paths to remove on exit and the endpoints to print,
/// with `{NAME}` standing for the export.
fn listen(
    server: &Server,
    dir: &Path,
    addrs: Vec<Addr>,
    inherited: Option<Vec<cowsnap_nbd::Listener>>,
    tls: &crate::tcp::TlsArgs,
    tls_on: bool,
) -> Result<(Vec<PathBuf>, Vec<String>)> {
    let mut sockets = Vec::new();
    let mut endpoints = Vec::new();
    if let Some(listeners) = inherited {
        for l in listeners {
            if let Some(a) = l.tcp_addr() {
                tls.check_exposure("an inherited TCP socket (LISTEN_FDS)", &[a])?;
                endpoints.extend(crate::tcp::uris(a, tls_on));
            } else {
                endpoints.push("an inherited socket (LISTEN_FDS) for export {NAME}".to_string());
            }
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
                    endpoints.extend(crate::tcp::uris(bound, tls_on));
                }
            }
        }
    }
    Ok((sockets, endpoints))
}

/// Binds `POOL/control.sock` and starts its thread; returns the socket's path.
fn start_control(
    dir: &Path,
    active: &Arc<ActivePool>,
    server: &Arc<Server>,
    read_only: &Arc<HashSet<String>>,
    open_files: &Arc<OpenFiles>,
) -> Result<PathBuf> {
    let ctl_path = control::socket_path(dir);
    clear_socket_path(&ctl_path)?;
    let ctl = UnixListener::bind(&ctl_path)
        .with_context(|| format!("binding the control socket {}", ctl_path.display()))?;
    private(&ctl_path)?;
    let (active, server, read_only) = (active.clone(), server.clone(), read_only.clone());
    let open_files = open_files.clone();
    let handler: control::Handler =
        Arc::new(move |req| handle(req, &active, &server, &read_only, &open_files));
    control::spawn_server(ctl, handler).context("starting the control socket's thread")?;
    Ok(ctl_path)
}

/// Tells the operator what TCP clients need for TLS (the daemon has `--tls-creds DIR`).
fn print_tls_clients(tls: &crate::tcp::TlsArgs) {
    let Some(dir) = &tls.tls_creds else {
        return;
    };
    println!(
        "cowsnap: TCP clients use TLS ({}{}); they need the CA certificate: \
         libnbd nbds://...?tls-certificates=CLIENTDIR, qemu --object \
         tls-creds-x509,id=tls0,dir=CLIENTDIR,endpoint=client (CLIENTDIR has ca-cert.pem{})",
        match tls.policy() {
            crate::tcp::TlsPolicy::On => "optional",
            _ => "required",
        },
        if tls.tls_verify_peer {
            format!(
                ", client certificates signed by {}/ca-cert.pem",
                dir.display()
            )
        } else {
            String::new()
        },
        if tls.tls_verify_peer {
            ", client-cert.pem, client-key.pem"
        } else {
            ""
        }
    );
}

/// Stops serving: closes the connections, flushes every export and the pool, checkpoints
/// the exception indexes, removes the sockets, and names the invalid snapshots, which were
/// not flushed.
fn stop(server: &Server, active: &ActivePool, sockets: &[PathBuf]) -> Result<()> {
    // An invalid snapshot has nothing to flush; its export's flush must not fail the stop.
    STOPPING.store(true, Ordering::SeqCst);
    let flushed = server.shutdown();
    // Each merger finishes its batch under way; the next start resumes from the COW.
    active.stop_merges();
    let flushed_all = active.flush_all();
    for w in active
        .checkpoint_indexes()
        .into_iter()
        .chain(active.record_invalid())
    {
        eprintln!("cowsnap: warning: {w}");
    }
    for s in sockets {
        let _ = std::fs::remove_file(s);
    }
    for name in active.volume_names() {
        if let Some(snap) = active.snapshot(&name).filter(|s| !s.is_valid()) {
            eprintln!(
                "cowsnap: snapshot {name} is invalid ({}): not flushed; \
                 remove it with `cowsnap snapshot remove {name}`",
                snap.invalid_reason()
                    .unwrap_or_else(|| "no reason recorded".into())
            );
        }
    }
    flushed.context("flushing exports")?;
    flushed_all.context("flushing the pool")?;
    Ok(())
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(dir: &Path, args: ServeArgs) -> Result<ExitCode> {
    let addrs: Vec<Addr> = args
        .listen
        .iter()
        .map(|s| parse_addr(s))
        .collect::<Result<_>>()?;
    let tls = args.tls.config()?;
    let tls_on = tls.is_some();
    for a in &addrs {
        if let Addr::Tcp(hp) = a {
            args.tls
                .check_exposure(&format!("--listen tcp:{hp}"), &crate::tcp::resolve(hp)?)?;
        }
    }
    // Take inherited sockets first: this edits the environment, which is only safe
    // before any thread starts.
    let inherited = if activation::is_socket_activated() {
        Some(activation::listeners_from_env()?)
    } else {
        None
    };
    let _lock = take_pool(dir)?;
    let mut pool = Pool::open(dir)?;
    pool.set_direct(args.direct);
    pool.set_cache_bytes(args.cache_size);
    let (active, mut warnings) = ActivePool::activate(pool, Arc::new(Copier::default()))?;
    let active = Arc::new(active);
    warnings.extend(active.start_merges());
    for w in &warnings {
        eprintln!("cowsnap: warning: {w}");
    }
    let read_only: HashSet<String> = args.read_only.iter().cloned().collect();
    for n in &read_only {
        if active.info(n).is_none() {
            bail!("--read-only {n}: no volume called {n:?} in this pool");
        }
    }
    let read_only = Arc::new(read_only);
    let log: cowsnap_nbd::server::LogFn = Arc::new(|line: &str| eprintln!("cowsnap: nbd: {line}"));
    let server = Arc::new(Server::new(ServerConfig {
        log: Some(log),
        workers: usize::from(args.workers),
        tls,
        max_connections: args.max_connections as usize,
        ..ServerConfig::default()
    }));
    for name in active.volume_names() {
        server
            .add_export(name.clone(), export_for(&active, &name, &read_only)?)
            .map_err(|e| anyhow!("{e}"))?;
    }

    let (mut sockets, mut endpoints) = listen(&server, dir, addrs, inherited, &args.tls, tls_on)?;
    let open_files = Arc::new(OpenFiles::default());
    sockets.push(start_control(
        dir,
        &active,
        &server,
        &read_only,
        &open_files,
    )?);

    let fuse = match &args.fuse {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the FUSE directory {}", dir.display()))?;
            let source = Arc::new(PoolVolumes {
                active: active.clone(),
                read_only: read_only.clone(),
            });
            let m = cowsnap_fuse::mount_counting(source, dir, open_files.clone())
                .with_context(|| format!("mounting the volume files on {}", dir.display()))?;
            endpoints.push(format!("file {}/{{NAME}}", dir.display()));
            Some(m)
        }
        None => None,
    };

    let mut signals = Signals::new([SIGTERM, SIGINT]).context("installing signal handlers")?;
    if tls_on {
        // Before the "serving" line, which tells scripts the daemon is ready.
        print_tls_clients(&args.tls);
    }
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
    stop(&server, &active, &sockets)?;
    eprintln!("cowsnap: stopped");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use cowsnap_core::dev::{FaultRule, FaultyDevice, MemDevice, OpKind};
    use cowsnap_core::Error;

    use super::*;

    /// A snapshot that has been dropped: every operation fails as the core's do.
    #[derive(Debug)]
    struct Dropped;

    impl BlockDevice for Dropped {
        fn size(&self) -> u64 {
            4096
        }
        fn read_at(&self, _: &mut [u8], _: u64) -> cowsnap_core::Result<()> {
            Err(Error::Invalid("COW full".into()))
        }
        fn write_at(&self, _: &[u8], _: u64, _: Fua) -> cowsnap_core::Result<()> {
            Err(Error::Invalid("COW full".into()))
        }
        fn flush(&self) -> cowsnap_core::Result<()> {
            Err(Error::Invalid("COW full".into()))
        }
    }

    #[test]
    fn an_invalid_snapshot_flushes_cleanly_only_at_the_stop() {
        static STOP: AtomicBool = AtomicBool::new(false);
        let dev = StopTolerant {
            dev: Arc::new(Dropped),
            stopping: &STOP,
        };
        // While serving, a client's flush of an invalid snapshot fails (EIO), as before.
        assert!(matches!(dev.flush().unwrap_err(), Error::Invalid(_)));
        assert!(dev.write_at(&[0; 512], 0, Fua::No).is_err());
        STOP.store(true, Ordering::SeqCst);
        dev.flush().unwrap();
        // Only the flush is tolerated: I/O still fails.
        let mut buf = [0u8; 512];
        assert!(matches!(
            dev.read_at(&mut buf, 0).unwrap_err(),
            Error::Invalid(_)
        ));
    }

    #[test]
    fn a_real_flush_failure_still_fails_the_stop() {
        static STOP: AtomicBool = AtomicBool::new(true);
        let faulty = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(1 << 20))));
        faulty.add_rule(FaultRule::Nth {
            kind: OpKind::Flush,
            n: 1,
        });
        let dev = StopTolerant {
            dev: faulty,
            stopping: &STOP,
        };
        assert!(matches!(dev.flush().unwrap_err(), Error::Io { .. }));
        dev.flush().unwrap();
    }
}
