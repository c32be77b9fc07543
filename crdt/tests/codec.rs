//! The canonical event encoding is written and read by hand (`crdt/src/codec.rs`). Hashes,
//! signatures and stored data are over these bytes, so they are pinned here to what
//! ciborium wrote through the serde implementations before:
//!
//! - `Event::encode` (and `hash`, and the message a signature covers) produces exactly
//!   the bytes ciborium produces, for any event, valid or not;
//! - `Event::decode` returns exactly what the ciborium path returned (the size limit,
//!   `ciborium::from_reader`, `validate`) on every input: canonical encodings, damaged
//!   ones, random bytes, and encodings ciborium reads but does not write, where a
//!   decoder that took them for canonical would read a different event.
//!
//! Failing cases are persisted next to this file (`codec.proptest-regressions`) and
//! replayed first on every run; commit them.

use ciborium::Value;
use ed25519_dalek::Signer;
use proptest::prelude::*;
use proptest::sample::Index;
use serde_bytes::Bytes;
use weft_crdt::limits::MAX_EVENT_BYTES;
use weft_crdt::{
    Event, EventError, EventHash, Hlc, NodeId, Op, SigningKey, SpaceName, UnsignedEvent,
};

fn cbor<T: serde::Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).unwrap();
    out
}

fn op_code(op: Op) -> u8 {
    match op {
        Op::Put => 0,
        Op::Delete => 1,
    }
}

/// The items of an event's array, each written by ciborium on its own, as the serde
/// implementation writes them.
fn items(e: &Event) -> Vec<Vec<u8>> {
    vec![
        cbor(&1u64),
        cbor(Bytes::new(e.origin.as_bytes())),
        cbor(&e.seq),
        cbor(&e.clock),
        cbor(&e.hlc.0),
        cbor(&e.key),
        cbor(&op_code(e.op)),
        cbor(&e.kind),
        cbor(Bytes::new(&e.payload)),
        cbor(&e.meta),
        cbor(&e.prev.as_ref().map(|h| Bytes::new(&h.0))),
        cbor(&e.sig.as_ref().map(|s| Bytes::new(s))),
    ]
}

/// The encoding as ciborium wrote it before it was written by hand.
fn reference_encode(e: &Event) -> Vec<u8> {
    let whole = [vec![0x8c], items(e).concat()].concat();
    assert_eq!(whole, cbor(e), "the serde implementation still writes it");
    whole
}

/// The message a signature covers, as ciborium wrote it: `[domain, space, body]`.
fn reference_signing_bytes(space: &SpaceName, e: &Event) -> Vec<u8> {
    let body = &items(e)[..11];
    let head = cbor(&("weft/event/1", space.as_str()));
    // `head` is a 2-item array; the message is a 3-item one whose third item is the body.
    [vec![0x83], head[1..].to_vec(), vec![0x8b], body.concat()].concat()
}

/// `Event::decode` as it was before the fast path.
fn reference_decode(bytes: &[u8]) -> Result<Event, EventError> {
    if bytes.len() > MAX_EVENT_BYTES {
        return Err(EventError::Limit(format!(
            "event is {} bytes; the limit is {MAX_EVENT_BYTES}",
            bytes.len()
        )));
    }
    let e: Event =
        ciborium::from_reader(bytes).map_err(|err| EventError::Decode(err.to_string()))?;
    e.validate()?;
    Ok(e)
}

const BOUNDARIES: [u64; 12] = [
    0,
    1,
    23,
    24,
    255,
    256,
    65_535,
    65_536,
    u32::MAX as u64,
    u32::MAX as u64 + 1,
    u64::MAX - 1,
    u64::MAX,
];

const LENGTHS: [usize; 9] = [0, 1, 23, 24, 255, 256, 65_535, 65_536, 70_000];

fn number() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => 1u64..50,
        2 => prop::sample::select(BOUNDARIES.to_vec()),
        1 => any::<u64>(),
    ]
}

