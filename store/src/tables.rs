//! The LMDB layout and the reads shared by the writer thread and by readers.
//!
//! One environment per data directory holds a fixed set of named databases shared by
//! all spaces. Every key starts with the 4-byte big-endian id of its space (the
//! `spaces` table maps names to ids), and integers in keys are big-endian, so LMDB's
//! byte order is numeric order and one space's entries are one contiguous range.
//!
//! | table      | key                                  | value                          |
//! |------------|--------------------------------------|--------------------------------|
//! | `spaces`   | space name (UTF-8)                   | sid (u32)                      |
//! | `meta`     | `format`, `node_id`, `hlc`           | u32 / 32 bytes / u64           |
//! | `events`   | sid, lsn (u64)                       | canonical CBOR event           |
//! | `by_id`    | sid, origin (32 B), seq (u64)        | lsn (u64), event hash (32 B)   |
//! | `by_key`   | sid, record key, 0x00, lsn (u64)     | a chunk of the key's history   |
//! | `vv`       | sid, origin (32 B)                   | highest contiguous seq (u64)   |
//! | `pending`  | sid, origin (32 B), seq (u64)        | canonical CBOR event           |
//! | `state`    | sid, record key                      | merge state (the `Merge`'s own bytes) |
//! | `space_meta` | sid, `policy` / `conflicts`        | CBOR [`StoredPolicy`] / u64    |
//!
//! `by_key` is each key's history and its frontier in one table. The key's events are
//! recorded in lsn order in *chunks*: one entry per chunk, keyed by the lsn of its first
//! event, whose value is a run of records, one per event, in LEB128 varints: its lsn
//! minus the previous record's (0 for the first), the number of the other members of
//! the key's frontier right after it was applied, and for each of them (ascending) the
//! event's lsn minus the member's. The event itself is always in that frontier
//! (nothing applied later can precede it), so the common case, where it alone decides
//! the key, is a record of 2–4 bytes. The next event of the key is appended to its last
//! chunk while that chunk is under [`CHUNK_BYTES`], else it starts a new one. So a
//! key's current frontier is its last record, its frontier as of any lsn the last
//! record up to it, and "conflict" (the frontier held more than one event) is a record
//! naming others.
//!
//! Why chunks: a commit rewrites every B-tree leaf it touches, and events of keys
//! spread over the table touch one leaf each. One entry per key instead of one per
//! event keeps the table, and so the leaves a commit touches, about as small as a
//! plain key -> frontier table would; and applying an event rewrites in place the
//! chunk it read, through the same cursor: one leaf and one descent per event, where a
//! separate history and frontier table would take two of each.
//!
//! `state` has entries only in spaces whose policy is a merge. `space_meta/conflicts`
//! is the number of the space's keys whose frontier holds more than one event; absent
//! means 0. `space_meta/policy` is written on the space's first configuration.
//!
//! Record keys never contain control characters ([`weft_crdt::check_write_fields`]),
//! so the 0x00 after the key in `by_key` cannot be part of it: one key's history never
//! interleaves with a longer key's, and a key prefix is also a range.

use std::ops::Bound;

use heed::types::Bytes;
use heed::{CommitOrAbort, Database, Env, RoTxn, RwTxn, WithoutTls};
use weft_crdt::{Event, EventHash, EventId, NodeId, PolicyIdentity, VersionVector};

use crate::StoreError;

/// The id of a space inside the environment: a short, fixed-size stand-in for its name
/// in every key.
pub(crate) type SpaceId = u32;

/// Version of this layout, recorded in `meta` so a future layout can refuse or migrate
/// an old directory instead of misreading it.
///
/// 2 added `state`, `space_meta` and conflict flags in `by_key`; 3 folded the
/// `frontier` table into `by_key`, whose entries became chunks of records that hold
/// the frontier after each event. Directories of older layouts are refused with
/// [`StoreError::UnsupportedLayout`]: their `by_key` lacks those frontiers, which only
/// a replay of the log could fill in.
pub(crate) const FORMAT_VERSION: u32 = 3;

pub(crate) const META_FORMAT: &[u8] = b"format";
pub(crate) const META_NODE_ID: &[u8] = b"node_id";
pub(crate) const META_HLC: &[u8] = b"hlc";
/// Full mode: the journal position after the last batch this commit holds
/// (`journal::Position`).
pub(crate) const META_JOURNAL: &[u8] = b"journal";

