//! The threaded NBD server: named exports, listeners, connections and graceful shutdown.
//!
//! A [`Server`] holds a set of named [`Export`]s (which may change while it runs: a new
//! snapshot can be added, a removed one stays open for the connections already using it).
//! Each [`Listener`] (Unix socket, TCP socket, or one inherited through socket activation)
//! gets an accepting thread; each connection gets a thread that runs the handshake and then
//! the transmission pipeline described in `conn`, which adds worker threads only as
//! requests arrive and carries each request out through [`exec`]; a TCP connection may
//! first upgrade to TLS through [`tls`] when [`ServerConfig::tls`] is set. At most
//! [`ServerConfig::max_connections`] connections are open at once, counting those still in
//! the handshake: the acceptor closes any further one at once, with no thread spent on it,
//! and logs at most one line per [`REFUSAL_LOG_INTERVAL`] about them.
//!
//! [`Server::shutdown`] stops the acceptors (removing the Unix socket files it bound), shuts
//! the read side of every connection, so that each one's request reader takes only what
//! had already arrived and answers it with `ESHUTDOWN` (handshake options with
//! `NBD_REP_ERR_SHUTDOWN`), lets every connection finish the requests it is executing and
//! send their replies (closing those still open after [`ServerConfig::drain_timeout`]),
//! then flushes every export.

mod conn;
pub mod exec;
pub mod tls;

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};

use crate::codec::{BlockSizes, Catalog, ExportInfo};
use crate::export::Export;

/// A callback receiving log lines (protocol violations, I/O failures).
pub type LogFn = Arc<dyn Fn(&str) + Send + Sync>;

/// Refused connections are logged at most once per this interval (with a count).
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Tunables of a [`Server`].
#[derive(Clone)]
pub struct ServerConfig {
    /// Most threads per connection, each reading, executing and answering one request at
    /// a time (requests in flight at once). They are started as requests arrive and end
    /// after a second idle: a connection in the handshake or an idle one holds one thread.
    pub workers: usize,
    /// Most connections open at once, counting those still in the handshake; further ones
    /// are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Bytes of READ and WRITE data a connection may hold in flight (one request larger
    /// than this still runs, alone).
    pub inflight_bytes: usize,
    /// Block size constraints advertised to clients.
    pub block_sizes: BlockSizes,
    /// A refused WRITE's payload up to this size is read and dropped so the connection goes
    /// on; a larger one gets its error reply and the connection is closed.
    pub max_discard: u32,
    /// How long [`Server::shutdown`] waits for connections to drain before closing them.
    pub drain_timeout: Duration,
    /// How long a client may stay silent during the handshake; `None` waits forever.
    pub handshake_timeout: Option<Duration>,
    /// Where log lines go; `None` keeps the server silent.
    pub log: Option<LogFn>,
    /// TLS for TCP connections (`NBD_OPT_STARTTLS`); `None` serves plain text only.
    /// Unix-socket connections never use TLS: the socket's file mode guards them.
    pub tls: Option<tls::TlsConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            workers: 4,
            max_connections: 64,
            inflight_bytes: 64 << 20,
            block_sizes: BlockSizes::default(),
            max_discard: 256 << 20,
            drain_timeout: Duration::from_secs(30),
            handshake_timeout: Some(Duration::from_secs(60)),
            log: None,
            tls: None,
        }
    }
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("workers", &self.workers)
            .field("max_connections", &self.max_connections)
            .field("inflight_bytes", &self.inflight_bytes)
            .field("block_sizes", &self.block_sizes)
            .field("max_discard", &self.max_discard)
            .field("drain_timeout", &self.drain_timeout)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("log", &self.log.is_some())
            .field("tls", &self.tls)
            .finish()
    }
}

/// A connected client socket.
#[derive(Debug)]
pub enum Stream {
    /// A Unix stream socket.
    Unix(UnixStream),
    /// A TCP socket.
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn set_read_timeout(&self, t: Option<Duration>) {
        let _ = match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        };
    }

    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        };
    }

    /// Reads only what has already arrived: `Ok(0)` when nothing has.
    fn read_arrived(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        let fd = match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        };
        loop {
            return match rustix::net::recv(fd, &mut *buf, rustix::net::RecvFlags::DONTWAIT) {
                Ok((n, _)) => Ok(n),
                Err(rustix::io::Errno::AGAIN) => Ok(0),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => Err(e.into()),
            };
        }
    }
}

impl std::io::Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl std::io::Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    /// A Unix socket; `path`, if set, is removed when the server shuts down.
    Unix {
        /// The socket.
        listener: UnixListener,
        /// Path to remove at shutdown.
        path: Option<PathBuf>,
    },
    /// A TCP socket.
    Tcp(TcpListener),
}

