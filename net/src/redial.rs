//! [`BootstrapPeers`]: when to (re)dial each configured bootstrap address, with
//! exponential backoff and jitter.
//!
//! Sans-I/O: the event loop reports what the swarm did (dial started, connection up, dial
//! failed, peer gone) with the current time, asks which addresses are due, and sleeps
//! until [`BootstrapPeers::next_deadline`]. Nothing here touches a socket, so the schedule
//! is tested with plain `Instant`s.
//!
//! Each address is in one state: `Dialing` (a dial is in flight), `Connected` (its peer
//! has at least one connection, whoever opened it) or `Waiting` until a deadline. Every
//! path out of `Dialing` or `Connected` other than success goes to `Waiting` with a delay
//! of at least `REDIAL_INITIAL * (1 - REDIAL_JITTER)`, so an address is never redialed in
//! a tight loop, whatever the peer does.

use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};
use rand::Rng;
use tokio::time::Instant;

/// First redial delay: 1 s. Long enough that a peer restarting (or a listener being
/// rebound) is not hammered, short enough that a brief drop heals before gossip notices.
pub(crate) const REDIAL_INITIAL: Duration = Duration::from_secs(1);

/// Largest redial delay: 60 s. After a few minutes of failures a peer is probably down for
/// a while; one attempt a minute costs nothing and still reconnects within a minute of it
/// coming back.
pub(crate) const REDIAL_MAX: Duration = Duration::from_secs(60);

/// Each delay is scaled by a random factor in `1 ± 0.25`, so nodes that lost the same peer
/// at the same moment (it restarted) do not all redial it in lockstep.
pub(crate) const REDIAL_JITTER: f64 = 0.25;

/// A connection that stayed up this long resets the backoff to [`REDIAL_INITIAL`]: 10 s.
/// One closed sooner counts as a failure, so a peer that accepts and then refuses us (its
/// connection limit is reached) or a flapping link backs off to [`REDIAL_MAX`] instead of
/// being redialed every second forever. Ten seconds is many round trips and identify and
/// gossipsub exchanges: a connection that lasts that long worked.
pub(crate) const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// Exponential backoff: [`REDIAL_INITIAL`] doubling up to [`REDIAL_MAX`], each delay
/// jittered by [`REDIAL_JITTER`].
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff {
            next: REDIAL_INITIAL,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.next = REDIAL_INITIAL;
    }

    /// The delay before the next attempt; the one after it is twice as long (capped).
    pub(crate) fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let base = self.next;
        self.next = (base * 2).min(REDIAL_MAX);
        base.mul_f64(rng.gen_range(1.0 - REDIAL_JITTER..=1.0 + REDIAL_JITTER))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Dialing(ConnectionId),
    Connected { since: Instant },
    Waiting { until: Instant },
}

#[derive(Debug)]
struct Entry {
    addr: Multiaddr,
    /// The peer last reached at `addr` (or named by its `/p2p` suffix). A restarted peer
    /// may come back with another identity; the next connection updates it.
    peer: Option<PeerId>,
    state: State,
    backoff: Backoff,
}

/// The configured bootstrap addresses and when each is dialed next.
#[derive(Debug, Default)]
pub(crate) struct BootstrapPeers {
    entries: Vec<Entry>,
}

/// What the loop should do for a due address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Due {
    pub(crate) index: usize,
    pub(crate) addr: Multiaddr,
    pub(crate) peer: Option<PeerId>,
}

impl BootstrapPeers {
    /// Records an address whose first dial is in flight as `connection`.
    pub(crate) fn add_dialing(&mut self, addr: Multiaddr, connection: ConnectionId) {
        let peer = addr.iter().find_map(|p| match p {
            Protocol::P2p(peer) => Some(peer),
            _ => None,
        });
        self.entries.push(Entry {
            addr,
            peer,
            state: State::Dialing(connection),
            backoff: Backoff::new(),
        });
    }

    /// A connection is up: the bootstrap dial `connection`, or any connection to a peer a
    /// waiting address leads to (it dialed us, or discovery reached it first).
    pub(crate) fn on_established(&mut self, connection: ConnectionId, peer: PeerId, now: Instant) {
        for e in &mut self.entries {
            let ours = e.state == State::Dialing(connection);
            let waiting_for_it = matches!(e.state, State::Waiting { .. }) && e.peer == Some(peer);
            if ours || waiting_for_it {
                e.peer = Some(peer);
                e.state = State::Connected { since: now };
            }
        }
    }

    /// The bootstrap dial `connection` failed. Returns the delay before the next attempt
    /// if `connection` was one of ours.
    pub(crate) fn on_dial_failed(
        &mut self,
        connection: ConnectionId,
        now: Instant,
        rng: &mut impl Rng,
    ) -> Option<(Multiaddr, Duration)> {
        let e = self
            .entries
            .iter_mut()
            .find(|e| e.state == State::Dialing(connection))?;
        let delay = e.backoff.next_delay(rng);
        e.state = State::Waiting { until: now + delay };
        Some((e.addr.clone(), delay))
    }

    /// The dial of a due address could not even start.
    pub(crate) fn on_dial_not_started(
        &mut self,
        index: usize,
        now: Instant,
        rng: &mut impl Rng,
    ) -> Option<Duration> {
        let e = self.entries.get_mut(index)?;
        let delay = e.backoff.next_delay(rng);
        e.state = State::Waiting { until: now + delay };
        Some(delay)
    }

    /// A due address is being dialed as `connection`.
    pub(crate) fn on_dialing(&mut self, index: usize, connection: ConnectionId) {
        if let Some(e) = self.entries.get_mut(index) {
            e.state = State::Dialing(connection);
        }
    }

