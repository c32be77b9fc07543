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
//! | `by_key`   | sid, record key, 0x00, lsn (u64)     | flags (u8) or empty, see below |
//! | `frontier` | sid, record key                      | CBOR [`Frontier`]              |
//! | `vv`       | sid, origin (32 B)                   | highest contiguous seq (u64)   |
//! | `pending`  | sid, origin (32 B), seq (u64)        | canonical CBOR event           |
//! | `state`    | sid, record key                      | merge state (the `Merge`'s own bytes) |
//! | `space_meta` | sid, `policy` / `conflicts`        | CBOR [`StoredPolicy`] / u64    |
//!
//! A `by_key` value is empty or one byte of flags; [`HISTORY_CONFLICT`] says the key's
//! frontier held more than one event right after this event was applied, so
//! `events_since` can report `Applied::conflict` for old events too. (Layout 1 wrote
//! only empty values, which read as "no flags".)
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
use heed::{CommitOrAbort, Database, Env, RoTxn, WithoutTls};
use weft_crdt::{Event, EventHash, EventId, Frontier, NodeId, PolicyIdentity, VersionVector};

use crate::StoreError;

/// The id of a space inside the environment: a short, fixed-size stand-in for its name
/// in every key.
pub(crate) type SpaceId = u32;

/// Version of this layout, recorded in `meta` so a future layout can refuse or migrate
/// an old directory instead of misreading it.
///
/// 2 added `state`, `space_meta` and the `by_key` flags. A layout-1 directory is
/// upgraded on open (its conflict counters are computed once from `frontier`); a
/// layout-2 directory is refused by older builds, which would not keep the counters.
pub(crate) const FORMAT_VERSION: u32 = 2;

pub(crate) const META_FORMAT: &[u8] = b"format";
pub(crate) const META_NODE_ID: &[u8] = b"node_id";
pub(crate) const META_HLC: &[u8] = b"hlc";

/// `space_meta` fields, after the 4-byte space id.
pub(crate) const SPACE_POLICY: &[u8] = b"policy";
pub(crate) const SPACE_CONFLICTS: &[u8] = b"conflicts";

/// `by_key` value flag: the key was in conflict right after this event was applied.
pub(crate) const HISTORY_CONFLICT: u8 = 1;

/// Longest key any table uses: a `by_key` entry for a key of the maximum length.
pub(crate) const MAX_TABLE_KEY: usize = 4 + weft_crdt::limits::MAX_KEY_BYTES + 1 + 8;

/// Number of named databases; `max_dbs` is set with room for later tables.
pub(crate) const MAX_DBS: u32 = 16;

type Table = Database<'static, Bytes, Bytes>;

/// A key's history entries as `(lsn, conflict flag)`, in either direction.
pub(crate) type History<'t> = Box<dyn Iterator<Item = Result<(u64, bool), StoreError>> + 't>;

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
    pub frontier: Table,
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

pub(crate) fn frontier_key(sid: SpaceId, key: &str) -> Vec<u8> {
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

pub(crate) fn history_key(sid: SpaceId, key: &str, lsn: u64) -> Vec<u8> {
    history_key_bytes(sid, key.as_bytes(), lsn)
}

pub(crate) fn history_key_bytes(sid: SpaceId, key: &[u8], lsn: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + key.len() + 9);
    k.extend_from_slice(&sid.to_be_bytes());
    k.extend_from_slice(key);
    k.push(0);
    k.extend_from_slice(&lsn.to_be_bytes());
    k
}

