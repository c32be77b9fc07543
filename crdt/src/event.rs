//! The event: its fields, canonical CBOR encoding, hash chain and signature.
//!
//! Wire form (version 1): a CBOR array
//! `[1, origin, seq, clock, hlc, key, op, kind, payload, meta, prev, sig]` with byte
//! fields as CBOR byte strings. An array rather than a map because field names would
//! add ~50 bytes to every event on the wire and on disk.
//!
//! The signature covers `["weft/event/1", space, <the array without sig>]`. The space is
//! signed but not sent: it is known from the gossip topic or the pull request, and
//! signing it means an event cannot be replayed into another space.
//!
//! The array and the signed message are written by hand ([`crate::codec`]), byte for
//! byte as the `Serialize` implementation below writes them through ciborium: hashes,
//! signatures and stored events are over these bytes, so they must never change.
//! [`Event::decode`] reads that form directly and hands any other input to ciborium
//! through the `Deserialize` implementation, so what it accepts, and how it refuses the
//! rest, is ciborium's. The serde implementations also serve events embedded in larger
//! CBOR values.

use std::collections::BTreeMap;
use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_bytes::{ByteBuf, Bytes};

use crate::clock::{VectorClock, VersionVector};
use crate::codec::{Reader, Writer, MAX_HEAD_LEN};
use crate::error::EventError;
use crate::hlc::Hlc;
use crate::id::{EventId, NodeId, SpaceName};
use crate::limits::*;

const WIRE_VERSION: u64 = 1;
const SIGNING_DOMAIN: &str = "weft/event/1";
/// Items in the event array: the body's and the signature.
const EVENT_FIELDS: usize = 12;
/// Items in the body, the event array without the signature.
const BODY_FIELDS: usize = 11;

/// What an event does to its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Sets the key to the payload.
    Put,
    /// Removes the key's value (a tombstone; the event itself stays in the log).
    Delete,
}

impl Op {
    fn code(self) -> u8 {
        match self {
            Op::Put => 0,
            Op::Delete => 1,
        }
    }
    fn from_code(c: u8) -> Option<Op> {
        match c {
            0 => Some(Op::Put),
            1 => Some(Op::Delete),
            _ => None,
        }
    }
    /// `"put"` or `"delete"`, as in the HTTP API.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Delete => "delete",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The blake3 hash of an event's canonical encoding. Each event carries its origin's
/// previous event's hash (`prev`), so an origin's events in a space form a chain.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventHash(pub [u8; 32]);

impl fmt::Debug for EventHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventHash(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

impl fmt::Display for EventHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// An event before it is signed: what `append` fills in for a local write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsignedEvent {
    /// The writing node.
    pub origin: NodeId,
    /// 1, 2, 3, ... per origin and space.
    pub seq: u64,
    /// The origin's clock when it wrote: everything it had applied, plus `origin -> seq`.
    pub clock: VectorClock,
    /// Hybrid logical clock reading at the write.
    pub hlc: Hlc,
    /// The record this event is about.
    pub key: String,
    /// Put or delete.
    pub op: Op,
    /// The application's event type.
    pub kind: String,
    /// The value, CBOR-encoded. Empty for a delete.
    pub payload: Vec<u8>,
    /// Audit data.
    pub meta: BTreeMap<String, String>,
    /// Hash of the origin's previous event in the space; `None` exactly when `seq == 1`.
    pub prev: Option<EventHash>,
}

/// A signed, immutable event. See the module docs for its encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The writing node.
    pub origin: NodeId,
    /// 1, 2, 3, ... per origin and space.
    pub seq: u64,
    /// The origin's clock when it wrote, containing `origin -> seq`.
    pub clock: VectorClock,
    /// Hybrid logical clock reading at the write.
    pub hlc: Hlc,
    /// The record this event is about.
    pub key: String,
    /// Put or delete.
    pub op: Op,
    /// The application's event type.
    pub kind: String,
    /// The value, CBOR-encoded. Empty for a delete.
    pub payload: Vec<u8>,
    /// Audit data.
    pub meta: BTreeMap<String, String>,
    /// Hash of the origin's previous event in the space; `None` exactly when `seq == 1`.
    pub prev: Option<EventHash>,
    /// ed25519 signature by `origin` over the canonical encoding of the other fields
    /// and the space, or `None` for an event vouched for by a later one: a signed event
    /// covers its `prev`, hence by the hash chain every earlier event of its origin.
    /// An origin signs at least the last event of each of its commits and every
    /// [`MAX_UNSIGNED_RUN`]th event, so that one signature costs little per event.
    pub sig: Option<[u8; 64]>,
}

