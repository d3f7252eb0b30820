//! The pool manifest: the table of a pool's volumes, as JSON, replaced atomically.
//!
//! `pool.json` lists the origins (image files or block devices) and the snapshots (origin,
//! COW file, store type, chunk size), each file with the [`FileId`] it had when the pool
//! took it, so a file replaced behind the pool's back is noticed. It is rewritten whole on
//! every change: write a temporary file (mode 0600), fsync it, rename it over the old one,
//! fsync the directory. After a crash the manifest is the old one or the new one, never a
//! mix. Decoding validates everything (names, references, store types, chunk sizes) and
//! never panics on a bad file.
//!
//! Version 2 added the file ids and the `removing` mark of a snapshot whose removal began
//! (see [`Pool::remove_snapshot`](super::Pool::remove_snapshot)). Version 1 pools open and
//! are rewritten as version 2 at their next change; cowsnap before version 2 refuses a
//! version 2 pool with a message naming the version.
//!
//! Version 3 is written only while a snapshot is merging (its `merging` record): cowsnap
//! before version 3 would serve the half-merged origin as it is, so it must refuse the
//! pool, and it does (the version check names the version). A pool with no merge is still
//! written as version 2, which every cowsnap since version 2 opens.
//!
//! Version 4 is written only while some volume has a stack of layers (`layers` of an
//! origin, `cow_layers` of a snapshot: `linear`, `bbr` and the `test-*` layers): cowsnap
//! before version 4 would open the bare files and serve them without their layers (a
//! `bbr` origin without its relocations would read stale data), so it must refuse the
//! pool, and it does, naming the version. A pool without layers is written as before.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use cowsnap_core::dev::FileId;
use cowsnap_core::error::{Error, Result};
use cowsnap_core::exception::StoreKind;
use cowsnap_core::layers::LayerSpec;
use cowsnap_core::units::ChunkSize;

/// File name of the manifest inside the pool directory.
pub const MANIFEST: &str = "pool.json";
/// The newest manifest format version this code reads (and writes while a volume has layers).
pub const MANIFEST_VERSION: u32 = 4;
/// The version written while a snapshot merges and no volume has layers.
pub const MANIFEST_VERSION_MERGING: u32 = 3;
/// The version written when no snapshot is merging.
pub const MANIFEST_VERSION_PLAIN: u32 = 2;
/// The oldest manifest format version this code reads.
pub const MANIFEST_VERSION_MIN: u32 = 1;

/// One origin volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginEntry {
    /// Volume name (also the NBD export name).
    pub name: String,
    /// Image file or block device; relative paths are inside the pool directory.
    pub path: PathBuf,
    /// True when the pool created the file (and may delete it).
    pub owned: bool,
    /// The file's identity when the pool took it (absent in version 1 manifests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<FileId>,
    /// The layers between the file and the origin, bottom first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerEntry>,
}

/// One layer of a volume's stack, as the manifest keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerEntry {
    /// Bad-block relocation, with its spare file.
    Bbr(BbrEntry),
    /// A layer that needs no file of its own (`linear`, `test-*`).
    Target(LayerSpec),
}

/// The only value of [`BbrEntry::target`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BbrTarget {
    /// `"bbr"`.
    Bbr,
}

/// A `bbr` layer: its spares and relocation table live in a file the pool made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BbrEntry {
    /// Always `bbr`.
    pub target: BbrTarget,
    /// The spare file (a plain name inside the pool).
    pub spares: PathBuf,
    /// Its identity when the pool made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<FileId>,
    /// Chunk size (the unit of relocation) in sectors.
    pub chunk_sectors: u64,
}

impl LayerEntry {
    /// The target's name, as in a table line.
    pub fn target_name(&self) -> &'static str {
        match self {
            LayerEntry::Bbr(_) => "bbr",
            LayerEntry::Target(spec) => spec.target_name(),
        }
    }

    /// Its size over a device of `below` bytes.
    pub fn size_over(&self, below: u64) -> Result<u64> {
        match self {
            LayerEntry::Bbr(_) => Ok(below),
            LayerEntry::Target(spec) => spec.size_over(below),
        }
    }
}

