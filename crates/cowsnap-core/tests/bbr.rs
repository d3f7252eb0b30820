//! Bad-block relocation (`targets::bbr`): relocation of failing writes, reads that are never
//! relocated, spares that fail, spares that run out, the table across reopening, the race
//! between a relocation and a write already going to the failing chunk, and a power cut at
//! every write and flush of a relocation.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small constants"
)]
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::thread;

use parking_lot::Mutex;

use cowsnap_core::dev::{
    BlockDevice, CrashDevice, Fua, GatedDevice, MemDevice, OpKind, PowerDomain,
};
use cowsnap_core::exception::index::IndexConfig;
use cowsnap_core::exception::persistent::format::TableKind;
use cowsnap_core::exception::{ExceptionStore, PersistentStore};
use cowsnap_core::layers::{Layer, LayerSpec};
use cowsnap_core::targets::bbr::{Bbr, UnreadableList, SPARE_KEY};
use cowsnap_core::testkit::{pattern, scratch, wait_until, SplitMix};
use cowsnap_core::units::{Chunk, ChunkSize};
use cowsnap_core::{Error, Result};

const CS: u64 = 4096;

/// A disk with bad sectors: reads and writes of listed sectors fail with EIO (as a drive
/// reports a medium error), every other request goes to the device below.
#[derive(Debug)]
struct Media {
    inner: Arc<dyn BlockDevice>,
    bad_reads: Mutex<BTreeSet<u64>>,
    bad_writes: Mutex<BTreeSet<u64>>,
}

impl Media {
    fn new(inner: Arc<dyn BlockDevice>) -> Arc<Media> {
        Arc::new(Media {
            inner,
            bad_reads: Mutex::default(),
            bad_writes: Mutex::default(),
        })
    }
    fn bad_write_chunk(&self, c: u64) {
        self.bad_writes.lock().extend(c * 8..c * 8 + 8);
    }
    fn eio(op: &'static str, offset: u64) -> Error {
        Error::io(
            op,
            offset,
            "media",
            std::io::Error::from_raw_os_error(libc::EIO),
        )
    }
    fn hits(set: &Mutex<BTreeSet<u64>>, offset: u64, len: usize) -> bool {
        set.lock()
            .range(offset / 512..(offset + len as u64).div_ceil(512))
            .next()
            .is_some()
    }
}

impl BlockDevice for Media {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if Self::hits(&self.bad_reads, offset, buf.len()) {
            return Err(Self::eio("read", offset));
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: Fua) -> Result<()> {
        if Self::hits(&self.bad_writes, offset, buf.len()) {
            return Err(Self::eio("write", offset));
        }
        self.inner.write_at(buf, offset, fua)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.discard(offset, len)
    }
}

fn cs() -> ChunkSize {
    ChunkSize::from_bytes(CS).unwrap()
}

fn relocation_store(spares: Arc<dyn BlockDevice>) -> Arc<dyn ExceptionStore> {
    Arc::new(PersistentStore::open_as(spares, Some(cs()), false, TableKind::Relocation).unwrap())
}

/// A 64 KiB disk filled with pattern 1, 16 chunks of spare file.
fn rig() -> (Arc<Media>, Arc<Media>, Arc<Bbr>) {
    let disk = Media::new(Arc::new(MemDevice::from_bytes(&pattern(1, 0, 16 * CS))));
    let spares = Media::new(Arc::new(MemDevice::new(16 * CS)));
    let bbr = Bbr::in_memory(disk.clone(), relocation_store(spares.clone())).unwrap();
    (disk, spares, bbr)
}

fn read(dev: &dyn BlockDevice, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut v = vec![0u8; len as usize];
    dev.read_at(&mut v, offset).map(|()| v)
}

