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
use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::io::execute;
use super::{Shared, Stream};
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

struct Job {
    cookie: u64,
    cmd: Command,
    payload: Vec<u8>,
    permit: Permit,
}

struct Outgoing {
    bytes: Vec<u8>,
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
    let Ok(write_half) = stream.try_clone() else {
        stream.shutdown(Shutdown::Both);
        return;
    };
    let (reply_tx, reply_rx) = mpsc::channel::<Outgoing>();
    let (job_tx, job_rx) = mpsc::sync_channel::<Job>(cfg.queue_depth.max(1));
    let job_rx = Arc::new(Mutex::new(job_rx));
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
        let rx = job_rx.clone();
        let tx = reply_tx.clone();
        let export = export.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-worker-{i}"))
            .spawn(move || loop {
                let job = rx.lock().recv();
                let Ok(job) = job else { break };
                let done = execute(
                    &*export,
                    structured,
                    min_block,
                    job.cookie,
                    job.cmd,
                    &job.payload,
                );
                // A WRITE's payload is gone now; a READ's data is in the reply.
                let permit = match job.cmd {
                    Command::Read { .. } => Some(job.permit),
                    _ => None,
                };
                if tx
                    .send(Outgoing {
                        bytes: done.bytes,
                        _permit: permit,
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

    let Ok(read_half) = stream.try_clone() else {
        stream.shutdown(Shutdown::Both);
        return;
    };
    let input = std::io::Cursor::new(leftover).chain(read_half);
    let mut reader = BufReader::with_capacity(64 * 1024, input);
    if workers.is_empty() {
        shared.log(|| "no worker threads; closing the connection".into());
    } else {
        read_loop(shared, &mut reader, &limits, &budget, &job_tx, &reply_tx);
    }

    drop(job_tx);
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
    jobs: &mpsc::SyncSender<Job>,
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
                let permit = budget.acquire(cost);
                let mut payload = Vec::new();
                if let Command::Write { length, .. } = cmd {
                    payload = vec![0u8; length as usize];
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
                if jobs.send(job).is_err() {
                    return;
                }
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
                        bytes,
                        _permit: None,
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