/// The size of a stack of `layers` over a base of `base` bytes.
pub fn stack_size(base: u64, layers: &[LayerEntry]) -> Result<u64> {
    layers.iter().try_fold(base, |size, l| l.size_over(size))
}

/// One snapshot volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    /// Volume name.
    pub name: String,
    /// Name of its origin.
    pub origin: String,
    /// COW file or device; relative paths are inside the pool directory.
    pub cow: PathBuf,
    /// `N`, `P` or `PO`.
    pub store: String,
    /// Chunk size in sectors.
    pub chunk_sectors: u64,
    /// True when the pool created the COW file (and may delete it).
    pub owned: bool,
    /// The COW file's identity when the pool took it (absent in version 1 manifests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<FileId>,
    /// Its removal began: it is never activated again, and the next process to hold the
    /// pool finishes the removal.
    #[serde(default, skip_serializing_if = "is_false")]
    pub removing: bool,
    /// A merge into its origin was asked for: recorded before the first origin chunk is
    /// overwritten, so a restarted process resumes it instead of serving a half-merged
    /// origin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merging: Option<MergeRecord>,
    /// The layers between the COW file and the store, bottom first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cow_layers: Vec<LayerEntry>,
    /// Why the snapshot became invalid, recorded when its COW has layers: the header's
    /// `valid = 0` went through those layers, which may have failed it too, and a stack
    /// built afresh would load the COW as valid without the copy-outs it missed. The next
    /// activation invalidates it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid: Option<String>,
}

/// A snapshot's merge into its origin, as the manifest keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeRecord {
    /// The COW's allocation (sectors) when the merge was asked for: the percentage's 0.
    pub initial_allocated_sectors: u64,
    /// Deferred: the origin was in use when the merge was asked for, so it starts at the
    /// next activation of the pool (lvm2's "merge on activate"). Until then the snapshot
    /// is served as before.
    #[serde(default, skip_serializing_if = "is_false")]
    pub on_activation: bool,
    /// Paused by the user: the origin shows the snapshot's content, nothing moves.
    #[serde(default, skip_serializing_if = "is_false")]
    pub paused: bool,
    /// Rate limit, bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u64>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl SnapshotEntry {
    /// The store type.
    pub fn store_kind(&self) -> Result<StoreKind> {
        self.store.parse()
    }

    /// The chunk size.
    pub fn chunk_size(&self) -> Result<ChunkSize> {
        ChunkSize::from_sectors(self.chunk_sectors)
            .map_err(|e| Error::InvalidArgument(format!("snapshot {}: {e}", self.name)))
    }
}

/// The whole manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version, [`MANIFEST_VERSION`].
    pub version: u32,
    /// Origins, in creation order.
    pub origins: Vec<OriginEntry>,
    /// Snapshots, in creation order.
    pub snapshots: Vec<SnapshotEntry>,
}

/// Checks one volume's stack: each layer's parameters, at most one `bbr`, its spare file a
/// plain name inside the pool with a valid chunk size.
fn check_stack(name: &str, layers: &[LayerEntry], plain: &dyn Fn(&PathBuf) -> bool) -> Result<()> {
    let bad = |why: String| Error::InvalidArgument(format!("volume {name:?}: {why}"));
    let mut bbr = 0;
    for l in layers {
        match l {
            LayerEntry::Target(spec) => spec.check().map_err(|e| bad(e.to_string()))?,
            LayerEntry::Bbr(b) => {
                bbr += 1;
                if !plain(&b.spares) {
                    return Err(bad(format!(
                        "a bbr spare file must be a plain name inside the pool, not {}",
                        b.spares.display()
                    )));
                }
                let cs = ChunkSize::from_sectors(b.chunk_sectors)
                    .map_err(|e| bad(format!("bbr: {e}")))?;
                if cs.bytes() > cowsnap_core::targets::bbr::MAX_CHUNK_BYTES {
                    return Err(bad(format!("bbr: chunk size {cs} is larger than 1M")));
                }
            }
        }
    }
    if bbr > 1 {
        return Err(bad("a stack holds at most one bbr layer".into()));
    }
    Ok(())
}