#[test]
fn a_failing_write_is_relocated_and_reads_back() {
    let (disk, _spares, bbr) = rig();
    disk.bad_write_chunk(3);
    let data = pattern(7, 3 * CS, CS);
    bbr.write_at(&data, 3 * CS, Fua::No).unwrap();
    assert_eq!(read(&*bbr, 3 * CS, CS).unwrap(), data);
    assert_eq!(
        bbr.relocation_of(Chunk(3)).unwrap(),
        Some(Chunk(2)),
        "the first data chunk of the table"
    );
    let st = bbr.status();
    assert_eq!(
        (st.relocations, st.write_errors, st.state.as_str()),
        (1, 1, "ok")
    );
    assert!(st.line().starts_with("1 "), "{}", st.line());
    // Other chunks are untouched.
    assert_eq!(read(&*bbr, 0, 3 * CS).unwrap(), pattern(1, 0, 3 * CS));
}

#[test]
fn discards_reach_the_device_where_chunks_live_there() {
    let (disk, _spares, bbr) = rig();
    disk.bad_write_chunk(3);
    let data = pattern(7, 0, CS);
    bbr.write_at(&data, 3 * CS, Fua::No).unwrap();
    // MemDevice reads zeros after a discard.
    bbr.discard(2 * CS, 3 * CS).unwrap();
    assert_eq!(read(&*bbr, 2 * CS, CS).unwrap(), vec![0u8; CS as usize]);
    assert_eq!(
        read(&*bbr, 3 * CS, CS).unwrap(),
        data,
        "the relocated chunk is left alone"
    );
    assert_eq!(read(&*bbr, 4 * CS, CS).unwrap(), vec![0u8; CS as usize]);
    assert_eq!(read(&*bbr, 5 * CS, CS).unwrap(), pattern(1, 5 * CS, CS));
}

#[test]
fn a_partial_write_carries_the_rest_of_the_chunk_to_the_spare() {
    let (disk, _spares, bbr) = rig();
    disk.bad_write_chunk(2);
    let data = pattern(9, 0, 1024);
    bbr.write_at(&data, 2 * CS + 1024, Fua::Yes).unwrap();
    let mut want = pattern(1, 2 * CS, CS);
    want[1024..2048].copy_from_slice(&data);
    assert_eq!(read(&*bbr, 2 * CS, CS).unwrap(), want);
}

#[test]
fn a_read_error_is_never_relocated_and_never_reads_as_other_data() {
    let (disk, _spares, bbr) = rig();
    disk.bad_reads.lock().insert(5 * 8 + 2);
    let err = read(&*bbr, 5 * CS, CS).unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    assert_eq!(
        bbr.relocation_of(Chunk(5)).unwrap(),
        None,
        "a read error is not relocated"
    );
    assert_eq!(
        bbr.unreadable().ranges(),
        vec![(5 * 8 + 2, 1)],
        "only the sector that failed"
    );
    // The drive recovers; the sector's data was reported lost, so it stays lost...
    disk.bad_reads.lock().clear();
    assert!(read(&*bbr, 5 * CS + 1024, 512).is_err());
    assert_eq!(read(&*bbr, 5 * CS, 1024).unwrap(), pattern(1, 5 * CS, 1024));
    // ...until it is written: the device is tried first, and takes it.
    let data = pattern(4, 0, 512);
    bbr.write_at(&data, 5 * CS + 1024, Fua::No).unwrap();
    assert_eq!(read(&*bbr, 5 * CS + 1024, 512).unwrap(), data);
    assert_eq!(bbr.unreadable().sectors(), 0);
    assert_eq!(bbr.status().relocations, 0);
}

#[test]
fn a_relocation_that_cannot_read_the_rest_lists_what_was_lost() {
    let (disk, _spares, bbr) = rig();
    disk.bad_write_chunk(4);
    disk.bad_reads.lock().insert(4 * 8); // sector 0 of chunk 4
    let data = pattern(3, 0, 512);
    bbr.write_at(&data, 4 * CS + 3 * 512, Fua::No).unwrap();
    assert!(bbr.relocation_of(Chunk(4)).unwrap().is_some());
    assert_eq!(bbr.unreadable().ranges(), vec![(4 * 8, 1)]);
    // The spare holds zeros there, but they are never served.
    disk.bad_reads.lock().clear();
    assert!(read(&*bbr, 4 * CS, 512).is_err());
    let mut want = pattern(1, 4 * CS, CS);
    want[3 * 512..4 * 512].copy_from_slice(&data);
    assert_eq!(read(&*bbr, 4 * CS + 512, CS - 512).unwrap(), want[512..]);
    // Writing the lost sector (now on the spare) brings it back.
    let d0 = pattern(5, 0, 512);
    bbr.write_at(&d0, 4 * CS, Fua::No).unwrap();
    assert_eq!(read(&*bbr, 4 * CS, 512).unwrap(), d0);
    assert_eq!(bbr.unreadable().sectors(), 0);
}

