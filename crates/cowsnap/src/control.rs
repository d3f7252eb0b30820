//! The control socket: how pool commands reach a running daemon.
//!
//! `cowsnap serve` listens on `POOL/control.sock` (mode 0600). A client connects, writes one
//! JSON request on one line, and reads one JSON reply line. When no daemon answers, the
//! commands act on the pool's files directly instead. The protocol is internal to one
//! version of cowsnap; scripts should use the commands' `--json` output.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use cowsnap_core::pool::{CowSpec, SnapshotRequest, VolumeInfo};
use cowsnap_core::units::ChunkSize;
use serde::{Deserialize, Serialize};

/// File name of the control socket inside the pool directory.
pub const CONTROL_SOCKET: &str = "control.sock";

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
}

impl SnapshotSpec {
    /// The core library's request.
    pub fn to_request(&self) -> Result<SnapshotRequest> {
        let chunk_size = self
            .chunk_sectors
            .map(ChunkSize::from_sectors)
            .transpose()
            .context("bad chunk size")?;
        let cow = match (&self.cow_path, self.cow_size) {
            (Some(p), _) => CowSpec::Path(p.clone()),
            (None, Some(s)) => CowSpec::Size(s),
            (None, None) => bail!("give --cow-size or --cow"),
        };
        Ok(SnapshotRequest {
            name: self.name.clone(),
            origin: self.origin.clone(),
            cow,
            chunk_size,
            transient: self.transient,
            overflow: self.overflow,
            format: self.format,
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
}

/// The control socket path of the pool in `dir`.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join(CONTROL_SOCKET)
}

/// Sends `req` to the daemon of the pool in `dir`. `Ok(None)` when no daemon listens.
pub fn call(dir: &Path, req: &Request) -> Result<Option<Reply>> {
    let path = socket_path(dir);
    let mut stream = match UnixStream::connect(&path) {
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
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .with_context(|| format!("writing to {}", path.display()))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .with_context(|| format!("reading from {}", path.display()))?;
    if answer.trim().is_empty() {
        bail!(
            "the daemon at {} closed the connection without answering",
            path.display()
        );
    }
    let reply: Reply = serde_json::from_str(answer.trim())
        .with_context(|| format!("bad reply from the daemon at {}", path.display()))?;
    Ok(Some(reply))
}

/// Reads one request from `stream`, answers it with `handle`, writes the reply.
pub fn serve_one(stream: UnixStream, handle: impl FnOnce(Request) -> Reply) -> Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let reply = match serde_json::from_str::<Request>(line.trim()) {
        Ok(req) => handle(req),
        Err(e) => Reply::error(format!("bad request: {e}")),
    };
    let mut out = serde_json::to_string(&reply)?;
    out.push('\n');
    (&stream).write_all(out.as_bytes())?;
    Ok(())
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
            cow_path: None,
            chunk_sectors: Some(8),
            transient: false,
            overflow: true,
            format: false,
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
    fn no_daemon_means_none() {
        let dir = std::env::temp_dir().join(format!("cowsnap-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(call(&dir, &Request::List).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
