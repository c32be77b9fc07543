//! Atomic multi-key transactions: how they are marked in events and recognised.
//!
//! A transaction is `n` consecutive events of one origin (seqs `first..first + n`),
//! written by [`crate::Store::append_transaction`] in one writer command, so locally
//! they commit together or not at all. Replicas must never show part of one either.
//! Each of its events carries, in its `meta`, the reserved entry
//! `weft.txn = "<first>/<n>"`. Every event names the whole group, not just the first:
//! whichever piece reaches a replica first, the replica knows exactly which ids
//! complete it, and the origin's signature stops anyone else from changing that (the
//! group's last event is always signed, and vouches for the others through their
//! `prev` hashes).
//!
//! On ingest, tagged events are always parked first; the release of parked events
//! applies a group only when the event at `first` is causally ready and every member is
//! parked and becomes ready in seq order, and then applies all of them in the same write
//! transaction (so subscribers and readers see all or nothing). A group never
//! completed stays parked, and so does everything that depends on it. Because members
//! are consecutive seqs of one origin, their own chain orders them and no other
//! origin's event can fall between them.
//!
//! Meta keys starting with `weft.` are reserved for the store: user writes with one are
//! refused.

use weft_crdt::{Event, EventError};

/// The meta key marking a transaction's events.
pub const TXN_META_KEY: &str = "weft.txn";

/// Meta keys with this prefix are reserved for the store.
pub const RESERVED_META_PREFIX: &str = "weft.";

/// Most writes in one transaction: all of them wait in memory and in the pending set
/// on replicas until the last arrives.
pub const MAX_TXN_WRITES: usize = 256;

/// The meta value for a transaction of `n` events from seq `first`.
pub(crate) fn tag(first: u64, n: u64) -> String {
    format!("{first}/{n}")
}

/// The longest tag, for checking meta limits before seqs are known.
pub(crate) fn longest_tag() -> String {
    tag(u64::MAX, MAX_TXN_WRITES as u64)
}

/// `(first, n)` when the event belongs to a transaction; an error when its tag is
/// malformed or does not cover the event's own seq (such an event is rejected on
/// ingest, identically on every replica).
pub(crate) fn group_of(event: &Event) -> Result<Option<(u64, u64)>, EventError> {
    let Some(value) = event.meta.get(TXN_META_KEY) else {
        return Ok(None);
    };
    let bad = || EventError::Malformed(format!("malformed transaction tag {value:?}"));
    let (first, n) = value.split_once('/').ok_or_else(bad)?;
    let first: u64 = first.parse().map_err(|_| bad())?;
    let n: u64 = n.parse().map_err(|_| bad())?;
    let covers = first >= 1
        && (1..=MAX_TXN_WRITES as u64).contains(&n)
        && event.seq >= first
        && event.seq - first < n;
    if covers {
        Ok(Some((first, n)))
    } else {
        Err(bad())
    }
}

/// Refuses user meta keys in the reserved namespace.
pub(crate) fn check_user_meta(
    meta: &std::collections::BTreeMap<String, String>,
) -> Result<(), EventError> {
    match meta.keys().find(|k| k.starts_with(RESERVED_META_PREFIX)) {
        Some(k) => Err(EventError::Malformed(format!(
            "meta key {k:?} is reserved: keys starting with {RESERVED_META_PREFIX:?} belong to the store"
        ))),
        None => Ok(()),
    }
}
