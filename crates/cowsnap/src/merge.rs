//! Merge commands: `snapshot merge NAME` (roll the origin back to the snapshot) and
//! `merge pause|resume|rate|status NAME`.
//!
//! With a running daemon they go through the control socket and act on the live pool;
//! without one they record the request in the manifest and the next `serve` acts on it
//! (a merge never runs without a daemon to serve the origin while it moves data).

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand};
use cowsnap_core::copy::Copier;
use cowsnap_core::units::parse_size;
use cowsnap_pool::{MergeAction, MergeInfo};

use crate::control::{self, Request};
use crate::volume::{daemon_reply, human, locked};

/// A rate: bytes per second with K/M/G suffixes; `0`, `none` or `unlimited` is 0, no limit.
fn rate_arg(s: &str) -> Result<u64, String> {
    match s {
        "none" | "unlimited" => Ok(0),
        _ => parse_size(s.trim_end_matches("/s")),
    }
}

/// A rate argument as the engine takes it: 0 is no limit.
fn limit(rate: u64) -> Option<u64> {
    (rate > 0).then_some(rate)
}

/// Arguments of `snapshot merge`.
#[derive(Debug, Args)]
pub struct SnapshotMerge {
    /// The snapshot to merge. Persistent (P, PO) and valid snapshots only.
    name: String,
    /// Merge now even if the origin or the snapshot has NBD clients: they see the origin's
    /// content change to the snapshot's under them. Without it such a merge is recorded
    /// and starts at the daemon's next start (as lvm2 defers the merge of an open origin).
    #[arg(long)]
    now: bool,
    /// Wait until the merge is done, with a progress line on a terminal.
    #[arg(long)]
    wait: bool,
    /// Switch the origin to the snapshot's content but move no data until
    /// `cowsnap merge resume NAME`.
    #[arg(long, conflicts_with = "wait")]
    paused: bool,
    /// Limit the merge to this many bytes per second (K/M/G suffixes, e.g. 50M).
    #[arg(long, value_parser = rate_arg)]
    rate: Option<u64>,
    /// Print the merge's status as JSON.
    #[arg(long)]
    json: bool,
}

