//! TLS for NBD connections: X.509 credentials and the per-connection TLS pump.
//!
//! # Credentials
//!
//! [`TlsConfig::from_dir`] reads PEM files laid out as qemu's
//! `--object tls-creds-x509,dir=DIR,endpoint=server` expects them: `DIR/server-cert.pem`
//! (the server's certificate, optionally followed by intermediate CA certificates),
//! `DIR/server-key.pem` (its private key: PKCS#8, PKCS#1 or SEC1) and `DIR/ca-cert.pem`
//! (the CA that signs client certificates; needed only with client-certificate
//! verification). With `verify_peer` a client must present a certificate that chains to
//! `ca-cert.pem`, or the TLS handshake fails and the connection is closed: the
//! equivalent of qemu-nbd's `verify-peer=on` and nbdkit's `--tls-verify-peer`.
//! Clients use the same directory layout with `client-cert.pem` and `client-key.pem`
//! (libnbd `tls-certificates=DIR`, qemu `endpoint=client`).
//!
//! TLS is provided by rustls with its `ring` provider (TLS 1.2 and 1.3; building it needs
//! only a C compiler, where the `aws-lc-rs` provider would need a much larger C build).
//! The ring provider has no post-quantum hybrid key exchange (X25519MLKEM768), which is
//! why rustls 0.23.48 marks it deprecated; switching providers is a one-line change here. TLS-PSK (qemu's `tls-creds-psk`, nbdkit `--tls-psk`) is not
//! offered: rustls implements pre-shared keys only for session resumption, not external
//! PSKs (rustls issue #174 is open; a client-only attempt was closed unmerged), and the
//! TLS 1.2 PSK suites are outside what it supports.
//!
//! # Design: a pump per connection
//!
//! The transmission phase (`super::conn`) splits a socket into a read side and a write
//! side that several worker threads use at once, while a rustls connection is one state
//! object that both directions go through. Rather than put every reply and request
//! behind one lock around the TLS state (and risk a reply write blocking behind a reader,
//! or the reverse), TLS is terminated in one *pump* thread per TLS connection: after the
//! `STARTTLS` acknowledgement the connection's thread runs the TLS handshake itself
//! (blocking, under the handshake timeout; a failure is reported and the connection
//! closed), then creates a Unix socket pair, hands the network socket and one end of the
//! pair to the pump, and carries on with the other end as if it were the client's socket.
//! The handshake and the whole transmission pipeline stay unchanged.
//!
//! The pump is one thread polling both sockets (non-blocking): bytes from the client are
//! decrypted and written to the pair, bytes from the pair are encrypted and sent. It
//! reads from one side only when the other side can take what it produces, so memory per
//! connection stays bounded and a client that stops reading only stalls its own
//! connection. End of stream is passed on in order: the client's end of stream (or the
//! server's `shutdown(Read)` on the network socket during a drain) closes the pair's write
//! side once the decrypted bytes are delivered, so the workers finish and answer what
//! they read; when the connection's thread closes its end, the pump sends the TLS
//! `close_notify`, flushes, and closes the network socket. The connection's thread joins
//! the pump before it counts the connection as closed, so a server shutdown waits for the
//! last encrypted replies too. The cost is one copy through the socket pair per byte and
//! one more thread per TLS connection.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use rustix::event::{poll, PollFd, PollFlags};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConnection};

use super::Stream;
use crate::codec::TlsMode;

/// The CA certificate file in a credentials directory.
pub const CA_CERT: &str = "ca-cert.pem";
/// The server certificate file in a credentials directory.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server private key file in a credentials directory.
pub const SERVER_KEY: &str = "server-key.pem";

/// Why TLS credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A file could not be read.
    #[error("cannot read {path}: {source} (a TLS credentials directory holds server-cert.pem and server-key.pem, and ca-cert.pem to verify clients, as for qemu's tls-creds-x509)")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds no usable PEM item of the kind needed.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// rustls refused the credentials (for instance a key that does not match the
    /// certificate).
    #[error("TLS credentials in {dir}: {what}")]
    Rejected {
        /// The credentials directory.
        dir: PathBuf,
        /// What rustls said.
        what: String,
    },
}

