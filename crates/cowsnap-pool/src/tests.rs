//! Pool tests: offline table changes, activation, live snapshots, restart, locking.

use super::*;
use cowsnap_core::copy::Copier;
use cowsnap_core::dev::Fua;
use cowsnap_core::exception::index::IndexState;
use std::time::Duration;

/// A pool directory `SCRATCH/pool`, not yet created; files a test puts beside it stay in
/// the scratch directory, which goes away with it (also when the test fails).
struct TestDir {
    path: PathBuf,
    _scratch: cowsnap_core::testkit::Scratch,
}

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

fn tmpdir(tag: &str) -> TestDir {
    let scratch = cowsnap_core::testkit::scratch(&format!("pool-{tag}"));
    TestDir {
        path: scratch.join("pool"),
        _scratch: scratch,
    }
}

fn req(name: &str, origin: &str, cow: CowSpec) -> SnapshotRequest {
    SnapshotRequest {
        cow_layers: Vec::new(),
        name: name.into(),
        origin: origin.into(),
        cow,
        chunk_size: None,
        transient: false,
        overflow: false,
        format: false,
    }
}

fn create_new_sparse(path: &Path, size: u64) {
    let f = fs::File::create_new(path).unwrap();
    f.set_len(size).unwrap();
}

fn activate(dir: &Path) -> (ActivePool, Vec<String>) {
    ActivePool::activate(Pool::open(dir).unwrap(), Arc::new(Copier::default())).unwrap()
}