/// Whether an event can be applied on a replica with a given version vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Already applied: drop it.
    Duplicate,
    /// Every event in its clock is applied: apply it now.
    Ready,
    /// Some dependency is missing: park it until it arrives.
    Waiting,
}

/// Checks the parts of a write that a user supplies, against [`crate::limits`].
pub fn check_write_fields(
    key: &str,
    op: Op,
    kind: &str,
    payload: &[u8],
    meta: &BTreeMap<String, String>,
) -> Result<(), EventError> {
    if key.is_empty() {
        return Err(EventError::Limit("key must not be empty".into()));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(EventError::Limit(format!(
            "key is {} bytes; the limit is {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    if key.chars().any(char::is_control) {
        return Err(EventError::Limit(
            "key must not contain control characters".into(),
        ));
    }
    if kind.len() > MAX_KIND_BYTES {
        return Err(EventError::Limit(format!(
            "kind is {} bytes; the limit is {MAX_KIND_BYTES}",
            kind.len()
        )));
    }
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(EventError::Limit(format!(
            "value is {} bytes encoded; the limit is {MAX_PAYLOAD_BYTES}",
            payload.len()
        )));
    }
    if op == Op::Delete && !payload.is_empty() {
        return Err(EventError::Malformed("a delete carries no value".into()));
    }
    let meta_bytes: usize = meta.iter().map(|(k, v)| k.len() + v.len()).sum();
    if meta.len() > MAX_META_ENTRIES || meta_bytes > MAX_META_BYTES {
        return Err(EventError::Limit(format!(
            "meta has {} entries and {meta_bytes} bytes; the limits are {MAX_META_ENTRIES} entries and {MAX_META_BYTES} bytes",
            meta.len()
        )));
    }
    Ok(())
}

/// An event's fields without the signature, borrowed: the first [`BODY_FIELDS`] items
/// of the event array, and what the signature covers.
struct Body<'a> {
    origin: &'a NodeId,
    seq: u64,
    clock: &'a VectorClock,
    hlc: Hlc,
    key: &'a str,
    op: Op,
    kind: &'a str,
    payload: &'a [u8],
    meta: &'a BTreeMap<String, String>,
    prev: Option<&'a EventHash>,
}

macro_rules! body_of {
    ($e:expr) => {
        Body {
            origin: &$e.origin,
            seq: $e.seq,
            clock: &$e.clock,
            hlc: $e.hlc,
            key: &$e.key,
            op: $e.op,
            kind: &$e.kind,
            payload: &$e.payload,
            meta: &$e.meta,
            prev: $e.prev.as_ref(),
        }
    };
}

impl Body<'_> {
    /// An upper bound on the size of the fields' encoding, to reserve room for it.
    /// Every head is counted at its widest, 8 bytes over at most: cheaper than
    /// measuring each, which would walk the clock twice.
    fn max_len(&self) -> usize {
        const HEAD: usize = MAX_HEAD_LEN;
        let meta: usize = (self.meta.iter())
            .map(|(k, v)| 2 * HEAD + k.len() + v.len())
            .sum();
        let strings = self.key.len() + self.kind.len() + self.payload.len();
        // version, origin, seq, clock, hlc, key, op, kind, payload, meta, prev; then the
        // contents of key, kind and payload
        HEAD + (HEAD + 32)
            + HEAD
            + (HEAD + self.clock.len() * (2 * HEAD + 32))
            + HEAD
            + HEAD
            + HEAD
            + HEAD
            + HEAD
            + (HEAD + meta)
            + self.prev.map_or(1, |_| HEAD + 32)
            + strings
    }

    /// Writes the fields in wire order, item for item as `Event`'s `Serialize` does
    /// through ciborium.
    fn write_fields(&self, w: &mut Writer<'_>) {
        w.uint(WIRE_VERSION);
        w.bytes(self.origin.as_bytes());
        w.uint(self.seq);
        w.map(self.clock.len());
        for (node, s) in self.clock.iter() {
            w.bytes(node.as_bytes());
            w.uint(s);
        }
        w.uint(self.hlc.0);
        w.text(self.key);
        w.uint(u64::from(self.op.code()));
        w.text(self.kind);
        w.bytes(self.payload);
        w.map(self.meta.len());
        for (k, v) in self.meta {
            w.text(k);
            w.text(v);
        }
        match self.prev {
            Some(h) => w.bytes(&h.0),
            None => w.null(),
        }
    }
}

