use std::time::Duration;

use libp2p::Multiaddr;
use weft_crdt::limits::MAX_EVENT_BYTES;
use weft_crdt::{SigningKey, SpaceName};

use crate::error::NetError;

/// Default [`NetConfig::command_buffer`]: 256 commands. Commands are small and handled in
/// microseconds; 256 absorbs a burst of publishes from every space without making callers
/// wait, while keeping the queue short enough that a stuck loop shows up quickly.
pub const DEFAULT_COMMAND_BUFFER: usize = 256;

/// Default [`NetConfig::event_buffer`]: 1024 events. Gossip arrives in bursts (a peer
/// catching up republishes many batches); 1024 lets the node fall a second or so behind
/// before the loop stops reading from the network.
pub const DEFAULT_EVENT_BUFFER: usize = 1024;

/// Default [`NetConfig::idle_timeout`]: one hour. The swarm's own default is 10 s, and only
/// gossipsub's mesh keeps a connection busy, so quiet peers would be dropped and
/// re-discovered over and over; an hour keeps a LAN mesh stable while still reclaiming
/// connections nobody uses.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// Default [`NetConfig::max_gossip_bytes`]: 1 MiB. Large enough for several maximal events
/// (128 KiB each, `weft_crdt::limits::MAX_EVENT_BYTES`) per batch, small enough that a
/// gossip message never holds a connection for long, or decodes to much memory.
pub const DEFAULT_MAX_GOSSIP_BYTES: usize = 1024 * 1024;

/// Default [`NetConfig::max_request_bytes`]: 1 MiB. A pull request is mostly a version
/// vector: 1024 writers (`MAX_CLOCK_ENTRIES`) take about 45 KiB, so 1 MiB never refuses an
/// honest request and still caps what a peer can make us buffer.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Default [`NetConfig::max_response_bytes`]: 16 MiB. One page of catch-up: over a hundred
/// maximal events, thousands of typical ones, which keeps the per-page overhead small
/// while bounding the memory one response can take.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Default [`NetConfig::request_timeout`]: 30 s. A 16 MiB page over a slow link (a few
/// Mbit/s) plus the responder's store read fits; a dead peer is noticed within half a
/// minute.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Default [`NetConfig::target_peers`]: 8. Twice gossipsub's mesh degree
/// ([`crate::MESH_N`] = 4), so a full mesh can form with spare candidates for
/// `mesh_outbound_min` and for replacing pruned peers, and pull sync has several sources to
/// catch up from; small enough that a LAN of tens of nodes is not dialed into a full mesh by
/// discovery alone.
pub const DEFAULT_TARGET_PEERS: usize = 8;

/// Default [`NetConfig::max_established`]: 64 connections. Eight times
/// [`DEFAULT_TARGET_PEERS`]: peers we do not dial ourselves still reach us (new nodes
/// bootstrap through us, Kademlia queries connect to us and stay for the idle timeout), and
/// in a LAN of up to about sixty nodes everyone may be connected to everyone. It bounds file
/// descriptors and per-connection yamux and gossipsub buffers (a few hundred KiB each at
/// most) to tens of MiB.
pub const DEFAULT_MAX_ESTABLISHED: u32 = 64;

/// Default [`NetConfig::max_established_per_peer`]: 2. Two nodes that discover each other at
/// the same moment dial each other simultaneously; with a limit of 1 each side may keep its
/// own outbound connection and refuse the other's inbound one, closing both. Two lets that
/// race settle while still refusing a peer that opens connections in a loop.
pub const DEFAULT_MAX_ESTABLISHED_PER_PEER: u32 = 2;

/// Default [`NetConfig::max_pending`]: 32 handshakes in each direction. A TCP + noise +
/// yamux handshake on a LAN takes milliseconds, and discovery dials a handful of peers at a
/// time (Kademlia queries contact 3 in parallel, plus dials toward
/// [`DEFAULT_TARGET_PEERS`]); 32 never slows that down and caps what a burst of half-open
/// inbound connections can make us hold.
pub const DEFAULT_MAX_PENDING: u32 = 32;

/// Bytes of each gossip message reserved for gossipsub's own envelope (topic and protobuf
/// framing: a few dozen bytes, as messages are anonymous; see `behaviour::build`).
/// gossipsub checks only the payload against `max_transmit_size` when publishing, but the
/// receiver checks the whole frame, so batches are cut this much shorter than
/// [`NetConfig::max_gossip_bytes`].
pub const GOSSIP_ENVELOPE_RESERVE: usize = 4 * 1024;

/// Bytes of a gossip batch's budget kept for the batch's own framing (version, array
/// heads, the origin's id): its events, in canonical encoding, take at most the rest.
pub(crate) const BATCH_HEADER_BYTES: usize = 64;

