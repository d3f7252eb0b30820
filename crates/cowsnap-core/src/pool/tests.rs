//! Pool tests: offline table changes, activation, live snapshots, restart, locking.

use super::*;
use crate::copy::Copier;
use crate::dev::Fua;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "cowsnap-pool-{tag}-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    let _ = fs::remove_dir_all(&d);
    d
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn req(name: &str, origin: &str, cow: CowSpec) -> SnapshotRequest {
    SnapshotRequest {
        name: name.into(),
        origin: origin.into(),
        cow,
        chunk_size: None,
        transient: false,
        overflow: false,
    }
}

#[test]
fn offline_pool_lifecycle_and_restart() {
    let dir = tmpdir("life");
    let mut pool = Pool::init(&dir).unwrap();
    assert!(Pool::init(&dir).is_err(), "a second init is refused");
    pool.create_origin("base", 1 << 20).unwrap();
    assert!(pool.create_origin("base", 1 << 20).is_err());
    assert!(pool.create_origin("bad name", 1 << 20).is_err());
    assert!(pool.create_origin("odd", 1000).is_err());
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
    drop(active);

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
    again.remove_snapshot("live").unwrap();
    assert!(!dir.join("live.cow").exists(), "owned COW deleted");
    assert!(again.volume("live").is_none());
    drop(again);
    // Offline status agrees with the live one.
    let offline = Pool::open(&dir)
        .unwrap()
        .list_offline(Arc::new(Copier::default()), None)
        .unwrap();
    let live_s1 = before_remove.iter().find(|v| v.name == "s1").unwrap();
    assert_eq!(offline.iter().find(|v| v.name == "s1").unwrap(), live_s1);
    assert_eq!(offline.len(), 2);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn adopting_a_cow_keeps_it_and_refuses_reuse() {
    let dir = tmpdir("adopt");
    let mut pool = Pool::init(&dir).unwrap();
    pool.create_origin("base", 1 << 20).unwrap();
    let ext = dir.join("external.cow");
    create_new_sparse(&ext, 256 << 10).unwrap();
    let mut r = req("ext", "base", CowSpec::Path(ext.clone()));
    r.chunk_size = Some(ChunkSize::from_sectors(16).unwrap());
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
    // Asking for another chunk size: the header wins, with a warning.
    pool.remove_snapshot("ext").unwrap();
    assert!(ext.exists(), "an adopted COW is never deleted");
    let (entry, warning) = pool
        .create_snapshot(&req("ext2", "base", CowSpec::Path(ext.clone())))
        .unwrap();
    assert_eq!(entry.chunk_sectors, 16);
    assert!(warning.unwrap().contains("overrides"));
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
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn offline_listing_reads_a_zeroed_cow_as_a_fresh_store() {
    let dir = tmpdir("fresh");
    let mut pool = Pool::init(&dir).unwrap();
    pool.create_origin("base", 1 << 20).unwrap();
    pool.create_snapshot(&req("s", "base", CowSpec::Size(256 << 10)))
        .unwrap();
    // Someone zeroes the COW (as lvcreate does to a new COW volume).
    let cow = dir.join("s.cow");
    std::fs::write(&cow, vec![0u8; 256 << 10]).unwrap();
    let list = pool
        .list_offline(Arc::new(Copier::default()), None)
        .unwrap();
    assert_eq!(list[1].status, "16/512 16");
    let one = pool
        .list_offline(Arc::new(Copier::default()), Some("s"))
        .unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0], list[1]);
    // Activation formats it and agrees.
    let (active, _) =
        ActivePool::activate(Pool::open(&dir).unwrap(), Arc::new(Copier::default())).unwrap();
    assert_eq!(active.info("s").unwrap().status, "16/512 16");
    drop(active);
    fs::remove_dir_all(&dir).unwrap();
}
