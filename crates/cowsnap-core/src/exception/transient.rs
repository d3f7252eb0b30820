//! The transient store (`N`): exceptions in memory, data on the COW device.
//!
//! As in the kernel: no header and no metadata, the first data chunk is COW chunk 0,
//! allocation counts sectors, the store is full when fewer than a chunk's sectors remain,
//! and a commit is immediate. Its exceptions die with it.

use std::sync::Arc;

use parking_lot::Mutex;

use super::index::ExceptionIndex;
use super::store::{ExceptionStore, LoadOutcome, Resume, StoreKind, Usage};
use super::table::Exception;
use crate::dev::BlockDevice;
use crate::error::{Error, Result};
use crate::units::{Chunk, ChunkSize, Sector};

/// The transient exception store.
#[derive(Debug)]
pub struct TransientStore {
    cow: Arc<dyn BlockDevice>,
    chunk_size: ChunkSize,
    /// Next free sector.
    next_free: Mutex<u64>,
    /// The index told of commits, and the position of the next.
    index: Mutex<(Option<ExceptionIndex>, u64)>,
}

impl TransientStore {
    /// A transient store on `cow` with chunks of `chunk_size`.
    pub fn new(cow: Arc<dyn BlockDevice>, chunk_size: ChunkSize) -> Self {
        TransientStore {
            cow,
            chunk_size,
            next_free: Mutex::new(0),
            index: Mutex::new((None, 0)),
        }
    }
}

impl ExceptionStore for TransientStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Transient
    }

    fn chunk_size(&self) -> ChunkSize {
        self.chunk_size
    }

    fn cow(&self) -> &Arc<dyn BlockDevice> {
        &self.cow
    }

    fn load(
        &self,
        _from: Resume,
        _sink: &mut dyn FnMut(u64, Exception) -> Result<()>,
    ) -> Result<LoadOutcome> {
        Ok(LoadOutcome::Fresh)
    }

    fn attach(&self, index: ExceptionIndex) {
        self.index.lock().0 = Some(index);
    }

    fn prepare(&self, _old: Chunk) -> Result<Chunk> {
        let mut next = self.next_free.lock();
        let size = Sector::floor_bytes(self.cow.size()).0;
        let cs = self.chunk_size.sectors();
        if size < *next + cs {
            return Err(Error::CowFull {
                allocated: *next / cs,
                total: size / cs,
            });
        }
        let c = self.chunk_size.chunk_of(Sector(*next));
        *next += cs;
        Ok(c)
    }

    fn commit(&self, batch: &[Exception]) -> Result<()> {
        let mut ix = self.index.lock();
        let (index, next) = &mut *ix;
        if let Some(index) = index {
            index.durable(*next, batch);
        }
        *next += batch.len() as u64;
        Ok(())
    }

    fn abort(&self, _e: &Exception) {}

    fn release(&self, _e: &Exception) {}

    fn invalidate(&self) -> Result<()> {
        Ok(())
    }

    fn usage(&self) -> Usage {
        Usage {
            allocated_sectors: *self.next_free.lock(),
            total_sectors: Sector::floor_bytes(self.cow.size()).0,
            metadata_sectors: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::MemDevice;

    #[test]
    fn transient_allocates_from_chunk_zero_until_full() {
        let cs = ChunkSize::from_sectors(16).unwrap();
        let s = TransientStore::new(Arc::new(MemDevice::new(3 * 8192 + 512)), cs);
        assert_eq!(s.prepare(Chunk(9)).unwrap(), Chunk(0));
        assert_eq!(s.prepare(Chunk(4)).unwrap(), Chunk(1));
        assert_eq!(s.prepare(Chunk(5)).unwrap(), Chunk(2));
        assert!(matches!(s.prepare(Chunk(6)), Err(Error::CowFull { .. })));
        let u = s.usage();
        assert_eq!(
            (u.allocated_sectors, u.total_sectors, u.metadata_sectors),
            (48, 49, 0)
        );
    }
}
