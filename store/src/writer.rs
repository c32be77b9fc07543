//! The writer thread: the only code that writes to LMDB.
//!
//! Ownership: one `std::thread` owns the write side of the environment, the signing
//! key, the hybrid logical clock and a cache of every space's state: version vector,
//! last lsn, conflict count, the hash of each origin's newest applied event, the size
//! of the pending set, and this node's run of unsigned events (loaded on open, so an
//! append never reads what it can know). Nothing else mutates any of it. Readers use
//! their own read transactions and never see a half-applied command, because LMDB
//! shows them only committed transactions.
//!
//! Data flow: `Store::append`/`Store::ingest` send a [`Command`] on a bounded tokio
//! channel (`StoreConfig::writer_queue`), each with a oneshot for its answer; remote
//! events are already verified, encoded and hashed by then (see `verify`). The thread
//! blocks on the channel, drains what is queued (up to `StoreConfig::max_batch`) and
//! runs it in ONE write transaction (group commit: one fsync for many writes).
//!
//! Batch formation: writers that await each answer come back together right after a
//! commit, but not all at once. In relaxed mode, when fewer commands are queued than the
//! previous batch held, and that batch was answered moments ago, the thread waits up to
//! [`LINGER`] for the rest, so a steady set of writers shares one commit instead of
//! splitting into small ones. In full mode it never waits: while one flush runs, the
//! commits made meanwhile all wait for the next, so committing at once costs no extra
//! flush (measured: waiting, for a count or until the flush ends, was slower).
//!
//! Per commit, not per event: the version vector entries and conflict counters a batch
//! changed, and the HLC, are written once at its end. Local events are signed once per
//! commit: each is sealed unsigned when written, and before the commit the newest local
//! event of each space is re-sealed with a signature (its hash changes, but nothing
//! chains to it yet), so every stored chain head of this node is signed and vouches for
//! the unsigned ones before it through their `prev` hashes. Every
//! [`MAX_UNSIGNED_RUN`]th consecutive event and the last event of a transaction are
//! signed when written. A batch of plain appends to spaces that exist is sealed before
//! it is applied (see below), and there the last event of each space is signed when it
//! is sealed, so `finish` has nothing left to re-seal.
//!
//! Failures: commands run directly in the batch's transaction. Checks that can refuse a
//! command without writing (a value the space's merge refuses, a policy mismatch) run
//! first and just answer that command. Any other failure of a command in a batch of
//! several (a rejected ingest, an invalid clock, an LMDB error) aborts the transaction,
//! reloads the cache from disk and runs the batch again with each command in its own
//! transaction and commit (`run_each`; LMDB's nested transactions are not available
//! with `WRITE_MAP`), so a failing command never poisons the rest. Once a batch's data
//! is durable its applied events are broadcast and its commands answered; if its commit
//! fails, every command of the batch gets the error and the cache is reloaded from disk.
//! No answer is sent before its data is durable.
//!
//! Durability and growth: in full mode each batch's record is appended to the journal
//! (`journal.rs`) before the commit, with the journal position in the commit, and the
//! batch is handed to the journal's flush thread, which `fdatasync`s and then broadcasts
//! and answers; the writer goes on with the next batch meanwhile, so under load each
//! flush covers the commits made during the one before. When the record is known
//! before the batch runs (a batch of ingests: events as received; a batch of appends to
//! existing spaces: each event built and sealed from the cached chain head first), it
//! is written, and its flush started, before the batch is applied, so the `fdatasync`
//! runs while the writer does the LMDB work; the answers still wait for the commit.
//! Should such a batch not commit, its record is rewound. In relaxed mode a flush thread
//! (`flush.rs`) calls `force_sync` at most every `flush_every` while there are commits
//! it has not flushed. Either way the writer never waits for the disk itself.
//! A batch that hits `MapFull` is aborted, the map doubled (`map.rs`) and the batch run
//! again; the map is also grown after a commit that leaves it more than 80% used.
//!
//! Policies: `Store::configure_space` registers a space's [`Policy`] here (the writer
//! is the only code that applies events, so it is the one that must fold them into a
//! merge space's state). Registrations live outside the per-space cache, because that
//! cache is rebuilt from disk after a failed commit while the policies are not on disk
//! (only their identities are); a failed command or batch puts them back by hand.
//!
//! Shutdown: when the last `Store` handle drops, the channel closes, the thread
//! finishes its batch and exits; `Store`'s drop joins it.

use std::borrow::Borrow;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use heed::{Env, PutFlags, RwTxn, WithoutTls};
use tokio::sync::{broadcast, mpsc, oneshot};
use weft_crdt::limits::MAX_UNSIGNED_RUN;
use weft_crdt::sync;
use weft_crdt::{
    Event, EventError, EventHash, EventId, Hlc, HlcClock, Merge, NodeId, Policy, Readiness,
    SigningKey, SpaceName, UnsignedEvent, VersionVector,
};

use crate::flush::Flusher;
use crate::journal::{self, Flush, Job, Journal, Op, Scan};
use crate::map::{self, MapControl};
use crate::prefault::Prefaulter;
use crate::tables::{
    decode_event, encode_cbor, event_key, hash_of_encoding, id_key, origin_key, record_key,
    space_meta_key, IdEntry, Record, SpaceId, StoredPolicy, Tables, META_HLC, META_JOURNAL,
    SPACE_CONFLICTS, SPACE_POLICY, SPACE_REFOLD,
};
use crate::{Applied, Durability, IngestOutcome, StoreError, Write};

/// Longest the thread waits for the writers of the previous batch to come back before
/// it commits without them. Far below one commit's cost (an fsync of ~0.3–10 ms here),
/// which is what a writer that misses the batch pays.
pub(crate) const LINGER: Duration = Duration::from_micros(300);

/// Lingering only follows a batch answered at most this long ago: after a quiet spell
/// the first command is committed at once.
const LINGER_AFTER: Duration = Duration::from_millis(2);

/// A request to the writer, with the channel its answer goes back on.
pub(crate) enum Command {
    Append {
        space: SpaceName,
        write: Write,
        reply: oneshot::Sender<Result<Applied, StoreError>>,
    },
    Ingest {
        space: SpaceName,
        /// Already validated and authenticated.
        events: Vec<Event>,
        /// The encoding and hash of each event, in the same order.
        prepared: Vec<Prepared>,
        reply: oneshot::Sender<Result<IngestOutcome, StoreError>>,
    },
    Configure {
        space: SpaceName,
        policy: Policy,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// An atomic group of local writes (already checked field by field).
    Transaction {
        space: SpaceName,
        writes: Vec<Write>,
        reply: oneshot::Sender<Result<Vec<Applied>, StoreError>>,
    },
}

impl Command {
    /// Frees what answering does not need (a local command's writes), on the calling
    /// thread. The writer calls this before handing a batch to the flush
    /// thread: glibc's allocator locks a block's arena when another thread frees it,
    /// and the writer allocates from its arena all the time, so frees made on the
    /// flush thread showed as lock hand-offs (`__lll_lock_wake_private`) in both.
    fn shed(&mut self) {
        match self {
            Command::Append { write, .. } => {
                drop(std::mem::take(&mut write.key));
                drop(std::mem::take(&mut write.kind));
                drop(std::mem::take(&mut write.payload));
                drop(std::mem::take(&mut write.meta));
            }
            Command::Transaction { writes, .. } => drop(std::mem::take(writes)),
            // A page of remote events was allocated by the verifying threads, not the
            // writer, and freeing a thousand encodings here cost the writer (the
            // bottleneck of a catch-up) more than it saved.
            Command::Ingest { .. } | Command::Configure { .. } => {}
        }
    }

    fn space(&self) -> &SpaceName {
        match self {
            Command::Append { space, .. }
            | Command::Ingest { space, .. }
            | Command::Configure { space, .. }
            | Command::Transaction { space, .. } => space,
        }
    }
}

/// A remote event's canonical encoding and hash, computed off the writer thread
/// (alongside verification), so the writer neither encodes nor hashes it.
pub(crate) struct Prepared {
    pub bytes: Vec<u8>,
    pub hash: EventHash,
}

impl Prepared {
    pub fn of(event: &Event) -> Prepared {
        let bytes = event.encode();
        let hash = hash_of_encoding(&bytes);
        Prepared { bytes, hash }
    }
}

/// An ingested event with its position in the command, for the sync core's ordering.
struct Item<'a>(&'a Event, usize);

impl Borrow<Event> for Item<'_> {
    fn borrow(&self) -> &Event {
        self.0
    }
}

/// The writer's cached view of one space; always equal to what its committed tables
/// say plus what the current batch wrote (the `*_dirty` parts are written at its end).
#[derive(Clone, Debug)]
struct SpaceState {
    sid: SpaceId,
    vv: VersionVector,
    last_lsn: u64,
    /// Keys whose frontier holds more than one event (`space_meta/conflicts`).
    conflicts: u64,
    /// `space_meta/policy`.
    stored: Option<StoredPolicy>,
    /// The hash of each origin's newest applied event (the one at `vv[origin]`): what
    /// its next event's `prev` must be.
    heads: BTreeMap<NodeId, EventHash>,
    /// Events of the space in the pending set.
    pending: u64,
    /// Origins whose `vv` entry this batch changed.
    vv_dirty: BTreeSet<NodeId>,
    /// This batch changed `conflicts`.
    conflicts_dirty: bool,
    /// The lsn of this node's newest event in the space when this batch wrote it
    /// unsigned: it is signed before the commit.
    unsigned_head: Option<u64>,
    /// This node's consecutive unsigned events at the head of its chain.
    unsigned_run: usize,
}