#[test]
fn a_spare_that_fails_is_skipped_and_a_spare_that_fails_later_is_relocated_again() {
    let (disk, spares, bbr) = rig();
    disk.bad_write_chunk(1);
    spares.bad_write_chunk(2); // the first spare the table hands out
    let a = pattern(11, 0, CS);
    bbr.write_at(&a, CS, Fua::No).unwrap();
    assert_eq!(bbr.relocation_of(Chunk(1)).unwrap(), Some(Chunk(3)));
    assert_eq!(bbr.status().spare_failures, 1);
    assert_eq!(read(&*bbr, CS, CS).unwrap(), a);
    // Now spare 3 fails too: the next write to chunk 1 relocates the spare itself.
    spares.bad_write_chunk(3);
    let b = pattern(12, 0, 512);
    bbr.write_at(&b, CS + 512, Fua::Yes).unwrap();
    let s2 = bbr.relocation_of(Chunk(1)).unwrap().unwrap();
    assert!(s2.0 > 3, "chained to a new spare, got {s2}");
    assert_eq!(bbr.index().lookup(Chunk(SPARE_KEY | 3)).unwrap(), Some(s2));
    let mut want = a.clone();
    want[512..1024].copy_from_slice(&b);
    assert_eq!(read(&*bbr, CS, CS).unwrap(), want);
    assert_eq!(bbr.status().relocations, 2);
}

#[test]
fn without_spares_writes_to_bad_chunks_fail_and_everything_else_goes_on() {
    let disk = Media::new(Arc::new(MemDevice::from_bytes(&pattern(1, 0, 16 * CS))));
    // Header, area 0 and one data chunk: one spare.
    let spares = Arc::new(MemDevice::new(3 * CS));
    let bbr = Bbr::in_memory(disk.clone(), relocation_store(spares)).unwrap();
    disk.bad_write_chunk(6);
    disk.bad_write_chunk(7);
    let a = pattern(2, 0, CS);
    bbr.write_at(&a, 6 * CS, Fua::No).unwrap();
    let err = bbr.write_at(&a, 7 * CS, Fua::No).unwrap_err();
    assert_eq!(err.errno(), libc::EIO, "{err}");
    assert!(err.to_string().contains("no spare"), "{err}");
    assert_eq!(bbr.status().state, "exhausted");
    assert_eq!(bbr.status().spares_left, 0);
    assert_eq!(
        read(&*bbr, 6 * CS, CS).unwrap(),
        a,
        "relocated data still reads"
    );
    assert_eq!(
        read(&*bbr, 7 * CS, CS).unwrap(),
        pattern(1, 7 * CS, CS),
        "reads go on"
    );
    bbr.write_at(&a, 8 * CS, Fua::No).unwrap();
    assert_eq!(
        read(&*bbr, 8 * CS, CS).unwrap(),
        a,
        "healthy chunks take writes"
    );
}

