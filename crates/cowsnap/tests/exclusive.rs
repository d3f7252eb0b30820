//! Exclusive access and aliasing with real programs: QEMU honours cowsnap's claim on a
//! served image and cowsnap honours QEMU's; a mounted block device is refused; a COW that
//! is the origin under another name (hard link, symlink, another device node) is refused
//! and the victim's bytes stay unchanged; the pool is private to its owner.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{is_root, need_tools, Pool};

#[test]
fn qemu_and_cowsnap_see_each_others_claims() {
    need_tools(&["qemu-io", "qemu-nbd"]);
    let pool = Pool::new("qemu");
    pool.ok(&["origin", "create", "o", "--size", "4M"]);
    let img = pool.path("o.img");
    let daemon = pool.serve();
    // QEMU refuses to write an image cowsnap serves, as it refuses one qemu-nbd serves
    // (`qemu-img info` shares writes, so it is not a test of this).
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x66 0 4k",
            img.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Failed to get \"write\" lock"),
        "qemu-io wrote a served image: {err}"
    );
    assert!(
        std::fs::read(&img).unwrap().iter().all(|&b| b == 0),
        "the image changed"
    );
    daemon.stop_ok();
    // And cowsnap refuses an image QEMU holds, naming the holder.
    let mut qnbd = Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "-k",
            pool.path("q.sock").to_str().unwrap(),
            img.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !pool.path("q.sock").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-nbd did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The daemon starts, and serves the origin as failed, naming the holder.
    let daemon = pool.serve();
    let info = pool.ok(&["status", "o", "--json"]);
    let (st, out) = daemon.stop();
    assert!(st.success(), "{out:?}");
    let _ = qnbd.kill();
    let _ = qnbd.wait();
    let err = out.join("\n");
    assert!(
        err.contains("is in use") && err.contains("qemu-nbd"),
        "{err}"
    );
    assert!(
        info.contains("\"Failed\"") && info.contains("qemu-nbd"),
        "{info}"
    );
}

#[test]
fn a_second_pool_cannot_take_an_origin_of_the_first() {
    let a = Pool::new("pool-a");
    let b = Pool::new("pool-b");
    a.ok(&["origin", "create", "o", "--size", "1M"]);
    let img = a.path("o.img");
    b.ok(&["origin", "add", "shared", "--path", img.to_str().unwrap()]);
    let daemon = a.serve();
    let err = b.refused(&[
        "snapshot",
        "create",
        "s",
        "--origin",
        "shared",
        "--cow-size",
        "256K",
    ]);
    assert!(err.contains("is in use"), "{err}");
    assert!(
        b.path("s.cow").metadata().is_err(),
        "a refused create leaves no file"
    );
    // b's daemon starts, with the origin a holds failed and not served.
    let daemon_b = b.serve();
    let info = b.ok(&["status", "shared", "--json"]);
    assert!(info.contains("\"Failed\""), "{info}");
    daemon_b.stop_ok();
    daemon.stop_ok();
}

#[test]
fn a_cow_aliasing_the_origin_is_refused_by_every_name() {
    let pool = Pool::new("alias");
    pool.ok(&["origin", "create", "o", "--size", "1M"]);
    let img = pool.path("o.img");
    std::fs::write(&img, vec![0x42u8; 1 << 20]).unwrap();
    let hard = pool.dir.with_extension("hard");
    let _ = std::fs::remove_file(&hard);
    std::fs::hard_link(&img, &hard).unwrap();
    let sym = pool.dir.with_extension("sym");
    let _ = std::fs::remove_file(&sym);
    std::os::unix::fs::symlink(&img, &sym).unwrap();
    for p in [&hard, &sym] {
        let err = pool.refused(&[
            "snapshot",
            "create",
            "s",
            "--origin",
            "o",
            "--cow",
            p.to_str().unwrap(),
            "--format",
        ]);
        assert!(
            err.contains("already used by this pool") && err.contains("origin \"o\""),
            "{err}"
        );
    }
    assert_eq!(std::fs::read(&img).unwrap(), vec![0x42u8; 1 << 20]);
    let _ = std::fs::remove_file(&hard);
    let _ = std::fs::remove_file(&sym);
}

