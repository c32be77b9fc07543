//! weft-store: each node's durable event log, on LMDB (heed).
//!
//! A [`Store`] holds every space of one node in one LMDB environment: the applied
//! events in local (lsn) order, which is causal order; per space the version vector;
//! per key the frontier (and, in spaces whose policy is a merge, the merged state); and
//! the pending set of remote events that arrived before their causes. Local writes
//! ([`Store::append`]) and remote events ([`Store::ingest`]) go to a single writer
//! thread that group-commits them (see `writer.rs`), signing each commit's last local
//! event per space, which vouches for the ones before it through the hash chain; reads
//! run on blocking threads with their own read transactions.
//!
//! Architecture invariant: this crate knows no network. It trusts nothing it is given
//! by `ingest` — every event is validated, signature-checked and hash-chain-checked here
//! — and it answers a write only once it is durable.
//!
//! Policies: [`Store::configure_space`] gives a space its conflict [`Policy`] and records
//! the policy's identity on first use, refusing a different one later. A space never
//! configured is a plain resolver space: its events are logged and its frontiers kept,
//! and reads decide conflicts with whatever resolver the reader uses.
//!
//! Reads: besides point reads, [`Store::read_events`] pages through the log in
//! either direction with key-prefix, op and kind filters and opaque cursors,
//! [`Store::key_history`] lists one key's events, and [`Store::get_at`] /
//! [`Store::merged_state_at`] recompute a key as of an earlier lsn (`reads.rs`).
//!
//! Transactions: [`Store::append_transaction`] writes several keys atomically, here and
//! on every replica (see `txn.rs` for the design: every event of a transaction names
//! its whole group in reserved meta, the group's last event is signed, and replicas
//! apply a group only whole, in one commit).
//!
//! Checking: [`check`] verifies every invariant of a closed data directory offline and
//! reports each violation (`check.rs`).
//!
//! # Durability: what survives `kill -9` and a power cut
//!
//! LMDB runs with `NO_SYNC` and `WRITE_MAP` in both modes: a commit writes its pages
//! into the memory map and the OS writes them back when it likes. A killed process
//! therefore loses nothing that was committed (the kernel still holds the pages), while
//! a machine crash or power cut can leave the LMDB file torn, because the kernel writes
//! pages back in any order. What differs between the modes is what makes a write
//! durable ([`StoreConfig::durability`]):
//!
//! - [`Durability::Full`] (the default): the journal (`journal.rs`). Each batch is
//!   appended to `journal.wj` before its LMDB commit, and its callers are answered, and
//!   its events offered to peers, only once a flush thread has `fdatasync`ed the journal
//!   past it. On open, a state file tells a killed process (the same boot: LMDB is
//!   intact, and journal records past the position LMDB recorded, which were never
//!   answered, are cut) from a machine crash (another boot: LMDB is set aside as
//!   `data.mdb.torn` and rebuilt from the journal, which holds every acknowledged
//!   batch). An acknowledged `append` or `ingest` survives both.
//! - [`Durability::Relaxed`]: no journal. A flush thread calls `force_sync` at most every
//!   `flush_every` when there were commits since the last flush (and on close). `kill
//!   -9` loses nothing; a machine crash or power cut may lose the commits of the last
//!   `flush_every` (lost local events are re-created with the same seqs, which a peer
//!   that already had the lost ones sees as a fork) and may leave the file
//!   inconsistent: run `weft check` after one. Use it where throughput matters more
//!   than the last writes before a power loss.
//!
//! Within LMDB each command's writes to every table are in one transaction, so after any
//! restart the indexes agree with the log.
//!
//! A data directory must be opened by one process at a time: LMDB would let a second
//! process in, and two writer threads with separate caches would hand out the same lsn
//! twice.
//!
//! # The map never fills
//!
//! The LMDB map starts at [`StoreConfig::map_size`] and doubles whenever a batch runs
//! out of it (the batch is aborted and retried whole, so callers never see `MapFull`)
//! and ahead of time when the file passes 80% of it; see `map.rs` for how resizing is
//! kept safe from concurrent read transactions.

mod check;
mod error;
mod flush;
mod journal;
mod map;
mod prefault;
mod prepare;
mod reads;
mod tables;
mod txn;
mod verify;
mod writer;

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use heed::{Env, EnvFlags, EnvOpenOptions, RoTxn, WithoutTls};
use tokio::sync::{broadcast, mpsc, oneshot};
use weft_crdt::sync::{self, Offer, PageBuilder};
use weft_crdt::{
    Event, Hlc, NodeId, Op, Policy, PolicyIdentity, SigningKey, SpaceName, VersionVector,
};

pub use crate::check::{check, CheckReport, SpaceCheck};
pub use crate::error::StoreError;
use crate::map::MapControl;
pub use crate::reads::{Cursor, EventPage, EventQuery, Start, SCAN_BUDGET};
use crate::tables::{
    Tables, FORMAT_VERSION, MAX_DBS, MAX_TABLE_KEY, META_FORMAT, META_HLC, META_NODE_ID,
};
pub use crate::txn::{MAX_TXN_WRITES, RESERVED_META_PREFIX, TXN_META_KEY};
use crate::writer::{Command, Prepared, Writer};

