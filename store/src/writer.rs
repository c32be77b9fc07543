//! The writer thread: the only code that writes to LMDB.
//!
//! Ownership: one `std::thread` owns the write side of the environment, the signing
//! key, the hybrid logical clock and a cache of every space's version vector and last
//! lsn (loaded on open, so an append never scans). Nothing else mutates any of it.
//! Readers use their own read transactions and never see a half-applied command,
//! because LMDB shows them only committed transactions.
//!
//! Data flow: `Store::append`/`Store::ingest` send a [`Command`] on a bounded tokio
//! channel (`StoreConfig::writer_queue`), each with a oneshot for its answer; remote
//! events are already verified by then (see `verify`). The thread blocks on the
//! channel, then drains up to `StoreConfig::max_batch` queued commands and runs them in
//! ONE write transaction (group commit: one fsync for many writes). Each command runs
//! in its own nested transaction; a command that fails (an invalid write, a rejected
//! ingest, even an LMDB error) aborts only its nested transaction and has its cache
//! changes rolled back, so it never poisons the rest of the batch. After the outer
//! commit is durable the thread broadcasts every applied event and answers every
//! command; if that commit fails, every command of the batch gets the error and the
//! cache is reloaded from disk. No answer is sent before its data is durable.
//!
//! Durability and growth: in relaxed mode the thread also flushes (`force_sync`) at
//! most every `flush_every` while it has unflushed commits, waking up for it when idle.
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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use heed::{Env, PutFlags, RwTxn, WithoutTls};
use tokio::sync::{broadcast, mpsc, oneshot};
use weft_crdt::sync;
use weft_crdt::{
    Event, EventError, EventHash, EventId, Hlc, HlcClock, Merge, NodeId, Policy, Readiness,
    SigningKey, SpaceName, UnsignedEvent, VersionVector,
};

use crate::map::{self, MapControl};
use crate::tables::{
    decode_event, encode_cbor, encode_frontier, event_key, frontier_key, history_key, id_key,
    origin_key, space_meta_key, IdEntry, SpaceId, StoredPolicy, Tables, HISTORY_CONFLICT, META_HLC,
    SPACE_CONFLICTS, SPACE_POLICY,
};
use crate::{Applied, Durability, IngestOutcome, StoreError, Write};

