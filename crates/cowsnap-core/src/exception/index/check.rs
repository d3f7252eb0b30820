//! `cow check --index`: a sidecar checked against its COW, entry by entry.
//!
//! Activation trusts a sidecar after O(1) checks (superblock, fingerprint, page tables);
//! this reads everything: each run's every page against its checksum, the members file,
//! and the runs' exceptions against the COW's first `covered` entries. A missing or stale
//! sidecar is not a defect (the next activation rebuilds it); a sidecar that passes the
//! activation checks but holds other exceptions than the COW is, since it would be used.

use std::collections::HashMap;
use std::path::Path;

use super::run::{self, Run};
use super::superblock::{self, Superblock};
use super::{decode_members, members_name, Fingerprinter, IndexDir};
use crate::exception::Exception;

/// What the check found.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum SidecarState {
    /// No superblock: the next activation builds the index.
    Missing,
    /// The superblock is unreadable or no longer matches the COW: the next activation
    /// rebuilds the index.
    Stale {
        /// Why.
        reason: String,
    },
    /// Activation would use it, and it holds exactly the COW's first `covered` entries.
    Valid {
        /// Entries the runs hold.
        covered: u64,
        /// Entries after them that activation replays from the COW.
        tail: u64,
    },
    /// Activation would use it, but it is wrong: the COW's exceptions and the index's
    /// differ, or a page is damaged (a lookup of it would fail).
    Corrupt {
        /// What is wrong.
        problem: String,
    },
}

impl SidecarState {
    /// True when the sidecar would mislead or fail a lookup.
    pub fn is_defect(&self) -> bool {
        matches!(self, SidecarState::Corrupt { .. })
    }
}

/// Checks the sidecar in `dir` against `entries`, the COW's whole table in commit order,
/// with the store's `fingerprint`. Reads `dir` without taking it (a daemon may hold it).
pub fn check(dir: &Path, fingerprint: &Fingerprinter, entries: &[Exception]) -> SidecarState {
    let dir = IndexDir::unclaimed(dir);
    let where_ = dir.path().join(superblock::NAME).display().to_string();
    let sb = match dir.read(superblock::NAME, 1 << 20) {
        Ok(None) => return SidecarState::Missing,
        Ok(Some(b)) => match Superblock::decode(&b, &where_) {
            Ok(sb) => sb,
            Err(e) => return stale(e.to_string()),
        },
        Err(e) => return stale(e.to_string()),
    };
    match fingerprint(sb.covered) {
        Ok(f) if f == sb.fingerprint => {}
        Ok(_) => return stale("the COW changed since the index was written".into()),
        Err(e) => return stale(e.to_string()),
    }
    let Some(covered) = usize::try_from(sb.covered)
        .ok()
        .filter(|&c| c <= entries.len())
    else {
        return stale(format!(
            "it covers {} entries, the COW has {}",
            sb.covered,
            entries.len()
        ));
    };
    match compare(&dir, &sb, &entries[..covered]) {
        Ok(()) => SidecarState::Valid {
            covered: sb.covered,
            tail: (entries.len() - covered) as u64,
        },
        Err(problem) => SidecarState::Corrupt { problem },
    }
}

fn stale(reason: String) -> SidecarState {
    SidecarState::Stale { reason }
}

/// The runs named by `sb` hold exactly `covered`, and the members file matches level 1.
fn compare(dir: &IndexDir, sb: &Superblock, covered: &[Exception]) -> Result<(), String> {
    let mut want: HashMap<u64, u64> = covered.iter().map(|e| (e.old.0, e.new.0)).collect();
    let runs = sb
        .runs()
        .map(|seq| Run::open(dir, seq).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let all: Vec<&Run> = runs.iter().collect();
    run::merge(&all, &mut |e| match want.remove(&e.old.0) {
        Some(new) if new == e.new.0 => Ok(()),
        Some(new) => Err(crate::Error::Invalid(format!(
            "the index maps chunk {} to {}, the COW to {new}",
            e.old, e.new
        ))),
        None => Err(crate::Error::Invalid(format!(
            "the index holds chunk {} -> {}, which the COW's covered entries do not",
            e.old, e.new
        ))),
    })
    .map_err(|e| e.to_string())?;
    if let Some((old, new)) = want.iter().next() {
        return Err(format!(
            "{} covered entries are missing from the index (chunk {old} -> {new} among them)",
            want.len()
        ));
    }
    if let (Some(seq), Some(l1)) = (sb.level1, runs.first()) {
        let name = members_name(seq);
        let b = dir
            .read(&name, 1 << 37)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("the members file {name} is missing"))?;
        let members = decode_members(&b).map_err(|e| format!("{name}: {e}"))?;
        let mut scan = l1.scan();
        let mut n = 0u64;
        while let Some(e) = scan.next_exception().map_err(|e| e.to_string())? {
            if !members.contains(e.old.0) {
                return Err(format!("{name} lacks chunk {}", e.old));
            }
            n += 1;
        }
        if members.len() != n {
            return Err(format!(
                "{name} holds {} chunks, the level-1 run {n}",
                members.len()
            ));
        }
    }
    Ok(())
}
