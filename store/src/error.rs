use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;
use weft_crdt::{EventError, EventId, NodeId, PolicyIdentity, SpaceName};

/// Why a store operation failed.
///
/// `Invalid` and `Rejected` are the caller's or the sender's fault and leave the store
/// untouched; the others are failures of the machine or of the data directory.
#[derive(Debug, Error)]
pub enum StoreError {
    /// A local write breaks a rule of [`weft_crdt::check_write_fields`], or (in a merge
    /// space) its payload is refused by the space's [`weft_crdt::Merge::check`] (as
    /// [`EventError::Malformed`]); nothing was stored and no seq was consumed.
    #[error("invalid write: {0}")]
    Invalid(EventError),
    /// An ingested batch holds an event that is malformed, not signed by its origin, or
    /// does not link to its origin's previous event. The whole batch was refused.
    #[error("event {id} rejected: {reason}")]
    Rejected {
        /// The first bad event of the batch.
        id: EventId,
        /// What is wrong with it.
        reason: EventError,
    },
    /// LMDB failed. Shared (`Arc`) because one failed commit answers every command of
    /// its batch.
    #[error("LMDB: {0}")]
    Lmdb(#[source] Arc<heed::Error>),
    /// The data directory could not be created or read.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Stored bytes that do not decode, or indexes that contradict each other.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// The data directory was written with another on-disk layout (an older or newer
    /// build of the store). Nothing was changed: open it with a build that reads that
    /// layout, or start from an empty directory and let replication fill it.
    #[error("data directory has layout version {found}; this build reads only version {supported}: use a build that reads it, or start from an empty directory and re-sync from peers")]
    UnsupportedLayout {
        /// The layout recorded in the directory.
        found: u32,
        /// The layout this build reads and writes.
        supported: u32,
    },
    /// The data directory belongs to another node: its events were signed with another
    /// key, so writing with this one would start a second, unrelated sequence.
    #[error("data directory belongs to node {stored}, not to {given}")]
    IdentityMismatch {
        /// The node recorded in the directory.
        stored: NodeId,
        /// The node of the key passed to [`crate::Store::open`].
        given: NodeId,
    },
    /// This process already has the directory open; LMDB allows one environment per
    /// path and process.
    #[error("data directory {0} is already open in this process")]
    AlreadyOpen(PathBuf),
    /// The space was created with another conflict policy. Replicas that decide
    /// conflicts differently would never converge, so the store keeps the first one.
    #[error("space {space} was created with resolver {stored}; this node is configured with {given}. Every replica of a space must use the same resolver: run with `--resolver {}` or use another space", stored.name)]
    PolicyMismatch {
        /// The space.
        space: SpaceName,
        /// The policy recorded on the space's first configuration.
        stored: PolicyIdentity,
        /// The policy passed to [`crate::Store::configure_space`].
        given: PolicyIdentity,
    },
    /// The space records a merge policy but this process has not passed its `Merge` to
    /// [`crate::Store::configure_space`]. Applying events without it would leave the
    /// space's merged state behind for good, so nothing is applied.
    #[error("space {space} uses merge {stored}, which this process has not configured; call configure_space first")]
    PolicyNotConfigured {
        /// The space.
        space: SpaceName,
        /// The policy recorded for it.
        stored: PolicyIdentity,
    },
    /// The LMDB map would have to grow past `StoreConfig::max_map_size` to hold the
    /// write. Nothing of it was stored.
    #[error("the store is full: its map is {map_size} bytes and may not grow past {max_map_size} (StoreConfig::max_map_size)")]
    StoreFull {
        /// The map's size when the write failed.
        map_size: usize,
        /// The configured limit.
        max_map_size: usize,
    },
    /// A read was given a cursor this store did not hand out (or one for the other
    /// direction).
    #[error("bad cursor: {0}")]
    BadCursor(String),
    /// The writer thread is gone (the store is shutting down or it panicked).
    #[error("the store's writer has stopped")]
    Closed,
    /// A blocking task of the store panicked or was cancelled by runtime shutdown.
    #[error("background task failed: {0}")]
    Task(String),
}

impl From<heed::Error> for StoreError {
    fn from(e: heed::Error) -> Self {
        StoreError::Lmdb(Arc::new(e))
    }
}

impl From<tokio::task::JoinError> for StoreError {
    fn from(e: tokio::task::JoinError) -> Self {
        StoreError::Task(e.to_string())
    }
}
