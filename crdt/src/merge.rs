//! The mergeable value types: [`Counter`], [`AddWinsSet`], [`JsonMerge`], and
//! [`FnMerge`] for an application's own.
//!
//! Every state is CBOR built from `BTreeMap`s, so it is canonical: two replicas that
//! applied the same events hold byte-identical states, which is what lets a digest of
//! the states prove convergence.
//!
//! Payloads come from remote peers and are untrusted. [`Merge::check`] refuses a
//! malformed local write before it is signed; a malformed op that arrives signed from a
//! faulty peer is already in every log, so `apply` treats it as a no-op. Every replica
//! ignores it the same way, which keeps them converged, where an error would leave the
//! key's state depending on how each embedding handles it. `apply` fails only on a state
//! it did not write (a corrupt store).
//!
//! Deletes act on what they have seen: an event is "observed" by a delete (or a set
//! remove) when the delete's vector clock includes its id. Anything concurrent with the
//! delete is not observed and survives it. This is what makes every rule here
//! independent of the order in which concurrent events arrive.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use ciborium::Value;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_bytes::ByteBuf;

use crate::event::{Event, Op};
use crate::id::{EventId, NodeId};
use crate::policy::{Merge, MergeError};

/// Decodes exactly one CBOR item, refusing trailing bytes so that one payload has one
/// meaning.
fn decode_value(bytes: &[u8]) -> Result<Value, MergeError> {
    let mut rest = bytes;
    let v: Value = ciborium::from_reader(&mut rest)
        .map_err(|e| MergeError(format!("value is not valid CBOR: {e}")))?;
    if !rest.is_empty() {
        return Err(MergeError(format!(
            "value has {} trailing bytes after its CBOR item",
            rest.len()
        )));
    }
    Ok(v)
}

fn encode<T: Serialize + ?Sized>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing to a Vec cannot fail and every state type is serializable.
    ciborium::into_writer(v, &mut out)
        .unwrap_or_else(|e| unreachable!("CBOR encoding into a Vec failed: {e}"));
    out
}

fn decode_state<T: DeserializeOwned + Default>(
    state: Option<&[u8]>,
    what: &str,
) -> Result<T, MergeError> {
    match state {
        None => Ok(T::default()),
        Some(bytes) => ciborium::from_reader(bytes)
            .map_err(|e| MergeError(format!("corrupt {what} state: {e}"))),
    }
}

/// The value with every map's entries sorted by their encoded keys (recursively), so
/// that `{"a":1,"b":2}` and `{"b":2,"a":1}` are one set element and one field value.
fn canonical(v: Value) -> Value {
    match v {
        Value::Array(items) => Value::Array(items.into_iter().map(canonical).collect()),
        Value::Map(entries) => {
            let mut keyed: Vec<(Vec<u8>, Value, Value)> = entries
                .into_iter()
                .map(|(k, v)| {
                    let k = canonical(k);
                    (encode(&k), k, canonical(v))
                })
                .collect();
            // Stable, so duplicate keys (only a hostile peer sends them) keep the order
            // they were sent in, which every replica sees identically.
            keyed.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Map(keyed.into_iter().map(|(_, k, v)| (k, v)).collect())
        }
        Value::Tag(t, inner) => Value::Tag(t, Box::new(canonical(*inner))),
        other => other,
    }
}

fn canonical_bytes(v: Value) -> Vec<u8> {
    encode(&canonical(v))
}

fn check_delete(op: Op, payload: &[u8]) -> Result<bool, MergeError> {
    if op == Op::Delete {
        if !payload.is_empty() {
            return Err(MergeError("a delete carries no value".into()));
        }
        return Ok(true);
    }
    Ok(false)
}

// ---------------------------------------------------------------------------------------
// Counter
// ---------------------------------------------------------------------------------------

/// A counter. A put's payload is a CBOR integer (an `i64`): the increment, negative to
/// decrement. Concurrent increments add up.
///
/// **Put vs delete:** a delete resets the counter by removing every increment it has
/// seen, and an increment concurrent with the delete survives it.
///
/// The counter reads as the sum of its live increments (saturating at the `i64`
/// bounds), and as absent when it has no live increment: never incremented, or every
/// increment removed by a delete. A counter whose increments cancel out reads `0`.
///
/// State: per origin, the `(seq, amount)` of its increments no delete has seen yet, in
/// seq order. A delete prunes what it saw, so the state is as small as the increments
/// still counting.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counter;