/// How one try at a batch ended.
enum Attempt {
    /// LMDB ran out of map; nothing was committed.
    MapFull,
    /// Opening, finishing or committing the transaction failed; nothing was committed.
    Failed(StoreError),
    /// A command failed after writing, with others in the batch: nothing was committed,
    /// and the batch must run again with each command isolated.
    Isolate,
    /// Every command failed (or the only one did), so the transaction was aborted.
    /// `touched`: a command failed after changing the cache, which must be reloaded.
    NothingCommitted {
        results: Vec<Result<Done, StoreError>>,
        touched: bool,
    },
    /// Committed (and durable in full mode); one result per command, in order.
    Committed(Vec<Result<Done, StoreError>>),
}

/// What an ingest command did, before the commit: [`IngestOutcome`] once its events
/// are shared with subscribers.
#[derive(Default)]
pub(crate) struct Ingested {
    applied: Vec<Applied>,
    duplicates: usize,
    parked: usize,
}

/// The signatures `finish` added, by (origin, lsn, space) of their events.
type Signatures = HashMap<(NodeId, u64, SpaceName), [u8; 64]>;

/// A local event built and sealed, not yet stored.
struct Sealed {
    event: Event,
    bytes: Vec<u8>,
    hash: EventHash,
    signed: bool,
}

/// A batch's record, written ahead of applying the batch ([`Writer::journal_ahead`]).
struct Ahead {
    before: journal::Position,
    after: journal::Position,
    /// A batch of appends: each command's event, as the record holds it.
    sealed: Vec<Sealed>,
}

/// What a command produced, held until the batch commits. Local events keep the
/// encoding they were stored with, for the journal (empty once `finish` signed one:
/// its stored encoding changed).
enum Done {
    Append(Box<Applied>, Vec<u8>),
    Ingest(Ingested),
    Configure,
    Transaction(Vec<Applied>, Vec<Vec<u8>>),
}

impl Done {
    /// Frees the stored encodings, which only the journal needed (see
    /// [`Command::shed`]).
    fn shed(&mut self) {
        match self {
            Done::Append(_, bytes) => drop(std::mem::take(bytes)),
            Done::Transaction(_, bytes) => drop(std::mem::take(bytes)),
            Done::Ingest(_) | Done::Configure => {}
        }
    }

    /// Puts the signatures `finish` added into the events they belong to.
    fn add_signatures(&mut self, signed: &Signatures) {
        let (applied, mut encoded): (&mut [Applied], Option<&mut [Vec<u8>]>) = match self {
            Done::Append(a, bytes) => (
                std::slice::from_mut(a.as_mut()),
                Some(std::slice::from_mut(bytes)),
            ),
            Done::Ingest(o) => (&mut o.applied, None),
            Done::Transaction(all, bytes) => (all, Some(bytes)),
            Done::Configure => (&mut [], None),
        };
        for (i, a) in applied.iter_mut().enumerate() {
            if let Some(sig) = signed.get(&(a.event.origin, a.lsn, a.space.clone())) {
                a.event.sig = Some(*sig);
                if let Some(bytes) = encoded.as_mut().and_then(|e| e.get_mut(i)) {
                    bytes.clear();
                }
            }
        }
    }
}

pub(crate) struct Writer {
    env: Env<WithoutTls>,
    tables: Tables,
    signing_key: SigningKey,
    node_id: NodeId,
    hlc: HlcClock,
    spaces: HashMap<SpaceName, SpaceState>,
    /// Policies registered by `configure_space` in this process. A space absent here
    /// is applied without merge state (resolver semantics).
    policies: HashMap<SpaceName, Policy>,
    /// Highest space id in use: its events are the last keys of the `events` table,
    /// so they can be written with `PutFlags::APPEND`.
    max_sid: SpaceId,
    max_batch: usize,
    /// Commands in the previous batch and when it was answered, for lingering.
    last_batch: usize,
    last_answered: Instant,
    applied_tx: broadcast::Sender<Arc<Applied>>,
    map: Arc<MapControl>,
    /// Relaxed mode: the thread that flushes commits to disk.
    flusher: Option<Flusher>,
    /// The thread that faults the map in ahead of this one (`prefault.rs`).
    prefault: Option<Prefaulter>,
    /// Full mode: the journal each batch is appended to before its commit, and the
    /// thread that flushes it and then answers (`journal.rs`).
    journal: Option<JournalLink>,
    /// Rebuilding from the journal: merges are not applied, because their functions
    /// are only registered after the store opens; the spaces are folded when they are
    /// configured again (`SPACE_REFOLD`).
    replaying: bool,
    /// A wall-clock reading (ms since 1970) for the far-future check of remote HLCs,
    /// taken at the start of each batch and again only when an event fails the check
    /// against it: the check ran once per ingested event, and reading the clock was 3%
    /// of the writer's time in a catch-up. The real clock is at least this reading, so
    /// an event within the lead of it is within the lead of now.
    wall_seen_ms: u64,
}

struct JournalLink {
    journal: Journal,
    flush: Flush,
    /// The highest journal mark a reader's snapshot may hold; stored before each commit.
    written: Arc<AtomicU64>,
}

impl JournalLink {
    /// Forgets the record after `before`, whose batch did not commit, and flushes that
    /// before the batch's callers hear of the failure. The record may already be on disk
    /// (a record written ahead has its flush started at once, and any flush covers every
    /// record written by then): left there, a power cut followed by a rebuild would
    /// replay writes whose callers were told they failed. If this fails, the store
    /// refuses writes until it is reopened, as after a failed flush.
    fn rewind(&mut self, before: journal::Position) {
        let rewound = self
            .journal
            .rewind(before)
            .and_then(|()| self.journal.sync());
        if let Err(e) = rewound {
            self.flush.failed.store(true, Ordering::Release);
            tracing::error!(
                "store writer: rewinding the journal failed; the store refuses writes until it is reopened: {e}"
            );
        }
    }

    /// The buffer for the next record's payload; refused once a flush has failed.
    fn record(&mut self) -> Result<&mut Vec<u8>, StoreError> {
        if self.flush.failed.load(Ordering::Acquire) {
            return Err(StoreError::Io(std::io::Error::other(
                "an earlier journal flush failed; reopen the store",
            )));
        }
        Ok(self.journal.payload())
    }

    /// Appends the record built in [`JournalLink::record`]; see [`Journal::append`].
    /// Before any commit: a reader that sees the batch also sees a mark covering it.
    fn append(&mut self) -> Result<(journal::Position, journal::Position), StoreError> {
        let positions = self.journal.append()?;
        self.written.store(self.journal.mark(), Ordering::Release);
        Ok(positions)
    }
}

/// How far ahead of our wall clock a remote HLC reading may be and still be followed.
/// One peer with a wrong (or hostile) clock must not drag every later local write's
/// last-writer-wins timestamp into the future; an hour is far beyond honest clock
/// skew between machines running NTP.
const MAX_HLC_LEAD_MS: u64 = 60 * 60 * 1000;

fn wall_ms() -> u64 {
    // A clock before 1970 reads as 0; the HLC still moves forward.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Wakes the writer thread parked in [`recv_until`].
struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

enum Received {
    Command(Command),
    Closed,
    TimedOut,
}

/// A blocking receive with an optional deadline, at microsecond resolution (tokio's
/// timers tick in milliseconds, too coarse for [`LINGER`]). The channel's waker unparks
/// this thread; spurious wake-ups just poll again.
fn recv_until(
    commands: &mut mpsc::Receiver<Command>,
    waker: &Waker,
    deadline: Option<Instant>,
) -> Received {
    let mut cx = Context::from_waker(waker);
    loop {
        match commands.poll_recv(&mut cx) {
            Poll::Ready(Some(c)) => return Received::Command(c),
            Poll::Ready(None) => return Received::Closed,
            Poll::Pending => match deadline {
                None => std::thread::park(),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Received::TimedOut;
                    }
                    std::thread::park_timeout(d - now);
                }
            },
        }
    }
}

impl Writer {
    /// Loads the cache from the committed state.
    pub fn new(
        env: Env<WithoutTls>,
        tables: Tables,
        signing_key: SigningKey,
        hlc_last: Hlc,
        max_batch: usize,
        applied_tx: broadcast::Sender<Arc<Applied>>,
    ) -> Result<Writer, StoreError> {
        let node_id = NodeId::of(&signing_key);
        let env_for_map = env.clone();
        let mut w = Writer {
            env,
            tables,
            signing_key,
            node_id,
            hlc: HlcClock::starting_after(hlc_last),
            spaces: HashMap::new(),
            policies: HashMap::new(),
            max_sid: 0,
            max_batch: max_batch.max(1),
            last_batch: 0,
            last_answered: Instant::now(),
            applied_tx,
            map: Arc::new(MapControl::new(env_for_map, usize::MAX)),
            flusher: None,
            prefault: None,
            journal: None,
            replaying: false,
            wall_seen_ms: wall_ms(),
        };
        w.reload()?;
        Ok(w)
    }

    fn reload(&mut self) -> Result<(), StoreError> {
        let txn = self.env.read_txn()?;
        let t = &self.tables;
        let mut spaces = HashMap::new();
        let mut max_sid = 0;
        for (name, sid) in t.all_spaces(&txn)? {
            let name = SpaceName::new(name)
                .map_err(|e| StoreError::Corrupt(format!("stored space name: {e}")))?;
            let vv = t.version_vector(&txn, sid)?;
            let mut heads = BTreeMap::new();
            for (origin, seq) in vv.iter() {
                let entry = t.id_entry(&txn, sid, origin, seq)?.ok_or_else(|| {
                    StoreError::Corrupt(format!("applied event {origin}:{seq} missing from by_id"))
                })?;
                heads.insert(*origin, entry.hash);
            }
            let state = SpaceState {
                sid,
                vv,
                last_lsn: t.last_lsn(&txn, sid)?,
                conflicts: t.conflicts(&txn, sid)?,
                stored: t.stored_policy(&txn, sid)?,
                heads,
                pending: t.pending_count(&txn, sid)?,
                vv_dirty: BTreeSet::new(),
                conflicts_dirty: false,
                // Every commit signs this node's newest event in each space.
                unsigned_head: None,
                unsigned_run: 0,
            };
            max_sid = max_sid.max(sid);
            spaces.insert(name, state);
        }
        self.spaces = spaces;
        self.max_sid = max_sid;
        Ok(())
    }