impl Listener {
    /// Binds a Unix socket at `path`, replacing a stale socket file nobody listens on.
    pub fn bind_unix(path: impl AsRef<Path>) -> std::io::Result<Listener> {
        let path = path.as_ref();
        let listener = match UnixListener::bind(path) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                use std::os::unix::fs::FileTypeExt;
                let is_socket = std::fs::symlink_metadata(path)
                    .map(|m| m.file_type().is_socket())
                    .unwrap_or(false);
                if !is_socket || UnixStream::connect(path).is_ok() {
                    return Err(e);
                }
                std::fs::remove_file(path)?;
                UnixListener::bind(path)?
            }
            Err(e) => return Err(e),
        };
        Ok(Listener::Unix {
            listener,
            path: Some(path.to_path_buf()),
        })
    }

    /// Binds a TCP socket.
    pub fn bind_tcp(addr: impl ToSocketAddrs) -> std::io::Result<Listener> {
        Ok(Listener::Tcp(TcpListener::bind(addr)?))
    }

    /// The TCP address, for a TCP listener.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix { .. } => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            Listener::Unix { listener, path } => match path {
                Some(p) => format!("unix:{}", p.display()),
                None => format!("unix:{:?}", listener.local_addr().ok()),
            },
            Listener::Tcp(l) => format!("tcp:{:?}", l.local_addr().ok()),
        }
    }

    fn set_nonblocking(&self) -> std::io::Result<()> {
        match self {
            Listener::Unix { listener, .. } => listener.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Unix { listener, .. } => listener.as_fd(),
            Listener::Tcp(l) => l.as_fd(),
        }
    }

    fn accept(&self) -> std::io::Result<Stream> {
        match self {
            Listener::Unix { listener, .. } => {
                let (s, _) = listener.accept()?;
                s.set_nonblocking(false)?;
                Ok(Stream::Unix(s))
            }
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
        }
    }
}

/// Counters of a server's activity.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections that reached the transmission phase.
    pub transmissions: AtomicU64,
    /// Requests received.
    pub requests: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
    /// Sessions ended because the client broke the protocol.
    pub protocol_errors: AtomicU64,
    /// Connections closed at once because `max_connections` were open.
    pub refused: AtomicU64,
}

/// Rate limit of the "connection refused" log line.
#[derive(Default)]
struct RefusalLog {
    /// When the last line was logged.
    last: Option<Instant>,
    /// Refusals since then that were not logged.
    unlogged: u64,
}

pub(crate) struct Shared {
    config: ServerConfig,
    exports: RwLock<Exports>,
    default_export: RwLock<Option<String>>,
    stopping: AtomicBool,
    stopped: AtomicBool,
    conns: Mutex<HashMap<u64, Stream>>,
    active: Mutex<usize>,
    idle: Condvar,
    threads: Mutex<Vec<JoinHandle<()>>>,
    acceptors: Mutex<Vec<(JoinHandle<()>, Option<PathBuf>)>>,
    next_id: AtomicU64,
    stats: Stats,
    refusals: Mutex<RefusalLog>,
}

/// The exports by name, in listing order.
pub(crate) type Exports = Vec<(String, Arc<dyn Export>)>;

impl Shared {
    fn log(&self, msg: impl FnOnce() -> String) {
        if let Some(log) = &self.config.log {
            log(&msg());
        }
    }

    /// What a handshake offers: the catalog the codec negotiates over, and the exports it
    /// describes. The connection serves the export it agreed to from these, so an export
    /// removed after the catalog was taken is still served to this client (as to
    /// connections already open) instead of being dropped after the client was told yes.
    fn offer(&self) -> (Catalog, Exports) {
        let offered: Exports = self.exports.read().clone();
        let exports = offered
            .iter()
            .map(|(name, e)| ExportInfo {
                name: name.clone(),
                description: e.description(),
                size: e.size(),
                read_only: e.is_read_only(),
                multi_conn: e.can_multi_conn(),
            })
            .collect();
        let catalog = Catalog {
            exports,
            default_export: self.default_export.read().clone(),
            block_sizes: self.config.block_sizes,
        };
        (catalog, offered)
    }

    /// Closes a connection beyond `max_connections`, logging at most one line per
    /// [`REFUSAL_LOG_INTERVAL`] so that a flood does not flood the log.
    fn refuse(&self, stream: Stream) {
        stream.shutdown(Shutdown::Both);
        drop(stream);
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        let mut r = self.refusals.lock();
        let now = Instant::now();
        if r.last
            .is_some_and(|t| now.duration_since(t) < REFUSAL_LOG_INTERVAL)
        {
            r.unlogged += 1;
            return;
        }
        let earlier = std::mem::take(&mut r.unlogged);
        r.last = Some(now);
        drop(r);
        let max = self.config.max_connections;
        self.log(|| {
            let more = if earlier > 0 {
                format!(" ({earlier} more refused since the last such line)")
            } else {
                String::new()
            };
            format!(
                "refused a connection: {max} connections are open, the most allowed{more}; \
                 close idle clients or raise the limit (cowsnap serve --max-connections)"
            )
        });
    }