type CounterState = BTreeMap<NodeId, Vec<(u64, i64)>>;

fn counter_increment(payload: &[u8]) -> Result<i64, MergeError> {
    match decode_value(payload)? {
        Value::Integer(i) => i64::try_from(i128::from(i)).map_err(|_| {
            MergeError("a counter increment must fit in a signed 64-bit integer".into())
        }),
        _ => Err(MergeError(
            "a counter put carries an integer increment, e.g. 1 or -3".into(),
        )),
    }
}

impl Merge for Counter {
    fn name(&self) -> &str {
        "counter"
    }
    fn check(&self, op: Op, payload: &[u8]) -> Result<(), MergeError> {
        if check_delete(op, payload)? {
            return Ok(());
        }
        counter_increment(payload).map(|_| ())
    }
    fn apply(&self, state: Option<&[u8]>, event: &Event) -> Result<Vec<u8>, MergeError> {
        let mut live: CounterState = decode_state(state, "counter")?;
        match event.op {
            Op::Put => {
                if let Ok(amount) = counter_increment(&event.payload) {
                    let list = live.entry(event.origin).or_default();
                    // An origin's events arrive in seq order, so this is an append; the
                    // search only guards the ordering the encoding relies on.
                    if let Err(pos) = list.binary_search_by_key(&event.seq, |&(s, _)| s) {
                        list.insert(pos, (event.seq, amount));
                    }
                }
            }
            Op::Delete => {
                for (origin, list) in live.iter_mut() {
                    let seen = event.clock.get(origin);
                    list.retain(|&(s, _)| s > seen);
                }
                live.retain(|_, list| !list.is_empty());
            }
        }
        Ok(encode(&live))
    }
    fn read(&self, state: &[u8]) -> Result<Option<Vec<u8>>, MergeError> {
        let live: CounterState = decode_state(Some(state), "counter")?;
        if live.values().all(Vec::is_empty) {
            return Ok(None);
        }
        // i128 cannot overflow: fewer than 2^64 increments of at most 2^63 each.
        let sum: i128 = live.values().flatten().map(|&(_, a)| i128::from(a)).sum();
        let clamped = sum.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
        Ok(Some(encode(&clamped)))
    }
}

// ---------------------------------------------------------------------------------------
// AddWinsSet
// ---------------------------------------------------------------------------------------

/// A set (observed-remove, add-wins). A put's payload is `{"add": [values]}` or
/// `{"remove": [values]}`; elements are compared by their canonical CBOR encoding, so
/// objects with the same fields in another order are the same element.
///
/// **Put vs delete:** a delete empties the set of every element whose adds it has seen,
/// and an add concurrent with the delete (or with a remove of that element) survives.
///
/// The set reads as a CBOR array of its elements sorted by their encoding. It reads as
/// absent when never written or when a delete has seen every put; a set emptied by
/// removes reads as `[]`, so "emptied" and "deleted" stay distinguishable.
///
/// State: each element with its live add-tags — at most one per origin, its latest add,
/// because any remove that sees the latest add of an origin also sees its earlier ones —
/// and, per origin, the latest put no delete has seen (what makes the set present).
#[derive(Debug, Clone, Copy, Default)]
pub struct AddWinsSet;

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct SetState(
    /// Element (canonical CBOR) -> origin -> seq of that origin's latest live add.
    BTreeMap<ByteBuf, BTreeMap<NodeId, u64>>,
    /// Origin -> seq of its latest put not seen by any delete.
    BTreeMap<NodeId, u64>,
);

enum SetOp {
    Add(Vec<Vec<u8>>),
    Remove(Vec<Vec<u8>>),
}

