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
//! Shutdown: when the last `Store` handle drops, the channel closes, the thread
//! finishes its batch and exits; `Store`'s drop joins it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use heed::{Env, PutFlags, RwTxn, WithoutTls};
use tokio::sync::{broadcast, mpsc, oneshot};
use weft_crdt::{
    Event, EventError, EventHash, EventId, Hlc, HlcClock, NodeId, Readiness, SigningKey, SpaceName,
    UnsignedEvent, VersionVector,
};

use crate::tables::{
    decode_event, encode_frontier, event_key, frontier_key, history_key, id_key, origin_key,
    IdEntry, SpaceId, Tables, META_HLC,
};
use crate::{Applied, IngestOutcome, StoreError, Write};

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
}

/// The writer's cached view of one space; always equal to what its committed (or
/// current batch's) tables say.
#[derive(Clone, Debug)]
struct SpaceState {
    sid: SpaceId,
    vv: VersionVector,
    last_lsn: u64,
}

/// What a command produced, held until the batch commits.
enum Done {
    Append(Box<Applied>),
    Ingest(IngestOutcome),
}

pub(crate) struct Writer {
    env: Env<WithoutTls>,
    tables: Tables,
    signing_key: SigningKey,
    node_id: NodeId,
    hlc: HlcClock,
    spaces: HashMap<SpaceName, SpaceState>,
    /// Highest space id in use: its events are the last keys of the `events` table,
    /// so they can be written with `PutFlags::APPEND`.
    max_sid: SpaceId,
    max_batch: usize,
    applied_tx: broadcast::Sender<Arc<Applied>>,
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
        let mut w = Writer {
            env,
            tables,
            signing_key,
            node_id,
            hlc: HlcClock::starting_after(hlc_last),
            spaces: HashMap::new(),
            max_sid: 0,
            max_batch: max_batch.max(1),
            applied_tx,
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
            };
            max_sid = max_sid.max(sid);
            spaces.insert(name, state);
        }
        self.spaces = spaces;
        self.max_sid = max_sid;
        Ok(())
    }

    /// Runs until every sender is dropped.
    pub fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        while let Some(first) = commands.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < self.max_batch {
                match commands.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            self.run_batch(batch);
        }
        tracing::debug!("store writer: all handles dropped, exiting");
    }

    pub(crate) fn run_batch(&mut self, batch: Vec<Command>) {
        let env = self.env.clone();
        let mut txn = match env.write_txn() {
            Ok(t) => t,
            Err(e) => {
                let e = Arc::new(e);
                for cmd in batch {
                    reply_err(cmd, StoreError::Lmdb(e.clone()));
                }
                return;
            }
        };

        let mut results = Vec::with_capacity(batch.len());
        for cmd in batch {
            let result = self.run_isolated(&env, &mut txn, &cmd);
            results.push((cmd, result));
        }

        if results.iter().all(|(_, r)| r.is_err()) {
            txn.abort();
            for (cmd, r) in results {
                if let Err(e) = r {
                    reply_err(cmd, e);
                }
            }
            return;
        }

        let committed = self
            .tables
            .meta
            .put(&mut txn, META_HLC, &self.hlc.last().0.to_be_bytes())
            .and_then(|()| txn.commit());
        if let Err(e) = committed {
            tracing::error!("store writer: commit failed: {e}");
            let e = Arc::new(e);
            for (cmd, _) in results {
                reply_err(cmd, StoreError::Lmdb(e.clone()));
            }
            if let Err(e) = self.reload() {
                tracing::error!("store writer: reloading state after a failed commit: {e}");
            }
            return;
        }

        for (_, r) in &results {
            match r {
                Ok(Done::Append(a)) => self.broadcast(a),
                Ok(Done::Ingest(o)) => o.applied.iter().for_each(|a| self.broadcast(a)),
                Err(_) => {}
            }
        }
        for (cmd, r) in results {
            // A caller that stopped waiting (dropped its future) is not an error: the
            // data is committed either way.
            match (cmd, r) {
                (Command::Append { reply, .. }, Ok(Done::Append(a))) => {
                    let _ = reply.send(Ok(*a));
                }
                (Command::Ingest { reply, .. }, Ok(Done::Ingest(o))) => {
                    let _ = reply.send(Ok(o));
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
        let space = match cmd {
            Command::Append { space, .. } | Command::Ingest { space, .. } => space,
        };
        let saved_space = self.spaces.get(space).cloned();
        let saved_max_sid = self.max_sid;
        let mut txn = env.nested_write_txn(parent)?;
        let result = match cmd {
            Command::Append { space, write, .. } => self
                .append(&mut txn, space, write)
                .map(|a| Done::Append(Box::new(a))),
            Command::Ingest { space, events, .. } => {
                self.ingest(&mut txn, space, events).map(Done::Ingest)
            }
        };
        let result = result.and_then(|done| txn.commit().map(|()| done).map_err(Into::into));
        if result.is_err() {
            // The nested txn was dropped uncommitted, which aborts it: its writes are
            // gone from the batch. Only the cache needs putting back.
            match saved_space {
                Some(s) => self.spaces.insert(space.clone(), s),
                None => self.spaces.remove(space),
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

    fn append(
        &mut self,
        txn: &mut RwTxn,
        space: &SpaceName,
        write: &Write,
    ) -> Result<Applied, StoreError> {
        let sid = self.ensure_space(txn, space)?;
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
            meta: write.meta.clone(),
            prev,
        }
        .sign(space, &self.signing_key);
        // Catches what the caller's fields alone cannot: a clock over its entry limit.
        event.validate().map_err(StoreError::Invalid)?;
        let hash = event.hash();
        self.apply(txn, space, sid, event, hash)
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

        // Apply what is ready, in as many passes as the batch's own order needs
        // (one pass for the usual causally ordered page).
        let mut waiting: Vec<&Event> = events.iter().collect();
        loop {
            let mut progress = false;
            let mut still = Vec::new();
            for e in waiting {
                match e.readiness(&self.state(space)?.vv) {
                    Readiness::Duplicate => out.duplicates += 1,
                    Readiness::Waiting => still.push(e),
                    Readiness::Ready => {
                        let hash = e.hash();
                        if let Err(reason) = self.check_prev(txn, sid, e)? {
                            return Err(StoreError::Rejected { id: e.id(), reason });
                        }
                        // A copy may have been parked by an earlier call.
                        self.tables
                            .pending
                            .delete(txn, &id_key(sid, &e.origin, e.seq))?;
                        out.applied
                            .push(self.apply(txn, space, sid, e.clone(), hash)?);
                        progress = true;
                    }
                }
            }
            waiting = still;
            if !progress || waiting.is_empty() {
                break;
            }
        }

        let mut parked = HashSet::new();
        for e in waiting {
            let key = id_key(sid, &e.origin, e.seq);
            if self.tables.pending.get(txn, &key)?.is_some() || !parked.insert(e.id()) {
                out.duplicates += 1;
                continue;
            }
            self.tables.pending.put(txn, &key, &e.encode())?;
        }

        if !out.applied.is_empty() {
            self.release_pending(txn, space, sid, &mut parked, &mut out)?;
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
                    out.applied.push(self.apply(txn, space, sid, event, hash)?);
                    progress = true;
                }
            }
            if !progress {
                return Ok(());
            }
        }
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
        let Some(prev) = event.prev else {
            return Ok(Ok(()));
        };
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
        if entry.hash == prev {
            Ok(Ok(()))
        } else {
            Ok(Err(EventError::Malformed(format!(
                "prev does not match the hash of {}:{before}",
                event.origin
            ))))
        }
    }

    /// Writes a ready, checked event to every table and advances the cache.
    fn apply(
        &mut self,
        txn: &mut RwTxn,
        space: &SpaceName,
        sid: SpaceId,
        event: Event,
        hash: EventHash,
    ) -> Result<Applied, StoreError> {
        let t = self.tables;
        let lsn = self.state(space)?.last_lsn + 1;
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
        t.by_key.put(txn, &history_key(sid, &event.key, lsn), &[])?;
        let mut frontier = t.frontier(txn, sid, &event.key)?;
        frontier.apply(&event);
        t.frontier.put(
            txn,
            &frontier_key(sid, &event.key),
            &encode_frontier(&frontier),
        )?;
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
        let state = self.spaces.get_mut(space).ok_or_else(|| {
            StoreError::Corrupt(format!("space {space} missing from the writer's cache"))
        })?;
        state.vv.set(event.origin, event.seq);
        state.last_lsn = lsn;
        Ok(Applied {
            space: space.clone(),
            lsn,
            event,
        })
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
    }
}