#[test]
fn offline_pool_lifecycle_and_restart() {
    let dir = tmpdir("life");
    let mut pool = Pool::init(&dir).unwrap();
    assert!(Pool::init(&dir).is_err(), "a second init is refused");
    pool.create_origin("base", 1 << 20, &[]).unwrap();
    assert!(pool.create_origin("base", 1 << 20, &[]).is_err());
    assert!(pool.create_origin("bad name", 1 << 20, &[]).is_err());
    assert!(pool.create_origin("odd", 1000, &[]).is_err());
    let (entry, warning) = pool
        .create_snapshot(&req("s1", "base", CowSpec::Size(256 << 10)))
        .unwrap();
    assert_eq!(entry.store, "P");
    assert_eq!(entry.chunk_sectors, 8);
    assert!(warning.is_none());
    {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(dir.join("s1.cow")).unwrap();
        assert!(m.blocks() * 512 >= 256 << 10, "the COW's space is reserved");
    }
    assert!(pool
        .create_snapshot(&req("s2", "nope", CowSpec::Size(256 << 10)))
        .is_err());
    assert!(
        pool.create_snapshot(&req("s3", "base", CowSpec::Size(4096)))
            .is_err(),
        "a COW under 3 chunks is refused"
    );
    let mut t = req("t", "base", CowSpec::Size(256 << 10));
    t.transient = true;
    assert!(
        pool.create_snapshot(&t).is_err(),
        "transient needs a daemon"
    );

    // Bring it to life, write through the origin, check the snapshot.
    let (active, warnings) =
        ActivePool::activate(Pool::open(&dir).unwrap(), Arc::new(Copier::default())).unwrap();
    assert!(warnings.is_empty());
    let origin = active.origin("base").unwrap();
    origin.write_at(&[7u8; 8192], 4096, Fua::No).unwrap();
    let (_, snap) = active.volume("s1").unwrap();
    let mut buf = vec![1u8; 8192];
    snap.read_at(&mut buf, 4096).unwrap();
    assert_eq!(buf, vec![0u8; 8192]);
    let info = active.info("s1").unwrap();
    assert_eq!(
        info.status, "32/512 16",
        "next_free 4 (header, area, 2 data chunks) x 8 sectors"
    );
    assert_eq!(info.exceptions, Some(2));

    // A live snapshot sees the origin as it is now.
    let (live, _) = active
        .create_snapshot(&req("live", "base", CowSpec::Size(256 << 10)))
        .unwrap();
    assert_eq!(live.status, "16/512 16");
    origin.write_at(&[9u8; 4096], 4096, Fua::No).unwrap();
    let (_, live_dev) = active.volume("live").unwrap();
    live_dev.read_at(&mut buf[..4096], 4096).unwrap();
    assert_eq!(&buf[..4096], &[7u8; 4096]);
    // A transient snapshot is allowed live, and dropped at the next activation.
    let mut t = req("temp", "base", CowSpec::Size(64 << 10));
    t.transient = true;
    active.create_snapshot(&t).unwrap();
    assert_eq!(active.list().len(), 4);
    active.flush_all().unwrap();
    // Every handle goes, as when a process exits: the files are claimed until then.
    drop((active, origin, live_dev, snap));

    // Restart: every volume reads the same.
    let (again, warnings) =
        ActivePool::activate(Pool::open(&dir).unwrap(), Arc::new(Copier::default())).unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("temp"));
    let (_, snap) = again.volume("s1").unwrap();
    snap.read_at(&mut buf, 4096).unwrap();
    assert_eq!(buf, vec![0u8; 8192]);
    let (_, live_dev) = again.volume("live").unwrap();
    live_dev.read_at(&mut buf[..4096], 4096).unwrap();
    assert_eq!(&buf[..4096], &[7u8; 4096]);
    assert_eq!(again.info("s1").unwrap().status, "32/512 16");
    let before_remove = again.list();
    again.remove_snapshot("live", false).unwrap();
    assert!(!dir.join("live.cow").exists(), "owned COW deleted");
    assert!(again.volume("live").is_none());
    drop((again, live_dev, snap));
    // Offline status agrees with the live one (the index through the sidecar the live
    // pool checkpointed; the cache's counters are the process's own).
    let offline = Pool::open(&dir)
        .unwrap()
        .list_offline(Arc::new(Copier::default()), None)
        .unwrap();
    let mut live_s1 = before_remove
        .iter()
        .find(|v| v.name == "s1")
        .unwrap()
        .clone();
    let mut off_s1 = offline.iter().find(|v| v.name == "s1").unwrap().clone();
    let index = off_s1.index.take().unwrap();
    assert_eq!(index.state, IndexState::Loaded { replayed: 0 });
    assert_eq!((index.exceptions, index.covered, index.recent), (2, 2, 0));
    live_s1.index = None;
    live_s1.cache = None;
    off_s1.cache = None;
    assert_eq!(off_s1, live_s1);
    assert_eq!(offline.len(), 2);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn adopting_a_cow_keeps_it_and_refuses_reuse() {
    let dir = tmpdir("adopt");
    let mut pool = Pool::init(&dir).unwrap();
    pool.create_origin("base", 1 << 20, &[]).unwrap();
    let ext = dir.join("external.cow");
    create_new_sparse(&ext, 256 << 10);
    let mut r = req("ext", "base", CowSpec::Path(ext.clone()));
    r.chunk_size = Some(ChunkSize::from_sectors(16).unwrap());
    let e = pool.create_snapshot(&r).unwrap_err();
    assert!(e.to_string().contains("--format"), "{e}");
    r.format = true;
    let (entry, _) = pool.create_snapshot(&r).unwrap();
    assert!(!entry.owned);
    assert_eq!(entry.chunk_sectors, 16);
    // The same COW cannot serve two snapshots, nor the origin image.
    assert!(pool
        .create_snapshot(&req("again", "base", CowSpec::Path(ext.clone())))
        .is_err());
    assert!(pool
        .create_snapshot(&req("self", "base", CowSpec::Path(dir.join("base.img"))))
        .is_err());
    // Removing an adopted COW keeps the file but marks it invalid: adopted again, it is
    // not mistaken for a point in time of the origin.
    assert!(pool.remove_snapshot("ext", false).unwrap().is_empty());
    assert!(ext.exists(), "an adopted COW is never deleted");
    let (entry, warning) = pool
        .create_snapshot(&req("ext2", "base", CowSpec::Path(ext.clone())))
        .unwrap();
    assert_eq!(entry.chunk_sectors, 16);
    assert_eq!(
        warning, None,
        "no chunk size was asked for: the header's is taken"
    );
    let list = pool
        .list_offline(Arc::new(Copier::default()), Some("ext2"))
        .unwrap();
    assert_eq!(list[0].status, "Invalid");
    fs::remove_dir_all(&dir).unwrap();
}

