//! The decisions of synchronisation, without I/O: what a puller lacks, which events a
//! pull page carries, whether a batch is authentic, when a parked event becomes ready —
//! and [`Replica`], a whole replica of one space in memory built on them.
//!
//! Ownership and data flow: a `Replica` owns its log (events in apply order, numbered
//! by lsn from 1), its version vector, the parked events ([`PendingSet`]) and every
//! key's frontier and merge state. It changes only through [`Replica::write`] (a local
//! event) and [`Replica::ingest`] (remote events); [`Replica::pull_page`] answers a
//! peer's pull. Nothing here reads a clock or touches a socket: the caller passes the
//! wall time in and carries the events, so a seeded simulation can drive several
//! replicas through drops, duplicates, reorders and partitions and check that they
//! converge (`tests/simulation.rs`).
//!
//! The store runs the same functions: `weft-store` authenticates batches with
//! [`verify_batch`], orders them with [`causal_order`], checks chain links with
//! [`check_prev`] and builds pull pages with [`missing`] and [`PageBuilder`], so what
//! the simulation proves of `Replica` holds for it: an event is applied only when
//! causally ready, each exactly once; early events wait and are released as soon as
//! their causes are applied; each origin's events must form a hash chain; a pull page
//! holds the events the puller lacks in this replica's apply order, which is causal.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};

use thiserror::Error;

use crate::clock::VersionVector;
use crate::error::EventError;
use crate::event::{check_write_fields, Event, EventHash, Op, Readiness, UnsignedEvent};
use crate::frontier::Frontier;
use crate::hlc::HlcClock;
use crate::id::{EventId, NodeId, SpaceName};
use crate::limits::MAX_UNSIGNED_RUN;
use crate::policy::{MergeError, Policy};
use crate::SigningKey;

/// Why the sync core refused a write or a batch, or could not read a key.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SyncError {
    /// A remote event is malformed, not signed by its origin, or breaks its origin's
    /// hash chain. Nothing of the batch was applied.
    #[error("event {id} rejected: {reason}")]
    Rejected {
        /// The first bad event.
        id: EventId,
        /// What is wrong with it.
        reason: EventError,
    },
    /// A local write breaks a limit or is malformed.
    #[error("invalid write: {0}")]
    InvalidWrite(EventError),
    /// The space's merge type refuses the value of a local write.
    #[error("the space's policy refuses this value: {0}")]
    Refused(MergeError),
    /// The merge type could not read a key's state.
    #[error("reading key {key:?}: {source}")]
    Read {
        /// The key.
        key: String,
        /// What the merge type reported.
        source: MergeError,
    },
}

/// For every origin where `mine` is ahead of `have`, the seqs the holder of `have`
/// lacks, as `(origin, first_missing, last)`: what a pull from `have` is owed.
pub fn missing(have: &VersionVector, mine: &VersionVector) -> Vec<(NodeId, u64, u64)> {
    mine.missing_from(have)
}

/// True when `theirs` has an event `mine` lacks: a pull from its holder would bring
/// something.
pub fn behind(mine: &VersionVector, theirs: &VersionVector) -> bool {
    theirs.iter().any(|(o, s)| s > mine.get(o))
}

/// Checks that every event of a batch is well-formed and was signed by its origin for
/// `space`; on failure names the first bad event in batch order.
///
/// Signatures are amortised over hash chains: an event whose authentic successor in the
/// batch (same origin, seq + 1) names its hash as `prev` is vouched for by that
/// successor's signature, because the hash covers every field including the
/// signature. A catch-up page of one origin's run of events costs one signature check.
pub fn verify_batch(space: &SpaceName, events: &[Event]) -> Result<(), (EventId, EventError)> {
    verify_chains(space, events, |e, _| e.hash())
}

/// [`verify_batch`] for a caller that already holds each event's hash (`hashes[i]` is
/// `events[i].hash()`), as a store does that hashed the canonical encodings it is
/// about to write: the chains are then checked without encoding any event again.
///
/// # Panics
/// If `hashes` and `events` differ in length: a caller's bug, not bad input.
pub fn verify_batch_hashed(
    space: &SpaceName,
    events: &[Event],
    hashes: &[EventHash],
) -> Result<(), (EventId, EventError)> {
    assert_eq!(events.len(), hashes.len(), "one hash per event");
    verify_chains(space, events, |_, i| hashes[i])
}

fn verify_chains(
    space: &SpaceName,
    events: &[Event],
    hash_of: impl Fn(&Event, usize) -> EventHash,
) -> Result<(), (EventId, EventError)> {
    let mut first_bad: Option<(usize, EventError)> = None;
    let mut note = |i: usize, reason: EventError| {
        if first_bad.as_ref().is_none_or(|(j, _)| i < *j) {
            first_bad = Some((i, reason));
        }
    };
    let mut by_origin: BTreeMap<NodeId, Vec<usize>> = BTreeMap::new();
    for (i, e) in events.iter().enumerate() {
        match e.validate() {
            Ok(()) => by_origin.entry(e.origin).or_default().push(i),
            Err(reason) => note(i, reason),
        }
    }
    for mut indexes in by_origin.into_values() {
        indexes.sort_by_key(|&i| std::cmp::Reverse(events[i].seq));
        // The lowest-seq event of this origin known to be authentic so far.
        let mut voucher: Option<&Event> = None;
        for i in indexes {
            let e = &events[i];
            let vouched = voucher
                .is_some_and(|v| v.seq == e.seq + 1 && v.prev.is_some_and(|p| p == hash_of(e, i)));
            if vouched {
                voucher = Some(e);
                continue;
            }
            match e.verify(space) {
                Ok(()) => voucher = Some(e),
                Err(reason) => {
                    note(i, reason);
                    voucher = None;
                }
            }
        }
    }
    match first_bad {
        Some((i, reason)) => Err((events[i].id(), reason)),
        None => Ok(()),
    }
}