/// The message a signature covers: `["weft/event/1", space, body]`.
fn signing_bytes(space: &SpaceName, body: &Body<'_>) -> Vec<u8> {
    let (domain, space) = (SIGNING_DOMAIN, space.as_str());
    let mut out =
        Vec::with_capacity(4 * MAX_HEAD_LEN + domain.len() + space.len() + body.max_len());
    let mut w = Writer::new(&mut out);
    w.array(3);
    w.text(domain);
    w.text(space);
    w.array(BODY_FIELDS);
    body.write_fields(&mut w);
    out
}

/// Reads an event in exactly the form [`Event::encode_into`] writes, or returns `None`.
///
/// It recognises no other form of the same value (see [`crate::codec`]), and ciborium
/// reads that form back to the event it was written from, so on every input this
/// accepts it returns what ciborium would; [`Event::decode`] leaves all other input to
/// ciborium. Two conditions make that hold beyond the shortest heads: map keys must
/// ascend strictly, as a `BTreeMap` writes them (ciborium would let a repeated key
/// overwrite an earlier one), and no clock entry may be zero (ciborium keeps one,
/// [`VectorClock::set`] would drop it).
fn decode_canonical(bytes: &[u8]) -> Option<Event> {
    let mut r = Reader::new(bytes);
    if r.array()? != EVENT_FIELDS as u64 || r.uint()? != WIRE_VERSION {
        return None;
    }
    let origin = NodeId::from_bytes(*r.fixed_bytes()?);
    let seq = r.uint()?;
    let mut clock = VectorClock::new();
    let mut last_node: Option<&[u8; 32]> = None;
    for _ in 0..r.map()? {
        let node = r.fixed_bytes::<32>()?;
        let s = r.uint()?;
        if s == 0 || last_node.is_some_and(|last| last >= node) {
            return None;
        }
        clock.set(NodeId::from_bytes(*node), s);
        last_node = Some(node);
    }
    let hlc = Hlc(r.uint()?);
    let key = r.text()?.to_owned();
    let op = Op::from_code(u8::try_from(r.uint()?).ok()?)?;
    let kind = r.text()?.to_owned();
    let payload = r.bytes()?.to_vec();
    let mut meta = BTreeMap::new();
    let mut last_key: Option<&str> = None;
    for _ in 0..r.map()? {
        let (k, v) = (r.text()?, r.text()?);
        if last_key.is_some_and(|last| last >= k) {
            return None;
        }
        meta.insert(k.to_owned(), v.to_owned());
        last_key = Some(k);
    }
    let prev = if r.null() {
        None
    } else {
        Some(EventHash(*r.fixed_bytes()?))
    };
    let sig = if r.null() {
        None
    } else {
        Some(*r.fixed_bytes()?)
    };
    // ciborium stops after the event and ignores what follows; leave that case to it.
    if !r.is_empty() {
        return None;
    }
    Some(Event {
        origin,
        seq,
        clock,
        hlc,
        key,
        op,
        kind,
        payload,
        meta,
        prev,
        sig,
    })
}

impl UnsignedEvent {
    /// Signs the event for `space` with the origin's key.
    ///
    /// The caller guarantees `key` is the origin's key; [`Event::verify`] is what
    /// receivers rely on.
    pub fn sign(self, space: &SpaceName, key: &SigningKey) -> Event {
        let sig = Some(key.sign(&signing_bytes(space, &body_of!(self))).to_bytes());
        self.into_event(sig)
    }

    /// Seals the event without a signature: it is authentic only once a later signed
    /// event of the same origin chains back to it (see [`Event::sig`]).
    pub fn seal_unsigned(self) -> Event {
        self.into_event(None)
    }

