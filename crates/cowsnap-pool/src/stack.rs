//! Stacks of layers under volumes, as device-mapper stacks tables: an origin's file (or a
//! snapshot's COW file) at the bottom, then `linear`, `bbr` and the `test-*` layers, the
//! volume on top.
//!
//! The manifest keeps each stack ([`LayerEntry`], bottom first); this module builds it at
//! activation ([`Pool::build_stack`]), makes the files a `bbr` layer needs when a layer is
//! asked for (its spare file, formatted as a relocation table, staged until the manifest
//! commits), adds and removes layers offline, and answers `table`, `status` and messages
//! (`dmsetup message`) for the layers of a running daemon.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use cowsnap_core::dev::{BlockDevice, FileId};
use cowsnap_core::error::{Error, Result};
use cowsnap_core::exception::persistent::format::TableKind;
use cowsnap_core::exception::persistent::PersistentStore;
use cowsnap_core::exception::{ExceptionStore, IndexConfig, Resume};
use cowsnap_core::layers::{Layer, LayerSpec};
use cowsnap_core::targets::bbr::{Bbr, UnreadableList, MAX_CHUNK_BYTES};
use cowsnap_core::units::{is_sector_aligned, parse_size, ChunkSize};

use super::manifest::{stack_size, BbrEntry, BbrTarget, LayerEntry};
use super::{crash_point, index_identity, staging, Pool, INDEX_DIR};

/// Default size of a `bbr` layer's spare file: 1 % of the volume, at least 16 MiB.
const DEFAULT_SPARES_MIN: u64 = 16 << 20;

/// A layer asked for on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerRequest {
    /// A layer with no file of its own.
    Target(LayerSpec),
    /// `bbr [SPARES_SIZE [CHUNK_SIZE]]`: relocation into a spare file the pool makes.
    Bbr {
        /// Bytes of the spare file; default 1 % of the volume, at least 16 MiB.
        spares: Option<u64>,
        /// Unit of relocation; default 4 KiB.
        chunk: Option<ChunkSize>,
    },
}

impl LayerRequest {
    /// Parses `TARGET ARGS...`: `bbr [SPARES_SIZE [CHUNK]]` or any layer
    /// [`LayerSpec::parse`] knows.
    pub fn parse(line: &str) -> Result<LayerRequest> {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() != Some(&"bbr") {
            return LayerSpec::parse(line)
                .map(LayerRequest::Target)
                .map_err(|e| match e {
                    Error::InvalidArgument(m) if m.contains("known targets:") => {
                        Error::InvalidArgument(format!("{m}, bbr"))
                    }
                    other => other,
                });
        }
        if words.len() > 3 {
            return Err(Error::InvalidArgument(format!(
                "bbr takes at most two arguments, SPARES_SIZE and CHUNK_SIZE: {line:?}"
            )));
        }
        let size = |w: &str, what: &str| {
            parse_size(w).map_err(|e| Error::InvalidArgument(format!("bbr {what} {w:?}: {e}")))
        };
        let spares = words.get(1).map(|w| size(w, "spare size")).transpose()?;
        let chunk = words
            .get(2)
            .map(|w| {
                size(w, "chunk size").and_then(|b| {
                    ChunkSize::from_bytes(b)
                        .map_err(|e| Error::InvalidArgument(format!("bbr chunk size: {e}")))
                        .and_then(|c| {
                            if c.bytes() > MAX_CHUNK_BYTES {
                                Err(Error::InvalidArgument(format!(
                                    "bbr chunk size {c} is too large: at most 1M (a chunk that cannot be read whole is salvaged in memory)"
                                )))
                            } else {
                                Ok(c)
                            }
                        })
                })
            })
            .transpose()?;
        Ok(LayerRequest::Bbr { spares, chunk })
    }
}

/// A running stack: its base's size, its entries and its layers, held weakly: the volume
/// holds its stack (each layer holds the one below), and a stack whose volume is gone
/// (removed, merged, a create that failed) must let go of its files at once.
pub(crate) type RunningStack = (u64, Vec<LayerEntry>, Vec<WeakLayer>);

