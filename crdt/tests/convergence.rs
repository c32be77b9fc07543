//! Any delivery order converges, for every policy.
//!
//! A history is 3–5 replicas making concurrent writes to a few keys, interleaved with
//! partial syncs (an arbitrary subset of one replica's events handed to another, so
//! events arrive early and wait). Then every event is delivered to every replica again,
//! shuffled, with duplicates, in random batches. Every replica must end with the same
//! version vector, read every key the same, and have the same state digest.
//!
//! Failing cases are persisted next to this file (`convergence.proptest-regressions`)
//! and replayed first on every run; commit them.

use std::collections::BTreeMap;
use std::sync::Arc;

use ciborium::Value;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use weft_crdt::sync::Replica;
use weft_crdt::{
    Event, EventId, FnResolver, Op, Policy, PolicyKind, Resolution, SigningKey, SpaceName,
};

#[derive(Clone, Debug)]
enum Action {
    Write {
        replica: usize,
        key: u8,
        delete: bool,
        value: i8,
        variant: u8,
    },
    /// Hands the events of `from` picked by `mask` (bit `i % 32` for the i-th event) to
    /// `to`, in log order or reversed.
    Sync {
        from: usize,
        to: usize,
        mask: u32,
        reversed: bool,
    },
}

#[derive(Clone, Debug)]
struct History {
    replicas: usize,
    actions: Vec<Action>,
    delivery_seed: u64,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => (0usize..5, 0u8..3, prop::bool::weighted(0.15), any::<i8>(), any::<u8>()).prop_map(
            |(replica, key, delete, value, variant)| Action::Write { replica, key, delete, value, variant }
        ),
        1 => (0usize..5, 0usize..5, any::<u32>(), any::<bool>())
            .prop_map(|(from, to, mask, reversed)| Action::Sync { from, to, mask, reversed }),
    ]
}

fn history() -> impl Strategy<Value = History> {
    (
        3usize..=5,
        prop::collection::vec(action(), 1..32),
        any::<u64>(),
    )
        .prop_map(|(replicas, actions, delivery_seed)| History {
            replicas,
            actions,
            delivery_seed,
        })
}

fn cbor(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).expect("encoding into a Vec");
    out
}

/// A payload the policy accepts, derived from the generated numbers.
fn payload(kind: Option<PolicyKind>, value: i8, variant: u8) -> Vec<u8> {
    let v = Value::from(i64::from(value));
    match kind {
        Some(PolicyKind::Set) => {
            let op = if variant.is_multiple_of(3) {
                "remove"
            } else {
                "add"
            };
            let element = Value::from(i64::from(value.rem_euclid(4)));
            cbor(&Value::Map(vec![(
                Value::Text(op.into()),
                Value::Array(vec![element]),
            )]))
        }
        Some(PolicyKind::Json) => {
            let field = |i: u8| Value::Text(["title", "done", "owner"][usize::from(i % 3)].into());
            let value_or_removed = if value % 5 == 0 { Value::Null } else { v };
            let mut fields = vec![(field(variant), value_or_removed)];
            if variant.is_multiple_of(4) {
                fields.push((field(variant.wrapping_add(1)), Value::Bool(value > 0)));
            }
            cbor(&Value::Map(fields))
        }
        _ => cbor(&v),
    }
}

/// An application's own rule: the put with the greatest payload bytes wins, ties by
/// `(hlc, origin)`; the key is absent only when every frontier event is a delete.
fn custom_resolver() -> Policy {
    Policy::Resolve(Arc::new(FnResolver::new("greatest-value", 1, |frontier| {
        Resolution {
            value: frontier
                .iter()
                .copied()
                .filter(|e| e.op == Op::Put)
                .max_by(|a, b| (&a.payload, a.hlc, a.origin).cmp(&(&b.payload, b.hlc, b.origin))),
            siblings: Vec::new(),
        }
    })))
}

fn space() -> SpaceName {
    SpaceName::new("prop").expect("valid space name")
}

