//! The network event loop: the one task that owns the libp2p [`Swarm`].
//!
//! Ownership: the loop owns the swarm and every piece of in-flight state — pulls waiting
//! for a response (by `OutboundRequestId`), dials waiting for a connection (by
//! `ConnectionId`), callers waiting for a listen address, inbound pulls waiting for
//! the node's answer (the libp2p `ResponseChannel` paired with the node's oneshot, in a
//! `FuturesUnordered`), the bootstrap redial schedule and the discovery dials in flight.
//! Nothing is shared: no locks, no `Arc<Mutex<Swarm>>`.
//!
//! Data flow:
//! - node -> network: [`NetClient`](crate::NetClient) methods send a [`Command`] with a
//!   oneshot for the answer over a bounded channel (`NetConfig::command_buffer`); the
//!   loop carries it out on the swarm and answers, at once or when the swarm reports the
//!   outcome. Gossip verdicts are the exception: they carry no oneshot, as there is
//!   nothing to answer.
//! - network -> node: swarm events become [`NetEvent`]s on a bounded channel
//!   (`NetConfig::event_buffer`). Gossip that does not decode as a compact batch
//!   within `NetConfig::max_gossip_bytes` of events, or arrives on an unknown topic, is
//!   rejected here and never reaches the node.
//! - inbound pulls: the loop emits `PullRequested` with a oneshot, keeps the libp2p
//!   response channel, and sends the node's answer when the oneshot resolves; a dropped
//!   oneshot (or one unanswered past the request timeout) drops the channel, which closes
//!   the requester's stream.
//!
//! Backpressure: the loop polls the swarm only while it holds a reserved slot in the
//! event channel (every swarm event yields at most one `NetEvent`). When the node falls
//! behind, the loop stops reading from the network — TCP and yamux flow control push
//! back on peers — but keeps serving commands, so a node that calls the client while
//! handling an event cannot deadlock against it. If the node drops the event receiver,
//! events are discarded (gossip is reported `Ignore`, pulls go unanswered).
//!
//! Discovery: identify tells us each weft peer's listen addresses; those of peers that speak
//! Kademlia go into its routing table, which Kademlia spreads to others in its queries.
//! Kademlia bootstraps by itself 500 ms after a new peer enters the table (so right after
//! the first connection), and the loop's discovery tick ([`DISCOVERY_INTERVAL`]) bootstraps
//! again and, while fewer than `NetConfig::target_peers` peers are connected, starts a
//! random walk (`get_closest_peers` of a random id) and dials disconnected routing-table
//! peers. Peers Kademlia reports (routing updates, query results) are dialed while below
//! the target; in-flight discovery dials (by `ConnectionId`) count toward it, so the loop
//! never has more than `target_peers` of them.
//!
//! Bootstrap redial: [`BootstrapPeers`] (sans-I/O, in `redial`) tracks every configured
//! bootstrap address. A failed dial or a lost peer puts the address in a backoff wait
//! (1 s doubling to 60 s, ±25% jitter); the loop sleeps until the earliest deadline, so
//! redials are bounded in time and never spin.
//!
//! Limits: the `connection_limits` behaviour refuses connections beyond
//! `NetConfig::max_established` (total and per peer) and `max_pending`; each refusal is
//! logged with the limit that was hit (inbound at `warn`, our own dials at `info`).
//!
//! Traffic: the loop counts gossip messages and pulls, both ways, into the counters the
//! transport counts bytes into (see `traffic`).
//!
//! Shutdown: when every `NetClient` is dropped the command channel closes, the loop
//! returns, and the swarm with all its connections is dropped.

use rand::Rng;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use libp2p::connection_limits::Exceeded;
use libp2p::gossipsub::{self, MessageAcceptance, MessageId, TopicHash};
use libp2p::request_response::{self, OutboundFailure, OutboundRequestId, ResponseChannel};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionDenied, ConnectionId, DialError, ListenError, SwarmEvent};
use libp2p::{identify, kad, mdns, ping, Multiaddr, PeerId, Swarm};
use tokio::sync::mpsc::{self, OwnedPermit};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, info, trace, warn};
use weft_crdt::compact::decode_batch;
use weft_crdt::SpaceName;

