//! `cowsnap cow ...`: tools for persistent COW devices, thin wrappers over
//! `cowsnap_core::exception::persistent::inspect`.
//!
//! * `check COW [--index DIR] [--json]`: exit 0 when clean, 1 with findings (listed), 2
//!   when the file cannot be read at all; with `--index`, the exception index kept for the
//!   COW too;
//! * `dump COW [--json]`: header, areas and exceptions;
//! * `export --origin ORIGIN --cow COW --output IMAGE`: the snapshot's view as a raw image,
//!   with a progress line when stderr is a terminal.
//!
//! The COW and the origin are opened read-only: none of these commands changes them.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use cowsnap_core::dev::{BlockDevice, FileDevice};
use cowsnap_core::exception::index::check::{self as index_check, SidecarState};
use cowsnap_core::exception::index::Fingerprinter;
use cowsnap_core::exception::persistent::format::{
    self, Geometry, HeaderState, BBR_MAGIC, SNAP_MAGIC,
};
use cowsnap_core::exception::persistent::inspect::{self, CheckReport, Dump};
use cowsnap_core::exception::persistent::read;
use cowsnap_core::exception::Resume;
use serde::Serialize;

/// Subcommands of `cowsnap cow`.
#[derive(Debug, Subcommand)]
pub enum CowCommand {
    /// Validate a COW device: exit 0 when clean, 1 with findings.
    Check {
        /// The COW file or block device.
        cow: PathBuf,
        /// Also check the exception index kept for this COW in DIR (a pool keeps it in
        /// POOL/index/SNAPSHOT): every page, and every exception against the COW. A
        /// missing or stale index is only reported (the next activation rebuilds it); one
        /// that activation would use but that differs from the COW is a finding.
        #[arg(long, value_name = "DIR")]
        index: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the header, metadata areas and exceptions of a COW device.
    Dump {
        /// The COW file or block device.
        cow: PathBuf,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the snapshot's view (origin + COW) to a raw image.
    Export {
        /// The origin device or image the snapshot was taken of.
        #[arg(long)]
        origin: PathBuf,
        /// The COW device or image.
        #[arg(long)]
        cow: PathBuf,
        /// The image to write (created, or an existing block device).
        #[arg(long)]
        output: PathBuf,
    },
}

/// Runs one `cow` subcommand.
pub fn run(cmd: CowCommand) -> Result<ExitCode> {
    match cmd {
        CowCommand::Check { cow, index, json } => check(&cow, index.as_deref(), json),
        CowCommand::Dump { cow, json } => dump(&cow, json),
        CowCommand::Export {
            origin,
            cow,
            output,
        } => export(&origin, &cow, &output),
    }
}

fn open_ro(path: &Path) -> Result<FileDevice> {
    FileDevice::open_read_only(path).with_context(|| format!("cannot open {}", path.display()))
}

#[derive(Serialize)]
struct CheckJson<'a> {
    clean: bool,
    #[serde(flatten)]
    report: &'a CheckReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<&'a SidecarState>,
}

/// The sidecar in `dir` checked against the COW `dev` (whose header is valid).
fn check_index(dev: &FileDevice, path: &Path, dir: &Path) -> Result<SidecarState> {
    let raw = read::read_raw_header(dev)?;
    let HeaderState::Formatted {
        valid: true,
        chunk_size,
    } = format::check_header_any(&raw, &dev.describe())?.1
    else {
        bail!("the COW has no valid header: its index cannot be checked");
    };
    let geo = Geometry::new(chunk_size);
    let mut entries = Vec::new();
    read::load_exceptions(dev, &geo, None, Resume::default(), &mut |_, e| {
        entries.push(e);
        Ok(())
    })?;
    let cow: Arc<dyn BlockDevice> = Arc::new(open_ro(path)?);
    let fingerprint: Fingerprinter = Arc::new(move |n| read::fingerprint(&*cow, &geo, n));
    Ok(index_check::check(dir, &fingerprint, &entries))
}

fn check(path: &Path, index: Option<&Path>, json: bool) -> Result<ExitCode> {
    let dev = open_ro(path)?;
    let report = inspect::check(&dev);
    let sidecar = match index {
        Some(dir) if !report.has_errors() => Some(check_index(&dev, path, dir)?),
        Some(_) => Some(SidecarState::Stale {
            reason: "the COW has errors: its index is not used".into(),
        }),
        None => None,
    };
    let clean = report.is_clean() && !sidecar.as_ref().is_some_and(SidecarState::is_defect);
    let mut out = std::io::stdout().lock();
    if json {
        let j = CheckJson {
            clean,
            report: &report,
            index: sidecar.as_ref(),
        };
        writeln!(out, "{}", serde_json::to_string_pretty(&j)?)?;
    } else {
        let what = match &report.header {
            Some(h) if h.state == "fresh" => "not formatted (magic 0): a new store".to_string(),
            Some(h) if h.state != "unknown" => format!(
                "{} header, chunk {} sectors, {} area(s), {} exception(s)",
                h.state, h.chunk_sectors, report.areas, report.exceptions
            ),
            _ => "no usable header".to_string(),
        };
        if report.is_clean() {
            writeln!(out, "{}: clean: {what}", report.device)?;
        } else {
            writeln!(
                out,
                "{}: {} finding(s): {what}",
                report.device,
                report.findings.len()
            )?;
            for f in &report.findings {
                writeln!(out, "  {f}")?;
            }
        }
        if let Some(s) = &sidecar {
            let line = match s {
                SidecarState::Missing => "none yet (the next activation builds it)".to_string(),
                SidecarState::Stale { reason } => {
                    format!("stale, the next activation rebuilds it: {reason}")
                }
                SidecarState::Valid { covered, tail } => format!(
                    "valid: holds the first {covered} exceptions; activation replays the {tail} after them"
                ),
                SidecarState::Corrupt { problem } => format!("CORRUPT: {problem}"),
            };
            writeln!(out, "index: {line}")?;
        }
    }
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn dump(path: &Path, json: bool) -> Result<ExitCode> {
    let dev = open_ro(path)?;
    let d = inspect::dump(&dev)?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&d)?)?;
    } else {
        print_dump(&mut out, &d)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_dump(out: &mut impl Write, d: &Dump) -> std::io::Result<()> {
    let h = &d.header;
    writeln!(out, "device: {} ({} bytes)", d.device, d.size_bytes)?;
    let magic = match h.magic {
        SNAP_MAGIC => " (SnAp)",
        BBR_MAGIC => " (BbRt: bad-block relocation table)",
        _ => "",
    };
    writeln!(
        out,
        "header: magic {:#010x}{magic}, valid {}, version {}, chunk size {} sectors: {}",
        h.magic, h.valid, h.version, h.chunk_sectors, h.state
    )?;
    writeln!(out, "status: {}", d.status)?;
    writeln!(
        out,
        "areas: {} ({} exceptions per area)",
        d.areas.len(),
        d.exceptions_per_area
    )?;
    for a in &d.areas {
        writeln!(
            out,
            "  area {} at chunk {} (byte {}): {} entries{}",
            a.index,
            a.chunk,
            a.offset,
            a.entries,
            if a.full { ", full" } else { "" }
        )?;
    }
    writeln!(
        out,
        "exceptions: {} (origin chunk -> COW chunk)",
        d.exceptions.len()
    )?;
    for e in &d.exceptions {
        writeln!(out, "  {} -> {}", e.old, e.new)?;
    }
    Ok(())
}

fn export(origin: &Path, cow: &Path, output: &Path) -> Result<ExitCode> {
    let origin_dev = open_ro(origin)?;
    let cow_dev = open_ro(cow)?;
    let is_block = std::fs::metadata(output)
        .map(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_block_device()
        })
        .unwrap_or(false);
    let out: Arc<dyn BlockDevice> = if is_block {
        Arc::new(
            FileDevice::open(output)
                .with_context(|| format!("cannot open {}", output.display()))?,
        )
    } else {
        Arc::new(
            FileDevice::create(output, origin_dev.size())
                .with_context(|| format!("cannot create {}", output.display()))?,
        )
    };
    let tty = std::io::stderr().is_terminal();
    let mut last_pct = u64::MAX;
    let mut progress = |done: u64, total: u64| {
        if !tty {
            return;
        }
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        if pct != last_pct {
            last_pct = pct;
            eprint!("\rexport: {pct:3}% ({} of {} MiB)", done >> 20, total >> 20);
        }
    };
    let summary = inspect::export(&origin_dev, &cow_dev, &*out, &mut progress)
        .with_context(|| format!("exporting {} + {}", origin.display(), cow.display()))?;
    if tty {
        eprintln!();
    }
    println!(
        "wrote {} bytes to {}: {} chunk(s) from the COW, {} from the origin",
        summary.bytes,
        output.display(),
        summary.chunks_from_cow,
        summary.chunks_from_origin
    );
    Ok(ExitCode::SUCCESS)
}
