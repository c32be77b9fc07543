//! The offline invariant checker: [`check`] reads a data directory and reports every
//! way its tables disagree with each other or with the rules of the log, without
//! changing anything.
//!
//! It scans each space's log once, in lsn order, keeping per origin only the highest
//! seq seen and per key its recomputed frontier (and merge state), and checks every
//! index against that scan: the memory it needs grows with the number of origins and
//! keys, not with the length of the log. Every event's signature is verified, one by
//! one: the checker trusts nothing it reads.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use heed::{EnvFlags, EnvOpenOptions, RoTxn};
use weft_crdt::{Frontier, Merge, NodeId, Policy, PolicyKind, SpaceName, VersionVector};

use crate::tables::{
    self, be_u64, history_key, id_key, IdEntry, SpaceId, Tables, FORMAT_VERSION, MAX_DBS,
    META_FORMAT, META_NODE_ID,
};
use crate::StoreError;

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
/// see a consistent snapshot. Checked per space: every event decodes, validates and
/// carries its origin's signature; lsns are contiguous; `by_id` and `by_key` index
/// exactly the log's events (right lsn and hash, nothing dangling); the version vector
/// holds, per origin, the highest seq in the log and every seq below it is present
/// exactly once; each event's `prev` is the stored hash of its origin's previous
/// event; each event's causes were applied at lower lsns; every key's frontier and the
/// conflict flags and count match the frontiers recomputed from the log; merge states
/// match a recomputation (for built-in merges; others are reported skipped); parked
/// events are not applied yet, decode and verify.
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
    Ok(report)
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
        if let Some(space) = &space {
            if let Err(e) = event.verify(space) {
                out.violation(format!("{at}: signature does not verify: {e}"));
            }
        }
        let hash = event.hash();
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
        let conflict = frontier.is_conflict();
        match t.by_key.get(txn, &history_key(sid, &event.key, lsn))? {
            None => out.violation(format!("{at}: missing from by_key")),
            Some(flags) => {
                by_key_found += 1;
                let flagged = flags
                    .first()
                    .is_some_and(|f| f & tables::HISTORY_CONFLICT != 0);
                if flagged != conflict {
                    out.violation(format!(
                        "{at}: by_key conflict flag is {flagged}, recomputed {conflict}"
                    ));
                }
            }
        }
        if let Some(m) = &merge {
            if let Ok(new) = m.apply(states.get(&event.key).map(Vec::as_slice), &event) {
                states.insert(event.key.clone(), new);
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

    // Nothing dangling in by_key: the scan found every event's entry, so any entry
    // beyond those is extra; only then are entries looked at one by one.
    let mut by_key_total = 0u64;
    for entry in t.by_key.prefix_iter(txn, &sid.to_be_bytes())? {
        entry?;
        by_key_total += 1;
    }
    if by_key_total != by_key_found {
        for entry in t.by_key.prefix_iter(txn, &sid.to_be_bytes())? {
            let (k, _) = entry?;
            let key = k.get(4..k.len().saturating_sub(9)).unwrap_or_default();
            let lsn = be_u64(&k[k.len().saturating_sub(8)..], "by_key lsn").unwrap_or(0);
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

    // Frontiers and the conflict count against the recomputation.
    let mut stored_keys = 0usize;
    for entry in t.frontier.prefix_iter(txn, &sid.to_be_bytes())? {
        let (k, v) = entry?;
        stored_keys += 1;
        let key = String::from_utf8_lossy(&k[4..]).into_owned();
        let stored = match tables::decode_frontier(v, format_args!("{key:?}")) {
            Ok(f) => f,
            Err(e) => {
                out.violation(e.to_string());
                continue;
            }
        };
        match frontiers.get(&key) {
            Some(f) if *f == stored => {}
            Some(f) => out.violation(format!(
                "frontier of key {key:?} is {:?}, recomputed from its history {:?}",
                ids(&stored),
                ids(f)
            )),
            None => out.violation(format!(
                "frontier of key {key:?} exists, but the key has no events"
            )),
        }
    }
    if stored_keys != frontiers.len() {
        for key in frontiers.keys() {
            if t.frontier
                .get(txn, &tables::frontier_key(sid, key))?
                .is_none()
            {
                out.violation(format!("key {key:?} has events but no stored frontier"));
            }
        }
    }
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
            if t.state.get(txn, &tables::frontier_key(sid, key))?.is_none() {
                out.violation(format!(
                    "key {key:?} has no merge state, but its history folds to one"
                ));
            }
        }
    }

    // The pending set: parked events are not applied, and are authentic.
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
        }
        if seq <= applied.get(&origin) {
            out.violation(format!("pending event {origin}:{seq} is already applied"));
        }
        if let Some(space) = &space {
            if let Err(e) = event.verify(space) {
                out.violation(format!(
                    "pending event {origin}:{seq}: signature does not verify: {e}"
                ));
            }
        }
    }
    Ok(out)
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
