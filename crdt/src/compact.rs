//! The compact batch encoding: how a batch of events travels in a gossip message or a
//! pull page.
//!
//! An event's canonical encoding ([`Event::encode`]) repeats what the events of a batch
//! share: every event names its origin (32 bytes), every clock entry names its node
//! (32 bytes), and each event carries the hash of its predecessor, which the receiver can
//! compute itself when that predecessor is in the same batch. The compact form sends each
//! of those once per batch and decodes back to the very same [`Event`] values, so hashes,
//! hash chains and signatures verify exactly as for canonical events.
//!
//! ```text
//! batch  = [2, [node_id, ...], [event, ...]]          node ids: 32-byte byte strings
//! event  = [flags, origin, seq?, clock_delta, hlc_delta, key, kind?, payload, meta?,
//!           prev?, sig?]                                `?`: present when its flag is set
//! ```
//!
//! - `origin` and every clock entry refer to a node by its index in the batch's id list.
//! - Each event is coded against the previous event *of the same origin in the batch*
//!   (its "base"; for the first event of an origin, the base has seq 0, hlc 0 and an
//!   empty clock):
//!   - `seq` is sent only when it is not the base's seq + 1 ([`SEQ`]);
//!   - `clock_delta` is a flat array `[index, value, index, value, ...]` of the clock
//!     entries that differ from the base's clock, a value of 0 removing an entry. The
//!     origin's own entry is implied to be `seq` unless the delta names the origin;
//!   - `hlc_delta` is the distance from the base's hlc, forward unless [`HLC_BACK`];
//!   - `prev` is sent only when it is not implied ([`PREV`], then `null` or 32 bytes):
//!     implied is nothing for seq 1 and, above, the hash of the base, which must then
//!     be the event of seq − 1; the decoder recomputes that hash.
//! - `kind` and `meta` are sent only when non-empty ([`KIND`], [`META`]), `sig` only for
//!   a signed event ([`SIGNED`]); a delete sets [`DELETE`]. Unknown flags are refused.
//!
//! Version 1 of the batch format was `[1, [event, ...]]` of canonical events; this build reads and writes only version 2, and
//! names both versions when it refuses another.
//!
//! **Limits.** A hostile batch could make a few bytes decode to large events (a long
//! clock inherited by every following event costs one byte per event on the wire), so
//! [`decode_batch`] takes a budget for the decoded events, counted as their canonical
//! encodings, and stops as soon as the batch exceeds it; every event is also held to
//! [`Event::validate`] and [`MAX_EVENT_BYTES`], and every count read from the input is
//! checked against the bytes left before anything is reserved for it. Senders size
//! batches by the same measure ([`BatchEncoder::event_bytes`]), so an honest batch
//! always fits the budget its receiver applies.
//!
//! The bytes are CBOR, read and written by the small codec at the end of this module
//! rather than through serde: ciborium's public entry points take no state, and the
//! decoder needs the budget and the batch's dictionary while it reads, so that it never
//! builds more than the budget allows.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use thiserror::Error;

use crate::clock::VectorClock;
use crate::codec::{head_len, Writer, ARRAY, BYTES, MAP, NULL, TEXT, UINT};
use crate::error::EventError;
use crate::event::{Event, EventHash, Op};
use crate::hlc::Hlc;
use crate::id::NodeId;
use crate::limits::{MAX_CLOCK_ENTRIES, MAX_EVENT_BYTES};

/// The version of the compact batch format this build reads and writes.
pub const BATCH_VERSION: u64 = 2;

/// Flag: the event carries a signature.
pub const SIGNED: u64 = 1;
/// Flag: `seq` is sent (it is not the base's seq + 1).
pub const SEQ: u64 = 1 << 1;
/// Flag: `prev` is sent (it is not implied by the base).
pub const PREV: u64 = 1 << 2;
/// Flag: the event is a delete.
pub const DELETE: u64 = 1 << 3;
/// Flag: `kind` is sent (it is not empty).
pub const KIND: u64 = 1 << 4;
/// Flag: `meta` is sent (it is not empty).
pub const META: u64 = 1 << 5;
/// Flag: the hlc is *below* the base's by `hlc_delta`.
pub const HLC_BACK: u64 = 1 << 6;

const KNOWN_FLAGS: u64 = SIGNED | SEQ | PREV | DELETE | KIND | META | HLC_BACK;