/// Checks the hash-chain link of an event whose origin's previous event (seq - 1) is
/// known here with hash `previous`: its `prev` must name that hash. An origin's first
/// event (no `prev`) always passes.
pub fn check_prev(event: &Event, previous: &EventHash) -> Result<(), EventError> {
    match event.prev {
        Some(prev) if prev != *previous => Err(EventError::Malformed(format!(
            "prev does not match the hash of {}",
            EventId::new(event.origin, event.seq - 1)
        ))),
        _ => Ok(()),
    }
}

/// How a batch splits on a replica with a given version vector; see [`causal_order`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CausalOrder<T> {
    /// The events that can be applied, in the order to apply them: each is ready once
    /// the ones before it are applied.
    pub ready: Vec<T>,
    /// The events still waiting for causes the replica and the batch lack, in batch
    /// order.
    pub waiting: Vec<T>,
    /// Events the replica has, or that an earlier event of the batch repeats.
    pub duplicates: usize,
}

/// Orders a batch for a replica with `vv`: the events that become ready as the batch's
/// own events are applied, in apply order, and those left waiting.
///
/// Passes over the batch in its order, taking every ready event, until a pass takes
/// nothing (one pass for the usual causally ordered page). Applying `ready` in order
/// advances `vv` exactly as this function assumed, so the caller can apply them one by
/// one and stop at the first that fails a check of its own.
pub fn causal_order<T: Borrow<Event>>(
    vv: &VersionVector,
    batch: impl IntoIterator<Item = T>,
) -> CausalOrder<T> {
    let mut vv = vv.clone();
    let mut out = CausalOrder {
        ready: Vec::new(),
        waiting: batch.into_iter().collect(),
        duplicates: 0,
    };
    loop {
        let mut progress = false;
        let mut still = Vec::new();
        for item in std::mem::take(&mut out.waiting) {
            let e = item.borrow();
            match e.readiness(&vv) {
                Readiness::Duplicate => out.duplicates += 1,
                Readiness::Waiting => still.push(item),
                Readiness::Ready => {
                    vv.set(e.origin, e.seq);
                    out.ready.push(item);
                    progress = true;
                }
            }
        }
        out.waiting = still;
        if !progress || out.waiting.is_empty() {
            return out;
        }
    }
}

/// Events that arrived before their causes, waiting to become ready.
///
/// Keyed by origin, then seq, because only an origin's next seq (`vv[origin] + 1`) can
/// be ready: releasing is one lookup per origin, never a scan of everything parked.
#[derive(Clone, Debug, Default)]
pub struct PendingSet {
    by_origin: BTreeMap<NodeId, BTreeMap<u64, Event>>,
    len: usize,
}

impl PendingSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parks an event; false (and nothing changes) when one with its id is parked
    /// already — the first copy stays.
    pub fn insert(&mut self, event: Event) -> bool {
        let slot = self.by_origin.entry(event.origin).or_default();
        if slot.contains_key(&event.seq) {
            return false;
        }
        slot.insert(event.seq, event);
        self.len += 1;
        true
    }

    /// The parked event with this id.
    pub fn get(&self, id: &EventId) -> Option<&Event> {
        self.by_origin.get(&id.origin)?.get(&id.seq)
    }

    /// True when an event with this id is parked.
    pub fn contains(&self, id: &EventId) -> bool {
        self.get(id).is_some()
    }

    /// Unparks the event with this id.
    pub fn remove(&mut self, id: &EventId) -> Option<Event> {
        let slot = self.by_origin.get_mut(&id.origin)?;
        let e = slot.remove(&id.seq)?;
        if slot.is_empty() {
            self.by_origin.remove(&id.origin);
        }
        self.len -= 1;
        Some(e)
    }

    /// Takes out one event that is ready on a replica with `vv`, first by origin, and
    /// discards parked copies of events `vv` already has. Call it until `None`,
    /// applying each event (and so advancing `vv`) before the next call: that releases
    /// everything that became ready, in causal order.
    pub fn take_ready(&mut self, vv: &VersionVector) -> Option<Event> {
        let mut found = None;
        for (origin, slot) in self.by_origin.iter_mut() {
            let have = vv.get(origin);
            while slot.first_key_value().is_some_and(|(&s, _)| s <= have) {
                slot.pop_first();
                self.len -= 1;
            }
            let ready = slot
                .get(&(have + 1))
                .is_some_and(|e| e.readiness(vv) == Readiness::Ready);
            if ready {
                found = slot.remove(&(have + 1));
                self.len -= 1;
                break;
            }
        }
        self.by_origin.retain(|_, slot| !slot.is_empty());
        found
    }

    /// Number of parked events.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is parked.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The parked events, by origin and seq.
    pub fn iter(&self) -> impl Iterator<Item = &Event> {
        self.by_origin.values().flat_map(|slot| slot.values())
    }
}

