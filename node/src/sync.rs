//! The sync loop: the one task that turns network events into store operations and
//! decides when to pull.
//!
//! Ownership and flow:
//! - `weft-net`'s event loop owns the libp2p swarm and sends [`NetEvent`]s here over a
//!   bounded channel; this loop owns nothing but bookkeeping (which pulls are in
//!   flight) and spawns a task per pull and per pull served, so a slow disk or a slow
//!   peer never stalls the others.
//! - Gossip batches are handed to the store by this loop itself, in the order they
//!   arrived ([`submit_gossip`]): authenticated (small batches on this task, larger ones
//!   on blocking threads) and queued for the writer. The loop then waits for each
//!   commit alongside its other work (`verdicts`) and sends the verdict back to
//!   gossipsub, so invalid messages are never forwarded. A batch that leaves events
//!   waiting for dependencies reveals a gap, and triggers a pull from its sender.
//!   Arrival order matters: a writer's messages arrive in its commit order, and a task
//!   per message let two of them reach the store swapped, which parked the later one
//!   and started a needless pull (hundreds per thousand writes in a five-node mesh at
//!   1,000 writes/s).
//! - Pull requests from peers are answered from the store on blocking threads.
//! - A pull runs page by page until the responder says `done`: on every new
//!   connection, when a peer subscribes to a space, on a gap, and periodically against
//!   a random peer (anti-entropy, with jitter).
//! - Local writes reach this loop from the store's commit feed, in commit order, and go
//!   out as gossip, batched when they arrive faster than the swarm takes them. A batch
//!   ends each space's run on a signed event (the store signs the last event of each
//!   commit), so receivers can verify it; unsigned events wait for their voucher.
//! - Each space's [`crate::SpaceMode`] gates the automatic part: a push-only space is
//!   never pulled and its gossip is ignored; with `auto_pull` off (`--no-auto-pull`)
//!   the node pulls only when asked ([`crate::Node::sync_now`]). Pulls are served for
//!   every hosted space whatever its mode.
//! - Every pull of a (peer, space) pair is one [`PullTrack`] at a time: a pull started
//!   while another of the same pair runs joins it, so `sync_now` can wait on (and count)
//!   a pull the loop started and the loop never runs two of the same pair.
//! - Every pull carries the space's policy identity. Peers whose policy differs are
//!   refused in both directions with a clear error, and gossip for a space is only taken
//!   from peers a pull exchange has shown to be compatible; until then the pull that
//!   checks compatibility also fetches what the gossip carried.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use rand::Rng;
use tokio::sync::{broadcast, mpsc, watch};
use weft_crdt::{PolicyIdentity, SpaceName, VersionVector};
use weft_net::{NetEvent, PeerId, PullRequest, PullResponse, Verdict};
use weft_store::{Applied, IngestTicket, StoreError};

use crate::node::Node;

/// Tunables of the sync loop.
#[derive(Debug, Clone)]
pub(crate) struct SyncConfig {
    /// Base period of anti-entropy pulls.
    pub anti_entropy: Duration,
    /// Events per pull page. 1,000 keeps a page near 300 KB for typical events: big
    /// enough to amortise a round trip and a commit, small enough to stay responsive
    /// and to resume a stalled catch-up close to where it stopped. (Pages of 5,000
    /// were measured too: no faster once pages are pipelined.)
    pub page_events: u32,
    /// Bytes per pull page (the responder stops adding events past it).
    pub page_bytes: u32,
    /// Most pages one pull may take before yielding; bounds a pull against a peer that
    /// keeps producing.
    pub max_pages: usize,
    /// How long a pull waits for one page before it counts the peer as stalled and
    /// resumes elsewhere. 10 s: a page of 1,000 events is a few hundred KB, which any
    /// live link delivers in well under a second.
    pub page_timeout: Duration,
    /// Most events in one gossip message.
    pub publish_batch: usize,
    /// Whether the node pulls by itself (on connection, on subscription, on a gossip
    /// gap and for anti-entropy). Off, it pulls only in [`crate::Node::sync_now`].
    pub auto_pull: bool,
    /// The longest [`crate::Node::sync_now`] waits for its pulls. Five minutes: a
    /// catch-up of a million events takes well under that on any live link, and a
    /// stalled page is cut off after `page_timeout` anyway.
    pub sync_timeout: Duration,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            anti_entropy: Duration::from_secs(15),
            page_events: 1_000,
            page_bytes: 4 * 1024 * 1024,
            max_pages: 100_000,
            page_timeout: Duration::from_secs(10),
            publish_batch: 256,
            auto_pull: true,
            sync_timeout: Duration::from_secs(300),
        }
    }
}