/// Why a compact batch could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BatchError {
    /// The batch is of a format version this build does not read.
    #[error("unsupported event batch version {found} (this build reads version {supported})")]
    UnsupportedVersion {
        /// Version found in the batch.
        found: u64,
        /// Version this build reads.
        supported: u64,
    },
    /// The bytes are not a well-formed compact batch.
    #[error("malformed event batch: {0}")]
    Malformed(String),
    /// The decoded events, in canonical encoding, exceed the caller's budget.
    #[error("event batch holds more than {limit} bytes of events")]
    TooLarge {
        /// The budget, in bytes of canonical event encodings.
        limit: usize,
    },
    /// An event decodes but is invalid (malformed or over a limit).
    #[error("event {index} of the batch is invalid: {source}")]
    Event {
        /// Its position in the batch, from 0.
        index: usize,
        /// What is wrong with it.
        source: EventError,
    },
}

/// What the next event of an origin is coded against.
#[derive(Clone, Debug, Default)]
struct Base {
    seq: u64,
    hlc: u64,
    clock: VectorClock,
    /// Hash of the event; `None` for the empty base before an origin's first event.
    hash: Option<EventHash>,
}

/// Builds one compact batch, event by event, in the order given.
///
/// Keeps, per origin, the last event pushed (its seq, hlc, clock and hash) and the ids
/// seen so far; [`BatchEncoder::finish`] writes the id list in front of the events.
#[derive(Debug, Default)]
pub struct BatchEncoder {
    ids: Vec<NodeId>,
    index: HashMap<NodeId, u64>,
    bases: HashMap<NodeId, Base>,
    body: Vec<u8>,
    events: usize,
    event_bytes: usize,
}

impl BatchEncoder {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of events pushed.
    pub fn len(&self) -> usize {
        self.events
    }

    /// True when no event was pushed.
    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// Total length of the pushed events' canonical encodings: the measure
    /// [`decode_batch`]'s budget is counted in.
    pub fn event_bytes(&self) -> usize {
        self.event_bytes
    }

    /// The exact length [`BatchEncoder::finish`] will return.
    pub fn encoded_len(&self) -> usize {
        head_len(3)
            + head_len(BATCH_VERSION)
            + head_len(self.ids.len() as u64)
            + self.ids.len() * (head_len(32) + 32)
            + head_len(self.events as u64)
            + self.body.len()
    }

    fn id(&mut self, node: NodeId) -> u64 {
        let next = self.ids.len() as u64;
        *self.index.entry(node).or_insert_with(|| {
            self.ids.push(node);
            next
        })
    }

    /// Appends `event`, coded against the previous event of its origin in this batch.
    pub fn push(&mut self, event: &Event) {
        self.push_encoded(event, &event.encode());
    }

    /// [`BatchEncoder::push`] for a caller that already holds the event's canonical
    /// encoding (to size a batch, say), which must be `event.encode()`: its hash is what
    /// the next event of the origin is checked against.
    pub fn push_encoded(&mut self, event: &Event, canonical: &[u8]) {
        debug_assert!(
            canonical == event.encode().as_slice(),
            "push_encoded needs the event's canonical encoding"
        );
        self.event_bytes += canonical.len();
        let hash = EventHash(*blake3::hash(canonical).as_bytes());
        let base = self.bases.remove(&event.origin).unwrap_or_default();
        let origin = self.id(event.origin);

        let mut delta: Vec<(u64, u64)> = Vec::new();
        for (node, seq) in event.clock.iter() {
            if *node != event.origin && base.clock.get(node) != seq {
                delta.push((self.id(*node), seq));
            }
        }
        for (node, _) in base.clock.iter() {
            if *node != event.origin && event.clock.get(node) == 0 {
                delta.push((self.id(*node), 0));
            }
        }
        let own = event.clock.get(&event.origin);
        if own != event.seq {
            delta.push((origin, own));
        }

        let implied_prev = match (event.seq, base.hash) {
            (1, _) => None,
            (seq, Some(h)) if base.seq.checked_add(1) == Some(seq) => Some(h),
            _ => None,
        };
        let prev_implied = event.prev == implied_prev && (event.seq == 1 || implied_prev.is_some());
        let mut flags = 0;
        if event.sig.is_some() {
            flags |= SIGNED;
        }
        if base.seq.checked_add(1) != Some(event.seq) {
            flags |= SEQ;
        }
        if !prev_implied {
            flags |= PREV;
        }
        if event.op == Op::Delete {
            flags |= DELETE;
        }
        if !event.kind.is_empty() {
            flags |= KIND;
        }
        if !event.meta.is_empty() {
            flags |= META;
        }
        if event.hlc.0 < base.hlc {
            flags |= HLC_BACK;
        }

        let fields = 6 + [SEQ, KIND, META, PREV, SIGNED]
            .iter()
            .filter(|f| flags & **f != 0)
            .count();
        let mut w = Writer::new(&mut self.body);
        w.array(fields);
        w.uint(flags);
        w.uint(origin);
        if flags & SEQ != 0 {
            w.uint(event.seq);
        }
        w.array(2 * delta.len());
        for (index, seq) in delta {
            w.uint(index);
            w.uint(seq);
        }
        w.uint(event.hlc.0.abs_diff(base.hlc));
        w.text(&event.key);
        if flags & KIND != 0 {
            w.text(&event.kind);
        }
        w.bytes(&event.payload);
        if flags & META != 0 {
            w.map(event.meta.len());
            for (k, v) in &event.meta {
                w.text(k);
                w.text(v);
            }
        }
        if flags & PREV != 0 {
            match &event.prev {
                Some(h) => w.bytes(&h.0),
                None => w.null(),
            }
        }
        if let Some(sig) = &event.sig {
            w.bytes(sig);
        }

        self.events += 1;
        self.bases.insert(
            event.origin,
            Base {
                seq: event.seq,
                hlc: event.hlc.0,
                clock: event.clock.clone(),
                hash: Some(hash),
            },
        );
    }

