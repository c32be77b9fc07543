//! The composed libp2p behaviour of a weft node and the parameters of each part.

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{connection_limits, gossipsub, identify, kad, mdns, ping, request_response};
use libp2p::{PeerId, StreamProtocol};
use weft_crdt::SpaceName;

use crate::codec::{SyncCodec, SYNC_PROTOCOL};
use crate::config::NetConfig;
use crate::error::NetError;

/// The identify protocol version weft peers announce.
pub const IDENTIFY_PROTOCOL: &str = "/weft/id/1.0.0";

/// The Kademlia protocol weft peers speak. A weft-specific name keeps weft's routing
/// tables apart from the public IPFS DHT (`/ipfs/kad/1.0.0`) should a node ever meet it.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/weft/kad/1.0.0");

/// Mesh degree gossipsub aims for. 4 (libp2p default 6): weft meshes are LANs of a few
/// nodes, and pull sync repairs whatever gossip misses, so a smaller mesh costs nothing
/// in delivery and saves duplicate traffic. In a 2- or 3-node mesh every peer is in it.
pub const MESH_N: usize = 4;
/// Below this many mesh peers a heartbeat grafts more. 1 (default 5): a two-node mesh
/// (one peer) counts as healthy, instead of staying "mesh low" forever; any mesh peer at
/// all is enough because pull sync covers gaps.
pub const MESH_N_LOW: usize = 1;
/// Above this many mesh peers a heartbeat prunes. 8: twice [`MESH_N`], the usual ratio.
pub const MESH_N_HIGH: usize = 8;
/// Outbound peers each mesh keeps, against eclipse by inbound connections. 1 (default 2):
/// must be at most [`MESH_N_LOW`] and at most half of [`MESH_N`].
pub const MESH_OUTBOUND_MIN: usize = 1;
/// gossipsub heartbeat. 500 ms (default 1 s): meshes form and repair quickly in small
/// networks; the heartbeat's cost is negligible at a few peers.
pub const HEARTBEAT: Duration = Duration::from_millis(500);

// gossipsub's builder checks these only for per-topic overrides; check them here.
const _: () = assert!(
    MESH_OUTBOUND_MIN <= MESH_N_LOW
        && MESH_N_LOW <= MESH_N
        && MESH_N <= MESH_N_HIGH
        && 2 * MESH_OUTBOUND_MIN <= MESH_N
);

/// Connection limits, gossipsub, `/weft/sync/1`, mDNS (optional), identify, Kademlia and
/// ping.
///
/// `limits` comes first: the derived behaviour asks each part in field order whether to
/// accept a connection, so a connection over the limits is refused before any other
/// part builds a handler for it.
#[derive(NetworkBehaviour)]
pub(crate) struct WeftBehaviour {
    pub(crate) limits: connection_limits::Behaviour,
    pub(crate) gossipsub: gossipsub::Behaviour,
    pub(crate) sync: request_response::Behaviour<SyncCodec>,
    pub(crate) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(crate) identify: identify::Behaviour,
    pub(crate) kad: kad::Behaviour<kad::store::MemoryStore>,
    pub(crate) ping: ping::Behaviour,
}

/// The gossip topic of a space.
pub fn space_topic(space: &SpaceName) -> gossipsub::IdentTopic {
    gossipsub::IdentTopic::new(format!("weft/{space}/events/1"))
}

/// Length of a message id: 16 bytes of blake3. Ids travel in every IHAVE, IWANT and
/// IDONTWANT, so shorter is cheaper; 128 bits keep accidental collisions out of reach,
/// and a deliberate one (2^64 work for a pair the attacker authored both halves of)
/// could only make the second of two messages look like a duplicate, which pull sync
/// repairs.
pub const MESSAGE_ID_BYTES: usize = 16;

/// How often each connection is pinged, and how long a ping may take before the
/// connection counts as dead and is closed (see the event loop). TCP alone keeps a
/// connection to a host cut off by a partition open for many minutes, listed as a peer
/// and chosen for pulls; with these a silent peer is dropped within ~15 s, while a
/// live one on a loaded machine answers a 32-byte ping well inside 10 s.
pub(crate) const PING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
/// See [`PING_INTERVAL`].
pub(crate) const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Messages at least this large make their receivers send IDONTWANT to mesh peers.
const IDONTWANT_THRESHOLD: usize = 128;

/// A message's id: blake3 of its topic and data. Content-addressed, so the same batch
/// published twice (or by two nodes) is one message and a re-publish is a free no-op;
/// and it is what lets messages be anonymous (see [`build`]).
fn message_id(message: &gossipsub::Message) -> gossipsub::MessageId {
    let mut hasher = blake3::Hasher::new();
    hasher.update(message.topic.as_str().as_bytes());
    hasher.update(&[0]);
    hasher.update(&message.data);
    gossipsub::MessageId::from(hasher.finalize().as_bytes()[..MESSAGE_ID_BYTES].to_vec())
}

