//! One client connection: the handshake, then transmission.
//!
//! The handshake runs on the connection's thread, feeding socket bytes to the sans-IO
//! [`Handshake`]. When the client starts TLS, that thread runs the TLS handshake and from
//! then on uses the decrypted side of a [`super::tls`] pump as the client's socket, for the
//! rest of the handshake and for transmission alike.
//!
//! In transmission that thread and up to `workers - 1` more take turns as the connection's
//! *request reader*: the one worker that holds the socket's read side. The request reader
//! decodes the next request header, checks it and reads a WRITE's payload, then gives the
//! read side to the next waiting worker, executes the request itself ([`super::exec`]) and
//! writes the whole reply under the write-side lock. No request moves between threads: the
//! only hand-off is that of the read side, and it happens while the request executes, so
//! replies go out in completion order. Requests in flight are bounded by the workers and
//! by a per-connection byte budget on READ and WRITE data.
//!
//! Workers start lazily: a request reader that got a request and sees no other worker
//! waiting for the read side starts one (up to `workers`), so a connection that sends
//! nothing holds one thread. A worker that has waited [`IDLE_WORKER_EXIT`] for the read
//! side ends (the request reader it waited behind is alive, and starts a new worker when
//! requests come), so a connection that went idle after a burst falls back to one thread;
//! under load no worker waits that long, so threads are not started and ended per request.
//!
//! Refused requests are answered by the request reader (a refused WRITE's payload is read
//! and dropped first, so the stream stays in sync). A bad request magic or a truncated
//! request ends the session. When reading stops (DISC, end of stream, shutdown), the workers
//! finish the requests they hold, send their replies, and the socket is closed; a client
//! that vanished only makes replies be dropped.
//!
//! Once [`Server::shutdown`](super::Server::shutdown) has begun, the request reader reads
//! only what has already arrived (the read side is shut down, which wakes a request reader
//! waiting for data): each request found there is answered with `ESHUTDOWN` instead of
//! being executed (a DISC still just ends the session), and the session ends where the
//! received data does. A client that sends after that finds the socket closed.

use std::io::{BufReader, Read, Write};

use cowsnap_core::dev::AlignedBuf;
use std::net::Shutdown;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::exec::execute;
use super::{Registration, Shared, Stream};
use crate::codec::consts::{EIO, ESHUTDOWN};
use crate::codec::reply;
use crate::codec::request::{validate, Command, HeaderError, Limits, Rejection, RequestHeader};
use crate::codec::{Catalog, Handshake, Negotiated, Status, TlsMode, REQUEST_HEADER_LEN};
use crate::export::Export;

/// Serves one connection to its end. `reg` is dropped (joining the TLS pump, if any, then
/// taking the connection off the server's books) when its last thread ends.
pub(super) fn run(shared: &Arc<Shared>, mut stream: Stream, mut reg: Registration) {
    let id = reg.id;
    let (catalog, offered) = shared.offer();
    let Some((neg, leftover)) = handshake(shared, catalog, &mut stream, id, &mut reg.pump) else {
        stream.shutdown(Shutdown::Both);
        return;
    };
    let offered = if cowsnap_core::mutation::active("nbd-export-looked-up-again") {
        shared.exports.read().clone()
    } else {
        offered
    };
    let Some(export) = offered
        .into_iter()
        .find(|(name, _)| *name == neg.export)
        .map(|(_, e)| e)
    else {
        // The codec agrees only to exports of its catalog.
        shared.log(|| format!("export {:?} was not offered", neg.export));
        stream.shutdown(Shutdown::Both);
        return;
    };
    shared.stats.transmissions.fetch_add(1, Ordering::Relaxed);
    transmission(shared, stream, export, &neg, leftover, reg);
}

fn handshake(
    shared: &Shared,
    catalog: Catalog,
    stream: &mut Stream,
    id: u64,
    pump: &mut Option<JoinHandle<()>>,
) -> Option<(Negotiated, Vec<u8>)> {
    // A client that stalls in the handshake is dropped after the timeout.
    stream.set_read_timeout(shared.config.handshake_timeout);
    let r = handshake_steps(shared, catalog, stream, id, pump);
    stream.set_read_timeout(None);
    r
}

/// TLS applies to TCP connections; a Unix socket is guarded by its file permissions.
fn tls_mode(shared: &Shared, stream: &Stream) -> TlsMode {
    match (&shared.config.tls, stream) {
        (Some(tls), Stream::Tcp(_)) => tls.mode(),
        _ => TlsMode::Off,
    }
}