/// The most a peer may ask for in one page, whatever its request says: it bounds the
/// memory and the time one answer takes.
const MAX_SERVED_EVENTS: u32 = 10_000;
const MAX_SERVED_BYTES: u32 = 8 * 1024 * 1024;

/// What the loop knows about each (peer, space) pair.
#[derive(Default)]
pub(crate) struct PeerSpaces {
    in_flight: HashMap<(PeerId, SpaceName), Arc<PullTrack>>,
    compatible: HashSet<(PeerId, SpaceName)>,
    /// Peers refused for a space, with the policy they use there.
    pub(crate) incompatible: HashMap<(PeerId, SpaceName), PolicyIdentity>,
    /// What each peer last told us it has, and when.
    pub(crate) seen: HashMap<(PeerId, SpaceName), PeerSync>,
    /// Events served to each peer's pulls of each space while it has been connected.
    pub(crate) served: HashMap<(PeerId, SpaceName), u64>,
}

/// One pull of a space from a peer, shared by everyone waiting on it: the counts grow
/// page by page, and `end` is set once when the pull stops.
pub(crate) struct PullTrack {
    /// Events the pull applied.
    pub(crate) applied: AtomicU64,
    /// Pages answered (an empty last page included).
    pub(crate) pages: AtomicU64,
    /// Canonical encoded size of the events received.
    pub(crate) bytes: AtomicU64,
    end: watch::Sender<Option<Result<(), PullError>>>,
}

impl PullTrack {
    fn new() -> Self {
        PullTrack {
            applied: AtomicU64::new(0),
            pages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            end: watch::Sender::new(None),
        }
    }

    /// Waits until the pull stops and returns how.
    pub(crate) async fn finished(&self) -> Result<(), PullError> {
        let mut end = self.end.subscribe();
        let result = match end.wait_for(Option::is_some).await {
            Ok(end) => end.clone().unwrap_or(Ok(())),
            // Unreachable while `self` holds the sender; say so rather than hang.
            Err(_) => Err(PullError::Final("the pull was dropped".into())),
        };
        result
    }
}

/// The last sync exchange with a peer for a space.
#[derive(Debug, Clone)]
pub(crate) struct PeerSync {
    /// The peer's version vector as of its last answer.
    pub(crate) version_vector: VersionVector,
    /// When that answer arrived.
    pub(crate) last_sync: std::time::SystemTime,
}

pub(crate) type InFlight = Arc<Mutex<PeerSpaces>>;

pub(crate) fn lock(state: &InFlight) -> std::sync::MutexGuard<'_, PeerSpaces> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// How many events `have` holds that `other` lacks.
pub(crate) fn events_lacking(have: &VersionVector, other: &VersionVector) -> u64 {
    have.missing_from(other)
        .iter()
        .map(|(_, from, to)| to + 1 - from)
        .sum()
}

/// The refusal a responder gives for a space it does not host; a puller recognises it
/// as "nothing to exchange" rather than as a failure.
fn not_hosted(space: &SpaceName) -> String {
    format!("space {space} is not hosted here")
}

fn refuse_message(
    peer: &PeerId,
    space: &SpaceName,
    theirs: &PolicyIdentity,
    ours: &PolicyIdentity,
) -> String {
    format!(
        "peer {peer} hosts space {space} with resolver {theirs} but this node uses {ours}: \
         refusing to exchange its events (they would resolve conflicts differently)"
    )
}

