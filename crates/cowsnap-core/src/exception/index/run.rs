//! Runs: immutable files of exceptions sorted by origin chunk, read a page at a time.
//!
//! A run file (`run-SEQ`, SEQ in hex) is written once, from a sorted stream, fsynced, and
//! never changed; a checkpoint or a compaction makes new runs and the superblock names
//! the live ones. Layout, in 4 KiB pages (all integers little-endian):
//!
//! * page 0, the header: magic `CXRUN\0v1`, entries (u64), data pages (u64), bytes of the
//!   page table (u64), bytes of the Bloom filter (u64, 0 for none), CRC32 of the page
//!   table and filter (u32), CRC32 of the header's first 44 bytes (u32);
//! * data pages 1..=N: up to 256 entries of (old u64, new u64), sorted by `old`, unique;
//! * the page table, one 16-byte record per data page: the page's first `old` (u64), the
//!   CRC32 of the page's 4096 bytes (u32), its number of entries (u32);
//! * the Bloom filter over the run's `old` chunks, when it has one ([`super::bloom`]).
//!
//! In memory a run keeps its page table (0.06 bytes per exception) and filter; a lookup
//! finds the one page that can hold a chunk from the page table and reads it through the
//! [`PageCache`], checking its CRC. Nothing read from a run file is trusted: every check
//! failure is an [`Error::Corrupt`] naming the file and offset.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use super::bloom::Bloom;
use super::cache::{Page, PageCache, PAGE_BYTES};
use super::dir::{IndexDir, WriteFile};
use crate::error::{Error, Result};
use crate::exception::Exception;
use crate::units::{mem_usize, Chunk};

const MAGIC: &[u8; 8] = b"CXRUN\0v1";
/// Entries in a data page.
pub const PER_PAGE: usize = PAGE_BYTES / 16;
const HEADER_USED: usize = 44;
/// Pages written with one `write` while streaming a run out.
const WRITE_BATCH_PAGES: usize = 64;
/// Pages read with one `read` while streaming a run in.
const READ_BATCH_PAGES: u64 = 64;

/// The name of run `seq`'s file.
pub fn file_name(seq: u64) -> String {
    format!("run-{seq:016x}")
}

/// Process-wide unique ids, the page cache's key for a run.
fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Writes a run from exceptions given in increasing `old` order.
pub struct RunWriter {
    file: WriteFile,
    seq: u64,
    entries: u64,
    pending: Vec<u8>,
    pages_written: u64,
    table: Vec<u8>,
    page_first: u64,
    page_count: u32,
    last: Option<u64>,
    bloom: Option<Bloom>,
}

impl RunWriter {
    /// A new run `seq` in `dir`, with a Bloom filter sized for `bloom_keys` keys when given.
    pub fn create(dir: &IndexDir, seq: u64, bloom_keys: Option<usize>) -> Result<RunWriter> {
        Ok(RunWriter {
            file: dir.create(&file_name(seq))?,
            seq,
            entries: 0,
            pending: Vec::with_capacity(WRITE_BATCH_PAGES * PAGE_BYTES),
            pages_written: 0,
            table: Vec::new(),
            page_first: 0,
            page_count: 0,
            last: None,
            bloom: bloom_keys.map(|n| Bloom::new(n, 10)),
        })
    }

    /// Appends `e`; its `old` must be above the previous one's.
    pub fn push(&mut self, e: Exception) -> Result<()> {
        if let Some(last) = self.last {
            if e.old.0 <= last {
                return Err(Error::Invalid(format!(
                    "index run {}: chunk {} follows chunk {last} (a duplicate exception?)",
                    self.seq, e.old
                )));
            }
        }
        self.last = Some(e.old.0);
        if self.page_count == 0 {
            self.page_first = e.old.0;
        }
        self.pending.extend_from_slice(&e.old.0.to_le_bytes());
        self.pending.extend_from_slice(&e.new.0.to_le_bytes());
        self.page_count += 1;
        self.entries += 1;
        if let Some(b) = &mut self.bloom {
            b.insert(e.old.0);
        }
        if self.page_count as usize == PER_PAGE {
            self.end_page()?;
        }
        Ok(())
    }