pub(crate) fn decode_event(
    bytes: &[u8],
    what: impl std::fmt::Display,
) -> Result<Event, StoreError> {
    Event::decode(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

pub(crate) fn encode_frontier(f: &Frontier) -> Vec<u8> {
    encode_cbor(f, 8 + 44 * f.ids().len())
}

pub(crate) fn encode_cbor(value: &impl serde::Serialize, capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity);
    // Writing CBOR into a Vec cannot fail.
    ciborium::into_writer(value, &mut out)
        .unwrap_or_else(|e| unreachable!("CBOR encoding into a Vec failed: {e}"));
    out
}

pub(crate) fn decode_frontier(
    b: &[u8],
    what: impl std::fmt::Display,
) -> Result<Frontier, StoreError> {
    ciborium::from_reader(b).map_err(|e| StoreError::Corrupt(format!("frontier of {what}: {e}")))
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
                t("frontier")?,
                t("vv")?,
                t("pending")?,
                t("state")?,
                t("space_meta")?,
            );
            Ok::<_, heed::Error>(CommitOrAbort::<_, ()>::Commit(all))
        })?;
        let (spaces, meta, events, by_id, by_key, frontier, vv, pending, state, space_meta) = made
            .commit()
            .ok_or_else(|| StoreError::Corrupt("creating the tables was aborted".into()))?;
        Ok(Tables {
            spaces,
            meta,
            events,
            by_id,
            by_key,
            frontier,
            vv,
            pending,
            state,
            space_meta,
        })
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
                t("frontier")?,
                t("vv")?,
                t("pending")?,
                t("state")?,
                t("space_meta")?,
            );
            Ok::<_, StoreError>(CommitOrAbort::<_, ()>::Commit(all))
        })?;
        let (spaces, meta, events, by_id, by_key, frontier, vv, pending, state, space_meta) =
            opened
                .commit()
                .ok_or_else(|| StoreError::Corrupt("opening the tables was aborted".into()))?;
        Ok(Tables {
            spaces,
            meta,
            events,
            by_id,
            by_key,
            frontier,
            vv,
            pending,
            state,
            space_meta,
        })
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

    pub fn frontier(&self, txn: &RoTxn, sid: SpaceId, key: &str) -> Result<Frontier, StoreError> {
        match self.frontier.get(txn, &frontier_key(sid, key))? {
            Some(b) => decode_frontier(b, format_args!("{key:?}")),
            None => Ok(Frontier::new()),
        }
    }

    /// Every key of the space with its frontier, in key (byte) order.
    pub fn frontiers<'t>(
        &self,
        txn: &'t RoTxn,
        sid: SpaceId,
    ) -> Result<impl Iterator<Item = Result<(&'t [u8], Frontier), StoreError>> + 't, StoreError>
    {
        let iter = self.frontier.prefix_iter(txn, &sid.to_be_bytes())?;
        Ok(iter.map(|entry| {
            let (k, v) = entry?;
            let key = &k[4..];
            let frontier = decode_frontier(v, format_args!("{:?}", String::from_utf8_lossy(key)))?;
            Ok((key, frontier))
        }))
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

    /// Counts the conflicted keys by reading every frontier: the upgrade from layout 1,
    /// which kept no counter.
    pub fn count_conflicts(&self, txn: &RoTxn, sid: SpaceId) -> Result<u64, StoreError> {
        let mut n = 0;
        for entry in self.frontiers(txn, sid)? {
            if entry?.1.is_conflict() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Whether the key was in conflict right after the event at `lsn` was applied.
    pub fn history_conflict(
        &self,
        txn: &RoTxn,
        sid: SpaceId,
        key: &str,
        lsn: u64,
    ) -> Result<bool, StoreError> {
        let flags = self
            .by_key
            .get(txn, &history_key(sid, key, lsn))?
            .ok_or_else(|| {
                StoreError::Corrupt(format!("event at lsn {lsn} missing from by_key"))
            })?;
        Ok(flags.first().is_some_and(|f| f & HISTORY_CONFLICT != 0))
    }

    /// The applied event with this id.
    pub fn event_by_id(
        &self,
        txn: &RoTxn,
        sid: SpaceId,
        id: &EventId,
    ) -> Result<Event, StoreError> {
        let entry = self
            .id_entry(txn, sid, &id.origin, id.seq)?
            .ok_or_else(|| {
                StoreError::Corrupt(format!("frontier names {id}, which is not in the log"))
            })?;
        let bytes = self
            .events
            .get(txn, &event_key(sid, entry.lsn))?
            .ok_or_else(|| {
                StoreError::Corrupt(format!("by_id points {id} at missing lsn {}", entry.lsn))
            })?;
        decode_event(bytes, format_args!("event at lsn {}", entry.lsn))
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

    /// One key's history entries with `from <= lsn <= to`, in lsn order (descending if
    /// `descending`), as `(lsn, conflict flag)`.
    pub fn history<'t>(
        &self,
        txn: &'t RoTxn,
        sid: SpaceId,
        key: &[u8],
        from: u64,
        to: u64,
        descending: bool,
    ) -> Result<History<'t>, StoreError> {
        let start = history_key_bytes(sid, key, from);
        let end = history_key_bytes(sid, key, to);
        let range = (Bound::Included(&start[..]), Bound::Included(&end[..]));
        let parse = |entry: Result<(&[u8], &[u8]), heed::Error>| {
            let (k, v) = entry?;
            let lsn = be_u64(&k[k.len().saturating_sub(8)..], "by_key lsn")?;
            Ok((lsn, v.first().is_some_and(|f| f & HISTORY_CONFLICT != 0)))
        };
        Ok(if descending {
            Box::new(self.by_key.rev_range(txn, &range)?.map(parse))
        } else {
            Box::new(self.by_key.range(txn, &range)?.map(parse))
        })
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
        let key = k
            .get(4..k.len().saturating_sub(9))
            .ok_or_else(|| StoreError::Corrupt("by_key entry is too short".into()))?;
        Ok(Some(key.to_vec()))
    }
}