#[test]
fn a_table_that_cannot_be_written_keeps_serving_what_it_relocated() {
    let (disk, spares, bbr) = rig();
    disk.bad_write_chunk(3);
    let a = pattern(5, 0, CS);
    bbr.write_at(&a, 3 * CS, Fua::No).unwrap();
    // The table's area fails: the next relocation cannot be committed.
    spares.bad_write_chunk(1);
    disk.bad_write_chunk(4);
    let err = bbr.write_at(&a, 4 * CS, Fua::No).unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    let st = bbr.status();
    assert_eq!(st.state, "failed", "{st:?}");
    assert!(st.failure.unwrap().contains("relocation table"));
    assert_eq!(
        read(&*bbr, 3 * CS, CS).unwrap(),
        a,
        "relocated data still served"
    );
    assert_eq!(
        read(&*bbr, 4 * CS, CS).unwrap(),
        pattern(1, 4 * CS, CS),
        "the old data, not the failed write"
    );
    bbr.write_at(&a, 5 * CS, Fua::No).unwrap();
    // Reopened, the table (marked invalid) still serves the relocation made before.
    spares.bad_writes.lock().clear();
    let again = Bbr::in_memory(disk.clone(), relocation_store(spares.clone())).unwrap();
    assert_eq!(read(&*again, 3 * CS, CS).unwrap(), a);
    assert_eq!(again.status().state, "failed");
}

#[test]
fn the_table_survives_reopening_and_is_never_taken_for_a_snapshot() {
    let dir = scratch("bbr-reopen");
    let disk = Media::new(Arc::new(MemDevice::from_bytes(&pattern(1, 0, 16 * CS))));
    let spares: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(16 * CS));
    let config = || {
        let mut c = IndexConfig::temporary();
        c.dir = Some(dir.join("index"));
        c
    };
    let list = dir.join("unreadable.json");
    disk.bad_write_chunk(9);
    disk.bad_reads.lock().insert(10 * 8 + 1);
    let data = pattern(8, 0, CS);
    {
        let bbr = Bbr::open(
            disk.clone(),
            relocation_store(spares.clone()),
            config(),
            UnreadableList::open(&list).unwrap(),
        )
        .unwrap();
        bbr.write_at(&data, 9 * CS, Fua::No).unwrap();
        assert!(read(&*bbr, 10 * CS, CS).is_err());
        bbr.flush().unwrap();
        bbr.index().checkpoint().unwrap();
    }
    let head = read(&*spares, 0, 512).unwrap();
    assert_eq!(&head[..4], b"BbRt");
    let err = PersistentStore::open(spares.clone(), None, false).unwrap_err();
    assert!(err.to_string().contains("relocation table"), "{err}");
    disk.bad_reads.lock().clear();
    let bbr = Bbr::open(
        disk,
        relocation_store(spares),
        config(),
        UnreadableList::open(&list).unwrap(),
    )
    .unwrap();
    assert_eq!(read(&*bbr, 9 * CS, CS).unwrap(), data);
    assert!(
        read(&*bbr, 10 * CS, CS).is_err(),
        "the unreadable list is persistent"
    );
    assert!(
        bbr.store().begin_merge().is_err(),
        "a relocation table never merges"
    );
}

#[test]
fn cow_check_and_dump_read_a_relocation_table() {
    use cowsnap_core::exception::persistent::inspect;
    let (disk, spares, bbr) = rig();
    disk.bad_write_chunk(3);
    disk.bad_write_chunk(7);
    bbr.write_at(&pattern(2, 0, 2 * CS), 3 * CS, Fua::No)
        .unwrap();
    bbr.write_at(&pattern(2, 0, CS), 7 * CS, Fua::No).unwrap();
    let report = inspect::check(&*spares);
    assert!(report.is_clean(), "{:?}", report.findings);
    assert_eq!(report.exceptions, 2);
    let header = report.header.unwrap();
    assert_eq!(header.table, TableKind::Relocation);
    let dump = inspect::dump(&*spares).unwrap();
    let olds: Vec<u64> = dump.exceptions.iter().map(|e| e.old).collect();
    assert_eq!(olds, vec![3, 7]);
}