    fn into_event(self, sig: Option<[u8; 64]>) -> Event {
        Event {
            origin: self.origin,
            seq: self.seq,
            clock: self.clock,
            hlc: self.hlc,
            key: self.key,
            op: self.op,
            kind: self.kind,
            payload: self.payload,
            meta: self.meta,
            prev: self.prev,
            sig,
        }
    }
}

impl Event {
    /// The event without its signature: what its origin signed, or sealed unsigned.
    /// The inverse of [`UnsignedEvent::sign`] and [`UnsignedEvent::seal_unsigned`], for
    /// a writer that signs an event it first stored unsigned.
    pub fn into_unsigned(self) -> UnsignedEvent {
        UnsignedEvent {
            origin: self.origin,
            seq: self.seq,
            clock: self.clock,
            hlc: self.hlc,
            key: self.key,
            op: self.op,
            kind: self.kind,
            payload: self.payload,
            meta: self.meta,
            prev: self.prev,
        }
    }

    /// `(origin, seq)`.
    pub fn id(&self) -> EventId {
        EventId::new(self.origin, self.seq)
    }

    /// The canonical CBOR encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Appends the canonical CBOR encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let body = body_of!(self);
        let sig_len = self.sig.map_or(1, |s| MAX_HEAD_LEN + s.len());
        out.reserve(MAX_HEAD_LEN + body.max_len() + sig_len);
        let mut w = Writer::new(out);
        w.array(EVENT_FIELDS);
        body.write_fields(&mut w);
        match &self.sig {
            Some(s) => w.bytes(s),
            None => w.null(),
        }
    }

    /// Decodes and structurally validates one event. Does not check the signature.
    pub fn decode(bytes: &[u8]) -> Result<Event, EventError> {
        if bytes.len() > MAX_EVENT_BYTES {
            return Err(EventError::Limit(format!(
                "event is {} bytes; the limit is {MAX_EVENT_BYTES}",
                bytes.len()
            )));
        }
        let e = match decode_canonical(bytes) {
            Some(e) => e,
            None => {
                ciborium::from_reader(bytes).map_err(|err| EventError::Decode(err.to_string()))?
            }
        };
        e.validate()?;
        Ok(e)
    }

    /// The blake3 hash of the canonical encoding, which the origin's next event names
    /// as its `prev`.
    pub fn hash(&self) -> EventHash {
        EventHash(*blake3::hash(&self.encode()).as_bytes())
    }

    /// Checks the fields against each other and against [`crate::limits`].
    pub fn validate(&self) -> Result<(), EventError> {
        let bad = |m: String| Err(EventError::Malformed(m));
        if self.seq == 0 {
            return bad("seq must be at least 1".into());
        }
        if self.clock.get(&self.origin) != self.seq {
            return bad(format!(
                "clock entry of the origin is {}, expected its seq {}",
                self.clock.get(&self.origin),
                self.seq
            ));
        }
        if self.clock.has_zero_entry() {
            return bad("clock has a zero entry".into());
        }
        if self.clock.len() > MAX_CLOCK_ENTRIES {
            return Err(EventError::Limit(format!(
                "clock has {} entries; the limit is {MAX_CLOCK_ENTRIES}",
                self.clock.len()
            )));
        }
        if (self.seq == 1) != self.prev.is_none() {
            return bad("prev must be absent exactly for seq 1".into());
        }
        check_write_fields(&self.key, self.op, &self.kind, &self.payload, &self.meta)
    }

    /// Verifies the origin's signature for `space`. An unsigned event fails with
    /// [`EventError::Unsigned`]: on its own it proves nothing, and only
    /// [`crate::sync::verify_batch`] can accept it, through a later signed event.
    pub fn verify(&self, space: &SpaceName) -> Result<(), EventError> {
        let bad = || EventError::BadSignature(self.id().to_string());
        let Some(sig) = &self.sig else {
            return Err(EventError::Unsigned(self.id().to_string()));
        };
        let key = verifying_key(&self.origin).ok_or_else(bad)?;
        let sig = Signature::from_bytes(sig);
        key.verify_strict(&signing_bytes(space, &body_of!(self)), &sig)
            .map_err(|_| bad())
    }

    /// Whether this event can be applied on a replica that has `vv`.
    ///
    /// Ready means: the origin's previous event is applied and so is everything the
    /// origin had applied when it wrote (its clock). Applying only ready events makes
    /// every replica's order causal.
    pub fn readiness(&self, vv: &VersionVector) -> Readiness {
        let have = vv.get(&self.origin);
        if have >= self.seq {
            return Readiness::Duplicate;
        }
        if have + 1 < self.seq {
            return Readiness::Waiting;
        }
        let deps_met = self
            .clock
            .iter()
            .all(|(o, s)| *o == self.origin || vv.get(o) >= s);
        if deps_met {
            Readiness::Ready
        } else {
            Readiness::Waiting
        }
    }
}

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut t = s.serialize_tuple(EVENT_FIELDS)?;
        t.serialize_element(&WIRE_VERSION)?;
        t.serialize_element(Bytes::new(self.origin.as_bytes()))?;
        t.serialize_element(&self.seq)?;
        t.serialize_element(&self.clock)?;
        t.serialize_element(&self.hlc.0)?;
        t.serialize_element(&self.key)?;
        t.serialize_element(&self.op.code())?;
        t.serialize_element(&self.kind)?;
        t.serialize_element(Bytes::new(&self.payload))?;
        t.serialize_element(&self.meta)?;
        t.serialize_element(&self.prev.as_ref().map(|h| Bytes::new(&h.0)))?;
        t.serialize_element(&self.sig.as_ref().map(|s| Bytes::new(s)))?;
        t.end()
    }
}

impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Event;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a weft event array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Event, A::Error> {
                fn next<'de, T: Deserialize<'de>, A: SeqAccess<'de>>(
                    a: &mut A,
                    field: &str,
                ) -> Result<T, A::Error> {
                    a.next_element()?
                        .ok_or_else(|| de::Error::custom(format!("event lacks its {field}")))
                }
                fn fixed<const N: usize, E: de::Error>(
                    b: ByteBuf,
                    field: &str,
                ) -> Result<[u8; N], E> {
                    b.as_slice().try_into().map_err(|_| {
                        E::custom(format!("{field} must be {N} bytes, got {}", b.len()))
                    })
                }
                let version: u64 = next(&mut a, "version")?;
                if version != WIRE_VERSION {
                    return Err(de::Error::custom(format!(
                        "unsupported event version {version} (this build reads version {WIRE_VERSION})"
                    )));
                }
                let origin = NodeId::from_bytes(fixed(next(&mut a, "origin")?, "origin")?);
                let seq = next(&mut a, "seq")?;
                let clock = next(&mut a, "clock")?;
                let hlc = Hlc(next(&mut a, "hlc")?);
                let key = next(&mut a, "key")?;
                let op_code: u8 = next(&mut a, "op")?;
                let op = Op::from_code(op_code)
                    .ok_or_else(|| de::Error::custom(format!("unknown op code {op_code}")))?;
                let kind = next(&mut a, "kind")?;
                let payload: ByteBuf = next(&mut a, "payload")?;
                let meta = next(&mut a, "meta")?;
                let prev: Option<ByteBuf> = next(&mut a, "prev")?;
                let prev = match prev {
                    Some(p) => Some(EventHash(fixed(p, "prev")?)),
                    None => None,
                };
                let sig: Option<ByteBuf> = next(&mut a, "sig")?;
                let sig = match sig {
                    Some(s) => Some(fixed(s, "sig")?),
                    None => None,
                };
                if a.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom("event has extra fields"));
                }
                Ok(Event {
                    origin,
                    seq,
                    clock,
                    hlc,
                    key,
                    op,
                    kind,
                    payload: payload.into_vec(),
                    meta,
                    prev,
                    sig,
                })
            }
        }
        d.deserialize_tuple(EVENT_FIELDS, V)
    }
}

/// Origins whose decompressed keys a thread keeps; past it the cache starts over.
const KEY_CACHE: usize = 4096;

