//! The offline invariant checker: [`check`] reads a data directory and reports every
//! way its tables disagree with each other or with the rules of the log, without
//! changing anything.
//!
//! It scans each space's log once, in lsn order, keeping per origin only the highest
//! seq seen and per key its recomputed frontier (and merge state), and checks every
//! index against that scan: the memory it needs grows with the number of origins and
//! keys, not with the length of the log. Every signed event's signature is verified,
//! one by one, and every unsigned event must be linked by hashes recomputed from the
//! stored bytes to a later signed event of its origin: the checker trusts nothing it
//! reads.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use heed::{EnvFlags, EnvOpenOptions, RoTxn};
use weft_crdt::{
    Event, EventHash, EventId, Frontier, Merge, NodeId, Policy, PolicyKind, SpaceName,
    VersionVector,
};

use crate::tables::{
    self, be_u64, id_key, IdEntry, SpaceId, Tables, FORMAT_VERSION, MAX_DBS, META_FORMAT,
    META_NODE_ID,
};
use crate::{journal, StoreError};

/// Violations reported per space before the rest are only counted: a directory
/// damaged throughout should give a readable report, not millions of lines.
const MAX_VIOLATIONS: usize = 1000;

/// What [`check`] found.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    /// One entry per space, in the order of their names.
    pub spaces: Vec<SpaceCheck>,
    /// Problems of the directory as a whole (layout version, node id).
    pub violations: Vec<String>,
}

impl CheckReport {
    /// True when no invariant is violated anywhere. Skipped checks do not count.
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty() && self.spaces.iter().all(|s| s.violations.is_empty())
    }
}

/// What [`check`] found in one space.
#[derive(Clone, Debug, Default)]
pub struct SpaceCheck {
    /// The space's name.
    pub space: String,
    /// Events in its log.
    pub events: u64,
    /// Every violated invariant, one sentence each, naming the event, key or origin.
    pub violations: Vec<String>,
    /// Checks that could not be made, and why (e.g. the merge state of a space whose
    /// merge is not built in cannot be recomputed offline).
    pub skipped: Vec<String>,
}

impl SpaceCheck {
    fn violation(&mut self, v: String) {
        if self.violations.len() < MAX_VIOLATIONS {
            self.violations.push(v);
        } else if self.violations.len() == MAX_VIOLATIONS {
            self.violations.push(format!(
                "more than {MAX_VIOLATIONS} violations; the rest are not listed"
            ));
        }
    }
}

/// Checks every invariant of the store in `dir`, offline, without modifying it.
///
/// The directory must not be open in this process (that fails with
/// [`StoreError::AlreadyOpen`]); a node in another process may run, as LMDB readers
/// see a consistent snapshot. Checked per space: every event decodes and validates;
/// every signed event carries its origin's signature, and every unsigned one is
/// vouched for by a later signed event of its origin whose `prev` hashes link down to
/// it — in the log, or, for the unsigned tail of an origin's chain, waiting in the
/// pending set (an origin's chain head in the log is otherwise signed); every
/// transaction group (events tagged `weft.txn = "<first>/<count>"`) is in the log
/// whole or not at all; lsns are contiguous; `by_id` and `by_key` index exactly the
/// log's events (right lsn and hash, nothing dangling); the version vector holds, per
/// origin, the highest seq in the log and every seq below it is present exactly once;
/// each event's `prev` is the stored hash of its origin's previous event; each event's
/// causes were applied at lower lsns; the frontier `by_key` records after every event,
/// and the conflict count, match the frontiers recomputed from the log; merge states
/// match a recomputation (for built-in merges; others are reported skipped); parked
/// events are not applied yet, decode, and are signed or vouched for by a later parked
/// event of their origin.
///
/// Errors are reserved for failing to read at all; every damage found is a violation
/// in the report.
pub fn check(dir: &Path) -> Result<CheckReport, StoreError> {
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.max_dbs(MAX_DBS);
    // No map size: LMDB maps the size recorded in the file. Read-only: the checker can
    // never change what it checks.
    // SAFETY: READ_ONLY is not one of the unsafe flags; opening is unsafe only because
    // of the memory map, and nothing in this process writes the file while we read.
    unsafe { options.flags(EnvFlags::READ_ONLY) };
    let env = match unsafe { options.open(dir) } {
        Ok(env) => env,
        Err(heed::Error::EnvAlreadyOpened) => {
            return Err(StoreError::AlreadyOpen(dir.to_path_buf()))
        }
        Err(e) => return Err(e.into()),
    };
    let tables = Tables::open_existing(&env)?;
    let txn = env.read_txn()?;
    let mut report = CheckReport::default();
    match tables.meta.get(&txn, META_FORMAT)? {
        Some(b) if b == FORMAT_VERSION.to_be_bytes() => {}
        Some(b) => report.violations.push(format!(
            "layout version is {b:?}, expected {FORMAT_VERSION}"
        )),
        None => report.violations.push("layout version is missing".into()),
    }
    match tables.meta.get(&txn, META_NODE_ID)? {
        Some(b) if b.len() == 32 => {}
        _ => report
            .violations
            .push("node id is missing or not 32 bytes".into()),
    }
    for (name, sid) in tables.all_spaces(&txn)? {
        report.spaces.push(check_space(&tables, &txn, name, sid)?);
    }
    check_journal(dir, &tables, &txn, &mut report)?;
    Ok(report)
}

