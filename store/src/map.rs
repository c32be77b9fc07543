//! Growing the LMDB map so that it never fills.
//!
//! LMDB maps its file into memory with a fixed size, and a write transaction that needs
//! a page beyond it fails with `MDB_MAP_FULL`. The store starts with
//! `StoreConfig::map_size` and grows: the writer thread doubles the map when a batch
//! hits `MapFull` (aborting and retrying the batch, so no caller ever sees the error) and
//! proactively after a commit that leaves the file more than 80% of the map.
//!
//! `mdb_env_set_mapsize` is only allowed while this process has no transaction open.
//! The writer is the only code that opens write transactions and the only code that
//! resizes, so it simply resizes between transactions. Read transactions are opened by
//! the read paths on blocking threads: each holds [`MapControl::read_guard`] (a shared
//! lock) for as long as its transaction lives, and [`MapControl::grow`] takes the lock
//! exclusively, so a resize waits for open readers to finish and new readers wait for
//! the resize. Relaxed mode's flush holds the shared side too, for its whole
//! `force_sync` (LMDB reads the meta pages and `msync`s through the mapping), so a resize
//! can wait for a flush; resizes are rare (the map doubles each time). Readers never wait
//! for the writer otherwise, and the writer holds the lock only for the microseconds a
//! resize takes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard};

use heed::{Env, WithoutTls};

use crate::StoreError;

/// The map grows in steps that are a multiple of this, which is a multiple of every
/// page size LMDB runs with (4, 16 or 64 KiB).
pub(crate) const MAP_ALIGN: usize = 64 << 10;

/// Grow proactively once the file's high-water mark passes this share of the map.
const GROW_AT_PERCENT: usize = 80;

/// The map's size and the lock that makes resizing safe; shared by the store's read
/// paths and the writer thread.
pub(crate) struct MapControl {
    env: Env<WithoutTls>,
    lock: RwLock<()>,
    max_map_size: usize,
    /// How many times the map was grown, for tests and status.
    pub grows: AtomicU64,
    /// How many batches were retried after `MapFull`.
    pub retries: AtomicU64,
}

impl MapControl {
    pub fn new(env: Env<WithoutTls>, max_map_size: usize) -> Self {
        MapControl {
            env,
            lock: RwLock::new(()),
            max_map_size: round_up(max_map_size).unwrap_or(usize::MAX - (MAP_ALIGN - 1)),
            grows: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        }
    }

    /// Held by every read path for as long as its read transaction is open.
    pub fn read_guard(&self) -> RwLockReadGuard<'_, ()> {
        // The lock guards no data, so a panic while it was held left nothing
        // inconsistent.
        self.lock.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The environment whose map this controls.
    pub fn env(&self) -> &Env<WithoutTls> {
        &self.env
    }

    /// The map's current size in bytes.
    pub fn map_size(&self) -> usize {
        self.env.info().map_size
    }

    /// Bytes of the file LMDB has used so far: its high-water mark. Free pages below it
    /// are reused, but a transaction that needs more than the free list holds allocates
    /// above it, and that is what fails with `MapFull`.
    pub fn used(&self) -> usize {
        let page = self.env.unnamed_database_stat().page_size as usize;
        self.env
            .info()
            .last_page_number
            .saturating_add(1)
            .saturating_mul(page)
    }

    /// Doubles the map. Must not be called while this thread has a transaction open;
    /// other threads' read transactions are waited for.
    pub fn grow(&self) -> Result<usize, StoreError> {
        let _exclusive = self.lock.write().unwrap_or_else(PoisonError::into_inner);
        let current = self.env.info().map_size;
        let wanted = current
            .checked_mul(2)
            .and_then(round_up)
            .unwrap_or(self.max_map_size)
            .min(self.max_map_size);
        if wanted <= current {
            return Err(StoreError::StoreFull {
                map_size: current,
                max_map_size: self.max_map_size,
            });
        }
        // SAFETY: no transaction is open in this process: the writer thread (the only
        // one that opens write transactions) is the caller and has none open, and every
        // read transaction is opened under the shared side of `lock`, which we hold
        // exclusively.
        unsafe { self.env.resize(wanted)? };
        self.grows.fetch_add(1, Ordering::Relaxed);
        tracing::info!(from = current, to = wanted, "grew the LMDB map");
        Ok(wanted)
    }

    /// Grows the map when the file's high-water mark is past [`GROW_AT_PERCENT`] of it,
    /// so that the next batches find room instead of failing and being retried.
    pub fn grow_if_nearly_full(&self) -> Result<(), StoreError> {
        let map = self.map_size();
        if self.used() / GROW_AT_PERCENT > map / 100 && map < self.max_map_size {
            self.grow()?;
        }
        Ok(())
    }
}

/// `size` rounded up to a multiple of [`MAP_ALIGN`] (at least one).
pub(crate) fn round_up(size: usize) -> Option<usize> {
    size.max(MAP_ALIGN).checked_next_multiple_of(MAP_ALIGN)
}

/// Whether an error is LMDB's "map full", which the writer answers by growing the map.
pub(crate) fn is_map_full(e: &StoreError) -> bool {
    matches!(e, StoreError::Lmdb(inner) if is_heed_map_full(inner))
}

pub(crate) fn is_heed_map_full(e: &heed::Error) -> bool {
    matches!(e, heed::Error::Mdb(heed::MdbError::MapFull))
}
