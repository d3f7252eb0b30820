//! Shared helpers of the integration tests: a server fixture on a Unix socket in a scratch
//! dir, running external clients with a timeout, and a raw NBD client for sending malformed
//! input. Seeds, patterns, scratch dirs and tool checks come from `cowsnap_core::testkit`.

#![allow(dead_code, unused_imports, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cowsnap_nbd::codec::consts::*;
use cowsnap_nbd::codec::reply::ReplyHeader;
use cowsnap_nbd::codec::RequestHeader;
use cowsnap_nbd::{Export, Server, ServerConfig};

pub use cowsnap_core::testkit::{pattern, require_tools, scratch, wait_for, Scratch};

/// A server listening on `DIR/nbd.sock`.
pub struct Fixture {
    pub dir: Scratch,
    pub server: Server,
    pub sock: PathBuf,
}

impl Fixture {
    pub fn new(exports: Vec<(&str, Arc<dyn Export>)>) -> Fixture {
        Fixture::with_config(exports, ServerConfig::default())
    }

    pub fn with_config(exports: Vec<(&str, Arc<dyn Export>)>, config: ServerConfig) -> Fixture {
        let dir = scratch("nbd");
        let sock = dir.path().join("nbd.sock");
        let server = Server::new(config);
        for (name, e) in exports {
            server.add_export(name, e).expect("add export");
        }
        server.listen_unix(&sock).expect("listen");
        Fixture { dir, server, sock }
    }

    /// Two exports: `disk` (64 MiB, writable) and `ro` (1 MiB, read-only, described as
    /// "read-only twin"), for clients that list exports.
    pub fn disk_and_read_only() -> Fixture {
        use cowsnap_core::dev::MemDevice;
        use cowsnap_nbd::DeviceExport;
        Fixture::new(vec![
            (
                "disk",
                Arc::new(DeviceExport::memory(MemDevice::new(64 << 20))),
            ),
            (
                "ro",
                Arc::new(
                    DeviceExport::memory(MemDevice::new(1 << 20))
                        .read_only(true)
                        .description("read-only twin"),
                ),
            ),
        ])
    }

    /// `nbd+unix:///NAME?socket=PATH`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Runs a command with a timeout; panics (with its output) if it takes longer.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {desc}: {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = t_err.join().unwrap_or_default();
            panic!(
                "{desc} timed out after {timeout:?}; stderr:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// Runs a command that must succeed; returns its standard output.
pub fn run_ok(cmd: &mut Command) -> String {
    let desc = format!("{cmd:?}");
    let o = run(cmd, Duration::from_secs(120));
    assert!(
        o.status.success(),
        "{desc} failed with {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    let data = std::fs::read(p).expect("read file");
    format!("{:x}", sha2::Sha256::digest(&data))
}

/// A reply as read by [`RawClient`].
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Simple {
        error: u32,
        cookie: u64,
        data: Vec<u8>,
    },
    Chunk {
        flags: u16,
        ty: u16,
        cookie: u64,
        payload: Vec<u8>,
    },
}

/// A hand-driven NBD client for sending what real clients never would.
pub struct RawClient {
    pub s: UnixStream,
}

impl RawClient {
    /// Connects and reads the 18-byte greeting.
    pub fn connect(sock: &Path) -> RawClient {
        let s = UnixStream::connect(sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = RawClient { s };
        let g = c.read_exact(18);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        c
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    pub fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).expect("read");
        v
    }

    /// True if the server closed the connection (EOF or reset) before sending anything.
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }

    pub fn option(&mut self, option: u32, data: &[u8]) {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        self.send(&v);
    }

    /// Reads one option reply: (option, type, data).
    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read_exact(20);
        assert_eq!(&h[..8], &REPLY_MAGIC.to_be_bytes());
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        (option, ty, self.read_exact(len as usize))
    }

    /// Fixed newstyle, optionally structured replies and `base:allocation`, then GO.
    /// Returns the export size and transmission flags.
    pub fn go(&mut self, export: &str, structured: bool, meta: bool) -> (u64, u16) {
        self.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        if structured {
            self.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(self.option_reply().1, REP_ACK);
        }
        if meta {
            let mut d = (export.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(export.as_bytes());
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&15u32.to_be_bytes());
            d.extend_from_slice(b"base:allocation");
            self.option(OPT_SET_META_CONTEXT, &d);
            assert_eq!(self.option_reply().1, REP_META_CONTEXT);
            assert_eq!(self.option_reply().1, REP_ACK);
        }
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &d);
        let mut size_flags = None;
        loop {
            let (o, ty, data) = self.option_reply();
            assert_eq!(o, OPT_GO);
            match ty {
                REP_INFO if data[..2] == [0, 0] => {
                    let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    let flags = u16::from_be_bytes(data[10..12].try_into().unwrap());
                    size_flags = Some((size, flags));
                }
                REP_INFO => {}
                REP_ACK => break,
                other => panic!("GO failed with reply type {other:#x}"),
            }
        }
        size_flags.expect("NBD_INFO_EXPORT")
    }

    pub fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        let h = RequestHeader {
            flags,
            kind,
            cookie,
            offset,
            length,
        };
        self.send(&h.encode());
    }

    /// Reads one reply; `read_len` is the data length to expect after a successful simple
    /// reply to a READ (the wire does not say).
    pub fn reply(&mut self, read_len: usize) -> Reply {
        let first = self.read_exact(16);
        let is_chunk = first[..4] == STRUCTURED_REPLY_MAGIC.to_be_bytes();
        let mut hdr = first;
        if is_chunk {
            hdr.extend(self.read_exact(4));
        }
        match ReplyHeader::decode(&hdr).expect("reply header").0 {
            ReplyHeader::Simple { error, cookie } => {
                let data = if error == 0 {
                    self.read_exact(read_len)
                } else {
                    Vec::new()
                };
                Reply::Simple {
                    error,
                    cookie,
                    data,
                }
            }
            ReplyHeader::Chunk {
                flags,
                ty,
                cookie,
                length,
            } => Reply::Chunk {
                flags,
                ty,
                cookie,
                payload: self.read_exact(length as usize),
            },
        }
    }
}
