//! One client connection: the handshake, then the transmission pipeline.
//!
//! The handshake runs on the connection's thread, feeding socket bytes to the sans-IO
//! [`Handshake`]. In transmission the same thread becomes the *reader*: it decodes request
//! headers, checks them, reads WRITE payloads, and queues work on a bounded channel.
//! A pool of *worker* threads takes requests from that channel and does the device I/O,
//! so many requests are in flight; each finished reply goes to the single *writer* thread,
//! which sends replies in completion order and flushes its buffer whenever it runs out of
//! work. A per-connection byte budget bounds the READ and WRITE data held in memory.
//!
//! Refused requests are answered by the reader directly (a refused WRITE's payload is read
//! and dropped first, so the stream stays in sync). A bad request magic or a truncated
//! request ends the session. When the reader stops (DISC, end of stream, shutdown), the
//! workers finish the queued requests, the writer sends their replies, and the socket is
//! closed; a client that vanished only makes the writer drop replies.

use std::io::{BufReader, BufWriter, Read, Write};

use cowsnap_core::dev::AlignedBuf;
use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::io::execute;
use super::{Shared, Stream};
use crate::codec::consts::EIO;
use crate::codec::reply;
use crate::codec::request::{validate, Command, HeaderError, Limits, RequestHeader};
use crate::codec::{Handshake, Negotiated, Status, REQUEST_HEADER_LEN};
use crate::export::Export;

/// Serves one connection to its end.
pub(super) fn run(shared: &Arc<Shared>, mut stream: Stream) {
    let Some((neg, leftover)) = handshake(shared, &mut stream) else {
        stream.shutdown(Shutdown::Both);
        return;
    };
    let Some(export) = shared.export(&neg.export) else {
        // Removed between the handshake's catalog and now.
        shared.log(|| format!("export {:?} vanished during the handshake", neg.export));
        stream.shutdown(Shutdown::Both);
        return;
    };
    shared.stats.transmissions.fetch_add(1, Ordering::Relaxed);
    transmission(shared, stream, export, &neg, leftover);
}

fn handshake(shared: &Shared, stream: &mut Stream) -> Option<(Negotiated, Vec<u8>)> {
    // A client that stalls in the handshake is dropped after the timeout.
    stream.set_read_timeout(shared.config.handshake_timeout);
    let r = handshake_steps(shared, stream);
    stream.set_read_timeout(None);
    r
}