/// What [`PageBuilder::offer`] did with an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// The puller lacks it and it fits: it is on the page.
    Taken,
    /// The puller has it already.
    Skipped,
    /// The page is full: stop scanning, the page is not `done`.
    Full,
}

/// Builds one pull page, fed with the responder's log in apply (lsn) order from the
/// lsn of the earliest event the puller lacks (see [`missing`]). That order is causal,
/// so the puller can apply the page as it comes.
///
/// A page holds at least one event, even one larger than `max_bytes`, so that pulling
/// always makes progress; the caller bounds event sizes separately.
#[derive(Debug)]
pub struct PageBuilder<'h> {
    have: &'h VersionVector,
    max_events: usize,
    max_bytes: usize,
    events: Vec<Event>,
    bytes: usize,
    /// Origins whose last event on the page is unsigned: the page may not end before
    /// each of them reaches a signed event, or the puller could not verify their run.
    open: Vec<NodeId>,
}

impl<'h> PageBuilder<'h> {
    /// A page for a puller that has `have`, of at most `max_events` events (at least 1)
    /// and about `max_bytes` of encoded events.
    ///
    /// Each origin's run on the page ends on a signed event (see [`Event::sig`]), so a
    /// page may overshoot both limits by up to [`MAX_UNSIGNED_RUN`] events, and at most
    /// twice `max_bytes`; past that, [`PageBuilder::finish`] drops unvouched tails.
    pub fn new(have: &'h VersionVector, max_events: usize, max_bytes: usize) -> Self {
        PageBuilder {
            have,
            max_events: max_events.max(1),
            max_bytes,
            events: Vec::new(),
            bytes: 0,
            open: Vec::new(),
        }
    }

    /// Offers the next event of the log, whose encoding is `encoded_len` bytes.
    pub fn offer(&mut self, event: &Event, encoded_len: usize) -> Offer {
        let offer = self.admit(event, encoded_len);
        if offer == Offer::Taken {
            self.events.push(event.clone());
        }
        offer
    }

    /// [`PageBuilder::offer`] for an event the caller owns (decoded from storage, say):
    /// a taken event is moved onto the page rather than cloned.
    pub fn push(&mut self, event: Event, encoded_len: usize) -> Offer {
        let offer = self.admit(&event, encoded_len);
        if offer == Offer::Taken {
            self.events.push(event);
        }
        offer
    }

    /// The decision of `offer`/`push`; on `Taken` counts the bytes, and the caller
    /// puts the event on the page.
    fn admit(&mut self, event: &Event, encoded_len: usize) -> Offer {
        if self.have.contains(&event.id()) {
            return Offer::Skipped;
        }
        let bytes = self.bytes.saturating_add(encoded_len);
        if !self.events.is_empty() {
            let full = self.events.len() >= self.max_events || bytes > self.max_bytes;
            let hard_full = self.events.len() >= self.max_events + MAX_UNSIGNED_RUN
                || bytes > self.max_bytes.saturating_mul(2);
            if (full && self.open.is_empty()) || hard_full {
                return Offer::Full;
            }
        }
        self.bytes = bytes;
        let at = self.open.iter().position(|o| *o == event.origin);
        match (event.sig.is_some(), at) {
            (true, Some(i)) => {
                self.open.swap_remove(i);
            }
            (false, None) => self.open.push(event.origin),
            _ => {}
        }
        Offer::Taken
    }

    /// The page, and whether it is the last (`done`: the scan reached the log's end).
    ///
    /// An origin whose run on the page still ends unsigned (the hard limit cut it, or
    /// its voucher is not applied here yet) loses that unsigned tail: the puller could
    /// not verify it, and gets it with its voucher from a later page or another peer.
    pub fn finish(self, done: bool) -> (Vec<Event>, bool) {
        let PageBuilder {
            mut events, open, ..
        } = self;
        if !open.is_empty() {
            let mut vouched: Vec<NodeId> = Vec::new();
            let mut keep = vec![true; events.len()];
            for (i, e) in events.iter().enumerate().rev() {
                if !open.contains(&e.origin) || vouched.contains(&e.origin) {
                    continue;
                }
                if e.sig.is_some() {
                    vouched.push(e.origin);
                } else {
                    keep[i] = false;
                }
            }
            let mut k = keep.into_iter();
            events.retain(|_| k.next().unwrap_or(true));
        }
        (events, done)
    }
}

/// What [`Replica::ingest`] did with a batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IngestOutcome {
    /// Events applied, in apply order, including parked events the batch released.
    pub applied: Vec<EventId>,
    /// Events already applied, already parked, or repeated within the batch.
    pub duplicates: usize,
    /// Events of this batch left parked, waiting for causes not yet here.
    pub parked: usize,
    /// Parked events dropped on release because their `prev` did not match their
    /// origin's previous event (a correct copy can still arrive later).
    pub dropped: usize,
}

