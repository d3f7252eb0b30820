//! Shared helpers for tests that use the kernel-written fixtures of `shared/kernel-rig`:
//! locating them (a missing rig is a test failure, not a skip), unpacking a COW image,
//! and rebuilding origin images from a manifest with the rig's data pattern.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use cowsnap_core::dev::{BlockDevice, Fua, MemDevice};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The rig directory: `CARGO_MANIFEST_DIR/../../../shared/kernel-rig`. Panics (fails the
/// test) when it is missing.
pub fn rig_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/kernel-rig");
    assert!(
        dir.join("fixtures/index.json").is_file(),
        "kernel fixtures not found at {} (the repository must be checked out with shared/ beside it)",
        dir.display()
    );
    dir
}

/// Names of every fixture case in `fixtures/index.json`, with their store type.
pub fn all_cases() -> Vec<(String, String)> {
    let idx: Value = serde_json::from_str(
        &std::fs::read_to_string(rig_dir().join("fixtures/index.json")).expect("index.json"),
    )
    .expect("index.json parses");
    idx.as_array()
        .expect("index is a list")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().expect("name").to_string(),
                c["store"].as_str().expect("store").to_string(),
            )
        })
        .collect()
}

/// One fixture case.
pub struct Fixture {
    pub name: String,
    pub dir: PathBuf,
    pub manifest: Value,
}

impl Fixture {
    pub fn load(name: &str) -> Fixture {
        let dir = rig_dir().join("fixtures").join(name);
        let text = std::fs::read_to_string(dir.join("manifest.json"))
            .unwrap_or_else(|e| panic!("fixture {name}: manifest.json: {e}"));
        Fixture {
            name: name.to_string(),
            dir,
            manifest: serde_json::from_str(&text).expect("manifest parses"),
        }
    }

    /// The uncompressed COW image the kernel left.
    pub fn cow_bytes(&self) -> Vec<u8> {
        let f = std::fs::File::open(self.dir.join("cow.img.gz"))
            .unwrap_or_else(|e| panic!("fixture {}: cow.img.gz: {e}", self.name));
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(f)
            .read_to_end(&mut out)
            .expect("gunzip");
        out
    }

    pub fn chunk_sectors(&self) -> u64 {
        self.manifest["chunk_size_sectors"]
            .as_u64()
            .expect("chunk size")
    }

    pub fn origin_bytes(&self) -> u64 {
        self.manifest["origin_bytes"]
            .as_u64()
            .expect("origin_bytes")
    }

    pub fn expected(&self, key: &str) -> String {
        self.manifest["expected"][key]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no expected.{key}", self.name))
            .to_string()
    }

    /// The kernel's status line for `key` without the `0 131072 snapshot ` prefix.
    pub fn status(&self, key: &str) -> String {
        let raw = self.manifest["status"][key]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no status.{key}", self.name));
        strip_status(raw)
    }

    pub fn ops(&self) -> Vec<Op> {
        self.manifest["ops"]
            .as_array()
            .map(|ops| ops.iter().map(Op::from_json).collect())
            .unwrap_or_default()
    }

    /// The exception table the host parsed from the kernel's COW, in on-disk order.
    pub fn exceptions(&self) -> Vec<(u64, u64)> {
        self.manifest["cow"]["exceptions"]
            .as_array()
            .expect("cow.exceptions")
            .iter()
            .map(|p| (p[0].as_u64().expect("old"), p[1].as_u64().expect("new")))
            .collect()
    }

    /// An origin image as `make-fixtures.py gen-origin` builds it: `initial`, `final` or
    /// `snapshot`.
    pub fn image(&self, which: &str) -> Arc<MemDevice> {
        if let Some(src) = self.manifest["merged_from"].as_str() {
            let src = Fixture::load(src);
            return src.image(if which == "initial" {
                "final"
            } else {
                "snapshot"
            });
        }
        let dev = Arc::new(MemDevice::new(self.origin_bytes()));
        fill(&dev, "ORIGINAL", 0, self.origin_bytes() / 512);
        let ops = self.ops();
        match which {
            "initial" => {}
            "final" => apply(&dev, &ops, "origin"),
            "snapshot" => {
                if let Some(k) = self.manifest["snapshot_after_op"].as_u64() {
                    apply(&dev, &ops[..k as usize], "origin");
                }
                apply(&dev, &ops, "snap");
            }
            w => panic!("unknown image {w}"),
        }
        dev
    }
}

/// A status line without its `start length target` prefix.
pub fn strip_status(raw: &str) -> String {
    raw.splitn(4, ' ').nth(3).unwrap_or(raw).trim().to_string()
}

/// One write of a manifest.
#[derive(Clone, Debug)]
pub struct Op {
    pub target: String,
    pub start: u64,
    pub count: u64,
    pub tag: String,
    pub expect_ok: bool,
    pub status_after: Option<String>,
}

impl Op {
    fn from_json(v: &Value) -> Op {
        Op {
            target: v["target"].as_str().expect("target").to_string(),
            start: v["start"].as_u64().expect("start"),
            count: v["count"].as_u64().expect("count"),
            tag: v["tag"].as_str().expect("tag").to_string(),
            expect_ok: v["expect_ok"].as_bool().unwrap_or(true),
            status_after: v["status_after"].as_str().map(strip_status),
        }
    }

    pub fn data(&self) -> Vec<u8> {
        pattern(&self.tag, self.start, self.count)
    }
}

/// `count` sectors from device sector `start`, each 32 copies of `tag || u64le(sector)`.
pub fn pattern(tag: &str, start: u64, count: u64) -> Vec<u8> {
    let t = tag.as_bytes();
    assert_eq!(t.len(), 8, "tags are 8 bytes: {tag}");
    let mut out = Vec::with_capacity((count * 512) as usize);
    for s in start..start + count {
        for _ in 0..32 {
            out.extend_from_slice(t);
            out.extend_from_slice(&s.to_le_bytes());
        }
    }
    out
}

fn fill(dev: &MemDevice, tag: &str, start: u64, count: u64) {
    const STEP: u64 = 2048;
    let mut s = start;
    while s < start + count {
        let n = STEP.min(start + count - s);
        dev.write_at(&pattern(tag, s, n), s * 512, Fua::No)
            .expect("fill");
        s += n;
    }
}

fn apply(dev: &MemDevice, ops: &[Op], target: &str) {
    for op in ops.iter().filter(|o| o.target == target && o.expect_ok) {
        dev.write_at(&op.data(), op.start * 512, Fua::No)
            .expect("apply op");
    }
}

/// sha256 of a whole device, read in 1 MiB pieces, as hex.
pub fn sha256_dev(dev: &dyn BlockDevice) -> Result<String, cowsnap_core::Error> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < dev.size() {
        let n = (dev.size() - off).min(buf.len() as u64) as usize;
        dev.read_at(&mut buf[..n], off)?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(hex(&h.finalize()))
}

pub fn sha256(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
