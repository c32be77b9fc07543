use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::id::{EventId, NodeId};

/// How two vector clocks relate in the causal partial order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Causality {
    /// Every entry of the left clock is <= the right one's, and one is smaller.
    Before,
    /// The mirror of `Before`.
    After,
    /// Same entries.
    Equal,
    /// Each clock has an entry larger than the other's: neither saw the other.
    Concurrent,
}

/// A vector clock: for each origin, how many of its events (by seq) are included.
///
/// Missing entries mean 0 and zero entries are never stored, so two clocks with the
/// same meaning are equal as values and encode to the same bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VectorClock(BTreeMap<NodeId, u64>);

impl VectorClock {
    /// The empty clock (before everything).
    pub fn new() -> Self {
        Self::default()
    }

    /// The entry for `node` (0 when absent).
    pub fn get(&self, node: &NodeId) -> u64 {
        self.0.get(node).copied().unwrap_or(0)
    }

    /// Sets the entry for `node`; 0 removes it.
    pub fn set(&mut self, node: NodeId, seq: u64) {
        if seq == 0 {
            self.0.remove(&node);
        } else {
            self.0.insert(node, seq);
        }
    }

    /// Adds one to `node`'s entry and returns the new value.
    pub fn increment(&mut self, node: NodeId) -> u64 {
        let e = self.0.entry(node).or_insert(0);
        *e += 1;
        *e
    }

    /// Entry-wise maximum: the least clock that is >= both.
    pub fn merge(&mut self, other: &VectorClock) {
        for (n, &s) in &other.0 {
            let e = self.0.entry(*n).or_insert(0);
            if s > *e {
                *e = s;
            }
        }
    }

    /// Where `self` stands relative to `other` in the causal order.
    pub fn compare(&self, other: &VectorClock) -> Causality {
        let mut less = false;
        let mut greater = false;
        for (n, &a) in &self.0 {
            let b = other.get(n);
            if a < b {
                less = true;
            } else if a > b {
                greater = true;
            }
        }
        for (n, &b) in &other.0 {
            if !self.0.contains_key(n) && b > 0 {
                less = true;
            }
        }
        match (less, greater) {
            (false, false) => Causality::Equal,
            (true, false) => Causality::Before,
            (false, true) => Causality::After,
            (true, true) => Causality::Concurrent,
        }
    }

    /// True when the event `id` is included in this clock (happened before or is it).
    pub fn includes(&self, id: &EventId) -> bool {
        self.get(&id.origin) >= id.seq
    }

    /// Number of non-zero entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True for the empty clock.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The entries, ordered by node id.
    pub fn iter(&self) -> impl Iterator<Item = (&NodeId, u64)> {
        self.0.iter().map(|(n, s)| (n, *s))
    }

    /// True when any stored entry is zero, which a canonical clock never has.
    pub(crate) fn has_zero_entry(&self) -> bool {
        self.0.values().any(|&s| s == 0)
    }
}

impl FromIterator<(NodeId, u64)> for VectorClock {
    fn from_iter<T: IntoIterator<Item = (NodeId, u64)>>(iter: T) -> Self {
        let mut c = VectorClock::new();
        for (n, s) in iter {
            c.set(n, s);
        }
        c
    }
}

/// What a replica has of a space: for each origin, the highest seq such that it has
/// applied every event of that origin up to it.
///
/// Because events are applied in causal order, a version vector is also a valid vector
/// clock, and comparing two of them tells two peers exactly what each lacks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VersionVector(VectorClock);

impl VersionVector {
    /// The empty version vector (has nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// Highest contiguous seq applied from `origin`.
    pub fn get(&self, origin: &NodeId) -> u64 {
        self.0.get(origin)
    }

    /// Records that everything of `origin` up to `seq` is applied.
    pub fn set(&mut self, origin: NodeId, seq: u64) {
        self.0.set(origin, seq)
    }

    /// True when the event is already applied here.
    pub fn contains(&self, id: &EventId) -> bool {
        self.0.includes(id)
    }

    /// This version vector viewed as a vector clock.
    pub fn as_clock(&self) -> &VectorClock {
        &self.0
    }

    /// Entries ordered by origin.
    pub fn iter(&self) -> impl Iterator<Item = (&NodeId, u64)> {
        self.0.iter()
    }

    /// Number of origins with at least one applied event.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when nothing is applied.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Total number of events covered (the sum of the entries).
    pub fn total(&self) -> u64 {
        self.0.iter().map(|(_, s)| s).sum()
    }

