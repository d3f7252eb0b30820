//! The fixed-newstyle handshake as a sans-IO state machine.
//!
//! [`Handshake`] never touches a socket: the caller sends what [`Handshake::take_output`]
//! returns, feeds whatever the client sent to [`Handshake::push_input`], and calls
//! [`Handshake::advance`] until it reports [`Status::Transmission`] (the client chose an
//! export), [`Status::Aborted`] (the client sent `NBD_OPT_ABORT`, or an option met a server shutting down and got `NBD_REP_ERR_SHUTDOWN`) or an error (a violation
//! that ends the session: unknown client flags, a bad option magic, or an unknown export
//! chosen with `NBD_OPT_EXPORT_NAME`, which cannot be answered with an error).
//!
//! Options handled: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`, `STRUCTURED_REPLY`,
//! `LIST_META_CONTEXT` and `SET_META_CONTEXT` (with the one context `base:allocation`),
//! and `STARTTLS` when the handshake was given a [`TlsMode`] other than `Off`.
//! Every other option, `EXTENDED_HEADERS` included, is answered with
//! `NBD_REP_ERR_UNSUP` after its payload is skipped (without buffering it), so the option
//! stream stays in sync whatever the client sends.
//!
//! TLS follows the specification's server modes. [`TlsMode::Off`] is NOTLS: `STARTTLS`
//! gets `NBD_REP_ERR_UNSUP` and `NBD_REP_ERR_TLS_REQD` is never sent.
//! [`TlsMode::Required`] is FORCEDTLS (qemu-nbd and nbdkit `--tls=require`): before TLS,
//! every option but `STARTTLS` and `ABORT` is skipped and answered `NBD_REP_ERR_TLS_REQD`,
//! and `EXPORT_NAME`, which cannot carry an error, ends the session.
//! [`TlsMode::Optional`] is SELECTIVETLS with no TLS-only export (nbdkit `--tls=on`).
//! `STARTTLS` is acknowledged and reported as [`Status::StartTls`]; the caller then runs
//! the TLS handshake on the socket and calls [`Handshake::tls_started`], which forgets
//! what was negotiated before (structured replies, metadata contexts) as the
//! specification requires, and option haggling goes on inside TLS. A second `STARTTLS`
//! gets `NBD_REP_ERR_INVALID`.

use super::consts::*;
use super::cursor::{Cursor, Truncated};

/// Largest option payload the handshake buffers; known options with a larger payload are
/// skipped and answered with `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;

/// The metadata context id this server gives `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    /// Minimum block size: offsets and lengths must be multiples of it.
    pub min: u32,
    /// Preferred block size.
    pub preferred: u32,
    /// Largest payload of a READ or WRITE (and length of CACHE / WRITE_ZEROES).
    pub max: u32,
}

impl Default for BlockSizes {
    fn default() -> Self {
        BlockSizes {
            min: 512,
            preferred: 4096,
            max: 32 << 20,
        }
    }
}

/// What the handshake needs to know about one export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export name, as clients ask for it.
    pub name: String,
    /// Human-readable description (may be empty).
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Writes are refused.
    pub read_only: bool,
    /// A flush on one connection covers writes acknowledged on every connection.
    pub multi_conn: bool,
}

/// Everything a connection's handshake may offer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Catalog {
    /// The exports, in listing order.
    pub exports: Vec<ExportInfo>,
    /// The export the empty name means; when `None` and there is exactly one export, the
    /// empty name means that one.
    pub default_export: Option<String>,
    /// Block size constraints.
    pub block_sizes: BlockSizes,
}

impl Catalog {
    /// The export a client's name refers to (the empty name is the default export).
    pub fn find(&self, name: &str) -> Option<&ExportInfo> {
        if let Some(e) = self.exports.iter().find(|e| e.name == name) {
            return Some(e);
        }
        if !name.is_empty() {
            return None;
        }
        match &self.default_export {
            Some(d) => self.exports.iter().find(|e| &e.name == d),
            None if self.exports.len() == 1 => self.exports.first(),
            None => None,
        }
    }