/// A write already going to a chunk's failing place when another write to the chunk
/// fails and relocates it: the relocation waits for it, so the spare holds its bytes.
/// Fails with the mutation `bbr-relocation-not-drained`.
#[test]
fn a_relocation_waits_for_writes_already_going_to_the_failing_chunk() {
    let mem: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(&pattern(1, 0, 16 * CS)));
    let gated = Arc::new(GatedDevice::new(mem));
    let disk = Media::new(gated.clone());
    let bbr = Bbr::in_memory(
        disk.clone(),
        relocation_store(Arc::new(MemDevice::new(16 * CS))),
    )
    .unwrap();
    // Sectors 4..8 of chunk 2 fail writes; sectors 0..4 take them.
    disk.bad_writes.lock().extend(2 * 8 + 4..2 * 8 + 8);
    let gate = gated.gate(OpKind::Write, 2 * CS, 2 * CS + 2048, 1);
    let first = pattern(21, 0, 2048);
    let second = pattern(22, 0, 2048);
    thread::scope(|s| {
        let b1 = bbr.clone();
        let f = first.clone();
        let w1 = s.spawn(move || b1.write_at(&f, 2 * CS, Fua::No));
        gate.wait_arrived(1);
        let b2 = bbr.clone();
        let sd = second.clone();
        let w2 = s.spawn(move || b2.write_at(&sd, 2 * CS + 2048, Fua::No));
        // The relocation waits for the first write, or (without the rule) finishes.
        wait_until(|| bbr.exceptions().drain_waits() >= 1 || w2.is_finished());
        gate.release();
        w1.join().unwrap().unwrap();
        w2.join().unwrap().unwrap();
    });
    let got = read(&*bbr, 2 * CS, CS).unwrap();
    assert!(bbr.relocation_of(Chunk(2)).unwrap().is_some());
    assert_eq!(&got[2048..], &second[..]);
    assert_eq!(
        &got[..2048],
        &first[..],
        "the first write's bytes were left behind on the failing place"
    );
}

/// A write that arrives while its chunk is being relocated waits for the relocation and
/// then goes to the spare: sent to the old place, it would be acknowledged and left
/// behind. Fails with the mutation `bbr-writes-ignore-pending`.
#[test]
fn a_write_during_a_relocation_waits_for_it() {
    let disk = Media::new(Arc::new(MemDevice::from_bytes(&pattern(1, 0, 16 * CS))));
    let spare_mem: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(16 * CS));
    let spares = Arc::new(GatedDevice::new(spare_mem));
    let bbr = Bbr::in_memory(disk.clone(), relocation_store(spares.clone())).unwrap();
    // Sectors 4..8 of chunk 2 fail writes; sectors 0..4 take them.
    disk.bad_writes.lock().extend(2 * 8 + 4..2 * 8 + 8);
    // Hold the relocation's copy to its spare (the table's first data chunk, 2).
    let gate = spares.gate(OpKind::Write, 2 * CS, 3 * CS, 1);
    let first = pattern(41, 0, 2048);
    let second = pattern(42, 0, 2048);
    thread::scope(|s| {
        let b1 = bbr.clone();
        let f = first.clone();
        let w1 = s.spawn(move || b1.write_at(&f, 2 * CS + 2048, Fua::No));
        gate.wait_arrived(1);
        let b2 = bbr.clone();
        let sd = second.clone();
        let w2 = s.spawn(move || b2.write_at(&sd, 2 * CS, Fua::No));
        // The second write waits on the relocation, or (without the rule) finishes.
        wait_until(|| {
            bbr.exceptions()
                .pending(Chunk(2))
                .is_some_and(|p| p.waiters() >= 1)
                || w2.is_finished()
        });
        gate.release();
        w1.join().unwrap().unwrap();
        w2.join().unwrap().unwrap();
    });
    let got = read(&*bbr, 2 * CS, CS).unwrap();
    assert_eq!(&got[2048..], &first[..]);
    assert_eq!(
        &got[..2048],
        &second[..],
        "the write made during the relocation was left behind"
    );
}