/// A request to the writer, with the channel its answer goes back on.
pub(crate) enum Command {
    Append {
        space: SpaceName,
        write: Write,
        reply: oneshot::Sender<Result<Applied, StoreError>>,
    },
    Ingest {
        space: SpaceName,
        /// Already validated and signature-checked.
        events: Vec<Event>,
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
    fn space(&self) -> &SpaceName {
        match self {
            Command::Append { space, .. }
            | Command::Ingest { space, .. }
            | Command::Configure { space, .. }
            | Command::Transaction { space, .. } => space,
        }
    }
}

/// The writer's cached view of one space; always equal to what its committed (or
/// current batch's) tables say.
#[derive(Clone, Debug)]
struct SpaceState {
    sid: SpaceId,
    vv: VersionVector,
    last_lsn: u64,
    /// Keys whose frontier holds more than one event (`space_meta/conflicts`).
    conflicts: u64,
    /// `space_meta/policy`.
    stored: Option<StoredPolicy>,
}

/// How one try at a batch ended.
enum Attempt {
    /// LMDB ran out of map; nothing was committed.
    MapFull,
    /// Opening or committing the transaction failed; nothing was committed.
    Failed(Arc<heed::Error>),
    /// Every command failed on its own, so the transaction was aborted.
    NothingCommitted(Vec<Result<Done, StoreError>>),
    /// Committed (and durable in full mode); one result per command, in order.
    Committed(Vec<Result<Done, StoreError>>),
}

/// What a command produced, held until the batch commits.
enum Done {
    Append(Box<Applied>),
    Ingest(IngestOutcome),
    Configure,
    Transaction(Vec<Applied>),
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
    applied_tx: broadcast::Sender<Arc<Applied>>,
    map: Arc<MapControl>,
    /// `Some` in relaxed mode: the longest a commit may stay unflushed.
    flush_every: Option<Duration>,
    /// Relaxed mode: something was committed since the last flush.
    unflushed: bool,
    last_flush: Instant,
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
            applied_tx,
            map: Arc::new(MapControl::new(env_for_map, usize::MAX)),
            flush_every: None,
            unflushed: false,
            last_flush: Instant::now(),
        };
        w.reload()?;
        Ok(w)
    }

    fn reload(&mut self) -> Result<(), StoreError> {
        let txn = self.env.read_txn()?;
        let mut spaces = HashMap::new();
        let mut max_sid = 0;
        for (name, sid) in self.tables.all_spaces(&txn)? {
            let name = SpaceName::new(name)
                .map_err(|e| StoreError::Corrupt(format!("stored space name: {e}")))?;
            let state = SpaceState {
                sid,
                vv: self.tables.version_vector(&txn, sid)?,
                last_lsn: self.tables.last_lsn(&txn, sid)?,
                conflicts: self.tables.conflicts(&txn, sid)?,
                stored: self.tables.stored_policy(&txn, sid)?,
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

    /// Sets the flush policy; must match the flags the environment was opened with.
    pub fn with_durability(mut self, durability: Durability) -> Self {
        self.flush_every = match durability {
            Durability::Full => None,
            Durability::Relaxed { flush_every } => Some(flush_every),
        };
        self
    }

    /// Runs until every sender is dropped.
    pub fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        // In relaxed mode the thread must wake up to flush even when no command comes;
        // tokio's channel has no blocking receive with a timeout, so a tiny
        // current-thread runtime provides one. If it cannot be built, every batch is
        // flushed at once instead (more durable, never less).
        let timer = self.flush_every.and_then(|_| {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .map_err(|e| tracing::warn!("store writer: no timer, flushing every batch: {e}"))
                .ok()
        });
        if self.flush_every.is_some() && timer.is_none() {
            self.flush_every = Some(Duration::ZERO);
        }
        loop {
            let next = match (&timer, self.flush_deadline()) {
                (Some(rt), Some(deadline)) => {
                    let deadline = tokio::time::Instant::from_std(deadline);
                    // The timer must be created inside the runtime, hence the async block.
                    let recv = rt.block_on(async {
                        tokio::time::timeout_at(deadline, commands.recv()).await
                    });
                    match recv {
                        Ok(next) => next,
                        Err(_elapsed) => {
                            self.flush();
                            continue;
                        }
                    }
                }
                _ => commands.blocking_recv(),
            };
            let Some(first) = next else { break };
            let mut batch = vec![first];
            while batch.len() < self.max_batch {
                match commands.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            self.run_batch(batch);
            if self.flush_deadline().is_some_and(|d| d <= Instant::now()) {
                self.flush();
            }
        }
        // A clean shutdown leaves nothing unflushed, in either mode.
        if self.unflushed {
            self.flush();
        }
        tracing::debug!("store writer: all handles dropped, exiting");
    }

    /// When the commits not yet flushed must be flushed (relaxed mode only).
    fn flush_deadline(&self) -> Option<Instant> {
        let every = self.flush_every?;
        self.unflushed.then(|| self.last_flush + every)
    }

    /// Makes every commit so far durable (relaxed mode). A failure is logged and the
    /// flush retried at the next deadline; the commits stay in the OS page cache.
    fn flush(&mut self) {
        match self.env.force_sync() {
            Ok(()) => self.unflushed = false,
            Err(e) => tracing::error!("store writer: flushing to disk failed: {e}"),
        }
        self.last_flush = Instant::now();
    }

    /// Runs one batch in one write transaction and answers every command in it.
    ///
    /// If LMDB runs out of map (in any command or in the commit), the whole
    /// transaction is aborted, the cache put back, the map doubled and the batch run
    /// again from the start: nothing of the failed attempt was committed or answered,
    /// so to the callers it is as if the map had always been large enough.
    pub(crate) fn run_batch(&mut self, batch: Vec<Command>) {
        // Policies are not reloaded from disk, so an aborted attempt restores them from
        // here. Only batches that configure anything pay for the copy.
        let policies_before = batch
            .iter()
            .any(|c| matches!(c, Command::Configure { .. }))
            .then(|| self.policies.clone());
        loop {
            match self.attempt(&batch) {
                Attempt::MapFull => {
                    self.map.retries.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = self.reload() {
                        tracing::error!("store writer: reloading state after MapFull: {e}");
                    }
                    if let Some(p) = &policies_before {
                        self.policies = p.clone();
                    }
                    if let Err(e) = self.map.grow() {
                        tracing::error!("store writer: cannot grow the map: {e}");
                        for cmd in batch {
                            reply_err(cmd, duplicate(&e));
                        }
                        return;
                    }
                }
                Attempt::Failed(e) => {
                    for cmd in batch {
                        reply_err(cmd, StoreError::Lmdb(e.clone()));
                    }
                    if let Err(e) = self.reload() {
                        tracing::error!("store writer: reloading state after a failed commit: {e}");
                    }
                    if let Some(p) = policies_before {
                        self.policies = p;
                    }
                    return;
                }
                Attempt::NothingCommitted(results) => {
                    for (cmd, r) in batch.into_iter().zip(results) {
                        if let Err(e) = r {
                            reply_err(cmd, e);
                        }
                    }
                    return;
                }
                Attempt::Committed(results) => {
                    if self.flush_every.is_some() {
                        self.unflushed = true;
                    }
                    if let Err(e) = self.map.grow_if_nearly_full() {
                        // Not fatal: the next batch that needs room grows or fails then.
                        tracing::warn!("store writer: growing the map ahead of time: {e}");
                    }
                    self.answer(batch, results);
                    return;
                }
            }
        }
    }

    /// One try at a batch; see [`Writer::run_batch`].
    fn attempt(&mut self, batch: &[Command]) -> Attempt {
        let env = self.env.clone();
        let mut txn = match env.write_txn() {
            Ok(t) => t,
            Err(e) => return Attempt::Failed(Arc::new(e)),
        };
        let mut results = Vec::with_capacity(batch.len());
        for cmd in batch {
            let result = self.run_isolated(&env, &mut txn, cmd);
            if result.as_ref().err().is_some_and(map::is_map_full) {
                txn.abort();
                return Attempt::MapFull;
            }
            results.push(result);
        }
        if results.iter().all(Result::is_err) {
            txn.abort();
            return Attempt::NothingCommitted(results);
        }
        let committed = self
            .tables
            .meta
            .put(&mut txn, META_HLC, &self.hlc.last().0.to_be_bytes())
            .and_then(|()| txn.commit());
        match committed {
            Ok(()) => Attempt::Committed(results),
            Err(e) if map::is_heed_map_full(&e) => Attempt::MapFull,
            Err(e) => {
                tracing::error!("store writer: commit failed: {e}");
                Attempt::Failed(Arc::new(e))
            }
        }
    }

    /// Broadcasts what a committed batch applied, then answers its commands.
    fn answer(&self, batch: Vec<Command>, results: Vec<Result<Done, StoreError>>) {
        for r in &results {
            match r {
                Ok(Done::Append(a)) => self.broadcast(a),
                Ok(Done::Ingest(o)) => o.applied.iter().for_each(|a| self.broadcast(a)),
                Ok(Done::Transaction(all)) => all.iter().for_each(|a| self.broadcast(a)),
                Ok(Done::Configure) | Err(_) => {}
            }
        }
        for (cmd, r) in batch.into_iter().zip(results) {
            // A caller that stopped waiting (dropped its future) is not an error: the
            // data is committed either way.
            match (cmd, r) {
                (Command::Append { reply, .. }, Ok(Done::Append(a))) => {
                    let _ = reply.send(Ok(*a));
                }
                (Command::Ingest { reply, .. }, Ok(Done::Ingest(o))) => {
                    let _ = reply.send(Ok(o));
                }
                (Command::Configure { reply, .. }, Ok(Done::Configure)) => {
                    let _ = reply.send(Ok(()));
                }
                (Command::Transaction { reply, .. }, Ok(Done::Transaction(all))) => {
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

    fn broadcast(&self, applied: &Applied) {
        // No subscribers is fine; lagging subscribers see `RecvError::Lagged`.
        let _ = self.applied_tx.send(Arc::new(applied.clone()));
    }

    /// Runs one command in a nested transaction; on failure its writes and its cache
    /// changes are undone, leaving the batch as if the command had never been sent.
    fn run_isolated(
        &mut self,
        env: &Env<WithoutTls>,
        parent: &mut RwTxn,
        cmd: &Command,
    ) -> Result<Done, StoreError> {
        let space = cmd.space();
        let saved_space = self.spaces.get(space).cloned();
        let saved_policy = self.policies.get(space).cloned();
        let saved_max_sid = self.max_sid;
        let mut txn = env.nested_write_txn(parent)?;
        let result = match cmd {
            Command::Append { space, write, .. } => self
                .append(&mut txn, space, write)
                .map(|a| Done::Append(Box::new(a))),
            Command::Ingest { space, events, .. } => {
                self.ingest(&mut txn, space, events).map(Done::Ingest)
            }
            Command::Configure { space, policy, .. } => self
                .configure(&mut txn, space, policy)
                .map(|()| Done::Configure),
            Command::Transaction { space, writes, .. } => self
                .transaction(&mut txn, space, writes)
                .map(Done::Transaction),
        };
        let result = result.and_then(|done| txn.commit().map(|()| done).map_err(Into::into));
        if result.is_err() {
            // The nested txn was dropped uncommitted, which aborts it: its writes are
            // gone from the batch. Only the cache needs putting back.
            match saved_space {
                Some(s) => self.spaces.insert(space.clone(), s),
                None => self.spaces.remove(space),
            };
            match saved_policy {
                Some(p) => self.policies.insert(space.clone(), p),
                None => self.policies.remove(space),
            };
            self.max_sid = saved_max_sid;
        }
        result
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

    /// The merge function events of `space` are folded with, if its policy is a merge.
    ///
    /// A space whose recorded policy is a merge this process has not been given is
    /// refused: applying events without folding them would leave its state behind on
    /// this replica for good.
    fn merge_for(&self, space: &SpaceName) -> Result<Option<Arc<dyn Merge>>, StoreError> {
        match self.policies.get(space) {
            Some(Policy::Merge(m)) => Ok(Some(m.clone())),
            Some(Policy::Resolve(_)) => Ok(None),
            None => match &self.state(space)?.stored {
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
        let given = StoredPolicy {
            identity: policy.identity(),
            merge: matches!(policy, Policy::Merge(_)),
        };
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
            Some(_) => {}
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
            self.tables
                .state
                .put(txn, &frontier_key(sid, &key), &state)?;
        }
        Ok(())
    }

    fn state_mut(&mut self, space: &SpaceName) -> Result<&mut SpaceState, StoreError> {
        self.spaces.get_mut(space).ok_or_else(|| {
            StoreError::Corrupt(format!("space {space} missing from the writer's cache"))
        })
    }

    fn append(
        &mut self,
        txn: &mut RwTxn,
        space: &SpaceName,
        write: &Write,
    ) -> Result<Applied, StoreError> {
        self.append_tagged(txn, space, write, None)
    }

    /// The writes of a transaction, as consecutive events of this node, each tagged
    /// with the group (see `txn.rs`). Runs in one nested transaction (`run_isolated`),
    /// so a write that fails undoes the ones before it and frees their seqs.
    fn transaction(
        &mut self,
        txn: &mut RwTxn,
        space: &SpaceName,
        writes: &[Write],
    ) -> Result<Vec<Applied>, StoreError> {
        self.ensure_space(txn, space)?;
        let first = self.state(space)?.vv.get(&self.node_id) + 1;
        let tag = crate::txn::tag(first, writes.len() as u64);
        writes
            .iter()
            .map(|w| self.append_tagged(txn, space, w, Some(&tag)))
            .collect()
    }

    fn append_tagged(
        &mut self,
        txn: &mut RwTxn,
        space: &SpaceName,
        write: &Write,
        txn_tag: Option<&str>,
    ) -> Result<Applied, StoreError> {
        let sid = self.ensure_space(txn, space)?;
        let merge = self.merge_for(space)?;
        if let Some(m) = &merge {
            // Before the seq is taken and anything is signed: a value the merge cannot
            // fold must not be replicated.
            m.check(write.op, &write.payload)
                .map_err(|e| invalid_value(m.as_ref(), &e))?;
        }
        let state = self.state(space)?;
        let seq = state.vv.get(&self.node_id) + 1;
        let prev = if seq == 1 {
            None
        } else {
            let entry = self
                .tables
                .id_entry(txn, sid, &self.node_id, seq - 1)?
                .ok_or_else(|| StoreError::Corrupt(format!("own event {} missing", seq - 1)))?;
            Some(entry.hash)
        };
        let mut clock = state.vv.as_clock().clone();
        clock.set(self.node_id, seq);
        let event = UnsignedEvent {
            origin: self.node_id,
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
        }
        .sign(space, &self.signing_key);
        // Catches what the caller's fields alone cannot: a clock over its entry limit.
        event.validate().map_err(StoreError::Invalid)?;
        let hash = event.hash();
        self.apply(txn, space, sid, event, hash, merge.as_deref(), true)
    }

    fn ingest(
        &mut self,
        txn: &mut RwTxn,
        space: &SpaceName,
        events: &[Event],
    ) -> Result<IngestOutcome, StoreError> {
        let mut out = IngestOutcome::default();
        if events.is_empty() {
            return Ok(out);
        }
        let sid = self.ensure_space(txn, space)?;
        let merge = self.merge_for(space)?;

        // Events of transactions are always parked first: `release_pending` applies a
        // transaction only once all its events are parked, all in this command (see
        // `txn.rs`). The rest is applied as it becomes ready.
        let mut parked = HashSet::new();
        let mut plain = Vec::with_capacity(events.len());
        let mut tagged_parked = false;
        for e in events {
            if !matches!(crate::txn::group_of(e), Ok(Some(_))) {
                plain.push(e);
                continue;
            }
            let key = id_key(sid, &e.origin, e.seq);
            if e.readiness(&self.state(space)?.vv) == Readiness::Duplicate
                || self.tables.pending.get(txn, &key)?.is_some()
                || !parked.insert(e.id())
            {
                out.duplicates += 1;
                continue;
            }
            self.tables.pending.put(txn, &key, &e.encode())?;
            tagged_parked = true;
        }

        // Apply what is ready, in the order the sync core gives: each event is ready
        // once those before it are applied, and `apply` advances the cached version
        // vector exactly as `causal_order` assumed.
        let order = sync::causal_order(&self.state(space)?.vv, plain);
        out.duplicates += order.duplicates;
        for e in order.ready {
            let hash = e.hash();
            if let Err(reason) = self.check_prev(txn, sid, e)? {
                return Err(StoreError::Rejected { id: e.id(), reason });
            }
            // A copy may have been parked by an earlier call.
            self.tables
                .pending
                .delete(txn, &id_key(sid, &e.origin, e.seq))?;
            out.applied.push(self.apply(
                txn,
                space,
                sid,
                e.clone(),
                hash,
                merge.as_deref(),
                false,
            )?);
        }

        for e in order.waiting {
            let key = id_key(sid, &e.origin, e.seq);
            if self.tables.pending.get(txn, &key)?.is_some() || !parked.insert(e.id()) {
                out.duplicates += 1;
                continue;
            }
            self.tables.pending.put(txn, &key, &e.encode())?;
        }

        if !out.applied.is_empty() || tagged_parked {
            self.release_pending(txn, space, sid, merge.as_deref(), &mut parked, &mut out)?;
        }
        out.parked = parked.len();
        Ok(out)
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
        out: &mut IngestOutcome,
    ) -> Result<(), StoreError> {
        let origins = self.tables.pending_origins(txn, sid)?;
        loop {
            let mut progress = false;
            for origin in &origins {
                loop {
                    let next = self.state(space)?.vv.get(origin) + 1;
                    let key = id_key(sid, origin, next);
                    let event = match self.tables.pending.get(txn, &key)? {
                        Some(bytes) => {
                            decode_event(bytes, format_args!("pending event {origin}:{next}"))?
                        }
                        None => break,
                    };
                    if event.readiness(&self.state(space)?.vv) != Readiness::Ready {
                        break;
                    }
                    if let Ok(Some(group)) = crate::txn::group_of(&event) {
                        if self.release_group(txn, space, sid, merge, event, group, parked, out)? {
                            progress = true;
                            continue;
                        }
                        break;
                    }
                    self.tables.pending.delete(txn, &key)?;
                    let id = event.id();
                    if let Err(reason) = self.check_prev(txn, sid, &event)? {
                        if parked.contains(&id) {
                            return Err(StoreError::Rejected { id, reason });
                        }
                        tracing::warn!(space = %space, event = %id, "dropping parked event: {reason}");
                        break;
                    }
                    parked.remove(&id);
                    let hash = event.hash();
                    out.applied
                        .push(self.apply(txn, space, sid, event, hash, merge, false)?);
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
        event: Event,
        (first, n): (u64, u64),
        parked: &mut HashSet<EventId>,
        out: &mut IngestOutcome,
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
        let mut members = vec![event];
        for seq in first + 1..first + n {
            let Some(bytes) = self.tables.pending.get(txn, &id_key(sid, &origin, seq))? else {
                return Ok(false);
            };
            let e = decode_event(bytes, format_args!("pending event {origin}:{seq}"))?;
            let same_group = matches!(crate::txn::group_of(&e), Ok(Some(g)) if g == (first, n));
            if !same_group || e.readiness(&vv) != Readiness::Ready {
                return Ok(false);
            }
            vv.set(origin, seq);
            members.push(e);
        }
        // The chain: the first links to what is applied, each other to its predecessor.
        let mut broken = match self.check_prev(txn, sid, &members[0])? {
            Err(reason) => Some((members[0].id(), reason)),
            Ok(()) => None,
        };
        for pair in members.windows(2) {
            if broken.is_some() {
                break;
            }
            if let Err(reason) = sync::check_prev(&pair[1], &pair[0].hash()) {
                broken = Some((pair[1].id(), reason));
            }
        }
        if let Some((id, reason)) = broken {
            if members.iter().any(|m| parked.contains(&m.id())) {
                return Err(StoreError::Rejected { id, reason });
            }
            tracing::warn!(space = %space, event = %id, "dropping a parked transaction: {reason}");
            for m in &members {
                self.tables
                    .pending
                    .delete(txn, &id_key(sid, &m.origin, m.seq))?;
            }
            return Ok(false);
        }
        for e in members {
            self.tables
                .pending
                .delete(txn, &id_key(sid, &e.origin, e.seq))?;
            parked.remove(&e.id());
            let hash = e.hash();
            out.applied
                .push(self.apply(txn, space, sid, e, hash, merge, false)?);
        }
        Ok(true)
    }

    /// Whether `event.prev` is the hash of its origin's previous event, which must be
    /// applied (the event is ready). The outer `Result` is the store's, the inner one
    /// the event's.
    fn check_prev(
        &self,
        txn: &RwTxn,
        sid: SpaceId,
        event: &Event,
    ) -> Result<Result<(), EventError>, StoreError> {
        if event.prev.is_none() {
            return Ok(Ok(()));
        }
        let before = event.seq - 1;
        let entry = self
            .tables
            .id_entry(txn, sid, &event.origin, before)?
            .ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "applied event {}:{before} missing from by_id",
                    event.origin
                ))
            })?;
        Ok(sync::check_prev(event, &entry.hash))
    }

    /// Writes a ready, checked event to every table and advances the cache.
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
        hash: EventHash,
        merge: Option<&dyn Merge>,
        local: bool,
    ) -> Result<Applied, StoreError> {
        let t = self.tables;
        let lsn = self.state(space)?.last_lsn + 1;
        let key = frontier_key(sid, &event.key);
        if let Some(m) = merge {
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
            .put_with_flags(txn, flags, &event_key(sid, lsn), &event.encode())?;
        t.by_id.put(
            txn,
            &id_key(sid, &event.origin, event.seq),
            &IdEntry { lsn, hash }.to_bytes(),
        )?;
        let mut frontier = t.frontier(txn, sid, &event.key)?;
        let was_conflict = frontier.is_conflict();
        frontier.apply(&event);
        let conflict = frontier.is_conflict();
        t.frontier.put(txn, &key, &encode_frontier(&frontier))?;
        let flags: &[u8] = if conflict { &[HISTORY_CONFLICT] } else { &[] };
        t.by_key
            .put(txn, &history_key(sid, &event.key, lsn), flags)?;
        let mut conflicts = self.state(space)?.conflicts;
        if conflict != was_conflict {
            conflicts = if conflict {
                conflicts.saturating_add(1)
            } else {
                conflicts.saturating_sub(1)
            };
            t.space_meta.put(
                txn,
                &space_meta_key(sid, SPACE_CONFLICTS),
                &conflicts.to_be_bytes(),
            )?;
        }
        t.vv.put(
            txn,
            &origin_key(sid, &event.origin),
            &event.seq.to_be_bytes(),
        )?;

        if event.hlc.wall_ms() <= wall_ms().saturating_add(MAX_HLC_LEAD_MS) {
            self.hlc.observe(event.hlc);
        } else {
            tracing::debug!(event = %event.id(), hlc = %event.hlc, "not following an HLC reading far ahead of the wall clock");
        }
        let state = self.state_mut(space)?;
        state.vv.set(event.origin, event.seq);
        state.last_lsn = lsn;
        state.conflicts = conflicts;
        Ok(Applied {
            space: space.clone(),
            lsn,
            event,
            conflict,
        })
    }
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

/// A copy of an error that has to answer every command of a batch. Only the errors
/// `MapControl::grow` returns occur here; anything else keeps its message.
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