/// `space_meta` fields, after the 4-byte space id.
pub(crate) const SPACE_POLICY: &[u8] = b"policy";
pub(crate) const SPACE_CONFLICTS: &[u8] = b"conflicts";
/// Present when a rebuild from the journal recorded a merge policy without folding the
/// log (its function is registered later): the next `configure_space` folds it.
pub(crate) const SPACE_REFOLD: &[u8] = b"refold";

/// Most bytes of a `by_key` chunk that another record is appended to. Small enough to
/// stay inside a leaf page (LMDB moves values over about half a page to overflow
/// pages), large enough that a key's history takes few entries: ~150 plain records.
pub(crate) const CHUNK_BYTES: usize = 512;

/// Longest key any table uses: a `by_key` entry for a key of the maximum length.
pub(crate) const MAX_TABLE_KEY: usize = 4 + weft_crdt::limits::MAX_KEY_BYTES + 1 + 8;

/// Number of named databases; `max_dbs` is set with room for later tables (and for
/// the `frontier` table an older layout may still hold).
pub(crate) const MAX_DBS: u32 = 16;

type Table = Database<'static, Bytes, Bytes>;

/// A key's history as `(lsn, conflict flag)`, in either direction.
pub(crate) type History<'t> = Box<dyn Iterator<Item = Result<(u64, bool), StoreError>> + 't>;

/// Record keys with the ids of their frontiers.
pub(crate) type Frontiers = Vec<(Vec<u8>, Vec<EventId>)>;

/// Log entries as `(lsn, encoded event)`, in either direction.
pub(crate) type LogScan<'t> = Box<dyn Iterator<Item = Result<(u64, &'t [u8]), StoreError>> + 't>;

/// Handles of the named databases. `Copy`: a handle is an index into the environment.
#[derive(Clone, Copy)]
pub(crate) struct Tables {
    pub spaces: Table,
    pub meta: Table,
    pub events: Table,
    pub by_id: Table,
    pub by_key: Table,
    pub vv: Table,
    pub pending: Table,
    pub state: Table,
    pub space_meta: Table,
}

/// The `space_meta/policy` value: the identity every replica must share, and whether
/// it is a merge, so that the writer can refuse to apply events to a merge space whose
/// `Merge` this process was not given (its state would silently fall behind).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct StoredPolicy {
    pub identity: PolicyIdentity,
    pub merge: bool,
}

impl StoredPolicy {
    /// What is recorded of `policy`.
    pub fn of(policy: &weft_crdt::Policy) -> StoredPolicy {
        StoredPolicy {
            identity: policy.identity(),
            merge: matches!(policy, weft_crdt::Policy::Merge(_)),
        }
    }
}

/// The `by_id` value: where an event sits in the log and its hash, so the hash chain
/// can be checked and `pull_page` can find a start without decoding events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IdEntry {
    pub lsn: u64,
    pub hash: EventHash,
}

impl IdEntry {
    pub fn to_bytes(self) -> [u8; 40] {
        let mut out = [0u8; 40];
        out[..8].copy_from_slice(&self.lsn.to_be_bytes());
        out[8..].copy_from_slice(&self.hash.0);
        out
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, StoreError> {
        if b.len() != 40 {
            return Err(StoreError::Corrupt(format!(
                "by_id entry is {} bytes, expected 40",
                b.len()
            )));
        }
        let lsn = be_u64(&b[..8], "by_id lsn")?;
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&b[8..]);
        Ok(IdEntry {
            lsn,
            hash: EventHash(hash),
        })
    }
}

pub(crate) fn be_u64(b: &[u8], what: &str) -> Result<u64, StoreError> {
    let arr: [u8; 8] = b
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("{what} is {} bytes, expected 8", b.len())))?;
    Ok(u64::from_be_bytes(arr))
}

pub(crate) fn be_u32(b: &[u8], what: &str) -> Result<u32, StoreError> {
    let arr: [u8; 4] = b
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("{what} is {} bytes, expected 4", b.len())))?;
    Ok(u32::from_be_bytes(arr))
}

pub(crate) fn node_at(b: &[u8], what: &str) -> Result<NodeId, StoreError> {
    let arr: [u8; 32] = b
        .get(..32)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| StoreError::Corrupt(format!("{what} lacks a 32-byte node id")))?;
    Ok(NodeId::from_bytes(arr))
}

pub(crate) fn event_key(sid: SpaceId, lsn: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&sid.to_be_bytes());
    k[4..].copy_from_slice(&lsn.to_be_bytes());
    k
}