/// A COW formatted outside the pool with 8 KiB chunks, at `path`.
fn external_8k_cow(path: &Path) {
    let dev = FileDevice::create(path, 256 << 10).unwrap();
    let eight_k = ChunkSize::from_bytes(8192).unwrap();
    let store = PersistentStore::open(Arc::new(dev), Some(eight_k), false).unwrap();
    store.load(Default::default(), &mut |_, _| Ok(())).unwrap();
}

#[test]
fn an_adopted_cow_keeps_its_chunk_size_with_a_warning_only_when_another_was_asked_for() {
    let dir = tmpdir("adopt-chunk");
    let mut pool = Pool::init(&dir).unwrap();
    pool.create_origin("base", 1 << 20, &[]).unwrap();
    let adopt = |pool: &mut Pool, name: &str, asked: Option<u64>| {
        let cow = dir.join(format!("{name}.ext"));
        external_8k_cow(&cow);
        let mut r = req(name, "base", CowSpec::Path(cow));
        r.chunk_size = asked.map(|b| ChunkSize::from_bytes(b).unwrap());
        let (entry, warning) = pool.create_snapshot(&r).unwrap();
        assert_eq!(entry.chunk_sectors, 16, "{name}: the header's chunk size");
        warning
    };
    assert_eq!(adopt(&mut pool, "unasked", None), None);
    assert_eq!(adopt(&mut pool, "same", Some(8192)), None);
    let warning = adopt(&mut pool, "other", Some(4096)).unwrap();
    assert!(
        warning.contains("chunk size 8K overrides the 4K asked for"),
        "{warning}"
    );
    // A COW the pool makes takes the one default chunk size.
    let (entry, _) = pool
        .create_snapshot(&req("made", "base", CowSpec::Size(256 << 10)))
        .unwrap();
    assert_eq!(entry.chunk_sectors, ChunkSize::DEFAULT.sectors());
    fs::remove_dir_all(&dir).unwrap();
}

/// The origin's bytes, for "the victim is unchanged" checks.
fn bytes(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap()
}