use crate::behaviour::{space_topic, WeftBehaviour, WeftBehaviourEvent, KAD_PROTOCOL};
use crate::client::{Command, GossipMessage};
use crate::config::NetConfig;
use crate::error::NetError;
use crate::event::NetEvent;
use crate::redial::BootstrapPeers;
use crate::traffic::{add, Counters};
use crate::wire::{PullRequest, PullResponse};

/// How often the loop re-runs discovery: 30 s. A Kademlia bootstrap over a LAN mesh is a
/// few small messages per peer, so this is cheap, and a node that fell below
/// `NetConfig::target_peers` (peers left, a partition healed) finds new ones within half a
/// minute. Kademlia's own default (5 min) is tuned for the public DHT, where queries cost
/// far more.
pub const DISCOVERY_INTERVAL: Duration = Duration::from_secs(30);

/// An inbound pull waiting for the node: resolves to the libp2p channel, the requester,
/// and the node's answer (`None` if the node dropped the oneshot or ran out of time).
type PendingReply =
    BoxFuture<'static, (ResponseChannel<PullResponse>, PeerId, Option<PullResponse>)>;

type PullReply = oneshot::Sender<Result<PullResponse, NetError>>;
type DialReply = oneshot::Sender<Result<(), NetError>>;

pub(crate) struct EventLoop {
    swarm: Swarm<WeftBehaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetEvent>,
    /// A reserved slot in `events`; the swarm is polled only while this is `Some`.
    permit: Option<OwnedPermit<NetEvent>>,
    /// The node dropped its receiver.
    events_closed: bool,
    topics: HashMap<TopicHash, SpaceName>,
    pending_pulls: HashMap<OutboundRequestId, (PeerId, PullReply)>,
    pending_dials: HashMap<ConnectionId, (Multiaddr, DialReply)>,
    listen_waiters: Vec<oneshot::Sender<Vec<Multiaddr>>>,
    /// Bounded by libp2p: each connection accepts a limited number of concurrent inbound
    /// streams, and each entry expires after `request_timeout`.
    pending_replies: FuturesUnordered<PendingReply>,
    request_timeout: Duration,
    /// When each bootstrap address is (re)dialed.
    bootstrap: BootstrapPeers,
    /// Dials toward `target_peers` still in flight; at most `target_peers` entries.
    discovery_dials: HashSet<ConnectionId>,
    target_peers: usize,
    next_discovery: Instant,
    /// Peers mDNS has shown us on the LAN, redialed until connected (see
    /// [`LanPeer`]).
    lan_peers: HashMap<PeerId, LanPeer>,
    /// The most a gossip message may decode to, in canonical event bytes.
    max_gossip_bytes: usize,
    /// Traffic counters, shared with the transport and every `NetClient`.
    counters: Arc<Counters>,
}

/// A peer found by mDNS and when to dial it next.
///
/// Two nodes that discover each other in the same instant dial each other at once; with
/// port reuse that can become a TCP simultaneous open in which both sides act as dialer
/// and the handshake fails on both. So mDNS dials use a fresh port, and a peer that is
/// still not connected is redialed after a jittered, doubling delay (0.5 s to 30 s), so
/// one failed race never leaves two LAN nodes apart for good.
struct LanPeer {
    addrs: Vec<Multiaddr>,
    next_dial: Instant,
    attempts: u32,
}

/// First redial delay for a LAN peer.
const LAN_REDIAL_MIN: Duration = Duration::from_millis(500);
/// Longest redial delay for a LAN peer: mDNS re-announces far less often, so a peer
/// that stays unreachable this long is retried at this pace until its record expires.
const LAN_REDIAL_MAX: Duration = Duration::from_secs(30);

fn lan_redial_delay(attempts: u32) -> Duration {
    let base = LAN_REDIAL_MIN
        .saturating_mul(1u32 << attempts.min(6))
        .min(LAN_REDIAL_MAX);
    let jitter = rand::thread_rng().gen_range(0..=base.as_millis() as u64 / 2);
    base + Duration::from_millis(jitter)
}

