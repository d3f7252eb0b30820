//! The real `cowsnap` binary, really started, driven by real clients: qemu-io, qemu-img,
//! nbdinfo, nbdcopy, fio (nbd engine), and ext4 through a FUSE file and a loop device.
//!
//! A test that needs a tool fails when the tool is missing under CI (`CI` set); elsewhere
//! it prints a SKIP line and returns.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small constants"
)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

mod common;

use common::{ci, have_tool, need_tools, require_tools, run, scratch, Daemon, Scratch, BIN};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A pool (`SCRATCH/pool`) in a fresh scratch directory, removed when dropped.
struct TestPool {
    dir: PathBuf,
    _scratch: Scratch,
}

impl TestPool {
    fn new(tag: &str) -> TestPool {
        let scratch = scratch(tag);
        let p = TestPool {
            dir: scratch.join("pool"),
            _scratch: scratch,
        };
        run(p.cmd().arg("init"));
        p
    }

    /// A new pool holding one origin `name` of `size` (K/M/G suffixes).
    fn with_origin(tag: &str, name: &str, size: &str) -> TestPool {
        let p = TestPool::new(tag);
        run(p.cmd().args(["origin", "create", name, "--size", size]));
        p
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env("COWSNAP_POOL", &self.dir);
        c
    }

    fn sock(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock().display())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Daemon {
    fn start(pool: &TestPool, args: &[&str]) -> Daemon {
        Daemon::spawn(pool.cmd().arg("serve").args(args))
    }
}

fn qemu_io(target: &str, cmd: &str) -> String {
    stdout(&run(
        Command::new("qemu-io").args(["-f", "raw", "-c", cmd, target])
    ))
}

/// `qemu-img compare` of two raw images (a file or an NBD URI); fails the test if they differ.
fn qemu_img_compare(a: &str, b: &str) {
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", a, b]));
}

fn sha256_of(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    stdout(&out).split_whitespace().next().unwrap().to_string()
}

/// A local raw image of `size` bytes, zero-filled (sparse).
fn raw_image(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

#[test]
fn qemu_io_live_snapshot_and_qemu_img_compare() {
    if !require_tools(&["qemu-io", "qemu-img"]) {
        return;
    }
    let pool = TestPool::with_origin("qemu", "disk", "32M");
    let d = Daemon::start(&pool, &[]);
    // The pattern before the snapshot, written through NBD and into a reference image.
    let old_ref = pool.path("ref-old.img");
    let new_ref = pool.path("ref-new.img");
    raw_image(&old_ref, 32 << 20);
    for (cmd, off) in [("write -P 0xaa 0 4M", 0), ("write -P 0x5c 20M 3M", 1)] {
        let _ = off;
        qemu_io(&pool.uri("disk"), cmd);
        qemu_io(old_ref.to_str().unwrap(), cmd);
    }
    // Snapshot live, while the daemon serves the origin.
    let out = run(pool.cmd().args([
        "snapshot",
        "create",
        "snap",
        "--origin",
        "disk",
        "--cow-size",
        "16M",
        "--json",
    ]));
    let info: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(info["status"], "16/32768 16");
    std::fs::copy(&old_ref, &new_ref).unwrap();
    for cmd in [
        "write -P 0xbb 1M 1M",
        "write -P 0xcc 4094k 8k",
        "write -P 0xdd 31M 1M",
    ] {
        qemu_io(&pool.uri("disk"), cmd);
        qemu_io(new_ref.to_str().unwrap(), cmd);
    }
    // The snapshot keeps the old pattern, the origin has the new one.
    assert!(qemu_io(&pool.uri("snap"), "read -P 0xaa 1M 1M").contains("read 1048576/1048576"));
    assert!(qemu_io(&pool.uri("disk"), "read -P 0xbb 1M 1M").contains("read 1048576/1048576"));
    qemu_img_compare(old_ref.to_str().unwrap(), &pool.uri("snap"));
    qemu_img_compare(new_ref.to_str().unwrap(), &pool.uri("disk"));
    // A snapshot write changes the snapshot only.
    qemu_io(&pool.uri("snap"), "write -P 0xee 8M 64k");
    assert!(qemu_io(&pool.uri("snap"), "read -P 0xee 8M 64k").contains("read 65536/65536"));
    assert!(qemu_io(&pool.uri("disk"), "read -P 0 8M 64k").contains("read 65536/65536"));
    let (st, _) = d.stop();
    assert!(st.success());
}

#[test]
fn nbdinfo_nbdcopy_fio_and_restart() {
    if !require_tools(&["nbdinfo", "nbdcopy", "fio", "qemu-io"]) {
        return;
    }
    let pool = TestPool::with_origin("copy", "disk", "64M");
    run(pool
        .cmd()
        .args(["origin", "create", "other", "--size", "8M"]));
    let d = Daemon::start(&pool, &["--direct", "--workers", "8"]);
    qemu_io(&pool.uri("disk"), "write -P 0x11 0 8M");
    qemu_io(&pool.uri("disk"), "write -P 0x22 40M 2M");
    // Reference of the snapshot view: the origin as it is now, copied out.
    let reference = pool.path("reference.img");
    run(Command::new("nbdcopy").args([&pool.uri("disk"), reference.to_str().unwrap()]));
    run(pool.cmd().args([
        "snapshot",
        "create",
        "snap",
        "--origin",
        "disk",
        "--cow-size",
        "48M",
    ]));
    // Every export is listed with its size.
    let list = stdout(&run(Command::new("nbdinfo").args([
        "--list",
        &format!("nbd+unix:///?socket={}", pool.sock().display()),
    ])));
    for (name, size) in [
        ("disk", 67108864u64),
        ("other", 8388608),
        ("snap", 67108864),
    ] {
        let at = list
            .find(&format!("export=\"{name}\""))
            .unwrap_or_else(|| panic!("{name} not listed:\n{list}"));
        assert!(
            list[at..].contains(&format!("export-size: {size}")),
            "{name} size:\n{list}"
        );
    }
    // fio with verification, 16 requests in flight, on the origin (copy-out under load)
    // and on the snapshot; the daemon bypasses the page cache (O_DIRECT).
    for export in ["disk", "snap"] {
        let out = run(Command::new("fio").args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", pool.uri(export)),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=16M",
            "--offset=12M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--randrepeat=0",
            "--output-format=terse",
        ]));
        let terse = stdout(&out);
        // Terse field 5 is the error count.
        let err = terse.split(';').nth(4).unwrap_or("?");
        assert_eq!(err, "0", "fio errors on {export}: {terse}");
    }
    // The snapshot's view below the fio region is untouched; nbdcopy it out. Its first
    // 12 MiB equal the reference's.
    let copy = pool.path("snap-copy.img");
    run(Command::new("nbdcopy").args([&pool.uri("snap"), copy.to_str().unwrap()]));
    let head = |p: &Path| {
        let mut f = std::fs::File::open(p).unwrap();
        let mut b = vec![0u8; 12 << 20];
        f.read_exact(&mut b).unwrap();
        b
    };
    assert!(
        head(&copy) == head(&reference),
        "snapshot differs from the reference"
    );
    let before = pool.path("before.img");
    std::fs::rename(&copy, &before).unwrap();
    let disk_before = pool.path("disk-before.img");
    run(Command::new("nbdcopy").args([&pool.uri("disk"), disk_before.to_str().unwrap()]));

