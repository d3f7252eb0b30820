//! `cowsnap layer ...`: the stacks under volumes, as `dmsetup table|status|message` show
//! and drive device-mapper's.
//!
//! `table` and `status` print one line per layer, `VOLUME/INDEX: 0 SECTORS TARGET ARGS`
//! (or `... TARGET STATUS`), bottom first; `message` reaches a running layer through the
//! daemon; `add` and `remove` change a stack offline (the next start builds it).

use std::path::Path;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Result};
use clap::Subcommand;
use cowsnap_pool::{LayerInfo, LayerRequest};

use crate::control::{self, Request};
use crate::volume::{daemon_reply, locked, volumes};

/// The layers a stack can hold, for `--help`.
pub const LAYERS_HELP: &str = "Layers (TARGET ARGS, bottom first):
  linear START SECTORS        a range of the device below (only when a volume is created)
  bbr [SPARES_SIZE [CHUNK]]   bad-block relocation into a spare file the pool makes
                              (origins only; default 1% of the volume, at least 16M; 4K chunks)
  test-error START SECTORS    EIO on reads and writes of that range            (testing)
  test-zero                   reads zeros, drops writes                        (testing)
  test-flakey UP DOWN [FEATURE...]   up then down, in operations (100) or time (250ms);
                              error_reads, error_writes, drop_writes,
                              corrupt_bio_byte NTH r|w VALUE (none: every op fails) (testing)
  test-dust [BLOCK_SECTORS [NBAD BAD...]] [enabled|disabled]  bad blocks as dm-dust (testing)
  test-delay US | READ_US WRITE_US [FLUSH_US]       latency per operation      (testing)";

/// `cowsnap layer ...`
#[derive(Debug, Subcommand)]
pub enum LayerCommand {
    /// Table lines of the layers under every volume, or under VOLUME (`dmsetup table`).
    Table {
        /// Only this volume.
        volume: Option<String>,
        /// JSON output: the volumes' `layers` arrays.
        #[arg(long)]
        json: bool,
    },
    /// Status of the running layers (`dmsetup status`); needs a running daemon.
    Status {
        /// Only this volume.
        volume: Option<String>,
        /// JSON output, with each layer's status fields.
        #[arg(long)]
        json: bool,
    },
    /// Send a message to a running layer (`dmsetup message`).
    ///
    /// LAYER is the layer's position (0 at the bottom) or its target's name. Examples:
    ///   cowsnap layer message vm1 test-dust addbadblock 40
    ///   cowsnap layer message vm1 test-flakey down
    ///   cowsnap layer message vm1 bbr list-unreadable
    Message {
        /// The volume.
        volume: String,
        /// The layer: position or target name.
        layer: String,
        /// The message.
        #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
        words: Vec<String>,
    },
    /// Put a layer on top of a volume's stack (offline: stop the daemon first).
    #[command(after_help = LAYERS_HELP)]
    Add {
        /// The volume (an origin, or a snapshot: its COW's stack).
        volume: String,
        /// The layer, `TARGET ARGS` in one argument (quote it).
        spec: String,
    },
    /// Remove a layer from a volume's stack (offline). A bbr layer that relocated data is
    /// refused unless --force (the volume would read the failing device's stale data).
    Remove {
        /// The volume.
        volume: String,
        /// The layer: position or target name.
        layer: String,
        /// Remove a bbr layer that holds relocations or unreadable sectors anyway.
        #[arg(long)]
        force: bool,
    },
}

/// `cowsnap layer ...`.
pub fn run(dir: &Path, cmd: LayerCommand) -> Result<ExitCode> {
    match cmd {
        LayerCommand::Table { volume, json } => show(dir, volume.as_deref(), json, false),
        LayerCommand::Status { volume, json } => show(dir, volume.as_deref(), json, true),
        LayerCommand::Message {
            volume,
            layer,
            words,
        } => {
            let req = Request::LayerMessage {
                volume,
                layer,
                words,
            };
            let Some(reply) = control::call(dir, &req)? else {
                bail!("no daemon serves this pool: layers run only in `cowsnap serve`");
            };
            let answer = daemon_reply(reply)?.message.unwrap_or_default();
            if !answer.is_empty() {
                println!("{answer}");
            }
            Ok(ExitCode::SUCCESS)
        }
        LayerCommand::Add { volume, spec } => {
            offline(dir)?;
            let req = LayerRequest::parse(&spec)?;
            let (_lock, mut pool) = locked(dir)?;
            let (entry, notes) = pool.add_layer(&volume, &req)?;
            for n in notes {
                eprintln!("cowsnap: warning: {n}");
            }
            println!(
                "added layer {} on top of {volume}; it runs from the next `cowsnap serve`",
                entry.target_name()
            );
            Ok(ExitCode::SUCCESS)
        }
        LayerCommand::Remove {
            volume,
            layer,
            force,
        } => {
            offline(dir)?;
            let (_lock, mut pool) = locked(dir)?;
            for n in pool.remove_layer(&volume, &layer, force)? {
                eprintln!("cowsnap: warning: {n}");
            }
            println!("removed layer {layer} of {volume}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn offline(dir: &Path) -> Result<()> {
    if control::call(dir, &Request::List)?.is_some() {
        bail!("a daemon is serving this pool: stop it to change a stack (stacks change offline)");
    }
    Ok(())
}

fn show(dir: &Path, volume: Option<&str>, json: bool, status: bool) -> Result<ExitCode> {
    let vols = volumes(dir, volume)?;
    if let (Some(v), true) = (volume, vols.is_empty()) {
        bail!("no volume called {v:?}");
    }
    if status
        && vols
            .iter()
            .flat_map(|v| &v.layers)
            .any(|l| l.status.is_none())
    {
        return Err(anyhow!(
            "no daemon serves this pool: layers have a status only while `cowsnap serve` runs (`cowsnap layer table` shows the stacks)"
        ));
    }
    if json {
        let out: Vec<serde_json::Value> = vols
            .iter()
            .map(|v| serde_json::json!({ "volume": v.name, "layers": v.layers }))
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    for v in &vols {
        for l in &v.layers {
            println!("{}", line(&v.name, l, status));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `VOLUME/INDEX: TABLE`, or with `status`, `VOLUME/INDEX: 0 SECTORS TARGET STATUS`.
pub fn line(volume: &str, l: &LayerInfo, status: bool) -> String {
    match (&l.status, status) {
        (Some(st), true) => {
            let head: Vec<&str> = l.table.split_whitespace().take(3).collect();
            format!("{volume}/{}: {} {st}", l.index, head.join(" "))
        }
        _ => format!("{volume}/{}: {}", l.index, l.table),
    }
}