/// A layer of a running stack, not keeping it alive.
#[derive(Clone, Debug)]
pub(crate) enum WeakLayer {
    /// A layer with no file of its own.
    Target(std::sync::Weak<dyn Layer>),
    /// Bad-block relocation.
    Bbr(std::sync::Weak<Bbr>),
}

impl WeakLayer {
    /// True while the layer lives (takes no reference: a check never ends a stack).
    fn alive(&self) -> bool {
        match self {
            WeakLayer::Target(w) => w.strong_count() > 0,
            WeakLayer::Bbr(w) => w.strong_count() > 0,
        }
    }

    fn upgrade(&self) -> Option<BuiltLayer> {
        match self {
            WeakLayer::Target(w) => w.upgrade().map(BuiltLayer::Target),
            WeakLayer::Bbr(w) => w.upgrade().map(BuiltLayer::Bbr),
        }
    }
}

impl BuiltLayer {
    fn downgrade(&self) -> WeakLayer {
        match self {
            BuiltLayer::Target(l) => WeakLayer::Target(Arc::downgrade(l)),
            BuiltLayer::Bbr(b) => WeakLayer::Bbr(Arc::downgrade(b)),
        }
    }
}

/// A layer of a running stack.
#[derive(Clone, Debug)]
pub enum BuiltLayer {
    /// A layer with no file of its own.
    Target(Arc<dyn Layer>),
    /// Bad-block relocation.
    Bbr(Arc<Bbr>),
}

impl BuiltLayer {
    fn device(&self) -> Arc<dyn BlockDevice> {
        match self {
            BuiltLayer::Target(l) => l.clone().as_device(),
            BuiltLayer::Bbr(b) => b.clone(),
        }
    }

    /// The status line.
    pub fn status(&self) -> String {
        match self {
            BuiltLayer::Target(l) => l.status(),
            BuiltLayer::Bbr(b) => b.status().line(),
        }
    }

    fn status_json(&self) -> serde_json::Value {
        match self {
            BuiltLayer::Target(l) => l.status_json(),
            BuiltLayer::Bbr(b) => serde_json::to_value(b.status()).unwrap_or_default(),
        }
    }

    /// `dmsetup message`: `bbr` answers `status` and `list-unreadable`.
    pub fn message(&self, words: &[&str]) -> Result<String> {
        match self {
            BuiltLayer::Target(l) => l.message(words),
            BuiltLayer::Bbr(b) => match words {
                ["status"] => Ok(b.status().line()),
                ["list-unreadable"] => Ok(b
                    .unreadable()
                    .ranges()
                    .iter()
                    .map(|(s, n)| format!("{s} {n}"))
                    .collect::<Vec<_>>()
                    .join("\n")),
                _ => Err(Error::InvalidArgument(format!(
                    "bbr does not understand {:?}: it takes `status` and `list-unreadable`",
                    words.join(" ")
                ))),
            },
        }
    }
}

/// One layer as `table` and `status` show it.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct LayerInfo {
    /// Position in the stack, 0 at the bottom.
    pub index: usize,
    /// The target: `linear`, `bbr`, `test-dust`, ...
    pub target: String,
    /// The dm-like table line, `0 SECTORS TARGET ARGS`.
    pub table: String,
    /// The status line, when the layer runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// The status as fields, when the layer runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// The table lines (and, for a running stack, the status) of `layers` over a base of
/// `base` bytes.
pub fn layer_infos(
    base: u64,
    layers: &[LayerEntry],
    built: Option<&[BuiltLayer]>,
) -> Vec<LayerInfo> {
    let mut below = base;
    let mut out = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let size = l.size_over(below).unwrap_or(0);
        let table = match l {
            LayerEntry::Target(spec) => spec.table_line(below >> 9),
            LayerEntry::Bbr(b) => format!(
                "0 {} bbr {} {}",
                size >> 9,
                b.spares.display(),
                b.chunk_sectors
            ),
        };
        let running = built.and_then(|b| b.get(i));
        out.push(LayerInfo {
            index: i,
            target: l.target_name().into(),
            table,
            status: running.map(BuiltLayer::status),
            detail: running.map(BuiltLayer::status_json),
        });
        below = size;
    }
    out
}