    // Restart: stop, start again, every volume reads the same.
    let (st, out) = d.stop();
    assert!(st.success(), "{out:?}");
    assert!(out.iter().any(|l| l.contains("stopped")), "{out:?}");
    let d = Daemon::start(&pool, &["--direct", "--workers", "8"]);
    let after = pool.path("after.img");
    run(Command::new("nbdcopy").args([&pool.uri("snap"), after.to_str().unwrap()]));
    assert_eq!(sha256_of(&before), sha256_of(&after));
    let disk_after = pool.path("disk-after.img");
    run(Command::new("nbdcopy").args([&pool.uri("disk"), disk_after.to_str().unwrap()]));
    assert_eq!(sha256_of(&disk_before), sha256_of(&disk_after));
    drop(d);
}

#[test]
fn ext4_through_fuse_and_loop_with_a_live_snapshot() {
    let tools = [
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "mount",
        "umount",
        "fsfreeze",
        "fusermount3",
    ];
    if !require_tools(&tools) {
        return;
    }
    if !Path::new("/dev/fuse").exists() || !Path::new("/dev/loop-control").exists() {
        assert!(!ci(), "/dev/fuse or /dev/loop-control missing under CI");
        eprintln!("SKIP ext4_through_fuse: no /dev/fuse or loop devices");
        return;
    }
    let pool = TestPool::with_origin("ext4", "disk", "64M");
    let files = pool.path("files");
    let d = Daemon::start(&pool, &["--fuse", files.to_str().unwrap()]);
    let loop_dev = stdout(&run(Command::new("losetup").args([
        "-f",
        "--show",
        files.join("disk").to_str().unwrap(),
    ])))
    .trim()
    .to_string();
    let m1 = pool.path("m1");
    let m2 = pool.path("m2");
    std::fs::create_dir_all(&m1).unwrap();
    std::fs::create_dir_all(&m2).unwrap();
    let cleanup = Cleanup(vec![
        format!("umount {} 2>/dev/null", m2.display()),
        format!("umount {} 2>/dev/null", m1.display()),
        format!("losetup -d {loop_dev} 2>/dev/null"),
    ]);
    run(Command::new("mkfs.ext4").args(["-q", &loop_dev]));
    run(Command::new("mount").args([&loop_dev, m1.to_str().unwrap()]));
    std::fs::write(m1.join("a.txt"), b"version one\n").unwrap();
    let big: Vec<u8> = (0..3 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(m1.join("big"), &big).unwrap();
    run(&mut Command::new("sync"));
    let sum_a = sha256_of(&m1.join("a.txt"));
    let sum_big = sha256_of(&m1.join("big"));
    // Freeze the filesystem for the instant of the snapshot, as LVM users do.
    run(Command::new("fsfreeze").args(["-f", m1.to_str().unwrap()]));
    let created = pool
        .cmd()
        .args([
            "snapshot",
            "create",
            "snap",
            "--origin",
            "disk",
            "--cow-size",
            "32M",
        ])
        .output()
        .unwrap();
    run(Command::new("fsfreeze").args(["-u", m1.to_str().unwrap()]));
    assert!(created.status.success(), "{created:?}");
    std::fs::write(m1.join("a.txt"), b"version two\n").unwrap();
    std::fs::remove_file(m1.join("big")).unwrap();
    run(&mut Command::new("sync"));
    assert!(
        files.join("snap").exists(),
        "the new snapshot's file appears live"
    );
    let snap_loop = stdout(&run(Command::new("losetup").args([
        "-r",
        "-f",
        "--show",
        files.join("snap").to_str().unwrap(),
    ])))
    .trim()
    .to_string();
    let mut cleanup = cleanup;
    cleanup
        .0
        .insert(1, format!("losetup -d {snap_loop} 2>/dev/null"));
    let fsck = Command::new("e2fsck")
        .args(["-n", "-f", &snap_loop])
        .output()
        .unwrap();
    assert!(fsck.status.success(), "e2fsck -n on the snapshot: {fsck:?}");
    run(Command::new("mount").args(["-o", "ro", &snap_loop, m2.to_str().unwrap()]));
    assert_eq!(std::fs::read(m2.join("a.txt")).unwrap(), b"version one\n");
    assert_eq!(sha256_of(&m2.join("a.txt")), sum_a);
    assert_eq!(sha256_of(&m2.join("big")), sum_big);
    assert_eq!(std::fs::read(m1.join("a.txt")).unwrap(), b"version two\n");
    drop(cleanup);
    let (st, out) = d.stop();
    assert!(st.success(), "{out:?}");
}

/// Shell commands run when dropped, to leave no mount or loop device behind.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.0 {
            let _ = Command::new("sh").args(["-c", c]).status();
        }
    }
}