fn gossipsub_config(config: &NetConfig) -> Result<gossipsub::Config, NetError> {
    gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Anonymous)
        .validate_messages()
        .message_id_fn(message_id)
        .mesh_n(MESH_N)
        .mesh_n_low(MESH_N_LOW)
        .mesh_n_high(MESH_N_HIGH)
        .mesh_outbound_min(MESH_OUTBOUND_MIN)
        .heartbeat_interval(HEARTBEAT)
        .heartbeat_initial_delay(HEARTBEAT)
        .max_transmit_size(config.max_gossip_bytes)
        // gossipsub's default (1,000 B) skips IDONTWANT for our typical one-event
        // message (~400 B), so in a full mesh every receiver also gets the forwarded
        // copies: 1.6 copies per write measured with five nodes, each decoded and
        // checked. A 16-byte id is cheaper than a second copy of anything this size.
        .idontwant_message_size_threshold(IDONTWANT_THRESHOLD)
        .build()
        .map_err(|e| NetError::Setup(format!("gossipsub configuration: {e}")))
}

/// Kademlia, used for peer routing only: weft stores nothing in the DHT.
///
/// - Server mode is forced: Kademlia otherwise stays a client (it neither answers queries
///   nor enters other peers' routing tables) until an external address is confirmed, which
///   never happens on a LAN or on loopback.
/// - Inbound record and provider writes are filtered (`FilterBoth`) and the loop ignores
///   them, so a peer cannot make us store anything.
/// - Kademlia's own periodic bootstrap is off: the event loop's discovery tick runs it
///   (see `event_loop`). Its automatic bootstrap, 500 ms after a new peer enters the
///   routing table, stays on: that is the bootstrap after the first connection.
fn kademlia(peer_id: PeerId) -> kad::Behaviour<kad::store::MemoryStore> {
    let mut config = kad::Config::new(KAD_PROTOCOL);
    config
        .set_record_filtering(kad::StoreInserts::FilterBoth)
        .set_periodic_bootstrap_interval(None);
    let mut kad =
        kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), config);
    kad.set_mode(Some(kad::Mode::Server));
    kad
}

fn connection_limits(config: &NetConfig) -> connection_limits::Behaviour {
    connection_limits::Behaviour::new(
        connection_limits::ConnectionLimits::default()
            .with_max_established(Some(config.max_established))
            .with_max_established_per_peer(Some(config.max_established_per_peer))
            .with_max_pending_incoming(Some(config.max_pending))
            .with_max_pending_outgoing(Some(config.max_pending)),
    )
}

/// Builds the behaviour.
///
/// gossipsub runs anonymous (`MessageAuthenticity::Anonymous`, and
/// `ValidationMode::Anonymous`, which refuses messages that carry an author, a sequence
/// number or a signature). A gossipsub signature would vouch only for the peer that
/// published a batch, which weft never relies on: every event in it is signed by its
/// origin (or vouched for by a later signed event of its origin through the hash chain)
/// and checked by the node before the message is accepted, the message id is derived
/// from the content rather than from author and sequence number, and the node judges
/// and pulls from the peer that delivered a message (gossipsub's propagation source),
/// not its author. Dropping the envelope saves 116 bytes per message: the author's peer
/// id (40 with its protobuf tag), the sequence number (10) and the signature (66); the
/// ed25519 key itself is never sent, being inlined in the peer id.
pub(crate) fn build(keypair: &Keypair, config: &NetConfig) -> Result<WeftBehaviour, NetError> {
    let mut gossipsub = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Anonymous,
        gossipsub_config(config)?,
    )
    .map_err(|e| NetError::Setup(format!("gossipsub: {e}")))?;
    for space in &config.spaces {
        gossipsub
            .subscribe(&space_topic(space))
            .map_err(|e| NetError::Setup(format!("subscribing to space {space}: {e}")))?;
    }

    let sync = request_response::Behaviour::with_codec(
        SyncCodec::new(config.max_request_bytes, config.max_response_bytes),
        [(SYNC_PROTOCOL, request_response::ProtocolSupport::Full)],
        request_response::Config::default().with_request_timeout(config.request_timeout),
    );

    let mdns = if config.mdns {
        let peer_id = keypair.public().to_peer_id();
        Some(
            mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)
                .map_err(|e| NetError::Setup(format!("mDNS: {e}")))?,
        )
    } else {
        None
    };

    let peer_id = keypair.public().to_peer_id();
    Ok(WeftBehaviour {
        limits: connection_limits(config),
        gossipsub,
        sync,
        mdns: Toggle::from(mdns),
        identify: identify::Behaviour::new(identify::Config::new(
            IDENTIFY_PROTOCOL.to_owned(),
            keypair.public(),
        )),
        kad: kademlia(peer_id),
        ping: ping::Behaviour::new(
            ping::Config::new()
                .with_interval(PING_INTERVAL)
                .with_timeout(PING_TIMEOUT),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_the_wire_contract() {
        let space = SpaceName::new("todo").unwrap();
        assert_eq!(space_topic(&space).hash().as_str(), "weft/todo/events/1");
    }

    #[test]
    fn gossipsub_config_builds_with_default_limits() {
        let key = weft_crdt::SigningKey::from_bytes(&[1; 32]);
        let config = NetConfig::new(key);
        let built = gossipsub_config(&config).unwrap();
        assert_eq!(built.max_transmit_size(), config.max_gossip_bytes);
        assert_eq!(built.mesh_n(), MESH_N);
    }
}