thread_local! {
    /// Decompressed verifying keys by origin. Decompressing a key costs a field
    /// square root, about a fifth of a signature check, and a node checks the same few
    /// origins over and over.
    static KEYS: std::cell::RefCell<std::collections::HashMap<NodeId, VerifyingKey>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// The verifying key of `origin`, or `None` when its bytes are not a curve point.
fn verifying_key(origin: &NodeId) -> Option<VerifyingKey> {
    KEYS.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(key) = cache.get(origin) {
            return Some(*key);
        }
        let key = VerifyingKey::from_bytes(origin.as_bytes()).ok()?;
        if cache.len() >= KEY_CACHE {
            cache.clear();
        }
        cache.insert(*origin, key);
        Some(key)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u8) -> SigningKey {
        SigningKey::from_bytes(&[i; 32])
    }

    fn space() -> SpaceName {
        SpaceName::new("todo").unwrap()
    }

    fn sample(k: &SigningKey) -> Event {
        let origin = NodeId::of(k);
        let mut clock = VectorClock::new();
        clock.set(origin, 2);
        clock.set(NodeId::from_bytes([9; 32]), 5);
        UnsignedEvent {
            origin,
            seq: 2,
            clock,
            hlc: Hlc::new(1_700_000_000_000, 3),
            key: "todos/42".into(),
            op: Op::Put,
            kind: "TodoRenamed".into(),
            payload: vec![0x63, b'a', b'b', b'c'],
            meta: [("user".to_string(), "ann".to_string())].into(),
            prev: Some(EventHash([7; 32])),
        }
        .sign(&space(), k)
    }

    #[test]
    fn encode_decode_round_trip_keeps_every_field_and_signature() {
        let e = sample(&key(1));
        let bytes = e.encode();
        let back = Event::decode(&bytes).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.encode(), bytes, "encoding is canonical");
        back.verify(&space()).unwrap();
    }

    #[test]
    fn byte_fields_are_cbor_byte_strings() {
        let e = sample(&key(1));
        let bytes = e.encode();
        // 32-byte origin as a byte string: major type 2, length 32 (0x58 0x20).
        let needle = [[0x58, 0x20].as_slice(), e.origin.as_bytes()].concat();
        assert!(bytes.windows(needle.len()).any(|w| w == needle.as_slice()));
        assert!(bytes.len() < 300, "event is {} bytes", bytes.len());
    }

    #[test]
    fn every_tampered_byte_fails_decode_or_verify() {
        let e = sample(&key(1));
        let bytes = e.encode();
        for i in 0..bytes.len() {
            let mut t = bytes.clone();
            t[i] ^= 0x01;
            let ok = Event::decode(&t).map(|d| d.verify(&space()).is_ok());
            assert!(!matches!(ok, Ok(true)), "flipping byte {i} went unnoticed");
        }
    }

    #[test]
    fn signature_binds_the_space() {
        let e = sample(&key(1));
        assert!(matches!(
            e.verify(&SpaceName::new("other").unwrap()),
            Err(EventError::BadSignature(_))
        ));
    }

    #[test]
    fn signature_by_another_key_fails() {
        let mut e = sample(&key(1));
        let forged = sample(&key(2));
        e.sig = forged.sig;
        assert!(e.verify(&space()).is_err());
    }

    #[test]
    fn unknown_version_is_rejected_clearly() {
        let e = sample(&key(1));
        let mut bytes = e.encode();
        assert_eq!(bytes[1], 0x01, "version is the first element");
        bytes[1] = 0x02;
        let err = Event::decode(&bytes).unwrap_err().to_string();
        assert!(err.contains("unsupported event version 2"), "{err}");
    }

    #[test]
    fn structural_rules_are_enforced() {
        let k = key(1);
        let base = sample(&k);
        let mut e = base.clone();
        e.clock.set(e.origin, 3);
        assert!(e.validate().is_err(), "clock must hold the origin's seq");
        let mut e = base.clone();
        e.prev = None;
        assert!(e.validate().is_err(), "seq 2 needs prev");
        let mut e = base.clone();
        e.payload = vec![0; MAX_PAYLOAD_BYTES + 1];
        assert!(matches!(e.validate(), Err(EventError::Limit(_))));
        let mut e = base.clone();
        e.key = String::new();
        assert!(e.validate().is_err());
        let mut e = base;
        e.op = Op::Delete;
        assert!(e.validate().is_err(), "delete with payload");
        assert!(Event::decode(b"\xff\x00garbage").is_err());
        assert!(Event::decode(&[]).is_err());
    }

    #[test]
    fn readiness_follows_the_clock() {
        let k = key(1);
        let e = sample(&k); // seq 2 by origin, depends on [9;32] -> 5
        let other = NodeId::from_bytes([9; 32]);
        let mut vv = VersionVector::new();
        assert_eq!(e.readiness(&vv), Readiness::Waiting);
        vv.set(e.origin, 1);
        assert_eq!(e.readiness(&vv), Readiness::Waiting);
        vv.set(other, 5);
        assert_eq!(e.readiness(&vv), Readiness::Ready);
        vv.set(e.origin, 2);
        assert_eq!(e.readiness(&vv), Readiness::Duplicate);
    }

    /// Events whose encodings put every field at a CBOR length boundary, with and
    /// without the optional parts; canonical, but not all of them valid.
    fn varied() -> Vec<Event> {
        let base = sample(&key(1));
        let mut out = vec![base.clone()];
        let mut e = base.clone();
        (e.seq, e.prev, e.sig) = (1, None, None);
        e.clock.set(e.origin, 1);
        out.push(e);
        let mut e = base.clone();
        (e.seq, e.hlc) = (u64::MAX, Hlc(u64::MAX));
        for (i, s) in [23, 24, 255, 256, 65_535, 65_536, 1 << 32, u64::MAX]
            .iter()
            .enumerate()
        {
            e.clock.set(NodeId::from_bytes([i as u8 + 20; 32]), *s);
        }
        e.clock.set(e.origin, u64::MAX);
        out.push(e);
        let mut e = base.clone();
        e.meta = (0..24)
            .map(|i| (format!("k{i:02}"), String::new()))
            .collect();
        out.push(e);
        for n in [0, 1, 23, 24, 255, 256, 1000] {
            let mut e = base.clone();
            e.key = "ü".repeat(n / 2) + &"k".repeat(n % 2);
            e.kind = "k".repeat(n.min(300));
            e.payload = (0..n).map(|i| i as u8).collect();
            e.meta = (0..n.min(6))
                .map(|i| (format!("m{i}"), "v".repeat([0, 1, 23, 24, 255, 256][i])))
                .collect();
            e.op = if n == 0 { Op::Delete } else { Op::Put };
            out.push(e);
        }
        out
    }

    #[test]
    fn the_fast_path_reads_every_canonical_encoding() {
        for e in varied() {
            assert_eq!(decode_canonical(&e.encode()).as_ref(), Some(&e));
        }
        let mut e = sample(&key(1));
        for n in [65_535, 65_536] {
            e.payload = vec![7; n];
            assert_eq!(decode_canonical(&e.encode()).as_ref(), Some(&e));
        }
    }

    #[test]
    fn the_fast_path_accepts_only_canonical_encodings() {
        // Whatever it accepts re-encodes to the very bytes it read; ciborium reads the
        // same event from them. Anything else it leaves to ciborium.
        let accepts_only_canonical = |bytes: &[u8]| {
            if let Some(e) = decode_canonical(bytes) {
                assert_eq!(e.encode(), bytes, "accepted a non-canonical form of {e:?}");
            }
        };
        for e in varied().into_iter().filter(|e| e.encode().len() < 2048) {
            let bytes = e.encode();
            let trailing = [bytes.as_slice(), &[0]].concat();
            assert!(
                decode_canonical(&trailing).is_none(),
                "a byte after the event"
            );
            for i in 0..bytes.len() {
                assert!(decode_canonical(&bytes[..i]).is_none(), "truncated to {i}");
                let mut longer = bytes.clone();
                longer.insert(i, bytes[i]);
                accepts_only_canonical(&longer);
                for bit in 0..8 {
                    let mut t = bytes.clone();
                    t[i] ^= 1 << bit;
                    accepts_only_canonical(&t);
                }
            }
        }
    }

    #[test]
    fn the_signed_message_is_what_ciborium_wrote() {
        for e in varied() {
            // The body as the serde tuple it was serialized from before.
            let body = (
                WIRE_VERSION,
                Bytes::new(e.origin.as_bytes()),
                e.seq,
                &e.clock,
                e.hlc.0,
                &e.key,
                e.op.code(),
                &e.kind,
                Bytes::new(&e.payload),
                &e.meta,
                e.prev.as_ref().map(|h| Bytes::new(&h.0)),
            );
            let mut theirs = Vec::new();
            ciborium::into_writer(&(SIGNING_DOMAIN, space().as_str(), body), &mut theirs).unwrap();
            assert_eq!(signing_bytes(&space(), &body_of!(e)), theirs);
        }
    }
}