/// Key of `by_id` and `pending`.
pub(crate) fn id_key(sid: SpaceId, origin: &NodeId, seq: u64) -> [u8; 44] {
    let mut k = [0u8; 44];
    k[..4].copy_from_slice(&sid.to_be_bytes());
    k[4..36].copy_from_slice(origin.as_bytes());
    k[36..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub(crate) fn origin_key(sid: SpaceId, origin: &NodeId) -> [u8; 36] {
    let mut k = [0u8; 36];
    k[..4].copy_from_slice(&sid.to_be_bytes());
    k[4..].copy_from_slice(origin.as_bytes());
    k
}

/// Key of `state`: the space and the record key.
pub(crate) fn record_key(sid: SpaceId, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + key.len());
    k.extend_from_slice(&sid.to_be_bytes());
    k.extend_from_slice(key.as_bytes());
    k
}

pub(crate) fn space_meta_key(sid: SpaceId, field: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + field.len());
    k.extend_from_slice(&sid.to_be_bytes());
    k.extend_from_slice(field);
    k
}

#[cfg(test)]
pub(crate) fn history_key(sid: SpaceId, key: &str, lsn: u64) -> Vec<u8> {
    history_key_bytes(sid, key.as_bytes(), lsn)
}

pub(crate) fn history_key_bytes(sid: SpaceId, key: &[u8], lsn: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + key.len() + 9);
    put_history_key(&mut k, sid, key, lsn);
    k
}

fn put_history_key(out: &mut Vec<u8>, sid: SpaceId, key: &[u8], lsn: u64) {
    out.extend_from_slice(&sid.to_be_bytes());
    out.extend_from_slice(key);
    out.push(0);
    out.extend_from_slice(&lsn.to_be_bytes());
}

/// The record key and lsn of a `by_key` key.
pub(crate) fn split_history_key(k: &[u8]) -> Result<(&[u8], u64), StoreError> {
    let short = || StoreError::Corrupt("by_key entry key is too short".into());
    let key = k.get(4..k.len().saturating_sub(9)).ok_or_else(short)?;
    let lsn = be_u64(
        k.get(k.len().saturating_sub(8)..).ok_or_else(short)?,
        "by_key lsn",
    )?;
    Ok((key, lsn))
}

