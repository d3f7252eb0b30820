//! The unreadable list: sectors of a relocation target whose data is lost, kept durably
//! in the spirit of md's bad-block list.
//!
//! A read that fails with a media error puts its unreadable sectors here; so does a
//! relocation whose chunk could only be read in part (the unreadable sectors are zeros on
//! the spare). A read that touches a listed sector fails with EIO without reaching any
//! device, so a lost sector never reads back as other data (EVMS's `dm-bbr` returned the
//! spare's contents instead). A write that covers a sector takes it off the list once the
//! written data is durable.
//!
//! The list is a map of sector ranges, written as a small JSON file replaced atomically
//! (write `NAME.new`, sync it, rename, sync the directory), or kept in memory only.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use crate::error::{Error, Result};

/// The file's content.
#[derive(serde::Serialize, serde::Deserialize)]
struct OnDisk {
    version: u32,
    /// `[first sector, sectors]`, sorted, disjoint, not touching.
    ranges: Vec<[u64; 2]>,
}

const VERSION: u32 = 1;

/// The unreadable sectors of one relocation target.
#[derive(Debug)]
pub struct UnreadableList {
    path: Option<PathBuf>,
    /// `start -> end` (sectors, end exclusive), disjoint and not touching.
    ranges: Mutex<BTreeMap<u64, u64>>,
}

impl UnreadableList {
    /// A list kept in memory only.
    pub fn in_memory() -> UnreadableList {
        UnreadableList {
            path: None,
            ranges: Mutex::new(BTreeMap::new()),
        }
    }

    /// The list stored at `path`; a missing file is an empty list. A file that cannot be
    /// read or does not decode is an error: forgetting lost sectors would let them read
    /// back as other data.
    pub fn open(path: &Path) -> Result<UnreadableList> {
        let ranges = match fs::read(path) {
            Ok(bytes) => decode(&bytes, path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io_error("read", path, e)),
        };
        Ok(UnreadableList {
            path: Some(path.to_path_buf()),
            ranges: Mutex::new(ranges),
        })
    }

    /// True when any sector of `start..end` is listed.
    pub fn intersects(&self, start: u64, end: u64) -> bool {
        let r = self.ranges.lock();
        r.range(..end).next_back().is_some_and(|(_, &e)| e > start)
    }

    /// The listed sectors inside `start..end`, as ranges.
    pub fn within(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let r = self.ranges.lock();
        let first = r
            .range(..=start)
            .next_back()
            .map_or(start, |(&s, _)| s.min(start));
        r.range(first..end)
            .filter(|(_, &e)| e > start)
            .map(|(&s, &e)| (s.max(start), e.min(end)))
            .collect()
    }

    /// Every listed range, `(first sector, sectors)`.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.ranges
            .lock()
            .iter()
            .map(|(&s, &e)| (s, e - s))
            .collect()
    }

    /// Listed sectors in all.
    pub fn sectors(&self) -> u64 {
        self.ranges.lock().iter().map(|(&s, &e)| e - s).sum()
    }

    /// Lists `ranges` (`(start, end)` sectors) durably before returning.
    pub fn add(&self, ranges: &[(u64, u64)]) -> Result<()> {
        if ranges.is_empty() {
            return Ok(());
        }
        let mut r = self.ranges.lock();
        let mut next = r.clone();
        for &(s, e) in ranges {
            insert(&mut next, s, e);
        }
        if next != *r {
            self.store(&next)?;
            *r = next;
        }
        Ok(())
    }

    /// Takes `start..end` off the list durably (the caller made the data there durable).
    pub fn clear(&self, start: u64, end: u64) -> Result<()> {
        let mut r = self.ranges.lock();
        let mut next = r.clone();
        remove(&mut next, start, end);
        if next != *r {
            self.store(&next)?;
            *r = next;
        }
        Ok(())
    }

    fn store(&self, ranges: &BTreeMap<u64, u64>) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let body = OnDisk {
            version: VERSION,
            ranges: ranges.iter().map(|(&s, &e)| [s, e - s]).collect(),
        };
        let bytes = serde_json::to_vec(&body)
            .map_err(|e| Error::InvalidArgument(format!("encoding the unreadable list: {e}")))?;
        let mut staged = path.clone().into_os_string();
        staged.push(".new");
        let staged = PathBuf::from(staged);
        let write = || -> std::io::Result<()> {
            use std::os::unix::fs::OpenOptionsExt;
            // Private, like every file of a pool.
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&staged)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&staged, path)?;
            if let Some(dir) = path.parent() {
                fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| io_error("write", path, e))
    }
}