pub(crate) async fn run(
    node: Node,
    mut events: mpsc::Receiver<NetEvent>,
    mut applied: broadcast::Receiver<Arc<Applied>>,
    mut shutdown: watch::Receiver<bool>,
    config: SyncConfig,
) {
    let in_flight: InFlight = node.inner.peer_spaces.clone();
    let mut anti_entropy = tokio::time::interval(jittered(config.anti_entropy));
    anti_entropy.tick().await;
    let mut held: Vec<(SpaceName, weft_crdt::Event)> = Vec::new();
    // Gossip batches queued for the writer, each waiting for its commit to report the
    // verdict. Bounded by the store: at most the writer's queue and the batch it is
    // committing, since `submit_ingest` waits while that queue is full (and meanwhile
    // this loop takes no new network events, which pushes back on the network).
    let mut verdicts: FuturesUnordered<BoxFuture<'static, ()>> = FuturesUnordered::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            ev = events.recv() => match ev {
                Some(ev) => {
                    if let Some(verdict) = handle(&node, ev, &in_flight, &config).await {
                        verdicts.push(verdict);
                    }
                }
                None => break,
            },
            Some(()) = verdicts.next(), if !verdicts.is_empty() => {}
            first = applied.recv() => match first {
                Ok(first) => {
                    publish_batch(&node, first, &mut applied, &mut held, &config).await
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    // Those writes (and any unsigned ones held, whose voucher may be
                    // among them) spread by pull instead.
                    tracing::debug!("publisher fell {n} events behind; pull will carry them");
                    held.clear();
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            _ = anti_entropy.tick(), if config.auto_pull => {
                anti_entropy.reset_after(jittered(config.anti_entropy));
                match node.inner.net.connected_peers().await {
                    Ok(peers) if !peers.is_empty() => {
                        let peer = peers[rand::thread_rng().gen_range(0..peers.len())];
                        for space in node.inner.modes.keys().cloned() {
                            spawn_pull(&node, peer, space, &in_flight, &config);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!("anti-entropy: {e}"),
                }
            }
        }
    }
    tracing::debug!("sync loop stopped");
}

fn jittered(base: Duration) -> Duration {
    let quarter = base.as_millis() as u64 / 4;
    base + Duration::from_millis(rand::thread_rng().gen_range(0..=quarter))
}

/// Gathers the local writes already committed behind `first` into one gossip message
/// per space, so a burst of writes costs a few messages rather than one each.
///
/// Each space's message ends on a signed event: unsigned events after it stay in
/// `held` until the signed event of their commit arrives (it is in the same commit, so
/// right behind them on the feed).
async fn publish_batch(
    node: &Node,
    first: Arc<Applied>,
    feed: &mut broadcast::Receiver<Arc<Applied>>,
    held: &mut Vec<(SpaceName, weft_crdt::Event)>,
    config: &SyncConfig,
) {
    let local = node.inner.node_id;
    let take = |a: &Applied, held: &mut Vec<(SpaceName, weft_crdt::Event)>| {
        if a.event.origin == local {
            held.push((a.space.clone(), a.event.clone()));
        }
    };
    take(&first, held);
    let mut taken = 1;
    while taken < config.publish_batch {
        match feed.try_recv() {
            Ok(a) => {
                take(&a, held);
                taken += 1;
            }
            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                tracing::debug!("publisher fell {n} events behind; pull will carry them");
                held.clear();
            }
            Err(_) => break,
        }
    }
    let mut by_space: Vec<(SpaceName, Vec<weft_crdt::Event>)> = Vec::new();
    let mut rest: Vec<(SpaceName, weft_crdt::Event)> = Vec::new();
    for (space, event) in held.drain(..) {
        match by_space.iter_mut().find(|(s, _)| *s == space) {
            Some((_, evs)) => evs.push(event),
            None => by_space.push((space, vec![event])),
        }
    }
    for (space, mut evs) in by_space {
        let cut = evs
            .iter()
            .rposition(|e| e.sig.is_some())
            .map_or(0, |i| i + 1);
        rest.extend(evs.drain(cut..).map(|e| (space.clone(), e)));
        if evs.is_empty() {
            continue;
        }
        if let Err(e) = node.inner.net.publish(space, evs).await {
            tracing::debug!("gossip publish failed (pull will cover it): {e}");
        }
    }
    *held = rest;
}

