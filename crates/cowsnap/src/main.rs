//! `cowsnap`: the command line of cowsnap, userspace copy-on-write snapshots of block
//! devices compatible with the Linux kernel's dm-snapshot.
//!
//! Each group of subcommands lives in its own module and owns its clap definitions; this
//! file only dispatches. Errors travel as `anyhow::Error` up to `main`, which prints them
//! and exits 2 (clap's own usage errors exit 2 too). A subcommand that answers a yes/no
//! question (such as `cow check`) returns its exit code itself: 0 yes, 1 no.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod control;
#[cfg(test)]
mod control_fuzz;
mod cow;
mod layer;
mod merge;
mod serve;
mod tcp;
mod volume;

/// Userspace copy-on-write snapshots of block devices (dm-snapshot compatible).
#[derive(Debug, Parser)]
#[command(name = "cowsnap", version, about, propagate_version = true)]
struct Cli {
    /// The pool directory: image files and their table (default: $COWSNAP_POOL).
    #[arg(long, global = true, env = "COWSNAP_POOL", value_name = "DIR")]
    pool: Option<PathBuf>,
    /// How long pool commands wait for a running daemon's answer, in seconds.
    #[arg(
        long,
        global = true,
        env = "COWSNAP_TIMEOUT",
        value_name = "SECS",
        default_value_t = control::DEFAULT_TIMEOUT.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

/// Top-level subcommands. New groups (pool, origin, snapshot, serve) are added here, each
/// as a variant holding its own subcommand enum from its own module.
#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new, empty pool in --pool DIR.
    Init,
    /// Create or add origins (offline: stop the daemon first).
    #[command(subcommand)]
    Origin(volume::OriginCommand),
    /// Create or remove snapshots (live when a daemon serves the pool).
    #[command(subcommand)]
    Snapshot(volume::SnapshotCommand),
    /// List the pool's volumes.
    List {
        /// JSON output (an array of volume objects, see docs/cli.md).
        #[arg(long)]
        json: bool,
    },
    /// Kernel-style status lines (`NAME: 0 SECTORS snapshot ALLOCATED/TOTAL METADATA`).
    Status {
        /// Only this volume.
        name: Option<String>,
        /// JSON output: adds paths, chunk size, store type and usage.
        #[arg(long)]
        json: bool,
    },
    /// Pause, resume, rate-limit or show a merge (`cowsnap snapshot merge` starts one).
    #[command(subcommand)]
    Merge(merge::MergeCommand),
    /// Export every volume over NBD until SIGTERM or SIGINT.
    Serve(serve::ServeArgs),
    /// Inspect, check and export persistent COW devices (the kernel's `P`/`PO` format).
    #[command(subcommand)]
    Cow(cow::CowCommand),
    /// The stacks of layers under volumes (bbr, linear, test-*): table, status, message,
    /// add, remove.
    #[command(subcommand)]
    Layer(layer::LayerCommand),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // One line, not clap's usage screen.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("bad arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("cowsnap: error: {first} (see 'cowsnap --help')");
            return ExitCode::from(2);
        }
    };
    control::set_timeout(std::time::Duration::from_secs(cli.timeout));
    let pool = || volume::pool_dir(cli.pool.as_deref());
    let result = match cli.command {
        Command::Init => pool().and_then(|d| volume::init(&d)),
        Command::Origin(cmd) => pool().and_then(|d| volume::origin(&d, cmd)),
        Command::Snapshot(cmd) => pool().and_then(|d| volume::snapshot(&d, cmd)),
        Command::List { json } => pool().and_then(|d| volume::list(&d, json)),
        Command::Status { name, json } => {
            pool().and_then(|d| volume::status(&d, name.as_deref(), json))
        }
        Command::Merge(cmd) => pool().and_then(|d| merge::run(&d, cmd)),
        Command::Serve(args) => pool().and_then(|d| serve::run(&d, args)),
        Command::Cow(cmd) => cow::run(cmd),
        Command::Layer(cmd) => pool().and_then(|d| layer::run(&d, cmd)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cowsnap: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