    /// Shares the store's map control, so that resizes exclude the store's readers.
    pub fn with_map(mut self, map: Arc<MapControl>) -> Self {
        self.map = map;
        self
    }

    /// Starts the thread that faults in the map's pages before this one writes them.
    /// Call after [`Writer::with_map`]: it follows that map's resizes.
    pub fn with_prefault(mut self) -> Result<Self, StoreError> {
        self.prefault = Some(Prefaulter::start(self.map.clone(), self.tables)?);
        Ok(self)
    }

    /// Sets the flush policy; must match the flags the environment was opened with.
    /// Relaxed mode starts the flush thread. Call after [`Writer::with_map`]: the
    /// flushes take that map's lock.
    pub fn with_durability(mut self, durability: Durability) -> Result<Self, StoreError> {
        self.flusher = match durability {
            Durability::Full => None,
            Durability::Relaxed { flush_every } => {
                Some(Flusher::start(self.map.clone(), flush_every)?)
            }
        };
        Ok(self)
    }

    /// Full mode: appends every batch to `journal` and answers it once `flush` has
    /// flushed it.
    pub fn with_journal(mut self, journal: Journal, flush: Flush, written: Arc<AtomicU64>) -> Self {
        self.journal = Some(JournalLink {
            journal,
            flush,
            written,
        });
        self
    }