#[test]
fn a_second_daemon_bad_clients_and_bad_arguments_are_refused_cleanly() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let pool = TestPool::with_origin("refuse", "disk", "8M");
    let d = Daemon::start(&pool, &[]);
    // A second daemon on the same pool: one clear line, non-zero exit.
    let second = pool.cmd().arg("serve").output().unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("in use by another cowsnap process"), "{err}");
    // Clients that break the protocol do not disturb the others.
    {
        let mut s = UnixStream::connect(pool.sock()).unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        s.write_all(&[0, 0]).unwrap(); // truncated client flags, then hang up
    }
    {
        let mut s = UnixStream::connect(pool.sock()).unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        s.write_all(&[0, 0, 0, 3]).unwrap();
        s.write_all(b"garbage that is not IHAVEOPT").unwrap();
    }
    assert!(qemu_io(&pool.uri("disk"), "write -P 0x42 0 64k").contains("wrote 65536/65536"));
    assert!(qemu_io(&pool.uri("disk"), "read -P 0x42 0 64k").contains("read 65536/65536"));
    // Bad arguments: one line, non-zero.
    for args in [
        vec!["list", "--bogus"],
        vec!["origin", "create", "x", "--size", "12Q"],
        vec![
            "snapshot",
            "create",
            "s",
            "--origin",
            "nope",
            "--cow-size",
            "4M",
        ],
        vec![
            "snapshot",
            "create",
            "s",
            "--origin",
            "disk",
            "--cow-size",
            "4M",
            "--chunk-size",
            "3K",
        ],
        vec!["status", "missing"],
    ] {
        let out = pool.cmd().args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: not one line: {err}"
        );
        assert!(err.starts_with("cowsnap: error:"), "{args:?}: {err}");
    }
    // Without --pool or COWSNAP_POOL.
    let out = Command::new(BIN)
        .arg("list")
        .env_remove("COWSNAP_POOL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pool"));
    drop(d);
}

#[test]
fn json_outputs_are_stable() {
    let pool = TestPool::with_origin("json", "disk", "8M");
    run(pool.cmd().args([
        "snapshot",
        "create",
        "s",
        "--origin",
        "disk",
        "--cow-size",
        "1M",
        "--overflow",
        "--chunk-size",
        "8K",
    ]));
    let list: serde_json::Value =
        serde_json::from_str(&stdout(&run(pool.cmd().args(["list", "--json"])))).unwrap();
    let arr = list.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    assert_eq!(arr[0]["name"], "disk");
    assert_eq!(arr[0]["kind"], "origin");
    assert_eq!(arr[1]["kind"], "snapshot");
    assert_eq!(arr[1]["store"], "PO");
    assert_eq!(arr[1]["chunk_size"], 8192);
    assert_eq!(arr[1]["status"], "32/2048 32");
    assert_eq!(arr[1]["usage"]["metadata_sectors"], 32);
    // 32 of 2048 sectors, as `lvs` shows a snapshot's Data%.
    assert_eq!(arr[1]["use_percent"], 1.5625);
    let list = stdout(&run(pool.cmd().args(["list"])));
    assert!(list.contains("32/2048 32 (1.6% used)"), "{list}");
    let status = stdout(&run(pool.cmd().args(["status"])));
    assert!(
        status.contains("s: 0 16384 snapshot 32/2048 32"),
        "{status}"
    );
    assert!(status.contains("disk: 0 16384 snapshot-origin"), "{status}");
}

