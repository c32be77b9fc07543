use serde::{Deserialize, Serialize};

use crate::event::Event;
use crate::id::EventId;

/// The frontier of one key: the ids of the events for that key that no other applied
/// event for that key causally follows.
///
/// One id: that event decides the value. Several: they are concurrent, and the space's
/// [`crate::Resolver`] decides what reads return. Because events are applied in causal
/// order, a newly applied event is never followed by one already applied, so applying
/// it only ever removes the ids its clock includes and adds its own. The result depends
/// only on the set of applied events, not on their order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Frontier(Vec<EventId>);

impl Frontier {
    /// The empty frontier (a key never written).
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies an event for this key. The event must be causally ready on the replica.
    pub fn apply(&mut self, event: &Event) {
        self.0
            .retain(|id| !event.clock.includes(id) || *id == event.id());
        let id = event.id();
        if let Err(pos) = self.0.binary_search(&id) {
            self.0.insert(pos, id);
        }
    }

    /// The ids, sorted.
    pub fn ids(&self) -> &[EventId] {
        &self.0
    }

    /// True when more than one concurrent event stands for the key.
    pub fn is_conflict(&self) -> bool {
        self.0.len() > 1
    }

    /// True for a key never written.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Hlc, NodeId, Op, SpaceName, UnsignedEvent, VectorClock};

    fn ev(origin: u8, seq: u64, deps: &[(u8, u64)]) -> Event {
        let k = ed25519_dalek::SigningKey::from_bytes(&[origin; 32]);
        let o = NodeId::of(&k);
        let mut clock: VectorClock = deps
            .iter()
            .map(|(i, s)| {
                (
                    NodeId::of(&ed25519_dalek::SigningKey::from_bytes(&[*i; 32])),
                    *s,
                )
            })
            .collect();
        clock.set(o, seq);
        UnsignedEvent {
            origin: o,
            seq,
            clock,
            hlc: Hlc::new(seq, 0),
            key: "k".into(),
            op: Op::Put,
            kind: String::new(),
            payload: vec![],
            meta: Default::default(),
            prev: (seq > 1).then_some(crate::EventHash([0; 32])),
        }
        .sign(&SpaceName::default_space(), &k)
    }

    #[test]
    fn concurrent_writes_coexist_and_a_later_write_supersedes_them() {
        let a1 = ev(1, 1, &[]);
        let b1 = ev(2, 1, &[]);
        let mut f = Frontier::new();
        f.apply(&a1);
        f.apply(&b1);
        assert!(f.is_conflict());
        let mut g = Frontier::new();
        g.apply(&b1);
        g.apply(&a1);
        assert_eq!(f, g, "order of concurrent events does not matter");
        let a2 = ev(1, 2, &[(2, 1)]);
        f.apply(&a2);
        assert_eq!(f.ids(), &[a2.id()]);
    }
}