/// A write over a listed sector, still clearing the list when a neighbouring write fails
/// and relocates the chunk: the relocation waits for it, so the sector reads the write's
/// data or (when the device cannot give it back) EIO, never the zeros the salvage put on
/// the spare. Fails with the mutation `bbr-cleared-untracked`.
#[test]
fn a_relocation_waits_for_a_write_that_clears_the_list() {
    let mem: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(&pattern(1, 0, 16 * CS)));
    let gated = Arc::new(GatedDevice::new(mem));
    let disk = Media::new(gated.clone());
    let bbr = Bbr::in_memory(
        disk.clone(),
        relocation_store(Arc::new(MemDevice::new(16 * CS))),
    )
    .unwrap();
    // Sector 2*8 (X) cannot be read: a read lists it.
    disk.bad_reads.lock().insert(2 * 8);
    assert!(read(&*bbr, 2 * CS, 512).is_err());
    assert_eq!(bbr.unreadable().ranges(), vec![(16, 1)]);
    // Sectors 4..8 of chunk 2 fail writes.
    disk.bad_writes.lock().extend(2 * 8 + 4..2 * 8 + 8);
    let x = pattern(51, 0, 512);
    let other = pattern(52, 0, 2048);
    // Hold the flush the write over X makes before it clears X from the list.
    let gate = gated.gate(OpKind::Flush, 0, 0, 1);
    thread::scope(|s| {
        let b1 = bbr.clone();
        let xd = x.clone();
        let w1 = s.spawn(move || b1.write_at(&xd, 2 * CS, Fua::No));
        gate.wait_arrived(1);
        let b2 = bbr.clone();
        let od = other.clone();
        let w2 = s.spawn(move || b2.write_at(&od, 2 * CS + 2048, Fua::No));
        wait_until(|| bbr.exceptions().drain_waits() >= 1 || w2.is_finished());
        gate.release();
        w1.join().unwrap().unwrap();
        w2.join().unwrap().unwrap();
    });
    assert!(bbr.relocation_of(Chunk(2)).unwrap().is_some());
    match read(&*bbr, 2 * CS, 512) {
        Ok(got) => assert_eq!(got, x, "sector X reads as other data"),
        Err(e) => assert_eq!(e.errno(), libc::EIO),
    }
    assert_eq!(read(&*bbr, 2 * CS + 2048, 2048).unwrap(), other);
}

/// A power cut at every write and flush of a relocation (spare data, flush, table area),
/// with every subset of unflushed sectors surviving: after restart the chunk reads either
/// its old data (the write was not acknowledged) or the relocated data, and never both
/// in part; an acknowledged write is always there. With `lost_sector`, sector 0 of the
/// chunk cannot be read at the relocation: it must read as EIO after any crash (it is
/// listed before the relocation commits), never as the zeros the spare holds there.
fn relocation_power_cut(lost_sector: bool) {
    let dir = scratch("bbr-crash");
    let old = pattern(1, 0, 8 * CS);
    let data = pattern(30, 0, 1536);
    let mut relocated = old.clone();
    relocated[5 * CS as usize + 512..5 * CS as usize + 2048].copy_from_slice(&data);
    let mut cut = 0;
    loop {
        let list = dir.join(format!("unreadable-{cut}"));
        let power = PowerDomain::new();
        let disk_dev = Arc::new(CrashDevice::from_bytes(&old, power.clone(), "disk"));
        let spare_dev = Arc::new(CrashDevice::in_domain(8 * CS, power.clone(), "spares"));
        let disk = Media::new(disk_dev.clone());
        disk.bad_write_chunk(5);
        if lost_sector {
            disk.bad_reads.lock().insert(5 * 8);
        }
        let open = |disk: Arc<Media>| {
            Bbr::open(
                disk,
                relocation_store(spare_dev.clone()),
                IndexConfig::temporary(),
                UnreadableList::open(&list).unwrap(),
            )
        };
        let bbr = open(disk.clone()).unwrap();
        power.cut_after(cut);
        let acked = bbr.write_at(&data, 5 * CS + 512, Fua::No).is_ok();
        let finished = !power.is_cut();
        drop(bbr);
        for seed in [0, 1, 2, 3] {
            disk_dev.crash(seed);
            spare_dev.crash(seed + cut);
            power.restore();
            let bbr = open(disk.clone())
                .unwrap_or_else(|e| panic!("cut {cut} seed {seed}: reopening: {e}"));
            let skip = if lost_sector {
                assert!(
                    read(&*bbr, 5 * CS, 512).is_err(),
                    "cut {cut} seed {seed}: the lost sector read as data"
                );
                512
            } else {
                0
            };
            let got = [
                read(&*bbr, 0, 5 * CS).unwrap(),
                read(&*bbr, 5 * CS + skip, 3 * CS - skip).unwrap(),
            ]
            .concat();
            let (o, r) = (&old[..], &relocated[..]);
            let cut_out =
                |v: &[u8]| [&v[..(5 * CS) as usize], &v[(5 * CS + skip) as usize..]].concat();
            if acked {
                assert_eq!(
                    got,
                    cut_out(r),
                    "cut {cut} seed {seed}: the acknowledged write was lost"
                );
            } else {
                assert!(
                    got == cut_out(o) || got == cut_out(r),
                    "cut {cut} seed {seed}: neither old nor relocated"
                );
            }
        }
        if finished {
            assert!(acked);
            break;
        }
        cut += 1;
    }
    assert!(
        cut >= 3,
        "a relocation writes the spare, flushes and writes the table: {cut} steps"
    );
}