/// How many applied events a slow subscriber may fall behind before it sees
/// `RecvError::Lagged` and must catch up with [`Store::events_since`].
pub const SUBSCRIBE_CAPACITY: usize = 4096;

/// LMDB reader slots; see `Store::open`.
const MAX_READERS: u32 = 1024;

/// Tunables of a [`Store`].
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Initial size of the LMDB map. The map grows by doubling whenever a write needs
    /// more room (and ahead of time once the file passes 80% of it), so this only sets
    /// where growth starts; an existing directory is opened with at least the size its
    /// data needs. Rounded up to a multiple of 64 KiB (LMDB needs a multiple of the page
    /// size). The map is sparse: its size costs address space, not disk.
    pub map_size: usize,
    /// The map never grows past this; a write that would need more fails with
    /// [`StoreError::StoreFull`] and stores nothing.
    pub max_map_size: usize,
    /// When commits reach the disk; see [`Durability`].
    pub durability: Durability,
    /// Commands that may wait for the writer thread; further callers wait in `.await`
    /// (back-pressure instead of unbounded memory).
    pub writer_queue: usize,
    /// Most commands group-committed in one write transaction. Bounds the latency one
    /// batch adds to the first caller in it.
    pub max_batch: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            map_size: 64 << 20,
            max_map_size: 1 << 40,
            durability: Durability::Full,
            writer_queue: 1024,
            max_batch: 1024,
        }
    }
}

/// When a commit is made durable. See the crate docs ("Durability") for what survives
/// a killed process and a power cut in each mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// Every batch is appended to the journal (`journal.wj` in the data directory) and
    /// the journal is flushed (`fdatasync`) before any write in it is acknowledged or
    /// sent to a peer. An acknowledged write survives `kill -9` and a power cut: after
    /// a machine crash the store is rebuilt from the journal on open. Costs one
    /// `fdatasync` per group of commits, on a thread of its own, and the journal's disk
    /// space (about the size of the events).
    #[default]
    Full,
    /// The environment runs with LMDB's `NO_SYNC`: a commit is acknowledged once it is in
    /// the OS page cache, and a flush thread flushes to disk (`fsync`) at most every
    /// `flush_every`, whenever it has committed something since the last flush, and
    /// when the store closes. A killed process loses nothing; a machine crash or power
    /// cut may lose the commits of the last `flush_every`, and may leave the file
    /// inconsistent (pages reach the disk in any order). No journal is kept.
    Relaxed {
        /// Longest time a commit may stay unflushed while the writer is running.
        flush_every: Duration,
    },
}

impl Durability {
    /// The flush interval [`Durability::relaxed`] uses.
    pub const DEFAULT_FLUSH_EVERY: Duration = Duration::from_millis(100);

    /// [`Durability::Relaxed`] with [`Durability::DEFAULT_FLUSH_EVERY`].
    pub fn relaxed() -> Self {
        Durability::Relaxed {
            flush_every: Self::DEFAULT_FLUSH_EVERY,
        }
    }
}

/// A local write, before `append` gives it a seq, clock, hlc and prev (and, at the end
/// of its commit, a signature).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    /// The record, e.g. `todos/42`.
    pub key: String,
    /// Put or delete.
    pub op: Op,
    /// The application's event type, e.g. `TodoRenamed`; may be empty.
    pub kind: String,
    /// The CBOR-encoded value; empty for a delete.
    pub payload: Vec<u8>,
    /// Audit data.
    pub meta: BTreeMap<String, String>,
}

impl Write {
    /// A put of `payload` with no kind and no meta.
    pub fn put(key: impl Into<String>, payload: Vec<u8>) -> Self {
        Write {
            key: key.into(),
            op: Op::Put,
            kind: String::new(),
            payload,
            meta: BTreeMap::new(),
        }
    }

    /// A delete with no kind and no meta.
    pub fn delete(key: impl Into<String>) -> Self {
        Write {
            key: key.into(),
            op: Op::Delete,
            kind: String::new(),
            payload: Vec::new(),
            meta: BTreeMap::new(),
        }
    }
}

/// An event as applied on this node: where it sits in the space's local order.
#[derive(Clone, Debug)]
pub struct Applied {
    /// The space it belongs to.
    pub space: SpaceName,
    /// Its local position, from 1, contiguous per space and never reused.
    pub lsn: u64,
    /// The event.
    pub event: Event,
    /// True when, right after this event was applied, its key's frontier held more
    /// than one event: concurrent writes the space's policy has to decide between.
    /// Recorded with the event, so [`Store::events_since`] reports it too.
    pub conflict: bool,
}