    fn end_page(&mut self) -> Result<()> {
        let start = self.pending.len() - self.page_count as usize * 16;
        self.pending.resize(start + PAGE_BYTES, 0);
        let crc = crc32fast::hash(&self.pending[start..]);
        self.table.extend_from_slice(&self.page_first.to_le_bytes());
        self.table.extend_from_slice(&crc.to_le_bytes());
        self.table.extend_from_slice(&self.page_count.to_le_bytes());
        self.page_count = 0;
        if self.pending.len() >= WRITE_BATCH_PAGES * PAGE_BYTES {
            self.write_pending()?;
        }
        Ok(())
    }

    fn write_pending(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let at = (1 + self.pages_written) * PAGE_BYTES as u64;
        self.file.write_at(&self.pending, at)?;
        self.pages_written += (self.pending.len() / PAGE_BYTES) as u64;
        self.pending.clear();
        Ok(())
    }

    /// Writes the page table, the filter and the header, syncs the file, and opens it.
    pub fn finish(mut self) -> Result<Run> {
        if self.page_count > 0 {
            self.end_page()?;
        }
        self.write_pending()?;
        let pages = self.pages_written;
        let bloom = self.bloom.as_ref().map(Bloom::encode).unwrap_or_default();
        let mut meta = std::mem::take(&mut self.table);
        let table_len = meta.len() as u64;
        meta.extend_from_slice(&bloom);
        let mut header = vec![0u8; PAGE_BYTES];
        header[0..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&self.entries.to_le_bytes());
        header[16..24].copy_from_slice(&pages.to_le_bytes());
        header[24..32].copy_from_slice(&table_len.to_le_bytes());
        header[32..40].copy_from_slice(&(bloom.len() as u64).to_le_bytes());
        header[40..44].copy_from_slice(&crc32fast::hash(&meta).to_le_bytes());
        let hcrc = crc32fast::hash(&header[..HEADER_USED]);
        header[44..48].copy_from_slice(&hcrc.to_le_bytes());
        self.file.write_at(&meta, (1 + pages) * PAGE_BYTES as u64)?;
        self.file.write_at(&header, 0)?;
        if !crate::mutation::active("index-run-not-synced") {
            self.file.sync()?;
        }
        let table = decode_table(&meta[..mem_usize(table_len)]);
        Ok(Run {
            id: next_id(),
            seq: self.seq,
            entries: self.entries,
            firsts: table.0,
            crcs: table.1,
            counts: table.2,
            bloom: self.bloom,
            file: self.file.into_file(),
            name: file_name(self.seq),
        })
    }
}

type Table = (Vec<u64>, Vec<u32>, Vec<u32>);

fn decode_table(b: &[u8]) -> Table {
    let n = b.len() / 16;
    let mut t = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for r in b.chunks_exact(16) {
        t.0.push(le64(r, 0));
        t.1.push(le32(r, 8));
        t.2.push(le32(r, 12));
    }
    t
}

/// An open run.
pub struct Run {
    id: u64,
    seq: u64,
    entries: u64,
    firsts: Vec<u64>,
    crcs: Vec<u32>,
    counts: Vec<u32>,
    bloom: Option<Bloom>,
    file: File,
    name: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("seq", &self.seq)
            .field("entries", &self.entries)
            .finish()
    }
}

