//! weft-net: weft's libp2p networking.
//!
//! [`start`] builds a swarm (TCP + noise + yamux; gossipsub, the `/weft/sync/1` pull
//! protocol, mDNS, identify, Kademlia, ping, connection limits), spawns the task that owns
//! it, and returns a cloneable [`NetClient`] to drive it and a bounded stream of
//! [`NetEvent`]s for the node.
//!
//! Discovery: one reachable bootstrap address is enough. Identify tells Kademlia every
//! peer's listen addresses, Kademlia queries spread them, and the node dials what it learns
//! until it has [`NetConfig::target_peers`] peers. Bootstrap addresses are redialed with
//! backoff whenever their connection is lost; mDNS adds LAN peers without any address.
//!
//! Gossip carries batches of events on the topic `weft/<space>/events/1`, each message
//! one compact batch ([`weft_crdt::compact`]); messages that do not decode are rejected
//! here, the rest are handed to the node, which checks signatures and reports a
//! [`Verdict`]. Messages are anonymous at the gossipsub level (no gossipsub signature,
//! author or sequence number): every event is signed by its origin, or vouched for by a
//! later signed event of its origin, and message ids are derived from the content. Pull
//! sync ([`PullRequest`] / [`PullResponse`], see [`wire`]) lets a node fetch whatever
//! gossip missed.
//!
//! [`NetClient::traffic`] reports the bytes this node has moved on the wire, per
//! protocol, and its message counts (see [`Traffic`]).
//!
//! Architecture invariant: this crate knows no storage. It moves decoded, size-checked
//! messages between the network and the node; what to send and what to keep is the
//! node's decision.

#![warn(missing_docs)]

mod behaviour;
mod client;
pub mod codec;
mod config;
mod error;
mod event;
mod event_loop;
mod redial;
mod traffic;
pub mod wire;

pub use behaviour::{
    space_topic, HEARTBEAT, IDENTIFY_PROTOCOL, KAD_PROTOCOL, MESH_N, MESH_N_HIGH, MESH_N_LOW,
    MESH_OUTBOUND_MIN, MESSAGE_ID_BYTES,
};
pub use client::{NetClient, Verdict};
pub use config::{
    NetConfig, DEFAULT_COMMAND_BUFFER, DEFAULT_EVENT_BUFFER, DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_ESTABLISHED, DEFAULT_MAX_ESTABLISHED_PER_PEER, DEFAULT_MAX_GOSSIP_BYTES,
    DEFAULT_MAX_PENDING, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_REQUEST_TIMEOUT, DEFAULT_TARGET_PEERS, GOSSIP_ENVELOPE_RESERVE,
};
pub use error::NetError;
pub use event::NetEvent;
pub use event_loop::DISCOVERY_INTERVAL;
pub use libp2p::{gossipsub::MessageId, Multiaddr, PeerId};
pub use traffic::{StreamTraffic, Traffic};
pub use wire::{PullRequest, PullResponse};

use std::sync::Arc;

use libp2p::core::upgrade::Version;
use libp2p::core::Transport;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::{noise, tcp, yamux, SwarmBuilder};
use tokio::sync::mpsc;

use crate::traffic::{CountedStream, Counters, CountingMuxer};

/// Starts the network: builds the swarm, binds the listen addresses, dials the bootstrap
/// addresses and spawns the event loop on the current tokio runtime. A bootstrap address
/// that cannot be reached yet is not an error: it is redialed with backoff; only an
/// address the transport cannot dial at all (unsupported protocol) fails here.
///
/// The loop runs until every [`NetClient`] clone is dropped. The node must keep reading
/// the returned receiver: while it is full the loop stops reading from the network.
pub fn start(config: NetConfig) -> Result<(NetClient, mpsc::Receiver<NetEvent>), NetError> {
    config.validate()?;
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(NetError::Setup(
            "weft_net::start must be called inside a tokio runtime".into(),
        ));
    }
    let keypair = libp2p::identity::Keypair::ed25519_from_bytes(config.signing_key.to_bytes())
        .map_err(|e| NetError::Identity(e.to_string()))?;
    let behaviour = behaviour::build(&keypair, &config)?;
    // TCP + noise + yamux as `SwarmBuilder::with_tcp` builds them (TCP_NODELAY, lazy
    // multistream-select), with the traffic counters in the stack: each TCP stream is
    // counted below noise, each yamux substream above the muxer (see `traffic`).
    let counters = Arc::new(Counters::default());
    let noise = noise::Config::new(&keypair)
        .map_err(|e| NetError::Setup(format!("noise handshake configuration: {e}")))?;
    let (wire, streams) = (counters.clone(), counters.clone());
    let transport = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
        .map(move |stream, _| CountedStream::new(stream, wire.clone()))
        .upgrade(Version::V1Lazy)
        .authenticate(noise)
        .multiplex(yamux::Config::default())
        .map(move |(peer, muxer), _| (peer, CountingMuxer::new(muxer, streams.clone())));
    let Ok(builder) = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(|_| transport);
    let Ok(builder) = builder
        .with_dns()
        .map_err(|e| NetError::Setup(format!("DNS resolver: {e}")))?
        .with_behaviour(|_| behaviour);
    let idle_timeout = config.idle_timeout;
    let mut swarm = builder
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle_timeout))
        .build();

    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
    }
    let mut bootstrap = redial::BootstrapPeers::default();
    for addr in &config.bootstrap {
        let opts = DialOpts::unknown_peer_id().address(addr.clone()).build();
        let connection = opts.connection_id();
        swarm.dial(opts).map_err(|e| NetError::Dial {
            addr: addr.clone(),
            reason: e.to_string(),
        })?;
        bootstrap.add_dialing(addr.clone(), connection);
    }

    let local_peer_id = *swarm.local_peer_id();
    let (command_tx, command_rx) = mpsc::channel(config.command_buffer);
    let (event_tx, event_rx) = mpsc::channel(config.event_buffer);
    let event_loop = event_loop::EventLoop::new(
        swarm,
        command_rx,
        event_tx,
        bootstrap,
        &config,
        counters.clone(),
    );
    tokio::spawn(event_loop.run());
    Ok((
        NetClient::new(
            command_tx,
            local_peer_id,
            config.max_batch_bytes(),
            counters,
        ),
        event_rx,
    ))
}
