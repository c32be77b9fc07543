//! Reads of the log in every shape: filtered, paginated pages in either direction
//! ([`Store::read_events`]), one key's history ([`Store::key_history`]) and a key's
//! value as of an earlier local position ([`Store::get_at`],
//! [`Store::merged_state_at`]).
//!
//! Every read runs on a blocking thread in one read transaction (`Store::read`), so a
//! page is a consistent snapshot, and the work one call does is bounded: at most
//! `limit` events returned and at most [`SCAN_BUDGET`] events examined, continuing
//! through an opaque [`Cursor`].

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;

use heed::RoTxn;
use weft_crdt::{Event, Op, Policy, SpaceName};

use crate::tables::{self, LogScan, SpaceId, Tables};
use crate::{Applied, Store, StoreError};

/// Most events one [`Store::read_events`] call examines (decodes and filters). A
/// filter that matches rarely returns a short (even empty) page with a cursor to go on
/// from, instead of scanning the whole log in one call.
pub const SCAN_BUDGET: usize = 10_000;

/// Where a [`Store::read_events`] page starts. Lsns are local positions (from 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// The first event of the log (descending: the page holds at most that event).
    Oldest,
    /// The current end of the log. Ascending, the page is empty and its cursor yields
    /// the events appended after this call: the start for following the log (as with
    /// a message log's "latest" offset). Descending, the page starts at the newest
    /// event: the newest `limit` events, newest first.
    Latest,
    /// The event at this lsn, inclusive.
    AtLsn(u64),
    /// The events strictly past this lsn in the direction of the read (ascending: from
    /// `lsn + 1`; descending: from `lsn - 1` down).
    AfterLsn(u64),
    /// Resume where a page's [`EventPage::next`] cursor points.
    Cursor(String),
}

impl From<Cursor> for Start {
    fn from(c: Cursor) -> Self {
        Start::Cursor(c.0)
    }
}

/// What [`Store::read_events`] reads: a start, optional filters, a page size and a
/// direction. Filters apply together (all must match).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventQuery {
    /// Where the page starts.
    pub start: Start,
    /// Only events whose key starts with this; `None` or empty: every key. Served
    /// from the key index, so a narrow prefix does not scan the log.
    pub key_prefix: Option<String>,
    /// Only puts or only deletes.
    pub op: Option<Op>,
    /// Only events of this application kind.
    pub kind: Option<String>,
    /// Most events on the page.
    pub limit: usize,
    /// Newest first instead of oldest first.
    pub descending: bool,
}

impl Default for EventQuery {
    /// Oldest first from the start of the log, unfiltered, 100 per page.
    fn default() -> Self {
        EventQuery {
            start: Start::Oldest,
            key_prefix: None,
            op: None,
            kind: None,
            limit: 100,
            descending: false,
        }
    }
}

/// An opaque position in a space's log, handed out by [`Store::read_events`]. Its text
/// (`c1-a-<lsn>` or `c1-d-<lsn>`: version, direction, next lsn to examine) may be
/// stored and sent to clients; only pass it back to the same store.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Cursor(String);

const CURSOR_VERSION: &str = "c1";

impl Cursor {
    fn new(next: u64, descending: bool) -> Self {
        let dir = if descending { "d" } else { "a" };
        Cursor(format!("{CURSOR_VERSION}-{dir}-{next}"))
    }