/// What [`Store::ingest`] did with a batch.
#[derive(Debug, Default)]
pub struct IngestOutcome {
    /// Events applied, in apply (lsn) order, including parked events the batch
    /// released. Shared with the commit feed ([`Store::subscribe`]), hence the `Arc`.
    pub applied: Vec<Arc<Applied>>,
    /// Events already applied or already parked.
    pub duplicates: usize,
    /// Events of this batch left in the pending set, waiting for causes not yet here.
    pub parked: usize,
}

/// A batch queued by [`Store::submit_ingest`]: its outcome arrives once the writer has
/// committed it (durably in full mode).
#[derive(Debug)]
pub struct IngestTicket {
    answer: oneshot::Receiver<Result<IngestOutcome, StoreError>>,
    bytes: u64,
}

impl IngestTicket {
    /// Bytes of the batch's events in their canonical encoding, as they are stored.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Waits for the commit that holds the batch.
    pub async fn outcome(self) -> Result<IngestOutcome, StoreError> {
        self.answer.await.map_err(|_| StoreError::Closed)?
    }
}

/// One page of a pull: events in causal (lsn) order.
#[derive(Debug)]
pub struct Page {
    /// The events the puller lacks, oldest first.
    pub events: Vec<Event>,
    /// True when the scan reached the end of the log: pulling again with the updated
    /// version vector would return nothing new.
    pub done: bool,
}

/// Counts for status displays.
#[derive(Debug, Clone, Default)]
pub struct SpaceStats {
    /// Applied events.
    pub events: u64,
    /// Highest lsn (equal to `events`, as lsns are contiguous).
    pub last_lsn: u64,
    /// Remote events parked until their causes arrive.
    pub pending: u64,
    /// Highest contiguous seq applied per origin.
    pub version_vector: VersionVector,
    /// Keys whose frontier holds more than one event (unresolved concurrent writes).
    pub conflicts: u64,
}

/// Handle to a node's durable log. Cheap to clone; all clones share one writer thread,
/// which stops when the last clone is dropped.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    env: Env<WithoutTls>,
    tables: Tables,
    node_id: NodeId,
    /// `Option` so that drop can close the channel before joining the writer.
    commands: Option<mpsc::Sender<Command>>,
    applied_tx: broadcast::Sender<Arc<Applied>>,
    writer: Option<JoinHandle<()>>,
    /// The policies `configure_space` registered, for readers (see [`Store::policy`]).
    /// The writer keeps its own copy; this one is updated after the writer accepted.
    policies: RwLock<HashMap<SpaceName, Policy>>,
    /// The map's size and the lock every read transaction holds shared (see `map.rs`).
    map: Arc<MapControl>,
    /// Full mode: how far the journal is flushed, so that what peers are sent is
    /// durable first.
    durable: Option<journal::Durable>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the writer's loop; joining makes sure the
        // environment is closed once the last handle is gone, so the directory can be
        // opened again at once. The writer finishes at most one batch first.
        self.commands.take();
        if let Some(handle) = self.writer.take() {
            if handle.join().is_err() {
                tracing::error!("store writer thread panicked");
            }
        }
    }
}