fn node() -> impl Strategy<Value = NodeId> {
    prop_oneof![any::<[u8; 32]>(), (0u8..4).prop_map(|b| [b; 32])].prop_map(NodeId::from_bytes)
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9/._-]{0,20}",
        2 => "\\PC{0,12}",
        1 => ".{0,8}",
        1 => prop::sample::select(vec![23usize, 24, 255, 256, 600])
            .prop_map(|n| "é".repeat(n / 2) + &"x".repeat(n % 2)),
    ]
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => prop::collection::vec(any::<u8>(), 0..300),
        1 => prop::sample::select(LENGTHS.to_vec())
            .prop_map(|n| (0..n).map(|i| (i * 7 % 251) as u8).collect()),
    ]
}

prop_compose! {
    /// Any event the encoder can be handed. Most are made valid, the rest are left as
    /// drawn; both must encode as ciborium did and decode as ciborium does.
    fn event()(
        origin in node(),
        seq in number(),
        others in prop::collection::btree_map(node(), number(), 0..6),
        hlc in number(),
        key in text(),
        delete in prop::bool::weighted(0.2),
        kind in text(),
        payload in payload(),
        meta in prop::collection::btree_map(text(), text(), 0..5),
        prev in prop::option::of(any::<[u8; 32]>()),
        sig in prop::option::of(prop::collection::vec(any::<u8>(), 64)),
        valid in prop::bool::weighted(0.7),
    ) -> Event {
        let mut e = Event {
            origin,
            seq,
            clock: others.into_iter().collect(),
            hlc: Hlc(hlc),
            key,
            op: if delete { Op::Delete } else { Op::Put },
            kind,
            payload,
            meta,
            prev: prev.map(EventHash),
            sig: sig.map(|s| s.try_into().unwrap()),
        };
        if valid {
            make_valid(&mut e);
        }
        e
    }
}

fn make_valid(e: &mut Event) {
    e.seq = e.seq.max(1);
    e.clock.set(e.origin, e.seq);
    e.prev = (e.seq > 1).then(|| e.prev.unwrap_or(EventHash([1; 32])));
    e.key.retain(|c| !c.is_control());
    while e.key.len() > weft_crdt::limits::MAX_KEY_BYTES {
        e.key.pop();
    }
    if e.key.is_empty() {
        e.key.push('k');
    }
    while e.kind.len() > weft_crdt::limits::MAX_KIND_BYTES {
        e.kind.pop();
    }
    e.payload.truncate(weft_crdt::limits::MAX_PAYLOAD_BYTES);
    if e.op == Op::Delete {
        e.payload.clear();
    }
    let meta_bytes: usize = e.meta.iter().map(|(k, v)| k.len() + v.len()).sum();
    if meta_bytes > weft_crdt::limits::MAX_META_BYTES {
        e.meta.clear();
    }
    assert_eq!(e.validate(), Ok(()));
}

/// One way of damaging an encoding.
#[derive(Clone, Debug)]
enum Damage {
    Truncate(Index),
    FlipBit(Index, u8),
    Insert(Index, u8),
    Remove(Index),
    Overwrite(Index, u8),
}

impl Damage {
    fn apply(&self, bytes: &[u8]) -> Vec<u8> {
        let mut t = bytes.to_vec();
        let at = |i: &Index| i.index(bytes.len().max(1));
        match self {
            Damage::Truncate(i) => t.truncate(at(i)),
            Damage::FlipBit(i, bit) => {
                if let Some(b) = t.get_mut(at(i)) {
                    *b ^= 1 << (bit % 8);
                }
            }
            Damage::Insert(i, b) => t.insert(at(i).min(t.len()), *b),
            Damage::Remove(i) => {
                if !t.is_empty() {
                    t.remove(at(i));
                }
            }
            Damage::Overwrite(i, b) => {
                if let Some(x) = t.get_mut(at(i)) {
                    *x = *b;
                }
            }
        }
        t
    }
}