fn handshake_steps(
    shared: &Shared,
    catalog: Catalog,
    stream: &mut Stream,
    id: u64,
    pump: &mut Option<JoinHandle<()>>,
) -> Option<(Negotiated, Vec<u8>)> {
    let mut hs = Handshake::new(catalog).with_tls(tls_mode(shared, stream));
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let status = hs.advance();
        let out = hs.take_output();
        if !out.is_empty() && stream.write_all(&out).is_err() {
            // Clients often close right after ABORT without reading the ACK.
            return None;
        }
        match status {
            Ok(Status::NeedInput) => {}
            Ok(Status::Transmission(neg)) => return Some((neg, hs.take_leftover())),
            Ok(Status::Aborted) => return None,
            Ok(Status::StartTls) => {
                let tls = shared.config.tls.as_ref()?;
                let net = stream.try_clone().ok()?;
                match super::tls::start(
                    tls,
                    net,
                    hs.take_leftover(),
                    &format!("nbd-conn-{id}"),
                    shared.config.log.clone(),
                ) {
                    Ok(tunnel) => {
                        let app = Stream::Unix(tunnel.app);
                        app.set_read_timeout(shared.config.handshake_timeout);
                        *stream = app;
                        *pump = Some(tunnel.pump);
                        hs.tls_started();
                        continue;
                    }
                    Err(e) => {
                        shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                        shared.log(|| format!("refused a client: {e}"));
                        return None;
                    }
                }
            }
            Err(e) => {
                shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                shared.log(|| format!("handshake failed: {e}"));
                return None;
            }
        }
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => n,
        };
        // Options that arrive once shutdown began are answered NBD_REP_ERR_SHUTDOWN.
        if shared.stopping.load(Ordering::SeqCst) {
            hs.shutting_down();
        }
        hs.push_input(buf.get(..n).unwrap_or_default());
    }
}

/// Limits the READ/WRITE bytes a connection holds.
struct Budget {
    used: Mutex<usize>,
    freed: Condvar,
    limit: usize,
}

