use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use thiserror::Error;
use weft_crdt::SpaceName;

/// Everything that can go wrong in `weft-net`, each with a message a user can act on.
#[derive(Debug, Error)]
pub enum NetError {
    /// A [`crate::NetConfig`] value is unusable (zero-sized channel, limit too small, ...).
    #[error("invalid network configuration: {0}")]
    Config(String),
    /// The signing key could not be turned into a libp2p identity.
    #[error("invalid node identity: {0}")]
    Identity(String),
    /// The transport or a protocol behaviour could not be built.
    #[error("could not build the libp2p swarm: {0}")]
    Setup(String),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address from the configuration.
        addr: Multiaddr,
        /// Why the transport refused it.
        reason: String,
    },
    /// A dial failed, immediately or while connecting.
    #[error("cannot dial {addr}: {reason}")]
    Dial {
        /// The address that was dialed.
        addr: Multiaddr,
        /// Why it failed.
        reason: String,
    },
    /// The network event loop has stopped, so the command could not be carried out.
    #[error("the network event loop has stopped")]
    Shutdown,
    /// No listen address was bound within the given time.
    #[error("no listen address was bound within {0:?}")]
    ListenTimeout(Duration),
    /// The space is not one of the configured spaces, so it has no gossip topic.
    #[error("space {0} is not configured on this node")]
    UnknownSpace(SpaceName),
    /// A single event does not fit in one gossip message.
    #[error("an event of {size} bytes does not fit in a gossip message of at most {limit} bytes")]
    EventTooLarge {
        /// Encoded size of the event.
        size: usize,
        /// Largest batch body a gossip message may carry.
        limit: usize,
    },
    /// gossipsub refused a message for a reason the pull protocol cannot make up for.
    #[error("gossip publish failed: {0}")]
    Publish(String),
    /// A pull got no response within the request timeout.
    #[error("pull from {peer} timed out after {after:?}")]
    PullTimeout {
        /// The peer that was asked.
        peer: PeerId,
        /// The configured request timeout.
        after: Duration,
    },
    /// A pull failed: the peer could not be reached, closed the stream, or sent a response
    /// that is malformed or over the size limit.
    #[error("pull from {peer} failed: {reason}")]
    PullFailed {
        /// The peer that was asked.
        peer: PeerId,
        /// Why it failed.
        reason: String,
    },
}