    /// Block sizes for one export: the minimum falls back to 1 when the export size is not
    /// a multiple of it (qemu refuses such an export otherwise).
    pub fn block_sizes_for(&self, export: &ExportInfo) -> BlockSizes {
        let mut b = self.block_sizes;
        if b.min > 1 && export.size % u64::from(b.min) != 0 {
            b.min = 1;
        }
        b
    }
}

/// The transmission flags a connection advertises for `export`.
///
/// `SEND_DF` only when structured replies were negotiated (the specification forbids it
/// otherwise); write-related flags are left out for read-only exports.
pub fn transmission_flags(export: &ExportInfo, structured: bool) -> u16 {
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_CACHE;
    if export.read_only {
        f |= FLAG_READ_ONLY;
    } else {
        f |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if structured {
        f |= FLAG_SEND_DF;
    }
    if export.multi_conn {
        f |= FLAG_CAN_MULTI_CONN;
    }
    f
}

/// The outcome of a successful handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Canonical name of the chosen export.
    pub export: String,
    /// Its size in bytes.
    pub size: u64,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Context id of `base:allocation` if it was selected for this export.
    pub base_allocation: Option<u32>,
    /// Block size constraints in force.
    pub block_sizes: BlockSizes,
    /// The client entered with `NBD_OPT_GO` and asked for `NBD_INFO_BLOCK_SIZE`.
    pub block_sizes_requested: bool,
}

/// How a handshake treats TLS: the specification's server modes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// NOTLS: `STARTTLS` is answered `NBD_REP_ERR_UNSUP`.
    #[default]
    Off,
    /// TLS at the client's choice (SELECTIVETLS without TLS-only exports).
    Optional,
    /// FORCEDTLS: nothing but `STARTTLS` and `ABORT` is served before TLS.
    Required,
}

/// What [`Handshake::advance`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// More input is needed; send the pending output first.
    NeedInput,
    /// Transmission starts: send the pending output, then serve requests.
    Transmission(Negotiated),
    /// The client sent `NBD_OPT_ABORT`: send the pending output (an ACK), then close.
    Aborted,
    /// The client sent `NBD_OPT_STARTTLS` and it was acknowledged: send the pending
    /// output, take the bytes already received with [`Handshake::take_leftover`] (they
    /// belong to the TLS handshake), run the TLS handshake, then call
    /// [`Handshake::tls_started`] and feed the decrypted stream. Until then `advance`
    /// keeps reporting this.
    StartTls,
}

/// A client error that ends the session with a hard disconnect.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The client set flags the server did not advertise.
    #[error("client sent unknown handshake flags {0:#x}")]
    BadClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    /// `NBD_OPT_EXPORT_NAME` named no export (it has no way to report an error).
    #[error("client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    /// `NBD_OPT_EXPORT_NAME` before TLS on a server that requires TLS (it has no way to
    /// report an error).
    #[error(
        "client chose an export with NBD_OPT_EXPORT_NAME without TLS, which this server requires"
    )]
    TlsRequired,
    /// `NBD_OPT_EXPORT_NAME` while the server shuts down (it has no way to report an
    /// error).
    #[error("client chose an export with NBD_OPT_EXPORT_NAME while the server shuts down")]
    ShuttingDown,
    /// The handshake already ended.
    #[error("handshake already finished")]
    Finished,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData {
        option: u32,
        len: usize,
    },
    Skip {
        option: u32,
        remaining: u64,
        reply: u32,
    },
    /// `STARTTLS` was acknowledged; waiting for [`Handshake::tls_started`].
    StartingTls,
    Done,
}

/// The server side of a fixed-newstyle handshake.
#[derive(Debug)]
pub struct Handshake {
    catalog: Catalog,
    state: State,
    input: Vec<u8>,
    output: Vec<u8>,
    no_zeroes: bool,
    structured: bool,
    /// Canonical export name `base:allocation` was selected for, if any.
    meta_export: Option<String>,
    tls_mode: TlsMode,
    /// TLS was started: options now arrive through it.
    tls_active: bool,
    /// The server is shutting down: options get `NBD_REP_ERR_SHUTDOWN`.
    shutting_down: bool,
}

/// A malformed option payload.
struct Invalid(&'static str);

impl From<Truncated> for Invalid {
    fn from(_: Truncated) -> Self {
        Invalid("option data is shorter than its fields")
    }
}

fn string(c: &mut Cursor<'_>, len: u32, what: &'static str) -> Result<String, Invalid> {
    let len = len as usize;
    if len > MAX_STRING {
        return Err(Invalid(what));
    }
    let bytes = c.bytes(len)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| Invalid(what))
}

