//! The page cache of the exception index: one bounded pool of 4 KiB index pages shared by
//! every snapshot that uses it (a pool's daemon makes one, sized by `serve --cache-size`).
//!
//! Replacement is CLOCK, as in the kernel's dm-bufio: each slot has a "referenced" bit set
//! on a hit; the hand clears bits until it finds a slot whose bit is clear and evicts it.
//! A page is loaded *outside* the cache's lock (two threads missing the same page may both
//! read it; the second insert finds the first and keeps it), so no lock is held across
//! index I/O. Pages are immutable: a run file is never rewritten, so a cached page never
//! goes stale; pages of deleted runs age out like any other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::Result;

/// A hasher for integer keys: one multiply and a fold (the keys are chunk numbers, not
/// attacker-chosen strings: no need for SipHash's cost on every lookup).
#[derive(Clone, Copy, Debug, Default)]
pub struct IntHasher(u64);

impl std::hash::Hasher for IntHasher {
    fn finish(&self) -> u64 {
        let x = self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^ (x >> 29)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x100_0000_01B3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(23) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Builds [`IntHasher`]s.
pub type IntHash = std::hash::BuildHasherDefault<IntHasher>;

/// Bytes in an index page.
pub const PAGE_BYTES: usize = 4096;

/// One cached page: the bytes of a run file's data page.
pub type Page = Arc<[u8]>;

/// A page's name: the run's unique id and the page's number in it.
pub type PageKey = (u64, u64);

struct Slot {
    key: PageKey,
    page: Page,
    referenced: bool,
}

#[derive(Default)]
struct Clock {
    map: HashMap<PageKey, usize, IntHash>,
    slots: Vec<Slot>,
    hand: usize,
}

/// What the cache did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheStats {
    /// The budget, in bytes.
    pub budget_bytes: u64,
    /// Bytes of pages held now.
    pub resident_bytes: u64,
    /// Lookups that found their page in memory.
    pub hits: u64,
    /// Lookups that read their page from a run file.
    pub misses: u64,
    /// Pages evicted to make room.
    pub evictions: u64,
}

/// A bounded CLOCK cache of index pages.
pub struct PageCache {
    capacity: usize,
    clock: Mutex<Clock>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

impl std::fmt::Debug for PageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageCache")
            .field("stats", &self.stats())
            .finish()
    }
}

impl PageCache {
    /// A cache holding at most `budget_bytes` of pages (at least one page).
    pub fn new(budget_bytes: u64) -> Arc<PageCache> {
        let pages = usize::try_from(budget_bytes / PAGE_BYTES as u64).unwrap_or(usize::MAX);
        Arc::new(PageCache {
            capacity: pages.max(1),
            clock: Mutex::new(Clock::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        })
    }

    /// The page `key`, from memory or else from `load` (called without any lock held).
    pub fn get(&self, key: PageKey, load: impl FnOnce() -> Result<Page>) -> Result<Page> {
        {
            let mut c = self.clock.lock();
            if let Some(&i) = c.map.get(&key) {
                c.slots[i].referenced = true;
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(c.slots[i].page.clone());
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let page = load()?;
        let mut c = self.clock.lock();
        if let Some(&i) = c.map.get(&key) {
            return Ok(c.slots[i].page.clone());
        }
        let slot = Slot {
            key,
            page: page.clone(),
            referenced: false,
        };
        if c.slots.len() < self.capacity {
            let i = c.slots.len();
            c.slots.push(slot);
            c.map.insert(key, i);
            return Ok(page);
        }
        let victim = loop {
            let h = c.hand;
            c.hand = (h + 1) % c.slots.len();
            if std::mem::take(&mut c.slots[h].referenced) {
                continue;
            }
            break h;
        };
        let old = std::mem::replace(&mut c.slots[victim], slot);
        c.map.remove(&old.key);
        c.map.insert(key, victim);
        self.evictions.fetch_add(1, Ordering::Relaxed);
        Ok(page)
    }

    /// Hits, misses and bytes held.
    pub fn stats(&self) -> CacheStats {
        let held = self.clock.lock().slots.len();
        CacheStats {
            budget_bytes: (self.capacity * PAGE_BYTES) as u64,
            resident_bytes: (held * PAGE_BYTES) as u64,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }

    /// The budget in bytes.
    pub fn budget_bytes(&self) -> u64 {
        (self.capacity * PAGE_BYTES) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(b: u8) -> Page {
        vec![b; PAGE_BYTES].into()
    }

    #[test]
    fn the_cache_never_holds_more_than_its_budget_and_keeps_referenced_pages() {
        let c = PageCache::new(3 * PAGE_BYTES as u64);
        for k in 0..3u64 {
            c.get((1, k), || Ok(page(0))).unwrap();
        }
        // A hit marks page 0 referenced: the hand passes it over and evicts page 1.
        c.get((1, 0), || panic!("page 0 is cached")).unwrap();
        c.get((1, 3), || Ok(page(3))).unwrap();
        let s = c.stats();
        assert_eq!(s.resident_bytes, 3 * PAGE_BYTES as u64);
        assert_eq!((s.hits, s.misses, s.evictions), (1, 4, 1));
        c.get((1, 0), || panic!("page 0 survived")).unwrap();
        let mut reloaded = false;
        c.get((1, 1), || {
            reloaded = true;
            Ok(page(1))
        })
        .unwrap();
        assert!(reloaded, "page 1 was the victim");
    }

    #[test]
    fn a_failed_load_caches_nothing() {
        let c = PageCache::new(PAGE_BYTES as u64);
        let e = c.get((7, 7), || {
            Err(crate::error::Error::Invalid("bad page".into()))
        });
        assert!(e.is_err());
        assert_eq!(c.stats().resident_bytes, 0);
    }
}