    /// The encoded batch.
    pub fn finish(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        let mut w = Writer::new(&mut out);
        w.array(3);
        w.uint(BATCH_VERSION);
        w.array(self.ids.len());
        for id in &self.ids {
            w.bytes(id.as_bytes());
        }
        w.array(self.events);
        out.extend_from_slice(&self.body);
        out
    }
}

/// Encodes `events`, in the order given, as one compact batch.
pub fn encode_batch(events: &[Event]) -> Vec<u8> {
    let mut batch = BatchEncoder::new();
    for e in events {
        batch.push(e);
    }
    batch.finish()
}

/// Decodes a compact batch into its events, in batch order, each structurally valid
/// ([`Event::validate`]); signatures are not checked here.
///
/// `max_event_bytes` bounds the decoded events, measured as the total length of their
/// canonical encodings; a batch beyond it fails with [`BatchError::TooLarge`] before
/// more is decoded.
pub fn decode_batch(bytes: &[u8], max_event_bytes: usize) -> Result<Vec<Event>, BatchError> {
    let mut r = Reader::new(bytes);
    let items = r.array()?;
    if items == 0 {
        return Err(malformed("empty batch array: missing the version"));
    }
    let version = r.uint()?;
    if version != BATCH_VERSION {
        return Err(BatchError::UnsupportedVersion {
            found: version,
            supported: BATCH_VERSION,
        });
    }
    if items != 3 {
        return Err(malformed(format!(
            "a batch has 3 elements, this one has {items}"
        )));
    }

    let n_ids = r.array()?;
    let mut ids = Vec::with_capacity(r.cap(n_ids, 33));
    for _ in 0..n_ids {
        let b = r.bytes()?;
        let id: [u8; 32] = b
            .try_into()
            .map_err(|_| malformed(format!("node id must be 32 bytes, got {}", b.len())))?;
        ids.push(NodeId::from_bytes(id));
    }
    let mut bases: Vec<Option<Base>> = vec![None; ids.len()];

    let n_events = r.array()?;
    let mut events = Vec::with_capacity(r.cap(n_events, 8));
    let mut total = 0usize;
    for index in 0..n_events {
        let index = usize::try_from(index).unwrap_or(usize::MAX);
        let (origin, event) = decode_event(&mut r, &ids, &bases, index)?;
        event
            .validate()
            .map_err(|source| BatchError::Event { index, source })?;
        let canonical = event.encode();
        if canonical.len() > MAX_EVENT_BYTES {
            return Err(BatchError::Event {
                index,
                source: EventError::Limit(format!(
                    "event is {} bytes; the limit is {MAX_EVENT_BYTES}",
                    canonical.len()
                )),
            });
        }
        total = total.saturating_add(canonical.len());
        if total > max_event_bytes {
            return Err(BatchError::TooLarge {
                limit: max_event_bytes,
            });
        }
        bases[origin] = Some(Base {
            seq: event.seq,
            hlc: event.hlc.0,
            clock: event.clock.clone(),
            hash: Some(EventHash(*blake3::hash(&canonical).as_bytes())),
        });
        events.push(event);
    }
    if !r.is_empty() {
        return Err(malformed(format!(
            "{} bytes after the end of the batch",
            r.remaining()
        )));
    }
    Ok(events)
}