/// Checks a volume name: 1 to 64 characters of `A-Z a-z 0-9 . _ -`, not starting with `.`
/// or `-` (names become file names and NBD export names).
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid volume name {name:?}: use 1 to 64 of A-Z a-z 0-9 . _ - (not starting with . or -)"
        )))
    }
}

impl Manifest {
    /// An empty manifest.
    pub fn new() -> Self {
        Manifest {
            version: MANIFEST_VERSION_PLAIN,
            ..Default::default()
        }
    }

    /// The origin called `name`.
    pub fn origin(&self, name: &str) -> Option<&OriginEntry> {
        self.origins.iter().find(|o| o.name == name)
    }

    /// The snapshot called `name`.
    pub fn snapshot(&self, name: &str) -> Option<&SnapshotEntry> {
        self.snapshots.iter().find(|s| s.name == name)
    }

    /// True when a volume of either kind is called `name`.
    pub fn has_volume(&self, name: &str) -> bool {
        self.origin(name).is_some() || self.snapshot(name).is_some()
    }

    /// Checks names, uniqueness, references, store types and chunk sizes.
    pub fn validate(&self) -> Result<()> {
        if !(MANIFEST_VERSION_MIN..=MANIFEST_VERSION).contains(&self.version) {
            return Err(Error::InvalidArgument(format!(
                "manifest version {} is not supported (this cowsnap reads versions {MANIFEST_VERSION_MIN} to {MANIFEST_VERSION}): use the cowsnap that wrote it",
                self.version
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for name in self
            .origins
            .iter()
            .map(|o| &o.name)
            .chain(self.snapshots.iter().map(|s| &s.name))
        {
            check_name(name)?;
            if !seen.insert(name) {
                return Err(Error::InvalidArgument(format!(
                    "manifest names volume {name:?} twice"
                )));
            }
        }
        // A file the pool owns (and may delete) is a plain name inside the pool directory.
        let plain = |p: &PathBuf| {
            let mut c = p.components();
            matches!(c.next(), Some(std::path::Component::Normal(_))) && c.next().is_none()
        };
        for (name, path) in self
            .origins
            .iter()
            .filter(|o| o.owned)
            .map(|o| (&o.name, &o.path))
            .chain(
                self.snapshots
                    .iter()
                    .filter(|s| s.owned)
                    .map(|s| (&s.name, &s.cow)),
            )
        {
            if !plain(path) {
                return Err(Error::InvalidArgument(format!(
                    "volume {name:?}: a file the pool owns must be a plain name inside the pool, not {}",
                    path.display()
                )));
            }
        }
        for (name, layers) in self.stacks() {
            check_stack(name, layers, &plain)?;
        }
        if let Some(s) = self
            .snapshots
            .iter()
            .find(|s| s.cow_layers.iter().any(|l| matches!(l, LayerEntry::Bbr(_))))
        {
            return Err(Error::InvalidArgument(format!(
                "snapshot {:?}: a bbr layer under a COW is not supported (keep COWs on healthy files)",
                s.name
            )));
        }
        for s in &self.snapshots {
            if self.origin(&s.origin).is_none() {
                return Err(Error::InvalidArgument(format!(
                    "snapshot {:?} refers to unknown origin {:?}",
                    s.name, s.origin
                )));
            }
            s.store_kind()?;
            s.chunk_size()?;
            if s.merging.is_some() {
                if s.store == "N" {
                    return Err(Error::InvalidArgument(format!(
                        "snapshot {:?} is transient and cannot be merging",
                        s.name
                    )));
                }
                if let Some(other) = self
                    .snapshots
                    .iter()
                    .find(|o| o.origin == s.origin && o.name != s.name && o.merging.is_some())
                {
                    return Err(Error::InvalidArgument(format!(
                        "origin {:?} has two merging snapshots, {:?} and {:?}",
                        s.origin, s.name, other.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// Every volume's stack of layers: `(volume, layers)`, origins first.
    pub fn stacks(&self) -> impl Iterator<Item = (&str, &[LayerEntry])> {
        self.origins
            .iter()
            .map(|o| (o.name.as_str(), o.layers.as_slice()))
            .chain(
                self.snapshots
                    .iter()
                    .map(|s| (s.name.as_str(), s.cow_layers.as_slice())),
            )
    }

    /// The spare files of every `bbr` layer: `(volume, entry)`.
    pub fn bbr_layers(&self) -> impl Iterator<Item = (&str, &BbrEntry)> {
        self.stacks().flat_map(|(name, layers)| {
            layers.iter().filter_map(move |l| match l {
                LayerEntry::Bbr(b) => Some((name, b)),
                LayerEntry::Target(_) => None,
            })
        })
    }

    /// The snapshot merging (or waiting to merge) into origin `origin`.
    pub fn merging_into(&self, origin: &str) -> Option<&SnapshotEntry> {
        self.snapshots
            .iter()
            .find(|s| s.origin == origin && s.merging.is_some())
    }

    /// Reads and validates the manifest of the pool in `dir`.
    pub fn load(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST);
        let text = fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::InvalidArgument(format!(
                    "{} is not a cowsnap pool (no {MANIFEST}); create one with `cowsnap --pool {} init`",
                    dir.display(),
                    dir.display()
                ))
            } else {
                Error::io("read", 0, path.display().to_string(), e)
            }
        })?;
        let m: Manifest = serde_json::from_slice(&text).map_err(|e| Error::Corrupt {
            device: path.display().to_string(),
            offset: 0,
            reason: format!("not a valid manifest: {e}"),
        })?;
        m.validate()?;
        Ok(m)
    }

    /// Replaces the manifest of the pool in `dir` atomically (write, fsync, rename, fsync
    /// the directory).
    pub fn store(&self, dir: &Path) -> Result<()> {
        let mut this = self.clone();
        // A recorded invalid snapshot needs version 4 too: an older cowsnap ignores the
        // record and would serve the snapshot as valid.
        this.version = if this.stacks().any(|(_, l)| !l.is_empty())
            || this.snapshots.iter().any(|s| s.invalid.is_some())
        {
            MANIFEST_VERSION
        } else if this.snapshots.iter().any(|s| s.merging.is_some()) {
            MANIFEST_VERSION_MERGING
        } else {
            MANIFEST_VERSION_PLAIN
        };
        this.validate()?;
        let io = |op: &'static str, p: &Path| {
            let name = p.display().to_string();
            move |e| Error::io(op, 0, name, e)
        };
        let tmp = dir.join(format!(".{MANIFEST}.tmp"));
        let dst = dir.join(MANIFEST);
        let mut text = serde_json::to_vec_pretty(&this)
            .map_err(|e| Error::InvalidArgument(format!("cannot encode manifest: {e}")))?;
        text.push(b'\n');
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io("create", &tmp))?;
            f.write_all(&text).map_err(io("write", &tmp))?;
            f.sync_all().map_err(io("fsync", &tmp))?;
        }
        fs::rename(&tmp, &dst).map_err(io("rename", &dst))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync", dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let mut m = Manifest::new();
        m.origins.push(OriginEntry {
            name: "base".into(),
            path: "base.img".into(),
            owned: true,
            id: None,
            layers: Vec::new(),
        });
        m.snapshots.push(SnapshotEntry {
            name: "snap1".into(),
            origin: "base".into(),
            cow: "snap1.cow".into(),
            store: "P".into(),
            chunk_sectors: 8,
            owned: true,
            id: Some(FileId::File { dev: 2049, ino: 12 }),
            removing: true,
            merging: None,
            cow_layers: Vec::new(),
            invalid: None,
        });
        m
    }

    #[test]
    fn names_are_checked() {
        for good in ["a", "vm-1.disk", "A_b"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "-x", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn manifest_round_trips_and_validates() {
        let scratch = cowsnap_core::testkit::scratch("manifest");
        let dir = scratch.join("pool");
        fs::create_dir_all(&dir).unwrap();
        let m = sample();
        m.store(&dir).unwrap();
        assert_eq!(Manifest::load(&dir).unwrap(), m);

        let mut bad = sample();
        bad.snapshots[0].origin = "nope".into();
        assert!(bad.validate().is_err());
        let mut bad = sample();
        bad.snapshots[0].name = "base".into();
        assert!(bad.validate().is_err());
        let mut bad = sample();
        bad.snapshots[0].chunk_sectors = 12;
        assert!(bad.validate().is_err());

        // A merge makes it version 3 (older cowsnap refuses it); without one it stays 2.
        let mut merging = sample();
        merging.snapshots[0].merging = Some(MergeRecord {
            initial_allocated_sectors: 64,
            on_activation: false,
            paused: true,
            rate: Some(1 << 20),
        });
        merging.store(&dir).unwrap();
        let back = Manifest::load(&dir).unwrap();
        assert_eq!(back.version, 3);
        assert_eq!(back.snapshots[0].merging, merging.snapshots[0].merging);
        m.store(&dir).unwrap();
        assert_eq!(Manifest::load(&dir).unwrap().version, 2);
        let mut two = merging.clone();
        two.snapshots.push(SnapshotEntry {
            name: "snap2".into(),
            ..merging.snapshots[0].clone()
        });
        assert!(two
            .validate()
            .unwrap_err()
            .to_string()
            .contains("two merging"));

        fs::write(dir.join(MANIFEST), b"{\"version\": 1, \"origins\": [").unwrap();
        let e = Manifest::load(&dir).unwrap_err();
        assert!(e.to_string().contains("pool.json"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
        assert!(Manifest::load(&dir)
            .unwrap_err()
            .to_string()
            .contains("not a cowsnap pool"));
    }

    #[test]
    fn layers_make_version_4_and_are_validated() {
        let scratch = cowsnap_core::testkit::scratch("manifest-layers");
        let dir = scratch.join("pool");
        fs::create_dir_all(&dir).unwrap();
        let bbr = LayerEntry::Bbr(BbrEntry {
            target: BbrTarget::Bbr,
            spares: "base.spares".into(),
            id: None,
            chunk_sectors: 8,
        });
        let dust = LayerEntry::Target(LayerSpec::parse("test-dust 8 enabled").unwrap());
        let mut m = sample();
        m.origins[0].layers = vec![dust.clone(), bbr.clone()];
        m.snapshots[0].cow_layers = vec![LayerEntry::Target(LayerSpec::TestZero)];
        m.store(&dir).unwrap();
        let back = Manifest::load(&dir).unwrap();
        assert_eq!(back.version, 4);
        assert_eq!(back.origins[0].layers, m.origins[0].layers);
        assert_eq!(back.snapshots[0].cow_layers, m.snapshots[0].cow_layers);
        assert_eq!(
            stack_size(1 << 20, &back.origins[0].layers).unwrap(),
            1 << 20
        );
        let lin = LayerEntry::Target(LayerSpec::parse("linear 8 16").unwrap());
        assert_eq!(stack_size(1 << 20, &[lin]).unwrap(), 16 * 512);
        // Without layers, the older version again.
        sample().store(&dir).unwrap();
        assert_eq!(Manifest::load(&dir).unwrap().version, 2);

        let refused = |m: Manifest, what: &str| {
            let e = m.validate().unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        };
        let mut two = sample();
        two.origins[0].layers = vec![bbr.clone(), bbr.clone()];
        refused(two, "at most one bbr");
        let mut outside = sample();
        outside.origins[0].layers = vec![LayerEntry::Bbr(BbrEntry {
            target: BbrTarget::Bbr,
            spares: "/etc/passwd".into(),
            id: None,
            chunk_sectors: 8,
        })];
        refused(outside, "plain name inside the pool");
        let mut under_cow = sample();
        under_cow.snapshots[0].cow_layers = vec![bbr];
        refused(under_cow, "under a COW");
        let mut bad_spec = sample();
        bad_spec.origins[0].layers = vec![LayerEntry::Target(LayerSpec::TestError {
            start: 0,
            sectors: 0,
        })];
        refused(bad_spec, "must not be 0");
        // A layer no version knows does not decode.
        let text = fs::read_to_string(dir.join(MANIFEST)).unwrap().replace(
            "\"origins\": [",
            "\"origins\": [{\"name\":\"x\",\"path\":\"x.img\",\"owned\":true,\"layers\":[{\"target\":\"frob\"}]},",
        );
        fs::write(dir.join(MANIFEST), text).unwrap();
        assert!(Manifest::load(&dir).is_err());
    }
}