#[test]
fn a_relocation_survives_a_power_cut_at_every_step() {
    relocation_power_cut(false);
}

#[test]
fn a_relocation_that_lost_a_sector_survives_a_power_cut_at_every_step() {
    relocation_power_cut(true);
}

/// What a sector may read as: a version of its data (`Some`) or EIO (`None`, lost).
type Allowed = BTreeSet<Option<u64>>;

fn sector_bytes(sector: u64, version: u64) -> Vec<u8> {
    let mut b = pattern(sector ^ (version << 32), sector * 512, 512);
    b[..8].copy_from_slice(&sector.to_le_bytes());
    b[8..16].copy_from_slice(&version.to_le_bytes());
    b
}

fn bad_blocks(dust: &dyn Layer) -> BTreeSet<u64> {
    match dust.spec() {
        LayerSpec::TestDust { bad, .. } => bad.into_iter().collect(),
        other => panic!("not a dust layer: {other:?}"),
    }
}

/// The reference of the model test: what each sector may read as, and the devices.
struct Model {
    bbr: Arc<Bbr>,
    disk: Arc<dyn Layer>,
    spare_dust: Arc<dyn Layer>,
    allowed: Vec<Allowed>,
    version: u64,
}

impl Model {
    /// True when chunk `c`'s current place (device or spare) has a dust bad block.
    fn place_bad(&self, c: u64) -> bool {
        match self.bbr.relocation_of(Chunk(c)).unwrap() {
            None => bad_blocks(&*self.disk).contains(&c),
            Some(s) => bad_blocks(&*self.spare_dust).contains(&s.0),
        }
    }

    fn write(&mut self, step: usize, first: u64, len: u64, was_bad: bool) {
        self.version += 1;
        let v = self.version;
        let data: Vec<u8> = (first..first + len)
            .flat_map(|s| sector_bytes(s, v))
            .collect();
        let before = self.bbr.status();
        let range = first as usize..(first + len) as usize;
        match self.bbr.write_at(&data, first * 512, Fua::No) {
            Ok(()) => range.for_each(|s| self.allowed[s] = BTreeSet::from([Some(v)])),
            Err(e) => {
                let after = self.bbr.status();
                assert!(
                    was_bad
                        && (after.state == "exhausted"
                            || after.spare_failures > before.spare_failures),
                    "step {step}: a write failed with spares left and none failing: {e} ({after:?})"
                );
                range.for_each(|s| {
                    self.allowed[s].insert(Some(v));
                });
            }
        }
        // A relocation lists the sectors of the chunk it could not read: only where the
        // chunk's place had a bad block.
        for s in first / 8 * 8..(first + len).div_ceil(8) * 8 {
            if self.bbr.unreadable().intersects(s, s + 1)
                && !self.allowed[s as usize].contains(&None)
            {
                assert!(
                    was_bad,
                    "step {step}: sector {s} listed unreadable on a healthy chunk"
                );
                self.allowed[s as usize] = BTreeSet::from([None]);
            }
        }
    }