impl Handshake {
    /// A handshake offering `catalog`; the greeting is already in the output.
    pub fn new(catalog: Catalog) -> Self {
        let mut output = Vec::with_capacity(18);
        output.extend_from_slice(&NBDMAGIC.to_be_bytes());
        output.extend_from_slice(&IHAVEOPT.to_be_bytes());
        output.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        Handshake {
            catalog,
            state: State::ClientFlags,
            input: Vec::new(),
            output,
            no_zeroes: false,
            structured: false,
            meta_export: None,
            tls_mode: TlsMode::Off,
            tls_active: false,
            shutting_down: false,
        }
    }

    /// The server began shutting down: every option from now on but `ABORT` is answered
    /// `NBD_REP_ERR_SHUTDOWN` and ends the handshake ([`Status::Aborted`]);
    /// `NBD_OPT_EXPORT_NAME`, which has no error reply, ends it with
    /// [`HandshakeError::ShuttingDown`].
    pub fn shutting_down(&mut self) {
        self.shutting_down = true;
    }

    /// Sets how the handshake treats TLS (default [`TlsMode::Off`]).
    pub fn with_tls(mut self, mode: TlsMode) -> Self {
        self.tls_mode = mode;
        self
    }

    /// Whether TLS was started on this connection.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// Tells the handshake that the TLS handshake after [`Status::StartTls`] succeeded:
    /// option haggling restarts inside TLS, with nothing negotiated before kept.
    /// Does nothing unless `advance` reported [`Status::StartTls`].
    pub fn tls_started(&mut self) {
        if self.state != State::StartingTls {
            return;
        }
        self.tls_active = true;
        self.structured = false;
        self.meta_export = None;
        self.input.clear();
        self.state = State::OptionHeader;
    }

    /// Appends bytes received from the client.
    pub fn push_input(&mut self, data: &[u8]) {
        self.input.extend_from_slice(data);
    }