/// A loop device over `file`; detached when dropped.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Option<Loop> {
        let out = Command::new("losetup")
            .args(["-f", "--show", file.to_str().unwrap()])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| Loop(String::from_utf8_lossy(&out.stdout).trim().to_string()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn a_mounted_block_device_and_two_names_of_one_device_are_refused() {
    if !is_root() {
        eprintln!("SKIP a_mounted_block_device: needs root for loop devices");
        assert!(std::env::var("CI").is_err(), "CI runs as root");
        return;
    }
    need_tools(&["mkfs.ext4"]);
    let pool = Pool::new("blk");
    let backing = pool.dir.with_extension("ext4");
    std::fs::write(&backing, vec![0u8; 16 << 20]).unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", backing.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
    let Some(lo) = Loop::attach(&backing) else {
        panic!("losetup failed: loop devices are needed by this test");
    };
    let mnt = pool.dir.with_extension("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let st = Command::new("mount")
        .args([&lo.0, mnt.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success(), "mount {}", lo.0);
    let err = pool.refused(&["origin", "add", "disk", "--path", &lo.0]);
    let _ = Command::new("umount").arg(&mnt).status();
    assert!(
        err.contains("is in use") && err.contains("mounted on"),
        "{err}"
    );
    // Unmounted, it is accepted; the same device under another node name is refused
    // as a COW (it is the origin).
    pool.ok(&["origin", "add", "disk", "--path", &lo.0]);
    // Another device node of the same block device (as /dev/block/M:m would be).
    let node = pool.dir.with_extension("node");
    let _ = std::fs::remove_file(&node);
    let mm = major_minor(&lo.0);
    let (ma, mi) = mm.split_once(':').unwrap();
    let st = Command::new("mknod")
        .args([node.to_str().unwrap(), "b", ma, mi])
        .status()
        .unwrap();
    assert!(st.success(), "mknod {mm}");
    let err = pool.refused(&[
        "snapshot",
        "create",
        "s",
        "--origin",
        "disk",
        "--cow",
        node.to_str().unwrap(),
        "--format",
    ]);
    let _ = std::fs::remove_file(&node);
    assert!(
        err.contains("already used by this pool") && err.contains("origin \"disk\""),
        "{err}"
    );
    // A loop device over a pool file is that file: refused as a COW of another origin.
    pool.ok(&["origin", "create", "img", "--size", "4M"]);
    let over = Loop::attach(&pool.path("img.img")).expect("losetup over the origin image");
    let err = pool.refused(&[
        "snapshot", "create", "s2", "--origin", "disk", "--cow", &over.0, "--format",
    ]);
    assert!(
        err.contains("already used by this pool") && err.contains("origin \"img\""),
        "{err}"
    );
    drop(over);
    let _ = std::fs::remove_dir(&mnt);
    let _ = std::fs::remove_file(&backing);
}

fn major_minor(dev: &str) -> String {
    let out = Command::new("stat")
        .args(["-L", "-c", "%t:%T", dev])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    let mut it = s
        .trim()
        .split(':')
        .map(|h| u64::from_str_radix(h, 16).unwrap());
    format!("{}:{}", it.next().unwrap(), it.next().unwrap())
}

#[test]
fn the_pool_is_private_to_its_owner() {
    let pool = Pool::new("private");
    pool.ok(&["origin", "create", "o", "--size", "1M"]);
    pool.ok(&[
        "snapshot",
        "create",
        "s",
        "--origin",
        "o",
        "--cow-size",
        "256K",
    ]);
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&pool.dir), 0o700);
    for f in ["pool.json", "o.img", "s.cow", "daemon.lock"] {
        assert_eq!(mode(&pool.path(f)), 0o600, "{f}");
    }
    if is_root() {
        // An unprivileged user can read none of it, even with the directory opened up.
        std::fs::set_permissions(&pool.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = Command::new("runuser")
            .args([
                "-u",
                "nobody",
                "--",
                "cat",
                pool.path("o.img").to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(!out.status.success(), "user nobody read the origin image");
        // And cowsnap warns about the opened directory.
        let err = String::from_utf8_lossy(&pool.run(&["list"]).stderr).into_owned();
        assert!(err.contains("chmod go-rwx"), "{err}");
    }
}
