use libp2p::gossipsub::MessageId;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::oneshot;
use weft_crdt::{Event, SpaceName};

use crate::wire::{PullRequest, PullResponse};

/// What the network tells the node, in the order it happened.
#[derive(Debug)]
pub enum NetEvent {
    /// A listener bound a new address.
    Listening {
        /// The bound address.
        addr: Multiaddr,
    },
    /// The first connection to `peer` is up.
    PeerConnected {
        /// The peer.
        peer: PeerId,
    },
    /// The last connection to `peer` is down.
    PeerDisconnected {
        /// The peer.
        peer: PeerId,
    },
    /// `peer` subscribed to the gossip topic of `space` (a configured space).
    PeerSubscribed {
        /// The peer.
        peer: PeerId,
        /// The space.
        space: SpaceName,
    },
    /// A gossip batch for a configured space, decoded and structurally valid. Signatures
    /// and clocks are not checked yet: the node must check them and call
    /// [`crate::NetClient::report_validation`] with `message_id` and `source`; the message
    /// is forwarded to other peers only once accepted.
    Gossip {
        /// The peer that sent the message to us (gossipsub's propagation source), which
        /// need not be the peer that published it: messages are anonymous, and the
        /// events in them carry their origins' signatures.
        source: PeerId,
        /// The gossipsub id of the message.
        message_id: MessageId,
        /// The space of the topic it arrived on.
        space: SpaceName,
        /// The events, in the order they were published.
        events: Vec<Event>,
    },
    /// `peer` asks for events. Answer through `reply` within the request timeout; dropping
    /// `reply` closes the peer's stream without an answer.
    PullRequested {
        /// The requesting peer.
        peer: PeerId,
        /// What it asks for.
        request: PullRequest,
        /// Where the answer goes.
        reply: oneshot::Sender<PullResponse>,
    },
}