/// Full mode: the journal must be an unbroken chain up to the position the store
/// recorded, and must hold every event the store holds (applied or parked), since a
/// rebuild after a machine crash starts from it alone. (The other way round is not
/// required: a parked event may be dropped later, and records past the position, from
/// a batch that never committed, are cut at the next open.)
fn check_journal(
    dir: &Path,
    t: &Tables,
    txn: &RoTxn,
    report: &mut CheckReport,
) -> Result<(), StoreError> {
    // No position: relaxed mode (or a run killed while writing the journal, which the
    // next full-mode open writes again from the store).
    let Some(recorded) = t.meta.get(txn, tables::META_JOURNAL)? else {
        return Ok(());
    };
    let path = dir.join(journal::JOURNAL_FILE);
    let mut v = |m: String| report.violations.push(format!("journal: {m}"));
    let pos = match journal::Position::from_bytes(recorded) {
        Ok(p) => p,
        Err(e) => {
            v(e.to_string());
            return Ok(());
        }
    };
    let mut scan = match journal::Scan::open(&path) {
        Ok(Some(scan)) => scan,
        Ok(None) => {
            v(format!("{} is missing", path.display()));
            return Ok(());
        }
        Err(e) => {
            v(e.to_string());
            return Ok(());
        }
    };
    let mut journaled: HashSet<(String, NodeId, u64, EventHash)> = HashSet::new();
    while scan.at().seq < pos.seq {
        let payload = match scan.next() {
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                v(format!("reading record {}: {e}", scan.at().seq + 1));
                break;
            }
            None => break,
        };
        let ops = match journal::ops(&payload) {
            Ok(ops) => ops,
            Err(e) => {
                v(format!("record {}: {e}", scan.at().seq));
                continue;
            }
        };
        for op in ops {
            if let journal::Op::Events { space, events } = op {
                for bytes in events {
                    match Event::decode(bytes) {
                        Ok(e) => {
                            journaled.insert((
                                space.to_owned(),
                                e.origin,
                                e.seq,
                                tables::hash_of_encoding(bytes),
                            ));
                        }
                        Err(e) => v(format!(
                            "record {}: an event does not decode: {e}",
                            scan.at().seq
                        )),
                    }
                }
            }
        }
    }
    if scan.at() != pos {
        v(format!(
            "the valid chain ends at record {} (offset {}), but the store is at record {} (offset {})",
            scan.at().seq,
            scan.at().end,
            pos.seq,
            pos.end
        ));
    }
    for (name, sid) in t.all_spaces(txn)? {
        let log = t.events_from(txn, sid, 1)?.map(|e| e.map(|(_, b)| b));
        let parked = t
            .pending
            .prefix_iter(txn, &sid.to_be_bytes())?
            .map(|e| e.map(|(_, b)| b).map_err(StoreError::from));
        let mut missing = Vec::new();
        let mut count = 0u64;
        for bytes in log.chain(parked) {
            let bytes = bytes?;
            let Ok(e) = Event::decode(bytes) else {
                // Reported by the space's own checks.
                continue;
            };
            let id = (
                name.clone(),
                e.origin,
                e.seq,
                tables::hash_of_encoding(bytes),
            );
            if !journaled.contains(&id) {
                count += 1;
                if missing.len() < 3 {
                    missing.push(e.id().to_string());
                }
            }
        }
        if count > 0 {
            v(format!(
                "{count} events of space {name} are not in it (a rebuild would lose them), e.g. {}",
                missing.join(", ")
            ));
        }
    }
    Ok(())
}