fn io_error(op: &'static str, path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        op,
        offset: 0,
        device: path.display().to_string(),
        cause: std::sync::Arc::new(e),
    }
}

fn decode(bytes: &[u8], path: &Path) -> Result<BTreeMap<u64, u64>> {
    let bad = |why: String| Error::Corrupt {
        device: path.display().to_string(),
        offset: 0,
        reason: format!("unreadable list: {why}"),
    };
    let d: OnDisk = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    if d.version != VERSION {
        return Err(bad(format!(
            "version {} (only {VERSION} exists)",
            d.version
        )));
    }
    let mut m = BTreeMap::new();
    for [s, n] in d.ranges {
        let e = s
            .checked_add(n)
            .filter(|_| n > 0)
            .ok_or_else(|| bad(format!("range of {n} sectors at {s}")))?;
        insert(&mut m, s, e);
    }
    Ok(m)
}

/// Adds `s..e` to a map of disjoint, non-touching ranges, merging neighbours.
fn insert(m: &mut BTreeMap<u64, u64>, mut s: u64, mut e: u64) {
    if s >= e {
        return;
    }
    if let Some((&ps, &pe)) = m.range(..=s).next_back() {
        if pe >= s {
            s = ps;
            e = e.max(pe);
            m.remove(&ps);
        }
    }
    let overlapping: Vec<(u64, u64)> = m.range(s..=e).map(|(&a, &b)| (a, b)).collect();
    for (a, b) in overlapping {
        e = e.max(b);
        m.remove(&a);
    }
    m.insert(s, e);
}

/// Removes `s..e` from a map of disjoint ranges, splitting the ones it cuts.
fn remove(m: &mut BTreeMap<u64, u64>, s: u64, e: u64) {
    if s >= e {
        return;
    }
    let first = m.range(..s).next_back().map_or(s, |(&a, _)| a);
    let cut: Vec<(u64, u64)> = m
        .range(first..e)
        .filter(|(_, &b)| b > s)
        .map(|(&a, &b)| (a, b))
        .collect();
    for (a, b) in cut {
        m.remove(&a);
        if a < s {
            m.insert(a, s);
        }
        if b > e {
            m.insert(e, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_split_and_answer() {
        let l = UnreadableList::in_memory();
        l.add(&[(10, 12), (12, 14), (20, 21)]).unwrap();
        assert_eq!(l.ranges(), vec![(10, 4), (20, 1)]);
        assert!(l.intersects(13, 15) && !l.intersects(14, 20) && l.intersects(0, 100));
        assert_eq!(l.within(11, 21), vec![(11, 14), (20, 21)]);
        l.clear(11, 13).unwrap();
        assert_eq!(l.ranges(), vec![(10, 1), (13, 1), (20, 1)]);
        l.clear(0, 100).unwrap();
        assert_eq!(l.sectors(), 0);
    }

    #[test]
    fn the_file_survives_reopening_and_bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("u.json");
        let l = UnreadableList::open(&p).unwrap();
        assert_eq!(l.sectors(), 0);
        l.add(&[(5, 9)]).unwrap();
        assert_eq!(UnreadableList::open(&p).unwrap().ranges(), vec![(5, 4)]);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        fs::write(&p, b"{\"version\":1,\"ranges\":[[3,0]]}").unwrap();
        assert!(matches!(
            UnreadableList::open(&p),
            Err(Error::Corrupt { .. })
        ));
        fs::write(&p, b"garbage").unwrap();
        assert!(UnreadableList::open(&p).is_err());
    }
}