    /// For every origin where `self` is ahead of `other`, the range of seqs `other`
    /// lacks, as `(origin, first_missing, last)`. This is what a responder owes a puller
    /// whose version vector is `other`.
    pub fn missing_from(&self, other: &VersionVector) -> Vec<(NodeId, u64, u64)> {
        self.iter()
            .filter_map(|(o, mine)| {
                let theirs = other.get(o);
                (mine > theirs).then_some((*o, theirs + 1, mine))
            })
            .collect()
    }

    /// Entry-wise maximum.
    pub fn merge(&mut self, other: &VersionVector) {
        self.0.merge(&other.0)
    }
}

impl From<VectorClock> for VersionVector {
    fn from(c: VectorClock) -> Self {
        VersionVector(c)
    }
}

impl FromIterator<(NodeId, u64)> for VersionVector {
    fn from_iter<T: IntoIterator<Item = (NodeId, u64)>>(iter: T) -> Self {
        VersionVector(iter.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(i: u8) -> NodeId {
        NodeId::from_bytes([i; 32])
    }

    fn clock() -> impl Strategy<Value = VectorClock> {
        proptest::collection::vec((0u8..4, 0u64..5), 0..6)
            .prop_map(|v| v.into_iter().map(|(i, s)| (n(i), s)).collect())
    }

    fn le(a: &VectorClock, b: &VectorClock) -> bool {
        matches!(a.compare(b), Causality::Before | Causality::Equal)
    }

    proptest! {
        #[test]
        fn compare_is_reflexive(a in clock()) {
            prop_assert_eq!(a.compare(&a), Causality::Equal);
        }

        #[test]
        fn compare_is_antisymmetric(a in clock(), b in clock()) {
            let ab = a.compare(&b);
            let ba = b.compare(&a);
            let mirrored = match ab {
                Causality::Before => Causality::After,
                Causality::After => Causality::Before,
                other => other,
            };
            prop_assert_eq!(ba, mirrored);
            if ab == Causality::Equal { prop_assert_eq!(&a, &b); }
        }

        #[test]
        fn order_is_transitive(a in clock(), b in clock(), c in clock()) {
            if le(&a, &b) && le(&b, &c) { prop_assert!(le(&a, &c)); }
        }

        #[test]
        fn merge_is_the_least_upper_bound(a in clock(), b in clock(), c in clock()) {
            let mut m = a.clone();
            m.merge(&b);
            prop_assert!(le(&a, &m) && le(&b, &m));
            if le(&a, &c) && le(&b, &c) { prop_assert!(le(&m, &c)); }
        }

        #[test]
        fn merge_is_commutative_associative_idempotent(a in clock(), b in clock(), c in clock()) {
            let mut ab = a.clone(); ab.merge(&b);
            let mut ba = b.clone(); ba.merge(&a);
            prop_assert_eq!(&ab, &ba);
            let mut ab_c = ab.clone(); ab_c.merge(&c);
            let mut bc = b.clone(); bc.merge(&c);
            let mut a_bc = a.clone(); a_bc.merge(&bc);
            prop_assert_eq!(&ab_c, &a_bc);
            let mut aa = a.clone(); aa.merge(&a);
            prop_assert_eq!(&aa, &a);
        }

        #[test]
        fn increment_moves_strictly_after(a in clock(), i in 0u8..4) {
            let mut b = a.clone();
            b.increment(n(i));
            prop_assert_eq!(a.compare(&b), Causality::Before);
        }

        #[test]
        fn missing_from_is_exactly_the_difference(a in clock(), b in clock()) {
            let (a, b) = (VersionVector::from(a), VersionVector::from(b));
            let mut patched = b.clone();
            for (o, first, last) in a.missing_from(&b) {
                prop_assert_eq!(first, b.get(&o) + 1);
                patched.set(o, last);
            }
            let mut m = a.clone(); m.merge(&b);
            prop_assert_eq!(patched, m);
        }
    }

    #[test]
    fn zero_entries_are_not_stored() {
        let mut c = VectorClock::new();
        c.set(n(1), 0);
        assert!(c.is_empty());
        assert_eq!(c, VectorClock::new());
        assert!(!c.has_zero_entry());
    }

    #[test]
    fn concurrent_clocks_are_detected() {
        let a: VectorClock = [(n(1), 2), (n(2), 1)].into_iter().collect();
        let b: VectorClock = [(n(1), 1), (n(2), 2)].into_iter().collect();
        assert_eq!(a.compare(&b), Causality::Concurrent);
    }
}