    /// Starts serving one connection on its own thread, or refuses it when
    /// `max_connections` are open.
    fn spawn_connection(self: &Arc<Self>, stream: Stream) {
        if self.stopping.load(Ordering::SeqCst) {
            stream.shutdown(Shutdown::Both);
            return;
        }
        {
            let mut active = self.active.lock();
            if *active >= self.config.max_connections.max(1) {
                drop(active);
                self.refuse(stream);
                return;
            }
            *active += 1;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = stream.try_clone() {
            self.conns.lock().insert(id, clone);
        }
        let shared = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                let reg = Registration {
                    shared: shared.clone(),
                    id,
                    pump: None,
                };
                conn::run(&shared, stream, reg);
            });
        match spawned {
            Ok(h) => {
                let mut threads = self.threads.lock();
                threads.retain(|t| !t.is_finished());
                threads.push(h);
            }
            Err(e) => {
                self.log(|| {
                    format!(
                        "cannot start a connection thread ({e}); closed the connection: \
                         lower --max-connections or --workers, or raise the thread limit"
                    )
                });
                if let Some(s) = self.conns.lock().remove(&id) {
                    s.shutdown(Shutdown::Both);
                }
                let mut active = self.active.lock();
                *active -= 1;
                self.idle.notify_all();
            }
        }
    }

    fn accept_loop(self: Arc<Self>, listener: Listener) {
        let timeout = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        while !self.stopping.load(Ordering::SeqCst) {
            let fd = listener.fd();
            let mut fds = [rustix::event::PollFd::new(
                &fd,
                rustix::event::PollFlags::IN,
            )];
            match rustix::event::poll(&mut fds, Some(&timeout)) {
                Ok(0) | Err(rustix::io::Errno::INTR) => continue,
                Ok(_) => {}
                Err(e) => {
                    self.log(|| format!("{}: poll failed: {e}", listener.describe()));
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
            match listener.accept() {
                Ok(stream) => self.spawn_connection(stream),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    self.log(|| format!("{}: accept failed: {e}", listener.describe()));
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    fn shutdown(&self) -> cowsnap_core::Result<()> {
        if self.stopped.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.stopping.store(true, Ordering::SeqCst);
        for (h, path) in std::mem::take(&mut *self.acceptors.lock()) {
            let _ = h.join();
            if let Some(p) = path {
                let _ = std::fs::remove_file(p);
            }
        }
        // No new requests: each connection drains what it has and closes.
        for s in self.conns.lock().values() {
            s.shutdown(Shutdown::Read);
        }
        let deadline = Instant::now() + self.config.drain_timeout;
        let mut active = self.active.lock();
        while *active > 0 {
            if self.idle.wait_until(&mut active, deadline).timed_out() {
                self.log(|| format!("{} connections did not drain; closing them", *active));
                for s in self.conns.lock().values() {
                    s.shutdown(Shutdown::Both);
                }
                while *active > 0 {
                    self.idle.wait(&mut active);
                }
            }
        }
        drop(active);
        for h in std::mem::take(&mut *self.threads.lock()) {
            let _ = h.join();
        }
        let mut first = Ok(());
        for (name, e) in self.exports.read().iter() {
            if let Err(err) = e.flush() {
                self.log(|| format!("flushing export {name:?} failed: {err}"));
                if first.is_ok() {
                    first = Err(err);
                }
            }
        }
        self.stopped.store(true, Ordering::SeqCst);
        first
    }
}

/// A connection's place in the server's books (its socket in `conns`, its count in
/// `active`): dropped when the connection's last thread ends.
pub(crate) struct Registration {
    shared: Arc<Shared>,
    pub(crate) id: u64,
    /// A TLS connection's pump: it sends the last replies and `close_notify` once the
    /// plain side is closed, and is waited for before the connection leaves the books.
    pub(crate) pump: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(p) = self.pump.take() {
            let _ = p.join();
        }
        self.shared.conns.lock().remove(&self.id);
        let mut active = self.shared.active.lock();
        *active -= 1;
        self.shared.idle.notify_all();
    }
}

/// A clonable handle that shuts a [`Server`] down from another thread (a signal handler
/// thread, a control socket).
#[derive(Clone)]
pub struct ShutdownHandle(Arc<Shared>);

impl ShutdownHandle {
    /// Same as [`Server::shutdown`].
    pub fn shutdown(&self) -> cowsnap_core::Result<()> {
        self.0.shutdown()
    }

    /// Whether shutdown has started.
    pub fn is_stopping(&self) -> bool {
        self.0.stopping.load(Ordering::SeqCst)
    }
}

impl std::fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShutdownHandle")
    }
}

/// An NBD server over std threads.
pub struct Server {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("exports", &self.export_names())
            .field("config", &self.shared.config)
            .finish()
    }
}