/// Acts on one network event. Only gossip can leave work behind: the wait for its
/// commit, returned for the loop to drive.
async fn handle(
    node: &Node,
    ev: NetEvent,
    in_flight: &InFlight,
    config: &SyncConfig,
) -> Option<BoxFuture<'static, ()>> {
    match ev {
        NetEvent::Listening { addr } => tracing::info!(%addr, "listening"),
        NetEvent::PeerConnected { peer } => {
            tracing::info!(%peer, "peer connected");
            for space in node.inner.modes.keys().cloned() {
                spawn_pull(node, peer, space, in_flight, config);
            }
        }
        NetEvent::PeerDisconnected { peer } => {
            tracing::info!(%peer, "peer disconnected");
            let mut st = lock(in_flight);
            st.compatible.retain(|(p, _)| *p != peer);
            st.seen.retain(|(p, _), _| *p != peer);
            st.incompatible.retain(|(p, _), _| *p != peer);
            st.served.retain(|(p, _), _| *p != peer);
        }
        NetEvent::PeerSubscribed { peer, space } => {
            spawn_pull(node, peer, space, in_flight, config);
        }
        NetEvent::Gossip {
            source,
            message_id,
            space,
            events,
        } => {
            let gossip = Gossip {
                source,
                message_id,
                space,
                events,
            };
            return submit_gossip(node, gossip, in_flight, config).await;
        }
        NetEvent::PullRequested {
            peer,
            request,
            reply,
        } => {
            let node = node.clone();
            let in_flight = in_flight.clone();
            tokio::spawn(async move {
                let response = serve_pull(&node, peer, request, &in_flight).await;
                if let PullResponse::Refused { reason } = &response {
                    tracing::debug!(%peer, "refused pull: {reason}");
                }
                let _ = reply.send(response);
            });
        }
    }
    None
}

/// A gossip message as the network delivered it.
struct Gossip {
    source: PeerId,
    message_id: weft_net::MessageId,
    space: SpaceName,
    events: Vec<weft_crdt::Event>,
}

/// Hands a gossip batch to the store, in the order the loop calls it, and returns what
/// is left to do once the batch is committed: report the verdict, and pull from the
/// sender if the batch left events waiting for a gap. `None` when the verdict was
/// reported at once (not taken in, or refused by authentication).
async fn submit_gossip(
    node: &Node,
    gossip: Gossip,
    in_flight: &InFlight,
    config: &SyncConfig,
) -> Option<BoxFuture<'static, ()>> {
    let Gossip {
        source,
        message_id,
        space,
        events,
    } = gossip;
    let pair = (source, space.clone());
    let compatible = lock(in_flight).compatible.contains(&pair);
    let takes_in = node
        .inner
        .modes
        .get(&space)
        .is_some_and(|m| m.takes_remote_events());
    let early = if !takes_in {
        // Not hosted, or push-only: nothing of it comes in, and it is not forwarded
        // unverified.
        Verdict::Ignore
    } else if !compatible {
        // Not yet known to share our policy: the pull checks that and fetches these
        // events if it does.
        spawn_pull(node, source, space.clone(), in_flight, config);
        Verdict::Ignore
    } else {
        match node.inner.store.submit_ingest(&space, events).await {
            Ok(ticket) => {
                let node = node.clone();
                let in_flight = in_flight.clone();
                let config = config.clone();
                return Some(
                    async move {
                        let verdict = gossip_verdict(
                            &node,
                            source,
                            &space,
                            ticket.outcome().await,
                            &in_flight,
                            &config,
                        );
                        report(&node, message_id, source, verdict).await;
                    }
                    .boxed(),
                );
            }
            Err(e) => gossip_verdict(node, source, &space, Err(e), in_flight, config),
        }
    };
    report(node, message_id, source, early).await;
    None
}

/// The verdict on a gossip batch from its ingest outcome; starts a pull from `source`
/// when the batch left events waiting for dependencies.
fn gossip_verdict(
    node: &Node,
    source: PeerId,
    space: &SpaceName,
    outcome: Result<weft_store::IngestOutcome, StoreError>,
    in_flight: &InFlight,
    config: &SyncConfig,
) -> Verdict {
    match outcome {
        Ok(outcome) => {
            if outcome.parked > 0 {
                spawn_pull(node, source, space.clone(), in_flight, config);
            }
            Verdict::Accept
        }
        Err(StoreError::Rejected { id, reason }) => {
            tracing::warn!(peer = %source, %space, event = %id, "rejected gossip: {reason}");
            Verdict::Reject
        }
        Err(e) => {
            tracing::error!(%space, "ingesting gossip failed: {e}");
            Verdict::Ignore
        }
    }
}