/// A byte that means something to a CBOR decoder: a longer or indefinite head, a break,
/// a tag, null or undefined, an empty string or collection.
fn cbor_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        prop::sample::select(vec![
            0x00, 0x01, 0x17, 0x18, 0x1b, 0x1f, 0x20, 0x40, 0x58, 0x5f, 0x60, 0x7f, 0x80, 0x9f,
            0xa0, 0xbf, 0xc0, 0xc6, 0xf4, 0xf6, 0xf7, 0xff,
        ]),
        any::<u8>(),
    ]
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        any::<Index>().prop_map(Damage::Truncate),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Damage::FlipBit(i, b)),
        (any::<Index>(), cbor_byte()).prop_map(|(i, b)| Damage::Insert(i, b)),
        any::<Index>().prop_map(Damage::Remove),
        (any::<Index>(), cbor_byte()).prop_map(|(i, b)| Damage::Overwrite(i, b)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn encoding_is_the_bytes_ciborium_wrote(e in event()) {
        let bytes = e.encode();
        prop_assert_eq!(&bytes, &reference_encode(&e));
        let mut appended = b"before".to_vec();
        e.encode_into(&mut appended);
        prop_assert_eq!(&appended[..6], b"before");
        prop_assert_eq!(&appended[6..], &bytes[..]);
        prop_assert_eq!(e.hash().0, *blake3::hash(&bytes).as_bytes());
    }

    #[test]
    fn decoding_returns_what_ciborium_returned(e in event()) {
        let bytes = e.encode();
        let decoded = Event::decode(&bytes);
        prop_assert_eq!(&decoded, &reference_decode(&bytes));
        if e.validate().is_ok() {
            prop_assert_eq!(decoded, Ok(e));
        }
    }

    #[test]
    fn damaged_encodings_decode_as_ciborium_decodes_them(
        e in event(),
        damages in prop::collection::vec(damage(), 1..16),
    ) {
        let bytes = e.encode();
        let mut t = bytes.clone();
        for d in &damages {
            // Each damage on its own, then all of them piled up.
            let once = d.apply(&bytes);
            prop_assert_eq!(Event::decode(&once), reference_decode(&once), "{:?}", d);
            t = d.apply(&t);
            prop_assert_eq!(Event::decode(&t), reference_decode(&t), "{:?}", damages);
        }
    }

    #[test]
    fn random_bytes_decode_as_ciborium_decodes_them(
        prefix in prop::sample::select(vec![vec![], vec![0x8c], vec![0x8c, 0x01], vec![0x8c, 0x01, 0x58, 0x20]]),
        rest in prop::collection::vec(cbor_byte(), 0..400),
    ) {
        let bytes = [prefix, rest].concat();
        prop_assert_eq!(Event::decode(&bytes), reference_decode(&bytes));
    }

    #[test]
    fn signatures_cover_the_bytes_ciborium_wrote(e in event(), secret in any::<[u8; 32]>()) {
        let key = SigningKey::from_bytes(&secret);
        let space = SpaceName::new("codec").unwrap();
        let signed = UnsignedEvent {
            origin: NodeId::of(&key),
            seq: e.seq,
            clock: e.clock,
            hlc: e.hlc,
            key: e.key,
            op: e.op,
            kind: e.kind,
            payload: e.payload,
            meta: e.meta,
            prev: e.prev,
        }
        .sign(&space, &key);
        let expected = key.sign(&reference_signing_bytes(&space, &signed)).to_bytes();
        prop_assert_eq!(signed.sig, Some(expected));
        prop_assert!(signed.verify(&space).is_ok());
    }
}

fn sample() -> Event {
    let origin = NodeId::of(&SigningKey::from_bytes(&[1; 32]));
    let other = NodeId::from_bytes([9; 32]);
    Event {
        origin,
        seq: 2,
        clock: [(origin, 2), (other, 5)].into_iter().collect(),
        hlc: Hlc::new(1_700_000_000_000, 3),
        key: "todos/42".into(),
        op: Op::Put,
        kind: "TodoRenamed".into(),
        payload: vec![0x63, b'a', b'b', b'c'],
        meta: [("user".to_string(), "ann".to_string())].into(),
        prev: Some(EventHash([7; 32])),
        sig: Some([5; 64]),
    }
}

/// The sample's encoding with item `i` replaced by `item`.
fn with_item(i: usize, item: Vec<u8>) -> Vec<u8> {
    let mut items = items(&sample());
    items[i] = item;
    [vec![0x8c], items.concat()].concat()
}

fn map(entries: Vec<(Value, Value)>) -> Vec<u8> {
    cbor(&Value::Map(entries))
}

fn node_entry(n: NodeId, seq: u64) -> (Value, Value) {
    (
        Value::Bytes(n.as_bytes().to_vec()),
        Value::Integer(seq.into()),
    )
}

fn text_entry(k: &str, v: &str) -> (Value, Value) {
    (Value::Text(k.into()), Value::Text(v.into()))
}

