//! Authenticating a batch of remote events before it reaches the writer.
//!
//! Plain functions over the batch, no I/O: `Store::ingest` runs them on a blocking
//! thread so that neither the writer nor the async runtime pays for signatures.

use std::cmp::Reverse;
use std::collections::HashMap;

use weft_crdt::{Event, EventError, NodeId, SpaceName};

use crate::StoreError;

/// Checks that every event is well-formed and was written by its origin for `space`.
///
/// Signatures are amortised over hash chains: an event whose authentic successor in the
/// batch (same origin, seq + 1) names its hash as `prev` is vouched for by that
/// successor's signature, because the hash covers every field including the signature.
/// A catch-up page of one origin's run of events thus costs one signature check and a
/// hash per event. Anything not vouched for is verified on its own.
///
/// On failure names the first bad event in batch order.
pub(crate) fn verify_batch(space: &SpaceName, events: &[Event]) -> Result<(), StoreError> {
    let mut first_bad: Option<(usize, EventError)> = None;
    let mut note = |i: usize, reason: EventError| {
        if first_bad.as_ref().is_none_or(|(j, _)| i < *j) {
            first_bad = Some((i, reason));
        }
    };

    let mut by_origin: HashMap<NodeId, Vec<usize>> = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        match e.validate() {
            Ok(()) => by_origin.entry(e.origin).or_default().push(i),
            Err(reason) => note(i, reason),
        }
    }

    for mut indexes in by_origin.into_values() {
        indexes.sort_by_key(|&i| Reverse(events[i].seq));
        // The lowest-seq event of this origin known to be authentic so far.
        let mut voucher: Option<&Event> = None;
        for i in indexes {
            let e = &events[i];
            let vouched = voucher
                .is_some_and(|v| v.seq == e.seq + 1 && v.prev.is_some_and(|p| p == e.hash()));
            if vouched {
                voucher = Some(e);
                continue;
            }
            match e.verify(space) {
                Ok(()) => voucher = Some(e),
                Err(reason) => {
                    note(i, reason);
                    voucher = None;
                }
            }
        }
    }

    match first_bad {
        Some((i, reason)) => Err(StoreError::Rejected {
            id: events[i].id(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_crdt::{Hlc, Op, SigningKey, UnsignedEvent, VectorClock};

    fn chain(key: &SigningKey, space: &SpaceName, n: u64) -> Vec<Event> {
        let origin = NodeId::of(key);
        let mut out: Vec<Event> = Vec::new();
        for seq in 1..=n {
            let mut clock = VectorClock::new();
            clock.set(origin, seq);
            let e = UnsignedEvent {
                origin,
                seq,
                clock,
                hlc: Hlc::new(seq, 0),
                key: "k".into(),
                op: Op::Put,
                kind: String::new(),
                payload: vec![seq as u8],
                meta: Default::default(),
                prev: out.last().map(Event::hash),
            }
            .sign(space, key);
            out.push(e);
        }
        out
    }

    #[test]
    fn a_tampered_event_anywhere_in_a_chain_is_named() {
        let space = SpaceName::new("s").unwrap();
        let key = SigningKey::from_bytes(&[3; 32]);
        let good = chain(&key, &space, 5);
        verify_batch(&space, &good).unwrap();
        for bad in 0..good.len() {
            let mut batch = good.clone();
            batch[bad].payload[0] ^= 0xff;
            match verify_batch(&space, &batch) {
                Err(StoreError::Rejected { id, .. }) => assert_eq!(id, good[bad].id()),
                other => panic!("tampering event {bad} went unnoticed: {other:?}"),
            }
        }
    }

    #[test]
    fn events_signed_for_another_space_are_rejected() {
        let key = SigningKey::from_bytes(&[4; 32]);
        let events = chain(&key, &SpaceName::new("a").unwrap(), 3);
        assert!(verify_batch(&SpaceName::new("b").unwrap(), &events).is_err());
    }
}