#[test]
fn a_cow_that_aliases_a_volume_is_refused_whatever_its_path() {
    let dir = tmpdir("alias");
    let mut pool = Pool::init(&dir).unwrap();
    pool.create_origin("base", 1 << 20, &[]).unwrap();
    let origin = dir.join("base.img");
    fs::write(&origin, vec![0x5au8; 1 << 20]).unwrap();
    pool.create_snapshot(&req("s", "base", CowSpec::Size(256 << 10)))
        .unwrap();
    let hard = dir.join("hard.img");
    fs::hard_link(&origin, &hard).unwrap();
    let sym = dir.join("sym.img");
    std::os::unix::fs::symlink(&origin, &sym).unwrap();
    let cow_link = dir.join("cowlink");
    fs::hard_link(dir.join("s.cow"), &cow_link).unwrap();
    let cow_before = bytes(&dir.join("s.cow"));
    for (path, what) in [
        (&hard, "origin"),
        (&sym, "origin"),
        (&cow_link, "COW of snapshot"),
    ] {
        for format in [false, true] {
            let mut r = req("victim", "base", CowSpec::Path(path.clone()));
            r.format = format;
            let e = pool.create_snapshot(&r).unwrap_err().to_string();
            assert!(
                e.contains("already used by this pool") && e.contains(what),
                "{e}"
            );
        }
        let e = pool.add_origin("o2", path, &[]).unwrap_err().to_string();
        assert!(e.contains("already used by this pool"), "{e}");
    }
    assert_eq!(bytes(&origin), vec![0x5au8; 1 << 20]);
    assert_eq!(bytes(&dir.join("s.cow")), cow_before);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_manifest_pointing_a_cow_at_another_volume_fails_that_snapshot_only() {
    let dir = tmpdir("alias-start");
    let mut pool = Pool::init(&dir).unwrap();
    pool.create_origin("base", 1 << 20, &[]).unwrap();
    pool.create_origin("other", 1 << 20, &[]).unwrap();
    fs::write(dir.join("base.img"), vec![0x11u8; 1 << 20]).unwrap();
    pool.create_snapshot(&req("a", "base", CowSpec::Size(256 << 10)))
        .unwrap();
    pool.create_snapshot(&req("b", "base", CowSpec::Size(256 << 10)))
        .unwrap();
    pool.create_snapshot(&req("c", "other", CowSpec::Size(256 << 10)))
        .unwrap();
    // Hand edits: b's COW names the origin image, c's names a's COW; no ids recorded
    // (as a version 1 manifest, or an edit that dropped them).
    let mut m = Manifest::load(&dir).unwrap();
    for s in &mut m.snapshots {
        s.id = None;
    }
    m.snapshots[1].cow = "base.img".into();
    m.snapshots[2].cow = "a.cow".into();
    m.store(&dir).unwrap();
    let a_before = bytes(&dir.join("a.cow"));
    let (active, warnings) = activate(&dir);
    let info = |n: &str| active.info(n).unwrap();
    assert_eq!(info("a").status.split('/').count(), 2, "a is served");
    for (name, victim) in [("b", "origin \"base\""), ("c", "snapshot \"a\"")] {
        let i = info(name);
        assert_eq!(i.status, "Failed", "{i:?}");
        let e = i.error.unwrap();
        assert!(e.contains("same file as") && e.contains(victim), "{e}");
        assert!(warnings.iter().any(|w| w.contains(name)), "{warnings:?}");
    }
    // Their origins are read-only: a write could not be copied out to the failed ones.
    assert!(info("base").read_only.unwrap().contains("\"b\""));
    assert!(active.read_only_reason("other").is_some());
    assert!(active.volume("b").is_none());
    drop(active);
    assert_eq!(bytes(&dir.join("base.img")), vec![0x11u8; 1 << 20]);
    assert_eq!(bytes(&dir.join("a.cow")), a_before);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_file_with_data_is_never_formatted() {
    let dir = tmpdir("noformat");
    let mut pool = Pool::init(&dir).unwrap();
    pool.create_origin("base", 1 << 20, &[]).unwrap();
    // Like a fresh mkfs.ext4 image: zeros first, a superblock at 1024, more data later.
    let fs_img = dir.join("ext4.img");
    let mut data = vec![0u8; 512 << 10];
    data[1024..1024 + 16].copy_from_slice(b"superblock-here!");
    data[300 << 10] = 1;
    fs::write(&fs_img, &data).unwrap();
    for format in [false, true] {
        let mut r = req("s", "base", CowSpec::Path(fs_img.clone()));
        r.format = format;
        let e = pool.create_snapshot(&r).unwrap_err().to_string();
        let want = if format { "not all zeros" } else { "--format" };
        assert!(e.contains(want), "{e}");
    }
    assert_eq!(bytes(&fs_img), data);
    assert!(pool.manifest().snapshots.is_empty());
    // Live, a transient store would write over it too.
    let (active, _) = activate(&dir);
    for format in [false, true] {
        let mut r = req("t", "base", CowSpec::Path(fs_img.clone()));
        r.transient = true;
        r.format = format;
        let e = active.create_snapshot(&r).unwrap_err().to_string();
        let want = if format { "not all zeros" } else { "--format" };
        assert!(e.contains(want), "{e}");
    }
    drop(active);
    assert_eq!(bytes(&fs_img), data);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_failed_remove_leaves_the_snapshot_working() {
    let dir = tmpdir("failremove");
    let mut pool = Pool::init(&dir).unwrap();
    pool.create_origin("base", 1 << 20, &[]).unwrap();
    pool.create_snapshot(&req("s", "base", CowSpec::Size(256 << 10)))
        .unwrap();
    let (active, _) = activate(&dir);
    // The manifest cannot be rewritten (as on a full file system): its temporary name
    // is taken by a directory.
    let tmp = dir.join(".pool.json.tmp");
    fs::create_dir(&tmp).unwrap();
    assert!(active.remove_snapshot("s", false).is_err());
    let origin = active.origin("base").unwrap();
    origin.write_at(&[9u8; 4096], 0, Fua::Yes).unwrap();
    let (_, snap) = active.volume("s").unwrap();
    let mut buf = vec![1u8; 4096];
    snap.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![0u8; 4096], "the snapshot still takes copy-outs");
    // Every handle goes, as when a process exits: the files are claimed until then.
    drop((active, origin, snap));
    fs::remove_dir(&tmp).unwrap();
    // After a restart it is still there and exact.
    let (active, _) = activate(&dir);
    let (_, snap) = active.volume("s").unwrap();
    snap.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![0u8; 4096]);
    assert!(active.remove_snapshot("s", false).unwrap().is_empty());
    assert!(!dir.join("s.cow").exists());
    drop(active);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_removal_marked_before_a_crash_is_finished_at_the_next_open() {
    let dir = tmpdir("marked");
    let mut pool = Pool::init(&dir).unwrap();
    pool.create_origin("base", 1 << 20, &[]).unwrap();
    pool.create_snapshot(&req("s", "base", CowSpec::Size(256 << 10)))
        .unwrap();
    let ext = dir.join("ext.cow");
    create_new_sparse(&ext, 256 << 10);
    let mut r = req("adopted", "base", CowSpec::Path(ext.clone()));
    r.format = true;
    pool.create_snapshot(&r).unwrap();
    // The state a crash right after the first step of both removals leaves.
    pool.mark_removing("s").unwrap();
    pool.mark_removing("adopted").unwrap();
    drop(pool);
    let pool = Pool::open(&dir).unwrap();
    assert!(pool.manifest().snapshots.is_empty());
    assert!(!dir.join("s.cow").exists());
    assert_eq!(pool.notes().len(), 2, "{:?}", pool.notes());
    // The adopted COW stays, marked invalid.
    let raw = bytes(&ext);
    assert_eq!(&raw[..4], b"SnAp");
    assert_eq!(raw[4], 0, "valid flag cleared");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn leftovers_of_interrupted_creates_and_removes_are_settled() {
    let dir = tmpdir("leftover");
    let mut pool = Pool::init(&dir).unwrap();
    pool.create_origin("base", 1 << 20, &[]).unwrap();
    pool.create_snapshot(&req("s", "base", CowSpec::Size(256 << 10)))
        .unwrap();
    // A create that crashed before its commit, and a remove after its commit.
    fs::write(dir.join(".late.cow.new"), b"x").unwrap();
    fs::write(dir.join(".gone.cow.del"), b"x").unwrap();
    // A create that committed but crashed before the rename.
    fs::rename(dir.join("s.cow"), dir.join(".s.cow.new")).unwrap();
    // Not ours: another kind of file with a staged-looking name is left alone.
    fs::create_dir(dir.join(".keep.new")).unwrap();
    drop(pool);
    let mut pool = Pool::open(&dir).unwrap();
    assert!(!dir.join(".late.cow.new").exists());
    assert!(!dir.join(".gone.cow.del").exists());
    assert!(dir.join("s.cow").exists());
    assert!(dir.join(".keep.new").exists());
    assert_eq!(pool.notes().len(), 4, "{:?}", pool.notes());
    // The name of an interrupted create is free.
    pool.create_snapshot(&req("late", "base", CowSpec::Size(256 << 10)))
        .unwrap();
    // A failed create leaves nothing behind: what an origin of almost 16 TiB can need is
    // a COW larger than ext4's largest file, refused at once (no space taken meanwhile).
    let big = dir.with_extension("big.img");
    create_new_sparse(&big, (1 << 44) - (1 << 20));
    pool.add_origin("bigbase", &big, &[]).unwrap();
    assert!(pool
        .create_snapshot(&req("huge", "bigbase", CowSpec::Size(1 << 60)))
        .is_err());
    assert!(pool.create_origin("huge2", 1 << 60, &[]).is_err());
    let names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("huge"))
        .collect();
    assert!(names.is_empty(), "{names:?}");
    fs::remove_dir_all(&dir).unwrap();
    fs::remove_file(&big).unwrap();
}

#[test]
fn pool_files_are_private() {
    use std::os::unix::fs::MetadataExt;
    let dir = tmpdir("private");
    let mut pool = Pool::init(&dir).unwrap();
    pool.create_origin("base", 1 << 20, &[]).unwrap();
    pool.create_snapshot(&req("s", "base", CowSpec::Size(256 << 10)))
        .unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    for f in ["pool.json", "base.img", "s.cow"] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    assert!(Pool::open(&dir).unwrap().notes().is_empty());
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let notes = Pool::open(&dir).unwrap().notes().to_vec();
    assert!(
        notes.iter().any(|n| n.contains("chmod go-rwx")),
        "{notes:?}"
    );
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn one_process_holds_a_pool() {
    let dir = tmpdir("lock");
    Pool::init(&dir).unwrap();
    let held = PoolLock::acquire(&dir).unwrap();
    let e = PoolLock::acquire(&dir).unwrap_err();
    assert!(
        e.to_string().contains(&std::process::id().to_string()),
        "{e}"
    );
    drop(held);
    PoolLock::acquire(&dir).unwrap();
    // A waiter gets the lock when its holder lets go; a short wait gives up naming it.
    let held = PoolLock::acquire(&dir).unwrap();
    let mut told = Vec::new();
    let e = PoolLock::acquire_waiting(&dir, Duration::from_millis(100), &mut |m| {
        told.push(m.to_string());
    })
    .unwrap_err();
    assert!(
        e.to_string().contains(&std::process::id().to_string()),
        "{e}"
    );
    assert_eq!(told.len(), 1, "{told:?}");
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(held);
    });
    PoolLock::acquire_waiting(&dir, Duration::from_secs(30), &mut |_| {}).unwrap();
    release.join().unwrap();
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_zeroed_pool_cow_fails_its_snapshot_and_is_never_reformatted() {
    let dir = tmpdir("fresh");
    let mut pool = Pool::init(&dir).unwrap();
    pool.create_origin("base", 1 << 20, &[]).unwrap();
    pool.create_snapshot(&req("s", "base", CowSpec::Size(256 << 10)))
        .unwrap();
    pool.create_snapshot(&req("t", "base", CowSpec::Size(256 << 10)))
        .unwrap();
    // Someone zeroes the COW's header.
    let cow = dir.join("s.cow");
    let mut raw = bytes(&cow);
    raw[..512].fill(0);
    fs::write(&cow, &raw).unwrap();
    let list = pool
        .list_offline(Arc::new(Copier::default()), None)
        .unwrap();
    let s = list.iter().find(|v| v.name == "s").unwrap();
    assert_eq!(s.status, "Failed");
    assert!(s.error.as_ref().unwrap().contains("zeroed"), "{s:?}");
    // One bad COW does not take the pool down: the rest is served, the origin read-only.
    let (active, _) = activate(&dir);
    let s = active.info("s").unwrap();
    assert_eq!(s.status, "Failed");
    assert!(s.error.unwrap().contains("will not reformat"));
    assert!(active.volume("t").is_some());
    assert!(active.read_only_reason("base").is_some());
    assert_eq!(bytes(&cow), raw, "never reformatted");
    // Removing the failed snapshot makes the origin writable again.
    active.remove_snapshot("s", false).unwrap();
    assert!(active.read_only_reason("base").is_none());
    assert!(!cow.exists());
    drop(active);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_format_interrupted_before_its_commit_leaves_no_valid_header() {
    let dir = tmpdir("fmtcrash");
    let mut pool = Pool::init(&dir).unwrap();
    pool.create_origin("base", 1 << 20, &[]).unwrap();
    let outside = tmpdir("fmtcrash-user");
    fs::create_dir_all(&outside).unwrap();
    let ext = outside.join("zeros.cow");
    create_new_sparse(&ext, 256 << 10);
    let mut r = req("s", "base", CowSpec::Path(ext.clone()));
    r.format = true;
    // The steps of a create up to the format, then a "crash" (nothing more happens).
    let prepared = pool.prepare_snapshot(&r).unwrap();
    pool.guard_format(&prepared).unwrap();
    prepared
        .store
        .load(Default::default(), &mut |_, _| Ok(()))
        .unwrap();
    assert_eq!(&bytes(&ext)[..4], b"SnAp");
    drop(prepared);
    drop(pool);
    let pool = Pool::open(&dir).unwrap();
    assert!(
        pool.manifest().snapshot("s").is_none(),
        "the create did not happen"
    );
    let raw = bytes(&ext);
    assert_eq!(raw[4], 0, "the header the format wrote is marked invalid");
    fs::remove_dir_all(&dir).unwrap();
    fs::remove_dir_all(&outside).unwrap();
}

#[test]
fn pools_keep_to_their_own_directory() {
    let dir = tmpdir("own");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("notes.txt"), b"mine").unwrap();
    let e = Pool::init(&dir).unwrap_err().to_string();
    assert!(e.contains("not empty"), "{e}");
    fs::remove_file(dir.join("notes.txt")).unwrap();
    let mut pool = Pool::init(&dir).unwrap();
    pool.create_origin("base", 1 << 20, &[]).unwrap();
    // The pool's own files are never adopted.
    let staged = dir.join(".x.cow.new");
    create_new_sparse(&staged, 256 << 10);
    for p in [staged.clone(), dir.join(MANIFEST)] {
        let mut r = req("s", "base", CowSpec::Path(p));
        r.format = true;
        let e = pool.create_snapshot(&r).unwrap_err().to_string();
        assert!(e.contains("pool's own files"), "{e}");
    }
    // A hand-edited manifest cannot make the pool own a file outside it.
    let mut m = Manifest::load(&dir).unwrap();
    m.origins[0].path = "../elsewhere.img".into();
    let e = m.store(&dir).unwrap_err().to_string();
    assert!(e.contains("plain name inside the pool"), "{e}");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_staged_file_is_matched_by_its_name_as_well_as_its_inode() {
    let dir = tmpdir("reuse");
    let mut pool = Pool::init(&dir).unwrap();
    pool.create_origin("base", 1 << 20, &[]).unwrap();
    pool.create_snapshot(&req("x", "base", CowSpec::Size(256 << 10)))
        .unwrap();
    // x's COW went missing, and a staged file of another name got its inode number.
    fs::rename(dir.join("x.cow"), dir.join(".y.cow.new")).unwrap();
    drop(pool);
    let pool = Pool::open(&dir).unwrap();
    assert!(
        !dir.join("x.cow").exists(),
        "another volume's staged file was renamed to x.cow"
    );
    assert!(
        !dir.join(".y.cow.new").exists(),
        "a staged file of no entry is deleted"
    );
    drop(pool);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_cow_size_in_percent_of_the_origin_and_one_too_big_is_capped() {
    let dir = tmpdir("cowsize");
    let mut pool = Pool::init(&dir).unwrap();
    pool.create_origin("o", 8 << 20, &[]).unwrap();
    let (_, warning) = pool
        .create_snapshot(&req("p", "o", CowSpec::PercentOfOrigin(25)))
        .unwrap();
    assert!(warning.is_none(), "{warning:?}");
    assert_eq!(fs::metadata(dir.join("p.cow")).unwrap().len(), 2 << 20);
    // 8 MiB in 4 KiB chunks: 2048 chunks, 9 metadata areas (8 full ones and the next),
    // and the header.
    let max = max_cow_bytes(8 << 20, ChunkSize::DEFAULT);
    assert_eq!(max, (1 + 9 + 2048) * 4096);
    let (_, warning) = pool
        .create_snapshot(&req("big", "o", CowSpec::Size(1 << 30)))
        .unwrap();
    let warning = warning.expect("a capped COW says so");
    assert!(
        warning.contains("more than snapshot \"big\" can ever use"),
        "{warning}"
    );
    assert_eq!(fs::metadata(dir.join("big.cow")).unwrap().len(), max);
    // The capped COW takes a copy of every origin chunk and stays valid.
    drop(pool);
    let (active, _) = activate(&dir);
    let o = active.origin("o").unwrap();
    o.write_at(&vec![7u8; 8 << 20], 0, Fua::No).unwrap();
    let big = active.snapshot("big").unwrap();
    assert!(big.is_valid(), "{:?}", big.invalid_reason());
    assert_eq!(big.exceptions().completed_count(), 2048);
    assert!(
        !active.snapshot("p").unwrap().is_valid(),
        "25% could not hold it all"
    );
}