    /// Runs until every sender is dropped.
    pub fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        loop {
            let first = match recv_until(&mut commands, &waker, None) {
                Received::Command(c) => c,
                Received::Closed => break,
                // No deadline was given.
                Received::TimedOut => continue,
            };
            let mut batch = vec![first];
            let expected = self.last_batch.min(self.max_batch);
            // With a journal, the previous batch's writers are still waiting for its
            // flush, and the next batch forms while it runs: nobody to linger for.
            let linger = (self.journal.is_none() && self.last_answered.elapsed() <= LINGER_AFTER)
                .then(|| Instant::now() + LINGER);
            while batch.len() < self.max_batch {
                match commands.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) if batch.len() < expected && linger.is_some() => {
                        match recv_until(&mut commands, &waker, linger) {
                            Received::Command(c) => batch.push(c),
                            // A closed channel is seen again by the next receive.
                            Received::Closed | Received::TimedOut => break,
                        }
                    }
                    Err(_) => break,
                }
            }
            self.last_batch = batch.len();
            self.run_batch(batch);
            self.last_answered = Instant::now();
        }
        // A clean shutdown leaves nothing unflushed, in either mode: the flush thread
        // makes its last flush and is joined.
        drop(self.flusher.take());
        drop(self.prefault.take());
        if let Some(link) = self.journal.take() {
            let dir = link
                .journal
                .path()
                .parent()
                .map(std::path::Path::to_path_buf);
            // Answers what is queued after its last flush.
            drop(link.flush);
            let closed =
                self.env
                    .force_sync()
                    .map_err(StoreError::from)
                    .and_then(|()| match &dir {
                        Some(d) => journal::write_state(d, &journal::LastRun::Clean),
                        None => Ok(()),
                    });
            if let Err(e) = closed {
                // The next open treats the run as a crash: it checks or rebuilds.
                tracing::error!("store writer: closing cleanly: {e}");
            }
        }
        tracing::debug!("store writer: all handles dropped, exiting");
    }

    /// Runs one batch in one write transaction and answers every command in it.
    ///
    /// If LMDB runs out of map (in any command or in the commit), the whole
    /// transaction is aborted, the cache put back, the map doubled and the batch run
    /// again from the start: nothing of the failed attempt was committed or answered,
    /// so to the callers it is as if the map had always been large enough.
    pub(crate) fn run_batch(&mut self, mut batch: Vec<Command>) {
        self.wall_seen_ms = wall_ms();
        // Policies are not reloaded from disk, so an aborted attempt restores them from
        // here. Only batches that configure anything pay for the copy.
        let policies_before = batch
            .iter()
            .any(|c| matches!(c, Command::Configure { .. }))
            .then(|| self.policies.clone());
        loop {
            let attempt = self.attempt(&mut batch);
            let clean = matches!(
                attempt,
                Attempt::Committed(_) | Attempt::NothingCommitted { touched: false, .. }
            );
            if !clean {
                // Whatever the attempt cached is not on disk.
                if let Err(e) = self.reload() {
                    tracing::error!("store writer: reloading state after an aborted batch: {e}");
                }
                if let Some(p) = &policies_before {
                    self.policies = p.clone();
                }
            }
            match attempt {
                Attempt::MapFull => {
                    self.map.retries.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = self.map.grow() {
                        tracing::error!("store writer: cannot grow the map: {e}");
                        for cmd in batch {
                            reply_err(cmd, duplicate(&e));
                        }
                        return;
                    }
                }
                Attempt::Isolate => {
                    self.run_each(batch);
                    return;
                }
                Attempt::Failed(e) => {
                    for cmd in batch {
                        reply_err(cmd, duplicate(&e));
                    }
                    return;
                }
                Attempt::NothingCommitted { results, .. } => {
                    for (cmd, r) in batch.into_iter().zip(results) {
                        if let Err(e) = r {
                            reply_err(cmd, e);
                        }
                    }
                    return;
                }
                Attempt::Committed(results) => {
                    self.committed();
                    self.deliver(batch, results);
                    return;
                }
            }
        }
    }

    /// One try at a batch in one transaction; see [`Writer::run_batch`].
    ///
    /// Full mode: when the batch's record can be written before the batch is applied
    /// (see [`Writer::journal_ahead`]), it is, and the flush thread starts flushing it;
    /// the flush then overlaps the work of applying the batch. Should the attempt not
    /// commit, the record is rewound (a flushed record past the position LMDB holds is
    /// as if never written: the next record overwrites it).
    fn attempt(&mut self, batch: &mut [Command]) -> Attempt {
        let ahead = match self.journal_ahead(batch) {
            Ok(ahead) => ahead,
            Err(e) => return Attempt::Failed(e),
        };
        let before = ahead.as_ref().map(|a| a.before);
        let attempt = self.attempt_with(batch, ahead);
        if let (Some(before), false) = (before, matches!(attempt, Attempt::Committed(_))) {
            if let Some(link) = &mut self.journal {
                link.rewind(before);
            }
        }
        attempt
    }

    /// Writes a batch's record ahead of applying it, and has the flush thread start
    /// flushing it, when the record is known before the batch runs:
    /// - a batch of ingests: remote events are journaled as received;
    /// - a batch of appends to spaces that exist: each event is built and sealed here
    ///   (the last of each space signed, as `finish` would), from the cached version
    ///   vector and chain head; the record holds them as they will be stored.
    ///
    /// Every command must pass its precheck; otherwise (or if sealing an append
    /// fails) nothing is written, and the batch runs the ordinary way, which answers
    /// the failure. Returns the positions around the record and the sealed appends.
    fn journal_ahead(&mut self, batch: &[Command]) -> Result<Option<Ahead>, StoreError> {
        if self.journal.is_none() || !batch.iter().all(|c| self.precheck(c).is_ok()) {
            return Ok(None);
        }
        let sealed = if batch.iter().all(|c| matches!(c, Command::Ingest { .. })) {
            Vec::new()
        } else {
            match self.seal_appends(batch) {
                Some(sealed) => sealed,
                None => return Ok(None),
            }
        };
        let Some(link) = &mut self.journal else {
            return Ok(None);
        };
        let out = link.record()?;
        if sealed.is_empty() {
            for cmd in batch {
                if let Command::Ingest {
                    space, prepared, ..
                } = cmd
                {
                    journal::put_events(
                        out,
                        space.as_str(),
                        prepared.iter().map(|p| p.bytes.as_slice()),
                    );
                }
            }
        } else {
            // One operation per command, as `journal_batch` writes them.
            for (cmd, s) in batch.iter().zip(&sealed) {
                journal::put_events(out, cmd.space().as_str(), [s.bytes.as_slice()].into_iter());
            }
        }
        let (before, after) = link.append()?;
        link.flush.submit(Job {
            mark: link.journal.mark(),
            then: Box::new(|_| {}),
        });
        Ok(Some(Ahead {
            before,
            after,
            sealed,
        }))
    }

    /// Seals the events of a batch of nothing but appends to spaces that exist, in
    /// order, each space's chain continuing from its cached head; `None` if the batch
    /// is not such a batch or any append cannot be sealed (the ordinary run answers
    /// that). Changes nothing but the HLC.
    fn seal_appends(&mut self, batch: &[Command]) -> Option<Vec<Sealed>> {
        /// A space's chain as the batch extends it; `clock` is the space's version
        /// vector before the batch (`seal_local` sets this node's entry).
        struct Chain {
            seq: u64,
            prev: Option<EventHash>,
            clock: weft_crdt::VectorClock,
            unsigned_run: usize,
        }
        let me = self.node_id;
        // The index of each space's last append: its event is signed.
        let mut last = HashMap::new();
        for (i, cmd) in batch.iter().enumerate() {
            match cmd {
                Command::Append { space, .. } if self.spaces.contains_key(space) => {
                    last.insert(space, i);
                }
                _ => return None,
            }
        }
        let mut chains: HashMap<&SpaceName, Chain> = HashMap::new();
        let mut sealed = Vec::with_capacity(batch.len());
        for (i, cmd) in batch.iter().enumerate() {
            let Command::Append { space, write, .. } = cmd else {
                return None;
            };
            let chain = match chains.entry(space) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(v) => {
                    let state = self.spaces.get(space)?;
                    let seq = state.vv.get(&me);
                    let prev = match seq {
                        0 => None,
                        _ => Some(*state.heads.get(&me)?),
                    };
                    v.insert(Chain {
                        seq,
                        prev,
                        clock: state.vv.as_clock().clone(),
                        unsigned_run: state.unsigned_run,
                    })
                }
            };
            let seq = chain.seq + 1;
            let sign = last.get(space) == Some(&i) || chain.unsigned_run + 1 >= MAX_UNSIGNED_RUN;
            let s = self
                .seal_local(
                    space,
                    write,
                    None,
                    seq,
                    chain.prev,
                    chain.clock.clone(),
                    sign,
                )
                .ok()?;
            chain.seq = seq;
            chain.prev = Some(s.hash);
            chain.unsigned_run = if sign { 0 } else { chain.unsigned_run + 1 };
            sealed.push(s);
        }
        Some(sealed)
    }

    fn attempt_with(&mut self, batch: &mut [Command], ahead: Option<Ahead>) -> Attempt {
        let (early, sealed) = match ahead {
            Some(a) => (Some(a.after), a.sealed),
            None => (None, Vec::new()),
        };
        let mut sealed = sealed.into_iter();
        let env = self.env.clone();
        let mut txn = match env.write_txn() {
            Ok(t) => t,
            Err(e) => return Attempt::Failed(e.into()),
        };
        let mut results = Vec::with_capacity(batch.len());
        let alone = batch.len() == 1;
        for cmd in batch.iter_mut() {
            // A sealed append passed its precheck when it was sealed, before its seq was
            // taken; it is not asked again (an application merge whose `check` changed
            // its answer would otherwise leave a hole in the sealed chain).
            let checked = match (sealed.next(), &*cmd) {
                (Some(s), Command::Append { space, .. }) => Ok(Some((space.clone(), s))),
                _ => self.precheck(cmd).map(|()| None),
            };
            let result = match checked {
                // Refused before anything was written or cached.
                Err(e) => Err(e),
                Ok(checked) => match match checked {
                    Some((space, s)) => self
                        .store_local(&mut txn, &space, s)
                        .map(|(a, bytes)| Done::Append(Box::new(a), bytes)),
                    None => self.run_command(&mut txn, cmd),
                } {
                    Ok(done) => Ok(done),
                    Err(e) if map::is_map_full(&e) => {
                        txn.abort();
                        return Attempt::MapFull;
                    }
                    Err(e) if alone => {
                        txn.abort();
                        return Attempt::NothingCommitted {
                            results: vec![Err(e)],
                            touched: true,
                        };
                    }
                    Err(_) => {
                        txn.abort();
                        return Attempt::Isolate;
                    }
                },
            };
            results.push(result);
        }
        if results.iter().all(Result::is_err) {
            // Refused by prechecks: the cache is as it was.
            txn.abort();
            return Attempt::NothingCommitted {
                results,
                touched: false,
            };
        }
        match self.commit_batch(txn, batch, &mut results, early) {
            Ok(()) => Attempt::Committed(results),
            Err(e) if map::is_map_full(&e) => Attempt::MapFull,
            Err(e) => {
                tracing::error!("store writer: committing a batch failed: {e}");
                Attempt::Failed(e)
            }
        }
    }

    /// The end of a transaction holding `batch`'s `results`: [`Writer::finish`], the
    /// signatures it added put into the results, the journal record, the commit. On
    /// error nothing is committed and the journal is rewound.
    fn commit_batch(
        &mut self,
        mut txn: RwTxn,
        batch: &[Command],
        results: &mut [Result<Done, StoreError>],
        journaled: Option<journal::Position>,
    ) -> Result<(), StoreError> {
        let signed = match self.finish(&mut txn) {
            Ok(signed) => signed,
            Err(e) => {
                txn.abort();
                return Err(e);
            }
        };
        if !signed.is_empty() && journaled.is_some() {
            // The record written ahead holds the events as they were before `finish`
            // signed one; committing would leave the journal disagreeing with LMDB.
            txn.abort();
            return Err(StoreError::Corrupt(
                "a batch journaled ahead had an unsigned chain head to sign".into(),
            ));
        }
        if !signed.is_empty() {
            for done in results.iter_mut().flatten() {
                done.add_signatures(&signed);
            }
        }
        let journaled = match journaled {
            // Written ahead: only its position goes into the commit (the caller rewinds
            // it should the commit fail).
            Some(after) => self
                .tables
                .meta
                .put(&mut txn, META_JOURNAL, &after.to_bytes())
                .map(|()| None)
                .map_err(StoreError::from),
            None => self.journal_batch(&mut txn, batch, results),
        };
        let rewind = match journaled {
            Ok(r) => r,
            Err(e) => {
                txn.abort();
                return Err(e);
            }
        };
        let committed = txn.commit();
        if committed.is_err() {
            if let (Some(link), Some(before)) = (&mut self.journal, rewind) {
                link.rewind(before);
            }
        }
        committed.map_err(Into::into)
    }

    /// Runs a batch that failed as one transaction again with each command in its own
    /// transaction and commit, so that a failing command takes no other down with it.
    /// (LMDB's nested transactions would keep one commit, but they are not available
    /// with `WRITE_MAP`; this path is only taken after a failure.)
    fn run_each(&mut self, mut batch: Vec<Command>) {
        let mut results = Vec::with_capacity(batch.len());
        for cmd in batch.iter_mut() {
            let r = self.run_alone(cmd);
            if r.is_ok() {
                self.committed();
            }
            results.push(r);
        }
        self.deliver(batch, results);
    }

    /// One command in its own transaction, retried after growing the map. On failure
    /// the cache is put back as it was (nothing of the command is on disk).
    fn run_alone(&mut self, cmd: &mut Command) -> Result<Done, StoreError> {
        self.precheck(cmd)?;
        let space = cmd.space().clone();
        let saved_policy = self.policies.get(&space).cloned();
        loop {
            let result = self.try_alone(cmd);
            let Err(e) = result else { return result };
            if let Err(r) = self.reload() {
                tracing::error!("store writer: reloading state after a failed command: {r}");
            }
            match saved_policy.clone() {
                Some(p) => self.policies.insert(space.clone(), p),
                None => self.policies.remove(&space),
            };
            if !map::is_map_full(&e) {
                return Err(e);
            }
            self.map.retries.fetch_add(1, Ordering::Relaxed);
            self.map.grow()?;
        }
    }

    fn try_alone(&mut self, cmd: &mut Command) -> Result<Done, StoreError> {
        let env = self.env.clone();
        let mut txn = env.write_txn()?;
        let done = match self.run_command(&mut txn, cmd) {
            Ok(done) => done,
            Err(e) => {
                txn.abort();
                return Err(e);
            }
        };
        let mut results = [Ok(done)];
        self.commit_batch(txn, std::slice::from_ref(cmd), &mut results, None)?;
        let [result] = results;
        result
    }

    /// After every commit: the flush thread (relaxed mode) is told, the map grown ahead
    /// of need, and the prefault thread told.
    fn committed(&self) {
        if let Some(f) = &self.flusher {
            f.committed();
        }
        if let Err(e) = self.map.grow_if_nearly_full() {
            // Not fatal: the next batch that needs room grows or fails then.
            tracing::warn!("store writer: growing the map ahead of time: {e}");
        }
        // After growing: a new mapping has nothing populated, and the next commit
        // may be a long way off.
        if let Some(p) = &self.prefault {
            p.committed();
        }
    }

    /// Answers a batch whose commits are done: at once in relaxed mode, after the
    /// journal flush in full mode.
    fn deliver(&self, mut batch: Vec<Command>, mut results: Vec<Result<Done, StoreError>>) {
        match &self.journal {
            Some(link) => {
                batch.iter_mut().for_each(Command::shed);
                results.iter_mut().flatten().for_each(Done::shed);
                let feed = self.applied_tx.clone();
                link.flush.submit(Job {
                    mark: link.journal.mark(),
                    then: Box::new(move |failed| match failed {
                        None => answer(&feed, batch, results),
                        Some(e) => {
                            for cmd in batch {
                                reply_err(cmd, duplicate(&e));
                            }
                        }
                    }),
                });
            }
            None => answer(&self.applied_tx, batch, results),
        }
    }

    /// The end of every batch, in its transaction: signs this node's newest event in
    /// each space if it was written unsigned, and writes what the cache held back (the
    /// version vector entries and conflict counts the batch changed, and the HLC).
    /// Returns the signatures added, by (origin, lsn, space).
    fn finish(&mut self, txn: &mut RwTxn) -> Result<Signatures, StoreError> {
        let t = self.tables;
        let mut signed = HashMap::new();
        for (space, state) in self.spaces.iter_mut() {
            let sid = state.sid;
            if let Some(lsn) = state.unsigned_head.take() {
                let key = event_key(sid, lsn);
                let bytes = t.events.get(txn, &key)?.ok_or_else(|| {
                    StoreError::Corrupt(format!("own event at lsn {lsn} missing"))
                })?;
                let event = decode_event(bytes, format_args!("event at lsn {lsn}"))?
                    .into_unsigned()
                    .sign(space, &self.signing_key);
                let sig = event
                    .sig
                    .ok_or_else(|| StoreError::Corrupt("signing produced no signature".into()))?;
                let bytes = event.encode();
                let hash = hash_of_encoding(&bytes);
                t.events.put(txn, &key, &bytes)?;
                t.by_id.put(
                    txn,
                    &id_key(sid, &event.origin, event.seq),
                    &IdEntry { lsn, hash }.to_bytes(),
                )?;
                state.heads.insert(event.origin, hash);
                state.unsigned_run = 0;
                signed.insert((event.origin, lsn, space.clone()), sig);
            }
            for origin in std::mem::take(&mut state.vv_dirty) {
                t.vv.put(
                    txn,
                    &origin_key(sid, &origin),
                    &state.vv.get(&origin).to_be_bytes(),
                )?;
            }
            if std::mem::take(&mut state.conflicts_dirty) {
                t.space_meta.put(
                    txn,
                    &space_meta_key(sid, SPACE_CONFLICTS),
                    &state.conflicts.to_be_bytes(),
                )?;
            }
        }
        t.meta
            .put(txn, META_HLC, &self.hlc.last().0.to_be_bytes())?;
        Ok(signed)
    }

    /// Full mode: appends what the batch's successful commands did to the journal and
    /// records the position in the transaction; returns the position to rewind to
    /// should the commit fail. Remote batches are journaled as received (replay runs
    /// them through `ingest` again), local events as committed, signatures included.
    fn journal_batch(
        &mut self,
        txn: &mut RwTxn,
        batch: &[Command],
        results: &[Result<Done, StoreError>],
    ) -> Result<Option<journal::Position>, StoreError> {
        let Some(link) = &mut self.journal else {
            return Ok(None);
        };
        let out = link.record()?;
        for (cmd, r) in batch.iter().zip(results) {
            let Ok(done) = r else { continue };
            let space = cmd.space().as_str();
            match (cmd, done) {
                (Command::Append { .. }, Done::Append(a, bytes)) => {
                    journal::put_encoded_events(out, space, 1, |_, o| local(&a.event, bytes, o))
                }
                (Command::Transaction { .. }, Done::Transaction(all, bytes)) => {
                    journal::put_encoded_events(out, space, all.len(), |i, o| {
                        local(&all[i].event, &bytes[i], o)
                    })
                }
                (Command::Ingest { prepared, .. }, Done::Ingest(_)) => {
                    journal::put_events(out, space, prepared.iter().map(|p| p.bytes.as_slice()))
                }
                (Command::Configure { policy, .. }, Done::Configure) => {
                    let stored = StoredPolicy::of(policy);
                    journal::put_configure(out, space, &encode_cbor(&stored, 32));
                }
                _ => {
                    return Err(StoreError::Corrupt(
                        "writer produced the wrong kind of answer".into(),
                    ))
                }
            }
        }
        let (before, after) = link.append()?;
        if let Err(e) = self.tables.meta.put(txn, META_JOURNAL, &after.to_bytes()) {
            link.rewind(before);
            return Err(e.into());
        }
        Ok(Some(before))
    }

    /// Rebuilds the store from a journal (`journal.rs`): runs every record's
    /// operations in order, as the batches that wrote them ran, several records per
    /// commit. Called on an empty environment before [`Writer::run`].
    pub fn replay(&mut self, scan: &mut Scan) -> Result<u64, StoreError> {
        self.replaying = true;
        let result = self.replay_all(scan);
        self.replaying = false;
        result
    }

    fn replay_all(&mut self, scan: &mut Scan) -> Result<u64, StoreError> {
        /// Events per commit: enough to amortize the commit, few enough to bound the
        /// memory of the records held for a retry.
        const CHUNK_EVENTS: usize = 20_000;
        let mut records = 0;
        loop {
            let mut chunk = Vec::new();
            let mut events = 0;
            while events < CHUNK_EVENTS {
                let Some(payload) = scan.next() else { break };
                let payload = payload?;
                events += payload.len() / 64 + 1;
                chunk.push(payload);
            }
            if chunk.is_empty() {
                return Ok(records);
            }
            let pos = scan.at();
            loop {
                self.map.grow_if_nearly_full()?;
                match self.replay_chunk(&chunk, pos) {
                    Ok(()) => break,
                    Err(e) if map::is_map_full(&e) => {
                        self.reload()?;
                        self.map.grow()?;
                    }
                    Err(e) => {
                        return Err(StoreError::Corrupt(format!(
                            "rebuilding from the journal {}: record {}: {e}",
                            scan.path().display(),
                            pos.seq
                        )))
                    }
                }
            }
            records += chunk.len() as u64;
        }
    }

    fn replay_chunk(
        &mut self,
        chunk: &[Vec<u8>],
        pos: journal::Position,
    ) -> Result<(), StoreError> {
        let env = self.env.clone();
        let mut txn = env.write_txn()?;
        for payload in chunk {
            for op in journal::ops(&payload[..])? {
                match op {
                    Op::Events { space, events } => {
                        let space = space_name(space)?;
                        let prepared: Vec<Prepared> = events
                            .iter()
                            .map(|b| Prepared {
                                bytes: b.to_vec(),
                                hash: hash_of_encoding(b),
                            })
                            .collect();
                        let mut decoded = prepared
                            .iter()
                            .map(|p| decode_event(&p.bytes, "a journaled event"))
                            .collect::<Result<Vec<_>, _>>()?;
                        self.ingest(&mut txn, &space, &mut decoded, &prepared)?;
                    }
                    Op::Configure { space, policy } => {
                        let space = space_name(space)?;
                        let given: StoredPolicy = ciborium::from_reader(policy).map_err(|e| {
                            StoreError::Corrupt(format!("journaled policy of {space}: {e}"))
                        })?;
                        let sid = self.ensure_space(&mut txn, &space)?;
                        match &self.state(&space)?.stored {
                            Some(stored) if *stored == given => {}
                            Some(stored) => {
                                return Err(StoreError::PolicyMismatch {
                                    space,
                                    stored: stored.identity.clone(),
                                    given: given.identity,
                                })
                            }
                            None => {
                                let t = self.tables;
                                t.space_meta.put(
                                    &mut txn,
                                    &space_meta_key(sid, SPACE_POLICY),
                                    &encode_cbor(&given, 32),
                                )?;
                                if given.merge {
                                    t.space_meta.put(
                                        &mut txn,
                                        &space_meta_key(sid, SPACE_REFOLD),
                                        &[1],
                                    )?;
                                }
                                self.state_mut(&space)?.stored = Some(given);
                            }
                        }
                    }
                }
            }
        }
        self.finish(&mut txn)?;
        self.tables
            .meta
            .put(&mut txn, META_JOURNAL, &pos.to_bytes())?;
        txn.commit()?;
        Ok(())
    }
}

