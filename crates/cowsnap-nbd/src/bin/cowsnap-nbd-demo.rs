//! A tiny NBD server for trying the protocol layer by hand and for tests that need a
//! separate process (socket activation by `nbdinfo -- [ ... ]`).
//!
//! ```text
//! cowsnap-nbd-demo [--unix PATH] [--tcp HOST:PORT] [--mem NAME=SIZE]... [--file NAME=PATH]...
//!                  [--ro NAME]... [--description NAME=TEXT]... [--workers N] [--verbose]
//!                  [--stdin-eof-stops]
//! ```
//! With no `--unix`/`--tcp`, the listening sockets come from socket activation. SIZE takes
//! K/M/G suffixes. The server runs until it is killed or its standard input reaches end of
//! file (when `--stdin-eof-stops` is given), then shuts down cleanly.

use std::io::Read;
use std::process::ExitCode;
use std::sync::Arc;

use cowsnap_core::dev::{FileDevice, MemDevice};
use cowsnap_nbd::{activation, DeviceExport, Server, ServerConfig};

fn size(s: &str) -> Option<u64> {
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

fn pair(s: &str) -> Result<(&str, &str), String> {
    s.split_once('=')
        .ok_or_else(|| format!("expected NAME=VALUE, got {s:?}"))
}

fn run() -> Result<(), String> {
    let mut unix = Vec::new();
    let mut tcp = Vec::new();
    let mut exports: Vec<(String, DeviceExport)> = Vec::new();
    let mut read_only = Vec::new();
    let mut descriptions = Vec::new();
    let mut verbose = false;
    let mut workers = None;
    let mut stdin_stops = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--unix" => unix.push(val()?),
            "--tcp" => tcp.push(val()?),
            "--mem" => {
                let v = val()?;
                let (name, sz) = pair(&v)?;
                let sz = size(sz).ok_or_else(|| format!("bad size {sz:?}"))?;
                exports.push((name.into(), DeviceExport::memory(MemDevice::new(sz))));
            }
            "--file" => {
                let v = val()?;
                let (name, path) = pair(&v)?;
                let dev = FileDevice::open(path).map_err(|e| e.to_string())?;
                exports.push((
                    name.into(),
                    DeviceExport::file(dev).map_err(|e| e.to_string())?,
                ));
            }
            "--ro" => read_only.push(val()?),
            "--description" => {
                let v = val()?;
                let (n, t) = pair(&v)?;
                descriptions.push((n.to_string(), t.to_string()));
            }
            "--workers" => {
                let v = val()?;
                workers = Some(
                    v.parse::<usize>()
                        .map_err(|_| format!("bad --workers {v:?}"))?,
                );
            }
            "--verbose" => verbose = true,
            "--stdin-eof-stops" => stdin_stops = true,
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    if exports.is_empty() {
        return Err("no exports: give --mem NAME=SIZE or --file NAME=PATH".into());
    }
    let mut config = ServerConfig::default();
    if let Some(w) = workers {
        config.workers = w;
    }
    if verbose {
        config.log = Some(Arc::new(|m: &str| eprintln!("cowsnap-nbd-demo: {m}")));
    }
    let server = Server::new(config);
    for (name, mut e) in exports {
        if read_only.contains(&name) {
            e = e.read_only(true);
        }
        if let Some((_, d)) = descriptions.iter().find(|(n, _)| *n == name) {
            e = e.description(d.clone());
        }
        server
            .add_export(name, Arc::new(e))
            .map_err(|e| e.to_string())?;
    }
    if unix.is_empty() && tcp.is_empty() {
        let listeners = activation::listeners_from_env().map_err(|e| e.to_string())?;
        if listeners.is_empty() {
            return Err("no --unix/--tcp given and not socket-activated".into());
        }
        for l in listeners {
            server.listen(l).map_err(|e| e.to_string())?;
        }
    }
    for p in &unix {
        server.listen_unix(p).map_err(|e| format!("{p}: {e}"))?;
    }
    for a in &tcp {
        let addr = server.listen_tcp(a).map_err(|e| format!("{a}: {e}"))?;
        println!("listening on tcp:{addr}");
    }
    if stdin_stops {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    } else {
        loop {
            std::thread::park();
        }
    }
    server.shutdown().map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cowsnap-nbd-demo: {e}");
            ExitCode::FAILURE
        }
    }
}