impl Run {
    /// Opens run `seq` of `dir`, checking its header and page table.
    pub fn open(dir: &IndexDir, seq: u64) -> Result<Run> {
        let name = file_name(seq);
        let device = dir.path().join(&name).display().to_string();
        let corrupt = |offset: u64, reason: String| Error::Corrupt {
            device: device.clone(),
            offset,
            reason,
        };
        let file = dir
            .open_file(&name)?
            .ok_or_else(|| corrupt(0, "the run file named by the superblock is missing".into()))?;
        let size = file
            .metadata()
            .map_err(|e| Error::io("stat", 0, device.clone(), e))?
            .len();
        let mut header = vec![0u8; PAGE_BYTES];
        read_exact(&file, &mut header, 0, size, &device)?;
        if &header[0..8] != MAGIC {
            return Err(corrupt(0, "not an index run (bad magic)".into()));
        }
        if crc32fast::hash(&header[..HEADER_USED]) != le32(&header, 44) {
            return Err(corrupt(44, "the header's checksum does not match".into()));
        }
        let entries = le64(&header, 8);
        let pages = le64(&header, 16);
        let table_len = le64(&header, 24);
        let bloom_len = le64(&header, 32);
        let want_pages = entries.div_ceil(PER_PAGE as u64);
        if pages != want_pages || table_len != pages.saturating_mul(16) {
            return Err(corrupt(
                8,
                format!("{entries} entries need {want_pages} pages and a table of {} bytes; the header says {pages} pages, {table_len} bytes", want_pages * 16),
            ));
        }
        let meta_at = (1 + pages) * PAGE_BYTES as u64;
        let meta_len = table_len.saturating_add(bloom_len);
        if meta_at.saturating_add(meta_len) > size {
            return Err(corrupt(
                meta_at,
                format!("the file has {size} bytes, too short for its {pages} pages and {meta_len} bytes of table and filter"),
            ));
        }
        let mut meta = vec![0u8; mem_usize(meta_len)];
        read_exact(&file, &mut meta, meta_at, size, &device)?;
        if crc32fast::hash(&meta) != le32(&header, 40) {
            return Err(corrupt(
                meta_at,
                "the page table's checksum does not match".into(),
            ));
        }
        let split = mem_usize(table_len);
        let (firsts, crcs, counts) = decode_table(&meta[..split]);
        check_table(&firsts, &counts, entries).map_err(|why| corrupt(meta_at, why))?;
        let bloom = if bloom_len == 0 {
            None
        } else {
            Some(Bloom::decode(&meta[split..]).map_err(|why| corrupt(meta_at + table_len, why))?)
        };
        Ok(Run {
            id: next_id(),
            seq,
            entries,
            firsts,
            crcs,
            counts,
            bloom,
            file,
            name,
        })
    }

    /// The run's sequence number (its file name).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Exceptions in the run.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Bytes of memory the run holds (page table and filter).
    pub fn heap_bytes(&self) -> usize {
        self.firsts.capacity() * 8
            + self.crcs.capacity() * 4
            + self.counts.capacity() * 4
            + self.bloom.as_ref().map_or(0, Bloom::heap_bytes)
    }

    fn corrupt(&self, offset: u64, reason: String) -> Error {
        Error::Corrupt {
            device: self.name.clone(),
            offset,
            reason,
        }
    }

    /// Reads data page `p` and checks it against the page table.
    fn read_page(&self, p: usize) -> Result<Page> {
        let at = (1 + p as u64) * PAGE_BYTES as u64;
        let mut buf = vec![0u8; PAGE_BYTES];
        self.file
            .read_exact_at(&mut buf, at)
            .map_err(|e| Error::io("read", at, self.name.clone(), e))?;
        if crc32fast::hash(&buf) != self.crcs[p] {
            return Err(self.corrupt(at, format!("data page {p} does not match its checksum")));
        }
        Ok(buf.into())
    }