impl Store {
    /// Opens (creating if needed) the store in `dir` and starts its writer thread.
    ///
    /// The directory is bound to the node of `signing_key` on first open; opening it
    /// with another key fails with [`StoreError::IdentityMismatch`], because that node
    /// would restart its sequence at 1 in a log that already has another node's chain.
    pub fn open(
        dir: &Path,
        signing_key: SigningKey,
        config: StoreConfig,
    ) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir)?;
        let full = matches!(config.durability, Durability::Full);
        let journal_path = dir.join(journal::JOURNAL_FILE);
        // A run in full mode that did not close under this boot: the machine went down
        // with it, and LMDB (written without fsync) may be torn. Rebuilt from the journal.
        let rebuild = full
            && journal_path.exists()
            && match journal::read_state(dir)? {
                journal::LastRun::Open(prev) => {
                    prev.is_none() || journal::boot_id().as_ref() != prev.as_ref()
                }
                _ => false,
            };
        if rebuild {
            set_aside_lmdb(dir)?;
        }
        let map_size = map::round_up(config.map_size)
            .ok_or_else(|| StoreError::Io(std::io::Error::other("map_size too large")))?;
        let mut options = EnvOpenOptions::new().read_txn_without_tls();
        // Reads run on tokio's blocking pool (up to 512 threads by default), each with
        // its own read transaction: LMDB's default of 126 reader slots could run out.
        options
            .map_size(map_size)
            .max_dbs(MAX_DBS)
            .max_readers(MAX_READERS);
        // SAFETY: NO_SYNC and WRITE_MAP do not touch memory safety (heed hands out only
        // shared slices of the map, and only the writer thread writes). In full mode
        // the journal makes commits durable and LMDB is rebuilt from it after a machine
        // crash; what relaxed mode gives up is documented on `Durability::Relaxed`.
        // WRITE_MAP: the writer writes pages in the map instead of copying each dirty
        // page into the file at commit, which was a fifth of its time. It rules out
        // nested transactions (see `Writer::run_each`).
        unsafe { options.flags(EnvFlags::NO_SYNC | EnvFlags::WRITE_MAP) };
        // SAFETY: LMDB's memory map is only unsound if the file is modified behind its
        // back; the store is the only user of its directory (see the crate docs).
        let env = match unsafe { options.open(dir) } {
            Ok(env) => env,
            Err(heed::Error::EnvAlreadyOpened) => {
                return Err(StoreError::AlreadyOpen(dir.to_path_buf()))
            }
            Err(e) => return Err(e.into()),
        };
        let map = Arc::new(MapControl::new(env.clone(), config.max_map_size));
        // LMDB opens an existing file with at least the map its data needs, which may
        // leave no room at all: make some before the first write transaction below.
        map.grow_if_nearly_full()?;
        if env.max_key_size() < MAX_TABLE_KEY {
            return Err(StoreError::Corrupt(format!(
                "LMDB was built with a {}-byte key limit; weft needs {MAX_TABLE_KEY} (heed feature `longer-keys`)",
                env.max_key_size()
            )));
        }
        let tables = Tables::create(&env)?;
        let node_id = NodeId::of(&signing_key);
        let hlc_last = init_meta(&env, &tables, node_id)?;

        let (applied_tx, _) = broadcast::channel(SUBSCRIBE_CAPACITY);
        let mut writer = Writer::new(
            env.clone(),
            tables,
            signing_key,
            hlc_last,
            config.max_batch,
            applied_tx.clone(),
        )?
        .with_map(map.clone())
        .with_prefault()?
        .with_durability(config.durability)?;
        let durable = if full {
            let journal = if rebuild {
                let mut scan = journal::Scan::open(&journal_path)?.ok_or_else(|| {
                    StoreError::Corrupt(format!("{} vanished", journal_path.display()))
                })?;
                let records = writer.replay(&mut scan)?;
                tracing::warn!(
                    records,
                    "store: rebuilt {} from its journal after a machine crash",
                    dir.display()
                );
                journal::Journal::open_at(&journal_path, scan.at())?.ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "{} changed while rebuilding",
                        journal_path.display()
                    ))
                })?
            } else {
                open_or_seed_journal(&journal_path, &env, &tables)?
            };
            journal::write_state(dir, &journal::LastRun::Open(journal::boot_id()))?;
            let (flush, durable) = journal::Flush::start(&journal, FLUSH_QUEUE)?;
            writer = writer.with_journal(journal, flush, durable.written.clone());
            Some(durable)
        } else {
            // Relaxed runs keep no journal; the next full run writes a new one.
            let mut txn = env.write_txn()?;
            if tables.meta.delete(&mut txn, tables::META_JOURNAL)? {
                txn.commit()?;
            }
            match std::fs::remove_file(&journal_path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
            journal::write_state(dir, &journal::LastRun::Relaxed)?;
            None
        };
        let (tx, rx) = mpsc::channel(config.writer_queue.max(1));
        let handle = std::thread::Builder::new()
            .name("weft-store-writer".into())
            .spawn(move || writer.run(rx))?;
        Ok(Store {
            inner: Arc::new(Inner {
                env,
                tables,
                node_id,
                commands: Some(tx),
                applied_tx,
                writer: Some(handle),
                policies: RwLock::new(HashMap::new()),
                map,
                durable,
            }),
        })
    }

    /// The node this store writes as.
    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// Appends a local write to `space` and returns once it is durable.
    ///
    /// The event gets the next seq of this node in the space, the space's version
    /// vector as its clock (everything this node has applied happened before it), a
    /// fresh HLC reading and the hash of this node's previous event as `prev`. It is
    /// signed when it is this node's last event in the space in its commit (or ends a
    /// run of [`weft_crdt::limits::MAX_UNSIGNED_RUN`]); otherwise it is unsigned, and
    /// the signed event that ends the commit vouches for it through the hash chain, so
    /// one signature serves every append the commit holds. Invalid fields, and meta
    /// keys starting with [`RESERVED_META_PREFIX`], fail with [`StoreError::Invalid`]
    /// before anything is stored or any seq is used.
    pub async fn append(&self, space: &SpaceName, write: Write) -> Result<Applied, StoreError> {
        weft_crdt::check_write_fields(
            &write.key,
            write.op,
            &write.kind,
            &write.payload,
            &write.meta,
        )
        .and_then(|()| txn::check_user_meta(&write.meta))
        .map_err(StoreError::Invalid)?;
        let (reply, answer) = oneshot::channel();
        self.send(Command::Append {
            space: space.clone(),
            write,
            reply,
        })
        .await?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Appends several writes as one atomic transaction and returns once all are
    /// durable: consecutive seqs of this node, one commit, all or nothing.
    ///
    /// If any write is invalid (see [`Store::append`]; also more than
    /// [`MAX_TXN_WRITES`] writes) nothing is stored and no seq is used. Each event
    /// carries the signed meta entry [`TXN_META_KEY`] = `"<first seq>/<count>"`, and a
    /// replica ingesting them applies none until it holds all, then all in one commit:
    /// no reader anywhere sees part of the transaction. An empty list does nothing.
    pub async fn append_transaction(
        &self,
        space: &SpaceName,
        writes: Vec<Write>,
    ) -> Result<Vec<Applied>, StoreError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        if writes.len() > MAX_TXN_WRITES {
            return Err(StoreError::Invalid(weft_crdt::EventError::Limit(format!(
                "a transaction has {} writes; the limit is {MAX_TXN_WRITES}",
                writes.len()
            ))));
        }
        let longest = txn::longest_tag();
        for w in &writes {
            txn::check_user_meta(&w.meta).map_err(StoreError::Invalid)?;
            // Checked with the tag the writer will add, so the limits hold for it too.
            let mut meta = w.meta.clone();
            meta.insert(TXN_META_KEY.to_owned(), longest.clone());
            weft_crdt::check_write_fields(&w.key, w.op, &w.kind, &w.payload, &meta)
                .map_err(StoreError::Invalid)?;
        }
        let (reply, answer) = oneshot::channel();
        self.send(Command::Transaction {
            space: space.clone(),
            writes,
            reply,
        })
        .await?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Gives `space` its conflict policy, creating the space if needed; call it before
    /// appending to or ingesting into the space.
    ///
    /// The first configuration records the policy's identity (name and version) in the
    /// store; later ones, in this or any later process, must give the same identity or
    /// fail with [`StoreError::PolicyMismatch`] and change nothing, because replicas
    /// deciding conflicts differently never converge. For a [`Policy::Merge`], every
    /// event applied from now on is folded into its key's state in the same write
    /// transaction (see [`Store::merged_state`]); a space that already has events when
    /// first configured with a merge has its log folded once, in lsn order.
    ///
    /// A space whose recorded policy is a merge refuses appends and ingests with
    /// [`StoreError::PolicyNotConfigured`] until this process configures it.
    pub async fn configure_space(
        &self,
        space: &SpaceName,
        policy: Policy,
    ) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Configure {
            space: space.clone(),
            policy: policy.clone(),
            reply,
        })
        .await?;
        answer.await.map_err(|_| StoreError::Closed)??;
        self.inner
            .policies
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(space.clone(), policy);
        Ok(())
    }

    /// The policy this process configured for `space`, if any.
    pub fn policy(&self, space: &SpaceName) -> Option<Policy> {
        self.inner
            .policies
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(space)
            .cloned()
    }

    /// The policy identity recorded for `space` on its first configuration; `None` for
    /// a space never configured (by any process on this data directory).
    pub async fn policy_identity(
        &self,
        space: &SpaceName,
    ) -> Result<Option<PolicyIdentity>, StoreError> {
        self.read(space, None, |t, txn, sid| {
            Ok(t.stored_policy(txn, sid)?.map(|p| p.identity))
        })
        .await
    }

    /// The merged state of `key` in a merge space: the raw bytes the space's
    /// [`weft_crdt::Merge`] produced (turn them into a value with `Merge::read`).
    /// `None` when the key has no state: never written, or not a merge space.
    pub async fn merged_state(
        &self,
        space: &SpaceName,
        key: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_owned();
        self.read(space, None, move |t, txn, sid| {
            Ok(t.state(txn, sid, key.as_bytes())?.map(<[u8]>::to_vec))
        })
        .await
    }

    /// A blake3 digest of the space's replicated state: its version vector and, for
    /// every key in key order, the key, the ids of its frontier and (in merge spaces)
    /// its state bytes.
    ///
    /// Frontiers and merged states depend only on the set of applied events, so two
    /// replicas that applied the same events have equal digests whatever the order;
    /// comparing digests checks convergence. Pending events are not included. Reads
    /// every key of the space (in one read transaction on a blocking thread).
    pub async fn digest(&self, space: &SpaceName) -> Result<[u8; 32], StoreError> {
        self.read(space, digest_of(VersionVector::new(), []), |t, txn, sid| {
            let vv = t.version_vector(txn, sid)?;
            let mut keys = Vec::new();
            for (key, frontier) in t.frontiers(txn, sid)? {
                let state = t.state(txn, sid, &key)?;
                keys.push((key, frontier, state));
            }
            Ok(digest_of(vv, keys))
        })
        .await
    }

    /// Takes in events from a peer, all or nothing.
    ///
    /// Every event is validated and signature-checked on a blocking thread first; then
    /// the writer drops duplicates, applies the causally ready ones (checking that each
    /// links to its origin's previous event), parks the rest in the persisted pending
    /// set and releases parked events that became ready. If any event of the batch is
    /// bad, nothing is stored and [`StoreError::Rejected`] names the first bad one.
    pub async fn ingest(
        &self,
        space: &SpaceName,
        events: Vec<Event>,
    ) -> Result<IngestOutcome, StoreError> {
        self.submit_ingest(space, events).await?.outcome().await
    }

    /// [`Store::ingest`] in two steps, so that a caller with a stream of batches can
    /// authenticate the next one while the writer commits this one: returns once the
    /// batch is checked and queued for the writer, with a ticket for its outcome.
    /// Batches reach the writer in the order their tickets were issued. A batch of
    /// more than two events whose check has begun is queued even if this future is
    /// dropped (the check runs on a blocking thread, which then queues it): the events
    /// are authentic, and ingesting them twice stores them once.
    pub async fn submit_ingest(
        &self,
        space: &SpaceName,
        events: Vec<Event>,
    ) -> Result<IngestTicket, StoreError> {
        let (reply, answer) = oneshot::channel();
        if events.is_empty() {
            let _ = reply.send(Ok(IngestOutcome::default()));
            return Ok(IngestTicket { answer, bytes: 0 });
        }
        let n = events.len();
        let bytes = if n <= INLINE_AUTHENTICATE_AT {
            // One or two events (a gossip message of a single write) cost less than the
            // hand-off to a blocking thread and back, which at a thousand messages a
            // second per peer was a visible share of a mesh's CPU.
            let prepared: Vec<Prepared> = events.iter().map(Prepared::of).collect();
            check_batch(space, &events, &prepared)?;
            let bytes = prepared.iter().map(|p| p.bytes.len() as u64).sum();
            self.send(Command::Ingest {
                space: space.clone(),
                events,
                prepared,
                reply,
            })
            .await?;
            bytes
        } else {
            // Checked and queued in one hop: the blocking thread hands the batch to the
            // writer itself, rather than waking this task to do it, since each hop
            // between threads is on the path of a sequential catch-up.
            let commands = self.inner.commands.clone().ok_or(StoreError::Closed)?;
            let runtime = tokio::runtime::Handle::current();
            let space = space.clone();
            tokio::task::spawn_blocking(move || {
                let (events, prepared) = if n >= PARALLEL_PREPARE_AT {
                    prepare::prepare_shared(events, |helper| {
                        drop(runtime.spawn_blocking(helper));
                    })
                } else {
                    let prepared = events.iter().map(Prepared::of).collect();
                    (events, prepared)
                };
                check_batch(&space, &events, &prepared)?;
                let bytes = prepared.iter().map(|p| p.bytes.len() as u64).sum();
                commands
                    .blocking_send(Command::Ingest {
                        space,
                        events,
                        prepared,
                        reply,
                    })
                    .map_err(|_| StoreError::Closed)?;
                Ok::<_, StoreError>(bytes)
            })
            .await??
        };
        Ok(IngestTicket { answer, bytes })
    }

    /// The frontier of `key`: one event when the value is decided, several when
    /// concurrent writes await the resolver, none when never written. Sorted by id.
    pub async fn get(&self, space: &SpaceName, key: &str) -> Result<Vec<Event>, StoreError> {
        let key = key.to_owned();
        self.read(space, Vec::new(), move |t, txn, sid| {
            t.frontier_events_at(txn, sid, &key, u64::MAX)
        })
        .await
    }

    /// Applied events with lsn greater than `after`, ascending, at most `limit`.
    pub async fn events_since(
        &self,
        space: &SpaceName,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Applied>, StoreError> {
        let name = space.clone();
        self.read_durable(space, Vec::new(), move |t, txn, sid| {
            let mut out = Vec::new();
            let Some(from) = after.checked_add(1) else {
                return Ok(out);
            };
            for entry in t.events_from(txn, sid, from)?.take(limit) {
                let (lsn, bytes) = entry?;
                let event = tables::decode_event(bytes, format_args!("event at lsn {lsn}"))?;
                out.push(Applied {
                    space: name.clone(),
                    lsn,
                    conflict: t.history_conflict(txn, sid, &event.key, lsn)?,
                    event,
                });
            }
            Ok(out)
        })
        .await
    }

    /// For each origin, the highest seq such that all its events up to it are applied.
    pub async fn version_vector(&self, space: &SpaceName) -> Result<VersionVector, StoreError> {
        self.read(space, VersionVector::new(), |t, txn, sid| {
            t.version_vector(txn, sid)
        })
        .await
    }

    /// What a puller whose version vector is `have` lacks, in causal (lsn) order: at
    /// most `max_events` events and about `max_bytes` encoded bytes, but always at
    /// least one event if any is missing.
    ///
    /// The scan starts at the lowest lsn among each origin's first missing event and
    /// skips what the puller has. Because lsn order is causal order, applying the page
    /// in order never leaves the puller waiting on a cause the page lacks. Parked
    /// events are never served: they are not applied here.
    pub async fn pull_page(
        &self,
        space: &SpaceName,
        have: VersionVector,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Page, StoreError> {
        let empty = Page {
            events: Vec::new(),
            done: true,
        };
        self.read_durable(space, empty, move |t, txn, sid| {
            let mine = t.version_vector(txn, sid)?;
            let mut start: Option<u64> = None;
            for (origin, first, _) in sync::missing(&have, &mine) {
                let entry = t.id_entry(txn, sid, &origin, first)?.ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "applied event {origin}:{first} missing from by_id"
                    ))
                })?;
                start = Some(start.map_or(entry.lsn, |s| s.min(entry.lsn)));
            }
            let Some(start) = start else {
                return Ok(Page {
                    events: Vec::new(),
                    done: true,
                });
            };
            // The scan is ours; what goes on the page is the sync core's decision.
            let mut page = PageBuilder::new(&have, max_events, max_bytes);
            let mut done = true;
            for entry in t.events_from(txn, sid, start)? {
                let (lsn, bytes) = entry?;
                let event = tables::decode_event(bytes, format_args!("event at lsn {lsn}"))?;
                if page.push(event, bytes.len()) == Offer::Full {
                    done = false;
                    break;
                }
            }
            let (events, done) = page.finish(done);
            Ok(Page { events, done })
        })
        .await
    }

    /// Counts and version vector of a space (all zero for a space never written).
    pub async fn stats(&self, space: &SpaceName) -> Result<SpaceStats, StoreError> {
        self.read(space, SpaceStats::default(), |t, txn, sid| {
            let last_lsn = t.last_lsn(txn, sid)?;
            Ok(SpaceStats {
                events: last_lsn,
                last_lsn,
                pending: t.pending_count(txn, sid)?,
                version_vector: t.version_vector(txn, sid)?,
                conflicts: t.conflicts(txn, sid)?,
            })
        })
        .await
    }

    /// Every event applied from now on, local or remote, in every space, each sent
    /// after its commit is durable. A receiver more than [`SUBSCRIBE_CAPACITY`] events
    /// behind gets `Lagged` and should catch up with [`Store::events_since`].
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Applied>> {
        self.inner.applied_tx.subscribe()
    }

    /// The LMDB map's current size in bytes. It starts at [`StoreConfig::map_size`] and
    /// doubles as the data grows.
    pub fn map_size(&self) -> usize {
        // LMDB reads the size from its meta pages, inside the mapping a resize unmaps.
        let _guard = self.inner.map.read_guard();
        self.inner.map.map_size()
    }

    async fn send(&self, cmd: Command) -> Result<(), StoreError> {
        let tx = self.inner.commands.as_ref().ok_or(StoreError::Closed)?;
        tx.send(cmd).await.map_err(|_| StoreError::Closed)
    }

    /// [`Store::read`] for what may go to peers: in full mode it returns only once
    /// everything its snapshot holds is flushed to the journal (commits become visible
    /// just before their flush ends). A peer must never hold an event this node could
    /// lose in a crash: this node would write another event with the same seq.
    async fn read_durable<T, F>(&self, space: &SpaceName, absent: T, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Tables, &RoTxn, tables::SpaceId) -> Result<T, StoreError> + Send + 'static,
    {
        let Some(durable) = self.inner.durable.clone() else {
            return self.read(space, absent, f).await;
        };
        let written = durable.written.clone();
        let (value, mark) = self
            .read(space, (absent, 0), move |t, txn, sid| {
                // Loaded after the snapshot was taken: covers every commit it shows.
                let mark = written.load(std::sync::atomic::Ordering::Acquire);
                f(t, txn, sid).map(|v| (v, mark))
            })
            .await?;
        durable.wait_for(mark).await?;
        Ok(value)
    }

    /// Runs `f` on a blocking thread in a fresh read transaction, or returns `absent`
    /// for a space never written. The transaction ends before the result is returned,
    /// so it is never held across an `.await`.
    async fn read<T, F>(&self, space: &SpaceName, absent: T, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Tables, &RoTxn, tables::SpaceId) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        let name = space.clone();
        tokio::task::spawn_blocking(move || {
            // Declared before the transaction, so it is released after it ends.
            let _no_resize = inner.map.read_guard();
            let txn = inner.env.read_txn()?;
            match inner.tables.space_id(&txn, name.as_str())? {
                Some(sid) => f(&inner.tables, &txn, sid),
                None => Ok(absent),
            }
        })
        .await?
    }
}

