//! The control socket: how pool commands reach a running daemon.
//!
//! `cowsnap serve` listens on `POOL/control.sock` (mode 0600). A client connects, writes one
//! JSON request on one line, and reads one JSON reply line. When no daemon answers, the
//! commands act on the pool's files directly instead. The protocol is internal to one
//! version of cowsnap; scripts should use the commands' `--json` output.
//!
//! The daemon serves each client on its own thread, at most [`MAX_CLIENTS`] at once; a
//! client beyond that gets an immediate `busy` reply, on which [`call`] retries. A client
//! has [`REQUEST_DEADLINE`] in total to send its request line, at most [`MAX_REQUEST`]
//! bytes long; a slower, idle or longer one gets an error reply and is disconnected, so a
//! stalled client never delays another and never holds more than one small buffer. The
//! pool operations themselves serialise on the active pool's lock.
//!
//! [`call`] waits for the daemon at most the timeout set with [`set_timeout`] (the global
//! `--timeout` flag or `COWSNAP_TIMEOUT`, default [`DEFAULT_TIMEOUT`]) and then fails with
//! a message naming the socket.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use cowsnap_core::units::ChunkSize;
use cowsnap_pool::{CowSpec, LayerRequest, MergeAction, MergeInfo, SnapshotRequest, VolumeInfo};
use serde::{Deserialize, Serialize};

/// File name of the control socket inside the pool directory.
pub const CONTROL_SOCKET: &str = "control.sock";

/// The longest request line the daemon reads, in bytes (without the newline).
pub const MAX_REQUEST: usize = 64 * 1024;

/// How long a client has, in total from its connection, to send its request line.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// Control clients the daemon serves at once; one more gets a `busy` reply at once.
pub const MAX_CLIENTS: usize = 32;

/// How long [`call`] waits for the daemon unless told otherwise: creating a snapshot on a
/// big COW takes a while.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the daemon waits for a client to take its reply.
const REPLY_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest reply line [`call`] reads (a listing of very many volumes fits).
const MAX_REPLY: usize = 64 << 20;

/// How long [`call`] waits before asking a busy daemon again.
const BUSY_RETRY: Duration = Duration::from_millis(100);

/// A request to the daemon.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Every volume's status.
    List,
    /// One volume's status.
    Status {
        /// The volume.
        name: String,
    },
    /// Create a snapshot live.
    CreateSnapshot(SnapshotSpec),
    /// Remove a snapshot live.
    RemoveSnapshot {
        /// The snapshot.
        name: String,
        /// Remove it even while it is open (its readers get I/O errors), or when its
        /// merge started (its origin stays half merged).
        #[serde(default)]
        force: bool,
    },
    /// Merge a snapshot into its origin.
    MergeSnapshot {
        /// The snapshot.
        name: String,
        /// Merge now even if the origin is in use (its readers see the content change).
        #[serde(default)]
        now: bool,
        /// Switch the origin now but move no data until resumed.
        #[serde(default)]
        paused: bool,
        /// Rate limit, bytes per second.
        #[serde(default)]
        rate: Option<u64>,
    },
    /// Pause, resume or rate-limit a merge.
    MergeControl {
        /// The merging snapshot.
        name: String,
        /// What to do.
        action: MergeAction,
    },
    /// Send a message to a layer of a volume's stack (`dmsetup message`).
    LayerMessage {
        /// The volume.
        volume: String,
        /// The layer: its position (0 at the bottom) or its target's name.
        layer: String,
        /// The message's words.
        words: Vec<String>,
    },
}

/// What `snapshot create` asks for, as it travels to the daemon.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotSpec {
    /// Snapshot name.
    pub name: String,
    /// Origin name.
    pub origin: String,
    /// Size of a new COW file, bytes.
    pub cow_size: Option<u64>,
    /// Size of a new COW file, percent of the origin's size.
    #[serde(default)]
    pub cow_percent: Option<u64>,
    /// An existing COW to adopt.
    pub cow_path: Option<PathBuf>,
    /// Chunk size, sectors.
    pub chunk_sectors: Option<u64>,
    /// Transient store.
    pub transient: bool,
    /// `PO` store.
    pub overflow: bool,
    /// Format an adopted COW that has no header (it must be all zeros).
    #[serde(default)]
    pub format: bool,
    /// Layers between the COW file and the store, bottom first (`TARGET ARGS`).
    #[serde(default)]
    pub cow_layers: Vec<String>,
}