fn run(policy: Policy, kind: Option<PolicyKind>, h: History) -> Result<(), TestCaseError> {
    let mut replicas: Vec<Replica> = (0..h.replicas)
        .map(|i| {
            Replica::new(
                space(),
                policy.clone(),
                SigningKey::from_bytes(&[i as u8 + 1; 32]),
            )
        })
        .collect();
    let mut wall = 1_000u64;
    for a in &h.actions {
        match *a {
            Action::Write {
                replica,
                key,
                delete,
                value,
                variant,
            } => {
                let r = &mut replicas[replica % h.replicas];
                let (op, body) = if delete {
                    (Op::Delete, Vec::new())
                } else {
                    (Op::Put, payload(kind, value, variant))
                };
                // Wall time sometimes stands still or steps back: the HLC must cope.
                wall = wall
                    .wrapping_add(u64::from(variant % 3))
                    .saturating_sub(u64::from(variant.is_multiple_of(5)));
                r.write(&format!("k{key}"), op, body, wall)
                    .map_err(|e| TestCaseError::fail(format!("write refused: {e}")))?;
            }
            Action::Sync {
                from,
                to,
                mask,
                reversed,
            } => {
                let (from, to) = (from % h.replicas, to % h.replicas);
                let mut batch: Vec<Event> = replicas[from]
                    .events()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << (i % 32)) != 0)
                    .map(|(_, e)| e.clone())
                    .collect();
                if reversed {
                    batch.reverse();
                }
                replicas[to]
                    .ingest(batch)
                    .map_err(|e| TestCaseError::fail(format!("partial sync refused: {e}")))?;
            }
        }
    }

    let mut all: BTreeMap<EventId, Event> = BTreeMap::new();
    for r in &replicas {
        for e in r.events() {
            all.insert(e.id(), e.clone());
        }
    }
    let mut rng = StdRng::seed_from_u64(h.delivery_seed);
    for r in &mut replicas {
        let mut delivery: Vec<Event> = all.values().cloned().collect();
        let dups: Vec<Event> = all
            .values()
            .filter(|_| rng.gen_bool(0.3))
            .cloned()
            .collect();
        delivery.extend(dups);
        delivery.shuffle(&mut rng);
        while !delivery.is_empty() {
            let n = rng.gen_range(1..=delivery.len().min(8));
            let batch: Vec<Event> = delivery.drain(..n).collect();
            r.ingest(batch)
                .map_err(|e| TestCaseError::fail(format!("delivery refused: {e}")))?;
        }
    }

    let first = &replicas[0];
    prop_assert_eq!(first.len(), all.len());
    for r in &replicas {
        prop_assert!(r.pending().is_empty(), "events left parked on {}", r.id());
        prop_assert_eq!(r.version_vector(), first.version_vector());
        let keys: Vec<&str> = r.keys().collect();
        prop_assert_eq!(keys, first.keys().collect::<Vec<_>>());
        for key in first.keys() {
            let mine = r
                .read(key)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let theirs = first
                .read(key)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(mine, theirs, "key {} differs", key);
        }
        prop_assert_eq!(r.state_digest(), first.state_digest());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn lww_converges(h in history()) {
        run(PolicyKind::Lww.policy(), Some(PolicyKind::Lww), h)?;
    }

    #[test]
    fn multi_value_converges(h in history()) {
        run(PolicyKind::Multi.policy(), Some(PolicyKind::Multi), h)?;
    }

    #[test]
    fn counter_converges(h in history()) {
        run(PolicyKind::Counter.policy(), Some(PolicyKind::Counter), h)?;
    }

    #[test]
    fn add_wins_set_converges(h in history()) {
        run(PolicyKind::Set.policy(), Some(PolicyKind::Set), h)?;
    }

    #[test]
    fn json_merge_converges(h in history()) {
        run(PolicyKind::Json.policy(), Some(PolicyKind::Json), h)?;
    }

    #[test]
    fn custom_resolver_converges(h in history()) {
        run(custom_resolver(), None, h)?;
    }
}