    /// The cursor's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The next lsn to examine, checking the version and the direction.
    fn parse(text: &str, descending: bool) -> Result<u64, StoreError> {
        let bad = |why: &str| StoreError::BadCursor(format!("{text:?}: {why}"));
        let mut parts = text.splitn(3, '-');
        let (Some(version), Some(dir), Some(lsn)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("not a cursor this store handed out"));
        };
        if version != CURSOR_VERSION {
            return Err(bad("unknown cursor version"));
        }
        match (dir, descending) {
            ("a", false) | ("d", true) => {}
            ("a", true) => return Err(bad("an ascending cursor used for a descending read")),
            ("d", false) => return Err(bad("a descending cursor used for an ascending read")),
            _ => return Err(bad("unknown direction")),
        }
        lsn.parse::<u64>()
            .map_err(|_| bad("the position is not a number"))
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<Cursor> for String {
    fn from(c: Cursor) -> String {
        c.0
    }
}

/// One page of [`Store::read_events`].
#[derive(Clone, Debug)]
pub struct EventPage {
    /// The matching events, in the read's direction.
    pub events: Vec<Applied>,
    /// Where the next page starts. Ascending reads always have one: at the end of the
    /// log it points past the last event, so reading from it later returns what was
    /// appended since. Descending reads have none once the oldest event was examined.
    pub next: Option<Cursor>,
    /// True when this read examined everything up to the current end of the log in
    /// its direction (with a short page, more matches may still follow: check this,
    /// not the page's length). May be false on a page that ends exactly at the end.
    pub at_end: bool,
}

/// The filters of a query, checked against decoded events.
struct Filter {
    op: Option<Op>,
    kind: Option<String>,
}

impl Filter {
    fn matches(&self, e: &Event) -> bool {
        self.op.is_none_or(|op| op == e.op) && self.kind.as_ref().is_none_or(|k| *k == e.kind)
    }
}

/// The scan's progress: the next lsn to examine, in the read's direction.
struct Scan {
    descending: bool,
    events: Vec<Applied>,
    /// Next lsn to examine (ascending: may be `last + 1`; descending: 0 when done).
    next: u64,
    exhausted: bool,
}

impl Scan {
    fn after(&mut self, lsn: u64) {
        self.next = if self.descending {
            lsn.saturating_sub(1)
        } else {
            lsn.saturating_add(1)
        };
    }

    fn finish(self, last: u64) -> EventPage {
        let (next, at_end) = if self.exhausted {
            (if self.descending { 0 } else { last + 1 }, true)
        } else {
            (self.next, false)
        };
        let at_end = at_end || (self.descending && next == 0);
        let next = (!self.descending || next > 0).then(|| Cursor::new(next, self.descending));
        EventPage {
            events: self.events,
            next,
            at_end,
        }
    }
}

impl Store {
    /// A page of the space's applied events: from `query.start`, in lsn order (or
    /// reversed), filtered by key prefix, op and kind, at most `query.limit`.
    ///
    /// Each call examines at most [`SCAN_BUDGET`] events, so a rare match may come
    /// back as a short page; go on with [`EventPage::next`] until
    /// [`EventPage::at_end`]. A cursor that does not parse, or that was made for the
    /// other direction, fails with [`StoreError::BadCursor`]. With a key prefix the
    /// store walks the key index of each matching key and merges them by lsn, so the
    /// cost is one lookup per matching key plus one per event returned, however long
    /// the log.
    pub async fn read_events(
        &self,
        space: &SpaceName,
        query: EventQuery,
    ) -> Result<EventPage, StoreError> {
        let descending = query.descending;
        // A bad cursor is the caller's mistake whether or not the space exists.
        if let Start::Cursor(c) = &query.start {
            Cursor::parse(c, descending)?;
        }
        let empty = EventPage {
            events: Vec::new(),
            next: (!descending).then(|| Cursor::new(1, false)),
            at_end: true,
        };
        let name = space.clone();
        self.read(space, empty, move |t, txn, sid| {
            let last = t.last_lsn(txn, sid)?;
            let first = match &query.start {
                Start::Oldest => 1,
                Start::Latest if descending => last,
                Start::Latest => last + 1,
                Start::AtLsn(n) => *n,
                Start::AfterLsn(n) if descending => n.saturating_sub(1),
                Start::AfterLsn(n) => n.saturating_add(1),
                Start::Cursor(c) => Cursor::parse(c, descending)?,
            };
            let first = if descending {
                first.min(last)
            } else {
                first.max(1)
            };
            let mut scan = Scan {
                descending,
                events: Vec::new(),
                next: first,
                exhausted: false,
            };
            let filter = Filter {
                op: query.op,
                kind: query.kind,
            };
            let nothing_left = if descending { first == 0 } else { first > last };
            if nothing_left {
                scan.exhausted = true;
            } else if query.limit > 0 {
                match query.key_prefix.as_deref().filter(|p| !p.is_empty()) {
                    Some(prefix) => {
                        scan_prefix(t, txn, sid, &name, prefix, &filter, query.limit, &mut scan)?
                    }
                    None => scan_log(t, txn, sid, &name, &filter, query.limit, &mut scan)?,
                }
            }
            Ok(scan.finish(last))
        })
        .await
    }