fn set_op(payload: &[u8]) -> Result<SetOp, MergeError> {
    let shape = || {
        MergeError(
            "a set put carries a map with exactly one key, \"add\" or \"remove\", whose value is an array"
                .into(),
        )
    };
    let Value::Map(mut entries) = decode_value(payload)? else {
        return Err(shape());
    };
    if entries.len() != 1 {
        return Err(shape());
    }
    let (k, v) = entries.pop().ok_or_else(shape)?;
    let (Value::Text(k), Value::Array(items)) = (k, v) else {
        return Err(shape());
    };
    let items = items.into_iter().map(canonical_bytes).collect();
    match k.as_str() {
        "add" => Ok(SetOp::Add(items)),
        "remove" => Ok(SetOp::Remove(items)),
        _ => Err(shape()),
    }
}

/// Drops the tags `clock` has seen; true when none is left.
fn drop_observed(tags: &mut BTreeMap<NodeId, u64>, clock: &crate::VectorClock) -> bool {
    tags.retain(|o, s| !clock.includes(&EventId::new(*o, *s)));
    tags.is_empty()
}

impl Merge for AddWinsSet {
    fn name(&self) -> &str {
        "set"
    }
    fn check(&self, op: Op, payload: &[u8]) -> Result<(), MergeError> {
        if check_delete(op, payload)? {
            return Ok(());
        }
        set_op(payload).map(|_| ())
    }
    fn apply(&self, state: Option<&[u8]>, event: &Event) -> Result<Vec<u8>, MergeError> {
        let SetState(mut elements, mut puts) = decode_state(state, "set")?;
        match event.op {
            Op::Put => {
                // A malformed remote op is a no-op everywhere (module docs).
                if let Ok(op) = set_op(&event.payload) {
                    // Events of one origin arrive in seq order: this put is its latest.
                    puts.insert(event.origin, event.seq);
                    match op {
                        SetOp::Add(items) => {
                            for item in items {
                                elements
                                    .entry(ByteBuf::from(item))
                                    .or_default()
                                    .insert(event.origin, event.seq);
                            }
                        }
                        SetOp::Remove(items) => {
                            for item in items {
                                let item = ByteBuf::from(item);
                                if let Some(tags) = elements.get_mut(&item) {
                                    if drop_observed(tags, &event.clock) {
                                        elements.remove(&item);
                                    }
                                }
                            }
                        }
                    }
                }
            }
            Op::Delete => {
                elements.retain(|_, tags| !drop_observed(tags, &event.clock));
                drop_observed(&mut puts, &event.clock);
            }
        }
        Ok(encode(&SetState(elements, puts)))
    }
    fn read(&self, state: &[u8]) -> Result<Option<Vec<u8>>, MergeError> {
        let SetState(elements, puts) = decode_state(Some(state), "set")?;
        if elements.is_empty() && puts.is_empty() {
            return Ok(None);
        }
        let items = elements
            .keys()
            .map(|bytes| decode_value(bytes))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| MergeError(format!("corrupt set state: {e}")))?;
        Ok(Some(encode(&Value::Array(items))))
    }
}

// ---------------------------------------------------------------------------------------
// JsonMerge
// ---------------------------------------------------------------------------------------

/// A JSON object merged field by field. A put's payload is a map with text keys; each
/// field it names is set, and a `null` field removes that field. Concurrent edits to
/// different fields both survive; concurrent edits to the same field are decided by
/// last-writer-wins on `(hlc, origin)`.
///
/// **Put vs delete:** a delete removes every field whose current value it has seen, and
/// a field written concurrently with the delete survives it.
///
/// The object reads as a CBOR map of its live fields, and as absent when it has none.
///
/// State: per field ever written, the stamp `(hlc, origin, seq)` of the write that
/// decides it and the value, or nothing when removed. A removed field keeps its stamp,
/// so an older concurrent write that arrives later cannot bring it back.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonMerge;

/// Field -> (hlc, origin, seq, canonical CBOR value or `None` when removed).
type JsonState = BTreeMap<String, (u64, NodeId, u64, Option<ByteBuf>)>;

/// The fields a json put sets: name and canonical value, `None` to remove the field.
type FieldWrites = Vec<(String, Option<Vec<u8>>)>;

fn json_fields(payload: &[u8]) -> Result<FieldWrites, MergeError> {
    let Value::Map(entries) = decode_value(payload)? else {
        return Err(MergeError(
            "a json put carries an object (a map with text keys)".into(),
        ));
    };
    entries
        .into_iter()
        .map(|(k, v)| match k {
            Value::Text(k) => Ok((k, (!v.is_null()).then(|| canonical_bytes(v)))),
            _ => Err(MergeError("json object keys must be text".into())),
        })
        .collect()
}