async fn report(node: &Node, message_id: weft_net::MessageId, source: PeerId, verdict: Verdict) {
    if let Err(e) = node
        .inner
        .net
        .report_validation(message_id, source, verdict)
        .await
    {
        tracing::debug!("reporting gossip validation: {e}");
    }
}

async fn serve_pull(
    node: &Node,
    peer: PeerId,
    request: PullRequest,
    state: &InFlight,
) -> PullResponse {
    let Some(policy) = node.inner.policies.get(&request.space) else {
        return PullResponse::Refused {
            reason: not_hosted(&request.space),
        };
    };
    let ours = policy.identity();
    let pair = (peer, request.space.clone());
    if request.policy != ours {
        tracing::error!(
            "{}",
            refuse_message(&peer, &request.space, &request.policy, &ours)
        );
        let mut st = lock(state);
        st.compatible.remove(&pair);
        st.incompatible.insert(pair, request.policy.clone());
        return PullResponse::Incompatible { policy: ours };
    }
    {
        let mut st = lock(state);
        st.incompatible.remove(&pair);
        st.compatible.insert(pair.clone());
    }
    let store = &node.inner.store;
    let max_events = request.max_events.clamp(1, MAX_SERVED_EVENTS) as usize;
    let max_bytes = request.max_bytes.clamp(1, MAX_SERVED_BYTES) as usize;
    let page = match store
        .pull_page(&request.space, request.have, max_events, max_bytes)
        .await
    {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(space = %request.space, "serving a pull failed: {e}");
            return PullResponse::Refused {
                reason: "the responder could not read its log".into(),
            };
        }
    };
    match store.version_vector(&request.space).await {
        Ok(have) => {
            *lock(state).served.entry(pair).or_default() += page.events.len() as u64;
            PullResponse::Events {
                events: page.events,
                done: page.done,
                have,
            }
        }
        Err(e) => PullResponse::Refused {
            reason: format!("the responder could not read its version vector: {e}"),
        },
    }
}

/// Starts a pull of `space` from `peer` unless one is already running, when the node
/// pulls by itself and the space takes events in.
fn spawn_pull(
    node: &Node,
    peer: PeerId,
    space: SpaceName,
    in_flight: &InFlight,
    config: &SyncConfig,
) {
    let pulls = node
        .inner
        .modes
        .get(&space)
        .is_some_and(|m| m.takes_remote_events());
    if config.auto_pull && pulls {
        start_pull(node, peer, space, in_flight, config, Some(0));
    }
}

/// Most times a pull that stalled or failed in transit is resumed from another peer (or
/// the same one) before it is left to anti-entropy.
pub(crate) const MAX_PULL_RESUMES: u32 = 5;

/// The pause before resuming a pull for the `attempt`-th time: 200 ms doubling, at most
/// 6.4 s, so a flapping peer is not hammered.
pub(crate) fn resume_delay(attempt: u32) -> Duration {
    Duration::from_millis(200 << attempt.min(5))
}

/// Starts a pull of `space` from `peer`, or joins the one of that pair already running;
/// `None` when the peer is known to use another policy for the space.
///
/// With `resume: Some(attempt)`, a pull that is interrupted in transit is resumed from
/// another connected peer (the loop's own pulls); with `None` the caller decides.
pub(crate) fn start_pull(
    node: &Node,
    peer: PeerId,
    space: SpaceName,
    in_flight: &InFlight,
    config: &SyncConfig,
    resume: Option<u32>,
) -> Option<Arc<PullTrack>> {
    let track = {
        let mut st = lock(in_flight);
        let pair = (peer, space.clone());
        if st.incompatible.contains_key(&pair) {
            return None;
        }
        if let Some(running) = st.in_flight.get(&pair) {
            return Some(running.clone());
        }
        let track = Arc::new(PullTrack::new());
        st.in_flight.insert(pair, track.clone());
        track
    };
    let node = node.clone();
    let in_flight = in_flight.clone();
    let config = config.clone();
    let shared = track.clone();
    tokio::spawn(async move {
        let key = (peer, space.clone());
        let result = pull(&node, peer, &space, &in_flight, &config, &track).await;
        lock(&in_flight).in_flight.remove(&key);
        track.end.send_replace(Some(result.clone().map(|_| ())));
        match result {
            Ok(0) => {}
            Ok(n) => tracing::info!(%peer, %space, events = n, "pulled"),
            Err(PullError::NotHosted) => {
                tracing::debug!(%peer, %space, "peer does not host the space")
            }
            Err(PullError::Final(e)) => tracing::debug!(%peer, %space, "pull ended: {e}"),
            Err(PullError::Resumable(e)) => match resume {
                None => tracing::info!(%peer, %space, "pull interrupted: {e}"),
                Some(attempt) if attempt < MAX_PULL_RESUMES => {
                    tracing::info!(%peer, %space, "pull interrupted ({e}); resuming");
                    resume_elsewhere(&node, peer, space, &in_flight, &config, attempt).await;
                }
                Some(attempt) => {
                    tracing::warn!(%peer, %space, "pull gave up after {attempt} resumes: {e}")
                }
            },
        }
    });
    Some(shared)
}

