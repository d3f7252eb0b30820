//! Serving over TCP safely: the `serve` TLS flags, the refusal to expose volumes in plain
//! text on a network, and the URIs printed for TCP listeners.
//!
//! Anyone who can reach an NBD port reads and writes every volume, so `serve` refuses to
//! listen on a non-loopback address unless TLS is required (`--tls-creds DIR`, with
//! `--tls require`, the default when credentials are given) or the user says
//! `--insecure`. TLS applies to TCP connections only; the unix sockets stay guarded by
//! their file mode (0600). `--tls-verify-peer` additionally requires every client to
//! present a certificate signed by `DIR/ca-cert.pem`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use cowsnap_nbd::codec::TlsMode;
use cowsnap_nbd::server::tls::TlsConfig;

/// Whether TCP clients must use TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TlsPolicy {
    /// No TLS: NBD_OPT_STARTTLS is refused.
    Off,
    /// TLS when the client asks for it; plain text clients are served too.
    On,
    /// Every TCP client must start TLS before anything else (like qemu-nbd and
    /// `nbdkit --tls=require`).
    Require,
}

/// The TLS flags of `serve`.
#[derive(Debug, Args)]
pub struct TlsArgs {
    /// TLS credentials for TCP connections: a directory with server-cert.pem,
    /// server-key.pem and (for --tls-verify-peer) ca-cert.pem, as for qemu's
    /// `--object tls-creds-x509,dir=DIR`.
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// Whether TCP clients must use TLS. Default: require with --tls-creds, else off.
    #[arg(long, value_enum, value_name = "POLICY")]
    pub tls: Option<TlsPolicy>,
    /// Refuse TLS clients without a certificate signed by DIR/ca-cert.pem.
    #[arg(long, requires = "tls_creds")]
    pub tls_verify_peer: bool,
    /// Allow listening on a non-loopback TCP address without required TLS: anyone who
    /// can reach the port reads and writes every volume.
    #[arg(long)]
    pub insecure: bool,
}

impl TlsArgs {
    /// The effective policy.
    pub fn policy(&self) -> TlsPolicy {
        self.tls.unwrap_or(if self.tls_creds.is_some() {
            TlsPolicy::Require
        } else {
            TlsPolicy::Off
        })
    }

    /// The server's TLS settings, loading the credentials.
    pub fn config(&self) -> Result<Option<TlsConfig>> {
        let policy = self.policy();
        let Some(dir) = &self.tls_creds else {
            if policy != TlsPolicy::Off {
                bail!(
                    "--tls {}: TLS needs credentials: give --tls-creds DIR (server-cert.pem, \
                     server-key.pem, ca-cert.pem)",
                    policy_word(policy)
                );
            }
            return Ok(None);
        };
        let mode = match policy {
            TlsPolicy::Off => {
                if self.tls_verify_peer {
                    bail!("--tls-verify-peer needs TLS: drop --tls off");
                }
                return Ok(None);
            }
            TlsPolicy::On => TlsMode::Optional,
            TlsPolicy::Require => TlsMode::Required,
        };
        let config = TlsConfig::from_dir(dir, self.tls_verify_peer)
            .with_context(|| format!("loading TLS credentials from {}", dir.display()))?;
        Ok(Some(config.with_mode(mode)))
    }

    /// Refuses a TCP listener on a non-loopback address unless TLS is required or the
    /// user said `--insecure`. `what` names the listener in the error.
    pub fn check_exposure(&self, what: &str, addrs: &[SocketAddr]) -> Result<()> {
        if self.policy() == TlsPolicy::Require || self.insecure {
            return Ok(());
        }
        if let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback()) {
            bail!(
                "{what}: refusing to serve every volume to anyone who can reach {a} without \
                 TLS; give --tls-creds DIR (TLS required; add --tls-verify-peer to require \
                 client certificates), listen on a loopback address, or pass --insecure if \
                 the network is trusted"
            );
        }
        Ok(())
    }
}