/// Turns a decoding failure of a table helper into a violation (and `fallback`);
/// LMDB failures stay errors.
fn soft<T>(r: Result<T, StoreError>, out: &mut SpaceCheck, fallback: T) -> Result<T, StoreError> {
    match r {
        Ok(v) => Ok(v),
        Err(StoreError::Corrupt(m)) => {
            out.violation(m);
            Ok(fallback)
        }
        Err(e) => Err(e),
    }
}

/// What the forward scan knows of one origin's chain in the log.
#[derive(Default)]
struct Chain {
    /// Highest seq seen and the hash recomputed from that event's stored bytes.
    last: Option<(u64, EventHash)>,
    /// The seqs of the unsigned events since the last signed one that verified: they
    /// are authentic only once a later signed event is linked to them.
    unvouched: Option<(u64, u64)>,
    /// The transaction group the last event belongs to, while it is incomplete:
    /// `(first, count)`.
    open_group: Option<(u64, u64)>,
}

fn check_space(
    t: &Tables,
    txn: &RoTxn,
    name: String,
    sid: SpaceId,
) -> Result<SpaceCheck, StoreError> {
    let mut out = SpaceCheck {
        space: name.clone(),
        ..SpaceCheck::default()
    };
    let space = match SpaceName::new(name.clone()) {
        Ok(s) => Some(s),
        Err(e) => {
            out.violation(format!(
                "space name {name:?} is invalid ({e}); signatures not checked"
            ));
            None
        }
    };
    let merge = recomputable_merge(t, txn, sid, &mut out)?;
    let merge_space = soft(t.stored_policy(txn, sid), &mut out, None)?.is_some_and(|p| p.merge);

    // The forward scan, in lsn order.
    let mut applied = VersionVector::new();
    let mut chains: HashMap<NodeId, Chain> = HashMap::new();
    let mut frontiers: BTreeMap<String, Frontier> = BTreeMap::new();
    let mut states: HashMap<String, Vec<u8>> = HashMap::new();
    let mut expected_lsn = 1;
    let mut by_key_found = 0u64;
    for entry in t.events_from(txn, sid, 1)? {
        let (lsn, bytes) = entry?;
        out.events += 1;
        if lsn != expected_lsn {
            out.violation(format!(
                "lsn {lsn} follows lsn {}: lsns have a gap",
                expected_lsn - 1
            ));
        }
        expected_lsn = lsn + 1;
        let event = match tables::decode_event(bytes, format_args!("event at lsn {lsn}")) {
            Ok(e) => e,
            Err(e) => {
                out.violation(format!("{e} (events table)"));
                continue;
            }
        };
        let id = event.id();
        let at = format!("event {id} at lsn {lsn}");
        let hash = tables::hash_of_encoding(bytes);
        let chain = chains.entry(event.origin).or_default();
        follow_chain(chain, &event, hash, space.as_ref(), &at, &mut out);
        follow_group(chain, &event, &at, &mut out);
        match t.by_id.get(txn, &id_key(sid, &event.origin, event.seq))? {
            None => out.violation(format!("{at}: missing from by_id")),
            Some(b) => match IdEntry::from_bytes(b) {
                Err(e) => out.violation(format!("{at}: by_id entry: {e}")),
                Ok(e) if e.lsn != lsn => {
                    out.violation(format!("{at}: by_id points it at lsn {}", e.lsn))
                }
                Ok(e) if e.hash != hash => out.violation(format!(
                    "{at}: by_id records another hash than the stored event's"
                )),
                Ok(_) => {}
            },
        }
        let before = applied.get(&event.origin);
        if event.seq != before + 1 {
            out.violation(format!(
                "{at}: applied after seq {before} of its origin (missing or repeated seqs)"
            ));
        }
        if event.seq > 1 {
            match t
                .by_id
                .get(txn, &id_key(sid, &event.origin, event.seq - 1))?
            {
                Some(b) => match IdEntry::from_bytes(b) {
                    Ok(p) if Some(p.hash) == event.prev && p.lsn < lsn => {}
                    Ok(p) if p.lsn >= lsn => out.violation(format!(
                        "{at}: its origin's previous event is at a later lsn {}",
                        p.lsn
                    )),
                    Ok(_) => out.violation(format!(
                        "{at}: prev is not the stored hash of {}:{} (hash chain broken)",
                        event.origin,
                        event.seq - 1
                    )),
                    Err(e) => out.violation(format!("{at}: by_id entry of its predecessor: {e}")),
                },
                None => out.violation(format!(
                    "{at}: its origin's previous event {}:{} is not applied",
                    event.origin,
                    event.seq - 1
                )),
            }
        }
        for (o, s) in event.clock.iter() {
            if *o != event.origin && applied.get(o) < s {
                out.violation(format!(
                    "{at}: depends on {o}:{s}, which was not applied before it (causal order)"
                ));
            }
        }
        applied.set(event.origin, event.seq.max(before));

        let frontier = frontiers.entry(event.key.clone()).or_default();
        frontier.apply(&event);
        match soft(
            t.last_history(txn, sid, event.key.as_bytes(), lsn),
            &mut out,
            None,
        )? {
            Some(record) if record.lsn == lsn => {
                by_key_found += 1;
                match stored_frontier(t, txn, sid, id, &record) {
                    Ok(stored) if stored == frontier.ids() => {}
                    Ok(stored) => out.violation(format!(
                        "{at}: by_key records the frontier {:?} of key {:?} after it, recomputed from its history {:?}",
                        stored.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        event.key,
                        ids(frontier)
                    )),
                    Err(StoreError::Corrupt(e)) => out.violation(format!("{at}: {e}")),
                    Err(e) => return Err(e),
                }
            }
            _ => out.violation(format!("{at}: missing from by_key")),
        }
        if let Some(m) = &merge {
            if let Ok(new) = m.apply(states.get(&event.key).map(Vec::as_slice), &event) {
                states.insert(event.key.clone(), new);
            }
        }
    }

    // Every origin's chain ends on a signed event, or its unsigned tail is vouched for
    // by a signed event waiting in the pending set; and no transaction is left partial.
    let mut origins: Vec<_> = chains.into_iter().collect();
    origins.sort_by_key(|(o, _)| *o);
    for (origin, chain) in origins {
        if let (Some((first, count)), Some((last, _))) = (chain.open_group, chain.last) {
            out.violation(format!(
                "transaction {first}/{count} of {origin} is partial: the log ends it at seq {last}"
            ));
        }
        if let (Some((from, to)), Some((_, head))) = (chain.unvouched, chain.last) {
            if !vouched_from_pending(t, txn, sid, origin, to, head, space.as_ref())? {
                out.violation(format!(
                    "events {origin}:{from}..={to} are unsigned and no signed event of their origin is linked to them (in the log or the pending set)"
                ));
            }
        }
    }

    // The version vector against the log.
    let stored_vv = soft(t.version_vector(txn, sid), &mut out, applied.clone())?;
    for (o, s) in applied.iter() {
        if stored_vv.get(o) != s {
            out.violation(format!(
                "version vector says {o} is at seq {}, but the log holds its seqs 1..={s}",
                stored_vv.get(o)
            ));
        }
    }
    for (o, s) in stored_vv.iter() {
        if applied.get(o) == 0 {
            out.violation(format!(
                "version vector says {o} is at seq {s}, but the log holds none of its events"
            ));
        }
    }

    // Nothing dangling in by_id: every entry of the space is an (origin, seq) the scan
    // found applied, whose own entry it checked.
    for entry in t.by_id.prefix_iter(txn, &sid.to_be_bytes())? {
        let (k, _) = entry?;
        let parsed = tables::node_at(&k[4..], "by_id key")
            .and_then(|o| Ok((o, be_u64(k.get(36..).unwrap_or_default(), "by_id seq")?)));
        match parsed {
            Ok((o, s)) if s >= 1 && s <= applied.get(&o) => {}
            Ok((o, s)) => out.violation(format!("by_id has {o}:{s}, which is not in the log")),
            Err(e) => out.violation(format!("by_id key: {e}")),
        }
    }

    // Nothing dangling in by_key: every chunk is well-formed and starts at its first
    // record, and it holds no record beyond those the scan found; only if it does are
    // records looked at one by one.
    let mut by_key_total = 0u64;
    for entry in t.by_key.prefix_iter(txn, &sid.to_be_bytes())? {
        let (k, v) = entry?;
        let (key, first) = match tables::split_history_key(k) {
            Ok(parts) => parts,
            Err(e) => {
                out.violation(e.to_string());
                continue;
            }
        };
        let name = String::from_utf8_lossy(key).into_owned();
        match tables::decode_chunk(first, v, format_args!("{name:?}")) {
            Ok(records) => {
                by_key_total += records.len() as u64;
                let ascending = records.windows(2).all(|w| w[0].lsn < w[1].lsn);
                if records[0].lsn != first || !ascending {
                    out.violation(format!(
                        "by_key chunk of key {name:?} at lsn {first} holds records out of order"
                    ));
                }
            }
            Err(e) => out.violation(e.to_string()),
        }
    }
    if by_key_total != by_key_found {
        for entry in t.by_key.prefix_iter(txn, &sid.to_be_bytes())? {
            let (k, v) = entry?;
            let Ok((key, first)) = tables::split_history_key(k) else {
                continue;
            };
            let Ok(records) = tables::decode_chunk(first, v, "a chunk") else {
                continue;
            };
            for lsn in records.iter().map(|r| r.lsn) {
                let matches = match t.events.get(txn, &tables::event_key(sid, lsn))? {
                    Some(b) => weft_crdt::Event::decode(b).is_ok_and(|e| e.key.as_bytes() == key),
                    None => false,
                };
                if !matches {
                    out.violation(format!(
                        "by_key files lsn {lsn} under key {:?}, which is not that event's key",
                        String::from_utf8_lossy(key)
                    ));
                }
            }
        }
    }

    // The conflict count against the recomputation (each key's frontier was checked
    // entry by entry in the scan).
    let conflicts = frontiers.values().filter(|f| f.is_conflict()).count() as u64;
    let counted = soft(t.conflicts(txn, sid), &mut out, conflicts)?;
    if counted != conflicts {
        out.violation(format!(
            "conflict count is {counted}, but {conflicts} keys have concurrent events in their frontier"
        ));
    }

    // Merge states.
    let mut stored_states = 0usize;
    for entry in t.state.prefix_iter(txn, &sid.to_be_bytes())? {
        let (k, v) = entry?;
        stored_states += 1;
        let key = String::from_utf8_lossy(&k[4..]).into_owned();
        match (&merge, states.get(&key)) {
            (Some(_), Some(s)) if s.as_slice() == v => {}
            (Some(_), Some(_)) => out.violation(format!(
                "merge state of key {key:?} differs from the fold of its history"
            )),
            (Some(_), None) => out.violation(format!(
                "merge state of key {key:?} exists, but its history folds to none"
            )),
            (None, _) if !merge_space => out.violation(format!(
                "key {key:?} has a merge state, but the space's policy is not a merge"
            )),
            (None, _) => {}
        }
    }
    if merge.is_some() && stored_states != states.len() {
        for key in states.keys() {
            if t.state.get(txn, &tables::record_key(sid, key))?.is_none() {
                out.violation(format!(
                    "key {key:?} has no merge state, but its history folds to one"
                ));
            }
        }
    }

    check_pending(t, txn, sid, &applied, space.as_ref(), &mut out)?;
    Ok(out)
}