/// Reads one event; returns its origin's index in `ids` with it.
fn decode_event(
    r: &mut Reader<'_>,
    ids: &[NodeId],
    bases: &[Option<Base>],
    index: usize,
) -> Result<(usize, Event), BatchError> {
    let fields = r.array()?;
    let flags = r.uint()?;
    if flags & !KNOWN_FLAGS != 0 {
        return Err(malformed(format!("unknown event flags {flags:#x}")));
    }
    let expected = 6 + [SEQ, KIND, META, PREV, SIGNED]
        .iter()
        .filter(|f| flags & **f != 0)
        .count() as u64;
    if fields != expected {
        return Err(malformed(format!(
            "an event with flags {flags:#x} has {expected} fields, this one has {fields}"
        )));
    }
    let node = |i: u64| -> Result<(usize, NodeId), BatchError> {
        usize::try_from(i)
            .ok()
            .and_then(|i| ids.get(i).map(|id| (i, *id)))
            .ok_or_else(|| {
                malformed(format!(
                    "node index {i} is past the batch's {} ids",
                    ids.len()
                ))
            })
    };
    let (at, origin) = node(r.uint()?)?;
    let empty = Base::default();
    let base = bases[at].as_ref().unwrap_or(&empty);

    let seq = if flags & SEQ != 0 {
        r.uint()?
    } else {
        base.seq
            .checked_add(1)
            .ok_or_else(|| malformed("seq overflows"))?
    };

    let delta = r.array()?;
    if delta % 2 != 0 {
        return Err(malformed("a clock delta has an odd number of items"));
    }
    if delta / 2 > 2 * MAX_CLOCK_ENTRIES as u64 {
        return Err(malformed(format!(
            "a clock delta of {} entries is longer than two full clocks",
            delta / 2
        )));
    }
    let mut clock = base.clock.clone();
    let mut own_named = false;
    for _ in 0..delta / 2 {
        let (_, n) = node(r.uint()?)?;
        let value = r.uint()?;
        own_named |= n == origin;
        clock.set(n, value);
        if clock.len() > MAX_CLOCK_ENTRIES + 1 {
            return Err(BatchError::Event {
                index,
                source: EventError::Limit(format!(
                    "clock has more than {MAX_CLOCK_ENTRIES} entries"
                )),
            });
        }
    }
    if !own_named {
        clock.set(origin, seq);
    }

    let d = r.uint()?;
    let hlc = if flags & HLC_BACK != 0 {
        base.hlc.checked_sub(d)
    } else {
        base.hlc.checked_add(d)
    }
    .ok_or_else(|| malformed("hlc delta leaves the range of an hlc"))?;

    let key = r.text()?.to_owned();
    let kind = if flags & KIND != 0 {
        r.text()?.to_owned()
    } else {
        String::new()
    };
    let payload = r.bytes()?.to_vec();
    let mut meta = BTreeMap::new();
    if flags & META != 0 {
        let n = r.map()?;
        for _ in 0..n {
            let k = r.text()?.to_owned();
            let v = r.text()?.to_owned();
            meta.insert(k, v);
        }
    }
    let prev = if flags & PREV != 0 {
        if r.null()? {
            None
        } else {
            Some(EventHash(fixed(r.bytes()?, "prev")?))
        }
    } else if seq == 1 {
        None
    } else {
        match base.hash {
            Some(h) if base.seq.checked_add(1) == Some(seq) => Some(h),
            _ => {
                return Err(malformed(format!(
                    "prev of {origin}:{seq} is omitted but its predecessor is not in the batch before it"
                )))
            }
        }
    };
    let sig = if flags & SIGNED != 0 {
        Some(fixed(r.bytes()?, "sig")?)
    } else {
        None
    };
    let event = Event {
        origin,
        seq,
        clock,
        hlc: Hlc(hlc),
        key,
        op: if flags & DELETE != 0 {
            Op::Delete
        } else {
            Op::Put
        },
        kind,
        payload,
        meta,
        prev,
        sig,
    };
    Ok((at, event))
}