    /// A due address's peer turned out to be connected already.
    pub(crate) fn on_already_connected(&mut self, index: usize, now: Instant) {
        if let Some(e) = self.entries.get_mut(index) {
            e.state = State::Connected { since: now };
        }
    }

    /// The last connection to `peer` closed. Schedules a redial of every address that led
    /// to it; returns those addresses with their delays.
    pub(crate) fn on_disconnected(
        &mut self,
        peer: PeerId,
        now: Instant,
        rng: &mut impl Rng,
    ) -> Vec<(Multiaddr, Duration)> {
        let mut scheduled = Vec::new();
        for e in &mut self.entries {
            let State::Connected { since } = e.state else {
                continue;
            };
            if e.peer != Some(peer) {
                continue;
            }
            if now.saturating_duration_since(since) >= STABLE_CONNECTION {
                e.backoff.reset();
            }
            let delay = e.backoff.next_delay(rng);
            e.state = State::Waiting { until: now + delay };
            scheduled.push((e.addr.clone(), delay));
        }
        scheduled
    }

    /// The addresses whose wait is over.
    pub(crate) fn due(&self, now: Instant) -> Vec<Due> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e.state, State::Waiting { until } if until <= now))
            .map(|(index, e)| Due {
                index,
                addr: e.addr.clone(),
                peer: e.peer,
            })
            .collect()
    }

    /// When the earliest waiting address is due, if any is waiting.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.entries
            .iter()
            .filter_map(|e| match e.state {
                State::Waiting { until } => Some(until),
                _ => None,
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn addr() -> Multiaddr {
        "/ip4/127.0.0.1/tcp/4001".parse().unwrap()
    }

    fn within_jitter(delay: Duration, base: Duration) -> bool {
        delay >= base.mul_f64(1.0 - REDIAL_JITTER) && delay <= base.mul_f64(1.0 + REDIAL_JITTER)
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_bounded_jitter_and_resets() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut b = Backoff::new();
        let mut base = REDIAL_INITIAL;
        for _ in 0..12 {
            let d = b.next_delay(&mut rng);
            assert!(within_jitter(d, base), "{d:?} vs {base:?}");
            base = (base * 2).min(REDIAL_MAX);
        }
        assert_eq!(base, REDIAL_MAX);
        b.reset();
        assert!(within_jitter(b.next_delay(&mut rng), REDIAL_INITIAL));
    }

    #[test]
    fn failed_dials_wait_longer_each_time_and_come_due() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut set = BootstrapPeers::default();
        let t0 = Instant::now();
        let c1 = ConnectionId::new_unchecked(1);
        set.add_dialing(addr(), c1);
        assert_eq!(set.next_deadline(), None);

        let (_, d1) = set.on_dial_failed(c1, t0, &mut rng).unwrap();
        assert!(within_jitter(d1, REDIAL_INITIAL));
        assert!(set.due(t0).is_empty());
        let due = set.due(t0 + d1);
        assert_eq!(due.len(), 1);
        assert_eq!(set.next_deadline(), Some(t0 + d1));

        let c2 = ConnectionId::new_unchecked(2);
        set.on_dialing(0, c2);
        assert_eq!(set.next_deadline(), None);
        let (_, d2) = set.on_dial_failed(c2, t0 + d1, &mut rng).unwrap();
        assert!(within_jitter(d2, REDIAL_INITIAL * 2));
        // Someone else's connection id is not ours.
        assert!(set
            .on_dial_failed(ConnectionId::new_unchecked(99), t0, &mut rng)
            .is_none());
    }

    #[test]
    fn a_lost_peer_is_redialed_and_a_stable_connection_resets_the_backoff() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut set = BootstrapPeers::default();
        let peer = PeerId::random();
        let t0 = Instant::now();
        let c1 = ConnectionId::new_unchecked(1);
        set.add_dialing(addr(), c1);
        // Two failures push the backoff to 4 s.
        set.on_dial_failed(c1, t0, &mut rng).unwrap();
        let c2 = ConnectionId::new_unchecked(2);
        set.on_dialing(0, c2);
        set.on_dial_failed(c2, t0, &mut rng).unwrap();
        let c3 = ConnectionId::new_unchecked(3);
        set.on_dialing(0, c3);
        set.on_established(c3, peer, t0);

        // Another peer leaving changes nothing.
        assert!(set
            .on_disconnected(PeerId::random(), t0, &mut rng)
            .is_empty());

        // Lost after a short connection: counts as a failure, 4 s.
        let lost = set.on_disconnected(peer, t0 + Duration::from_secs(1), &mut rng);
        assert_eq!(lost.len(), 1);
        assert!(within_jitter(lost[0].1, REDIAL_INITIAL * 4), "{lost:?}");

        // The peer dials us back before the redial: connected again without a dial.
        set.on_established(ConnectionId::new_unchecked(50), peer, t0);
        assert_eq!(set.next_deadline(), None);

        // Lost after a stable connection: back to 1 s.
        let lost = set.on_disconnected(peer, t0 + STABLE_CONNECTION, &mut rng);
        assert!(within_jitter(lost[0].1, REDIAL_INITIAL), "{lost:?}");
    }

    #[test]
    fn a_p2p_suffix_names_the_peer_up_front() {
        let peer = PeerId::random();
        let mut set = BootstrapPeers::default();
        set.add_dialing(
            addr().with(Protocol::P2p(peer)),
            ConnectionId::new_unchecked(1),
        );
        let mut rng = StdRng::seed_from_u64(3);
        let t0 = Instant::now();
        let (_, d) = set
            .on_dial_failed(ConnectionId::new_unchecked(1), t0, &mut rng)
            .unwrap();
        assert_eq!(set.due(t0 + d)[0].peer, Some(peer));
    }
}