/// Resumes an interrupted pull after a pause, preferably from another peer. Where it
/// stopped is simply what the store has now, so any peer will do.
async fn resume_elsewhere(
    node: &Node,
    peer: PeerId,
    space: SpaceName,
    in_flight: &InFlight,
    config: &SyncConfig,
    attempt: u32,
) {
    tokio::time::sleep(resume_delay(attempt)).await;
    let candidates: Vec<PeerId> = match node.inner.net.connected_peers().await {
        Ok(peers) => {
            let st = lock(in_flight);
            peers
                .into_iter()
                .filter(|p| !st.incompatible.contains_key(&(*p, space.clone())))
                .collect()
        }
        Err(_) => return,
    };
    let others: Vec<PeerId> = candidates.iter().copied().filter(|p| *p != peer).collect();
    let pool = if others.is_empty() {
        candidates
    } else {
        others
    };
    if pool.is_empty() {
        return;
    }
    let next = pool[rand::thread_rng().gen_range(0..pool.len())];
    start_pull(node, next, space, in_flight, config, Some(attempt + 1));
}

/// Why a pull ended early.
#[derive(Debug, Clone)]
pub(crate) enum PullError {
    /// The peer does not host the space: there is nothing to exchange.
    NotHosted,
    /// The peer refused, is incompatible, or sent a page that was rejected.
    Final(String),
    /// The page did not arrive (stall, timeout, connection lost): worth resuming.
    Resumable(String),
}