impl SnapshotSpec {
    /// The core library's request.
    pub fn to_request(&self) -> Result<SnapshotRequest> {
        let chunk_size = self
            .chunk_sectors
            .map(ChunkSize::from_sectors)
            .transpose()
            .context("bad chunk size")?;
        let cow = match (&self.cow_path, self.cow_size, self.cow_percent) {
            (Some(p), _, _) => CowSpec::Path(p.clone()),
            (None, Some(s), _) => CowSpec::Size(s),
            (None, None, Some(p)) => CowSpec::PercentOfOrigin(p),
            (None, None, None) => bail!("give --cow-size or --cow"),
        };
        Ok(SnapshotRequest {
            name: self.name.clone(),
            origin: self.origin.clone(),
            cow,
            chunk_size,
            transient: self.transient,
            overflow: self.overflow,
            format: self.format,
            cow_layers: self
                .cow_layers
                .iter()
                .map(|l| LayerRequest::parse(l))
                .collect::<std::result::Result<_, _>>()?,
        })
    }
}

/// The daemon's answer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Volumes the request concerns.
    #[serde(default)]
    pub volumes: Vec<VolumeInfo>,
    /// Something the user should know.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// A merge the request started or changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<MergeInfo>,
    /// A layer's answer to a message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The daemon serves too many control clients: ask again later.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub busy: bool,
}

impl Reply {
    /// A success carrying `volumes`.
    pub fn volumes(volumes: Vec<VolumeInfo>) -> Reply {
        Reply {
            ok: true,
            volumes,
            ..Reply::default()
        }
    }

    /// A failure.
    pub fn error(e: impl std::fmt::Display) -> Reply {
        Reply {
            ok: false,
            error: Some(e.to_string()),
            ..Reply::default()
        }
    }

    /// A refusal because too many clients are being served.
    pub fn busy() -> Reply {
        Reply {
            busy: true,
            ..Reply::error(format!(
                "the daemon is busy: {MAX_CLIENTS} control clients are connected; try again"
            ))
        }
    }
}

/// The control socket path of the pool in `dir`.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join(CONTROL_SOCKET)
}

static TIMEOUT: OnceLock<Duration> = OnceLock::new();

/// Sets how long [`call`] waits for the daemon, for the whole process (first call wins).
pub fn set_timeout(timeout: Duration) {
    let _ = TIMEOUT.set(timeout);
}

/// How long commands wait for the daemon, and for the pool's lock.
pub(crate) fn timeout() -> Duration {
    TIMEOUT.get().copied().unwrap_or(DEFAULT_TIMEOUT)
}

/// Sends `req` to the daemon of the pool in `dir`. `Ok(None)` when no daemon listens.
///
/// Waits at most the timeout of [`set_timeout`] for the whole exchange, asking again
/// while the daemon answers `busy`.
pub fn call(dir: &Path, req: &Request) -> Result<Option<Reply>> {
    call_within(dir, req, timeout())
}

/// [`call`] with an explicit timeout.
pub fn call_within(dir: &Path, req: &Request, timeout: Duration) -> Result<Option<Reply>> {
    let path = socket_path(dir);
    let deadline = Instant::now() + timeout;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    loop {
        let stream = match UnixStream::connect(&path) {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {}", path.display())),
        };
        let reply = exchange(&stream, &path, line.as_bytes(), deadline, timeout)?;
        if !reply.busy {
            return Ok(Some(reply));
        }
        if Instant::now() + BUSY_RETRY >= deadline {
            bail!(
                "the daemon at {} stayed busy for {} s (too many control clients): \
                 retry later, or wait longer with --timeout SECS",
                path.display(),
                timeout.as_secs()
            );
        }
        std::thread::sleep(BUSY_RETRY);
    }
}