/// `cowsnap merge ...`
#[derive(Debug, Subcommand)]
pub enum MergeCommand {
    /// Stop moving data after the batch under way; the origin keeps showing the snapshot.
    Pause {
        /// The merging snapshot.
        name: String,
    },
    /// Go on with a paused merge, or retry one that failed once its cause is repaired.
    Resume {
        /// The merging snapshot.
        name: String,
    },
    /// Limit a merge's rate (bytes per second, K/M/G suffixes; 0 or `none`: no limit).
    Rate {
        /// The merging snapshot.
        name: String,
        /// The rate, e.g. 50M.
        #[arg(value_parser = rate_arg)]
        rate: u64,
    },
    /// Show a merge's progress.
    Status {
        /// The merging snapshot.
        name: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

/// One line a person reads: state, percent, what is left.
fn describe(m: &MergeInfo) -> String {
    let mut s = format!(
        "merge of {} into {}: {} {:.1}%",
        m.snapshot, m.origin, m.state, m.percent
    );
    if m.remaining > 0 {
        s.push_str(&format!(", {} chunks left", m.remaining));
    }
    if let Some(r) = m.rate {
        s.push_str(&format!(", limited to {}/s", human(r)));
    }
    if let Some(why) = &m.reason {
        s.push_str(&format!(" ({why})"));
    }
    s
}

/// The merge status of snapshot `name` from the daemon; `None` once the snapshot is gone
/// (its merge finished and removed it).
fn live_status(dir: &Path, name: &str) -> Result<Option<MergeInfo>> {
    let Some(reply) = control::call(dir, &Request::Status { name: name.into() })? else {
        bail!("the daemon stopped while waiting for the merge; it resumes at the next start");
    };
    if !reply.ok {
        return Ok(None);
    }
    Ok(reply.volumes.into_iter().next().and_then(|v| v.merge))
}

/// Waits for the merge of `name` to end, printing progress on a terminal.
fn wait(dir: &Path, name: &str, json: bool) -> Result<ExitCode> {
    let tty = std::io::stderr().is_terminal() && !json;
    loop {
        match live_status(dir, name)? {
            None => {
                if tty {
                    eprintln!();
                }
                if json {
                    println!("{{\"snapshot\": {name:?}, \"state\": \"done\", \"percent\": 100.0}}");
                } else {
                    println!("merged snapshot {name}: the origin holds its content; the snapshot is removed");
                }
                return Ok(ExitCode::SUCCESS);
            }
            Some(m) => match m.state.as_str() {
                "failed" => {
                    if tty {
                        eprintln!();
                    }
                    bail!(
                        "{} (fix the cause, then `cowsnap merge resume {name}`)",
                        describe(&m)
                    );
                }
                "paused" | "next_activation" | "stopped" => {
                    if tty {
                        eprintln!();
                    }
                    bail!("{}: nothing moves until it is resumed", describe(&m));
                }
                _ => {
                    if tty {
                        eprint!("\r{}   ", describe(&m));
                    }
                }
            },
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `cowsnap snapshot merge`.
pub fn start(dir: &Path, a: SnapshotMerge) -> Result<ExitCode> {
    let rate = a.rate.and_then(limit);
    let req = Request::MergeSnapshot {
        name: a.name.clone(),
        now: a.now,
        paused: a.paused,
        rate,
    };
    let (info, warning, live) = match control::call(dir, &req)? {
        Some(reply) => {
            let r = daemon_reply(reply)?;
            let info = r
                .merge
                .ok_or_else(|| anyhow!("the daemon sent no merge status"))?;
            (info, r.warning, true)
        }
        None => {
            if a.wait {
                bail!("no daemon serves the pool: the merge would start at the next `cowsnap serve`, so --wait cannot wait for it");
            }
            let (_lock, mut pool) = locked(dir)?;
            pool.request_merge(&a.name, Arc::new(Copier::default()), a.paused, rate)?;
            let info = pool
                .list_offline(Arc::new(Copier::default()), Some(&a.name))?
                .pop()
                .and_then(|v| v.merge)
                .ok_or_else(|| anyhow!("snapshot vanished"))?;
            (info, None, false)
        }
    };
    if let Some(w) = &warning {
        eprintln!("cowsnap: warning: {w}");
    }
    if a.json && !a.wait {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else if !live {
        println!(
            "merge of snapshot {} into {} recorded: it starts when `cowsnap serve` next serves the pool",
            info.snapshot, info.origin
        );
    } else if info.state == "next_activation" {
        println!(
            "merge of snapshot {} into {} deferred to the daemon's next start",
            info.snapshot, info.origin
        );
    } else {
        println!(
            "merging snapshot {} into {}: the origin shows the snapshot's content now",
            info.snapshot, info.origin
        );
    }
    if a.wait {
        if info.state == "next_activation" {
            bail!("the merge waits for the daemon's next start; pass --now to merge while the origin is in use");
        }
        return wait(dir, &a.name, a.json);
    }
    Ok(ExitCode::SUCCESS)
}

/// `cowsnap merge ...`.
pub fn run(dir: &Path, cmd: MergeCommand) -> Result<ExitCode> {
    let (name, action) = match cmd {
        MergeCommand::Status { name, json } => {
            let vols = match control::call(dir, &Request::Status { name: name.clone() })? {
                Some(reply) => daemon_reply(reply)?.volumes,
                None => {
                    let (_lock, pool) = locked(dir)?;
                    pool.list_offline(Arc::new(Copier::default()), Some(&name))?
                }
            };
            let m = vols
                .into_iter()
                .next()
                .and_then(|v| v.merge)
                .ok_or_else(|| anyhow!("snapshot {name:?} is not merging"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                println!("{}", describe(&m));
            }
            return Ok(ExitCode::SUCCESS);
        }
        MergeCommand::Pause { name } => (name, MergeAction::Pause),
        MergeCommand::Resume { name } => (name, MergeAction::Resume),
        MergeCommand::Rate { name, rate } => (name, MergeAction::Rate(limit(rate))),
    };
    let req = Request::MergeControl {
        name: name.clone(),
        action,
    };
    match control::call(dir, &req)? {
        Some(reply) => {
            let m = daemon_reply(reply)?
                .merge
                .ok_or_else(|| anyhow!("the daemon sent no merge status"))?;
            println!("{}", describe(&m));
        }
        None => {
            let (_lock, mut pool) = locked(dir)?;
            let r = pool.control_merge(&name, action)?;
            println!(
                "merge of {name} recorded as {}{}: it takes effect when `cowsnap serve` runs it",
                if r.paused { "paused" } else { "running" },
                r.rate
                    .map(|r| format!(", limited to {}/s", human(r)))
                    .unwrap_or_default()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
