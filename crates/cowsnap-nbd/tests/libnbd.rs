//! libnbd's clients against the server: `nbdinfo --list/--map/--json`, `nbdcopy` both
//! ways over several connections, a Python probe of error paths and pipelining (libnbd's
//! bindings, run with `/usr/bin/python3`), `nbdsh`, and socket activation by `nbdinfo`.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small constants"
)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::{pattern, run_ok, sha256_file, Fixture};
use cowsnap_core::dev::{BlockDevice, FileDevice, Fua, MemDevice};
use cowsnap_nbd::{DeviceExport, Export};

const MIB: u64 = 1 << 20;

#[test]
fn nbdinfo_lists_every_export_with_its_size() {
    if !common::require_tools(&["nbdinfo"]) {
        return;
    }
    let dir = common::scratch("nbd");
    let file = FileDevice::create(dir.path().join("f.img"), 8 * MIB).unwrap();
    let exports: Vec<(&str, Arc<dyn Export>)> = vec![
        (
            "origin",
            Arc::new(DeviceExport::memory(MemDevice::new(64 * MIB))),
        ),
        (
            "snap1",
            Arc::new(
                DeviceExport::memory(MemDevice::new(16 * MIB))
                    .read_only(true)
                    .description("snapshot of origin"),
            ),
        ),
        ("file", Arc::new(DeviceExport::file(file).unwrap())),
    ];
    let fx = Fixture::new(exports);
    let json = run_ok(
        Command::new("nbdinfo")
            .args(["--list", "--json"])
            .arg(fx.uri("")),
    );
    let v: serde_json::Value = serde_json::from_str(&json).expect("nbdinfo json");
    assert_eq!(v["structured"], true);
    let list = v["exports"].as_array().unwrap();
    let got: Vec<(String, u64, bool)> = list
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap().to_string(),
                e["export-size"].as_u64().unwrap(),
                e["is_read_only"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("origin".to_string(), 64 * MIB, false),
            ("snap1".to_string(), 16 * MIB, true),
            ("file".to_string(), 8 * MIB, false)
        ]
    );
    assert_eq!(list[1]["description"], "snapshot of origin");
    for e in list {
        assert_eq!(e["block_size_minimum"], 512);
        assert_eq!(e["can_multi_conn"], true);
        assert_eq!(e["contexts"][0], "base:allocation");
    }
    // The plain listing names them too.
    let text = run_ok(Command::new("nbdinfo").arg("--list").arg(fx.uri("")));
    for n in ["origin", "snap1", "file"] {
        assert!(text.contains(&format!("export=\"{n}\"")), "{text}");
    }
}

/// Parses `nbdinfo --map` lines: offset, length, type.
fn map(uri: &str) -> Vec<(u64, u64, u32)> {
    let out = run_ok(Command::new("nbdinfo").arg("--map").arg(uri));
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().expect("offset"),
                f[1].parse().expect("length"),
                f[2].parse().expect("type"),
            )
        })
        .collect()
}

fn check_map(dev: &dyn BlockDevice, m: &[(u64, u64, u32)], data: &[(u64, u64)]) {
    let mut pos = 0;
    for &(off, len, ty) in m {
        assert_eq!(off, pos, "{m:?}");
        pos += len;
        if ty & 2 != 0 {
            let mut b = vec![1u8; len as usize];
            dev.read_at(&mut b, off).expect("read");
            assert!(
                b.iter().all(|&x| x == 0),
                "{off}+{len} reported zero but is not"
            );
        }
        for &(d_off, d_len) in data {
            if off < d_off + d_len && d_off < off + len {
                assert_eq!(
                    ty, 0,
                    "written range {d_off}+{d_len} reported as {ty}: {m:?}"
                );
            }
        }
    }
    assert_eq!(pos, dev.size());
}

