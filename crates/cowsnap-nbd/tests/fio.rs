//! fio's nbd engine (libnbd) against the server: 16 requests in flight, every block
//! checksummed (`verify=crc32c`) and read back, on a memory and a file export, and with
//! two jobs on separate connections at once.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small constants"
)]

mod common;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::{run_ok, Fixture};
use cowsnap_core::dev::{FileDevice, MemDevice};
use cowsnap_nbd::{DeviceExport, Export};

const MIB: u64 = 1 << 20;

fn fio(dir: &std::path::Path, uri: &str, extra: &[&str]) -> String {
    let out = run_ok(
        Command::new("fio")
            // fio leaves verify state files in its working directory.
            .current_dir(dir)
            .args([
                "--verify_state_save=0",
                "--name=nbdjob",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--size=48M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--group_reporting",
            ])
            .arg(format!("--uri={uri}"))
            .args(extra),
    );
    assert!(out.contains("err= 0"), "{out}");
    assert!(
        !out.contains("verify failed") && !out.contains("bad magic"),
        "{out}"
    );
    out
}

#[test]
fn fio_verify_crc32c_iodepth_16() {
    if !common::require_tools(&["fio", "fio-nbd"]) {
        return;
    }
    let dir = common::scratch("nbd");
    let file = FileDevice::create(dir.path().join("f.img"), 128 * MIB).unwrap();
    let exports: Vec<(&str, Arc<dyn Export>)> = vec![
        (
            "mem",
            Arc::new(DeviceExport::memory(MemDevice::new(128 * MIB))),
        ),
        ("file", Arc::new(DeviceExport::file(file).unwrap())),
    ];
    let fx = Fixture::new(exports);
    for name in ["mem", "file"] {
        let out = fio(dir.path(), &fx.uri(name), &[]);
        assert!(out.contains("IOPS="), "{out}");
        // Two jobs, two connections, disjoint halves, with flushes.
        fio(
            dir.path(),
            &fx.uri(name),
            &["--numjobs=2", "--offset_increment=64M", "--fsync=32"],
        );
    }
    assert_eq!(fx.server.stats().errors.load(Ordering::Relaxed), 0);
    assert_eq!(fx.server.stats().protocol_errors.load(Ordering::Relaxed), 0);
}