/// What a key reads as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadValue {
    /// The value, CBOR: the payload the resolver chose, or the merged value.
    pub value: Vec<u8>,
    /// For a conflict the resolver leaves open, every concurrent value (ordered by
    /// `(hlc, origin)`); otherwise empty.
    pub siblings: Vec<Vec<u8>>,
}

#[derive(Clone, Debug)]
struct LogEntry {
    event: Event,
    hash: EventHash,
    /// Length of the canonical encoding, which pull pages are sized by.
    size: usize,
}

/// An event with its hash, computed once, for [`causal_order`].
struct Hashed(Event, EventHash);

impl Borrow<Event> for Hashed {
    fn borrow(&self) -> &Event {
        &self.0
    }
}

#[derive(Clone, Debug, Default)]
struct KeyState {
    frontier: Frontier,
    /// The merge state, for a space whose policy is a merge.
    merged: Option<Vec<u8>>,
}

/// One replica of one space, in memory: the store's rules without the disk. See the
/// module docs.
#[derive(Clone, Debug)]
pub struct Replica {
    space: SpaceName,
    policy: Policy,
    signing_key: SigningKey,
    id: NodeId,
    hlc: HlcClock,
    vv: VersionVector,
    /// Applied events; lsn `n` is at index `n - 1`.
    log: Vec<LogEntry>,
    lsn_by_id: HashMap<EventId, usize>,
    keys: BTreeMap<String, KeyState>,
    pending: PendingSet,
}

impl Replica {
    /// An empty replica of `space` deciding conflicts by `policy`, writing as the
    /// owner of `signing_key`.
    pub fn new(space: SpaceName, policy: Policy, signing_key: SigningKey) -> Self {
        Replica {
            space,
            policy,
            id: NodeId::of(&signing_key),
            signing_key,
            hlc: HlcClock::default(),
            vv: VersionVector::new(),
            log: Vec::new(),
            lsn_by_id: HashMap::new(),
            keys: BTreeMap::new(),
            pending: PendingSet::new(),
        }
    }

    /// This replica's node id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The space it replicates.
    pub fn space(&self) -> &SpaceName {
        &self.space
    }

    /// The space's conflict policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// What this replica has applied.
    pub fn version_vector(&self) -> &VersionVector {
        &self.vv
    }

    /// Number of events applied (the last lsn).
    pub fn len(&self) -> usize {
        self.log.len()
    }

    /// True when nothing is applied.
    pub fn is_empty(&self) -> bool {
        self.log.is_empty()
    }

    /// The events waiting for their causes.
    pub fn pending(&self) -> &PendingSet {
        &self.pending
    }