    fn read(&mut self, step: usize, first: u64, len: u64, was_bad: bool) {
        let mut buf = vec![0u8; (len * 512) as usize];
        let range = first as usize..(first + len) as usize;
        match self.bbr.read_at(&mut buf, first * 512) {
            Ok(()) => {
                for (i, s) in range.enumerate() {
                    let got = &buf[i * 512..(i + 1) * 512];
                    let v = u64::from_le_bytes(got[8..16].try_into().unwrap());
                    assert_eq!(
                        got,
                        &sector_bytes(s as u64, v)[..],
                        "step {step}: sector {s} reads as other data"
                    );
                    assert!(
                        self.allowed[s].contains(&Some(v)),
                        "step {step}: sector {s} reads version {v}, the model allows {:?}",
                        self.allowed[s]
                    );
                    self.allowed[s] = BTreeSet::from([Some(v)]);
                }
            }
            Err(e) => {
                assert_eq!(e.errno(), libc::EIO, "step {step}: {e}");
                let lost = range.clone().any(|s| self.allowed[s].contains(&None));
                assert!(
                    lost || was_bad,
                    "step {step}: a read of healthy, readable sectors failed: {e}"
                );
                for s in range {
                    if self.bbr.unreadable().intersects(s as u64, s as u64 + 1) {
                        self.allowed[s] = BTreeSet::from([None]);
                    }
                }
            }
        }
    }
}

/// The model test: random reads and writes through a `bbr` whose device and spares both
/// sit on `test-dust` layers, while bad blocks appear (with and without write failures)
/// and disappear on both. Every acknowledged write reads back; a sector reads as one of
/// the versions the model allows and never as other data; a read fails only where the
/// model says the data is lost or the chunk's current place has a bad block; a write fails
/// only once the spares are exhausted or failing. Seed printed.
#[test]
fn random_io_while_blocks_go_bad_matches_the_model() {
    const CHUNKS: u64 = 48;
    const SPARE_CHUNKS: u64 = 14; // header, table area, 12 spares
    let seed = cowsnap_core::testkit::seed();
    let mut rng = SplitMix(seed);
    let sectors = CHUNKS * 8;
    let initial: Vec<u8> = (0..sectors).flat_map(|s| sector_bytes(s, 0)).collect();
    let dust = |dev: Arc<dyn BlockDevice>| {
        LayerSpec::parse("test-dust 8 enabled")
            .unwrap()
            .build(dev)
            .unwrap()
    };
    let disk = dust(Arc::new(MemDevice::from_bytes(&initial)));
    let spare_dust = dust(Arc::new(MemDevice::new(SPARE_CHUNKS * CS)));
    let bbr = Bbr::in_memory(
        disk.clone().as_device(),
        relocation_store(spare_dust.clone().as_device()),
    )
    .unwrap();
    let mut m = Model {
        bbr,
        disk,
        spare_dust,
        allowed: (0..sectors).map(|_| BTreeSet::from([Some(0)])).collect(),
        version: 0,
    };
    for step in 0..3000 {
        let what = rng.below(100);
        if what < 12 {
            // Spare chunks only: the table's own chunks failing is another test's.
            let (layer, b) = if rng.below(3) == 0 {
                (&m.spare_dust, 2 + rng.below(SPARE_CHUNKS - 2))
            } else {
                (&m.disk, rng.below(CHUNKS))
            };
            let (b, fails) = (b.to_string(), rng.below(3).to_string());
            let words: Vec<&str> = match rng.below(3) {
                0 => vec!["removebadblock", &b],
                _ => vec!["addbadblock", &b, &fails],
            };
            let _ = layer.message(&words);
            continue;
        }
        let first = rng.below(sectors);
        let len = 1 + rng.below(24.min(sectors - first));
        let was_bad = (first / 8..=(first + len - 1) / 8).any(|c| m.place_bad(c));
        if what < 60 {
            m.write(step, first, len, was_bad);
        } else {
            m.read(step, first, len, was_bad);
        }
    }
    let st = m.bbr.status();
    eprintln!("model: {st:?}");
    assert!(st.relocations > 0, "the workload relocated nothing: {st:?}");
}