fn handshake_steps(shared: &Shared, stream: &mut Stream) -> Option<(Negotiated, Vec<u8>)> {
    let mut hs = Handshake::new(shared.catalog());
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

/// The bounded queue between the reader and the workers. Unlike a channel behind a
/// mutex, it wakes a worker only when one is idle, which halves the thread switches per
/// request when the device is fast.
struct JobQueue {
    state: Mutex<QueueState>,
    /// Signalled when a job arrives or the queue closes.
    work: Condvar,
    /// Signalled when a job leaves.
    room: Condvar,
    depth: usize,
}

struct QueueState {
    jobs: std::collections::VecDeque<Job>,
    idle: usize,
    closed: bool,
}

impl JobQueue {
    fn new(depth: usize) -> Self {
        JobQueue {
            state: Mutex::new(QueueState {
                jobs: std::collections::VecDeque::with_capacity(depth),
                idle: 0,
                closed: false,
            }),
            work: Condvar::new(),
            room: Condvar::new(),
            depth: depth.max(1),
        }
    }

    /// Queues a job, waiting while the queue is full.
    fn push(&self, job: Job) {
        let mut st = self.state.lock();
        while st.jobs.len() >= self.depth {
            self.room.wait(&mut st);
        }
        st.jobs.push_back(job);
        if st.idle > 0 {
            self.work.notify_one();
        }
    }

    /// The next job; `None` once the queue is closed and empty.
    fn pop(&self) -> Option<Job> {
        let mut st = self.state.lock();
        loop {
            if let Some(j) = st.jobs.pop_front() {
                self.room.notify_one();
                return Some(j);
            }
            if st.closed {
                return None;
            }
            st.idle += 1;
            self.work.wait(&mut st);
            st.idle -= 1;
        }
    }

    /// No more jobs: workers finish the queued ones and stop.
    fn close(&self) {
        self.state.lock().closed = true;
        self.work.notify_all();
    }
}

struct Outgoing {
    bytes: AlignedBuf,
    _permit: Option<Permit>,
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
) {
    let cfg = &shared.config;
    let limits = Limits::from(neg);
    let structured = neg.structured;
    let min_block = neg.block_sizes.min;
    let (Ok(write_half), Ok(read_half)) = (stream.try_clone(), stream.try_clone()) else {
        stream.shutdown(Shutdown::Both);
        return;
    };
    let (reply_tx, reply_rx) = mpsc::channel::<Outgoing>();
    let queue = Arc::new(JobQueue::new(cfg.queue_depth));
    let budget = Arc::new(Budget {
        used: Mutex::new(0),
        freed: Condvar::new(),
        limit: cfg.inflight_bytes.max(1),
    });

    let writer = std::thread::Builder::new()
        .name("nbd-writer".into())
        .spawn(move || writer_loop(write_half, reply_rx));
    let Ok(writer) = writer else {
        stream.shutdown(Shutdown::Both);
        return;
    };
    let mut workers = Vec::with_capacity(cfg.workers.max(1));
    for i in 0..cfg.workers.max(1) {
        let queue = queue.clone();
        let tx = reply_tx.clone();
        let export = export.clone();
        let logger = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-worker-{i}"))
            .spawn(move || loop {
                let Some(job) = queue.pop() else { break };
                // A panicking export must not leave the client waiting forever.
                let run = std::panic::AssertUnwindSafe(|| {
                    execute(
                        &*export,
                        structured,
                        min_block,
                        job.cookie,
                        job.cmd,
                        &job.payload,
                    )
                    .bytes
                });
                let bytes = std::panic::catch_unwind(run).unwrap_or_else(|_| {
                    logger.log(|| format!("export panicked serving {:?}", job.cmd));
                    let mut b = Vec::new();
                    reply::error_reply(&mut b, structured, job.cookie, EIO, "internal error");
                    AlignedBuf::from_vec(b)
                });
                drop(job.payload);
                // The permit goes with the reply and is returned once it is sent.
                if tx
                    .send(Outgoing {
                        bytes,
                        _permit: Some(job.permit),
                    })
                    .is_err()
                {
                    break;
                }
            });
        match spawned {
            Ok(h) => workers.push(h),
            Err(e) => shared.log(|| format!("cannot start a worker thread: {e}")),
        }
    }

    let input = std::io::Cursor::new(leftover).chain(read_half);
    let mut reader = BufReader::with_capacity(64 * 1024, input);
    if workers.is_empty() {
        shared.log(|| "no worker threads; closing the connection".into());
    } else {
        read_loop(shared, &mut reader, &limits, &budget, &queue, &reply_tx);
    }

    queue.close();
    for w in workers {
        let _ = w.join();
    }
    drop(reply_tx);
    let _ = writer.join();
    stream.shutdown(Shutdown::Both);
}

fn read_loop(
    shared: &Shared,
    r: &mut impl Read,
    limits: &Limits,
    budget: &Arc<Budget>,
    jobs: &JobQueue,
    replies: &mpsc::Sender<Outgoing>,
) {
    let mut hdr = [0u8; REQUEST_HEADER_LEN];
    loop {
        match read_full(r, &mut hdr) {
            // End of stream at a request boundary: a disconnect without DISC.
            Ok(0) => return,
            Ok(REQUEST_HEADER_LEN) => {}
            Ok(n) => {
                shared.log(|| format!("connection closed inside a request header ({n} bytes)"));
                return;
            }
            Err(_) => return,
        }
        let h = match RequestHeader::decode(&hdr) {
            Ok(h) => h,
            Err(e @ (HeaderError::BadMagic(_) | HeaderError::Truncated)) => {
                shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                shared.log(|| format!("{e}; closing the connection"));
                return;
            }
        };
        shared.stats.requests.fetch_add(1, Ordering::Relaxed);
        match validate(&h, limits) {
            Ok(Command::Disconnect) => return,
            Ok(cmd) => {
                let cost = match cmd {
                    Command::Read { length, .. } | Command::Write { length, .. } => length,
                    _ => 0,
                } as usize;
                let permit = budget.acquire(cost.max(MIN_COST));
                let mut payload = AlignedBuf::default();
                if let Command::Write { length, .. } = cmd {
                    payload = AlignedBuf::zeroed(length as usize);
                    if !matches!(read_full(r, &mut payload), Ok(n) if n == payload.len()) {
                        shared.log(|| "connection closed inside a write payload".into());
                        return;
                    }
                }
                let job = Job {
                    cookie: h.cookie,
                    cmd,
                    payload,
                    permit,
                };
                jobs.push(job);
            }
            Err(rej) => {
                shared.stats.errors.fetch_add(1, Ordering::Relaxed);
                let mut bytes = Vec::new();
                reply::error_reply(
                    &mut bytes,
                    limits.structured,
                    h.cookie,
                    rej.errno,
                    rej.message,
                );
                let skip = h.payload_len();
                let keep_going = if skip == 0 {
                    true
                } else if skip <= shared.config.max_discard {
                    let want = u64::from(skip);
                    matches!(
                        std::io::copy(&mut r.by_ref().take(want), &mut std::io::sink()),
                        Ok(n) if n == want
                    )
                } else {
                    shared.log(|| {
                        format!("refused write of {skip} bytes is too large to skip; closing")
                    });
                    false
                };
                if replies
                    .send(Outgoing {
                        bytes: AlignedBuf::from_vec(bytes),
                        _permit: Some(budget.acquire(MIN_COST)),
                    })
                    .is_err()
                    || !keep_going
                {
                    return;
                }
            }
        }
    }
}

fn writer_loop(stream: Stream, rx: mpsc::Receiver<Outgoing>) {
    let mut w = BufWriter::with_capacity(64 * 1024, stream);
    let mut ok = true;
    loop {
        let msg = match rx.try_recv() {
            Ok(m) => m,
            Err(mpsc::TryRecvError::Empty) => {
                if ok && w.flush().is_err() {
                    ok = false;
                    w.get_ref().shutdown(Shutdown::Both);
                }
                match rx.recv() {
                    Ok(m) => m,
                    Err(_) => break,
                }
            }
            Err(mpsc::TryRecvError::Disconnected) => break,
        };
        // After a failed write the client is gone: keep draining so workers can finish.
        if ok && w.write_all(&msg.bytes).is_err() {
            ok = false;
            w.get_ref().shutdown(Shutdown::Both);
        }
    }
    if ok {
        let _ = w.flush();
    }
}