#[test]
fn forms_ciborium_reads_but_does_not_write_decode_as_ciborium_decodes_them() {
    const SEQ: usize = 2;
    const CLOCK: usize = 3;
    const KEY: usize = 5;
    const PAYLOAD: usize = 8;
    const META: usize = 9;
    const SIG: usize = 11;
    let e = sample();
    let (origin, other) = (e.origin, NodeId::from_bytes([9; 32]));
    let by_node = |mut entries: Vec<(Value, Value)>| {
        entries.sort_by_key(|(k, _)| k.as_bytes().cloned());
        entries
    };
    let changed = |f: &dyn Fn(&mut Event)| {
        let mut e = sample();
        f(&mut e);
        Ok(e)
    };

    let cases: Vec<(&str, Vec<u8>, Result<Event, EventError>)> = vec![
        // A decoder that took these for canonical forms would return another result.
        (
            // Building the clock with `VectorClock::set` would drop the entry and
            // return a valid event.
            "a clock entry of zero, which ciborium keeps and validate refuses",
            with_item(
                CLOCK,
                map(by_node(vec![node_entry(origin, 2), node_entry(other, 0)])),
            ),
            Err(EventError::Malformed("clock has a zero entry".into())),
        ),
        (
            "a repeated clock entry, the last of which counts",
            with_item(
                CLOCK,
                map(vec![
                    node_entry(origin, 9),
                    node_entry(origin, 2),
                    node_entry(other, 5),
                ]),
            ),
            Ok(sample()),
        ),
        (
            "a repeated meta key, the last of which counts",
            with_item(
                META,
                map(vec![text_entry("user", "ann"), text_entry("user", "bob")]),
            ),
            changed(&|e| e.meta = [("user".into(), "bob".into())].into()),
        ),
        // These mean the same event as its canonical form.
        (
            "clock entries out of order",
            with_item(CLOCK, {
                let mut entries = by_node(vec![node_entry(origin, 2), node_entry(other, 5)]);
                entries.reverse();
                map(entries)
            }),
            Ok(sample()),
        ),
        (
            "meta keys out of order",
            with_item(META, map(vec![text_entry("z", "1"), text_entry("a", "2")])),
            changed(&|e| e.meta = [("a".into(), "2".into()), ("z".into(), "1".into())].into()),
        ),
        (
            "seq in a longer head",
            with_item(SEQ, vec![0x18, 0x02]),
            Ok(sample()),
        ),
        (
            "undefined for an absent signature",
            with_item(SIG, vec![0xf7]),
            changed(&|e| e.sig = None),
        ),
        (
            "a tagged payload",
            with_item(PAYLOAD, [vec![0xc6], cbor(Bytes::new(&e.payload))].concat()),
            Ok(sample()),
        ),
        (
            "the payload as an array of integers",
            with_item(PAYLOAD, cbor(&e.payload)),
            Ok(sample()),
        ),
        (
            "the key as an indefinite-length text",
            with_item(
                KEY,
                [&[0x7f, 0x64][..], b"todo", &[0x64], b"s/42", &[0xff]].concat(),
            ),
            Ok(sample()),
        ),
        (
            "an indefinite-length event array",
            [vec![0x9f], items(&e).concat(), vec![0xff]].concat(),
            Ok(sample()),
        ),
        (
            "a byte after the event",
            [e.encode(), vec![0x00]].concat(),
            Ok(sample()),
        ),
        (
            "a version this build does not read",
            with_item(0, cbor(&2u64)),
            Err(EventError::Decode("any message".into())),
        ),
    ];
    for (what, bytes, expected) in cases {
        let decoded = Event::decode(&bytes);
        assert_eq!(decoded, reference_decode(&bytes), "{what}");
        if let Ok(d) = &decoded {
            assert_ne!(d.encode(), bytes, "{what} is not a canonical form");
        }
        match (&decoded, &expected) {
            (Err(EventError::Decode(_)), Err(EventError::Decode(_))) => {}
            _ => assert_eq!(decoded, expected, "{what}"),
        }
    }

    let oversized = [e.encode(), vec![0; MAX_EVENT_BYTES]].concat();
    assert_eq!(Event::decode(&oversized), reference_decode(&oversized));
    assert!(matches!(
        Event::decode(&oversized),
        Err(EventError::Limit(_))
    ));
}