#[test]
fn systemd_socket_activation_via_nbdinfo() {
    if !require_tools(&["nbdinfo"]) {
        return;
    }
    let pool = TestPool::with_origin("sa", "disk", "16M");
    // nbdinfo starts the server with LISTEN_FDS/LISTEN_PID, as systemd does.
    let out = run(Command::new("nbdinfo")
        .args(["--list", "--", "[", BIN, "serve", "]"])
        .env("COWSNAP_POOL", &pool.dir));
    let text = stdout(&out);
    assert!(text.contains("export=\"disk\""), "{text}");
    assert!(text.contains("export-size: 16777216"), "{text}");
    assert!(
        !pool.sock().exists(),
        "no socket of its own under socket activation"
    );
}

/// The kernel rig beside the checkout (CI clones with `shared/` next to it).
fn kernel_rig() -> PathBuf {
    let rig = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/kernel-rig");
    assert!(
        rig.join("fixtures/p16-basic/cow.img.gz").exists(),
        "kernel fixtures missing at {}",
        rig.display()
    );
    rig
}

#[test]
fn a_cow_written_by_the_kernel_is_adopted_and_served_identically() {
    if !require_tools(&["nbdcopy", "gzip"]) {
        return;
    }
    let rig = kernel_rig();
    let fixture = rig.join("fixtures/p16-basic");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("manifest.json")).unwrap())
            .unwrap();
    // The snapshot view's sha256 as the kernel computed it.
    let want_sha =
        find_key(&manifest, "snapshot_view_sha256").expect("manifest has snapshot_view_sha256");
    let pool = TestPool::new("adopt");
    // The origin as the kernel left it, rebuilt from the manifest; the COW, unpacked.
    let origin = pool.path("kernel-origin.img");
    run(Command::new("/usr/bin/python3").args([
        rig.join("make-fixtures.py").to_str().unwrap(),
        "gen-origin",
        origin.to_str().unwrap(),
        fixture.join("manifest.json").to_str().unwrap(),
        "final",
    ]));
    let cow = pool.path("kernel.cow");
    let unpacked =
        run(Command::new("gzip").args(["-dc", fixture.join("cow.img.gz").to_str().unwrap()]));
    std::fs::write(&cow, &unpacked.stdout).unwrap();
    run(pool
        .cmd()
        .args(["origin", "add", "base", "--path", origin.to_str().unwrap()]));
    // Asking for 4K chunks: the header's 8K wins, with a warning.
    let out = run(pool.cmd().args([
        "snapshot",
        "create",
        "kernel-snap",
        "--origin",
        "base",
        "--cow",
        cow.to_str().unwrap(),
        "--chunk-size",
        "4K",
        "--json",
    ]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("overrides"));
    let info: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(info["chunk_size"], 8192);
    assert_eq!(info["status"], "240/32768 32", "the kernel's status line");
    assert_eq!(info["exceptions"], 13);
    let d = Daemon::start(&pool, &["--read-only", "kernel-snap"]);
    let copy = pool.path("view.img");
    run(Command::new("nbdcopy").args([&pool.uri("kernel-snap"), copy.to_str().unwrap()]));
    assert_eq!(
        sha256_of(&copy),
        want_sha,
        "snapshot view differs from the kernel's"
    );
    // Exported read-only: writes are refused, the view is unchanged.
    if have_tool("qemu-io") {
        let w = Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 1 0 4k",
                &pool.uri("kernel-snap"),
            ])
            .output()
            .unwrap();
        let text = format!("{}{}", stdout(&w), String::from_utf8_lossy(&w.stderr));
        assert!(
            !text.contains("wrote 4096/4096"),
            "a read-only export took a write: {text}"
        );
    }
    drop(d);
    let status = stdout(&run(pool.cmd().args(["status", "kernel-snap"])));
    assert_eq!(status.trim(), "kernel-snap: 0 131072 snapshot 240/32768 32");
}

/// The first string value under `key` anywhere in a JSON document.
fn find_key(v: &serde_json::Value, key: &str) -> Option<String> {
    match v {
        serde_json::Value::Object(m) => m
            .get(key)
            .and_then(|x| x.as_str().map(str::to_string))
            .or_else(|| m.values().find_map(|x| find_key(x, key))),
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_key(x, key)),
        _ => None,
    }
}

// The control socket's limits (control.rs): a client has this long for its request line.
const CONTROL_DEADLINE: Duration = Duration::from_secs(5);
const CONTROL_MAX_CLIENTS: usize = 32;

impl TestPool {
    fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }
}