/// A local event's encoding as stored: kept from when it was written, or encoded
/// again when `finish` signed it since.
fn local(event: &Event, stored: &[u8], out: &mut Vec<u8>) {
    if stored.is_empty() {
        event.encode_into(out);
    } else {
        out.extend_from_slice(stored);
    }
}

fn space_name(s: &str) -> Result<SpaceName, StoreError> {
    SpaceName::new(s).map_err(|e| StoreError::Corrupt(format!("journaled space name: {e}")))
}

/// Hands each command's applied events to subscribers, then answers the command.
///
/// An ingested event is moved into one `Arc` that both the subscribers and the caller
/// hold: a catch-up applies hundreds of thousands of events, and a copy of each for the
/// commit feed cost more than a tenth of the writer's time.
fn answer(
    applied_tx: &broadcast::Sender<Arc<Applied>>,
    batch: Vec<Command>,
    results: Vec<Result<Done, StoreError>>,
) {
    let broadcast = |applied: Arc<Applied>| {
        // Lagging subscribers see `RecvError::Lagged`.
        let _ = applied_tx.send(applied);
    };
    let feed = applied_tx.receiver_count() > 0;
    for (cmd, r) in batch.into_iter().zip(results) {
        // A caller that stopped waiting (dropped its future) is not an error: the
        // data is committed either way. Subscribers see each command's events
        // before its caller has its answer.
        match (cmd, r) {
            (Command::Append { reply, .. }, Ok(Done::Append(a, _))) => {
                if feed {
                    broadcast(Arc::new((*a).clone()));
                }
                let _ = reply.send(Ok(*a));
            }
            (Command::Ingest { reply, .. }, Ok(Done::Ingest(o))) => {
                let applied: Vec<Arc<Applied>> = o.applied.into_iter().map(Arc::new).collect();
                if feed {
                    applied.iter().for_each(|a| broadcast(a.clone()));
                }
                let _ = reply.send(Ok(IngestOutcome {
                    applied,
                    duplicates: o.duplicates,
                    parked: o.parked,
                }));
            }
            (Command::Configure { reply, .. }, Ok(Done::Configure)) => {
                let _ = reply.send(Ok(()));
            }
            (Command::Transaction { reply, .. }, Ok(Done::Transaction(all, _))) => {
                if feed {
                    all.iter().for_each(|a| broadcast(Arc::new(a.clone())));
                }
                let _ = reply.send(Ok(all));
            }
            (cmd, Err(e)) => reply_err(cmd, e),
            (cmd, Ok(_)) => reply_err(
                cmd,
                StoreError::Corrupt("writer produced the wrong kind of answer".into()),
            ),
        }
    }
}

