//! Authenticating a batch of remote events before it reaches the writer.
//!
//! The decision is the sync core's [`weft_crdt::sync::verify_batch`] (one signature
//! check per origin chain, the rest vouched for by hashes); this maps its answer to the
//! store's error. No I/O: `Store::ingest` runs it on a blocking thread so that neither
//! the writer nor the async runtime pays for signatures.

use weft_crdt::{Event, EventHash, SpaceName};

use crate::StoreError;

/// Checks that every event is well-formed and was written by its origin for `space`;
/// on failure [`StoreError::Rejected`] names the first bad event in batch order.
#[cfg(test)]
pub(crate) fn verify_batch(space: &SpaceName, events: &[Event]) -> Result<(), StoreError> {
    weft_crdt::sync::verify_batch(space, events)
        .map_err(|(id, reason)| StoreError::Rejected { id, reason })
}

/// [`verify_batch`] with each event's hash already computed (`hashes[i]` of
/// `events[i]`), so that no event is encoded twice on its way in.
pub(crate) fn verify_hashed(
    space: &SpaceName,
    events: &[Event],
    hashes: &[EventHash],
) -> Result<(), StoreError> {
    weft_crdt::sync::verify_batch_hashed(space, events, hashes)
        .map_err(|(id, reason)| StoreError::Rejected { id, reason })
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_crdt::{Hlc, NodeId, Op, SigningKey, UnsignedEvent, VectorClock};

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