pub(crate) fn decode_event(
    bytes: &[u8],
    what: impl std::fmt::Display,
) -> Result<Event, StoreError> {
    Event::decode(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// The hash of an event from its canonical encoding: the same as [`Event::hash`]
/// (blake3 of the encoding), without encoding it again.
pub(crate) fn hash_of_encoding(bytes: &[u8]) -> EventHash {
    EventHash(*blake3::hash(bytes).as_bytes())
}

/// One event's record in a `by_key` chunk: its lsn and the lsns of the other members
/// of its key's frontier right after it was applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub lsn: u64,
    pub others: Vec<u64>,
}

impl Record {
    /// True when the key's frontier held more than this event.
    pub fn conflict(&self) -> bool {
        !self.others.is_empty()
    }

    /// Appends the record to a chunk value; `prev` is the previous record's lsn in the
    /// chunk (the chunk's first lsn for its first record).
    pub fn encode_into(&self, prev: u64, out: &mut Vec<u8>) -> Result<(), StoreError> {
        let bad = || {
            StoreError::Corrupt(format!(
                "history record of lsn {} is out of order",
                self.lsn
            ))
        };
        put_varint(out, self.lsn.checked_sub(prev).ok_or_else(bad)?);
        put_varint(out, self.others.len() as u64);
        for &other in &self.others {
            let back = self.lsn.checked_sub(other).filter(|d| *d > 0);
            put_varint(out, back.ok_or_else(bad)?);
        }
        Ok(())
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        let part = u64::from(byte & 0x7f);
        // The tenth byte may only hold the 64th bit.
        if shift == 63 && part > 1 {
            return None;
        }
        v |= part << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Reads the records of a chunk starting at lsn `first`, handing each one's lsn, the
/// offset of its others and their count to `each`.
fn walk_chunk(
    first: u64,
    v: &[u8],
    what: impl std::fmt::Display,
    mut each: impl FnMut(u64, usize, usize),
) -> Result<(), StoreError> {
    let bad = || {
        StoreError::Corrupt(format!(
            "history chunk of {what} at lsn {first} is malformed"
        ))
    };
    let mut at = 0;
    let mut lsn = first;
    let mut records = 0usize;
    while at < v.len() {
        let delta = get_varint(v, &mut at).ok_or_else(bad)?;
        // The first record is at the chunk's lsn, each later one past the one before.
        if (records > 0) != (delta > 0) {
            return Err(bad());
        }
        lsn = lsn.checked_add(delta).ok_or_else(bad)?;
        let n = get_varint(v, &mut at).ok_or_else(bad)?;
        let others = at;
        for _ in 0..n {
            get_varint(v, &mut at).ok_or_else(bad)?;
        }
        each(lsn, others, usize::try_from(n).map_err(|_| bad())?);
        records += 1;
    }
    if records == 0 {
        return Err(bad());
    }
    Ok(())
}

/// The other frontier members a record names, from their offset in the chunk.
fn others_at(v: &[u8], lsn: u64, mut at: usize, n: usize) -> Result<Vec<u64>, StoreError> {
    let bad = || StoreError::Corrupt(format!("history record of lsn {lsn} is malformed"));
    (0..n)
        .map(|_| {
            let back = get_varint(v, &mut at).ok_or_else(bad)?;
            lsn.checked_sub(back).filter(|_| back > 0).ok_or_else(bad)
        })
        .collect()
}

/// The records of a `by_key` chunk starting at lsn `first`, in order.
pub(crate) fn decode_chunk(
    first: u64,
    v: &[u8],
    what: impl std::fmt::Display,
) -> Result<Vec<Record>, StoreError> {
    let mut places = Vec::new();
    walk_chunk(first, v, what, |lsn, at, n| places.push((lsn, at, n)))?;
    places
        .into_iter()
        .map(|(lsn, at, n)| {
            Ok(Record {
                lsn,
                others: others_at(v, lsn, at, n)?,
            })
        })
        .collect()
}

/// The last record of a `by_key` chunk starting at lsn `first`: the only one whose
/// others are decoded.
pub(crate) fn last_record(
    first: u64,
    v: &[u8],
    what: impl std::fmt::Display,
) -> Result<Record, StoreError> {
    let mut last = (first, 0, 0);
    walk_chunk(first, v, what, |lsn, at, n| last = (lsn, at, n))?;
    let (lsn, at, n) = last;
    Ok(Record {
        lsn,
        others: others_at(v, lsn, at, n)?,
    })
}

/// The id of an event read from the start of its canonical encoding, the CBOR array
/// `[1, origin, seq, ...]` (see `weft_crdt::event`), without decoding the rest. `None`
/// when the bytes do not start that way; callers then decode the whole event.
pub(crate) fn id_of_encoding(b: &[u8]) -> Option<EventId> {
    // An array of 12, version 1, a byte string of 32.
    if b.get(..4)? != [0x8c, 0x01, 0x58, 0x20] {
        return None;
    }
    let origin: [u8; 32] = b.get(4..36)?.try_into().ok()?;
    let (&head, rest) = b.get(36..)?.split_first()?;
    let seq = match head {
        0x00..=0x17 => u64::from(head),
        0x18 => u64::from(*rest.first()?),
        0x19 => u64::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?)),
        0x1a => u64::from(u32::from_be_bytes(rest.get(..4)?.try_into().ok()?)),
        0x1b => u64::from_be_bytes(rest.get(..8)?.try_into().ok()?),
        _ => return None,
    };
    Some(EventId::new(NodeId::from_bytes(origin), seq))
}

pub(crate) fn encode_cbor(value: &impl serde::Serialize, capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity);
    // Writing CBOR into a Vec cannot fail.
    ciborium::into_writer(value, &mut out)
        .unwrap_or_else(|e| unreachable!("CBOR encoding into a Vec failed: {e}"));
    out
}

impl Tables {
    /// Creates (or opens) every table and commits, so the handles outlive the txn.
    pub fn create(env: &Env<WithoutTls>) -> Result<Tables, StoreError> {
        let wtxn = env.write_txn()?;
        let made = env.create_databases_and_commit(wtxn, |dbo, wtxn| {
            let mut t = |name| dbo.create_database::<Bytes, Bytes>(wtxn, Some(name));
            let all = (
                t("spaces")?,
                t("meta")?,
                t("events")?,
                t("by_id")?,
                t("by_key")?,
                t("vv")?,
                t("pending")?,
                t("state")?,
                t("space_meta")?,
            );
            Ok::<_, heed::Error>(CommitOrAbort::<_, ()>::Commit(all))
        })?;
        let all = made
            .commit()
            .ok_or_else(|| StoreError::Corrupt("creating the tables was aborted".into()))?;
        Ok(Tables::from_parts(all))
    }