impl Writer {
    /// The checks that can refuse a command without writing or caching anything: a
    /// value the space's merge refuses, a merge space this process has not configured,
    /// a policy other than the recorded one.
    fn precheck(&self, cmd: &Command) -> Result<(), StoreError> {
        match cmd {
            Command::Append { space, write, .. } => self.check_writes(space, [write]),
            Command::Transaction { space, writes, .. } => self.check_writes(space, writes),
            Command::Ingest { space, .. } => self.merge_for(space).map(drop),
            Command::Configure { space, policy, .. } => {
                let given = StoredPolicy::of(policy);
                match self.spaces.get(space).and_then(|s| s.stored.as_ref()) {
                    Some(stored) if *stored != given => Err(StoreError::PolicyMismatch {
                        space: space.clone(),
                        stored: stored.identity.clone(),
                        given: given.identity,
                    }),
                    _ => Ok(()),
                }
            }
        }
    }

    fn check_writes<'w>(
        &self,
        space: &SpaceName,
        writes: impl IntoIterator<Item = &'w Write>,
    ) -> Result<(), StoreError> {
        if let Some(m) = self.merge_for(space)? {
            // Before a seq is taken and anything signed: a value the merge cannot fold
            // must not be replicated.
            for w in writes {
                m.check(w.op, &w.payload)
                    .map_err(|e| invalid_value(m.as_ref(), &e))?;
            }
        }
        Ok(())
    }

    fn run_command(&mut self, txn: &mut RwTxn, cmd: &mut Command) -> Result<Done, StoreError> {
        match cmd {
            Command::Append { space, write, .. } => self
                .append_local(txn, space, write, None, false)
                .map(|(a, bytes)| Done::Append(Box::new(a), bytes)),
            Command::Ingest {
                space,
                events,
                prepared,
                ..
            } => self.ingest(txn, space, events, prepared).map(Done::Ingest),
            Command::Configure { space, policy, .. } => {
                self.configure(txn, space, policy).map(|()| Done::Configure)
            }
            Command::Transaction { space, writes, .. } => {
                self.transaction(txn, space, writes).map(|all| {
                    let (applied, bytes) = all.into_iter().unzip();
                    Done::Transaction(applied, bytes)
                })
            }
        }
    }

    /// The space's id, creating the space on its first write.
    fn ensure_space(&mut self, txn: &mut RwTxn, space: &SpaceName) -> Result<SpaceId, StoreError> {
        if let Some(s) = self.spaces.get(space) {
            return Ok(s.sid);
        }
        let sid = self
            .spaces
            .values()
            .map(|s| s.sid)
            .max()
            .map_or(Some(1), |m| m.checked_add(1))
            .ok_or_else(|| StoreError::Corrupt("space ids exhausted".into()))?;
        self.tables
            .spaces
            .put(txn, space.as_str().as_bytes(), &sid.to_be_bytes())?;
        self.spaces.insert(
            space.clone(),
            SpaceState {
                sid,
                vv: VersionVector::new(),
                last_lsn: 0,
                conflicts: 0,
                stored: None,
                heads: BTreeMap::new(),
                pending: 0,
                vv_dirty: BTreeSet::new(),
                conflicts_dirty: false,
                unsigned_head: None,
                unsigned_run: 0,
            },
        );
        self.max_sid = self.max_sid.max(sid);
        Ok(sid)
    }

    fn state(&self, space: &SpaceName) -> Result<&SpaceState, StoreError> {
        self.spaces.get(space).ok_or_else(|| {
            StoreError::Corrupt(format!("space {space} missing from the writer's cache"))
        })
    }

    fn state_mut(&mut self, space: &SpaceName) -> Result<&mut SpaceState, StoreError> {
        self.spaces.get_mut(space).ok_or_else(|| {
            StoreError::Corrupt(format!("space {space} missing from the writer's cache"))
        })
    }

    /// The merge function events of `space` are folded with, if its policy is a merge.
    ///
    /// A space whose recorded policy is a merge this process has not been given is
    /// refused: applying events without folding them would leave its state behind on
    /// this replica for good.
    fn merge_for(&self, space: &SpaceName) -> Result<Option<Arc<dyn Merge>>, StoreError> {
        if self.replaying {
            return Ok(None);
        }
        match self.policies.get(space) {
            Some(Policy::Merge(m)) => Ok(Some(m.clone())),
            Some(Policy::Resolve(_)) => Ok(None),
            None => match self.spaces.get(space).and_then(|s| s.stored.as_ref()) {
                Some(stored) if stored.merge => Err(StoreError::PolicyNotConfigured {
                    space: space.clone(),
                    stored: stored.identity.clone(),
                }),
                _ => Ok(None),
            },
        }
    }

    /// Registers `policy` for `space`, recording its identity on first configuration.
    fn configure(
        &mut self,
        txn: &mut RwTxn,
        space: &SpaceName,
        policy: &Policy,
    ) -> Result<(), StoreError> {
        let sid = self.ensure_space(txn, space)?;
        let given = StoredPolicy::of(policy);
        match &self.state(space)?.stored {
            // The `merge` flag is compared too: a resolver and a merge that happen to
            // share a name and version still decide differently.
            Some(stored) if *stored != given => {
                return Err(StoreError::PolicyMismatch {
                    space: space.clone(),
                    stored: stored.identity.clone(),
                    given: given.identity,
                });
            }
            Some(_) => {
                // A rebuild from the journal could not fold a merge space (its function
                // was not registered yet): it is folded now, from the whole log.
                let t = self.tables;
                let refold = space_meta_key(sid, SPACE_REFOLD);
                if let Policy::Merge(m) = policy {
                    if t.space_meta.get(txn, &refold)?.is_some() {
                        self.fold_existing_log(txn, space, sid, m.as_ref())?;
                        t.space_meta.delete(txn, &refold)?;
                    }
                }
            }
            None => {
                if let Policy::Merge(m) = policy {
                    self.fold_existing_log(txn, space, sid, m.as_ref())?;
                }
                self.tables.space_meta.put(
                    txn,
                    &space_meta_key(sid, SPACE_POLICY),
                    &encode_cbor(&given, 32),
                )?;
                let state = self.state_mut(space)?;
                state.stored = Some(given);
            }
        }
        self.policies.insert(space.clone(), policy.clone());
        Ok(())
    }

    /// Builds the merge state of a space that already has events when it is first
    /// configured (for example it was created by an ingest before `configure_space`),
    /// so its state is the same as on a replica configured from the start. Lsn order is
    /// causal order, which is all `Merge::apply` needs.
    fn fold_existing_log(
        &self,
        txn: &mut RwTxn,
        space: &SpaceName,
        sid: SpaceId,
        merge: &dyn Merge,
    ) -> Result<(), StoreError> {
        // Folded in memory first: LMDB iterators borrow the txn, so nothing can be
        // written while the log is being read.
        let mut states: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for entry in self.tables.events_from(txn, sid, 1)? {
            let (lsn, bytes) = entry?;
            let event = decode_event(bytes, format_args!("event at lsn {lsn}"))?;
            match merge.apply(states.get(&event.key).map(Vec::as_slice), &event) {
                Ok(new) => {
                    states.insert(event.key.clone(), new);
                }
                Err(e) => tracing::warn!(
                    space = %space, event = %event.id(), merge = %merge.name(),
                    "merge refused an event; the key keeps its previous state: {e}"
                ),
            }
        }
        for (key, state) in states {
            self.tables.state.put(txn, &record_key(sid, &key), &state)?;
        }
        Ok(())
    }

    /// The writes of a transaction, as consecutive events of this node, each tagged
    /// with the group (see `txn.rs`); the last is signed. A write that fails fails the
    /// command, which then runs isolated (`run_isolated`), so its failure undoes the
    /// writes before it and frees their seqs.
    fn transaction(
        &mut self,
        txn: &mut RwTxn,
        space: &SpaceName,
        writes: &[Write],
    ) -> Result<Vec<(Applied, Vec<u8>)>, StoreError> {
        self.ensure_space(txn, space)?;
        let first = self.state(space)?.vv.get(&self.node_id) + 1;
        let tag = crate::txn::tag(first, writes.len() as u64);
        let last = writes.len().saturating_sub(1);
        writes
            .iter()
            .enumerate()
            .map(|(i, w)| self.append_local(txn, space, w, Some(&tag), i == last))
            .collect()
    }

    /// Writes one local event. It is sealed unsigned unless `sign` is set or it ends a
    /// run of [`MAX_UNSIGNED_RUN`] events; `finish` signs the batch's last one. Returns
    /// the event's stored encoding too.
    fn append_local(
        &mut self,
        txn: &mut RwTxn,
        space: &SpaceName,
        write: &Write,
        txn_tag: Option<&str>,
        sign: bool,
    ) -> Result<(Applied, Vec<u8>), StoreError> {
        self.ensure_space(txn, space)?;
        let me = self.node_id;
        let state = self.state(space)?;
        let seq = state.vv.get(&me) + 1;
        let prev = if seq == 1 {
            None
        } else {
            Some(*state.heads.get(&me).ok_or_else(|| {
                StoreError::Corrupt(format!("hash of own event {} missing", seq - 1))
            })?)
        };
        let sign = sign || state.unsigned_run + 1 >= MAX_UNSIGNED_RUN;
        let clock = state.vv.as_clock().clone();
        let sealed = self.seal_local(space, write, txn_tag, seq, prev, clock, sign)?;
        self.store_local(txn, space, sealed)
    }

    /// Builds and seals (signed if `sign`) this node's event `seq` of `space` for
    /// `write`, after `prev`, on `clock` (the space's version vector before it). Reads
    /// and writes nothing but the HLC.
    #[allow(clippy::too_many_arguments)]
    fn seal_local(
        &mut self,
        space: &SpaceName,
        write: &Write,
        txn_tag: Option<&str>,
        seq: u64,
        prev: Option<EventHash>,
        mut clock: weft_crdt::VectorClock,
        sign: bool,
    ) -> Result<Sealed, StoreError> {
        let me = self.node_id;
        clock.set(me, seq);
        let event = UnsignedEvent {
            origin: me,
            seq,
            clock,
            hlc: self.hlc.tick(wall_ms()),
            key: write.key.clone(),
            op: write.op,
            kind: write.kind.clone(),
            payload: write.payload.clone(),
            meta: {
                let mut meta = write.meta.clone();
                if let Some(tag) = txn_tag {
                    meta.insert(crate::txn::TXN_META_KEY.to_owned(), tag.to_owned());
                }
                meta
            },
            prev,
        };
        let event = if sign {
            event.sign(space, &self.signing_key)
        } else {
            event.seal_unsigned()
        };
        // Catches what the caller's fields alone cannot: a clock over its entry limit.
        event.validate().map_err(StoreError::Invalid)?;
        let bytes = event.encode();
        let hash = hash_of_encoding(&bytes);
        Ok(Sealed {
            event,
            bytes,
            hash,
            signed: sign,
        })
    }

    /// Stores a local event sealed by [`Writer::seal_local`] as the space's next one.
    fn store_local(
        &mut self,
        txn: &mut RwTxn,
        space: &SpaceName,
        sealed: Sealed,
    ) -> Result<(Applied, Vec<u8>), StoreError> {
        let Sealed {
            event,
            bytes,
            hash,
            signed,
        } = sealed;
        let sid = self.state(space)?.sid;
        let merge = self.merge_for(space)?;
        let applied = self.apply(txn, space, sid, event, &bytes, hash, merge.as_deref(), true)?;
        let state = self.state_mut(space)?;
        if signed {
            state.unsigned_head = None;
            state.unsigned_run = 0;
        } else {
            state.unsigned_head = Some(applied.lsn);
            state.unsigned_run += 1;
        }
        Ok((applied, bytes))
    }

    /// Applies what is ready of a verified batch, parks the rest and releases parked
    /// events that became ready. The events are moved into the outcome (`events` is
    /// left empty); should the batch run again, they are decoded from `prepared`.
    fn ingest(
        &mut self,
        txn: &mut RwTxn,
        space: &SpaceName,
        events: &mut Vec<Event>,
        prepared: &[Prepared],
    ) -> Result<Ingested, StoreError> {
        let mut out = Ingested::default();
        if events.len() != prepared.len() {
            // An earlier attempt at this batch took them.
            *events = prepared
                .iter()
                .map(|p| decode_event(&p.bytes, "an ingested event"))
                .collect::<Result<_, _>>()?;
        }
        if events.is_empty() {
            return Ok(out);
        }
        let mut events: Vec<Option<Event>> = std::mem::take(events).into_iter().map(Some).collect();
        let sid = self.ensure_space(txn, space)?;
        let merge = self.merge_for(space)?;
        let t = self.tables;
        let taken = || StoreError::Corrupt("an ingested event was used twice".into());

        // Events of transactions are always parked first: `release_pending` applies a
        // transaction only once all its events are parked, all in this command (see
        // `txn.rs`). The rest is applied as it becomes ready.
        let mut parked = HashSet::new();
        let mut plain = Vec::with_capacity(events.len());
        let mut tagged_parked = false;
        for (i, e) in events.iter().enumerate() {
            let e = e.as_ref().ok_or_else(taken)?;
            if !matches!(crate::txn::group_of(e), Ok(Some(_))) {
                plain.push(Item(e, i));
                continue;
            }
            let key = id_key(sid, &e.origin, e.seq);
            if e.readiness(&self.state(space)?.vv) == Readiness::Duplicate
                || t.pending.get(txn, &key)?.is_some()
                || !parked.insert(e.id())
            {
                out.duplicates += 1;
                continue;
            }
            t.pending.put(txn, &key, &prepared[i].bytes)?;
            self.state_mut(space)?.pending += 1;
            tagged_parked = true;
        }

        // Apply what is ready, in the order the sync core gives: each event is ready
        // once those before it are applied, and `apply` advances the cached version
        // vector exactly as `causal_order` assumed.
        let order = sync::causal_order(&self.state(space)?.vv, plain);
        out.duplicates += order.duplicates;
        let ready: Vec<usize> = order.ready.iter().map(|Item(_, i)| *i).collect();
        let waiting: Vec<usize> = order.waiting.iter().map(|Item(_, i)| *i).collect();
        out.applied.reserve(ready.len());
        for i in ready {
            let e = events[i].take().ok_or_else(taken)?;
            let state = self.state(space)?;
            if let Err(reason) = check_prev(state, &e)? {
                return Err(StoreError::Rejected { id: e.id(), reason });
            }
            // A copy may have been parked by an earlier call.
            if state.pending > 0 && t.pending.delete(txn, &id_key(sid, &e.origin, e.seq))? {
                self.state_mut(space)?.pending -= 1;
            }
            let p = &prepared[i];
            out.applied.push(self.apply(
                txn,
                space,
                sid,
                e,
                &p.bytes,
                p.hash,
                merge.as_deref(),
                false,
            )?);
        }

        for i in waiting {
            let e = events[i].as_ref().ok_or_else(taken)?;
            let key = id_key(sid, &e.origin, e.seq);
            if t.pending.get(txn, &key)?.is_some() || !parked.insert(e.id()) {
                out.duplicates += 1;
                continue;
            }
            t.pending.put(txn, &key, &prepared[i].bytes)?;
            self.state_mut(space)?.pending += 1;
        }

        if (!out.applied.is_empty() || tagged_parked) && self.state(space)?.pending > 0 {
            self.release_pending(txn, space, sid, merge.as_deref(), &mut parked, &mut out)?;
        }
        out.parked = parked.len();
        Ok(out)
    }

    /// Removes a parked event from the pending set.
    fn unpark(&mut self, txn: &mut RwTxn, space: &SpaceName, key: &[u8]) -> Result<(), StoreError> {
        if self.tables.pending.delete(txn, key)? {
            let state = self.state_mut(space)?;
            state.pending = state.pending.saturating_sub(1);
        }
        Ok(())
    }

    /// Applies parked events that became ready, until none does. Only the next seq of
    /// each origin can be ready, so each step is a point lookup. `parked` holds this
    /// call's newly parked ids: released ones leave it, and a bad prev among them
    /// rejects the call, while a bad prev of an event parked by an earlier call only
    /// drops that event (its sender is gone; a correct copy can still arrive).
    fn release_pending(
        &mut self,
        txn: &mut RwTxn,
        space: &SpaceName,
        sid: SpaceId,
        merge: Option<&dyn Merge>,
        parked: &mut HashSet<EventId>,
        out: &mut Ingested,
    ) -> Result<(), StoreError> {
        let origins = self.tables.pending_origins(txn, sid)?;
        loop {
            let mut progress = false;
            for origin in &origins {
                loop {
                    let next = self.state(space)?.vv.get(origin) + 1;
                    let key = id_key(sid, origin, next);
                    let bytes = match self.tables.pending.get(txn, &key)? {
                        Some(bytes) => bytes.to_vec(),
                        None => break,
                    };
                    let event =
                        decode_event(&bytes, format_args!("pending event {origin}:{next}"))?;
                    if event.readiness(&self.state(space)?.vv) != Readiness::Ready {
                        break;
                    }
                    if let Ok(Some(group)) = crate::txn::group_of(&event) {
                        if self.release_group(
                            txn,
                            space,
                            sid,
                            merge,
                            (event, bytes),
                            group,
                            parked,
                            out,
                        )? {
                            progress = true;
                            continue;
                        }
                        break;
                    }
                    self.unpark(txn, space, &key)?;
                    let id = event.id();
                    if let Err(reason) = self.check_prev(space, &event)? {
                        if parked.contains(&id) {
                            return Err(StoreError::Rejected { id, reason });
                        }
                        tracing::warn!(space = %space, event = %id, "dropping parked event: {reason}");
                        break;
                    }
                    parked.remove(&id);
                    let hash = hash_of_encoding(&bytes);
                    out.applied
                        .push(self.apply(txn, space, sid, event, &bytes, hash, merge, false)?);
                    progress = true;
                }
            }
            if !progress {
                return Ok(());
            }
        }
    }

    /// Applies a parked transaction whose first event, `event`, is ready, if every
    /// member is parked and each becomes ready after the ones before it; returns
    /// whether it did. All members are checked before any is applied, so a group is
    /// applied whole or not at all. A group whose chain is broken is rejected if this
    /// call parked any of it, else dropped from the pending set (its sender is gone; a
    /// correct copy can still arrive), like a single parked event.
    #[allow(clippy::too_many_arguments)]
    fn release_group(
        &mut self,
        txn: &mut RwTxn,
        space: &SpaceName,
        sid: SpaceId,
        merge: Option<&dyn Merge>,
        (event, bytes): (Event, Vec<u8>),
        (first, n): (u64, u64),
        parked: &mut HashSet<EventId>,
        out: &mut Ingested,
    ) -> Result<bool, StoreError> {
        let origin = event.origin;
        if event.seq != first {
            // The group's start is applied but this member is not: only a tag that
            // changed within the group does this. It can never complete.
            tracing::warn!(space = %space, event = %event.id(), "transaction member without its group; left parked");
            return Ok(false);
        }
        let mut vv = self.state(space)?.vv.clone();
        vv.set(origin, first);
        let mut members = vec![(event, bytes)];
        for seq in first + 1..first + n {
            let Some(bytes) = self.tables.pending.get(txn, &id_key(sid, &origin, seq))? else {
                return Ok(false);
            };
            let bytes = bytes.to_vec();
            let e = decode_event(&bytes, format_args!("pending event {origin}:{seq}"))?;
            let same_group = matches!(crate::txn::group_of(&e), Ok(Some(g)) if g == (first, n));
            if !same_group || e.readiness(&vv) != Readiness::Ready {
                return Ok(false);
            }
            vv.set(origin, seq);
            members.push((e, bytes));
        }
        let hashes: Vec<EventHash> = members.iter().map(|(_, b)| hash_of_encoding(b)).collect();
        // The chain: the first links to what is applied, each other to its predecessor.
        let mut broken = match self.check_prev(space, &members[0].0)? {
            Err(reason) => Some((members[0].0.id(), reason)),
            Ok(()) => None,
        };
        for (i, pair) in members.windows(2).enumerate() {
            if broken.is_some() {
                break;
            }
            if let Err(reason) = sync::check_prev(&pair[1].0, &hashes[i]) {
                broken = Some((pair[1].0.id(), reason));
            }
        }
        if let Some((id, reason)) = broken {
            if members.iter().any(|(m, _)| parked.contains(&m.id())) {
                return Err(StoreError::Rejected { id, reason });
            }
            tracing::warn!(space = %space, event = %id, "dropping a parked transaction: {reason}");
            for (m, _) in &members {
                self.unpark(txn, space, &id_key(sid, &m.origin, m.seq))?;
            }
            return Ok(false);
        }
        for ((e, bytes), hash) in members.into_iter().zip(hashes) {
            self.unpark(txn, space, &id_key(sid, &e.origin, e.seq))?;
            parked.remove(&e.id());
            out.applied
                .push(self.apply(txn, space, sid, e, &bytes, hash, merge, false)?);
        }
        Ok(true)
    }

    /// [`check_prev`] against `space`'s cache.
    fn check_prev(
        &self,
        space: &SpaceName,
        event: &Event,
    ) -> Result<Result<(), EventError>, StoreError> {
        check_prev(self.state(space)?, event)
    }

    /// Writes a ready, checked event (`bytes` is its encoding, `hash` their hash) to
    /// the log and its indexes, and advances the cache.
    ///
    /// In a merge space the event is also folded into its key's state. If the merge
    /// refuses a remote event, the key keeps its old state and the event is still
    /// applied: the refusal is deterministic, so every replica does the same, and the
    /// origin's later events (which chain onto this one) are not blocked. A refused
    /// local event fails instead, and nothing of it is kept.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        txn: &mut RwTxn,
        space: &SpaceName,
        sid: SpaceId,
        event: Event,
        bytes: &[u8],
        hash: EventHash,
        merge: Option<&dyn Merge>,
        local: bool,
    ) -> Result<Applied, StoreError> {
        let t = self.tables;
        let state = self.state(space)?;
        let lsn = state.last_lsn + 1;
        // An event whose clock covers the whole version vector (every local one; a
        // remote one from a writer that had seen all we have) follows every applied
        // event, so it alone is its key's frontier (see below).
        let covers_all = local || covers(&state.vv, &event);
        if let Some(m) = merge {
            let key = record_key(sid, &event.key);
            match m.apply(t.state.get(txn, &key)?, &event) {
                Ok(new) => t.state.put(txn, &key, &new)?,
                Err(e) if local => return Err(invalid_value(m, &e)),
                Err(e) => tracing::warn!(
                    space = %space, event = %event.id(), merge = %m.name(),
                    "merge refused a remote event; the key keeps its previous state: {e}"
                ),
            }
        }
        // APPEND fails on a key that is not past the table's end, so it too refuses
        // to overwrite.
        let flags = if sid == self.max_sid {
            PutFlags::APPEND
        } else {
            // A log entry is never overwritten, whatever state the cache is in.
            PutFlags::NO_OVERWRITE
        };
        t.events
            .put_with_flags(txn, flags, &event_key(sid, lsn), bytes)?;
        t.by_id.put(
            txn,
            &id_key(sid, &event.origin, event.seq),
            &IdEntry { lsn, hash }.to_bytes(),
        )?;
        // The key's frontier, from the last record of its history: the event joins it,
        // and drops the members its clock includes (what `weft_crdt::Frontier::apply`
        // does, on the stored form); when it covers everything, none is looked up.
        let mut others = Vec::new();
        if !covers_all {
            if let Some(prev) = t.last_history(txn, sid, event.key.as_bytes(), u64::MAX)? {
                for member in std::iter::once(prev.lsn).chain(prev.others) {
                    if !event.clock.includes(&t.id_at(txn, sid, member)?) {
                        others.push(member);
                    }
                }
                others.sort_unstable();
            }
        }
        let record = Record { lsn, others };
        let conflict = record.conflict();
        let was_conflict = t.push_history(txn, sid, &event.key, &record)?;

        // A local event's HLC came from this clock's own tick: nothing to follow.
        if !local {
            let within = |now: u64| event.hlc.wall_ms() <= now.saturating_add(MAX_HLC_LEAD_MS);
            if !within(self.wall_seen_ms) {
                self.wall_seen_ms = wall_ms();
            }
            if within(self.wall_seen_ms) {
                self.hlc.observe(event.hlc);
            } else {
                tracing::debug!(event = %event.id(), hlc = %event.hlc, "not following an HLC reading far ahead of the wall clock");
            }
        }
        let state = self.state_mut(space)?;
        state.vv.set(event.origin, event.seq);
        state.vv_dirty.insert(event.origin);
        state.heads.insert(event.origin, hash);
        state.last_lsn = lsn;
        if conflict != was_conflict {
            state.conflicts = if conflict {
                state.conflicts.saturating_add(1)
            } else {
                state.conflicts.saturating_sub(1)
            };
            state.conflicts_dirty = true;
        }
        Ok(Applied {
            space: space.clone(),
            lsn,
            event,
            conflict,
        })
    }
}

