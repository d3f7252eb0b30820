//! qemu's NBD client against the server: `qemu-io` patterns (synchronous and pipelined),
//! zeroing, discard and flush; `qemu-img convert`, `compare` and `map` against reference
//! images. qemu ≥ 8.2 first asks for extended headers (refused with ERR_UNSUP), older
//! qemu (7.2) starts with structured replies; both must work.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small constants"
)]

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{pattern, run, run_ok, sha256_file, Fixture};
use cowsnap_core::dev::{BlockDevice, FileDevice, MemDevice};
use cowsnap_nbd::DeviceExport;

const MIB: u64 = 1 << 20;

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    let out = run_ok(&mut c);
    assert!(
        !out.contains("verification failed") && !out.contains("failed:"),
        "qemu-io reported a failure:\n{out}"
    );
    out
}

#[test]
fn qemu_io_patterns_zero_discard_flush() {
    if !common::require_tools(&["qemu-io"]) {
        return;
    }
    let e = Arc::new(DeviceExport::memory(MemDevice::new(64 * MIB)));
    let dev = e.device().clone();
    let fx = Fixture::new(vec![("disk", e)]);
    let uri = fx.uri("disk");
    let out = qemu_io(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 1M 64k",
            "write -P 0x5a 6M 4M",
            "write -z 4M 1M",
            "write -P 0x77 5M 512",
            "discard 7M 1M",
            "flush",
        ],
    );
    assert_eq!(out.matches("wrote").count(), 5, "{out}");
    // A second client (a new process, new connections) reads it back.
    qemu_io(
        &uri,
        &[
            "read -P 0xab 0 1M",
            "read -P 0xcd 1M 64k",
            "read -P 0 4M 1M",
            "read -P 0x77 5M 512",
            "read -P 0 5243392 1048064",
            "read -P 0x5a 6M 1M",
            "read -P 0x5a 8M 2M",
            "read -P 0 10M 1M",
        ],
    );
    // And the device holds exactly that.
    let mut b = vec![0u8; MIB as usize];
    dev.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0xab));
    dev.read_at(&mut b, 4 * MIB).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    dev.read_at(&mut b[..512], 5 * MIB).unwrap();
    assert!(b[..512].iter().all(|&x| x == 0x77));
}

#[test]
fn qemu_io_pipelined_aio_requests() {
    if !common::require_tools(&["qemu-io"]) {
        return;
    }
    let e = Arc::new(DeviceExport::memory(MemDevice::new(64 * MIB)));
    let fx = Fixture::new(vec![("disk", e)]);
    let uri = fx.uri("disk");
    let mut cmds: Vec<String> = (0..32)
        .map(|i| format!("aio_write -P {} {}k 64k", i + 1, i * 64))
        .collect();
    cmds.push("aio_flush".into());
    cmds.extend((0..32).map(|i| format!("aio_read -P {} {}k 64k", i + 1, i * 64)));
    cmds.push("aio_flush".into());
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let out = qemu_io(&uri, &refs);
    assert_eq!(out.matches("wrote 65536/65536").count(), 32, "{out}");
    assert_eq!(out.matches("read 65536/65536").count(), 32, "{out}");
}

#[test]
fn qemu_img_convert_compare_and_map() {
    if !common::require_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = common::scratch("nbd");
    let size = 8 * MIB;
    // Reference: data, a 2 MiB run of zeros, data.
    let mut reference = pattern(7, 0, size);
    reference[(3 * MIB) as usize..(5 * MIB) as usize].fill(0);
    let ref_path = dir.path().join("ref.img");
    std::fs::write(&ref_path, &reference).unwrap();

    let target = dir.path().join("target.img");
    let e = Arc::new(DeviceExport::file(FileDevice::create(&target, size).unwrap()).unwrap());
    let fx = Fixture::new(vec![("target", e)]);
    let uri = fx.uri("target");

    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&ref_path)
            .arg(&uri),
    );
    let out = run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&ref_path)
            .arg(&uri),
    );
    assert!(out.contains("Images are identical"), "{out}");

    // Block status through qemu (REQ_ONE queries): every range it calls zero is zero, and
    // the data ranges are reported as data.
    let map = run_ok(
        Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "raw"])
            .arg(&uri),
    );
    let extents: Vec<serde_json::Value> = serde_json::from_str(&map).expect("map json");
    let mut covered = 0u64;
    for x in &extents {
        let start = x["start"].as_u64().unwrap();
        let len = x["length"].as_u64().unwrap();
        assert_eq!(start, covered, "{map}");
        covered += len;
        if x["zero"].as_bool().unwrap() {
            let r = &reference[start as usize..(start + len) as usize];
            assert!(
                r.iter().all(|&b| b == 0),
                "range {start}+{len} reported zero: {map}"
            );
        }
    }
    assert_eq!(covered, size);
    for x in &extents {
        let start = x["start"].as_u64().unwrap();
        if start < 3 * MIB {
            assert!(!x["zero"].as_bool().unwrap(), "{map}");
        }
    }

    // Copy out through NBD and compare bytes.
    let back = dir.path().join("back.img");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&uri)
            .arg(&back),
    );
    assert_eq!(sha256_file(&back), sha256_file(&ref_path));

    // A one-sector change is seen by compare (exit status 1, not 0 or an error).
    qemu_io(&uri, &["write -P 0x42 6M 512"]);
    let o = run(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&ref_path)
            .arg(&uri),
        Duration::from_secs(60),
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn qemu_nbd_lists_exports_with_flags_and_contexts() {
    if !common::require_tools(&["qemu-nbd"]) {
        return;
    }
    let fx = Fixture::disk_and_read_only();
    let out = run_ok(Command::new("qemu-nbd").arg("-L").arg("-k").arg(&fx.sock));
    assert!(out.contains("exports available: 2"), "{out}");
    assert!(
        out.contains("export: 'disk'") && out.contains("size:  67108864"),
        "{out}"
    );
    // The same flag set nbdkit's memory plugin and qemu-nbd -e 2 advertise.
    assert!(out.contains("flags: 0xded"), "{out}");
    assert!(out.contains("description: read-only twin"), "{out}");
    assert!(out.contains("readonly"), "{out}");
    assert_eq!(out.matches("base:allocation").count(), 2, "{out}");
    assert!(
        out.contains("min block: 512") && out.contains("max block: 33554432"),
        "{out}"
    );
}