/// The frontier a `by_key` record holds for the event `id`: the event and the other
/// members it names, which must be applied before it. Sorted by id.
fn stored_frontier(
    t: &Tables,
    txn: &RoTxn,
    sid: SpaceId,
    id: EventId,
    record: &tables::Record,
) -> Result<Vec<EventId>, StoreError> {
    let mut out = vec![id];
    for &member in &record.others {
        if member >= record.lsn {
            return Err(StoreError::Corrupt(format!(
                "by_key names lsn {member} in the frontier after lsn {}",
                record.lsn
            )));
        }
        out.push(t.id_at(txn, sid, member)?);
    }
    out.sort_unstable();
    Ok(out)
}

/// Follows one origin's hash chain through the log: checks the signature of a signed
/// event, and tracks the unsigned events a later signed one must vouch for. A link is
/// checked against the hash recomputed from the previous event's stored bytes, not
/// against an index.
fn follow_chain(
    chain: &mut Chain,
    event: &Event,
    hash: EventHash,
    space: Option<&SpaceName>,
    at: &str,
    out: &mut SpaceCheck,
) {
    let linked = match chain.last {
        Some((seq, h)) => event.seq == seq + 1 && event.prev == Some(h),
        None => event.seq == 1,
    };
    if !linked {
        if let Some((from, to)) = chain.unvouched.take() {
            let origin = event.origin;
            out.violation(format!(
                "events {origin}:{from}..={to} are unsigned and their chain breaks before a signed event of their origin vouches for them"
            ));
        }
    }
    let authentic = match (&event.sig, space) {
        (Some(_), Some(space)) => match event.verify(space) {
            Ok(()) => true,
            Err(e) => {
                out.violation(format!("{at}: signature does not verify: {e}"));
                false
            }
        },
        // Without a valid space name nothing can be verified (reported once above).
        (Some(_), None) => true,
        (None, _) => false,
    };
    chain.unvouched = if authentic {
        None
    } else {
        Some((
            chain.unvouched.map_or(event.seq, |(from, _)| from),
            event.seq,
        ))
    };
    chain.last = Some((event.seq, hash));
}