fn policy_word(p: TlsPolicy) -> &'static str {
    match p {
        TlsPolicy::Off => "off",
        TlsPolicy::On => "on",
        TlsPolicy::Require => "require",
    }
}

/// Every address a `HOST:PORT` listen argument resolves to.
pub fn resolve(host_port: &str) -> Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = host_port
        .to_socket_addrs()
        .with_context(|| format!("--listen tcp:{host_port}: cannot resolve the address"))?
        .collect();
    if addrs.is_empty() {
        bail!("--listen tcp:{host_port}: the name resolves to no address");
    }
    Ok(addrs)
}

/// The machine's host name, if it has a usable one.
fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty() && name != "(none)" && name != "localhost").then(|| name.to_string())
}

fn host_port(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// URIs (with `{NAME}` for the export) a client can use for a TCP listener bound to
/// `bound`: `nbds://` when TLS is on. A wildcard bind is shown as the loopback address
/// and the host's name, never as `0.0.0.0`.
pub fn uris(bound: SocketAddr, tls: bool) -> Vec<String> {
    let scheme = if tls { "nbds" } else { "nbd" };
    let port = bound.port();
    let mut hosts = Vec::new();
    if bound.ip().is_unspecified() {
        let lo = match bound.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        hosts.push(host_port(lo, port));
        if let Some(h) = host_name() {
            hosts.push(format!("{h}:{port}"));
        }
    } else {
        hosts.push(host_port(bound.ip(), port));
    }
    hosts
        .into_iter()
        .map(|h| format!("{scheme}://{h}/{{NAME}}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(creds: bool, tls: Option<TlsPolicy>, insecure: bool) -> TlsArgs {
        TlsArgs {
            tls_creds: creds.then(|| PathBuf::from("/nonexistent")),
            tls,
            tls_verify_peer: false,
            insecure,
        }
    }

    #[test]
    fn plain_text_on_a_network_address_needs_insecure() {
        let any: SocketAddr = "0.0.0.0:10809".parse().unwrap();
        let lo: SocketAddr = "127.0.0.1:10809".parse().unwrap();
        let lo6: SocketAddr = "[::1]:10809".parse().unwrap();
        let a = args(false, None, false);
        assert!(a.check_exposure("tcp:x", &[lo, lo6]).is_ok());
        let e = a
            .check_exposure("tcp:x", &[any])
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("--tls-creds") && e.contains("--insecure")));
        assert!(args(false, None, true).check_exposure("x", &[any]).is_ok());
        assert!(args(true, None, false).check_exposure("x", &[any]).is_ok());
        // TLS at the client's choice still lets plain-text clients in.
        assert!(args(true, Some(TlsPolicy::On), false)
            .check_exposure("x", &[any])
            .is_err());
    }

    #[test]
    fn tls_without_credentials_is_an_error() {
        let e = args(false, Some(TlsPolicy::Require), false).config().err();
        assert!(e.is_some_and(|e| e.to_string().contains("--tls-creds")));
        assert!(args(false, None, false).config().is_ok_and(|c| c.is_none()));
    }

    #[test]
    fn uris_never_show_the_wildcard_address() {
        let any: SocketAddr = "0.0.0.0:10809".parse().unwrap();
        let u = uris(any, true);
        assert_eq!(
            u.first().map(String::as_str),
            Some("nbds://127.0.0.1:10809/{NAME}")
        );
        assert!(u.iter().all(|u| !u.contains("0.0.0.0")));
        let any6: SocketAddr = "[::]:10809".parse().unwrap();
        assert_eq!(
            uris(any6, false).first().map(String::as_str),
            Some("nbd://[::1]:10809/{NAME}")
        );
        let one: SocketAddr = "192.0.2.7:99".parse().unwrap();
        assert_eq!(
            uris(one, false),
            vec!["nbd://192.0.2.7:99/{NAME}".to_string()]
        );
    }
}