/// A share of the budget, returned when dropped.
struct Permit {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Budget {
    fn acquire(self: &Arc<Self>, bytes: usize) -> Permit {
        let mut used = self.used.lock();
        // A request larger than the whole budget runs alone.
        while *used > 0 && *used + bytes > self.limit {
            self.freed.wait(&mut used);
        }
        *used += bytes;
        Permit {
            budget: self.clone(),
            bytes,
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock();
        *used -= self.bytes;
        self.budget.freed.notify_all();
    }
}

/// What every request costs against the budget at least, so that a client that sends
/// requests without reading replies cannot make the reply queue grow without bound.
const MIN_COST: usize = 1024;

struct Job {
    cookie: u64,
    cmd: Command,
    payload: AlignedBuf,
    permit: Permit,
}

/// What the request reader found next on the socket.
enum Next {
    /// A request to execute.
    Job(Job),
    /// A refused request, answered at once (its payload was skipped).
    Refused(Vec<u8>, Permit),
    /// The session is over (DISC, end of stream, a protocol error).
    End,
}

/// The socket's read side: the worker holding it is the connection's *request reader*.
struct ReadSide<R> {
    reader: R,
    ended: bool,
}

/// The socket's write side: replies are written whole, one at a time.
struct Output {
    stream: Stream,
    /// False once a write failed: the client is gone, replies are dropped.
    ok: bool,
}

impl Output {
    fn send(&mut self, bytes: &[u8]) {
        if self.ok && self.stream.write_all(bytes).is_err() {
            self.ok = false;
            // Wakes a request reader blocked in a read: the session is over.
            self.stream.shutdown(Shutdown::Both);
        }
    }
}

/// The socket's read side as the request reader sees it: blocking reads until shutdown begins,
/// then only what has already arrived.
struct Incoming {
    stream: Stream,
    shared: Arc<Shared>,
}

impl Read for Incoming {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.shared.stopping.load(Ordering::SeqCst) {
            self.stream.read_arrived(buf)
        } else {
            self.stream.read(buf)
        }
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let Some(rest) = buf.get_mut(n..) else { break };
        match r.read(rest) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn transmission(
    shared: &Arc<Shared>,
    stream: Stream,
    export: Arc<dyn Export>,
    neg: &Negotiated,
    leftover: Vec<u8>,
    reg: Registration,
) {
    let cfg = &shared.config;
    let (Ok(write_half), Ok(read_half)) = (stream.try_clone(), stream.try_clone()) else {
        stream.shutdown(Shutdown::Both);
        return;
    };
    let conn = Arc::new(Conn {
        shared: shared.clone(),
        limits: Limits::from(neg),
        structured: neg.structured,
        min_block: neg.block_sizes.min,
        export,
        budget: Arc::new(Budget {
            used: Mutex::new(0),
            freed: Condvar::new(),
            limit: cfg.inflight_bytes.max(1),
        }),
        read_side: Mutex::new(ReadSide {
            reader: BufReader::with_capacity(
                64 * 1024,
                std::io::Cursor::new(leftover).chain(Incoming {
                    stream: read_half,
                    shared: shared.clone(),
                }),
            ),
            ended: false,
        }),
        output: Mutex::new(Output {
            stream: write_half,
            ok: true,
        }),
        max_workers: cfg.workers.max(1),
        workers: AtomicUsize::new(1),
        waiting_to_read: AtomicUsize::new(0),
        socket: stream,
        _reg: reg,
    });
    // This thread is the first worker; the others start as requests arrive. The last one
    // to end drops the connection, which closes the socket.
    conn.work();
}

/// A connection in transmission. Its workers take turns as the *request reader*, which
/// holds the socket's read side, reads the next request (and a WRITE's payload), then hands
/// the read side to the next worker and executes the request itself and writes its reply:
/// a request is read, executed and answered by one thread, with no queue between threads.
/// Requests in flight are bounded by the workers and by the byte budget.
struct Conn<R> {
    shared: Arc<Shared>,
    limits: Limits,
    structured: bool,
    min_block: u32,
    export: Arc<dyn Export>,
    budget: Arc<Budget>,
    read_side: Mutex<ReadSide<R>>,
    output: Mutex<Output>,
    /// Most workers.
    max_workers: usize,
    /// Workers running.
    workers: AtomicUsize,
    /// Workers waiting for the read side, to be the next request reader.
    waiting_to_read: AtomicUsize,
    /// The socket, closed when the last worker is done.
    socket: Stream,
    /// Dropped after the socket is closed: the connection leaves the server's books.
    _reg: Registration,
}

impl<R> Drop for Conn<R> {
    fn drop(&mut self) {
        self.socket.shutdown(Shutdown::Both);
    }
}

/// A worker that waited this long for the read side ends.
const IDLE_WORKER_EXIT: Duration = Duration::from_secs(1);

impl<R: Read + Send + 'static> Conn<R> {
    fn work(self: &Arc<Self>) {
        loop {
            let next = {
                self.waiting_to_read.fetch_add(1, Ordering::SeqCst);
                let read_side = self.read_side.try_lock_for(IDLE_WORKER_EXIT);
                self.waiting_to_read.fetch_sub(1, Ordering::SeqCst);
                // Idle that long: the request reader holding the read side stays, this
                // worker is not needed.
                let Some(mut read_side) = read_side else {
                    break;
                };
                if read_side.ended {
                    break;
                }
                let next = self.read_next(&mut read_side.reader);
                match next {
                    Next::End => read_side.ended = true,
                    // Someone must read the next request while this one executes.
                    Next::Job(_) => self.start_next_reader(),
                    Next::Refused(..) => {}
                }
                next
            };
            match next {
                Next::End => break,
                Next::Refused(bytes, permit) => {
                    self.output.lock().send(&bytes);
                    drop(permit);
                }
                Next::Job(job) => self.execute(job),
            }
        }
        self.workers.fetch_sub(1, Ordering::SeqCst);
    }