/// A field of /proc/PID/status, in its unit (kB for VmRSS).
fn proc_status(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

/// Waits until the daemon runs at most `n` threads; returns the last count.
fn settle_threads(pid: u32, n: usize, within: Duration) -> usize {
    let end = Instant::now() + within;
    loop {
        let t = threads(pid);
        if t <= n || Instant::now() > end {
            return t;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a command and returns its output and how long it took.
fn timed(cmd: &mut Command) -> (Output, Duration) {
    let start = Instant::now();
    let out = run(cmd);
    (out, start.elapsed())
}

/// Reads one reply line from `s` (empty when the daemon closed without one).
fn reply_line(s: &UnixStream, within: Duration) -> String {
    s.set_read_timeout(Some(within)).unwrap();
    let mut line = String::new();
    // A reset after the reply counts as a close.
    let _ = BufReader::new(s).read_line(&mut line);
    line
}

#[test]
fn a_stalled_control_client_delays_no_command() {
    let pool = TestPool::with_origin("stall", "disk", "8M");
    let d = Daemon::start(&pool, &[]);
    let stalled = UnixStream::connect(pool.control()).unwrap();
    (&stalled).write_all(br#"{"op":"li"#).unwrap();
    let start = Instant::now();
    let (out, _) = timed(pool.cmd().arg("list"));
    assert!(stdout(&out).contains("disk"), "{}", stdout(&out));
    let (out, _) = timed(pool.cmd().args([
        "snapshot",
        "create",
        "s",
        "--origin",
        "disk",
        "--cow-size",
        "1M",
    ]));
    assert!(
        stdout(&out).contains("created snapshot s"),
        "{}",
        stdout(&out)
    );
    let took = start.elapsed();
    // Both ran while the stalled client still held its connection, unanswered.
    assert!(took < CONTROL_DEADLINE, "list + create took {took:?}");
    stalled.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let pending = (&stalled).read(&mut byte);
    assert!(
        matches!(&pending, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the stalled client was answered before the commands finished: {pending:?}"
    );
    let list: serde_json::Value =
        serde_json::from_str(&stdout(&run(pool.cmd().args(["list", "--json"])))).unwrap();
    let names: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["disk", "s"]);
    // The snapshot is served too.
    if have_tool("qemu-io") {
        assert!(qemu_io(&pool.uri("s"), "read -P 0 0 64k").contains("read 65536/65536"));
    }
    stalled.set_nonblocking(false).unwrap();
    let answer = reply_line(&stalled, CONTROL_DEADLINE + Duration::from_secs(5));
    assert!(answer.contains("no complete request"), "{answer:?}");
    let (st, _) = d.stop();
    assert!(st.success());
}

#[test]
fn a_huge_control_request_is_refused_without_growing_the_daemon() {
    let pool = TestPool::with_origin("huge", "disk", "8M");
    let d = Daemon::start(&pool, &[]);
    // Warm up the control path once, so the baseline includes a client thread's stack.
    run(pool.cmd().arg("list"));
    std::thread::sleep(Duration::from_millis(200));
    let rss_before = proc_status(d.pid(), "VmRSS");
    let s = UnixStream::connect(pool.control()).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    (&s).write_all(br#"{"op":"list","pad":""#).unwrap();
    // Stream 300 MB of one line, without holding it: the daemon stops reading early.
    let chunk = vec![b'a'; 64 << 10];
    let total: u64 = 300 << 20;
    let mut sent = 0u64;
    while sent < total {
        match (&s).write(&chunk) {
            Ok(n) => sent += n as u64,
            Err(e) => {
                assert!(
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                    ),
                    "after {sent} bytes: {e}"
                );
                break;
            }
        }
    }
    assert!(
        sent < 16 << 20,
        "the daemon read {sent} bytes of one request"
    );
    let answer = reply_line(&s, Duration::from_secs(10));
    assert!(
        answer.is_empty() || answer.contains("request too long"),
        "{answer:?}"
    );
    let rss_after = proc_status(d.pid(), "VmRSS");
    assert!(
        rss_after < rss_before + 4096,
        "VmRSS grew from {rss_before} kB to {rss_after} kB"
    );
    assert!(stdout(&run(pool.cmd().arg("list"))).contains("disk"));
    let (st, out) = d.stop();
    assert!(st.success());
    assert!(
        out.iter().any(|l| l.contains("request too long")),
        "{out:?}"
    );
}

#[test]
fn many_idle_control_clients_keep_the_daemon_bounded() {
    let pool = TestPool::with_origin("idle", "disk", "8M");
    let d = Daemon::start(&pool, &[]);
    run(pool.cmd().arg("list"));
    std::thread::sleep(Duration::from_millis(200));
    let base = threads(d.pid());
    let idle: Vec<UnixStream> = (0..100)
        .map(|_| UnixStream::connect(pool.control()).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let during = threads(d.pid());
    assert!(
        during <= base + CONTROL_MAX_CLIENTS,
        "{during} threads with 100 idle clients (base {base})"
    );
    // Those beyond the bound were told at once.
    let busy = idle[CONTROL_MAX_CLIENTS..]
        .iter()
        .filter(|s| reply_line(s, Duration::from_secs(2)).contains("busy"))
        .count();
    assert_eq!(busy, 100 - CONTROL_MAX_CLIENTS);
    // A command still gets through, at the latest when the idle clients' deadline ends,
    // while they stay connected.
    let (out, took) = timed(pool.cmd().arg("list"));
    assert!(stdout(&out).contains("disk"));
    assert!(
        took < CONTROL_DEADLINE + Duration::from_secs(5),
        "list took {took:?}"
    );
    // Idle clients hold nothing beyond the deadline.
    let after = settle_threads(d.pid(), base, CONTROL_DEADLINE + Duration::from_secs(5));
    assert!(after <= base, "{after} threads left (base {base})");
    for s in &idle[..CONTROL_MAX_CLIENTS] {
        assert!(reply_line(s, Duration::from_secs(5)).contains("no complete request"));
    }
    drop(idle);
    let (st, _) = d.stop();
    assert!(st.success());
}

#[test]
fn a_slow_control_client_is_cut_off_by_the_total_deadline() {
    let pool = TestPool::with_origin("slow", "disk", "8M");
    let d = Daemon::start(&pool, &[]);
    let s = UnixStream::connect(pool.control()).unwrap();
    let start = Instant::now();
    let writer = s.try_clone().unwrap();
    // One byte every 250 ms, never a newline: no single read ever waits long.
    let trickle = std::thread::spawn(move || {
        let mut n = 0u32;
        for b in br#"{"op":"list""#.iter().chain(std::iter::repeat(&b' ')) {
            if (&writer).write_all(&[*b]).is_err() {
                break;
            }
            n += 1;
            std::thread::sleep(Duration::from_millis(250));
        }
        n
    });
    let answer = reply_line(&s, CONTROL_DEADLINE * 3);
    let took = start.elapsed();
    assert!(answer.contains("no complete request within"), "{answer:?}");
    assert!(
        took >= CONTROL_DEADLINE - Duration::from_millis(100)
            && took < CONTROL_DEADLINE + Duration::from_secs(3),
        "cut off after {took:?}"
    );
    // The daemon closed the connection: the trickle ends.
    let sent = trickle.join().unwrap();
    assert!(sent >= 15, "only {sent} bytes were sent");
    let (st, _) = d.stop();
    assert!(st.success());
}

#[test]
fn a_command_gives_up_on_a_daemon_that_does_not_answer() {
    let pool = TestPool::with_origin("mute", "disk", "8M");
    // Something listens on the control socket and never answers.
    let listener = std::os::unix::net::UnixListener::bind(pool.control()).unwrap();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in listener.incoming().take(2) {
            conns.push(c.unwrap());
        }
        std::thread::sleep(Duration::from_secs(5));
    });
    let sock = pool.control().display().to_string();
    for (flag, env) in [(Some("--timeout=1"), None), (None, Some("1"))] {
        let mut cmd = pool.cmd();
        cmd.args(flag).arg("list");
        if let Some(v) = env {
            cmd.env("COWSNAP_TIMEOUT", v);
        }
        let start = Instant::now();
        let out = cmd.output().unwrap();
        let took = start.elapsed();
        assert!(!out.status.success());
        assert!(took < Duration::from_secs(4), "gave up after {took:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!("the daemon at {sock} did not answer within 1 s"))
                && err.contains("--timeout"),
            "{err}"
        );
    }
    held.join().unwrap();
}

#[test]
fn an_invalid_snapshot_does_not_fail_the_stop() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let pool = TestPool::with_origin("invalid", "disk", "8M");
    let d = Daemon::start(&pool, &[]);
    run(pool.cmd().args([
        "snapshot",
        "create",
        "s",
        "--origin",
        "disk",
        "--cow-size",
        "64K",
    ]));
    // 1 MiB of origin writes need far more old chunks than 64K holds: s is dropped.
    assert!(qemu_io(&pool.uri("disk"), "write -P 0x5a 0 1M").contains("wrote 1048576/1048576"));
    let status = stdout(&run(pool.cmd().args(["status", "s"])));
    assert!(status.contains("Invalid"), "{status}");
    // While serving, the invalid snapshot still fails I/O, as the kernel's does.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4k", &pool.uri("s")])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Input/output error"), "{text}");
    let (st, out) = d.stop();
    assert!(st.success(), "exit {st}: {out:?}");
    assert!(
        out.iter().any(|l| l.contains("snapshot s is invalid")),
        "{out:?}"
    );
    assert!(out.iter().any(|l| l == "cowsnap: stopped"), "{out:?}");
    // The origin's data was flushed and is there after the stop.
    let d = Daemon::start(&pool, &[]);
    assert!(qemu_io(&pool.uri("disk"), "read -P 0x5a 0 1M").contains("read 1048576/1048576"));
    let (st, _) = d.stop();
    assert!(st.success());
}

/// Runs tests/zero_probe.py against `uri` for one phase.
fn zero_probe(uri: &str, phase: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/zero_probe.py");
    let out = run(Command::new("/usr/bin/python3").args([script, uri, phase]));
    assert!(stdout(&out).contains(&format!("{phase}: ok")), "{out:?}");
}

/// A 256 MiB sparse image with 1 MiB of data at a few offsets, and the offsets.
fn sparse_image(path: &Path) -> Vec<u64> {
    const MIB: u64 = 1 << 20;
    let offsets = vec![0, 70 * MIB + 4096, 150 * MIB, 255 * MIB];
    let f = std::fs::File::create(path).unwrap();
    f.set_len(256 * MIB).unwrap();
    for (i, &off) in offsets.iter().enumerate() {
        let data: Vec<u8> = (0..MIB as usize)
            .map(|j| (j as u8).wrapping_mul(31).wrapping_add(i as u8 + 1) | 1)
            .collect();
        std::os::unix::fs::FileExt::write_all_at(&f, &data, off).unwrap();
    }
    offsets
}

/// `nbdinfo --map` as (offset, length, type).
fn nbd_map(uri: &str) -> Vec<(u64, u64, u32)> {
    stdout(&run(Command::new("nbdinfo").args(["--map", uri])))
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect()
}

/// Asserts that the map reports every data range as data and everything else of the
/// 256 MiB image (outside the data's 1 MiB neighbourhood) with `zero_bits` set.
fn check_sparse_map(uri: &str, data: &[u64], zero_bits: u32) {
    const MIB: u64 = 1 << 20;
    let map = nbd_map(uri);
    for &(off, len, ty) in &map {
        let near_data = data
            .iter()
            .any(|&d| off < d + 2 * MIB && d.saturating_sub(MIB) < off + len);
        if data.iter().any(|&d| off < d + MIB && d < off + len) {
            assert_eq!(
                ty & 2,
                0,
                "{uri}: data at {off}+{len} reported as zero: {map:?}"
            );
        } else if !near_data {
            assert_eq!(
                ty & zero_bits,
                zero_bits,
                "{uri}: zeros at {off}+{len} reported as {ty}: {map:?}"
            );
        }
    }
}

#[test]
fn big_zero_requests_fast_zero_and_nbdcopy_of_a_sparse_image() {
    need_tools(&["nbdcopy", "nbdinfo", "python3-nbd"]);
    let pool = TestPool::with_origin("zero", "disk", "256M");
    let d = Daemon::start(&pool, &[]);
    // Without snapshots an origin zeroes fast by punching a hole.
    zero_probe(&pool.uri("disk"), "origin-alone");
    run(pool.cmd().args([
        "snapshot",
        "create",
        "snap",
        "--origin",
        "disk",
        "--cow-size",
        "300M",
    ]));
    // With one, only ranges the snapshot already holds are fast; 200 MiB in one request.
    zero_probe(&pool.uri("disk"), "origin-snapshot");
    zero_probe(&pool.uri("snap"), "snapshot");

    // nbdcopy sends zero requests of up to 120 MiB for the holes; copy a sparse image into
    // each export and back, byte for byte.
    let src = pool.path("sparse.img");
    let data = sparse_image(&src);
    let want = std::fs::read(&src).unwrap();
    for export in ["snap", "disk"] {
        run(Command::new("nbdcopy").args([src.to_str().unwrap(), &pool.uri(export)]));
        let back = pool.path(&format!("{export}-back.img"));
        run(Command::new("nbdcopy").args([&pool.uri(export), back.to_str().unwrap()]));
        let got = std::fs::read(&back).unwrap();
        assert_eq!(got.len(), want.len(), "{export}: size");
        assert!(
            got == want,
            "{export}: the copy back differs from the image"
        );
    }
    // Block status: the origin reports its zeroed ranges as holes (hole|zero), the
    // snapshot as zeros.
    check_sparse_map(&pool.uri("disk"), &data, 3);
    check_sparse_map(&pool.uri("snap"), &data, 2);
    let (st, out) = d.stop();
    assert!(st.success(), "{out:?}");
}

#[test]
fn max_connections_refuses_the_extra_clients_with_one_log_line() {
    need_tools(&["nbdinfo", "python3-nbd"]);
    let pool = TestPool::with_origin("maxconn", "disk", "8M");
    let d = Daemon::start(&pool, &["--max-connections", "2"]);
    let mut held: Vec<UnixStream> = (0..2)
        .map(|_| {
            let mut s = UnixStream::connect(pool.sock()).unwrap();
            let mut g = [0u8; 18];
            s.read_exact(&mut g).unwrap();
            assert_eq!(&g[..8], b"NBDMAGIC");
            s
        })
        .collect();
    for _ in 0..5 {
        let mut s = UnixStream::connect(pool.sock()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 1];
        assert!(
            matches!(s.read(&mut b), Ok(0) | Err(_)),
            "a third connection was served"
        );
    }
    held.clear();
    // Served again once the two are gone (their connection threads notice the close).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new("nbdinfo")
            .arg(pool.uri("disk"))
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "nbdinfo is still refused");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (st, out) = d.stop();
    assert!(st.success(), "{out:?}");
    let lines: Vec<_> = out
        .iter()
        .filter(|l| l.contains("refused a connection"))
        .collect();
    assert_eq!(lines.len(), 1, "{out:?}");
    assert!(lines[0].contains("--max-connections"), "{out:?}");
}

fn status_json(pool: &TestPool, name: &str) -> serde_json::Value {
    serde_json::from_str(&stdout(&run(pool.cmd().args(["status", name, "--json"])))).unwrap()
}

/// The exception index through the daemon: 40 Ki exceptions (past one checkpoint) with a
/// 64 KiB cache, a clean restart that replays nothing, a SIGKILL that replays the tail, a
/// damaged superblock that is rebuilt with a warning; the snapshot reads the same through all.
#[test]
fn the_exception_index_survives_restarts_crashes_and_damage() {
    if !require_tools(&["qemu-io", "nbdcopy"]) {
        return;
    }
    let pool = TestPool::with_origin("index", "disk", "192M");
    let small = ["--cache-size", "64K"];
    // The snapshot's view, read by nbdcopy, as a hash.
    let view = pool.path("view.img");
    let snap_sha = || {
        run(Command::new("nbdcopy").args([&pool.uri("snap"), view.to_str().unwrap()]));
        sha256_of(&view)
    };
    let d = Daemon::start(&pool, &small);
    run(pool.cmd().args([
        "snapshot",
        "create",
        "snap",
        "--origin",
        "disk",
        "--cow-size",
        "200M",
    ]));
    qemu_io(&pool.uri("disk"), "write -P 0x33 0 160M");
    let want = snap_sha();
    let s = status_json(&pool, "snap");
    assert_eq!(s["index"]["exceptions"], 40960, "{s}");
    // Under COWSNAP_INDEX_STRESS (CI's second run) the cache is 4 pages and checkpoints
    // come every 8 exceptions.
    let stress = std::env::var_os("COWSNAP_INDEX_STRESS").is_some();
    let budget = if stress { 16384 } else { 65536 };
    assert_eq!(s["cache"]["budget_bytes"], budget, "{s}");
    let (st, out) = d.stop();
    assert!(st.success(), "{out:?}");
    let cow = pool.path("snap.cow");
    let index = pool.path("index/snap");
    let check = |expect: &str| {
        let o = run(pool.cmd().args([
            "cow",
            "check",
            cow.to_str().unwrap(),
            "--index",
            index.to_str().unwrap(),
        ]));
        let text = stdout(&o);
        assert!(text.contains(expect), "{text}");
    };
    check("index: valid: holds the first 40960 exceptions; activation replays the 0");

    // A clean restart reads nothing of the COW past the index; lookups go through the
    // 64 KiB cache.
    let d = Daemon::start(&pool, &small);
    let s = status_json(&pool, "snap");
    assert_eq!(s["index"]["state"], "loaded", "{s}");
    assert_eq!(s["index"]["replayed"], 0, "{s}");
    assert_eq!(s["index"]["covered"], 40960, "{s}");
    assert_eq!(snap_sha(), want);
    let s = status_json(&pool, "snap");
    assert!(s["cache"]["misses"].as_u64().unwrap() >= 160, "{s}");
    assert!(
        s["cache"]["resident_bytes"].as_u64().unwrap() <= budget,
        "{s}"
    );

    // More exceptions, then SIGKILL: no final checkpoint. The next start replays them.
    qemu_io(&pool.uri("disk"), "write -P 0x44 160M 8M");
    let want = snap_sha();
    run(Command::new("kill").args(["-9", &d.pid().to_string()]));
    d.wait_crash();
    let d = Daemon::start(&pool, &small);
    let s = status_json(&pool, "snap");
    assert_eq!(s["index"]["state"], "loaded", "{s}");
    // 2,048 exceptions made after the last checkpoint (under stress, some of them were
    // checkpointed in the background before the kill).
    let replayed = s["index"]["replayed"].as_u64().unwrap();
    assert!(
        if stress {
            replayed <= 2048
        } else {
            replayed == 2048
        },
        "{s}"
    );
    assert_eq!(s["index"]["exceptions"], 43008, "{s}");
    assert_eq!(snap_sha(), want);
    let (st, _) = d.stop();
    assert!(st.success());

    // A damaged superblock: rebuilt from the COW, with a warning naming why.
    let sb = index.join("super");
    let mut bytes = std::fs::read(&sb).unwrap();
    bytes[12] ^= 0xff;
    std::fs::write(&sb, &bytes).unwrap();
    check("index: stale, the next activation rebuilds it");
    let d = Daemon::start(&pool, &small);
    cowsnap_core::testkit::wait_for("the warning that the index was rebuilt", || {
        d.output().iter().any(|l| {
            l.contains("snapshot \"snap\": its exception index was rebuilt from the COW")
                && l.contains("checksum")
        })
    });
    assert_eq!(snap_sha(), want);
    let (st, _) = d.stop();
    assert!(st.success());
    check("index: valid: holds the first 43008 exceptions");
}