/// A spawned page request that is cancelled when the pull that wanted it ends.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Pulls page by page until the peer is done or a page brings nothing new. Returns
/// the number of events applied; `track` follows the counts as pages arrive.
///
/// Pipelined: while one page is being verified and committed, the request for the next
/// one is already on the wire, built from the version vector the current page will
/// leave behind (a page is causally complete relative to the request, so that vector
/// is exact). A page that does not arrive within `page_timeout` ends the pull as
/// stalled; the caller resumes from where the store stands, possibly from another peer.
async fn pull(
    node: &Node,
    peer: PeerId,
    space: &SpaceName,
    state: &InFlight,
    config: &SyncConfig,
    track: &PullTrack,
) -> Result<usize, PullError> {
    let Some(policy) = node.inner.policies.get(space) else {
        return Err(PullError::Final(format!(
            "space {space} is not hosted here"
        )));
    };
    let ours = policy.identity();
    let pair = (peer, space.clone());
    let request_for = |have: VersionVector| {
        let net = node.inner.net.clone();
        let request = PullRequest {
            space: space.clone(),
            have,
            max_events: config.page_events,
            max_bytes: config.page_bytes,
            policy: ours.clone(),
        };
        let timeout = config.page_timeout;
        async move {
            match tokio::time::timeout(timeout, net.pull(peer, request)).await {
                Ok(r) => r.map_err(|e| PullError::Resumable(e.to_string())),
                Err(_) => Err(PullError::Resumable(format!(
                    "stalled: no page within {timeout:?}"
                ))),
            }
        }
    };
    let mut have = node
        .inner
        .store
        .version_vector(space)
        .await
        .map_err(|e| PullError::Final(e.to_string()))?;
    let mut in_flight = AbortOnDrop(tokio::spawn(request_for(have.clone())));
    let mut applied = 0;
    // The stages overlap: the next page travels while this one is authenticated, and
    // pages are authenticated while earlier ones commit. Up to `QUEUED_PAGES` pages
    // wait for the writer, which takes every queued page into its next transaction
    // (each page still all or nothing): the commit, most of whose cost is the fsync and
    // the index leaves it rewrites, is shared by several pages.
    let mut committing: VecDeque<IngestTicket> = VecDeque::new();
    let mut result = async {
        for _ in 0..config.max_pages {
            let response = (&mut in_flight.0)
                .await
                .map_err(|e| PullError::Final(format!("pull task failed: {e}")))??;
            let (events, done, theirs) = match response {
                PullResponse::Events { events, done, have } => (events, done, have),
                PullResponse::Refused { reason } if reason == not_hosted(space) => {
                    return Err(PullError::NotHosted)
                }
                PullResponse::Refused { reason } => {
                    return Err(PullError::Final(format!("refused: {reason}")))
                }
                PullResponse::Incompatible { policy } => {
                    let msg = refuse_message(&peer, space, &policy, &ours);
                    tracing::error!("{msg}");
                    let mut st = lock(state);
                    st.compatible.remove(&pair);
                    st.incompatible.insert(pair, policy);
                    return Err(PullError::Final(msg));
                }
            };
            track.pages.fetch_add(1, Ordering::Relaxed);
            {
                let mut st = lock(state);
                st.incompatible.remove(&pair);
                st.compatible.insert(pair.clone());
                st.seen.insert(
                    pair.clone(),
                    PeerSync {
                        version_vector: theirs,
                        last_sync: std::time::SystemTime::now(),
                    },
                );
            }
            if events.is_empty() {
                return Ok(());
            }
            let mut next_have = have.clone();
            for e in &events {
                if e.seq > next_have.get(&e.origin) {
                    next_have.set(e.origin, e.seq);
                }
            }
            if !done {
                in_flight = AbortOnDrop(tokio::spawn(request_for(next_have.clone())));
            }
            let ticket = node
                .inner
                .store
                .submit_ingest(space, events)
                .await
                .map_err(|e| ingest_error(&peer, space, e))?;
            track.bytes.fetch_add(ticket.bytes(), Ordering::Relaxed);
            have = next_have;
            committing.push_back(ticket);
            if committing.len() > QUEUED_PAGES {
                let Some(oldest) = committing.pop_front() else {
                    break;
                };
                let n = settle(oldest, &peer, space, track).await?;
                applied += n;
                if n == 0 {
                    // A page that brought nothing new: the peer is not ahead after all.
                    return Ok(());
                }
            }
            if done {
                return Ok(());
            }
        }
        Ok(())
    }
    .await;
    for ticket in committing {
        match settle(ticket, &peer, space, track).await {
            Ok(n) => applied += n,
            Err(e) if result.is_ok() => result = Err(e),
            Err(_) => {}
        }
    }
    result.map(|()| applied)
}

/// Most pages of one pull authenticated and queued for the store's writer but not yet
/// committed. Twenty-four: while one commit runs, the pages that arrive meanwhile are
/// ready to share the next, and the more pages a commit holds the fewer index leaves it
/// rewrites per event. `weft-bench catchup`, 1M events, rounds interleaved on one
/// machine: 95–98k events/s with twelve, 110–120k with twenty-four, 107–122k with
/// forty-eight (earlier: 97.6k with three, 108–111k with six). Bounds a pull's memory
/// to about 20 MB of typical events.
const QUEUED_PAGES: usize = 24;

/// Waits for a queued page's commit and counts what it applied.
async fn settle(
    ticket: IngestTicket,
    peer: &PeerId,
    space: &SpaceName,
    track: &PullTrack,
) -> Result<usize, PullError> {
    let outcome = ticket
        .outcome()
        .await
        .map_err(|e| ingest_error(peer, space, e))?;
    let n = outcome.applied.len();
    track.applied.fetch_add(n as u64, Ordering::Relaxed);
    Ok(n)
}

fn ingest_error(peer: &PeerId, space: &SpaceName, e: StoreError) -> PullError {
    match e {
        StoreError::Rejected { id, reason } => {
            tracing::warn!(%peer, %space, event = %id, "rejected pulled page: {reason}");
            PullError::Final(format!("page rejected: {reason}"))
        }
        other => PullError::Final(other.to_string()),
    }
}