/// Batches at least this long are encoded and hashed on two blocking threads (see
/// `prepare`); for shorter ones the second thread would cost more than it saves.
const PARALLEL_PREPARE_AT: usize = 64;

/// Batches up to this many events are authenticated on the calling task: about one
/// signature check (~50 µs), within what a runtime task may take between awaits.
/// Larger ones are authenticated on blocking threads, so that neither the writer nor
/// the async runtime pays for it.
const INLINE_AUTHENTICATE_AT: usize = 2;

/// Authenticates a remote batch whose encodings and hashes are computed (structure,
/// signatures and hash chains, transaction tags). The hashes serve the chain checks,
/// so no event is encoded twice.
fn check_batch(
    space: &SpaceName,
    events: &[Event],
    prepared: &[Prepared],
) -> Result<(), StoreError> {
    let hashes: Vec<weft_crdt::EventHash> = prepared.iter().map(|p| p.hash).collect();
    verify::verify_hashed(space, events, &hashes)?;
    for e in events {
        txn::group_of(e).map_err(|reason| StoreError::Rejected { id: e.id(), reason })?;
    }
    Ok(())
}

/// Jobs that may queue for the journal's flush thread before the writer waits for it:
/// a batch journaled ahead queues two (its record's flush, then its answers after the
/// commit), so this is about four batches.
const FLUSH_QUEUE: usize = 8;