/// Writes `line` and reads the reply, all before `deadline`.
fn exchange(
    stream: &UnixStream,
    path: &Path,
    line: &[u8],
    deadline: Instant,
    timeout: Duration,
) -> Result<Reply> {
    let timed_out = || {
        anyhow!(
            "the daemon at {} did not answer within {} s: it may be busy with a long request \
             (a snapshot on a big COW) or hung. A request may still complete: check with \
             `cowsnap list`; wait longer with --timeout SECS (or COWSNAP_TIMEOUT), or look at \
             the daemon's log",
            path.display(),
            timeout.as_secs()
        )
    };
    let left = deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or_else(timed_out)?;
    stream
        .set_write_timeout(Some(left))
        .with_context(|| format!("setting a timeout on {}", path.display()))?;
    // A daemon that refuses at once (busy) may have answered and closed before the
    // request went out: then its reply is still there to read.
    let unsent = match (&*stream).write_all(line) {
        Ok(()) => None,
        Err(e) if is_timeout(&e) => return Err(timed_out()),
        Err(e) => Some(e),
    };
    let answer = match (read_line_within(stream, MAX_REPLY, deadline), unsent) {
        (Ok(Some(answer)), _) => answer,
        (_, Some(e)) => return Err(e).with_context(|| format!("writing to {}", path.display())),
        (Ok(None), None) => bail!(
            "the daemon at {} closed the connection without answering: see its log",
            path.display()
        ),
        (Err(LineError::TimedOut), None) => return Err(timed_out()),
        (Err(LineError::TooLong), None) => bail!(
            "the daemon at {} sent a reply over {MAX_REPLY} bytes",
            path.display()
        ),
        (Err(LineError::Io(e)), None) => {
            return Err(e).with_context(|| format!("reading from {}", path.display()))
        }
    };
    serde_json::from_slice(answer.trim_ascii())
        .with_context(|| format!("bad reply from the daemon at {}", path.display()))
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Why [`read_line_within`] returned no line.
#[derive(Debug)]
enum LineError {
    /// The line was not complete by the deadline.
    TimedOut,
    /// The line is longer than the limit.
    TooLong,
    /// The socket failed.
    Io(std::io::Error),
}

/// Reads one line (without its newline) of at most `max` bytes from `stream`, all of it
/// before `deadline`. `Ok(None)` when the peer hangs up before sending anything; a last
/// line without a newline counts. Memory never grows past `max` plus one small buffer.
fn read_line_within(
    stream: &UnixStream,
    max: usize,
    deadline: Instant,
) -> Result<Option<Vec<u8>>, LineError> {
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // One deadline for the whole line: a client trickling bytes does not reset it.
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(LineError::TimedOut)?;
        stream.set_read_timeout(Some(left)).map_err(LineError::Io)?;
        let n = match (&*stream).read(&mut buf) {
            Ok(n) => n,
            Err(e) if is_timeout(&e) || e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(LineError::Io(e)),
        };
        if n == 0 {
            return Ok((!line.is_empty()).then_some(line));
        }
        let chunk = &buf[..n];
        let (part, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (&chunk[..i], true),
            None => (chunk, false),
        };
        if line.len() + part.len() > max {
            return Err(LineError::TooLong);
        }
        line.extend_from_slice(part);
        if done {
            return Ok(Some(line));
        }
    }
}

/// What answers the daemon's requests; called on the client's thread.
pub type Handler = Arc<dyn Fn(Request) -> Reply + Send + Sync>;

/// Serves the control socket `listener` on a new thread named `control`, each client on a
/// thread of its own (see the module documentation for the limits).
pub fn spawn_server(listener: UnixListener, handler: Handler) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || accept_loop(&listener, &handler))
}

/// Frees a client slot when its thread ends (or never starts).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(listener: &UnixListener, handler: &Handler) {
    let clients = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("cowsnap: control: accepting a client failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            clients.fetch_sub(1, Ordering::SeqCst);
            // The reply is small and the socket buffer empty: this does not block for long.
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = write_reply(&stream, &Reply::busy());
            continue;
        }
        let slot = Slot(clients.clone());
        let handler = handler.clone();
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                let _slot = slot;
                if let Err(e) = serve_one(&stream, |req| handler(req)) {
                    eprintln!("cowsnap: control: {e:#}");
                }
            });
        if let Err(e) = spawned {
            // The closure, with the client's socket and slot, is dropped: the client sees
            // the connection close.
            eprintln!("cowsnap: control: cannot start a thread for a client: {e}");
        }
    }
}