/// Tracks transaction groups through one origin's events: a group's events are
/// consecutive seqs, all tagged with the group, and the log must hold all or none.
fn follow_group(chain: &mut Chain, event: &Event, at: &str, out: &mut SpaceCheck) {
    let origin = event.origin;
    let group = match crate::txn::group_of(event) {
        Ok(g) => g,
        Err(e) => {
            out.violation(format!("{at}: {e}"));
            None
        }
    };
    if let Some((first, count)) = chain.open_group {
        let continues = group == Some((first, count)) && event.seq > first;
        if !continues {
            out.violation(format!(
                "transaction {first}/{count} of {origin} is partial: {at} follows it before its end"
            ));
            chain.open_group = None;
        }
    }
    match group {
        Some((first, count)) if chain.open_group.is_none() => {
            if event.seq != first {
                out.violation(format!(
                    "{at}: belongs to transaction {first}/{count}, whose first event is not in the log before it"
                ));
            } else if count > 1 {
                chain.open_group = Some((first, count));
            }
        }
        Some((first, count)) if event.seq + 1 == first + count => chain.open_group = None,
        Some(_) | None => {}
    }
}

/// Whether the pending set holds a signed event of `origin` linked, through parked
/// events with consecutive seqs, to its applied head `head_seq` (whose hash is
/// `head`): an unsigned head is authentic when its voucher waits there for a cause.
fn vouched_from_pending(
    t: &Tables,
    txn: &RoTxn,
    sid: SpaceId,
    origin: NodeId,
    head_seq: u64,
    head: EventHash,
    space: Option<&SpaceName>,
) -> Result<bool, StoreError> {
    let mut prev = head;
    let mut seq = head_seq;
    // Bounded by the pending set: each step reads the next parked seq.
    loop {
        seq += 1;
        let Some(bytes) = t.pending.get(txn, &id_key(sid, &origin, seq))? else {
            return Ok(false);
        };
        let Ok(event) = Event::decode(bytes) else {
            return Ok(false);
        };
        if event.seq != seq || event.prev != Some(prev) {
            return Ok(false);
        }
        if event.sig.is_some() {
            return Ok(space.is_none_or(|s| event.verify(s).is_ok()));
        }
        prev = tables::hash_of_encoding(bytes);
    }
}