/// Why an export could not be added.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExportError {
    /// The name is taken.
    #[error("an export named {0:?} already exists")]
    Duplicate(String),
    /// The name is longer than the protocol allows or contains NUL.
    #[error("export name {0:?} is not a valid NBD string")]
    BadName(String),
}

impl Server {
    /// A server with no exports and no listeners.
    pub fn new(config: ServerConfig) -> Server {
        Server {
            shared: Arc::new(Shared {
                config,
                exports: RwLock::new(Vec::new()),
                default_export: RwLock::new(None),
                stopping: AtomicBool::new(false),
                stopped: AtomicBool::new(false),
                conns: Mutex::new(HashMap::new()),
                active: Mutex::new(0),
                idle: Condvar::new(),
                threads: Mutex::new(Vec::new()),
                acceptors: Mutex::new(Vec::new()),
                next_id: AtomicU64::new(0),
                stats: Stats::default(),
                refusals: Mutex::new(RefusalLog::default()),
            }),
        }
    }

    /// Adds an export; new connections can choose it at once.
    pub fn add_export(
        &self,
        name: impl Into<String>,
        export: Arc<dyn Export>,
    ) -> Result<(), ExportError> {
        let name = name.into();
        if name.len() > crate::codec::consts::MAX_STRING || name.contains('\0') {
            return Err(ExportError::BadName(name));
        }
        let mut exports = self.shared.exports.write();
        if exports.iter().any(|(n, _)| *n == name) {
            return Err(ExportError::Duplicate(name));
        }
        exports.push((name, export));
        Ok(())
    }

    /// Removes an export from the list; connections already using it keep it.
    pub fn remove_export(&self, name: &str) -> Option<Arc<dyn Export>> {
        let mut exports = self.shared.exports.write();
        let i = exports.iter().position(|(n, _)| n == name)?;
        Some(exports.remove(i).1)
    }

    /// How many connections hold export `name` now (connections keep the export they
    /// chose until they close; one in its handshake may count too). `None`: no such export.
    pub fn export_users(&self, name: &str) -> Option<usize> {
        let exports = self.shared.exports.read();
        let (_, e) = exports.iter().find(|(n, _)| n == name)?;
        // The list's own reference is not a user.
        Some(Arc::strong_count(e).saturating_sub(1))
    }

    /// Names of the exports, in listing order.
    pub fn export_names(&self) -> Vec<String> {
        self.shared
            .exports
            .read()
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Chooses the export the empty name means (by default: the only export, if one).
    pub fn set_default_export(&self, name: Option<String>) {
        *self.shared.default_export.write() = name;
    }

    /// Serves clients of `listener` on a new thread until shutdown.
    pub fn listen(&self, listener: Listener) -> std::io::Result<()> {
        listener.set_nonblocking()?;
        let path = match &listener {
            Listener::Unix { path, .. } => path.clone(),
            Listener::Tcp(_) => None,
        };
        let shared = self.shared.clone();
        let name = listener.describe();
        let h = std::thread::Builder::new()
            .name(format!("nbd-accept {name}"))
            .spawn(move || shared.accept_loop(listener))?;
        self.shared.acceptors.lock().push((h, path));
        Ok(())
    }

    /// Binds and serves a Unix socket at `path`.
    pub fn listen_unix(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        self.listen(Listener::bind_unix(path)?)
    }

    /// Binds and serves a TCP address; returns the bound address (useful with port 0).
    pub fn listen_tcp(&self, addr: impl ToSocketAddrs) -> std::io::Result<SocketAddr> {
        let l = Listener::bind_tcp(addr)?;
        let a = l
            .tcp_addr()
            .ok_or_else(|| std::io::Error::other("no local address"))?;
        self.listen(l)?;
        Ok(a)
    }

    /// Serves one already-connected client (a socket pair, an inherited connection).
    pub fn serve_stream(&self, stream: Stream) {
        self.shared.spawn_connection(stream);
    }

    /// Connections currently open.
    pub fn connections(&self) -> usize {
        *self.shared.active.lock()
    }

    /// Activity counters.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// A handle that can shut the server down from elsewhere.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shared.clone())
    }

    /// Stops accepting, lets connections finish the requests they received, closes them,
    /// and flushes every export. Returns the first flush error. Idempotent.
    pub fn shutdown(&self) -> cowsnap_core::Result<()> {
        self.shared.shutdown()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.shared.shutdown();
    }
}