impl EventLoop {
    pub(crate) fn new(
        swarm: Swarm<WeftBehaviour>,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<NetEvent>,
        bootstrap: BootstrapPeers,
        config: &NetConfig,
        counters: Arc<Counters>,
    ) -> Self {
        let topics = config
            .spaces
            .iter()
            .map(|s| (space_topic(s).hash(), s.clone()))
            .collect();
        EventLoop {
            swarm,
            commands,
            events,
            permit: None,
            events_closed: false,
            topics,
            pending_pulls: HashMap::new(),
            pending_dials: HashMap::new(),
            listen_waiters: Vec::new(),
            pending_replies: FuturesUnordered::new(),
            request_timeout: config.request_timeout,
            bootstrap,
            discovery_dials: HashSet::new(),
            target_peers: config.target_peers,
            next_discovery: Instant::now() + DISCOVERY_INTERVAL,
            lan_peers: HashMap::new(),
            max_gossip_bytes: config.max_gossip_bytes,
            counters,
        }
    }

    /// Runs until every `NetClient` is dropped.
    pub(crate) async fn run(mut self) {
        info!(peer = %self.swarm.local_peer_id(), "network event loop started");
        loop {
            let can_emit = self.permit.is_some() || self.events_closed;
            let wake_at = self
                .bootstrap
                .next_deadline()
                .map_or(self.next_discovery, |d| d.min(self.next_discovery));
            let wake_at = self
                .lan_peers
                .iter()
                .filter(|(p, _)| !self.swarm.is_connected(p))
                .map(|(_, l)| l.next_dial)
                .fold(wake_at, Instant::min);
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(command) => self.handle_command(command),
                    None => break,
                },
                Some((channel, peer, answer)) = self.pending_replies.next(),
                    if !self.pending_replies.is_empty() =>
                {
                    self.send_reply(channel, peer, answer)
                }
                permit = self.events.clone().reserve_owned(), if !can_emit => match permit {
                    Ok(permit) => self.permit = Some(permit),
                    Err(_) => {
                        debug!("the node dropped its event receiver; network events are discarded");
                        self.events_closed = true;
                    }
                },
                event = self.swarm.select_next_some(), if can_emit => self.handle_swarm_event(event),
                () = tokio::time::sleep_until(wake_at) => self.on_timer(),
            }
        }
        info!(peer = %self.swarm.local_peer_id(), "all network clients dropped; event loop stopped");
    }

    /// Sends `event` using the reserved slot. The swarm is polled only with a slot in hand
    /// and each swarm event yields at most one `NetEvent`, so the slot is there unless the
    /// receiver is gone.
    fn emit(&mut self, event: NetEvent) {
        match self.permit.take() {
            Some(permit) => {
                permit.send(event);
            }
            None => trace!(?event, "event discarded: no receiver"),
        }
    }

    fn handle_command(&mut self, command: Command) {
        match command {
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::WaitListening { reply } => {
                let addrs: Vec<Multiaddr> = self.swarm.listeners().cloned().collect();
                if addrs.is_empty() {
                    self.listen_waiters.retain(|w| !w.is_closed());
                    self.listen_waiters.push(reply);
                } else {
                    let _ = reply.send(addrs);
                }
            }
            Command::ConnectedPeers { reply } => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::Dial { addr, reply } => {
                let opts = DialOpts::unknown_peer_id().address(addr.clone()).build();
                let id = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.pending_dials.insert(id, (addr, reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NetError::Dial {
                            addr,
                            reason: e.to_string(),
                        }));
                    }
                }
            }
            Command::Publish {
                space,
                messages,
                reply,
            } => {
                let _ = reply.send(self.publish(space, messages));
            }
            Command::Pull {
                peer,
                request,
                reply,
            } => self.pull(peer, request, reply),
            Command::ReportValidation {
                message_id,
                source,
                verdict,
            } => self.report(&message_id, &source, verdict.into()),
        }
    }

    fn publish(&mut self, space: SpaceName, messages: Vec<GossipMessage>) -> Result<(), NetError> {
        let topic = space_topic(&space).hash();
        if !self.topics.contains_key(&topic) {
            return Err(NetError::UnknownSpace(space));
        }
        for GossipMessage { data, events } in messages {
            let len = data.len();
            match self
                .swarm
                .behaviour_mut()
                .gossipsub
                .publish(topic.clone(), data)
            {
                Ok(id) => {
                    add(&self.counters.gossip_messages_sent, 1);
                    add(&self.counters.gossip_events_sent, events);
                    trace!(%space, message_id = %id, len, events, "gossip published")
                }
                // Pull sync delivers what gossip does not; none of these is the caller's problem.
                Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {
                    debug!(%space, "gossip not sent: no peer subscribed yet")
                }
                Err(gossipsub::PublishError::Duplicate) => {
                    debug!(%space, "gossip not sent: identical message already published")
                }
                Err(gossipsub::PublishError::AllQueuesFull(peers)) => {
                    warn!(%space, peers, "gossip not sent: every peer's send queue is full")
                }
                Err(e) => return Err(NetError::Publish(format!("space {space}: {e}"))),
            }
        }
        Ok(())
    }

    fn pull(&mut self, peer: PeerId, request: PullRequest, reply: PullReply) {
        add(&self.counters.pulls_sent, 1);
        let id = self.swarm.behaviour_mut().sync.send_request(&peer, request);
        self.pending_pulls.insert(id, (peer, reply));
    }

    fn report(&mut self, id: &MessageId, source: &PeerId, acceptance: MessageAcceptance) {
        let known = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(id, source, acceptance);
        if !known {
            debug!(message_id = %id, %source, "validation reported for a message no longer cached");
        }
    }

    fn send_reply(
        &mut self,
        channel: ResponseChannel<PullResponse>,
        peer: PeerId,
        answer: Option<PullResponse>,
    ) {
        match answer {
            Some(response) => {
                add(&self.counters.pulls_served, 1);
                if let PullResponse::Events { events, .. } = &response {
                    add(&self.counters.events_served, events.len());
                }
                if self
                    .swarm
                    .behaviour_mut()
                    .sync
                    .send_response(channel, response)
                    .is_err()
                {
                    debug!(%peer, "pull answer not sent: the request already timed out or its connection closed");
                }
            }
            None => debug!(%peer, "pull not answered by the node; closing the stream"),
        }
    }

    fn handle_swarm_event(&mut self, event: SwarmEvent<WeftBehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                let addrs: Vec<Multiaddr> = self.swarm.listeners().cloned().collect();
                for waiter in self.listen_waiters.drain(..) {
                    let _ = waiter.send(addrs.clone());
                }
                self.emit(NetEvent::Listening { addr: address });
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                debug!(%address, "listen address expired")
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                num_established,
                endpoint,
                ..
            } => {
                debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connection established");
                if let Some((_, reply)) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Ok(()));
                }
                self.discovery_dials.remove(&connection_id);
                if let Some(l) = self.lan_peers.get_mut(&peer_id) {
                    l.attempts = 0;
                }
                self.bootstrap
                    .on_established(connection_id, peer_id, Instant::now());
                if num_established.get() == 1 {
                    self.emit(NetEvent::PeerConnected { peer: peer_id });
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } => {
                debug!(peer = %peer_id, ?cause, "connection closed");
                if num_established == 0 {
                    let lost = self.bootstrap.on_disconnected(
                        peer_id,
                        Instant::now(),
                        &mut rand::thread_rng(),
                    );
                    for (addr, delay) in lost {
                        info!(peer = %peer_id, %addr, ?delay, "bootstrap peer lost; redialing after the delay");
                    }
                    self.emit(NetEvent::PeerDisconnected { peer: peer_id });
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                match &error {
                    DialError::Denied { cause } if limit_exceeded(cause).is_some() => {
                        info!(peer = ?peer_id, %error, "not connecting: our connection limit is reached")
                    }
                    _ => debug!(peer = ?peer_id, %error, "outgoing connection failed"),
                }
                self.discovery_dials.remove(&connection_id);
                if let Some((addr, delay)) = self.bootstrap.on_dial_failed(
                    connection_id,
                    Instant::now(),
                    &mut rand::thread_rng(),
                ) {
                    info!(%addr, %error, ?delay, "bootstrap dial failed; retrying after the delay");
                }
                if let Some((addr, reply)) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Err(NetError::Dial {
                        addr,
                        reason: error.to_string(),
                    }));
                }
            }
            SwarmEvent::IncomingConnectionError {
                error,
                send_back_addr,
                peer_id,
                ..
            } => match &error {
                ListenError::Denied { cause } => match limit_exceeded(cause) {
                    Some(exceeded) => warn!(
                        from = %send_back_addr,
                        peer = ?peer_id,
                        "inbound connection refused: {exceeded}"
                    ),
                    None => debug!(from = %send_back_addr, %error, "inbound connection refused"),
                },
                _ => debug!(from = %send_back_addr, %error, "incoming connection failed"),
            },
            SwarmEvent::Behaviour(WeftBehaviourEvent::Gossipsub(e)) => self.handle_gossip(e),
            SwarmEvent::Behaviour(WeftBehaviourEvent::Sync(e)) => self.handle_sync(e),
            SwarmEvent::Behaviour(WeftBehaviourEvent::Mdns(e)) => self.handle_mdns(e),
            SwarmEvent::Behaviour(WeftBehaviourEvent::Identify(e)) => self.handle_identify(e),
            SwarmEvent::Behaviour(WeftBehaviourEvent::Kad(e)) => self.handle_kad(e),
            SwarmEvent::Behaviour(WeftBehaviourEvent::Ping(e)) => match e.result {
                // A peer that does not speak ping is not a dead one.
                Ok(_) | Err(ping::Failure::Unsupported) => {}
                Err(failure) => {
                    debug!(peer = %e.peer, %failure, "ping failed; closing the connection");
                    self.swarm.close_connection(e.connection);
                }
            },
            SwarmEvent::Behaviour(WeftBehaviourEvent::Limits(never)) => match never {},
            other => trace!(?other, "swarm event"),
        }
    }

    fn handle_gossip(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                let Some(space) = self.topics.get(&message.topic).cloned() else {
                    warn!(peer = %propagation_source, topic = %message.topic, "gossip on an unknown topic rejected");
                    self.report(&message_id, &propagation_source, MessageAcceptance::Reject);
                    return;
                };
                let events = match decode_batch(&message.data, self.max_gossip_bytes) {
                    Ok(events) if events.is_empty() => {
                        warn!(peer = %propagation_source, %space, "empty gossip batch rejected");
                        self.report(&message_id, &propagation_source, MessageAcceptance::Reject);
                        return;
                    }
                    Ok(events) => events,
                    Err(e) => {
                        warn!(peer = %propagation_source, %space, error = %e, "invalid gossip rejected");
                        self.report(&message_id, &propagation_source, MessageAcceptance::Reject);
                        return;
                    }
                };
                add(&self.counters.gossip_messages_received, 1);
                add(&self.counters.gossip_events_received, events.len());
                if self.events_closed {
                    self.report(&message_id, &propagation_source, MessageAcceptance::Ignore);
                    return;
                }
                self.emit(NetEvent::Gossip {
                    source: propagation_source,
                    message_id,
                    space,
                    events,
                });
            }
            gossipsub::Event::Subscribed { peer_id, topic } => {
                if let Some(space) = self.topics.get(&topic).cloned() {
                    debug!(peer = %peer_id, %space, "peer subscribed");
                    self.emit(NetEvent::PeerSubscribed {
                        peer: peer_id,
                        space,
                    });
                }
            }
            gossipsub::Event::Unsubscribed { peer_id, topic } => {
                debug!(peer = %peer_id, %topic, "peer unsubscribed")
            }
            gossipsub::Event::GossipsubNotSupported { peer_id } => {
                debug!(peer = %peer_id, "peer does not speak gossipsub")
            }
            gossipsub::Event::SlowPeer {
                peer_id,
                failed_messages,
            } => warn!(peer = %peer_id, ?failed_messages, "peer is too slow to take gossip"),
        }
    }

    fn handle_sync(&mut self, event: request_response::Event<PullRequest, PullResponse>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    if self.events_closed {
                        debug!(%peer, "pull dropped: the node is not reading events");
                        return;
                    }
                    let (tx, rx) = oneshot::channel();
                    let timeout = self.request_timeout;
                    self.pending_replies.push(
                        async move {
                            let answer = tokio::time::timeout(timeout, rx)
                                .await
                                .ok()
                                .and_then(Result::ok);
                            (channel, peer, answer)
                        }
                        .boxed(),
                    );
                    self.emit(NetEvent::PullRequested {
                        peer,
                        request,
                        reply: tx,
                    });
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let PullResponse::Events { events, .. } = &response {
                        add(&self.counters.pages_received, 1);
                        add(&self.counters.events_pulled, events.len());
                    }
                    if let Some((_, reply)) = self.pending_pulls.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                debug!(%peer, %error, "pull failed");
                if let Some((_, reply)) = self.pending_pulls.remove(&request_id) {
                    let _ = reply.send(Err(self.pull_error(peer, error)));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => match error {
                request_response::InboundFailure::Io(e) => {
                    warn!(%peer, error = %e, "bad inbound pull request")
                }
                other => debug!(%peer, error = %other, "inbound pull failed"),
            },
            request_response::Event::ResponseSent { peer, .. } => {
                trace!(%peer, "pull answered")
            }
        }
    }

    fn pull_error(&self, peer: PeerId, error: OutboundFailure) -> NetError {
        let reason = match error {
            OutboundFailure::Timeout => {
                return NetError::PullTimeout {
                    peer,
                    after: self.request_timeout,
                }
            }
            OutboundFailure::DialFailure => "could not connect to the peer".to_owned(),
            OutboundFailure::ConnectionClosed => {
                "the connection closed before a response arrived".to_owned()
            }
            OutboundFailure::UnsupportedProtocols => {
                "the peer does not speak /weft/sync/1".to_owned()
            }
            OutboundFailure::Io(e) => e.to_string(),
        };
        NetError::PullFailed { peer, reason }
    }

    fn handle_mdns(&mut self, event: mdns::Event) {
        match event {
            mdns::Event::Discovered(found) => {
                let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                for (peer, addr) in found {
                    by_peer.entry(peer).or_default().push(addr);
                }
                for (peer, addrs) in by_peer {
                    for addr in &addrs {
                        self.swarm.add_peer_address(peer, addr.clone());
                    }
                    let entry = self.lan_peers.entry(peer).or_insert_with(|| LanPeer {
                        addrs: Vec::new(),
                        next_dial: Instant::now(),
                        attempts: 0,
                    });
                    for addr in addrs {
                        if !entry.addrs.contains(&addr) {
                            entry.addrs.push(addr);
                        }
                    }
                    if !self.swarm.is_connected(&peer) {
                        debug!(%peer, "mDNS discovered a peer; dialing");
                        self.dial_lan_peer(peer);
                    }
                }
            }
            mdns::Event::Expired(gone) => {
                for (peer, addr) in gone {
                    trace!(%peer, %addr, "mDNS record expired");
                    if let Some(l) = self.lan_peers.get_mut(&peer) {
                        l.addrs.retain(|a| *a != addr);
                        if l.addrs.is_empty() {
                            self.lan_peers.remove(&peer);
                        }
                    }
                }
            }
        }
    }

    fn handle_identify(&mut self, event: identify::Event) {
        if let identify::Event::Received { peer_id, info, .. } = event {
            trace!(peer = %peer_id, agent = %info.agent_version, "identified");
            if info.protocol_version != crate::behaviour::IDENTIFY_PROTOCOL {
                debug!(peer = %peer_id, version = %info.protocol_version, "peer is not a weft node");
                return;
            }
            let speaks_kad = info.protocols.contains(&KAD_PROTOCOL);
            for addr in info.listen_addrs {
                if speaks_kad {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, addr.clone());
                }
                self.swarm.add_peer_address(peer_id, addr);
            }
        }
    }

    /// Dials an mDNS peer on a fresh port and schedules the next attempt in case this
    /// one fails.
    fn dial_lan_peer(&mut self, peer: PeerId) {
        let Some(l) = self.lan_peers.get_mut(&peer) else {
            return;
        };
        l.next_dial = Instant::now() + lan_redial_delay(l.attempts);
        l.attempts = l.attempts.saturating_add(1);
        let opts = DialOpts::peer_id(peer)
            .addresses(l.addrs.clone())
            .allocate_new_port()
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            debug!(%peer, error = %e, "dialing an mDNS peer failed");
        }
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        let due: Vec<PeerId> = self
            .lan_peers
            .iter()
            .filter(|(p, l)| l.next_dial <= now && !self.swarm.is_connected(p))
            .map(|(p, _)| *p)
            .collect();
        for peer in due {
            debug!(%peer, "redialing a LAN peer");
            self.dial_lan_peer(peer);
        }
        if now >= self.next_discovery {
            self.next_discovery = now + DISCOVERY_INTERVAL;
            self.discover();
        }
        for due in self.bootstrap.due(now) {
            if let Some(peer) = due.peer.filter(|p| self.swarm.is_connected(p)) {
                trace!(%peer, addr = %due.addr, "bootstrap peer already connected");
                self.bootstrap.on_already_connected(due.index, now);
                continue;
            }
            let opts = DialOpts::unknown_peer_id()
                .address(due.addr.clone())
                .build();
            let connection = opts.connection_id();
            match self.swarm.dial(opts) {
                Ok(()) => {
                    debug!(addr = %due.addr, "redialing a bootstrap address");
                    self.bootstrap.on_dialing(due.index, connection);
                }
                Err(e) => {
                    let delay =
                        self.bootstrap
                            .on_dial_not_started(due.index, now, &mut rand::thread_rng());
                    info!(addr = %due.addr, error = %e, ?delay, "bootstrap redial failed to start; retrying after the delay");
                }
            }
        }
    }

    /// The discovery tick: refresh the routing table, and look for more peers while below
    /// the target.
    fn discover(&mut self) {
        let kad = &mut self.swarm.behaviour_mut().kad;
        if kad.bootstrap().is_err() {
            trace!("Kademlia bootstrap skipped: no peer in the routing table yet");
            return;
        }
        let connected = self.swarm.connected_peers().count();
        if connected >= self.target_peers {
            return;
        }
        debug!(
            connected,
            target = self.target_peers,
            "below the peer target: random walk"
        );
        self.swarm
            .behaviour_mut()
            .kad
            .get_closest_peers(PeerId::random());
        let known: Vec<(PeerId, Vec<Multiaddr>)> = self
            .swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .flat_map(|bucket| {
                bucket
                    .iter()
                    .map(|e| {
                        (
                            *e.node.key.preimage(),
                            e.node.value.iter().cloned().collect(),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        for (peer, addrs) in known {
            self.dial_discovered(peer, addrs);
        }
    }

    /// Dials a peer Kademlia told us about, unless it is connected, already being dialed,
    /// or the node has reached `target_peers` (counting dials in flight).
    fn dial_discovered(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if peer == *self.swarm.local_peer_id() || self.swarm.is_connected(&peer) {
            return;
        }
        let have = self.swarm.connected_peers().count() + self.discovery_dials.len();
        if have >= self.target_peers {
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        let connection = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                debug!(%peer, "dialing a peer found by Kademlia");
                self.discovery_dials.insert(connection);
            }
            Err(DialError::DialPeerConditionFalse(_)) => {}
            Err(e) => debug!(%peer, error = %e, "dialing a peer found by Kademlia failed"),
        }
    }

    fn handle_kad(&mut self, event: kad::Event) {
        match event {
            kad::Event::RoutingUpdated {
                peer,
                addresses,
                is_new_peer,
                ..
            } => {
                if is_new_peer {
                    debug!(%peer, "Kademlia routing table gained a peer");
                }
                self.dial_discovered(peer, addresses.into_vec());
            }
            kad::Event::OutboundQueryProgressed { result, .. } => match result {
                kad::QueryResult::GetClosestPeers(Ok(kad::GetClosestPeersOk { peers, .. }))
                | kad::QueryResult::GetClosestPeers(Err(kad::GetClosestPeersError::Timeout {
                    peers,
                    ..
                })) => {
                    trace!(found = peers.len(), "random walk finished");
                    for p in peers {
                        self.dial_discovered(p.peer_id, p.addrs);
                    }
                }
                kad::QueryResult::Bootstrap(Ok(step)) => {
                    trace!(
                        remaining = step.num_remaining,
                        "Kademlia bootstrap step done"
                    )
                }
                kad::QueryResult::Bootstrap(Err(e)) => {
                    debug!(error = %e, "Kademlia bootstrap step failed")
                }
                other => trace!(?other, "Kademlia query progressed"),
            },
            // Record and provider writes are filtered and never stored: weft uses Kademlia
            // for peer routing only.
            other => trace!(?other, "Kademlia event"),
        }
    }
}

/// The connection-limits error behind a refusal, if the limits caused it.
fn limit_exceeded(cause: &ConnectionDenied) -> Option<&Exceeded> {
    cause.downcast_ref::<Exceeded>()
}