    /// Every applied event of `key`, in lsn order: those with lsn greater than `after`
    /// (all when `None`), at most `limit`. Read from the key index, so the cost does not
    /// depend on the rest of the log.
    pub async fn key_history(
        &self,
        space: &SpaceName,
        key: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Applied>, StoreError> {
        let key = key.to_owned();
        let name = space.clone();
        self.read(space, Vec::new(), move |t, txn, sid| {
            let Some(from) = after.unwrap_or(0).checked_add(1) else {
                return Ok(Vec::new());
            };
            let mut out = Vec::new();
            for entry in t
                .history(txn, sid, key.as_bytes(), from, u64::MAX, false)?
                .take(limit)
            {
                let (lsn, conflict) = entry?;
                out.push(Applied {
                    space: name.clone(),
                    lsn,
                    event: t.event_at(txn, sid, lsn)?,
                    conflict,
                });
            }
            Ok(out)
        })
        .await
    }

    /// The frontier `key` had when the event at local position `lsn` had just been
    /// applied (as the key index recorded it then), so the caller resolves it as it
    /// would [`Store::get`]'s. Sorted by id; empty when the key had no events by then.
    pub async fn get_at(
        &self,
        space: &SpaceName,
        key: &str,
        lsn: u64,
    ) -> Result<Vec<Event>, StoreError> {
        let key = key.to_owned();
        self.read(space, Vec::new(), move |t, txn, sid| {
            t.frontier_events_at(txn, sid, &key, lsn)
        })
        .await
    }

    /// In a merge space, the state `key` had when the event at local position `lsn`
    /// had just been applied: the space's merge folded over the key's history up to
    /// `lsn`, exactly as the writer folded it (a remote event the merge refused leaves
    /// the state as it was). `None` when the key had no state by then or the space is
    /// not a merge space; [`StoreError::PolicyNotConfigured`] when its recorded policy
    /// is a merge this process has not configured.
    pub async fn merged_state_at(
        &self,
        space: &SpaceName,
        key: &str,
        lsn: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let merge = match self.policy(space) {
            Some(Policy::Merge(m)) => Some(m),
            Some(Policy::Resolve(_)) => return Ok(None),
            None => None,
        };
        let key = key.to_owned();
        let name = space.clone();
        self.read(space, None, move |t, txn, sid| {
            let merge = match merge {
                Some(m) => m,
                None => match t.stored_policy(txn, sid)? {
                    Some(stored) if stored.merge => {
                        return Err(StoreError::PolicyNotConfigured {
                            space: name,
                            stored: stored.identity,
                        })
                    }
                    _ => return Ok(None),
                },
            };
            let mut state: Option<Vec<u8>> = None;
            for event in history_events(t, txn, sid, &key, lsn)? {
                if let Ok(new) = merge.apply(state.as_deref(), &event?) {
                    state = Some(new);
                }
            }
            Ok(state)
        })
        .await
    }
}

/// The events of `key` with lsn up to `to`, in lsn order.
fn history_events<'t>(
    t: &'t Tables,
    txn: &'t RoTxn,
    sid: SpaceId,
    key: &str,
    to: u64,
) -> Result<impl Iterator<Item = Result<Event, StoreError>> + 't, StoreError> {
    Ok(t.history(txn, sid, key.as_bytes(), 1, to, false)?
        .map(move |entry| entry.and_then(|(lsn, _)| t.event_at(txn, sid, lsn))))
}