    /// The applied events in apply (lsn) order.
    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.log.iter().map(|entry| &entry.event)
    }

    /// The applied event with this id.
    pub fn event(&self, id: &EventId) -> Option<&Event> {
        let lsn = *self.lsn_by_id.get(id)?;
        self.log.get(lsn - 1).map(|entry| &entry.event)
    }

    /// Every key written, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Appends a local event, as the store's append does: `seq` is one past this
    /// node's entry in the version vector, the clock is the whole version vector with
    /// that seq, the hlc is ticked from `wall_ms`, `prev` chains to this node's
    /// previous event, and the event is signed and applied.
    pub fn write(
        &mut self,
        key: &str,
        op: Op,
        payload: Vec<u8>,
        wall_ms: u64,
    ) -> Result<Event, SyncError> {
        self.write_one(key, op, payload, wall_ms, true)
    }

    /// Appends several local events as one commit does: each is chained and applied
    /// like [`Replica::write`], but only the last is signed, vouching for the others
    /// through the hash chain. Stops at the first invalid write; the events before it
    /// stay applied and their run ends unsigned, as a crashed writer's would not (a
    /// store applies a commit whole), so callers pass valid writes.
    pub fn write_run(
        &mut self,
        writes: Vec<(String, Op, Vec<u8>)>,
        wall_ms: u64,
    ) -> Result<Vec<Event>, SyncError> {
        let n = writes.len();
        let mut out = Vec::with_capacity(n);
        for (i, (key, op, payload)) in writes.into_iter().enumerate() {
            out.push(self.write_one(&key, op, payload, wall_ms, i + 1 == n)?);
        }
        Ok(out)
    }

    fn write_one(
        &mut self,
        key: &str,
        op: Op,
        payload: Vec<u8>,
        wall_ms: u64,
        signed: bool,
    ) -> Result<Event, SyncError> {
        let meta = BTreeMap::new();
        check_write_fields(key, op, "", &payload, &meta).map_err(SyncError::InvalidWrite)?;
        if let Policy::Merge(m) = &self.policy {
            m.check(op, &payload).map_err(SyncError::Refused)?;
        }
        let seq = self.vv.get(&self.id) + 1;
        // None only for seq 1; were our own previous event ever missing, validate()
        // below refuses the write rather than breaking the chain.
        let prev = self.hash_of(&EventId::new(self.id, seq - 1));
        let mut clock = self.vv.as_clock().clone();
        clock.set(self.id, seq);
        let event = UnsignedEvent {
            origin: self.id,
            seq,
            clock,
            hlc: self.hlc.tick(wall_ms),
            key: key.to_owned(),
            op,
            kind: String::new(),
            payload,
            meta,
            prev,
        };
        let event = if signed {
            event.sign(&self.space, &self.signing_key)
        } else {
            event.seal_unsigned()
        };
        // Catches what the fields alone cannot: a clock over its entry limit.
        event.validate().map_err(SyncError::InvalidWrite)?;
        let hash = event.hash();
        self.apply(event.clone(), hash);
        Ok(event)
    }

    /// Takes in remote events, in any order, with any duplicates: drops what is
    /// already here, checks the rest (structure, signature, hash chain), applies what
    /// is ready, parks the rest, then releases parked events until none is ready.
    ///
    /// A bad event rejects the whole batch before anything is applied, as the store's
    /// ingest does; its sender should be treated as faulty.
    pub fn ingest(&mut self, events: Vec<Event>) -> Result<IngestOutcome, SyncError> {
        let mut out = IngestOutcome::default();
        // Duplicates first, so re-sent events cost no signature check.
        let mut fresh: Vec<Event> = Vec::with_capacity(events.len());
        let mut seen: HashMap<EventId, ()> = HashMap::new();
        for e in events {
            let id = e.id();
            if self.vv.contains(&id) || self.pending.contains(&id) || seen.insert(id, ()).is_some()
            {
                out.duplicates += 1;
            } else {
                fresh.push(e);
            }
        }
        verify_batch(&self.space, &fresh)
            .map_err(|(id, reason)| SyncError::Rejected { id, reason })?;
        let hashes: Vec<EventHash> = fresh.iter().map(Event::hash).collect();
        self.check_chains(&fresh, &hashes)?;

        // Apply what is ready, in the order the batch makes it ready. The batch was
        // de-duplicated, so `order.duplicates` is 0 in practice.
        let order = causal_order(
            &self.vv,
            fresh.into_iter().zip(hashes).map(|(e, h)| Hashed(e, h)),
        );
        out.duplicates += order.duplicates;
        for Hashed(e, hash) in order.ready {
            out.applied.push(e.id());
            self.apply(e, hash);
        }
        let parked: Vec<EventId> = order.waiting.iter().map(|Hashed(e, _)| e.id()).collect();
        for Hashed(e, _) in order.waiting {
            self.pending.insert(e);
        }

        while let Some(e) = self.pending.take_ready(&self.vv) {
            let hash = e.hash();
            if self.prev_matches(&e) {
                out.applied.push(e.id());
                self.apply(e, hash);
            } else {
                out.dropped += 1;
            }
        }
        out.parked = parked.iter().filter(|id| self.pending.contains(id)).count();
        Ok(out)
    }

    /// The events a puller that has `have` lacks, in this replica's apply order, up to
    /// `max_events` (at least one) and about `max_bytes`; `done` is true when nothing
    /// more is owed. The store's `pull_page`, over the in-memory log.
    pub fn pull_page(
        &self,
        have: &VersionVector,
        max_events: usize,
        max_bytes: usize,
    ) -> (Vec<Event>, bool) {
        let start = missing(have, &self.vv)
            .into_iter()
            .filter_map(|(origin, first, _)| self.lsn_by_id.get(&EventId::new(origin, first)))
            .min()
            .copied();
        let Some(start) = start else {
            return (Vec::new(), true);
        };
        let mut page = PageBuilder::new(have, max_events, max_bytes);
        for entry in self.log.iter().skip(start - 1) {
            if page.offer(&entry.event, entry.size) == Offer::Full {
                return page.finish(false);
            }
        }
        page.finish(true)
    }

    /// What `key` reads as: the space's resolver over the key's frontier, or its merge
    /// type's value. `None` when the key is absent (never written, or deleted).
    pub fn read(&self, key: &str) -> Result<Option<ReadValue>, SyncError> {
        let Some(state) = self.keys.get(key) else {
            return Ok(None);
        };
        match &self.policy {
            Policy::Resolve(resolver) => {
                let frontier: Vec<&Event> = state
                    .frontier
                    .ids()
                    .iter()
                    .filter_map(|id| self.event(id))
                    .collect();
                if frontier.is_empty() {
                    return Ok(None);
                }
                let r = resolver.resolve(&frontier);
                Ok(r.value.map(|winner| ReadValue {
                    value: winner.payload.clone(),
                    siblings: r.siblings.iter().map(|e| e.payload.clone()).collect(),
                }))
            }
            Policy::Merge(m) => {
                let Some(merged) = &state.merged else {
                    return Ok(None);
                };
                let value = m.read(merged).map_err(|source| SyncError::Read {
                    key: key.to_owned(),
                    source,
                })?;
                Ok(value.map(|value| ReadValue {
                    value,
                    siblings: Vec::new(),
                }))
            }
        }
    }

    /// A blake3 digest of the version vector and of what every key reads as. Two
    /// replicas with equal digests hold the same events and read the same values.
    pub fn state_digest(&self) -> [u8; 32] {
        fn field(h: &mut blake3::Hasher, bytes: &[u8]) {
            // Length-prefixed, so that field boundaries cannot shift between replicas.
            h.update(&(bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        }
        let mut h = blake3::Hasher::new();
        h.update(b"weft/state-digest/1");
        let mut vv = Vec::new();
        ciborium::into_writer(&self.vv, &mut vv)
            .unwrap_or_else(|e| unreachable!("CBOR encoding into a Vec failed: {e}"));
        field(&mut h, &vv);
        for key in self.keys.keys() {
            field(&mut h, key.as_bytes());
            match self.read(key) {
                Ok(None) => {
                    h.update(&[0]);
                }
                Ok(Some(r)) => {
                    h.update(&[1]);
                    field(&mut h, &r.value);
                    h.update(&(r.siblings.len() as u64).to_le_bytes());
                    for s in &r.siblings {
                        field(&mut h, s);
                    }
                }
                Err(e) => {
                    h.update(&[2]);
                    field(&mut h, e.to_string().as_bytes());
                }
            }
        }
        *h.finalize().as_bytes()
    }

    fn hash_of(&self, id: &EventId) -> Option<EventHash> {
        let lsn = *self.lsn_by_id.get(id)?;
        self.log.get(lsn - 1).map(|entry| entry.hash)
    }

    /// For a ready event: does `prev` name its origin's previous (applied) event?
    fn prev_matches(&self, e: &Event) -> bool {
        match e.prev {
            None => true,
            Some(_) => self
                .hash_of(&EventId::new(e.origin, e.seq - 1))
                .is_some_and(|h| check_prev(e, &h).is_ok()),
        }
    }

    /// Refuses a batch in which an event's `prev` contradicts a predecessor known here
    /// (applied, parked, or in the batch). An event whose predecessor is nowhere yet is
    /// checked when it is released.
    fn check_chains(&self, fresh: &[Event], hashes: &[EventHash]) -> Result<(), SyncError> {
        let in_batch: HashMap<EventId, EventHash> = fresh
            .iter()
            .map(Event::id)
            .zip(hashes.iter().copied())
            .collect();
        for e in fresh {
            if e.prev.is_none() {
                continue;
            }
            let before = EventId::new(e.origin, e.seq - 1);
            let known = self
                .hash_of(&before)
                .or_else(|| in_batch.get(&before).copied())
                .or_else(|| self.pending.get(&before).map(Event::hash));
            if let Some(h) = known {
                check_prev(e, &h).map_err(|reason| SyncError::Rejected { id: e.id(), reason })?;
            }
        }
        Ok(())
    }

    /// Applies a ready, checked event: log, version vector, hlc, frontier, merge state.
    fn apply(&mut self, event: Event, hash: EventHash) {
        let id = event.id();
        self.pending.remove(&id);
        self.vv.set(event.origin, event.seq);
        self.hlc.observe(event.hlc);
        let state = self.keys.entry(event.key.clone()).or_default();
        state.frontier.apply(&event);
        if let Policy::Merge(m) = &self.policy {
            // A merge that fails on this event fails the same way on every replica
            // (apply is deterministic), so keeping the state unchanged keeps them
            // converged; the event itself stays in the log.
            if let Ok(next) = m.apply(state.merged.as_deref(), &event) {
                state.merged = Some(next);
            }
        }
        let size = event.encode().len();
        self.log.push(LogEntry { event, hash, size });
        self.lsn_by_id.insert(id, self.log.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PolicyKind;

    fn replica(i: u8, kind: PolicyKind) -> Replica {
        Replica::new(
            SpaceName::default_space(),
            kind.policy(),
            SigningKey::from_bytes(&[i; 32]),
        )
    }

    fn int(i: i64) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(&i, &mut out).unwrap();
        out
    }

    #[test]
    fn write_chains_and_ingest_applies_in_any_order() {
        let mut a = replica(1, PolicyKind::Lww);
        let e1 = a.write("k", Op::Put, int(1), 100).unwrap();
        let e2 = a.write("k", Op::Put, int(2), 100).unwrap();
        assert_eq!(e2.prev, Some(e1.hash()));
        assert!(e2.hlc > e1.hlc);
        let mut b = replica(2, PolicyKind::Lww);
        let out = b.ingest(vec![e2.clone()]).unwrap();
        assert_eq!((out.applied.len(), out.parked), (0, 1));
        let out = b.ingest(vec![e1.clone(), e2.clone()]).unwrap();
        assert_eq!(out.applied, vec![e1.id(), e2.id()]);
        assert_eq!(out.duplicates, 1, "e2 was parked already");
        assert!(b.pending().is_empty());
        assert_eq!(b.read("k").unwrap().unwrap().value, int(2));
        assert_eq!(a.state_digest(), b.state_digest());
        let out = b.ingest(vec![e1, e2]).unwrap();
        assert_eq!(out.duplicates, 2);
    }

    #[test]
    fn forged_or_broken_chain_batches_are_rejected_whole() {
        let mut a = replica(1, PolicyKind::Lww);
        let e1 = a.write("k", Op::Put, int(1), 1).unwrap();
        let e2 = a.write("k", Op::Put, int(2), 2).unwrap();
        let mut forged = e2.clone();
        forged.payload = int(9);
        let mut b = replica(2, PolicyKind::Lww);
        let err = b.ingest(vec![e1.clone(), forged]).unwrap_err();
        assert!(matches!(err, SyncError::Rejected { .. }), "{err}");
        assert!(b.is_empty(), "nothing of a rejected batch is applied");

        // A validly signed event whose prev is wrong.
        let k = SigningKey::from_bytes(&[1; 32]);
        let bad = UnsignedEvent {
            origin: e2.origin,
            seq: 2,
            clock: e2.clock.clone(),
            hlc: e2.hlc,
            key: "k".into(),
            op: Op::Put,
            kind: String::new(),
            payload: int(3),
            meta: BTreeMap::new(),
            prev: Some(EventHash([0; 32])),
        }
        .sign(&SpaceName::default_space(), &k);
        assert!(b.ingest(vec![e1.clone(), bad.clone()]).is_err());
        // Parked first, then its predecessor arrives: dropped on release.
        let mut c = replica(3, PolicyKind::Lww);
        c.ingest(vec![bad]).unwrap();
        let out = c.ingest(vec![e1]).unwrap();
        assert_eq!((out.applied.len(), out.dropped), (1, 1));
        let out = c.ingest(vec![e2]).unwrap();
        assert_eq!(out.applied.len(), 1, "the correct copy still applies");
    }

    #[test]
    fn unsigned_events_count_only_when_a_later_signed_event_vouches_for_them() {
        let mut a = replica(1, PolicyKind::Lww);
        let run: Vec<_> = (0..4).map(|i| (format!("k{i}"), Op::Put, int(i))).collect();
        let events = a.write_run(run, 5).unwrap();
        assert!(events[..3].iter().all(|e| e.sig.is_none()));
        assert!(events[3].sig.is_some());
        let space = SpaceName::default_space();
        assert!(matches!(
            events[0].verify(&space),
            Err(EventError::Unsigned(_))
        ));
        verify_batch(&space, &events).unwrap();
        // Without its voucher the run proves nothing.
        let (id, err) = verify_batch(&space, &events[..3]).unwrap_err();
        assert_eq!(id, events[0].id());
        assert!(matches!(err, EventError::Unsigned(_)), "{err}");
        // A tampered unsigned event breaks the chain to the voucher.
        let mut tampered = events.clone();
        tampered[1].payload = int(99);
        assert!(verify_batch(&space, &tampered).is_err());
        // Encoding keeps the missing signature missing.
        let back = Event::decode(&events[0].encode()).unwrap();
        assert_eq!(back, events[0]);
        let mut b = replica(2, PolicyKind::Lww);
        assert_eq!(b.ingest(events).unwrap().applied.len(), 4);
        assert_eq!(a.state_digest(), b.state_digest());
    }

    #[test]
    fn pages_end_each_origin_run_on_a_signed_event() {
        let mut a = replica(1, PolicyKind::Lww);
        let mut b = replica(2, PolicyKind::Lww);
        let mut log = Vec::new();
        for round in 0..3 {
            let run: Vec<_> = (0..5)
                .map(|i| (format!("a{round}{i}"), Op::Put, int(i)))
                .collect();
            log.extend(a.write_run(run, 5).unwrap());
            log.push(b.write("b", Op::Put, int(round), 5).unwrap());
        }
        let have = VersionVector::new();
        // Limit 2 would cut a's first run after two unsigned events; the page runs on
        // to the run's signed end, taking b's event between if any.
        let mut page = PageBuilder::new(&have, 2, usize::MAX);
        let mut taken = 0;
        for e in &log {
            if page.offer(e, 100) == Offer::Full {
                break;
            }
            taken += 1;
        }
        let (events, _) = page.finish(false);
        assert_eq!(taken, 5);
        assert_eq!(events.len(), 5);
        assert!(events.last().unwrap().sig.is_some());
        verify_batch(&SpaceName::default_space(), &events).unwrap();

        // A log that ends unsigned (voucher not here yet) loses only that tail.
        let mut page = PageBuilder::new(&have, 100, usize::MAX);
        for e in &log[..9] {
            page.offer(e, 100);
        }
        let (events, _) = page.finish(true);
        assert_eq!(
            events.len(),
            6,
            "the unvouched start of a's second run is left out"
        );
        verify_batch(&SpaceName::default_space(), &events).unwrap();
    }

    #[test]
    fn pull_pages_cover_the_gap_in_causal_order() {
        let mut a = replica(1, PolicyKind::Multi);
        let mut b = replica(2, PolicyKind::Multi);
        for i in 0..5 {
            let e = a
                .write(&format!("k{}", i % 2), Op::Put, int(i), 10)
                .unwrap();
            if i < 2 {
                b.ingest(vec![e]).unwrap();
            }
        }
        b.write("k0", Op::Put, int(100), 5).unwrap();
        let mut c = replica(3, PolicyKind::Multi);
        for source in [&a, &b] {
            loop {
                let (page, done) = source.pull_page(c.version_vector(), 2, usize::MAX);
                assert!(page.len() <= 2);
                let out = c.ingest(page).unwrap();
                assert_eq!(out.parked, 0, "pages are causally ordered");
                if done {
                    break;
                }
            }
        }
        assert_eq!(c.version_vector().total(), 6);
        let (page, done) = a.pull_page(a.version_vector(), 10, 10);
        assert!(page.is_empty() && done);
        // A byte budget smaller than one event still yields one event per page.
        let (page, done) = a.pull_page(&VersionVector::new(), 10, 1);
        assert_eq!((page.len(), done), (1, false));
        let r = c.read("k0").unwrap().unwrap();
        assert_eq!(r.siblings.len(), 2, "a's k0 and b's k0 are concurrent");
    }

    #[test]
    fn local_writes_are_checked_by_the_policy() {
        let mut a = replica(1, PolicyKind::Counter);
        assert!(matches!(
            a.write("n", Op::Put, b"\x61x".to_vec(), 1),
            Err(SyncError::Refused(_))
        ));
        assert!(matches!(
            a.write("", Op::Put, int(1), 1),
            Err(SyncError::InvalidWrite(_))
        ));
        a.write("n", Op::Put, int(2), 1).unwrap();
        a.write("n", Op::Put, int(3), 1).unwrap();
        assert_eq!(a.read("n").unwrap().unwrap().value, int(5));
        a.write("n", Op::Delete, vec![], 1).unwrap();
        assert_eq!(a.read("n").unwrap(), None);
    }

    #[test]
    fn causal_order_applies_what_the_batch_makes_ready() {
        let mut a = replica(1, PolicyKind::Lww);
        let e: Vec<Event> = (0..3)
            .map(|i| a.write("k", Op::Put, int(i), 1).unwrap())
            .collect();
        let mut b = replica(2, PolicyKind::Lww);
        let f = b.write("j", Op::Put, int(0), 1).unwrap();
        // Reversed, with a duplicate and an event whose cause (f) is not in the batch.
        let mut vv = VersionVector::new();
        let mut g = b.clone();
        g.ingest(vec![e[0].clone()]).unwrap();
        let h = g.write("j", Op::Put, int(1), 1).unwrap();
        let batch = vec![
            e[2].clone(),
            h.clone(),
            e[1].clone(),
            e[0].clone(),
            e[0].clone(),
        ];
        let order = causal_order(&vv, &batch);
        let ids = |v: &[&Event]| v.iter().map(|e| e.id()).collect::<Vec<_>>();
        assert_eq!(ids(&order.ready), vec![e[0].id(), e[1].id(), e[2].id()]);
        assert_eq!(ids(&order.waiting), vec![h.id()]);
        assert_eq!(order.duplicates, 1);
        vv.set(a.id(), 1);
        vv.set(b.id(), f.seq);
        let order = causal_order(&vv, &batch[..2]);
        assert_eq!(ids(&order.ready), vec![h.id()], "h needs e[0] and f");
        assert_eq!(ids(&order.waiting), vec![e[2].id()]);
    }

    #[test]
    fn check_prev_compares_the_link_with_the_predecessor() {
        let mut a = replica(1, PolicyKind::Lww);
        let e1 = a.write("k", Op::Put, int(1), 1).unwrap();
        let e2 = a.write("k", Op::Put, int(2), 1).unwrap();
        assert!(
            check_prev(&e1, &EventHash([0; 32])).is_ok(),
            "seq 1 has no link"
        );
        assert!(check_prev(&e2, &e1.hash()).is_ok());
        let err = check_prev(&e2, &EventHash([0; 32])).unwrap_err();
        assert!(err.to_string().contains(&e1.id().to_string()), "{err}");
    }

    #[test]
    fn push_and_offer_build_the_same_page() {
        let mut a = replica(1, PolicyKind::Lww);
        let events: Vec<Event> = (0..4)
            .map(|i| a.write("k", Op::Put, int(i), 1).unwrap())
            .collect();
        let mut have = VersionVector::new();
        have.set(a.id(), 1);
        let mut by_ref = PageBuilder::new(&have, 2, usize::MAX);
        let mut owned = PageBuilder::new(&have, 2, usize::MAX);
        for e in &events {
            let len = e.encode().len();
            assert_eq!(by_ref.offer(e, len), owned.push(e.clone(), len));
        }
        let (p, done) = owned.finish(false);
        assert_eq!(by_ref.finish(false), (p.clone(), done));
        assert_eq!(p, events[1..3].to_vec());
    }

    #[test]
    fn pending_set_releases_in_causal_order() {
        let mut a = replica(1, PolicyKind::Lww);
        let events: Vec<Event> = (0..4)
            .map(|i| a.write("k", Op::Put, int(i), 1).unwrap())
            .collect();
        let mut p = PendingSet::new();
        for e in events.iter().rev() {
            assert!(p.insert(e.clone()));
        }
        assert!(!p.insert(events[0].clone()));
        let mut vv = VersionVector::new();
        vv.set(a.id(), 1); // events[0] is applied already: its copy is discarded
        let mut released = Vec::new();
        while let Some(e) = p.take_ready(&vv) {
            vv.set(e.origin, e.seq);
            released.push(e.seq);
        }
        assert_eq!(released, vec![2, 3, 4]);
        assert!(p.is_empty());
        assert_eq!(p.len(), 0);
        assert!(behind(&VersionVector::new(), &vv));
        assert!(!behind(&vv, &VersionVector::new()));
    }
}