/// How a node takes part in the network. Build one with [`NetConfig::new`] and adjust
/// fields as needed.
#[derive(Clone)]
pub struct NetConfig {
    /// The node's key; its public half is both the weft `NodeId` and the libp2p `PeerId`.
    pub signing_key: SigningKey,
    /// Addresses to listen on.
    pub listen: Vec<libp2p::Multiaddr>,
    /// Addresses dialed at start. A bootstrap address whose connection fails or closes is
    /// redialed with exponential backoff (1 s doubling to 60 s, ±25% jitter) for as long
    /// as the node runs. One reachable bootstrap address is enough to find the whole mesh:
    /// Kademlia learns the rest.
    pub bootstrap: Vec<Multiaddr>,
    /// Discover and dial peers on the local network with mDNS.
    pub mdns: bool,
    /// Spaces whose gossip topic (`weft/<space>/events/1`) this node subscribes to.
    pub spaces: Vec<SpaceName>,
    /// Capacity of the command channel from [`crate::NetClient`]s to the event loop.
    pub command_buffer: usize,
    /// Capacity of the [`crate::NetEvent`] channel to the node.
    pub event_buffer: usize,
    /// How long a connection with no protocol activity is kept open.
    pub idle_timeout: Duration,
    /// Largest gossip message (gossipsub `max_transmit_size`), and the most its events
    /// may take in their canonical encoding once decoded: a compact batch that would
    /// decode to more is rejected.
    pub max_gossip_bytes: usize,
    /// Largest `/weft/sync/1` request, in either direction.
    pub max_request_bytes: usize,
    /// Largest `/weft/sync/1` response, in either direction; also the most a page's
    /// events may take in their canonical encoding once decoded.
    pub max_response_bytes: usize,
    /// How long a pull may take before it fails; also how long the node has to answer an
    /// inbound pull.
    pub request_timeout: Duration,
    /// Discovery dials peers found by Kademlia until this many peers are connected; 0 turns
    /// discovery dialing off (Kademlia still answers queries). At most `max_established`.
    pub target_peers: usize,
    /// Most established connections, inbound and outbound together; more are refused.
    pub max_established: u32,
    /// Most established connections to one peer.
    pub max_established_per_peer: u32,
    /// Most connections in the handshake phase, counted separately for each direction.
    pub max_pending: u32,
}

impl std::fmt::Debug for NetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetConfig")
            .field("signing_key", &"<secret>")
            .field("listen", &self.listen)
            .field("bootstrap", &self.bootstrap)
            .field("mdns", &self.mdns)
            .field("spaces", &self.spaces)
            .field("command_buffer", &self.command_buffer)
            .field("event_buffer", &self.event_buffer)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_gossip_bytes", &self.max_gossip_bytes)
            .field("max_request_bytes", &self.max_request_bytes)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("request_timeout", &self.request_timeout)
            .field("target_peers", &self.target_peers)
            .field("max_established", &self.max_established)
            .field("max_established_per_peer", &self.max_established_per_peer)
            .field("max_pending", &self.max_pending)
            .finish()
    }
}

impl NetConfig {
    /// The defaults: listen on `/ip4/0.0.0.0/tcp/0`, no bootstrap, mDNS on, the `default`
    /// space, and the `DEFAULT_*` limits and targets of this module.
    pub fn new(signing_key: SigningKey) -> Self {
        NetConfig {
            signing_key,
            listen: vec![Multiaddr::from(std::net::Ipv4Addr::UNSPECIFIED)
                .with(libp2p::multiaddr::Protocol::Tcp(0))],
            bootstrap: Vec::new(),
            mdns: true,
            spaces: vec![SpaceName::default_space()],
            command_buffer: DEFAULT_COMMAND_BUFFER,
            event_buffer: DEFAULT_EVENT_BUFFER,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_gossip_bytes: DEFAULT_MAX_GOSSIP_BYTES,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            target_peers: DEFAULT_TARGET_PEERS,
            max_established: DEFAULT_MAX_ESTABLISHED,
            max_established_per_peer: DEFAULT_MAX_ESTABLISHED_PER_PEER,
            max_pending: DEFAULT_MAX_PENDING,
        }
    }

    /// The largest batch body ([`weft_crdt::compact`]) one gossip message carries.
    pub(crate) fn max_batch_bytes(&self) -> usize {
        self.max_gossip_bytes
            .saturating_sub(GOSSIP_ENVELOPE_RESERVE)
    }

    /// Refuses values that would panic (zero-capacity channels) or make a valid event
    /// impossible to send.
    pub(crate) fn validate(&self) -> Result<(), NetError> {
        let bad = |m: String| Err(NetError::Config(m));
        if self.command_buffer == 0 {
            return bad("command_buffer must be at least 1".into());
        }
        if self.event_buffer == 0 {
            return bad("event_buffer must be at least 1".into());
        }
        let min_gossip = MAX_EVENT_BYTES + BATCH_HEADER_BYTES + GOSSIP_ENVELOPE_RESERVE;
        if self.max_gossip_bytes < min_gossip {
            return bad(format!(
                "max_gossip_bytes is {}; it must be at least {min_gossip} so the largest event fits",
                self.max_gossip_bytes
            ));
        }
        let min_response = MAX_EVENT_BYTES + 1024;
        if self.max_response_bytes < min_response {
            return bad(format!(
                "max_response_bytes is {}; it must be at least {min_response} so the largest event fits",
                self.max_response_bytes
            ));
        }
        if self.max_request_bytes < 1024 {
            return bad(format!(
                "max_request_bytes is {}; it must be at least 1024",
                self.max_request_bytes
            ));
        }
        if self.request_timeout.is_zero() {
            return bad("request_timeout must be positive".into());
        }
        if self.max_established == 0 {
            return bad("max_established must be at least 1".into());
        }
        if self.max_established_per_peer == 0 {
            return bad("max_established_per_peer must be at least 1".into());
        }
        if self.max_pending == 0 {
            return bad("max_pending must be at least 1".into());
        }
        if u64::try_from(self.target_peers).unwrap_or(u64::MAX) > u64::from(self.max_established) {
            return bad(format!(
                "target_peers is {} but max_established is {}: discovery could never reach its target",
                self.target_peers, self.max_established
            ));
        }
        Ok(())
    }
}