/// The unfiltered-by-key case: walk the log from the scan's position.
fn scan_log(
    t: &Tables,
    txn: &RoTxn,
    sid: SpaceId,
    space: &SpaceName,
    filter: &Filter,
    limit: usize,
    scan: &mut Scan,
) -> Result<(), StoreError> {
    let mut iter: LogScan = if scan.descending {
        Box::new(t.events_down_from(txn, sid, scan.next)?)
    } else {
        Box::new(t.events_from(txn, sid, scan.next)?)
    };
    let mut examined = 0;
    loop {
        if scan.events.len() >= limit || examined >= SCAN_BUDGET {
            return Ok(());
        }
        let Some(entry) = iter.next() else {
            scan.exhausted = true;
            return Ok(());
        };
        let (lsn, bytes) = entry?;
        examined += 1;
        scan.after(lsn);
        let event = tables::decode_event(bytes, format_args!("event at lsn {lsn}"))?;
        if filter.matches(&event) {
            let conflict = t.history_conflict(txn, sid, &event.key, lsn)?;
            scan.events.push(Applied {
                space: space.clone(),
                lsn,
                event,
                conflict,
            });
        }
    }
}

/// The key-prefix case: every key under the prefix has its history in lsn order in
/// the key index; a heap merges them, one lookup per key to start and one per event to
/// advance.
#[allow(clippy::too_many_arguments)]
fn scan_prefix(
    t: &Tables,
    txn: &RoTxn,
    sid: SpaceId,
    space: &SpaceName,
    prefix: &str,
    filter: &Filter,
    limit: usize,
    scan: &mut Scan,
) -> Result<(), StoreError> {
    let descending = scan.descending;
    // The next lsn of a key's history at or past `from` in the read's direction.
    let next_of = |key: &[u8], from: u64| -> Result<Option<(u64, bool)>, StoreError> {
        let (lo, hi) = if descending {
            (1, from)
        } else {
            (from, u64::MAX)
        };
        if lo > hi {
            return Ok(None);
        }
        t.history(txn, sid, key, lo, hi, descending)?
            .next()
            .transpose()
    };
    // Heap entries order by lsn in the read's direction: ascending pops the smallest.
    let order = |lsn: u64| {
        if descending {
            Reverse(u64::MAX - lsn)
        } else {
            Reverse(lsn)
        }
    };
    let mut heap: BinaryHeap<(Reverse<u64>, usize)> = BinaryHeap::new();
    let mut keys: Vec<Vec<u8>> = Vec::new();
    let mut from = prefix.as_bytes().to_vec();
    while let Some(key) = t.next_history_key(txn, sid, &from)? {
        if !key.starts_with(prefix.as_bytes()) {
            break;
        }
        if let Some((lsn, _)) = next_of(&key, scan.next)? {
            heap.push((order(lsn), keys.len()));
        }
        // Past every entry of this key (its lsns follow a 0x00, and record keys hold
        // no control characters, so 0x01 sorts after them and before longer keys).
        from = key.clone();
        from.push(0x01);
        keys.push(key);
    }
    let mut examined = 0;
    loop {
        if scan.events.len() >= limit || examined >= SCAN_BUDGET {
            return Ok(());
        }
        let Some((Reverse(o), k)) = heap.pop() else {
            scan.exhausted = true;
            return Ok(());
        };
        let lsn = if descending { u64::MAX - o } else { o };
        examined += 1;
        scan.after(lsn);
        let key = &keys[k];
        let event = t.event_at(txn, sid, lsn)?;
        if event.key.as_bytes() != key.as_slice() {
            return Err(StoreError::Corrupt(format!(
                "by_key files lsn {lsn} under another key"
            )));
        }
        if filter.matches(&event) {
            let conflict = t.history_conflict(txn, sid, &event.key, lsn)?;
            scan.events.push(Applied {
                space: space.clone(),
                lsn,
                event,
                conflict,
            });
        }
        let step = if descending {
            lsn.checked_sub(1)
        } else {
            lsn.checked_add(1)
        };
        if let Some(from) = step {
            if let Some((next, _)) = next_of(key, from)? {
                heap.push((order(next), k));
            }
        }
    }
}