/// TLS settings of a server: credentials, and whether TLS is required.
#[derive(Clone)]
pub struct TlsConfig {
    config: Arc<rustls::ServerConfig>,
    mode: TlsMode,
    verify_peer: bool,
    dir: PathBuf,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("dir", &self.dir)
            .field("mode", &self.mode)
            .field("verify_peer", &self.verify_peer)
            .finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|source| TlsSetupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsSetupError::Pem {
            path: path.to_path_buf(),
            what: format!("not a valid PEM certificate file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::Pem {
            path: path.to_path_buf(),
            what: "holds no certificate (expected -----BEGIN CERTIFICATE-----)".into(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsSetupError::Pem {
        path: path.to_path_buf(),
        what: format!("holds no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
    })
}

impl TlsConfig {
    /// Loads `DIR/server-cert.pem` and `DIR/server-key.pem`, and with `verify_peer`
    /// `DIR/ca-cert.pem`, which every client certificate must chain to. TLS is
    /// [`TlsMode::Required`] unless changed with [`TlsConfig::with_mode`].
    pub fn from_dir(dir: impl AsRef<Path>, verify_peer: bool) -> Result<Self, TlsSetupError> {
        let dir = dir.as_ref();
        let certs = certificates(&dir.join(SERVER_CERT))?;
        let key = private_key(&dir.join(SERVER_KEY))?;
        let rejected = |what: String| TlsSetupError::Rejected {
            dir: dir.to_path_buf(),
            what,
        };
        // rustls 0.23.48 deprecates the ring provider because it has no post-quantum key
        // exchange; it is still maintained, and aws-lc-rs would need a far heavier C build.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| rejected(e.to_string()))?;
        let builder = if verify_peer {
            let ca_path = dir.join(CA_CERT);
            let mut roots = RootCertStore::empty();
            for c in certificates(&ca_path)? {
                roots.add(c).map_err(|e| TlsSetupError::Pem {
                    path: ca_path.clone(),
                    what: format!("not a usable CA certificate: {e}"),
                })?;
            }
            // No list of acceptable CA names in the certificate request: it tells an
            // unauthenticated peer nothing, and a client presents the certificate it has,
            // so a certificate of another CA is judged, and refused, by the verifier.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .clear_root_hint_subjects()
                .build()
                .map_err(|e| rejected(format!("client verification: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder.with_single_cert(certs, key).map_err(|e| {
            rejected(format!(
                "{SERVER_CERT} and {SERVER_KEY} are not a usable pair: {e}"
            ))
        })?;
        Ok(TlsConfig {
            config: Arc::new(config),
            mode: TlsMode::Required,
            verify_peer,
            dir: dir.to_path_buf(),
        })
    }

    /// Sets whether TLS is required ([`TlsMode::Required`], the default) or optional.
    pub fn with_mode(mut self, mode: TlsMode) -> Self {
        self.mode = mode;
        self
    }

    /// How the handshake treats TLS.
    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// Whether clients must present a certificate signed by the CA.
    pub fn verify_peer(&self) -> bool {
        self.verify_peer
    }

    /// The credentials directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The decrypted side of a TLS connection and the pump thread serving it.
pub(super) struct Tunnel {
    /// The socket the rest of the server uses as the client's.
    pub app: UnixStream,
    /// The pump; joined when the connection ends.
    pub pump: JoinHandle<()>,
}

fn describe(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            "the client did not finish the TLS handshake in time".into()
        }
        _ => e.to_string(),
    }
}

/// Runs the TLS handshake on `net`, which the client's first TLS bytes `early` were
/// already read from, then starts the pump. Errors say why the handshake failed.
pub(super) fn start(
    config: &TlsConfig,
    mut net: Stream,
    early: Vec<u8>,
    name: &str,
    log: Option<super::LogFn>,
) -> Result<Tunnel, String> {
    let mut tls = ServerConnection::new(config.config.clone()).map_err(|e| e.to_string())?;
    let mut early = std::io::Cursor::new(early);
    let early_left = |c: &std::io::Cursor<Vec<u8>>| c.position() < c.get_ref().len() as u64;
    while tls.is_handshaking() {
        while tls.wants_write() {
            tls.write_tls(&mut net).map_err(|e| describe(&e))?;
        }
        if !tls.is_handshaking() {
            break;
        }
        let n = if early_left(&early) {
            tls.read_tls(&mut early)
        } else {
            tls.read_tls(&mut net)
        }
        .map_err(|e| describe(&e))?;
        if n == 0 {
            return Err("the client closed the connection during the TLS handshake".into());
        }
        if let Err(e) = tls.process_new_packets() {
            // Tell the client why (the alert), as far as it listens.
            let _ = tls.write_tls(&mut net);
            return Err(format!("TLS handshake failed: {e}"));
        }
    }
    // Application data the client sent right behind its last handshake message.
    while early_left(&early) {
        if tls.read_tls(&mut early).map_err(|e| describe(&e))? == 0 {
            break;
        }
        tls.process_new_packets().map_err(|e| e.to_string())?;
    }
    while tls.wants_write() {
        tls.write_tls(&mut net).map_err(|e| describe(&e))?;
    }
    let (app, ours) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let pump = std::thread::Builder::new()
        .name(format!("{name}-tls"))
        .spawn(move || {
            if let Err(e) = Pump::new(tls, net, ours).and_then(Pump::run) {
                if let Some(log) = log {
                    log(&format!("TLS connection ended: {e}"));
                }
            }
        })
        .map_err(|e| format!("cannot start the TLS thread: {e}"))?;
    Ok(Tunnel { app, pump })
}

fn net_fd(s: &Stream) -> BorrowedFd<'_> {
    match s {
        Stream::Unix(s) => s.as_fd(),
        Stream::Tcp(s) => s.as_fd(),
    }
}

/// Decrypted bytes buffered for the pair at most (beyond one TLS record).
const APP_BUFFER: usize = 256 * 1024;

struct Pump {
    tls: ServerConnection,
    net: Stream,
    app: UnixStream,
    /// Decrypted bytes not yet written to `app`, from `to_app_at`.
    to_app: Vec<u8>,
    to_app_at: usize,
    /// Bytes from `app` not yet accepted by the TLS writer, from `from_app_at`.
    from_app: Vec<u8>,
    from_app_at: usize,
    /// The client sent its last byte (or the server stopped reading it).
    net_eof: bool,
    /// `app`'s write side is shut: the workers saw the end of the stream.
    app_write_closed: bool,
    /// The connection's thread closed its end; nothing more to send but `close_notify`.
    app_eof: bool,
    close_sent: bool,
}

impl Pump {
    fn new(tls: ServerConnection, net: Stream, app: UnixStream) -> std::io::Result<Pump> {
        match &net {
            Stream::Unix(s) => s.set_nonblocking(true)?,
            Stream::Tcp(s) => s.set_nonblocking(true)?,
        }
        app.set_nonblocking(true)?;
        Ok(Pump {
            tls,
            net,
            app,
            to_app: Vec::new(),
            to_app_at: 0,
            from_app: Vec::new(),
            from_app_at: 0,
            net_eof: false,
            app_write_closed: false,
            app_eof: false,
            close_sent: false,
        })
    }

    fn run(mut self) -> std::io::Result<()> {
        let r = self.pump();
        // Whatever ended the pump, the workers see the end of their stream.
        let _ = self.app.shutdown(std::net::Shutdown::Both);
        self.net.shutdown(std::net::Shutdown::Both);
        r
    }

    fn pump(&mut self) -> std::io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            self.decrypted_to_app(&mut buf)?;
            self.app_to_tls();
            if self.app_eof && self.from_app_at == self.from_app.len() && !self.close_sent {
                self.tls.send_close_notify();
                self.close_sent = true;
            }
            if !self.tls_to_net()? {
                return Ok(());
            }
            if self.close_sent && !self.tls.wants_write() {
                return Ok(());
            }
            let (net_flags, app_flags) = self.wanted();
            let Some((net_ready, app_ready)) = self.wait(net_flags, app_flags)? else {
                continue;
            };
            let gone = PollFlags::HUP | PollFlags::ERR | PollFlags::NVAL;
            if net_flags.contains(PollFlags::IN) && net_ready.intersects(PollFlags::IN | gone) {
                self.net_to_tls()?;
            } else if !net_flags.contains(PollFlags::OUT) && net_ready.intersects(gone) {
                return Err(std::io::Error::other("the network connection broke"));
            }
            if app_flags.contains(PollFlags::IN) && app_ready.intersects(PollFlags::IN | gone) {
                self.read_app(&mut buf)?;
            } else if !app_flags.contains(PollFlags::OUT) && app_ready.intersects(gone) {
                self.app_eof = true;
            }
        }
    }

    /// The events to wait for on the network and on the workers' socket: read the network
    /// only when the workers took what was decrypted, read the workers only when their last
    /// bytes went into TLS and TLS has nothing queued.
    fn wanted(&self) -> (PollFlags, PollFlags) {
        let to_app_pending = self.to_app_at < self.to_app.len();
        let mut net = PollFlags::empty();
        if !self.net_eof && !to_app_pending && self.tls.wants_read() {
            net |= PollFlags::IN;
        }
        if self.tls.wants_write() {
            net |= PollFlags::OUT;
        }
        let mut app = PollFlags::empty();
        if !self.app_eof && self.from_app_at == self.from_app.len() && !self.tls.wants_write() {
            app |= PollFlags::IN;
        }
        if to_app_pending {
            app |= PollFlags::OUT;
        }
        (net, app)
    }

    /// Waits for the events; returns what happened on each side, `None` when a signal
    /// interrupted the wait.
    fn wait(
        &self,
        net_flags: PollFlags,
        app_flags: PollFlags,
    ) -> std::io::Result<Option<(PollFlags, PollFlags)>> {
        let mut fds = Vec::with_capacity(2);
        if !net_flags.is_empty() {
            fds.push(PollFd::from_borrowed_fd(net_fd(&self.net), net_flags));
        }
        if !app_flags.is_empty() {
            fds.push(PollFd::from_borrowed_fd(self.app.as_fd(), app_flags));
        }
        if fds.is_empty() {
            // Nothing can make progress (cannot happen; never spin).
            return Err(std::io::Error::other("TLS pump stalled"));
        }
        match poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let mut it = fds.iter();
        let mut revents = |asked: PollFlags| {
            if asked.is_empty() {
                PollFlags::empty()
            } else {
                it.next().map_or(PollFlags::empty(), PollFd::revents)
            }
        };
        let net = revents(net_flags);
        let app = revents(app_flags);
        Ok(Some((net, app)))
    }

    /// Reads what the client sent into the TLS state; records its end of stream.
    fn net_to_tls(&mut self) -> std::io::Result<()> {
        match self.tls.read_tls(&mut self.net) {
            Ok(0) => self.net_eof = true,
            Ok(_) => {
                if let Err(e) = self.tls.process_new_packets() {
                    let _ = self.tls.write_tls(&mut self.net);
                    return Err(std::io::Error::other(format!(
                        "TLS error from the client: {e}"
                    )));
                }
            }
            Err(e) if would_block(&e) => {}
            // A reset: treat as the end of the client's stream.
            Err(_) => self.net_eof = true,
        }
        Ok(())
    }

    /// Moves decrypted bytes to the pair; closes its write side after the client's end.
    fn decrypted_to_app(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        if self.to_app_at == self.to_app.len() {
            self.to_app.clear();
            self.to_app_at = 0;
            while self.to_app.len() < APP_BUFFER {
                match self.tls.reader().read(buf) {
                    Ok(0) => {
                        // close_notify from the client.
                        self.net_eof = true;
                        break;
                    }
                    Ok(n) => self
                        .to_app
                        .extend_from_slice(buf.get(..n).unwrap_or_default()),
                    Err(e) if would_block(&e) => break,
                    // The client closed the socket without close_notify.
                    Err(_) => {
                        self.net_eof = true;
                        break;
                    }
                }
            }
        }
        while self.to_app_at < self.to_app.len() && !self.app_eof {
            let rest = self.to_app.get(self.to_app_at..).unwrap_or_default();
            match self.app.write(rest) {
                Ok(n) => self.to_app_at += n,
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // The connection's thread is gone: nothing will read these.
                Err(_) => {
                    self.app_eof = true;
                    self.to_app_at = self.to_app.len();
                }
            }
        }
        if self.app_eof {
            self.to_app_at = self.to_app.len();
        }
        if self.net_eof && self.to_app_at == self.to_app.len() && !self.app_write_closed {
            let _ = self.app.shutdown(std::net::Shutdown::Write);
            self.app_write_closed = true;
        }
        Ok(())
    }

    /// Reads what the server's workers wrote.
    fn read_app(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        match self.app.read(buf) {
            Ok(0) => self.app_eof = true,
            Ok(n) => {
                self.from_app.clear();
                self.from_app
                    .extend_from_slice(buf.get(..n).unwrap_or_default());
                self.from_app_at = 0;
                self.app_to_tls();
            }
            Err(e) if would_block(&e) || e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => self.app_eof = true,
        }
        Ok(())
    }

    /// Encrypts what the TLS writer accepts of the bytes read from the pair.
    fn app_to_tls(&mut self) {
        while self.from_app_at < self.from_app.len() {
            let rest = self.from_app.get(self.from_app_at..).unwrap_or_default();
            match self.tls.writer().write(rest) {
                Ok(0) | Err(_) => break,
                Ok(n) => self.from_app_at += n,
            }
        }
    }

    /// Sends encrypted bytes; false when the client is gone.
    fn tls_to_net(&mut self) -> std::io::Result<bool> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.net) {
                Ok(_) => {}
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                    ) =>
                {
                    return Ok(false)
                }
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

fn would_block(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock
}