    /// Takes the bytes to send to the client.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// Takes input received after the handshake ended (early transmission requests).
    pub fn take_leftover(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.input)
    }

    /// Whether the client negotiated structured replies so far.
    pub fn structured(&self) -> bool {
        self.structured
    }

    /// Processes buffered input as far as it goes.
    pub fn advance(&mut self) -> Result<Status, HandshakeError> {
        loop {
            // Each step consumes what its state needs and either moves to the next state
            // (`None`: go on) or stops with a status for the caller.
            let stop = match self.state {
                State::Done => return Err(HandshakeError::Finished),
                State::StartingTls => return Ok(Status::StartTls),
                State::ClientFlags => self.client_flags()?,
                State::OptionHeader => self.option_header()?,
                State::Skip {
                    option,
                    remaining,
                    reply,
                } => self.skip(option, remaining, reply)?,
                State::OptionData { option, len } => self.option_data(option, len)?,
            };
            if let Some(status) = stop {
                return Ok(status);
            }
        }
    }

    /// The client's flags, after the server's greeting.
    fn client_flags(&mut self) -> Result<Option<Status>, HandshakeError> {
        let Some(b) = self.consume(4) else {
            return Ok(Some(Status::NeedInput));
        };
        let Ok(flags) = Cursor::new(&b).u32() else {
            return Ok(Some(Status::NeedInput));
        };
        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            self.state = State::Done;
            return Err(HandshakeError::BadClientFlags(flags));
        }
        self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        self.state = State::OptionHeader;
        Ok(None)
    }

    /// An option's header: refuse it, skip it, or wait for its data.
    fn option_header(&mut self) -> Result<Option<Status>, HandshakeError> {
        let Some(b) = self.consume(16) else {
            return Ok(Some(Status::NeedInput));
        };
        let mut c = Cursor::new(&b);
        let (magic, option, len) = match (c.u64(), c.u32(), c.u32()) {
            (Ok(m), Ok(o), Ok(l)) => (m, o, l),
            _ => return Ok(Some(Status::NeedInput)),
        };
        if magic != IHAVEOPT {
            self.state = State::Done;
            return Err(HandshakeError::BadOptionMagic(magic));
        }
        if let Some((reply, error)) = self.refusal(option) {
            // EXPORT_NAME has no error reply.
            if option == OPT_EXPORT_NAME {
                self.state = State::Done;
                return Err(error);
            }
            self.state = State::Skip {
                option,
                remaining: u64::from(len),
                reply,
            };
            return Ok(None);
        }
        self.state = self.data_state(option, len)?;
        Ok(None)
    }

    /// Options refused before their data is read: during a shutdown, and before TLS where
    /// TLS is required. The error reply, and the error if the option cannot take one.
    fn refusal(&self, option: u32) -> Option<(u32, HandshakeError)> {
        if self.shutting_down && option != OPT_ABORT {
            Some((REP_ERR_SHUTDOWN, HandshakeError::ShuttingDown))
        } else if self.tls_mode == TlsMode::Required
            && !self.tls_active
            && option != OPT_STARTTLS
            && option != OPT_ABORT
        {
            Some((REP_ERR_TLS_REQD, HandshakeError::TlsRequired))
        } else {
            None
        }
    }

    /// The state after an accepted option header of `len` data bytes: read the data of a
    /// known option, skip that of an unknown or oversized one.
    fn data_state(&mut self, option: u32, len: u32) -> Result<State, HandshakeError> {
        let starttls = option == OPT_STARTTLS && self.tls_mode != TlsMode::Off;
        let known = starttls
            || matches!(
                option,
                OPT_EXPORT_NAME
                    | OPT_ABORT
                    | OPT_LIST
                    | OPT_INFO
                    | OPT_GO
                    | OPT_STRUCTURED_REPLY
                    | OPT_LIST_META_CONTEXT
                    | OPT_SET_META_CONTEXT
            );
        let skip = |reply| State::Skip {
            option,
            remaining: u64::from(len),
            reply,
        };
        if !known {
            return Ok(skip(REP_ERR_UNSUP));
        }
        if len > MAX_OPTION_DATA {
            // EXPORT_NAME has no error reply.
            if option == OPT_EXPORT_NAME {
                self.state = State::Done;
                return Err(HandshakeError::UnknownExport(format!(
                    "<name of {len} bytes>"
                )));
            }
            return Ok(skip(REP_ERR_TOO_BIG));
        }
        Ok(State::OptionData {
            option,
            len: len as usize,
        })
    }

    /// Drops a refused option's data as it arrives, then sends its error reply.
    fn skip(
        &mut self,
        option: u32,
        remaining: u64,
        reply: u32,
    ) -> Result<Option<Status>, HandshakeError> {
        let n = usize::try_from(remaining)
            .unwrap_or(usize::MAX)
            .min(self.input.len());
        self.input.drain(..n);
        let remaining = remaining - n as u64;
        if remaining > 0 {
            self.state = State::Skip {
                option,
                remaining,
                reply,
            };
            return Ok(Some(Status::NeedInput));
        }
        let msg = match reply {
            REP_ERR_UNSUP => "option not supported",
            REP_ERR_TLS_REQD => {
                "this server requires TLS: send NBD_OPT_STARTTLS first \
                 (e.g. an nbds:// URI, or qemu's tls-creds)"
            }
            REP_ERR_SHUTDOWN => "the server is shutting down: try again later",
            _ => "option data too large",
        };
        self.reply(option, reply, msg.as_bytes());
        if reply == REP_ERR_SHUTDOWN {
            self.state = State::Done;
            return Ok(Some(Status::Aborted));
        }
        self.state = State::OptionHeader;
        Ok(None)
    }

    /// An option's data, once all of it has arrived.
    fn option_data(&mut self, option: u32, len: usize) -> Result<Option<Status>, HandshakeError> {
        let Some(data) = self.consume(len) else {
            return Ok(Some(Status::NeedInput));
        };
        self.state = State::OptionHeader;
        if let Some(status) = self.option(option, &data)? {
            self.state = if status == Status::StartTls {
                State::StartingTls
            } else {
                State::Done
            };
            return Ok(Some(status));
        }
        Ok(None)
    }

    fn consume(&mut self, n: usize) -> Option<Vec<u8>> {
        if self.input.len() < n {
            return None;
        }
        let rest = self.input.split_off(n);
        Some(std::mem::replace(&mut self.input, rest))
    }

    fn reply(&mut self, option: u32, ty: u32, data: &[u8]) {
        self.output.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
        self.output.extend_from_slice(&option.to_be_bytes());
        self.output.extend_from_slice(&ty.to_be_bytes());
        self.output
            .extend_from_slice(&payload_len(data.len()).to_be_bytes());
        self.output.extend_from_slice(data);
    }

    fn option(&mut self, option: u32, data: &[u8]) -> Result<Option<Status>, HandshakeError> {
        match option {
            OPT_EXPORT_NAME => self.export_name(data).map(Some),
            OPT_ABORT => {
                // The specification asks servers to ignore data sent with ABORT.
                self.reply(option, REP_ACK, &[]);
                Ok(Some(Status::Aborted))
            }
            OPT_LIST => {
                if data.is_empty() {
                    self.list();
                } else {
                    self.reply(option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                }
                Ok(None)
            }
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    self.structured = true;
                    self.reply(option, REP_ACK, &[]);
                } else {
                    self.reply(
                        option,
                        REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                }
                Ok(None)
            }
            OPT_INFO | OPT_GO => Ok(self.info_or_go(option, data)),
            OPT_STARTTLS if self.tls_mode != TlsMode::Off => {
                if !data.is_empty() {
                    self.reply(option, REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data");
                    Ok(None)
                } else if self.tls_active {
                    self.reply(option, REP_ERR_INVALID, b"TLS is already active");
                    Ok(None)
                } else {
                    self.reply(option, REP_ACK, &[]);
                    Ok(Some(Status::StartTls))
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, data);
                Ok(None)
            }
            _ => {
                self.reply(option, REP_ERR_UNSUP, b"option not supported");
                Ok(None)
            }
        }
    }

    fn export_name(&mut self, data: &[u8]) -> Result<Status, HandshakeError> {
        let name = String::from_utf8(data.to_vec())
            .map_err(|_| HandshakeError::UnknownExport(String::from_utf8_lossy(data).into()))?;
        let Some(export) = self.catalog.find(&name).cloned() else {
            return Err(HandshakeError::UnknownExport(name));
        };
        let flags = transmission_flags(&export, self.structured);
        self.output.extend_from_slice(&export.size.to_be_bytes());
        self.output.extend_from_slice(&flags.to_be_bytes());
        if !self.no_zeroes {
            self.output.extend_from_slice(&[0u8; 124]);
        }
        Ok(Status::Transmission(self.negotiated(&export, flags, false)))
    }

    fn negotiated(&self, export: &ExportInfo, flags: u16, requested: bool) -> Negotiated {
        let base_allocation = (self.structured
            && self.meta_export.as_deref() == Some(export.name.as_str()))
        .then_some(BASE_ALLOCATION_ID);
        Negotiated {
            export: export.name.clone(),
            size: export.size,
            flags,
            structured: self.structured,
            base_allocation,
            block_sizes: self.catalog.block_sizes_for(export),
            block_sizes_requested: requested,
        }
    }

    fn list(&mut self) {
        let exports = self.catalog.exports.clone();
        for e in &exports {
            let mut d = Vec::with_capacity(4 + e.name.len() + e.description.len());
            d.extend_from_slice(&payload_len(e.name.len()).to_be_bytes());
            d.extend_from_slice(e.name.as_bytes());
            d.extend_from_slice(e.description.as_bytes());
            self.reply(OPT_LIST, REP_SERVER, &d);
        }
        self.reply(OPT_LIST, REP_ACK, &[]);
    }

    fn info_or_go(&mut self, option: u32, data: &[u8]) -> Option<Status> {
        let parsed = (|| -> Result<(String, Vec<u16>), Invalid> {
            let mut c = Cursor::new(data);
            let len = c.u32()?;
            if len as usize > data.len().saturating_sub(6) {
                return Err(Invalid("export name longer than the option data"));
            }
            let name = string(&mut c, len, "export name is not a valid string")?;
            let n = c.u16()?;
            if c.remaining() != usize::from(n) * 2 {
                return Err(Invalid("information request count does not match the data"));
            }
            let mut requests = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                requests.push(c.u16()?);
            }
            Ok((name, requests))
        })();
        let (name, requests) = match parsed {
            Ok(p) => p,
            Err(Invalid(msg)) => {
                self.reply(option, REP_ERR_INVALID, msg.as_bytes());
                return None;
            }
        };
        let Some(export) = self.catalog.find(&name).cloned() else {
            self.reply(option, REP_ERR_UNKNOWN, b"no such export");
            return None;
        };
        let flags = transmission_flags(&export, self.structured);
        let sizes = self.catalog.block_sizes_for(&export);

        let mut info = Vec::with_capacity(12);
        info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&export.size.to_be_bytes());
        info.extend_from_slice(&flags.to_be_bytes());
        self.reply(option, REP_INFO, &info);

        // Sent whether or not it was asked for: clients ignore what they do not request.
        let mut bs = Vec::with_capacity(14);
        bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        bs.extend_from_slice(&sizes.min.to_be_bytes());
        bs.extend_from_slice(&sizes.preferred.to_be_bytes());
        bs.extend_from_slice(&sizes.max.to_be_bytes());
        self.reply(option, REP_INFO, &bs);

        if requests.contains(&INFO_NAME) || name != export.name {
            let mut d = INFO_NAME.to_be_bytes().to_vec();
            d.extend_from_slice(export.name.as_bytes());
            self.reply(option, REP_INFO, &d);
        }
        if requests.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
            let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(export.description.as_bytes());
            self.reply(option, REP_INFO, &d);
        }
        self.reply(option, REP_ACK, &[]);
        (option == OPT_GO).then(|| {
            Status::Transmission(self.negotiated(
                &export,
                flags,
                requests.contains(&INFO_BLOCK_SIZE),
            ))
        })
    }

    fn meta_context(&mut self, option: u32, data: &[u8]) {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // SET replaces the selection even when it fails.
            self.meta_export = None;
            if !self.structured {
                self.reply(
                    option,
                    REP_ERR_INVALID,
                    b"NBD_OPT_SET_META_CONTEXT needs structured replies first",
                );
                return;
            }
        }
        let parsed = (|| -> Result<(String, Vec<String>), Invalid> {
            let mut c = Cursor::new(data);
            let len = c.u32()?;
            let name = string(&mut c, len, "export name is not a valid string")?;
            let n = c.u32()?;
            let mut queries = Vec::new();
            for _ in 0..n {
                let len = c.u32()?;
                let q = string(&mut c, len, "query is not a valid string")?;
                if !q.contains(':') {
                    return Err(Invalid("query lacks a namespace"));
                }
                queries.push(q);
            }
            if c.remaining() != 0 {
                return Err(Invalid("trailing data after the queries"));
            }
            Ok((name, queries))
        })();
        let (name, queries) = match parsed {
            Ok(p) => p,
            Err(Invalid(msg)) => {
                self.reply(option, REP_ERR_INVALID, msg.as_bytes());
                return;
            }
        };
        let Some(export) = self.catalog.find(&name).cloned() else {
            self.reply(option, REP_ERR_UNKNOWN, b"no such export");
            return;
        };
        let selected = if set {
            queries.iter().any(|q| q == CONTEXT_BASE_ALLOCATION)
        } else {
            queries.is_empty()
                || queries
                    .iter()
                    .any(|q| q == "base:" || q == CONTEXT_BASE_ALLOCATION)
        };
        if selected {
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(CONTEXT_BASE_ALLOCATION.as_bytes());
            self.reply(option, REP_META_CONTEXT, &d);
            if set {
                self.meta_export = Some(export.name.clone());
            }
        }
        self.reply(option, REP_ACK, &[]);
    }
}

/// The length of a reply payload this server built, as the wire's u32.
///
/// Payloads are export names (at most [`MAX_STRING`] bytes, checked by the server when an
/// export is added), descriptions, messages and info records: kilobytes, never 4 GiB.
#[allow(
    clippy::cast_possible_truncation,
    reason = "server-built payloads are far below 4 GiB (see the doc)"
)]
fn payload_len(n: usize) -> u32 {
    debug_assert!(u32::try_from(n).is_ok(), "reply payload of {n} bytes");
    n as u32
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small constants"
)]
mod tests;
#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small constants"
)]
mod tls_tests;