/// Whether `event.prev` is the hash of its origin's previous event, which must be
/// applied (the event is ready), from the cache of each origin's newest hash. The
/// outer `Result` is the store's, the inner one the event's.
fn check_prev(state: &SpaceState, event: &Event) -> Result<Result<(), EventError>, StoreError> {
    if event.prev.is_none() {
        return Ok(Ok(()));
    }
    let head = state.heads.get(&event.origin).ok_or_else(|| {
        StoreError::Corrupt(format!(
            "hash of applied event {}:{} missing from the writer's cache",
            event.origin,
            event.seq - 1
        ))
    })?;
    Ok(sync::check_prev(event, head))
}

/// Whether `event`'s clock includes everything in `vv`: then it follows every applied
/// event, and drops its key's whole frontier. Both are sorted by origin, so one pass
/// over each compares them; only short version vectors are compared (a long one costs
/// more than the lookups it would save).
fn covers(vv: &VersionVector, event: &Event) -> bool {
    const MAX_COMPARED: usize = 16;
    if vv.len() > MAX_COMPARED {
        return false;
    }
    let mut clock = event.clock.iter().peekable();
    vv.iter().all(|(origin, seq)| {
        while clock.next_if(|(o, _)| *o < origin).is_some() {}
        clock
            .next_if(|(o, _)| *o == origin)
            .is_some_and(|(_, s)| s >= seq)
    })
}