#[test]
fn nbdinfo_map_is_exact_and_conservative() {
    if !common::require_tools(&["nbdinfo"]) {
        return;
    }
    let dir = common::scratch("nbd");
    let data = [(0, 64 * 1024), (5 * MIB, MIB), (9 * MIB + 4096, 4096)];
    let mem = DeviceExport::memory(MemDevice::new(16 * MIB));
    let file = DeviceExport::file(FileDevice::create(dir.path().join("f.img"), 16 * MIB).unwrap())
        .unwrap();
    for (off, len) in data {
        mem.write_at(&vec![0xa5; len as usize], off, Fua::No)
            .unwrap();
        file.write_at(&vec![0xa5; len as usize], off, Fua::No)
            .unwrap();
    }
    let mem = Arc::new(mem);
    let file = Arc::new(file);
    let fx = Fixture::new(vec![("mem", mem.clone()), ("file", file.clone())]);
    for (name, dev) in [("mem", mem as Arc<dyn Export>), ("file", file)] {
        let m = map(&fx.uri(name));
        check_map(&*dev, &m, &data);
        // Most of the export is sparse and must be reported so.
        let zero: u64 = m.iter().filter(|x| x.2 & 2 != 0).map(|x| x.1).sum();
        assert!(zero >= 12 * MIB, "{name}: {m:?}");
    }
}

#[test]
fn nbdcopy_round_trip_over_several_connections() {
    if !common::require_tools(&["nbdcopy"]) {
        return;
    }
    let dir = common::scratch("nbd");
    let size = 32 * MIB;
    let mut src = pattern(42, 0, size);
    src[(10 * MIB) as usize..(14 * MIB) as usize].fill(0);
    let src_path = dir.path().join("src.img");
    std::fs::write(&src_path, &src).unwrap();
    for kind in ["mem", "file"] {
        let export: Arc<dyn Export> = if kind == "mem" {
            Arc::new(DeviceExport::memory(MemDevice::new(size)))
        } else {
            let dev = FileDevice::create(dir.path().join("target.img"), size).unwrap();
            Arc::new(DeviceExport::file(dev).unwrap())
        };
        let fx = Fixture::new(vec![("disk", export.clone())]);
        let uri = fx.uri("disk");
        run_ok(
            Command::new("nbdcopy")
                .args(["--flush", "--connections=4", "--requests=16"])
                .arg(&src_path)
                .arg(&uri),
        );
        let conns = fx.server.stats().transmissions.load(Ordering::Relaxed);
        assert!(
            conns >= 2,
            "{kind}: nbdcopy used {conns} connection(s); multi-conn expected"
        );
        let back = dir.path().join(format!("back-{kind}.img"));
        run_ok(Command::new("nbdcopy").arg(&uri).arg(&back));
        assert_eq!(sha256_file(&back), sha256_file(&src_path), "{kind}");
        let mut b = vec![0u8; size as usize];
        export.read_at(&mut b, 0).unwrap();
        assert!(b == src, "{kind}: device content differs");
        assert_eq!(fx.server.stats().errors.load(Ordering::Relaxed), 0);
    }
}

#[test]
fn libnbd_python_probe_of_error_paths_and_pipelining() {
    if !common::require_tools(&["python3-nbd"]) {
        return;
    }
    let fx = Fixture::disk_and_read_only();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nbd_probe.py");
    let out = run_ok(Command::new("/usr/bin/python3").arg(script).arg(&fx.sock));
    assert_eq!(out.trim(), "OK");
    // The refused requests were errors, not disconnects.
    assert_eq!(fx.server.stats().protocol_errors.load(Ordering::Relaxed), 0);
}

#[test]
fn nbdsh_reads_what_it_wrote() {
    if !common::require_tools(&["nbdsh", "python3-nbd"]) {
        return;
    }
    let fx = Fixture::new(vec![(
        "disk",
        Arc::new(DeviceExport::memory(MemDevice::new(MIB))),
    )]);
    // nbdsh runs `python3`; put the system interpreter (with Debian's nbd module) first.
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let out = run_ok(
        Command::new("nbdsh")
            .env("PATH", path)
            .args(["-u", &fx.uri("disk"), "-c"])
            .arg(
                "h.pwrite(b'cowsnap!' * 64, 4096)\n\
                 h.flush()\n\
                 print(h.get_size(), h.can_multi_conn(), h.pread(512, 4096)[8:16].decode())",
            ),
    );
    assert_eq!(out.trim(), "1048576 True cowsnap!");
}

#[test]
fn socket_activation_by_nbdinfo() {
    if !common::require_tools(&["nbdinfo"]) {
        return;
    }
    let demo = env!("CARGO_BIN_EXE_cowsnap-nbd-demo");
    let out =
        run_ok(Command::new("nbdinfo").args(["--size", "--", "[", demo, "--mem", "disk=16M", "]"]));
    assert_eq!(out.trim(), "16777216");
    let out =
        run_ok(Command::new("nbdinfo").args(["--map", "--", "[", demo, "--mem", "disk=4M", "]"]));
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["0", "4194304", "2", "zero"]
    );
}