/// The pending set: parked events are not applied, decode, and are authentic — signed
/// by their origin, or unsigned and vouched for by a later parked event of their
/// origin linked to them.
fn check_pending(
    t: &Tables,
    txn: &RoTxn,
    sid: SpaceId,
    applied: &VersionVector,
    space: Option<&SpaceName>,
    out: &mut SpaceCheck,
) -> Result<(), StoreError> {
    // Entries come in (origin, seq) order; each origin's are checked from its highest
    // seq down, as `verify_batch` checks a page.
    let mut run: Vec<(Event, EventHash)> = Vec::new();
    let flush = |run: &mut Vec<(Event, EventHash)>, out: &mut SpaceCheck| {
        let mut voucher: Option<(u64, Option<EventHash>)> = None;
        for (event, hash) in run.drain(..).rev() {
            let (origin, seq) = (event.origin, event.seq);
            let vouched = voucher.is_some_and(|(s, prev)| s == seq + 1 && prev == Some(hash));
            let authentic = vouched
                || match (&event.sig, space) {
                    (Some(_), Some(space)) => match event.verify(space) {
                        Ok(()) => true,
                        Err(e) => {
                            out.violation(format!(
                                "pending event {origin}:{seq}: signature does not verify: {e}"
                            ));
                            false
                        }
                    },
                    (Some(_), None) => true,
                    (None, _) => {
                        out.violation(format!(
                            "pending event {origin}:{seq} is unsigned and no later parked event of its origin vouches for it"
                        ));
                        false
                    }
                };
            voucher = authentic.then_some((seq, event.prev));
        }
    };
    for entry in t.pending.prefix_iter(txn, &sid.to_be_bytes())? {
        let (k, v) = entry?;
        let at = match tables::node_at(&k[4..], "pending key")
            .and_then(|o| Ok((o, be_u64(k.get(36..).unwrap_or_default(), "pending seq")?)))
        {
            Ok(id) => id,
            Err(e) => {
                out.violation(e.to_string());
                continue;
            }
        };
        let (origin, seq): (NodeId, u64) = at;
        let event = match tables::decode_event(v, format_args!("pending event {origin}:{seq}")) {
            Ok(e) => e,
            Err(e) => {
                out.violation(e.to_string());
                continue;
            }
        };
        if (event.origin, event.seq) != (origin, seq) {
            out.violation(format!(
                "pending entry {origin}:{seq} holds event {}",
                event.id()
            ));
            continue;
        }
        if seq <= applied.get(&origin) {
            out.violation(format!("pending event {origin}:{seq} is already applied"));
        }
        if run.last().is_some_and(|(e, _)| e.origin != origin) {
            flush(&mut run, out);
        }
        let hash = tables::hash_of_encoding(v);
        run.push((event, hash));
    }
    flush(&mut run, out);
    Ok(())
}