fn write_reply(stream: &UnixStream, reply: &Reply) -> Result<()> {
    let mut out = serde_json::to_string(reply)?;
    out.push('\n');
    (&*stream).write_all(out.as_bytes())?;
    Ok(())
}

/// Decodes one request line (without its newline); the error is the reply's message.
/// Pure, for the fuzz target of the control protocol.
pub fn decode_request(line: &[u8]) -> Result<Request, String> {
    serde_json::from_slice(line.trim_ascii()).map_err(|e| format!("bad request: {e}"))
}

/// Reads one request from `stream` within [`REQUEST_DEADLINE`] and [`MAX_REQUEST`],
/// answers it with `handle`, writes the reply. A client that breaks a limit gets an error
/// reply, is disconnected, and the error says so.
pub fn serve_one(stream: &UnixStream, handle: impl FnOnce(Request) -> Reply) -> Result<()> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let (reply, refused) = match read_line_within(stream, MAX_REQUEST, deadline) {
        Ok(Some(line)) => match decode_request(&line) {
            Ok(req) => (handle(req), None),
            Err(e) => (Reply::error(e), None),
        },
        // Connected and hung up: nothing to answer.
        Ok(None) => return Ok(()),
        Err(LineError::TooLong) => {
            let why = format!("request too long (over {MAX_REQUEST} bytes)");
            (Reply::error(&why), Some(why))
        }
        Err(LineError::TimedOut) => {
            let why = format!(
                "no complete request within {} s",
                REQUEST_DEADLINE.as_secs()
            );
            (Reply::error(&why), Some(why))
        }
        Err(LineError::Io(e)) => return Err(e).context("reading a request"),
    };
    stream
        .set_write_timeout(Some(REPLY_WRITE_TIMEOUT))
        .context("setting a write timeout")?;
    let written = write_reply(stream, &reply).context("writing a reply");
    match refused {
        Some(why) => Err(anyhow!("a client was disconnected: {why}")),
        None => written,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_tagged_json() {
        let r = Request::CreateSnapshot(SnapshotSpec {
            name: "s".into(),
            origin: "o".into(),
            cow_size: Some(4096),
            cow_percent: None,
            cow_path: None,
            chunk_sectors: Some(8),
            transient: false,
            overflow: true,
            format: false,
            cow_layers: vec!["test-delay 0".into()],
        });
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains("\"op\":\"create-snapshot\""), "{text}");
        let back: Request = serde_json::from_str(&text).unwrap();
        match back {
            Request::CreateSnapshot(spec) => {
                let req = spec.to_request().unwrap();
                assert!(req.overflow);
                assert_eq!(req.cow, CowSpec::Size(4096));
            }
            other => panic!("{other:?}"),
        }
        assert!(serde_json::from_str::<Request>("{\"op\":\"explode\"}").is_err());
    }

    #[test]
    fn a_line_is_bounded_in_size_and_in_time() {
        let far = || Instant::now() + Duration::from_secs(10);
        // Within the bound, with the rest of the stream ignored.
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(b"12345678\nmore").unwrap();
        assert_eq!(
            read_line_within(&b, 8, far()).unwrap().unwrap(),
            b"12345678"
        );
        // One byte over.
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(b"123456789\n").unwrap();
        assert!(matches!(
            read_line_within(&b, 8, far()),
            Err(LineError::TooLong)
        ));
        // A hang-up: the last line counts, nothing at all is None.
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(b"{}").unwrap();
        drop(a);
        assert_eq!(read_line_within(&b, 8, far()).unwrap().unwrap(), b"{}");
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(read_line_within(&b, 8, far()).unwrap().is_none());
        // A trickle: each byte comes well within any per-read timeout, the total deadline
        // still ends it.
        let (a, b) = UnixStream::pair().unwrap();
        let trickle = std::thread::spawn(move || {
            while (&a).write_all(b"x").is_ok() {
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let start = Instant::now();
        let r = read_line_within(&b, 1 << 20, start + Duration::from_millis(300));
        let took = start.elapsed();
        assert!(matches!(r, Err(LineError::TimedOut)), "{r:?}");
        assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(3));
        drop(b);
        trickle.join().unwrap();
    }

    #[test]
    fn no_daemon_means_none() {
        let dir = cowsnap_core::testkit::scratch("ctl");
        assert!(call(dir.path(), &Request::List).unwrap().is_none());
    }
}