    /// Opens the tables of an existing store without creating anything, for the
    /// offline checker (which may run on a read-only environment).
    pub fn open_existing(env: &Env<WithoutTls>) -> Result<Tables, StoreError> {
        let rtxn = env.read_txn()?;
        let opened = env.open_databases_and_commit(rtxn, |dbo, rtxn| {
            let t = |name: &str| {
                dbo.open_database::<Bytes, Bytes>(rtxn, Some(name))?
                    .ok_or_else(|| StoreError::Corrupt(format!("table {name} is missing")))
            };
            let all = (
                t("spaces")?,
                t("meta")?,
                t("events")?,
                t("by_id")?,
                t("by_key")?,
                t("vv")?,
                t("pending")?,
                t("state")?,
                t("space_meta")?,
            );
            Ok::<_, StoreError>(CommitOrAbort::<_, ()>::Commit(all))
        })?;
        let all = opened
            .commit()
            .ok_or_else(|| StoreError::Corrupt("opening the tables was aborted".into()))?;
        Ok(Tables::from_parts(all))
    }

    fn from_parts(
        (spaces, meta, events, by_id, by_key, vv, pending, state, space_meta): (
            Table,
            Table,
            Table,
            Table,
            Table,
            Table,
            Table,
            Table,
            Table,
        ),
    ) -> Tables {
        Tables {
            spaces,
            meta,
            events,
            by_id,
            by_key,
            vv,
            pending,
            state,
            space_meta,
        }
    }

    /// Every space with its id, for loading the writer's cache.
    pub fn all_spaces(&self, txn: &RoTxn) -> Result<Vec<(String, SpaceId)>, StoreError> {
        let mut out = Vec::new();
        for entry in self.spaces.iter(txn)? {
            let (name, sid) = entry?;
            let name = std::str::from_utf8(name)
                .map_err(|_| StoreError::Corrupt("space name is not UTF-8".into()))?;
            out.push((name.to_owned(), be_u32(sid, "space id")?));
        }
        Ok(out)
    }

    /// The id of a space, or `None` if it was never written.
    pub fn space_id(&self, txn: &RoTxn, name: &str) -> Result<Option<SpaceId>, StoreError> {
        self.spaces
            .get(txn, name.as_bytes())?
            .map(|b| be_u32(b, "space id"))
            .transpose()
    }

    /// Highest lsn of the space (0 when empty). Lsns are contiguous from 1, so this is
    /// also the number of applied events.
    pub fn last_lsn(&self, txn: &RoTxn, sid: SpaceId) -> Result<u64, StoreError> {
        let start = event_key(sid, 0);
        let end = event_key(sid, u64::MAX);
        let range = (Bound::Included(&start[..]), Bound::Included(&end[..]));
        match self.events.rev_range(txn, &range)?.next() {
            Some(entry) => be_u64(&entry?.0[4..], "event key lsn"),
            None => Ok(0),
        }
    }

    pub fn version_vector(&self, txn: &RoTxn, sid: SpaceId) -> Result<VersionVector, StoreError> {
        let mut vv = VersionVector::new();
        for entry in self.vv.prefix_iter(txn, &sid.to_be_bytes())? {
            let (k, v) = entry?;
            let origin = node_at(&k[4..], "vv key")?;
            vv.set(origin, be_u64(v, "vv seq")?);
        }
        Ok(vv)
    }

    pub fn id_entry(
        &self,
        txn: &RoTxn,
        sid: SpaceId,
        origin: &NodeId,
        seq: u64,
    ) -> Result<Option<IdEntry>, StoreError> {
        self.by_id
            .get(txn, &id_key(sid, origin, seq))?
            .map(IdEntry::from_bytes)
            .transpose()
    }

