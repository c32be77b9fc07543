use std::fmt;

use serde::{Deserialize, Serialize};

/// A hybrid logical clock reading: wall-clock milliseconds in the high 48 bits and a
/// logical counter in the low 16.
///
/// Readings of one node strictly increase even if its wall clock steps back, and a node
/// that has seen a remote reading never issues a smaller one, so ordering by `Hlc`
/// respects causality while staying close to real time. Last-writer-wins orders by it.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Hlc(pub u64);

const LOGICAL_BITS: u32 = 16;
const LOGICAL_MASK: u64 = (1 << LOGICAL_BITS) - 1;

impl Hlc {
    /// Builds a reading from wall-clock milliseconds and a logical counter.
    pub fn new(wall_ms: u64, logical: u16) -> Self {
        Hlc((wall_ms << LOGICAL_BITS) | logical as u64)
    }

    /// The wall-clock part, in milliseconds since the Unix epoch.
    pub fn wall_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    /// The logical counter.
    pub fn logical(self) -> u16 {
        (self.0 & LOGICAL_MASK) as u16
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.wall_ms(), self.logical())
    }
}

/// A node's hybrid logical clock. The wall time is passed in, so the clock itself does
/// no I/O and can be driven by a simulation.
#[derive(Clone, Debug, Default)]
pub struct HlcClock {
    last: Hlc,
}

impl HlcClock {
    /// A clock that will never issue a reading at or below `last` (the highest reading
    /// this node issued or observed before a restart).
    pub fn starting_after(last: Hlc) -> Self {
        HlcClock { last }
    }

    /// A new reading for a local event, strictly greater than every earlier one.
    pub fn tick(&mut self, wall_ms: u64) -> Hlc {
        let next = Hlc::new(wall_ms, 0);
        self.last = if next > self.last {
            next
        } else {
            Hlc(self.last.0.saturating_add(1))
        };
        self.last
    }

    /// Takes in a reading from a remote event so later local readings follow it.
    pub fn observe(&mut self, remote: Hlc) {
        if remote > self.last {
            self.last = remote;
        }
    }

    /// The highest reading issued or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_increase_even_when_wall_clock_steps_back() {
        let mut c = HlcClock::default();
        let a = c.tick(1_000);
        let b = c.tick(1_000);
        let d = c.tick(900);
        assert!(a < b && b < d);
        assert_eq!(d.wall_ms(), 1_000);
        let e = c.tick(2_000);
        assert_eq!((e.wall_ms(), e.logical()), (2_000, 0));
    }

    #[test]
    fn observed_remote_readings_are_exceeded() {
        let mut c = HlcClock::default();
        c.observe(Hlc::new(5_000, 3));
        let t = c.tick(1_000);
        assert!(t > Hlc::new(5_000, 3));
    }
}