/// Finds a layer of `layers` by position (`0`, `1`, ...) or by target name (when one
/// layer has it).
pub fn find_layer(volume: &str, layers: &[LayerEntry], which: &str) -> Result<usize> {
    if let Ok(i) = which.parse::<usize>() {
        if i < layers.len() {
            return Ok(i);
        }
    }
    let hits: Vec<usize> = (0..layers.len())
        .filter(|&i| layers[i].target_name() == which)
        .collect();
    match hits.as_slice() {
        [i] => Ok(*i),
        [] => Err(Error::InvalidArgument(format!(
            "volume {volume:?} has no layer {which:?}; its layers (bottom first): {}",
            describe(layers)
        ))),
        _ => Err(Error::InvalidArgument(format!(
            "volume {volume:?} has several {which} layers: name one by its position ({})",
            describe(layers)
        ))),
    }
}

fn describe(layers: &[LayerEntry]) -> String {
    if layers.is_empty() {
        return "none".into();
    }
    layers
        .iter()
        .enumerate()
        .map(|(i, l)| format!("{i} {}", l.target_name()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The files made for new layers, published once the manifest lists them.
#[derive(Debug, Default)]
pub(crate) struct StagedLayers {
    files: Vec<staging::NewFile>,
}

impl StagedLayers {
    /// Gives each staged file its final name; returns the failures as notes (the next
    /// open of the pool finishes them).
    pub(crate) fn publish(self) -> Vec<String> {
        self.files
            .into_iter()
            .filter_map(|f| f.publish().err())
            .map(|e| format!("{e}: the next start of the pool finishes it"))
            .collect()
    }
}

impl Pool {
    /// Where a `bbr` layer's exception index lives (derived data, rebuilt when missing).
    pub(crate) fn bbr_index_dir(&self, b: &BbrEntry) -> PathBuf {
        self.dir
            .join(INDEX_DIR)
            .join(format!(".bbr.{}", b.spares.display()))
    }

    /// Where a `bbr` layer keeps its unreadable list.
    pub(crate) fn bbr_unreadable_path(&self, b: &BbrEntry) -> PathBuf {
        self.dir.join(format!("{}.unreadable", b.spares.display()))
    }

    /// Turns `requests` into manifest entries for a stack of volume `volume` over a base
    /// of `base` bytes (existing layers `existing` below them): checks each, and makes and
    /// formats the spare file of a `bbr` layer, staged under its hidden name.
    pub(crate) fn stage_layers(
        &self,
        volume: &str,
        for_origin: bool,
        base: u64,
        existing: &[LayerEntry],
        requests: &[LayerRequest],
    ) -> Result<(Vec<LayerEntry>, StagedLayers)> {
        let mut below = stack_size(base, existing)?;
        let mut entries = Vec::new();
        let mut staged = StagedLayers::default();
        let mut bbr = existing.iter().any(|l| matches!(l, LayerEntry::Bbr(_)));
        for r in requests {
            let entry = match r {
                LayerRequest::Target(spec) => {
                    spec.check()?;
                    LayerEntry::Target(spec.clone())
                }
                LayerRequest::Bbr { spares, chunk } => {
                    if !for_origin {
                        return Err(Error::InvalidArgument(format!(
                            "volume {volume:?}: a bbr layer goes under an origin; under a COW it is not supported (keep COWs on healthy files)"
                        )));
                    }
                    if std::mem::replace(&mut bbr, true) {
                        return Err(Error::InvalidArgument(format!(
                            "volume {volume:?}: a stack holds at most one bbr layer"
                        )));
                    }
                    let (entry, file) = self.new_spares(volume, below, *spares, *chunk)?;
                    staged.files.push(file);
                    entry
                }
            };
            below = entry.size_over(below).map_err(|e| {
                Error::InvalidArgument(format!(
                    "volume {volume:?}: layer {}: {e}",
                    entry.target_name()
                ))
            })?;
            if below == 0 {
                return Err(Error::InvalidArgument(format!(
                    "volume {volume:?}: layer {} leaves no bytes",
                    entry.target_name()
                )));
            }
            entries.push(entry);
        }
        Ok((entries, staged))
    }

    /// Makes the spare file of a `bbr` layer over `below` bytes and formats it as a
    /// relocation table.
    fn new_spares(
        &self,
        volume: &str,
        below: u64,
        spares: Option<u64>,
        chunk: Option<ChunkSize>,
    ) -> Result<(LayerEntry, staging::NewFile)> {
        let chunk = chunk.unwrap_or(ChunkSize::DEFAULT);
        let size = spares.unwrap_or_else(|| (below / 100).max(DEFAULT_SPARES_MIN));
        let size = size / chunk.bytes() * chunk.bytes();
        if size < 3 * chunk.bytes() || !is_sector_aligned(size) {
            return Err(Error::InvalidArgument(format!(
                "bbr spare file of {size} bytes is too small: at least 3 chunks of {chunk} (header, table, one spare)"
            )));
        }
        let rel = PathBuf::from(format!("{volume}.spares"));
        let file = staging::NewFile::create(&self.dir.join(&rel), size, true)?;
        crash_point("add-layer:staged");
        let dev = self.open_cow(file.path(), Some(file.id()))?;
        let store = PersistentStore::open_as(dev, Some(chunk), false, TableKind::Relocation)?;
        // A fresh file: loading formats it (header and first table area).
        store.load(Resume::default(), &mut |_, _| Ok(()))?;
        let entry = BbrEntry {
            target: BbrTarget::Bbr,
            spares: rel,
            id: Some(file.id()),
            chunk_sectors: chunk.sectors(),
        };
        // An unreadable list (or an index) by this name is left by an earlier bbr layer
        // whose removal stopped after its commit: it belongs to no layer, and the new one
        // must not report that device's lost sectors as its own.
        let list = self.bbr_unreadable_path(&entry);
        if let Err(e) = std::fs::remove_file(&list) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(Error::io("unlink", 0, list.display().to_string(), e));
            }
        }
        let _ = std::fs::remove_dir_all(self.bbr_index_dir(&entry));
        Ok((LayerEntry::Bbr(entry), file))
    }

    /// Builds `layers` over `base` for volume `volume`. A `bbr` layer opens its spare file
    /// (claimed like every volume file, and refused unless it is the file the pool made),
    /// its index and its unreadable list. `seen` collects the spare files' ids so that no
    /// file serves two purposes.
    pub(crate) fn build_stack(
        &self,
        volume: &str,
        base: Arc<dyn BlockDevice>,
        layers: &[LayerEntry],
        seen: &mut HashMap<FileId, String>,
    ) -> Result<(Arc<dyn BlockDevice>, Vec<BuiltLayer>)> {
        let base_bytes = base.size();
        let mut top = base;
        let mut built = Vec::new();
        for l in layers {
            let layer = match l {
                LayerEntry::Target(spec) => BuiltLayer::Target(spec.build(top.clone())?),
                LayerEntry::Bbr(b) => {
                    BuiltLayer::Bbr(self.open_bbr(volume, top.clone(), b, seen)?)
                }
            };
            top = layer.device();
            built.push(layer);
        }
        let mut running = self.running.lock();
        // Stacks whose volumes are gone.
        running.retain(|_, (_, _, weak)| weak.iter().all(WeakLayer::alive));
        if built.is_empty() {
            running.remove(volume);
        } else {
            let weak = built.iter().map(BuiltLayer::downgrade).collect();
            running.insert(volume.to_string(), (base_bytes, layers.to_vec(), weak));
        }
        drop(running);
        Ok((top, built))
    }

    /// The entries and layers of volume `volume`'s running stack, while its volume lives.
    pub(crate) fn running_stack(
        &self,
        volume: &str,
    ) -> Option<(u64, Vec<LayerEntry>, Vec<BuiltLayer>)> {
        let running = self.running.lock();
        let (base, entries, weak) = running.get(volume)?;
        let built: Option<Vec<BuiltLayer>> = weak.iter().map(WeakLayer::upgrade).collect();
        Some((*base, entries.clone(), built?))
    }

    /// Table and status of volume `volume`'s running layers.
    pub fn running_layer_infos(&self, volume: &str) -> Vec<LayerInfo> {
        self.running_stack(volume)
            .map(|(base, entries, built)| layer_infos(base, &entries, Some(&built)))
            .unwrap_or_default()
    }

    fn open_bbr(
        &self,
        volume: &str,
        below: Arc<dyn BlockDevice>,
        b: &BbrEntry,
        seen: &mut HashMap<FileId, String>,
    ) -> Result<Arc<Bbr>> {
        let path = self.resolve(&b.spares);
        // A spare whose write fails must say so at once (another spare is tried).
        let dev = self.open_volume_file_with(&path, b.id, true)?;
        let id = dev.id()?;
        if let Some(other) = seen.get(&id) {
            return Err(Error::SameFile(format!(
                "{} is also {other}: one file cannot serve two purposes",
                path.display()
            )));
        }
        seen.insert(id, format!("the bbr spare file of {volume:?}"));
        let chunk = ChunkSize::from_sectors(b.chunk_sectors)
            .map_err(|e| Error::InvalidArgument(format!("volume {volume:?}: bbr: {e}")))?;
        let store = PersistentStore::open_as(
            super::cow_device(dev),
            Some(chunk),
            false,
            TableKind::Relocation,
        )?;
        if store.is_fresh() {
            return Err(Error::Corrupt {
                device: path.display().to_string(),
                offset: 0,
                reason: "the relocation table's header is zeroed: the pool formatted it when it made the layer, so its table was overwritten; cowsnap will not reformat it (relocated data would read stale)".into(),
            });
        }
        let config = IndexConfig {
            dir: Some(self.bbr_index_dir(b)),
            temporary_in: Some(self.dir.join(INDEX_DIR)),
            cache: self.index_cache().clone(),
            tuning: self.index_tuning(),
            identity: index_identity(b.id),
            fault: None,
        };
        let list = UnreadableList::open(&self.bbr_unreadable_path(b))?;
        let store: Arc<dyn ExceptionStore> = Arc::new(store);
        Bbr::open(below, store, config, list)
    }
}

impl Pool {
    /// The file under volume `volume` (an origin's image, a snapshot's COW), its stack, and
    /// whether the volume is an origin.
    fn stack_of(&self, volume: &str) -> Result<(PathBuf, Vec<LayerEntry>, bool)> {
        if let Some(o) = self.manifest().origin(volume) {
            return Ok((self.resolve(&o.path), o.layers.clone(), true));
        }
        if let Some(s) = self.manifest().snapshot(volume) {
            return Ok((self.resolve(&s.cow), s.cow_layers.clone(), false));
        }
        Err(Error::InvalidArgument(format!(
            "no volume called {volume:?} in this pool"
        )))
    }

    fn set_stack(&mut self, volume: &str, layers: Vec<LayerEntry>) -> Result<()> {
        let mut next = self.manifest().clone();
        if let Some(o) = next.origins.iter_mut().find(|o| o.name == volume) {
            o.layers = layers;
        } else if let Some(s) = next.snapshots.iter_mut().find(|s| s.name == volume) {
            s.cow_layers = layers;
        }
        self.commit(next)
    }

    /// Adds a layer on top of volume `volume`'s stack (offline: the next start builds it).
    /// `linear` is refused: it would move the volume's data; give it when the volume is
    /// created. Returns the layer and notes.
    pub fn add_layer(
        &mut self,
        volume: &str,
        req: &LayerRequest,
    ) -> Result<(LayerEntry, Vec<String>)> {
        if matches!(req, LayerRequest::Target(LayerSpec::Linear { .. })) {
            return Err(Error::InvalidArgument(
                "a linear layer changes where the volume's data lies: give it when the volume is created, not to a volume that holds data".into(),
            ));
        }
        let (path, layers, is_origin) = self.stack_of(volume)?;
        let base = cowsnap_core::dev::FileDevice::open_read_only(&path)?.size();
        let (mut added, staged) =
            self.stage_layers(volume, is_origin, base, &layers, std::slice::from_ref(req))?;
        let entry = added
            .pop()
            .ok_or_else(|| Error::InvalidArgument("no layer".into()))?;
        let mut next = layers;
        next.push(entry.clone());
        self.set_stack(volume, next)?;
        crash_point("add-layer:committed");
        Ok((entry, staged.publish()))
    }

    /// Removes layer `which` (its position or its target's name) from volume `volume`'s
    /// stack, offline. A `linear` layer is refused (the volume's data would move); a `bbr`
    /// layer that relocated chunks or lists unreadable sectors is refused unless `force`
    /// (without it the volume would read the failing device's stale data there); its spare
    /// file is deleted once the manifest no longer lists it.
    pub fn remove_layer(&mut self, volume: &str, which: &str, force: bool) -> Result<Vec<String>> {
        let (_, layers, _) = self.stack_of(volume)?;
        let i = find_layer(volume, &layers, which)?;
        let mut notes = Vec::new();
        let mut staged_removal = None;
        match &layers[i] {
            LayerEntry::Target(LayerSpec::Linear { .. }) => {
                return Err(Error::InvalidArgument(
                    "a linear layer decides where the volume's data lies: removing it would move the data".into(),
                ))
            }
            LayerEntry::Target(_) => {}
            LayerEntry::Bbr(b) => {
                match self.bbr_holds(b) {
                    Ok((0, 0)) => {}
                    Ok((relocations, unreadable)) if !force => {
                        return Err(Error::WrongState(format!(
                            "the bbr layer of {volume:?} holds {relocations} relocated chunks and {unreadable} unreadable sectors: without it the volume would read the failing device's stale data there. Copy the volume off first, or add --force"
                        )));
                    }
                    Ok((relocations, unreadable)) => notes.push(format!(
                        "{relocations} relocated chunks and {unreadable} unreadable sectors of {volume:?} are forgotten: those places read what the device below holds"
                    )),
                    // A spare file that cannot be read may hold relocations: only --force
                    // gives them up (a broken layer must stay removable).
                    Err(e) if !force => {
                        return Err(Error::WrongState(format!(
                            "the bbr layer of {volume:?} cannot be read ({e}): it may hold relocated data. Add --force to remove it anyway"
                        )));
                    }
                    Err(e) => notes.push(format!(
                        "the bbr layer of {volume:?} could not be read ({e}); whatever it relocated is forgotten"
                    )),
                }
                staged_removal =
                    Some((staging::stage_removal(&self.resolve(&b.spares), b.id)?, b.clone()));
                crash_point("remove-layer:staged");
            }
        }
        let mut next = layers;
        next.remove(i);
        self.set_stack(volume, next)?;
        crash_point("remove-layer:committed");
        if let Some((staged, b)) = staged_removal {
            if let Some(p) = staged {
                if let Err(e) = staging::unlink(&p) {
                    notes.push(format!("{e}: the next start of the pool deletes it"));
                }
            }
            let _ = std::fs::remove_file(self.bbr_unreadable_path(&b));
            let _ = std::fs::remove_dir_all(self.bbr_index_dir(&b));
        }
        Ok(notes)
    }

    /// What a `bbr` layer holds: relocations in its table, sectors on its unreadable list.
    fn bbr_holds(&self, b: &BbrEntry) -> Result<(u64, u64)> {
        let path = self.resolve(&b.spares);
        let file = cowsnap_core::dev::FileDevice::open_read_only(&path)?;
        if b.id.is_some_and(|want| file.id().ok() != Some(want)) {
            return Err(Error::Replaced(format!(
                "{} is not the spare file the pool made",
                path.display()
            )));
        }
        let dev: Arc<dyn BlockDevice> = Arc::new(file);
        let store = PersistentStore::open_as(dev, None, false, TableKind::Relocation)?;
        let mut n = 0u64;
        if !store.is_fresh() {
            store.load(Resume::default(), &mut |_, _| {
                n += 1;
                Ok(())
            })?;
        }
        let unreadable = UnreadableList::open(&self.bbr_unreadable_path(b))?.sectors();
        Ok((n, unreadable))
    }
}

/// A stack built offline over `base` from the layers that need no file of their own and
/// that `keep` accepts: a listing builds them all (so `linear` moves and sizes the volume
/// as it will be served); a `bbr` is always left out (its spare file is the serving
/// daemon's; a listing needs sizes and metadata, not relocated data).
pub(crate) fn offline_stack(
    base: Arc<dyn BlockDevice>,
    layers: &[LayerEntry],
    keep: impl Fn(&LayerSpec) -> bool,
) -> Result<Arc<dyn BlockDevice>> {
    let mut top = base;
    for l in layers {
        if let LayerEntry::Target(spec) = l {
            if keep(spec) {
                top = spec.build(top)?.as_device();
            }
        }
    }
    Ok(top)
}