/// A local write's payload that the space's merge refuses. Reported as an invalid
/// write, so callers (and the node's HTTP API) treat it as the caller's fault.
fn invalid_value(merge: &dyn Merge, e: &weft_crdt::MergeError) -> StoreError {
    StoreError::Invalid(EventError::Malformed(format!(
        "value refused by merge {}/{}: {e}",
        merge.name(),
        merge.version()
    )))
}

/// A copy of an error that has to answer every command of a batch. LMDB errors and a
/// full store keep their kind; anything else keeps its message.
fn duplicate(e: &StoreError) -> StoreError {
    match e {
        StoreError::Lmdb(inner) => StoreError::Lmdb(inner.clone()),
        StoreError::StoreFull {
            map_size,
            max_map_size,
        } => StoreError::StoreFull {
            map_size: *map_size,
            max_map_size: *max_map_size,
        },
        other => StoreError::Corrupt(other.to_string()),
    }
}

fn reply_err(cmd: Command, e: StoreError) {
    match cmd {
        Command::Append { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Command::Ingest { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Command::Configure { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Command::Transaction { reply, .. } => {
            let _ = reply.send(Err(e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_crdt::{Hlc, Op, VectorClock};

    fn event_with(clock: &[(u8, u64)]) -> Event {
        let node = |b: u8| NodeId::from_bytes([b; 32]);
        let clock: VectorClock = clock.iter().map(|(b, s)| (node(*b), *s)).collect();
        let (origin, seq) = clock.iter().next().map(|(o, s)| (*o, s)).unwrap();
        UnsignedEvent {
            origin,
            seq,
            clock,
            hlc: Hlc::new(1, 0),
            key: "k".into(),
            op: Op::Put,
            kind: String::new(),
            payload: Vec::new(),
            meta: BTreeMap::new(),
            prev: None,
        }
        .seal_unsigned()
    }

    #[test]
    fn covers_compares_every_entry_of_the_version_vector() {
        let mut vv = VersionVector::new();
        vv.set(NodeId::from_bytes([2; 32]), 5);
        vv.set(NodeId::from_bytes([4; 32]), 1);
        assert!(covers(&vv, &event_with(&[(2, 5), (4, 1)])));
        assert!(covers(&vv, &event_with(&[(1, 9), (2, 6), (3, 1), (4, 2)])));
        assert!(!covers(&vv, &event_with(&[(2, 4), (4, 1)])), "behind on 2");
        assert!(!covers(&vv, &event_with(&[(2, 5)])), "lacks 4");
        assert!(!covers(&vv, &event_with(&[(4, 1)])), "lacks 2");
        assert!(!covers(&vv, &event_with(&[(1, 1), (3, 9), (5, 9)])));
        assert!(covers(&VersionVector::new(), &event_with(&[(7, 1)])));
    }
}