    /// The last chunk of `key`'s history that starts at or before `to`: the lsn it
    /// starts at and its bytes.
    pub fn chunk_at<'t>(
        &self,
        txn: &'t RoTxn,
        sid: SpaceId,
        key: &[u8],
        to: u64,
    ) -> Result<Option<(u64, &'t [u8])>, StoreError> {
        let start = history_key_bytes(sid, key, 0);
        let end = history_key_bytes(sid, key, to);
        let range = (Bound::Included(&start[..]), Bound::Included(&end[..]));
        match self.by_key.rev_range(txn, &range)?.next() {
            Some(entry) => {
                let (k, v) = entry?;
                Ok(Some((split_history_key(k)?.1, v)))
            }
            None => Ok(None),
        }
    }

    /// Records the next event of `key`: appends `record` to the key's last chunk,
    /// rewritten in place through the cursor that found it (one B-tree descent), or
    /// starts a new chunk when that one is full or the key has none. Returns whether
    /// the key's previous record was a conflict.
    pub fn push_history(
        &self,
        txn: &mut RwTxn,
        sid: SpaceId,
        key: &str,
        record: &Record,
    ) -> Result<bool, StoreError> {
        // Both bounds in one buffer: this runs once per applied event, on the writer.
        let mut bounds = Vec::with_capacity(2 * (4 + key.len() + 9));
        put_history_key(&mut bounds, sid, key.as_bytes(), 0);
        let half = bounds.len();
        put_history_key(&mut bounds, sid, key.as_bytes(), u64::MAX);
        let (start, end) = bounds.split_at_mut(half);
        let range = (Bound::Included(&*start), Bound::Included(&*end));
        let mut chunks = self.by_key.rev_range_mut(txn, &range)?;
        let last = match chunks.next() {
            Some(entry) => {
                let (k, v) = entry?;
                let first = split_history_key(k)?.1;
                // Room for the record appended below, so the copy is not grown.
                let mut chunk = Vec::with_capacity(v.len() + 20);
                chunk.extend_from_slice(v);
                Some((first, chunk))
            }
            None => None,
        };
        let was_conflict = match last {
            Some((first, mut chunk)) => {
                let prev = last_record(first, &chunk, format_args!("{key:?}"))?;
                if chunk.len() < CHUNK_BYTES {
                    record.encode_into(prev.lsn, &mut chunk)?;
                    // The entry's key is the start bound with its first lsn.
                    let k = &mut end[..];
                    let at = k.len() - 8;
                    k[at..].copy_from_slice(&first.to_be_bytes());
                    // SAFETY: nothing borrowed from the map is used across this write:
                    // the key is our own buffer and the chunk was copied out above.
                    unsafe { chunks.put_current(k, &chunk)? };
                    return Ok(prev.conflict());
                }
                prev.conflict()
            }
            None => false,
        };
        drop(chunks);
        let mut chunk = Vec::with_capacity(16);
        record.encode_into(record.lsn, &mut chunk)?;
        let k = &mut end[..];
        let at = k.len() - 8;
        k[at..].copy_from_slice(&record.lsn.to_be_bytes());
        self.by_key.put(txn, k, &chunk)?;
        Ok(was_conflict)
    }

    /// The record of `key`'s last event with lsn at most `to`.
    pub fn last_history(
        &self,
        txn: &RoTxn,
        sid: SpaceId,
        key: &[u8],
        to: u64,
    ) -> Result<Option<Record>, StoreError> {
        let Some((first, chunk)) = self.chunk_at(txn, sid, key, to)? else {
            return Ok(None);
        };
        let what = String::from_utf8_lossy(key);
        let records = decode_chunk(first, chunk, format_args!("{what:?}"))?;
        Ok(records.into_iter().take_while(|r| r.lsn <= to).last())
    }

    /// The lsns of the frontier of `key` right after the event at `to` (or the latest
    /// before it) was applied, ascending; empty when the key had no events by then.
    pub fn frontier_lsns_at(
        &self,
        txn: &RoTxn,
        sid: SpaceId,
        key: &[u8],
        to: u64,
    ) -> Result<Vec<u64>, StoreError> {
        Ok(match self.last_history(txn, sid, key, to)? {
            Some(Record { lsn, mut others }) => {
                others.push(lsn);
                others.sort_unstable();
                others
            }
            None => Vec::new(),
        })
    }

    /// The events of that frontier (see [`Tables::frontier_lsns_at`]), sorted by id.
    pub fn frontier_events_at(
        &self,
        txn: &RoTxn,
        sid: SpaceId,
        key: &str,
        to: u64,
    ) -> Result<Vec<Event>, StoreError> {
        let mut events = self
            .frontier_lsns_at(txn, sid, key.as_bytes(), to)?
            .into_iter()
            .map(|lsn| self.event_at(txn, sid, lsn))
            .collect::<Result<Vec<_>, _>>()?;
        events.sort_by_key(Event::id);
        Ok(events)
    }

    /// The id of the event at `lsn`, which an index says exists.
    pub fn id_at(&self, txn: &RoTxn, sid: SpaceId, lsn: u64) -> Result<EventId, StoreError> {
        let bytes = self
            .events
            .get(txn, &event_key(sid, lsn))?
            .ok_or_else(|| StoreError::Corrupt(format!("an index names missing lsn {lsn}")))?;
        match id_of_encoding(bytes) {
            Some(id) => Ok(id),
            None => Ok(decode_event(bytes, format_args!("event at lsn {lsn}"))?.id()),
        }
    }

    /// Every key of the space with the ids of its current frontier (sorted), in key
    /// (byte) order: two lookups per key (its first entry, then its last) and one per
    /// frontier member, however long its history.
    pub fn frontiers(&self, txn: &RoTxn, sid: SpaceId) -> Result<Frontiers, StoreError> {
        let mut out = Vec::new();
        let mut from = Vec::new();
        while let Some(key) = self.next_history_key(txn, sid, &from)? {
            let mut ids = self
                .frontier_lsns_at(txn, sid, &key, u64::MAX)?
                .into_iter()
                .map(|lsn| self.id_at(txn, sid, lsn))
                .collect::<Result<Vec<_>, _>>()?;
            ids.sort_unstable();
            // Past every entry of this key: its lsns follow a 0x00, and record keys hold
            // no control characters, so 0x01 sorts after them and before longer keys.
            from.clone_from(&key);
            from.push(0x01);
            out.push((key, ids));
        }
        Ok(out)
    }

    /// The merge state of `key` (only merge spaces have any).
    pub fn state<'t>(
        &self,
        txn: &'t RoTxn,
        sid: SpaceId,
        key: &[u8],
    ) -> Result<Option<&'t [u8]>, StoreError> {
        let mut k = Vec::with_capacity(4 + key.len());
        k.extend_from_slice(&sid.to_be_bytes());
        k.extend_from_slice(key);
        Ok(self.state.get(txn, &k)?)
    }

    /// The policy recorded on the space's first configuration.
    pub fn stored_policy(
        &self,
        txn: &RoTxn,
        sid: SpaceId,
    ) -> Result<Option<StoredPolicy>, StoreError> {
        self.space_meta
            .get(txn, &space_meta_key(sid, SPACE_POLICY))?
            .map(|b| {
                ciborium::from_reader(b)
                    .map_err(|e| StoreError::Corrupt(format!("stored policy: {e}")))
            })
            .transpose()
    }

    /// Keys of the space whose frontier holds more than one event.
    pub fn conflicts(&self, txn: &RoTxn, sid: SpaceId) -> Result<u64, StoreError> {
        self.space_meta
            .get(txn, &space_meta_key(sid, SPACE_CONFLICTS))?
            .map_or(Ok(0), |b| be_u64(b, "conflict count"))
    }

    /// Whether the key was in conflict right after the event at `lsn` was applied.
    pub fn history_conflict(
        &self,
        txn: &RoTxn,
        sid: SpaceId,
        key: &str,
        lsn: u64,
    ) -> Result<bool, StoreError> {
        match self.last_history(txn, sid, key.as_bytes(), lsn)? {
            Some(r) if r.lsn == lsn => Ok(r.conflict()),
            _ => Err(StoreError::Corrupt(format!(
                "event at lsn {lsn} missing from by_key"
            ))),
        }
    }

    /// Applied events with lsn >= `from`, ascending, as raw bytes with their lsn.
    pub fn events_from<'t>(
        &self,
        txn: &'t RoTxn,
        sid: SpaceId,
        from: u64,
    ) -> Result<impl Iterator<Item = Result<(u64, &'t [u8]), StoreError>> + 't, StoreError> {
        let start = event_key(sid, from);
        let end = event_key(sid, u64::MAX);
        let range = (Bound::Included(&start[..]), Bound::Included(&end[..]));
        let iter = self.events.range(txn, &range)?;
        Ok(iter.map(|entry| {
            let (k, v) = entry?;
            Ok((be_u64(&k[4..], "event key lsn")?, v))
        }))
    }

    pub fn pending_count(&self, txn: &RoTxn, sid: SpaceId) -> Result<u64, StoreError> {
        let mut n = 0;
        for entry in self.pending.prefix_iter(txn, &sid.to_be_bytes())? {
            entry?;
            n += 1;
        }
        Ok(n)
    }

    /// The distinct origins with parked events, found by jumping from one origin's
    /// entries to the next rather than reading them all.
    pub fn pending_origins(&self, txn: &RoTxn, sid: SpaceId) -> Result<Vec<NodeId>, StoreError> {
        let mut out = Vec::new();
        let prefix = sid.to_be_bytes();
        let mut start = prefix.to_vec();
        loop {
            let range = (Bound::Excluded(&start[..]), Bound::Unbounded);
            let next = match self.pending.range(txn, &range)?.next() {
                Some(entry) => {
                    let (k, _) = entry?;
                    if !k.starts_with(&prefix) {
                        break;
                    }
                    node_at(&k[4..], "pending key")?
                }
                None => break,
            };
            out.push(next);
            start = id_key(sid, &next, u64::MAX).to_vec();
        }
        Ok(out)
    }

    /// Applied events with lsn <= `to`, descending, as raw bytes with their lsn.
    pub fn events_down_from<'t>(
        &self,
        txn: &'t RoTxn,
        sid: SpaceId,
        to: u64,
    ) -> Result<impl Iterator<Item = Result<(u64, &'t [u8]), StoreError>> + 't, StoreError> {
        let start = event_key(sid, 0);
        let end = event_key(sid, to);
        let range = (Bound::Included(&start[..]), Bound::Included(&end[..]));
        let iter = self.events.rev_range(txn, &range)?;
        Ok(iter.map(|entry| {
            let (k, v) = entry?;
            Ok((be_u64(&k[4..], "event key lsn")?, v))
        }))
    }

    /// The applied event at `lsn`, which an index says exists.
    pub fn event_at(&self, txn: &RoTxn, sid: SpaceId, lsn: u64) -> Result<Event, StoreError> {
        let bytes = self
            .events
            .get(txn, &event_key(sid, lsn))?
            .ok_or_else(|| StoreError::Corrupt(format!("an index names missing lsn {lsn}")))?;
        decode_event(bytes, format_args!("event at lsn {lsn}"))
    }

    /// One key's history with `from <= lsn <= to`, in lsn order (descending if
    /// `descending`), as `(lsn, conflict flag)`. Lazy: chunks are read as the
    /// iterator reaches them.
    pub fn history<'t>(
        &self,
        txn: &'t RoTxn,
        sid: SpaceId,
        key: &[u8],
        from: u64,
        to: u64,
        descending: bool,
    ) -> Result<History<'t>, StoreError> {
        let what = String::from_utf8_lossy(key).into_owned();
        let records = move |entry: Result<(&[u8], &[u8]), heed::Error>| {
            let chunk = entry.map_err(StoreError::from).and_then(|(k, v)| {
                decode_chunk(split_history_key(k)?.1, v, format_args!("{what:?}"))
            });
            match chunk {
                Ok(records) => records
                    .into_iter()
                    .map(|r| Ok((r.lsn, r.conflict())))
                    .collect::<Vec<_>>(),
                Err(e) => vec![Err(e)],
            }
        };
        let end = history_key_bytes(sid, key, to);
        if descending {
            let start = history_key_bytes(sid, key, 0);
            let range = (Bound::Included(&start[..]), Bound::Included(&end[..]));
            let iter = self.by_key.rev_range(txn, &range)?;
            return Ok(Box::new(
                iter.flat_map(move |entry| records(entry).into_iter().rev())
                    .filter(move |r| r.as_ref().map_or(true, |(lsn, _)| *lsn <= to))
                    .take_while(move |r| r.as_ref().map_or(true, |(lsn, _)| *lsn >= from)),
            ));
        }
        // The chunk holding `from` may start before it.
        let start = match self.chunk_at(txn, sid, key, from)? {
            Some((first, _)) => history_key_bytes(sid, key, first),
            None => history_key_bytes(sid, key, from),
        };
        let range = (Bound::Included(&start[..]), Bound::Included(&end[..]));
        let iter = self.by_key.range(txn, &range)?;
        Ok(Box::new(
            iter.flat_map(records)
                .filter(move |r| r.as_ref().map_or(true, |(lsn, _)| *lsn >= from))
                .take_while(move |r| r.as_ref().map_or(true, |(lsn, _)| *lsn <= to)),
        ))
    }

    /// The first record key at or after `from` (a record key or a prefix of one) that
    /// has a history, found with one lookup: `by_key` entries are ordered by key, then
    /// lsn.
    pub fn next_history_key(
        &self,
        txn: &RoTxn,
        sid: SpaceId,
        from: &[u8],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let mut start = Vec::with_capacity(4 + from.len());
        start.extend_from_slice(&sid.to_be_bytes());
        start.extend_from_slice(from);
        let range = (Bound::Included(&start[..]), Bound::Unbounded);
        let Some(entry) = self.by_key.range(txn, &range)?.next() else {
            return Ok(None);
        };
        let (k, _) = entry?;
        if !k.starts_with(&sid.to_be_bytes()) {
            return Ok(None);
        }
        Ok(Some(split_history_key(k)?.0.to_vec()))
    }
}
