//! systemd socket activation: listening sockets inherited as fds 3, 4, ...
//!
//! The protocol: the parent sets `LISTEN_PID` to the server's pid and `LISTEN_FDS` to the
//! number of sockets passed from fd 3 on (`LISTEN_FDNAMES` optionally names them).
//! [`parse_listen_env`] checks those variables (a pure function); [`listeners_from_env`]
//! takes the sockets. Turning a raw fd into a socket object needs `unsafe` code, which
//! this crate forbids, so that one step goes through the `listenfd` crate (which also
//! checks that each fd really is a listening stream socket of the right family, marks it
//! close-on-exec and removes `LISTEN_PID`/`LISTEN_FDS` from the environment).
//!
//! libnbd's tools run a server this way: `nbdinfo -- [ server args ]`.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::server::Listener;

/// The first inherited fd.
pub const LISTEN_FDS_START: i32 = 3;

/// Socket activation variables that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivationError {
    /// `LISTEN_FDS` is not a number.
    #[error("LISTEN_FDS={0:?} is not a number of file descriptors")]
    BadCount(String),
    /// `LISTEN_PID` is not a number.
    #[error("LISTEN_PID={0:?} is not a process id")]
    BadPid(String),
    /// The sockets were already taken by an earlier call.
    #[error("the socket activation file descriptors were already taken")]
    AlreadyTaken,
    /// An inherited fd is neither a Unix nor a TCP stream listener.
    #[error("inherited fd {fd} is not a listening stream socket: {reason}")]
    NotASocket {
        /// The fd.
        fd: i32,
        /// Why.
        reason: String,
    },
}

/// How many sockets were passed to process `my_pid`, given the values of `LISTEN_PID` and
/// `LISTEN_FDS`; `None` when the process was not socket-activated (variables absent or
/// meant for another process, as when a parent's environment leaks to a child).
pub fn parse_listen_env(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    my_pid: u32,
) -> Result<Option<usize>, ActivationError> {
    let (Some(pid), Some(fds)) = (listen_pid, listen_fds) else {
        return Ok(None);
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadPid(pid.into()))?;
    if pid != my_pid {
        return Ok(None);
    }
    let n: usize = fds
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadCount(fds.into()))?;
    if n > 1024 {
        return Err(ActivationError::BadCount(fds.into()));
    }
    Ok((n > 0).then_some(n))
}

static TAKEN: AtomicBool = AtomicBool::new(false);

/// Whether this process was socket-activated (without taking the sockets).
pub fn is_socket_activated() -> bool {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    matches!(
        parse_listen_env(pid.as_deref(), fds.as_deref(), std::process::id()),
        Ok(Some(_))
    )
}

/// Takes the listening sockets passed by socket activation (empty when there are none).
/// Only the first call can take them. Call it early in `main`, before other threads run:
/// it removes `LISTEN_PID` and `LISTEN_FDS` from the environment, which is not safe to do
/// while another thread reads the environment.
pub fn listeners_from_env() -> Result<Vec<Listener>, ActivationError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let Some(n) = parse_listen_env(pid.as_deref(), fds.as_deref(), std::process::id())? else {
        return Ok(Vec::new());
    };
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(ActivationError::AlreadyTaken);
    }
    let mut fdset = listenfd::ListenFd::from_env();
    let mut out = Vec::with_capacity(n);
    for i in 0..n.min(fdset.len()) {
        // LISTEN_FDS comes from the environment: stop at an fd number no int can hold.
        let Some(fd) = i32::try_from(i)
            .ok()
            .and_then(|i| LISTEN_FDS_START.checked_add(i))
        else {
            break;
        };
        let unix_err = match fdset.take_unix_listener(i) {
            Ok(Some(l)) => {
                out.push(Listener::Unix {
                    listener: l,
                    path: None,
                });
                continue;
            }
            Ok(None) => continue,
            Err(e) => e,
        };
        match fdset.take_tcp_listener(i) {
            Ok(Some(l)) => {
                let _ = l.set_nonblocking(true);
                out.push(Listener::Tcp(l));
            }
            Ok(None) => {}
            Err(e) => {
                return Err(ActivationError::NotASocket {
                    fd,
                    reason: format!("{unix_err}; {e}"),
                })
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_env_is_parsed_strictly() {
        assert_eq!(parse_listen_env(None, None, 10), Ok(None));
        assert_eq!(parse_listen_env(Some("10"), None, 10), Ok(None));
        assert_eq!(parse_listen_env(None, Some("1"), 10), Ok(None));
        assert_eq!(parse_listen_env(Some("10"), Some("1"), 10), Ok(Some(1)));
        assert_eq!(parse_listen_env(Some("10"), Some("3"), 10), Ok(Some(3)));
        assert_eq!(parse_listen_env(Some("10"), Some("0"), 10), Ok(None));
        // Meant for another process.
        assert_eq!(parse_listen_env(Some("11"), Some("1"), 10), Ok(None));
        assert_eq!(
            parse_listen_env(Some("x"), Some("1"), 10),
            Err(ActivationError::BadPid("x".into()))
        );
        assert_eq!(
            parse_listen_env(Some("10"), Some("-1"), 10),
            Err(ActivationError::BadCount("-1".into()))
        );
        assert_eq!(
            parse_listen_env(Some("10"), Some("99999"), 10),
            Err(ActivationError::BadCount("99999".into()))
        );
    }

    #[test]
    fn no_activation_means_no_listeners() {
        // The test process is not socket-activated (LISTEN_PID, if inherited, is not ours).
        assert!(!is_socket_activated());
        assert!(listeners_from_env().unwrap().is_empty());
    }
}