impl Merge for JsonMerge {
    fn name(&self) -> &str {
        "json"
    }
    fn check(&self, op: Op, payload: &[u8]) -> Result<(), MergeError> {
        if check_delete(op, payload)? {
            return Ok(());
        }
        json_fields(payload).map(|_| ())
    }
    fn apply(&self, state: Option<&[u8]>, event: &Event) -> Result<Vec<u8>, MergeError> {
        let mut fields: JsonState = decode_state(state, "json")?;
        // seq breaks the tie only between two events of one origin with one hlc, which
        // an honest origin never writes; it keeps the order total regardless.
        let stamp = (event.hlc.0, event.origin, event.seq);
        match event.op {
            Op::Put => {
                if let Ok(writes) = json_fields(&event.payload) {
                    for (name, value) in writes {
                        let newer = fields
                            .get(&name)
                            .is_none_or(|&(h, o, s, _)| stamp > (h, o, s));
                        if newer {
                            fields.insert(
                                name,
                                (stamp.0, stamp.1, stamp.2, value.map(ByteBuf::from)),
                            );
                        }
                    }
                }
            }
            Op::Delete => {
                for (_, (_, o, s, value)) in fields.iter_mut() {
                    if event.clock.includes(&EventId::new(*o, *s)) {
                        *value = None;
                    }
                }
            }
        }
        Ok(encode(&fields))
    }
    fn read(&self, state: &[u8]) -> Result<Option<Vec<u8>>, MergeError> {
        let fields: JsonState = decode_state(Some(state), "json")?;
        let live = fields
            .into_iter()
            .filter_map(|(k, (_, _, _, v))| v.map(|v| (k, v)))
            .map(|(k, v)| {
                decode_value(&v)
                    .map(|v| (Value::Text(k), v))
                    .map_err(|e| MergeError(format!("corrupt json state: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if live.is_empty() {
            return Ok(None);
        }
        Ok(Some(encode(&Value::Map(live))))
    }
}

// ---------------------------------------------------------------------------------------
// FnMerge
// ---------------------------------------------------------------------------------------

type CheckFn = dyn Fn(Op, &[u8]) -> Result<(), MergeError> + Send + Sync;
type ApplyFn = dyn Fn(Option<&[u8]>, &Event) -> Result<Vec<u8>, MergeError> + Send + Sync;
type ReadFn = dyn Fn(&[u8]) -> Result<Option<Vec<u8>>, MergeError> + Send + Sync;

/// A [`Merge`] made of closures, for an application that embeds weft and brings its own
/// value type. The closures are held to the [`Merge`] contract; the convergence
/// property tests show how to check one.
///
/// **Put vs delete:** whatever the application's `apply` decides; it should state the
/// rule in one sentence as the built-in types do.
#[derive(Clone)]
pub struct FnMerge {
    name: String,
    version: u32,
    check: Arc<CheckFn>,
    apply: Arc<ApplyFn>,
    read: Arc<ReadFn>,
}

impl FnMerge {
    /// A merge named `name` (recorded per space and compared between peers, with
    /// `version`) from its three functions; see [`Merge`] for what each must do.
    pub fn new(
        name: impl Into<String>,
        version: u32,
        check: impl Fn(Op, &[u8]) -> Result<(), MergeError> + Send + Sync + 'static,
        apply: impl Fn(Option<&[u8]>, &Event) -> Result<Vec<u8>, MergeError> + Send + Sync + 'static,
        read: impl Fn(&[u8]) -> Result<Option<Vec<u8>>, MergeError> + Send + Sync + 'static,
    ) -> Self {
        FnMerge {
            name: name.into(),
            version,
            check: Arc::new(check),
            apply: Arc::new(apply),
            read: Arc::new(read),
        }
    }
}

impl fmt::Debug for FnMerge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnMerge")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Merge for FnMerge {
    fn name(&self) -> &str {
        &self.name
    }
    fn version(&self) -> u32 {
        self.version
    }
    fn check(&self, op: Op, payload: &[u8]) -> Result<(), MergeError> {
        (self.check)(op, payload)
    }
    fn apply(&self, state: Option<&[u8]>, event: &Event) -> Result<Vec<u8>, MergeError> {
        (self.apply)(state, event)
    }
    fn read(&self, state: &[u8]) -> Result<Option<Vec<u8>>, MergeError> {
        (self.read)(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EventHash, Hlc, SpaceName, UnsignedEvent, VectorClock};

    fn node(i: u8) -> NodeId {
        NodeId::of(&ed25519_dalek::SigningKey::from_bytes(&[i; 32]))
    }

    /// An unsigned-in-spirit event: merges never look at the signature.
    fn ev(origin: u8, seq: u64, deps: &[(u8, u64)], hlc: u64, op: Op, payload: Vec<u8>) -> Event {
        let k = ed25519_dalek::SigningKey::from_bytes(&[origin; 32]);
        let mut clock: VectorClock = deps.iter().map(|&(i, s)| (node(i), s)).collect();
        clock.set(node(origin), seq);
        UnsignedEvent {
            origin: node(origin),
            seq,
            clock,
            hlc: Hlc::new(hlc, 0),
            key: "k".into(),
            op,
            kind: String::new(),
            payload,
            meta: Default::default(),
            prev: (seq > 1).then_some(EventHash([0; 32])),
        }
        .sign(&SpaceName::default_space(), &k)
    }

    fn cbor(v: &Value) -> Vec<u8> {
        encode(v)
    }

    fn int(i: i64) -> Vec<u8> {
        encode(&i)
    }

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    fn fold(m: &dyn Merge, events: &[&Event]) -> Option<Vec<u8>> {
        let mut state: Option<Vec<u8>> = None;
        for e in events {
            state = Some(m.apply(state.as_deref(), e).unwrap());
        }
        state
    }

    fn read(m: &dyn Merge, events: &[&Event]) -> Option<Value> {
        let state = fold(m, events)?;
        m.read(&state).unwrap().map(|b| decode_value(&b).unwrap())
    }

    #[test]
    fn counter_adds_and_a_delete_keeps_concurrent_increments() {
        let a1 = ev(1, 1, &[], 1, Op::Put, int(5));
        let b1 = ev(2, 1, &[], 1, Op::Put, int(-2));
        let c1 = ev(3, 1, &[], 1, Op::Put, int(10));
        // Deletes what it saw (a1, b1), concurrent with c1.
        let d = ev(1, 2, &[(2, 1)], 2, Op::Delete, vec![]);
        assert_eq!(read(&Counter, &[&a1, &b1]), Some(Value::from(3)));
        assert_eq!(
            read(&Counter, &[&a1, &b1, &d]),
            None,
            "all increments removed"
        );
        let one = fold(&Counter, &[&a1, &b1, &c1, &d]);
        let two = fold(&Counter, &[&c1, &b1, &a1, &d]);
        let three = fold(&Counter, &[&a1, &b1, &d, &c1]);
        assert_eq!(one, two);
        assert_eq!(one, three, "equal states are equal bytes");
        assert_eq!(read(&Counter, &[&a1, &b1, &d, &c1]), Some(Value::from(10)));
        let zero = ev(2, 2, &[], 3, Op::Put, int(2));
        assert_eq!(read(&Counter, &[&b1, &zero]), Some(Value::from(0)));
    }

    #[test]
    fn counter_checks_its_payloads() {
        assert!(Counter.check(Op::Put, &int(-7)).is_ok());
        assert!(Counter.check(Op::Delete, &[]).is_ok());
        assert!(Counter.check(Op::Put, &cbor(&text("1"))).is_err());
        assert!(Counter.check(Op::Put, &encode(&u64::MAX)).is_err());
        assert!(Counter.check(Op::Put, &[]).is_err());
        assert!(
            Counter.check(Op::Put, &[0x01, 0x01]).is_err(),
            "trailing bytes"
        );
        assert!(Counter.check(Op::Delete, &int(1)).is_err());
        // A malformed remote op is ignored, not an error.
        let bad = ev(1, 1, &[], 1, Op::Put, cbor(&text("x")));
        assert_eq!(read(&Counter, &[&bad]), None);
    }

    #[test]
    fn counter_sum_saturates() {
        let a = ev(1, 1, &[], 1, Op::Put, int(i64::MAX));
        let b = ev(2, 1, &[], 1, Op::Put, int(i64::MAX));
        assert_eq!(read(&Counter, &[&a, &b]), Some(Value::from(i64::MAX)));
    }

    fn set_op_bytes(op: &str, items: Vec<Value>) -> Vec<u8> {
        cbor(&Value::Map(vec![(text(op), Value::Array(items))]))
    }

    #[test]
    fn set_add_wins_over_a_concurrent_remove() {
        let add_a = ev(1, 1, &[], 1, Op::Put, set_op_bytes("add", vec![text("x")]));
        // b saw a's add and removes x; c adds x again concurrently.
        let rm_b = ev(
            2,
            1,
            &[(1, 1)],
            2,
            Op::Put,
            set_op_bytes("remove", vec![text("x")]),
        );
        let add_c = ev(
            3,
            1,
            &[],
            1,
            Op::Put,
            set_op_bytes("add", vec![text("x"), text("y")]),
        );
        let arr = |v: Vec<Value>| Some(Value::Array(v));
        assert_eq!(
            read(&AddWinsSet, &[&add_a, &rm_b]),
            arr(vec![]),
            "emptied, not deleted"
        );
        let s1 = fold(&AddWinsSet, &[&add_a, &rm_b, &add_c]);
        let s2 = fold(&AddWinsSet, &[&add_a, &add_c, &rm_b]);
        let s3 = fold(&AddWinsSet, &[&add_c, &add_a, &rm_b]);
        assert_eq!(s1, s2);
        assert_eq!(s1, s3);
        assert_eq!(
            read(&AddWinsSet, &[&add_a, &rm_b, &add_c]),
            arr(vec![text("x"), text("y")])
        );
    }

    #[test]
    fn set_delete_keeps_concurrent_adds_and_reads_absent_when_all_seen() {
        let add_a = ev(
            1,
            1,
            &[],
            1,
            Op::Put,
            set_op_bytes("add", vec![Value::from(1)]),
        );
        let add_c = ev(
            3,
            1,
            &[],
            1,
            Op::Put,
            set_op_bytes("add", vec![Value::from(2)]),
        );
        let del = ev(2, 1, &[(1, 1)], 2, Op::Delete, vec![]);
        assert_eq!(read(&AddWinsSet, &[&add_a, &del]), None);
        assert_eq!(
            read(&AddWinsSet, &[&add_a, &add_c, &del]),
            Some(Value::Array(vec![Value::from(2)]))
        );
        assert_eq!(
            fold(&AddWinsSet, &[&add_a, &add_c, &del]),
            fold(&AddWinsSet, &[&add_a, &del, &add_c])
        );
    }

    #[test]
    fn set_elements_are_compared_canonically() {
        let m1 = Value::Map(vec![
            (text("a"), Value::from(1)),
            (text("b"), Value::from(2)),
        ]);
        let m2 = Value::Map(vec![
            (text("b"), Value::from(2)),
            (text("a"), Value::from(1)),
        ]);
        let add = ev(1, 1, &[], 1, Op::Put, set_op_bytes("add", vec![m1.clone()]));
        let rm = ev(1, 2, &[], 2, Op::Put, set_op_bytes("remove", vec![m2]));
        assert_eq!(read(&AddWinsSet, &[&add]), Some(Value::Array(vec![m1])));
        assert_eq!(read(&AddWinsSet, &[&add, &rm]), Some(Value::Array(vec![])));
    }

    #[test]
    fn set_checks_its_payloads() {
        assert!(AddWinsSet
            .check(Op::Put, &set_op_bytes("add", vec![]))
            .is_ok());
        assert!(AddWinsSet
            .check(Op::Put, &set_op_bytes("remove", vec![text("x")]))
            .is_ok());
        assert!(AddWinsSet
            .check(Op::Put, &set_op_bytes("toggle", vec![]))
            .is_err());
        assert!(AddWinsSet
            .check(Op::Put, &cbor(&Value::Array(vec![])))
            .is_err());
        let two = Value::Map(vec![
            (text("add"), Value::Array(vec![])),
            (text("remove"), Value::Array(vec![])),
        ]);
        assert!(AddWinsSet.check(Op::Put, &cbor(&two)).is_err());
        let not_array = Value::Map(vec![(text("add"), Value::from(1))]);
        assert!(AddWinsSet.check(Op::Put, &cbor(&not_array)).is_err());
        assert_eq!(read(&AddWinsSet, &[]), None, "never written");
    }

    fn obj(fields: &[(&str, Value)]) -> Vec<u8> {
        cbor(&Value::Map(
            fields.iter().map(|(k, v)| (text(k), v.clone())).collect(),
        ))
    }

    #[test]
    fn json_merges_fields_and_same_field_is_lww() {
        let a = ev(
            1,
            1,
            &[],
            10,
            Op::Put,
            obj(&[("title", text("a")), ("done", Value::Bool(false))]),
        );
        let b = ev(2, 1, &[], 20, Op::Put, obj(&[("title", text("b"))]));
        let c = ev(
            3,
            1,
            &[],
            5,
            Op::Put,
            obj(&[("owner", text("c")), ("title", text("c"))]),
        );
        let want = Value::Map(vec![
            (text("done"), Value::Bool(false)),
            (text("owner"), text("c")),
            (text("title"), text("b")),
        ]);
        for order in [[&a, &b, &c], [&c, &b, &a], [&b, &a, &c]] {
            assert_eq!(read(&JsonMerge, &order), Some(want.clone()));
        }
        assert_eq!(
            fold(&JsonMerge, &[&a, &b, &c]),
            fold(&JsonMerge, &[&c, &a, &b])
        );
    }

    #[test]
    fn json_removed_field_is_not_resurrected_by_an_older_concurrent_write() {
        let a = ev(1, 1, &[], 10, Op::Put, obj(&[("x", Value::from(1))]));
        let rm = ev(1, 2, &[], 30, Op::Put, obj(&[("x", Value::Null)]));
        let old = ev(2, 1, &[], 20, Op::Put, obj(&[("x", Value::from(2))]));
        assert_eq!(read(&JsonMerge, &[&a, &rm, &old]), None);
        assert_eq!(read(&JsonMerge, &[&a, &old, &rm]), None);
        assert_eq!(read(&JsonMerge, &[&old, &a, &rm]), None);
    }

    #[test]
    fn json_delete_keeps_concurrent_field_writes() {
        let a = ev(
            1,
            1,
            &[],
            10,
            Op::Put,
            obj(&[("x", Value::from(1)), ("y", Value::from(1))]),
        );
        let del = ev(2, 1, &[(1, 1)], 20, Op::Delete, vec![]);
        let c = ev(3, 1, &[], 15, Op::Put, obj(&[("y", Value::from(3))]));
        let older = ev(4, 1, &[], 5, Op::Put, obj(&[("x", Value::from(4))]));
        let want = Some(Value::Map(vec![(text("y"), Value::from(3))]));
        assert_eq!(read(&JsonMerge, &[&a, &del, &c, &older]), want);
        assert_eq!(read(&JsonMerge, &[&a, &c, &older, &del]), want);
        assert_eq!(
            read(&JsonMerge, &[&older, &a, &del]),
            None,
            "older write lost to a"
        );
        assert_eq!(
            fold(&JsonMerge, &[&a, &del, &c, &older]),
            fold(&JsonMerge, &[&older, &c, &a, &del])
        );
    }

    #[test]
    fn json_checks_its_payloads() {
        assert!(JsonMerge
            .check(Op::Put, &obj(&[("a", Value::Null)]))
            .is_ok());
        assert!(JsonMerge.check(Op::Put, &int(1)).is_err());
        let int_key = cbor(&Value::Map(vec![(Value::from(1), Value::from(1))]));
        assert!(JsonMerge.check(Op::Put, &int_key).is_err());
        assert!(JsonMerge.check(Op::Delete, &[]).is_ok());
    }

    #[test]
    fn corrupt_state_is_an_error_not_a_panic() {
        for m in [&Counter as &dyn Merge, &AddWinsSet, &JsonMerge] {
            assert!(m.read(&[0xff, 0x13]).is_err(), "{}", m.name());
            let e = ev(1, 1, &[], 1, Op::Delete, vec![]);
            assert!(m.apply(Some(&[0x61]), &e).is_err(), "{}", m.name());
        }
    }
}