fn fixed<const N: usize>(b: &[u8], field: &str) -> Result<[u8; N], BatchError> {
    b.try_into()
        .map_err(|_| malformed(format!("{field} must be {N} bytes, got {}", b.len())))
}

fn malformed(reason: impl fmt::Display) -> BatchError {
    BatchError::Malformed(reason.to_string())
}

// The CBOR subset of compact batches is the one of canonical events
// (`crate::codec`): unsigned integers, byte and text strings, arrays and maps of
// definite length, and null; every head written in its shortest form. Batches are
// written with `codec::Writer`; they are read with the `Reader` below, which, unlike
// the codec's strict one, names what it found wrong (a batch comes from a peer).

/// Reads that CBOR subset from a byte slice. Every length is checked against the
/// bytes left before it is used, so no input can make it read out of bounds or reserve
/// more than the input's size.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// How many of `count` items of at least `min_size` bytes each the rest of the
    /// input can hold: a safe capacity to reserve.
    fn cap(&self, count: u64, min_size: usize) -> usize {
        usize::try_from(count)
            .unwrap_or(usize::MAX)
            .min(self.buf.len() / min_size.max(1))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], BatchError> {
        if n > self.buf.len() {
            return Err(malformed("the batch ends in the middle of an item"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn head(&mut self, major: u8, what: &str) -> Result<u64, BatchError> {
        let initial = self.take(1)?[0];
        if initial >> 5 != major {
            return Err(malformed(format!(
                "expected {what}, found CBOR major type {}",
                initial >> 5
            )));
        }
        let n = match initial & 0x1f {
            n @ 0..=23 => u64::from(n),
            24 => u64::from(self.take(1)?[0]),
            25 => u64::from(u16::from_be_bytes(fixed(self.take(2)?, "length")?)),
            26 => u64::from(u32::from_be_bytes(fixed(self.take(4)?, "length")?)),
            27 => u64::from_be_bytes(fixed(self.take(8)?, "length")?),
            _ => {
                return Err(malformed(format!(
                    "expected {what} of definite length, found initial byte {initial:#04x}"
                )))
            }
        };
        Ok(n)
    }

    fn uint(&mut self) -> Result<u64, BatchError> {
        self.head(UINT, "an unsigned integer")
    }

    fn array(&mut self) -> Result<u64, BatchError> {
        self.head(ARRAY, "an array")
    }

    fn map(&mut self) -> Result<u64, BatchError> {
        self.head(MAP, "a map")
    }

    fn bytes(&mut self) -> Result<&'a [u8], BatchError> {
        let n = self.head(BYTES, "a byte string")?;
        self.take(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn text(&mut self) -> Result<&'a str, BatchError> {
        let n = self.head(TEXT, "a text string")?;
        let b = self.take(usize::try_from(n).unwrap_or(usize::MAX))?;
        std::str::from_utf8(b).map_err(|_| malformed("text string is not UTF-8"))
    }

    /// Consumes a `null` if one is next.
    fn null(&mut self) -> Result<bool, BatchError> {
        match self.buf.first() {
            Some(&NULL) => {
                self.take(1)?;
                Ok(true)
            }
            Some(_) => Ok(false),
            None => Err(malformed("the batch ends in the middle of an item")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::Replica;
    use crate::{PolicyKind, SigningKey, SpaceName, UnsignedEvent};
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const BUDGET: usize = 64 << 20;

    fn space() -> SpaceName {
        SpaceName::new("compact").unwrap()
    }

    fn replicas(n: usize) -> Vec<Replica> {
        (0..n)
            .map(|i| {
                Replica::new(
                    space(),
                    PolicyKind::Lww.policy(),
                    SigningKey::from_bytes(&[i as u8 + 1; 32]),
                )
            })
            .collect()
    }

    /// A history of `writes` writes by several replicas that now and then take in each
    /// other's events, so clocks grow several entries; runs of up to 4 events are signed
    /// only at their end. Returns every event written, in write order.
    fn history(seed: u64, nodes: usize, writes: usize) -> Vec<Event> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut rs = replicas(nodes);
        let mut all = Vec::new();
        let mut wall = 1_700_000_000_000u64;
        while all.len() < writes {
            let w = rng.gen_range(0..nodes);
            wall += rng.gen_range(0..3);
            let run: Vec<(String, Op, Vec<u8>)> = (0..rng.gen_range(1..=4))
                .map(|_| {
                    let key = format!("k/{}", rng.gen_range(0..20));
                    if rng.gen_bool(0.1) {
                        (key, Op::Delete, Vec::new())
                    } else {
                        let len = rng.gen_range(0..40);
                        (key, Op::Put, (0..len).map(|_| rng.gen()).collect())
                    }
                })
                .collect();
            let evs = rs[w].write_run(run, wall).unwrap();
            all.extend(evs);
            if rng.gen_bool(0.3) {
                let to = rng.gen_range(0..nodes);
                if to != w {
                    let mine: Vec<Event> = rs[w].events().cloned().collect();
                    rs[to].ingest(mine).unwrap();
                }
            }
        }
        all
    }

    fn round_trip(events: &[Event]) {
        let bytes = encode_batch(events);
        let mut enc = BatchEncoder::new();
        for e in events {
            enc.push(e);
        }
        assert_eq!(enc.encoded_len(), bytes.len(), "encoded_len is exact");
        assert_eq!(
            enc.event_bytes(),
            events.iter().map(|e| e.encode().len()).sum::<usize>()
        );
        let back = decode_batch(&bytes, BUDGET).unwrap();
        assert_eq!(back.len(), events.len());
        for (a, b) in events.iter().zip(&back) {
            assert_eq!(a, b);
            assert_eq!(a.encode(), b.encode(), "canonical bytes are identical");
            assert_eq!(a.hash(), b.hash());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn random_batches_round_trip_exactly(
            seed in any::<u64>(),
            nodes in 1usize..5,
            writes in 0usize..60,
            pick in any::<u64>(),
            reorder in 0u8..3,
        ) {
            let all = history(seed, nodes, writes);
            // A subset (events missing from the middle of a chain) in log order,
            // reversed, or shuffled: every order must round-trip.
            let mut rng = StdRng::seed_from_u64(pick);
            let mut batch: Vec<Event> = all.into_iter().filter(|_| rng.gen_bool(0.8)).collect();
            match reorder {
                0 => {}
                1 => batch.reverse(),
                _ => {
                    for i in (1..batch.len()).rev() {
                        batch.swap(i, rng.gen_range(0..=i));
                    }
                }
            }
            round_trip(&batch);
            // Signatures and hash chains verify on the decoded events as on the originals.
            let back = decode_batch(&encode_batch(&batch), BUDGET).unwrap();
            prop_assert_eq!(
                crate::sync::verify_batch(&space(), &back).is_ok(),
                crate::sync::verify_batch(&space(), &batch).is_ok()
            );
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_batch(&bytes, BUDGET);
        }

        #[test]
        fn mutated_batches_never_panic_and_decode_only_to_valid_events(
            seed in any::<u64>(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        ) {
            let mut bytes = encode_batch(&history(seed, 3, 12));
            for (at, x) in flips {
                let i = at % bytes.len();
                bytes[i] ^= x.max(1);
            }
            if let Ok(events) = decode_batch(&bytes, BUDGET) {
                for e in events {
                    prop_assert!(e.validate().is_ok());
                }
            }
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = encode_batch(&history(7, 3, 20));
        for n in 0..bytes.len() {
            assert!(decode_batch(&bytes[..n], BUDGET).is_err(), "prefix of {n}");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        let err = decode_batch(&extra, BUDGET).unwrap_err().to_string();
        assert!(err.contains("after the end"), "{err}");
    }

    #[test]
    fn a_run_of_one_origin_costs_little_beyond_key_value_and_signature() {
        let mut r = replicas(1).remove(0);
        let events: Vec<Event> = (0..100)
            .map(|i| {
                r.write(
                    &format!("todos/{i}"),
                    Op::Put,
                    vec![0x41; 20],
                    1_700_000_000_000 + i,
                )
                .unwrap()
            })
            .collect();
        let bytes = encode_batch(&events);
        let canonical: usize = events.iter().map(|e| e.encode().len()).sum();
        let content: usize = events.iter().map(|e| e.key.len() + e.payload.len()).sum();
        let per_event = (bytes.len() - content) / events.len();
        // A signature (66 bytes with its head) plus a few bytes of fields.
        assert!(per_event <= 66 + 16, "{per_event} bytes per event");
        assert!(
            bytes.len() * 2 < canonical,
            "{} vs {canonical}",
            bytes.len()
        );
        round_trip(&events);
    }

    fn unsigned(origin: NodeId, seq: u64, clock: VectorClock, hlc: u64) -> UnsignedEvent {
        UnsignedEvent {
            origin,
            seq,
            clock,
            hlc: Hlc(hlc),
            key: "k".into(),
            op: Op::Put,
            kind: String::new(),
            payload: vec![1],
            meta: BTreeMap::new(),
            prev: None,
        }
    }

    #[test]
    fn unusual_but_valid_events_round_trip() {
        let k = SigningKey::from_bytes(&[3; 32]);
        let o = NodeId::of(&k);
        let x = NodeId::from_bytes([9; 32]);
        let y = NodeId::from_bytes([8; 32]);
        // Seq gaps, a foreign prev, a shrinking clock, a decreasing hlc, kind and meta,
        // a delete, and the same event twice.
        let mut a = unsigned(o, 5, [(o, 5), (x, 3), (y, 1)].into_iter().collect(), 900);
        a.prev = Some(EventHash([4; 32]));
        a.kind = "Renamed".into();
        a.meta = [("user".to_string(), "ann".to_string())].into();
        let a = a.sign(&space(), &k);
        let mut b = unsigned(o, 6, [(o, 6), (x, 2)].into_iter().collect(), 100);
        b.prev = Some(EventHash([5; 32])); // not a's hash: must be sent
        b.op = Op::Delete;
        b.payload = Vec::new();
        let b = b.seal_unsigned();
        let mut c = unsigned(o, 9, [(o, 9)].into_iter().collect(), u64::MAX);
        c.prev = Some(EventHash([6; 32]));
        let c = c.sign(&space(), &k);
        let d = unsigned(o, 1, [(o, 1)].into_iter().collect(), 0).sign(&space(), &k);
        // The largest seq, then an event coded against it.
        let mut e = unsigned(o, u64::MAX, [(o, u64::MAX)].into_iter().collect(), 5);
        e.prev = Some(EventHash([2; 32]));
        let e = e.sign(&space(), &k);
        round_trip(&[
            a.clone(),
            b,
            c.clone(),
            d.clone(),
            a.clone(),
            a,
            e.clone(),
            c,
            d,
            e,
        ]);
        round_trip(&[]);
    }

    #[test]
    fn unknown_versions_and_flags_are_refused_clearly() {
        let events = history(1, 2, 3);
        let mut bytes = encode_batch(&events);
        assert_eq!(bytes[1], BATCH_VERSION as u8);
        bytes[1] = 7;
        assert_eq!(
            decode_batch(&bytes, BUDGET).unwrap_err(),
            BatchError::UnsupportedVersion {
                found: 7,
                supported: BATCH_VERSION
            }
        );
        // A version 1 batch (canonical events) names both versions.
        let mut v1 = Vec::new();
        ciborium::into_writer(&(1u64, &events), &mut v1).unwrap();
        let err = decode_batch(&v1, BUDGET).unwrap_err().to_string();
        assert!(
            err.contains("version 1") && err.contains("version 2"),
            "{err}"
        );

        let mut out = Vec::new();
        let mut w = Writer::new(&mut out);
        w.array(3);
        w.uint(BATCH_VERSION);
        w.array(0);
        w.array(1);
        w.array(6);
        w.uint(1 << 7);
        let err = decode_batch(&out, BUDGET).unwrap_err().to_string();
        assert!(err.contains("unknown event flags"), "{err}");
    }

    /// A batch of one event with the given flags and fields after `origin`: a single
    /// origin (id 0, seq 2 when `SEQ` is set), an empty clock delta and hlc 1.
    fn one_event(flags: u64, tail: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out);
        w.array(3);
        w.uint(BATCH_VERSION);
        w.array(1);
        w.bytes(&[7; 32]);
        w.array(1);
        let fields = 6 + [SEQ, KIND, META, PREV, SIGNED]
            .iter()
            .filter(|f| flags & **f != 0)
            .count();
        w.array(fields);
        w.uint(flags);
        w.uint(0);
        if flags & SEQ != 0 {
            w.uint(2);
        }
        w.array(0);
        w.uint(1);
        w.text("k");
        w.bytes(&[]);
        tail(&mut out);
        out
    }

    #[test]
    fn an_omitted_prev_needs_its_predecessor_in_the_batch() {
        let events = history(2, 1, 3);
        // Alone, an event of seq 2 sends its prev explicitly...
        let alone = encode_batch(&events[1..2]);
        assert_eq!(decode_batch(&alone, BUDGET).unwrap(), events[1..2]);
        // ...and a batch that claims it is implied is refused.
        let forged = one_event(SEQ, |_| {});
        let err = decode_batch(&forged, BUDGET).unwrap_err().to_string();
        assert!(err.contains("predecessor is not in the batch"), "{err}");
        // With it explicit, the same event decodes.
        let explicit = one_event(SEQ | PREV, |out| Writer::new(out).bytes(&[1; 32]));
        let e = decode_batch(&explicit, BUDGET).unwrap().remove(0);
        assert_eq!((e.seq, e.prev), (2, Some(EventHash([1; 32]))));
        let bad = one_event(SEQ | PREV, |out| Writer::new(out).bytes(&[1; 31]));
        let err = decode_batch(&bad, BUDGET).unwrap_err().to_string();
        assert!(err.contains("prev must be 32 bytes"), "{err}");
    }

    #[test]
    fn an_inherited_long_clock_cannot_inflate_past_the_budget() {
        // The first event carries a clock of the maximum size; every following event
        // inherits it for a few bytes on the wire.
        let k = SigningKey::from_bytes(&[3; 32]);
        let o = NodeId::of(&k);
        let mut clock: VectorClock = (0..MAX_CLOCK_ENTRIES as u32 - 1)
            .map(|i| {
                let mut b = [0u8; 32];
                b[..4].copy_from_slice(&i.to_be_bytes());
                (NodeId::from_bytes(b), 1)
            })
            .collect();
        let mut events = Vec::new();
        let mut prev = None;
        for seq in 1..=300 {
            clock.set(o, seq);
            let mut e = unsigned(o, seq, clock.clone(), seq);
            e.prev = prev;
            let e = e.seal_unsigned();
            prev = Some(e.hash());
            events.push(e);
        }
        let bytes = encode_batch(&events);
        let canonical: usize = events.iter().map(|e| e.encode().len()).sum();
        assert!(
            bytes.len() * 100 < canonical,
            "{} vs {canonical}",
            bytes.len()
        );
        let limit = 1 << 20;
        assert_eq!(
            decode_batch(&bytes, limit).unwrap_err(),
            BatchError::TooLarge { limit }
        );
        assert_eq!(decode_batch(&bytes, canonical).unwrap(), events);

        // A clock delta beyond the entry limit is refused as it is read.
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out);
        w.array(3);
        w.uint(BATCH_VERSION);
        let n = MAX_CLOCK_ENTRIES as u64 + 2;
        w.array(n as usize);
        for i in 0..n {
            let mut b = [0u8; 32];
            b[..8].copy_from_slice(&i.to_be_bytes());
            w.bytes(&b);
        }
        w.array(1);
        w.array(6);
        w.uint(0);
        w.uint(0);
        w.array(2 * n as usize);
        for i in 0..n {
            w.uint(i);
            w.uint(1);
        }
        let err = decode_batch(&out, BUDGET).unwrap_err().to_string();
        assert!(err.contains("clock has more than"), "{err}");
    }

    #[test]
    fn huge_declared_lengths_are_errors_not_allocations() {
        for bytes in [
            // An array of 2^64-1 batches' worth of ids.
            vec![
                0x83, 0x02, 0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ],
            // Events array claiming 2^32 events.
            vec![0x83, 0x02, 0x80, 0x9a, 0xff, 0xff, 0xff, 0xff],
            // A byte string longer than the input.
            vec![
                0x83, 0x02, 0x81, 0x5b, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ],
            // Indefinite-length array.
            vec![0x9f, 0x02, 0xff],
        ] {
            assert!(decode_batch(&bytes, BUDGET).is_err());
        }
    }

    #[test]
    fn invalid_events_are_refused_with_their_position() {
        let mut events = history(3, 1, 2);
        events[1].key = String::new();
        let err = decode_batch(&encode_batch(&events), BUDGET).unwrap_err();
        assert!(matches!(err, BatchError::Event { index: 1, .. }), "{err:?}");
    }

    #[test]
    fn the_batch_reader_reads_every_head_the_writer_writes() {
        for n in crate::codec::BOUNDARIES {
            let mut out = Vec::new();
            Writer::new(&mut out).uint(n);
            let mut r = Reader::new(&out);
            assert_eq!(r.uint().unwrap(), n);
            assert!(r.is_empty());
        }
    }
}