/// The merge to recompute states with: the built-in merge the space's recorded policy
/// names, if it is one. `None` for resolver spaces (which must have no states) and for
/// merges that cannot be run offline (reported as skipped).
fn recomputable_merge(
    t: &Tables,
    txn: &RoTxn,
    sid: SpaceId,
    out: &mut SpaceCheck,
) -> Result<Option<Arc<dyn Merge>>, StoreError> {
    let Some(stored) = soft(t.stored_policy(txn, sid), out, None)? else {
        return Ok(None);
    };
    if !stored.merge {
        return Ok(None);
    }
    if t.space_meta
        .get(txn, &tables::space_meta_key(sid, tables::SPACE_REFOLD))?
        .is_some()
    {
        out.skipped.push(
            "merge states: rebuilt from the journal, they are folded when the space is next configured"
                .into(),
        );
        return Ok(None);
    }
    let builtin = PolicyKind::from_str(&stored.identity.name)
        .ok()
        .map(PolicyKind::policy)
        .filter(|p| p.identity() == stored.identity);
    match builtin {
        Some(Policy::Merge(m)) => Ok(Some(m)),
        _ => {
            out.skipped.push(format!(
                "merge states: policy {} is not built in, so they cannot be recomputed offline",
                stored.identity
            ));
            Ok(None)
        }
    }
}

fn ids(f: &Frontier) -> Vec<String> {
    f.ids().iter().map(ToString::to_string).collect()
}