    /// The `new` chunk of `old` if this run holds it: at most one page read (through
    /// `cache`), none when the filter or the page table rules the chunk out.
    pub fn lookup(&self, old: Chunk, cache: &PageCache) -> Result<Option<Chunk>> {
        if let Some(b) = &self.bloom {
            if !b.may_contain(old.0) {
                return Ok(None);
            }
        }
        let p = self.firsts.partition_point(|&f| f <= old.0);
        let Some(p) = p.checked_sub(1) else {
            return Ok(None);
        };
        let page = cache.get((self.id, p as u64), || self.read_page(p))?;
        let n = self.counts[p] as usize;
        let (mut lo, mut hi) = (0usize, n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let k = le64(&page, mid * 16);
            match k.cmp(&old.0) {
                std::cmp::Ordering::Equal => return Ok(Some(Chunk(le64(&page, mid * 16 + 8)))),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        Ok(None)
    }

    /// Every exception of the run in order, read straight from the file in batches of
    /// pages (not through the cache: a scan would evict the working set).
    pub fn scan(&self) -> RunScan<'_> {
        RunScan {
            run: self,
            batch: Vec::new(),
            batch_first: 0,
            page: 0,
            index: 0,
        }
    }
}

fn check_table(firsts: &[u64], counts: &[u32], entries: u64) -> std::result::Result<(), String> {
    let mut total = 0u64;
    for (p, &c) in counts.iter().enumerate() {
        let last = p + 1 == counts.len();
        if c == 0 || c as usize > PER_PAGE || (!last && c as usize != PER_PAGE) {
            return Err(format!("data page {p} claims {c} entries"));
        }
        total += u64::from(c);
    }
    if total != entries {
        return Err(format!(
            "the pages hold {total} entries, the header says {entries}"
        ));
    }
    if firsts.windows(2).any(|w| w[0] >= w[1]) {
        return Err("the pages' first chunks are not increasing".into());
    }
    Ok(())
}

fn read_exact(file: &File, buf: &mut [u8], at: u64, size: u64, device: &str) -> Result<()> {
    if at.saturating_add(buf.len() as u64) > size {
        return Err(Error::Corrupt {
            device: device.to_string(),
            offset: at,
            reason: format!("the file has {size} bytes, too short"),
        });
    }
    file.read_exact_at(buf, at)
        .map_err(|e| Error::io("read", at, device.to_string(), e))
}

/// An in-order scan of a run; see [`Run::scan`].
pub struct RunScan<'a> {
    run: &'a Run,
    batch: Vec<u8>,
    batch_first: usize,
    page: usize,
    index: usize,
}

impl RunScan<'_> {
    /// The next exception, `None` at the end.
    pub fn next_exception(&mut self) -> Result<Option<Exception>> {
        let run = self.run;
        loop {
            if self.page >= run.counts.len() {
                return Ok(None);
            }
            if self.index < run.counts[self.page] as usize {
                break;
            }
            self.page += 1;
            self.index = 0;
        }
        let in_batch = self.page - self.batch_first;
        if self.batch.is_empty() || in_batch * PAGE_BYTES >= self.batch.len() {
            let left = (run.counts.len() - self.page) as u64;
            let n = left.min(READ_BATCH_PAGES);
            let at = (1 + self.page as u64) * PAGE_BYTES as u64;
            self.batch.resize(mem_usize(n) * PAGE_BYTES, 0);
            run.file
                .read_exact_at(&mut self.batch, at)
                .map_err(|e| Error::io("read", at, run.name.clone(), e))?;
            for (i, page) in self.batch.chunks_exact(PAGE_BYTES).enumerate() {
                if crc32fast::hash(page) != run.crcs[self.page + i] {
                    return Err(run.corrupt(
                        at + (i * PAGE_BYTES) as u64,
                        format!("data page {} does not match its checksum", self.page + i),
                    ));
                }
            }
            self.batch_first = self.page;
        }
        let off = (self.page - self.batch_first) * PAGE_BYTES + self.index * 16;
        self.index += 1;
        Ok(Some(Exception::new(
            le64(&self.batch, off),
            le64(&self.batch, off + 8),
        )))
    }
}

/// Merges runs into one stream in order of `old`, calling `f` with each exception. A
/// chunk two runs hold comes twice in a row: the caller, which knows whose corruption that
/// is, refuses it (a `RunWriter` does, by order).
pub fn merge(runs: &[&Run], f: &mut dyn FnMut(Exception) -> Result<()>) -> Result<()> {
    let mut scans: Vec<RunScan<'_>> = runs.iter().map(|r| r.scan()).collect();
    let mut heap = BinaryHeap::new();
    for (i, s) in scans.iter_mut().enumerate() {
        if let Some(e) = s.next_exception()? {
            heap.push(Reverse((e.old.0, e.new.0, i)));
        }
    }
    while let Some(Reverse((old, new, i))) = heap.pop() {
        f(Exception::new(old, new))?;
        if let Some(e) = scans[i].next_exception()? {
            heap.push(Reverse((e.old.0, e.new.0, i)));
        }
    }
    Ok(())
}
