//! Drives the real `cowsnap` binary: `cow check`, `cow dump` and `cow export` on COW
//! images written by the kernel (shared/kernel-rig fixtures) and by cowsnap, and the
//! adoption of such a COW by a pool (`snapshot create --cow`).

#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use cowsnap_core::dev::{BlockDevice, FileDevice, Fua};
use cowsnap_core::exception::{Exception, ExceptionStore, PersistentStore};
use cowsnap_core::testkit::scratch;
use cowsnap_core::units::{Chunk, ChunkSize};
use serde_json::Value;

fn cowsnap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cowsnap"))
        .args(args)
        .output()
        .expect("run cowsnap")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Unpacks a kernel fixture's COW; a missing rig fails the test.
fn fixture_cow(name: &str, to: &Path) -> Value {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/kernel-rig/fixtures")
        .join(name);
    assert!(
        dir.is_dir(),
        "kernel fixtures missing at {} (check out shared/ beside the repository)",
        dir.display()
    );
    let mut data = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(dir.join("cow.img.gz")).unwrap())
        .read_to_end(&mut data)
        .unwrap();
    std::fs::write(to, data).unwrap();
    serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
}

#[test]
fn check_and_dump_a_kernel_cow() {
    let t = scratch("cli-kernel");
    let cow = t.join("cow.img");
    let m = fixture_cow("p16-basic", &cow);
    let cow_s = cow.to_str().unwrap();

    let o = cowsnap(&["cow", "check", cow_s]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(stdout(&o).contains("clean"));

    let o = cowsnap(&["cow", "check", "--json", cow_s]);
    assert_eq!(o.status.code(), Some(0));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["clean"], true);
    assert_eq!(j["exceptions"], m["cow"]["num_exceptions"]);

    let o = cowsnap(&["cow", "dump", "--json", cow_s]);
    assert_eq!(o.status.code(), Some(0));
    let d: Value = serde_json::from_slice(&o.stdout).unwrap();
    let pairs: Vec<Value> = d["exceptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| serde_json::json!([e["old"], e["new"]]))
        .collect();
    assert_eq!(Value::Array(pairs), m["cow"]["exceptions"]);
    assert_eq!(d["status"], "240/32768 32");
    assert_eq!(d["header"]["chunk_sectors"], 16);

    let o = cowsnap(&["cow", "dump", cow_s]);
    assert!(stdout(&o).contains("8191 -> 9"), "{}", stdout(&o));
}

#[test]
fn check_reports_bad_and_invalid_cows() {
    let t = scratch("cli-bad");
    let bad = t.join("bad.img");
    fixture_cow("p16-badmagic", &bad);
    let o = cowsnap(&["cow", "check", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("bad magic"), "{}", stdout(&o));
    let o = cowsnap(&["cow", "dump", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bad.img") && err.contains("byte 0"), "{err}");

    let inv = t.join("inv.img");
    fixture_cow("p16-overflow-origin", &inv);
    let o = cowsnap(&["cow", "check", "--json", inv.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["clean"], false);
    assert_eq!(j["header"]["state"], "invalid");
    assert_eq!(j["findings"][0]["severity"], "warning");

    let o = cowsnap(&["cow", "check", t.join("missing.img").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn export_materialises_the_snapshot_view() {
    let t = scratch("cli-export");
    let cs = ChunkSize::from_sectors(8).unwrap();
    // An origin of 32 chunks, each filled with its index; a COW written by cowsnap with
    // the old contents of chunks 3 and 17 replaced by 0xA3 / 0xB7.
    let origin_path = t.join("origin.img");
    let origin: Vec<u8> = (0..32u8).flat_map(|c| vec![c; 4096]).collect();
    std::fs::write(&origin_path, &origin).unwrap();
    let cow_path = t.join("cow.img");
    {
        let cow: Arc<dyn BlockDevice> = Arc::new(FileDevice::create(&cow_path, 1 << 20).unwrap());
        let s = PersistentStore::open(cow.clone(), Some(cs), false).unwrap();
        s.load(Default::default(), &mut |_, _| Ok(())).unwrap();
        for (old, fill) in [(3u64, 0xA3u8), (17, 0xB7)] {
            let new = s.prepare(Chunk(old)).unwrap();
            cow.write_at(&[fill; 4096], cs.byte_offset(new), Fua::No)
                .unwrap();
            s.commit(&[Exception {
                old: Chunk(old),
                new,
            }])
            .unwrap();
        }
    }
    let out = t.join("view.img");
    let o = cowsnap(&[
        "cow",
        "export",
        "--origin",
        origin_path.to_str().unwrap(),
        "--cow",
        cow_path.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.stderr.is_empty(),
        "no progress output when stderr is not a terminal"
    );
    assert!(stdout(&o).contains("2 chunk(s) from the COW"));
    let mut want = origin.clone();
    want[3 * 4096..4 * 4096].fill(0xA3);
    want[17 * 4096..18 * 4096].fill(0xB7);
    assert!(
        std::fs::read(&out).unwrap() == want,
        "exported view differs"
    );
    // The COW was not touched by the tools.
    let o = cowsnap(&["cow", "check", cow_path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
}

#[test]
fn adopting_a_cow_takes_its_chunk_size_and_warns_only_when_another_is_asked_for() {
    let t = scratch("cli-adopt-chunk");
    let pool = t.join("pool");
    let pool_s = pool.to_str().unwrap();
    let ok = |args: &[&str]| {
        let o = cowsnap(&[&["--pool", pool_s], args].concat());
        assert_eq!(
            o.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o
    };
    ok(&["init"]);
    ok(&["origin", "create", "base", "--size", "1M"]);
    let eight_k = ChunkSize::from_bytes(8192).unwrap();
    let adopt = |name: &str, asked: &[&str]| {
        let cow = t.join(format!("{name}.cow"));
        {
            let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::create(&cow, 256 << 10).unwrap());
            let s = PersistentStore::open(dev, Some(eight_k), false).unwrap();
            s.load(Default::default(), &mut |_, _| Ok(())).unwrap();
        }
        let cow_s = cow.to_str().unwrap();
        let base = [
            "snapshot", "create", name, "--origin", "base", "--cow", cow_s, "--json",
        ];
        let o = ok(&[&base[..], asked].concat());
        let info: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(info["chunk_size"], 8192, "{name}: the header's chunk size");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let unasked = adopt("unasked", &[]);
    assert!(!unasked.contains("warning"), "{unasked}");
    let other = adopt("other", &["--chunk-size", "4K"]);
    assert!(
        other.contains("warning") && other.contains("overrides the 4K asked for"),
        "{other}"
    );
}