/// Moves a possibly torn LMDB file out of the way of a rebuild (one copy is kept, for
/// inspection) and drops its lock file.
fn set_aside_lmdb(dir: &Path) -> Result<(), StoreError> {
    let data = dir.join("data.mdb");
    if data.exists() {
        std::fs::rename(&data, dir.join("data.mdb.torn"))?;
    }
    match std::fs::remove_file(dir.join("lock.mdb")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    journal::sync_dir(&data)?;
    Ok(())
}

/// The journal at the position LMDB recorded, or, when there is none that matches (a
/// new directory, or one last written without a journal), a new one written from
/// LMDB's contents, whose position is then committed and flushed to LMDB.
fn open_or_seed_journal(
    path: &Path,
    env: &Env<WithoutTls>,
    tables: &Tables,
) -> Result<journal::Journal, StoreError> {
    let recorded = {
        let txn = env.read_txn()?;
        tables
            .meta
            .get(&txn, tables::META_JOURNAL)?
            .map(journal::Position::from_bytes)
            .transpose()?
    };
    if let Some(pos) = recorded {
        if let Some(j) = journal::Journal::open_at(path, pos)? {
            return Ok(j);
        }
        tracing::warn!(
            "store: {} does not match the store; writing a new one from the store",
            path.display()
        );
    }
    let j = journal::seed(path, env, tables)?;
    let mut txn = env.write_txn()?;
    tables
        .meta
        .put(&mut txn, tables::META_JOURNAL, &j.position().to_bytes())?;
    txn.commit()?;
    // Until the state file names this run, a crash is handled as one without a
    // journal: LMDB must hold the position on disk by itself.
    env.force_sync()?;
    Ok(j)
}

/// Checks the layout version and the directory's owner, recording both on first open,
/// and returns the last persisted HLC reading.
fn init_meta(env: &Env<WithoutTls>, tables: &Tables, node_id: NodeId) -> Result<Hlc, StoreError> {
    let mut txn = env.write_txn()?;
    match tables.meta.get(&txn, META_FORMAT)? {
        Some(b) => {
            let found = tables::be_u32(b, "format version")?;
            if found != FORMAT_VERSION {
                return Err(StoreError::UnsupportedLayout {
                    found,
                    supported: FORMAT_VERSION,
                });
            }
        }
        None => tables
            .meta
            .put(&mut txn, META_FORMAT, &FORMAT_VERSION.to_be_bytes())?,
    }
    match tables.meta.get(&txn, META_NODE_ID)? {
        Some(b) => {
            let stored: [u8; 32] = b
                .try_into()
                .map_err(|_| StoreError::Corrupt("stored node id is not 32 bytes".into()))?;
            let stored = NodeId::from_bytes(stored);
            if stored != node_id {
                return Err(StoreError::IdentityMismatch {
                    stored,
                    given: node_id,
                });
            }
        }
        None => tables
            .meta
            .put(&mut txn, META_NODE_ID, node_id.as_bytes())?,
    }
    let hlc = match tables.meta.get(&txn, META_HLC)? {
        Some(b) => Hlc(tables::be_u64(b, "hlc")?),
        None => Hlc::default(),
    };
    txn.commit()?;
    Ok(hlc)
}

/// The digest [`Store::digest`] returns. Every variable-length part is length-prefixed
/// and every count given, so no two different states hash the same input.
fn digest_of<'a>(
    vv: VersionVector,
    keys: impl IntoIterator<Item = (Vec<u8>, Vec<weft_crdt::EventId>, Option<&'a [u8]>)>,
) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"weft/space-digest/1");
    h.update(&(vv.len() as u64).to_be_bytes());
    // Sorted by origin (a BTreeMap underneath), so equal vectors hash equally.
    for (origin, seq) in vv.iter() {
        h.update(origin.as_bytes());
        h.update(&seq.to_be_bytes());
    }
    for (key, frontier, state) in keys {
        h.update(b"k");
        h.update(&(key.len() as u64).to_be_bytes());
        h.update(&key);
        h.update(&(frontier.len() as u64).to_be_bytes());
        for id in &frontier {
            h.update(id.origin.as_bytes());
            h.update(&id.seq.to_be_bytes());
        }
        match state {
            Some(s) => {
                h.update(&[1]);
                h.update(&(s.len() as u64).to_be_bytes());
                h.update(s);
            }
            None => {
                h.update(&[0]);
            }
        }
    }
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests;