    /// Starts one more worker, to be the next request reader, if none waits for the read
    /// side and the limit allows.
    fn start_next_reader(self: &Arc<Self>) {
        if self.waiting_to_read.load(Ordering::SeqCst) > 0 {
            return;
        }
        let n = self.workers.fetch_add(1, Ordering::SeqCst);
        if n >= self.max_workers {
            self.workers.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        let conn = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-worker-{n}"))
            .spawn(move || conn.work());
        if let Err(e) = spawned {
            self.workers.fetch_sub(1, Ordering::SeqCst);
            self.shared.log(|| {
                format!(
                    "cannot start a worker thread ({e}); the connection goes on with fewer: \
                     lower --workers or --max-connections, or raise the thread limit"
                )
            });
        }
    }

    fn execute(&self, job: Job) {
        // A panicking export must not leave the client waiting forever.
        let run = std::panic::AssertUnwindSafe(|| {
            execute(
                &*self.export,
                self.structured,
                self.min_block,
                job.cookie,
                job.cmd,
                &job.payload,
            )
            .bytes
        });
        let bytes = std::panic::catch_unwind(run).unwrap_or_else(|_| {
            self.shared
                .log(|| format!("export panicked serving {:?}", job.cmd));
            let mut b = Vec::new();
            reply::error_reply(&mut b, self.structured, job.cookie, EIO, "internal error");
            AlignedBuf::from_vec(b)
        });
        drop(job.payload);
        self.output.lock().send(&bytes);
        // The permit is returned once the reply is sent.
        drop(job.permit);
    }

    /// Reads the next request; the caller is the request reader.
    fn read_next(&self, r: &mut R) -> Next {
        let shared = &*self.shared;
        let Some(h) = self.read_header(r) else {
            return Next::End;
        };
        shared.stats.requests.fetch_add(1, Ordering::Relaxed);
        let checked = match validate(&h, &self.limits) {
            Ok(Command::Disconnect) => Ok(Command::Disconnect),
            // Arrived, but read after shutdown began: refused, not executed.
            _ if shared.stopping.load(Ordering::SeqCst) => Err(Rejection {
                errno: ESHUTDOWN,
                message: "the server is shutting down",
            }),
            r => r,
        };
        match checked {
            Ok(Command::Disconnect) => Next::End,
            Ok(cmd) => self.accept(r, h.cookie, cmd),
            Err(rej) => self.refuse(r, &h, &rej),
        }
    }

    /// Reads and decodes a request header; `None` ends the connection (end of stream, a
    /// short header, bad magic).
    fn read_header(&self, r: &mut R) -> Option<RequestHeader> {
        let shared = &*self.shared;
        let mut hdr = [0u8; REQUEST_HEADER_LEN];
        match read_full(r, &mut hdr) {
            // End of stream at a request boundary: a disconnect without DISC.
            Ok(0) | Err(_) => return None,
            Ok(REQUEST_HEADER_LEN) => {}
            Ok(n) => {
                shared.log(|| format!("connection closed inside a request header ({n} bytes)"));
                return None;
            }
        }
        match RequestHeader::decode(&hdr) {
            Ok(h) => Some(h),
            Err(e @ (HeaderError::BadMagic(_) | HeaderError::Truncated)) => {
                shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                shared.log(|| format!("{e}; closing the connection"));
                None
            }
        }
    }

    /// A valid request: takes its share of the memory budget and reads a WRITE's payload.
    fn accept(&self, r: &mut R, cookie: u64, cmd: Command) -> Next {
        let cost = match cmd {
            Command::Read { length, .. } | Command::Write { length, .. } => length,
            _ => 0,
        } as usize;
        let permit = self.budget.acquire(cost.max(MIN_COST));
        let mut payload = AlignedBuf::default();
        if let Command::Write { length, .. } = cmd {
            payload = AlignedBuf::zeroed(length as usize);
            if !matches!(read_full(r, &mut payload), Ok(n) if n == payload.len()) {
                self.shared
                    .log(|| "connection closed inside a write payload".into());
                return Next::End;
            }
        }
        Next::Job(Job {
            cookie,
            cmd,
            payload,
            permit,
        })
    }

    /// A refused request: its error reply, after skipping its payload; a payload too large
    /// to skip leaves the stream out of sync, so the reply is sent and the session ends.
    fn refuse(&self, r: &mut R, h: &RequestHeader, rej: &Rejection) -> Next {
        let shared = &*self.shared;
        shared.stats.errors.fetch_add(1, Ordering::Relaxed);
        let mut bytes = Vec::new();
        reply::error_reply(
            &mut bytes,
            self.limits.structured,
            h.cookie,
            rej.errno,
            rej.message,
        );
        let skip = h.payload_len();
        let permit = self.budget.acquire(MIN_COST);
        if skip == 0 {
            return Next::Refused(bytes, permit);
        }
        if skip <= shared.config.max_discard {
            let want = u64::from(skip);
            if matches!(
                std::io::copy(&mut r.by_ref().take(want), &mut std::io::sink()),
                Ok(n) if n == want
            ) {
                return Next::Refused(bytes, permit);
            }
        } else {
            shared.log(|| format!("refused write of {skip} bytes is too large to skip; closing"));
        }
        self.output.lock().send(&bytes);
        Next::End
    }
}
