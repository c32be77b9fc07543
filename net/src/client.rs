//! [`NetClient`], the handle the node uses to drive the network, and the
//! [`Command`]s it sends to the event loop.

use std::time::Duration;

use libp2p::gossipsub::{MessageAcceptance, MessageId};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};
use weft_crdt::{encode_event_batch, Event, SpaceName};

use crate::config::BATCH_HEADER_BYTES;
use crate::error::NetError;
use crate::wire::{PullRequest, PullResponse};

/// The node's verdict on a gossip message, after checking signatures and clocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Valid: deliver and forward to the mesh.
    Accept,
    /// Invalid: do not forward, and penalise the peer that sent it.
    Reject,
    /// Not forwarded, no penalty (for example: already known, or not checkable yet).
    Ignore,
}

impl From<Verdict> for MessageAcceptance {
    fn from(v: Verdict) -> Self {
        match v {
            Verdict::Accept => MessageAcceptance::Accept,
            Verdict::Reject => MessageAcceptance::Reject,
            Verdict::Ignore => MessageAcceptance::Ignore,
        }
    }
}

/// A request from a [`NetClient`] to the event loop; each carries the sender for its
/// answer.
#[derive(Debug)]
pub(crate) enum Command {
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    WaitListening {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    ConnectedPeers {
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Publish {
        space: SpaceName,
        messages: Vec<Vec<u8>>,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Pull {
        peer: PeerId,
        request: PullRequest,
        reply: oneshot::Sender<Result<PullResponse, NetError>>,
    },
    ReportValidation {
        message_id: MessageId,
        source: PeerId,
        verdict: Verdict,
        reply: oneshot::Sender<()>,
    },
}

/// A cloneable handle to the network event loop. The loop runs until every clone is
/// dropped.
#[derive(Clone, Debug)]
pub struct NetClient {
    commands: mpsc::Sender<Command>,
    local_peer_id: PeerId,
    max_batch_bytes: usize,
}

impl NetClient {
    pub(crate) fn new(
        commands: mpsc::Sender<Command>,
        local_peer_id: PeerId,
        max_batch_bytes: usize,
    ) -> Self {
        NetClient {
            commands,
            local_peer_id,
            max_batch_bytes,
        }
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NetError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| NetError::Shutdown)?;
        rx.await.map_err(|_| NetError::Shutdown)
    }

    /// This node's libp2p identity (the same key as its weft `NodeId`).
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// The addresses currently bound by the listeners (possibly none yet).
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        self.ask(|reply| Command::ListenAddrs { reply }).await
    }

    /// Waits until at least one listen address is bound and returns all bound addresses.
    pub async fn wait_listening(&self, timeout: Duration) -> Result<Vec<Multiaddr>, NetError> {
        tokio::time::timeout(timeout, self.ask(|reply| Command::WaitListening { reply }))
            .await
            .map_err(|_| NetError::ListenTimeout(timeout))?
    }

    /// The peers with at least one open connection.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, NetError> {
        self.ask(|reply| Command::ConnectedPeers { reply }).await
    }

    /// Dials `addr` and returns once the connection is established, or with the reason it
    /// failed. The operating system's connect timeout bounds how long that takes; wrap the
    /// call in a timeout to wait less.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.ask(|reply| Command::Dial { addr, reply }).await?
    }

    /// Gossips `events` on the space's topic, split into as many messages as needed to keep
    /// each under the gossip size limit.
    ///
    /// Having no subscribed peer yet and re-publishing an identical batch are not errors:
    /// the pull protocol delivers whatever gossip does not. Fails for a space that is not
    /// configured and for an event too large for any gossip message.
    pub async fn publish(&self, space: SpaceName, events: Vec<Event>) -> Result<(), NetError> {
        if events.is_empty() {
            return Ok(());
        }
        let messages = split_batches(&events, self.max_batch_bytes)?;
        self.ask(|reply| Command::Publish {
            space,
            messages,
            reply,
        })
        .await?
    }

    /// Publishes raw bytes on a space's topic, bypassing batch encoding. For tests of
    /// receivers' validation only.
    #[doc(hidden)]
    pub async fn publish_raw(&self, space: SpaceName, data: Vec<u8>) -> Result<(), NetError> {
        self.ask(|reply| Command::Publish {
            space,
            messages: vec![data],
            reply,
        })
        .await?
    }

    /// Asks `peer` for events it has beyond `request.have`. Fails on timeout, when the peer
    /// cannot be reached or closes the stream without answering, and when the response is
    /// malformed or over the size limit.
    pub async fn pull(&self, peer: PeerId, request: PullRequest) -> Result<PullResponse, NetError> {
        self.ask(|reply| Command::Pull {
            peer,
            request,
            reply,
        })
        .await?
    }

    /// Reports the node's verdict on a [`crate::NetEvent::Gossip`] message; `source` is the
    /// event's `source`. Until it is reported, the message is not forwarded.
    pub async fn report_validation(
        &self,
        message_id: MessageId,
        source: PeerId,
        verdict: Verdict,
    ) -> Result<(), NetError> {
        self.ask(|reply| Command::ReportValidation {
            message_id,
            source,
            verdict,
            reply,
        })
        .await
    }
}

/// Cuts `events` into batches whose encoding ([`encode_event_batch`]) is at most
/// `max_batch_bytes`, keeping their order.
pub(crate) fn split_batches(
    events: &[Event],
    max_batch_bytes: usize,
) -> Result<Vec<Vec<u8>>, NetError> {
    let budget = max_batch_bytes.saturating_sub(BATCH_HEADER_BYTES);
    let mut messages = Vec::new();
    let mut start = 0;
    let mut size = 0;
    for (i, event) in events.iter().enumerate() {
        let len = event.encode().len();
        if len > budget {
            return Err(NetError::EventTooLarge {
                size: len,
                limit: budget,
            });
        }
        if size + len > budget {
            messages.push(encode_event_batch(&events[start..i]));
            start = i;
            size = 0;
        }
        size += len;
    }
    messages.push(encode_event_batch(&events[start..]));
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_crdt::decode_event_batch;

    use crate::wire::tests::sample_events as events;

    #[test]
    fn small_batches_stay_in_one_message() {
        let evs = events(3, 10);
        let msgs = split_batches(&evs, 64 * 1024).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(decode_event_batch(&msgs[0]).unwrap(), evs);
    }

    #[test]
    fn large_batches_are_split_in_order_under_the_limit() {
        let evs = events(20, 10_000);
        let limit = 32 * 1024;
        let msgs = split_batches(&evs, limit).unwrap();
        assert!(msgs.len() >= 7, "{} messages", msgs.len());
        let mut all = Vec::new();
        for m in &msgs {
            assert!(m.len() <= limit, "{} > {limit}", m.len());
            all.extend(decode_event_batch(m).unwrap());
        }
        assert_eq!(all, evs);
    }

    #[test]
    fn an_event_larger_than_a_message_is_an_error() {
        let evs = events(1, 20_000);
        let err = split_batches(&evs, 8 * 1024).unwrap_err();
        assert!(matches!(err, NetError::EventTooLarge { .. }), "{err}");
    }
}
