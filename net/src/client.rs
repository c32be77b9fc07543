//! [`NetClient`], the handle the node uses to drive the network, and the
//! [`Command`]s it sends to the event loop.

use std::sync::Arc;
use std::time::Duration;

use libp2p::gossipsub::{MessageAcceptance, MessageId};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};
use weft_crdt::compact::BatchEncoder;
use weft_crdt::{Event, SpaceName};

use crate::config::BATCH_HEADER_BYTES;
use crate::error::NetError;
use crate::traffic::{Counters, Traffic};
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
/// answer, except a validation verdict, which has none to give.
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
        messages: Vec<GossipMessage>,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Pull {
        peer: PeerId,
        request: PullRequest,
        reply: oneshot::Sender<Result<PullResponse, NetError>>,
    },
    /// No answer: a receiver reports a verdict for every gossip message, and waiting for
    /// an acknowledgement that carries nothing cost each message one more wake-up of
    /// the reporting task.
    ReportValidation {
        message_id: MessageId,
        source: PeerId,
        verdict: Verdict,
    },
}

/// One gossip message body: a compact event batch ([`weft_crdt::compact`]).
#[derive(Debug)]
pub(crate) struct GossipMessage {
    pub(crate) data: Vec<u8>,
    /// Events in it, for the traffic counters.
    pub(crate) events: usize,
}

/// A cloneable handle to the network event loop. The loop runs until every clone is
/// dropped.
#[derive(Clone, Debug)]
pub struct NetClient {
    commands: mpsc::Sender<Command>,
    local_peer_id: PeerId,
    max_batch_bytes: usize,
    counters: Arc<Counters>,
}

impl NetClient {
    pub(crate) fn new(
        commands: mpsc::Sender<Command>,
        local_peer_id: PeerId,
        max_batch_bytes: usize,
        counters: Arc<Counters>,
    ) -> Self {
        NetClient {
            commands,
            local_peer_id,
            max_batch_bytes,
            counters,
        }
    }

    /// What this node has sent and received since its network started: bytes on the
    /// wire (every TCP connection, all framing included), bytes per protocol, and
    /// gossip and pull counts. Reads counters; never waits for the event loop.
    pub fn traffic(&self) -> Traffic {
        self.counters.snapshot()
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

    /// Gossips `events` on the space's topic as compact batches ([`weft_crdt::compact`]),
    /// in order, split into as many messages as needed to keep each under the gossip size
    /// limit.
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
            messages: vec![GossipMessage { data, events: 0 }],
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
    /// event's `source`. Until it is reported, the message is not forwarded. Returns once
    /// the verdict is queued for the event loop (which takes commands in order), without
    /// waiting for the loop to act on it.
    pub async fn report_validation(
        &self,
        message_id: MessageId,
        source: PeerId,
        verdict: Verdict,
    ) -> Result<(), NetError> {
        self.commands
            .send(Command::ReportValidation {
                message_id,
                source,
                verdict,
            })
            .await
            .map_err(|_| NetError::Shutdown)
    }
}

/// Cuts `events`, in order, into compact batches of at most `max_batch_bytes`.
///
/// Batches are cut by the canonical size of their events, which is what receivers
/// bound a message's decoded events by (`NetConfig::max_gossip_bytes`), keeping
/// [`BATCH_HEADER_BYTES`] for the batch's own framing. The compact form is smaller in
/// practice; should a batch of unusually many distinct node ids come out larger than
/// `max_batch_bytes` all the same, it is halved until it fits.
pub(crate) fn split_batches(
    events: &[Event],
    max_batch_bytes: usize,
) -> Result<Vec<GossipMessage>, NetError> {
    let budget = max_batch_bytes.saturating_sub(BATCH_HEADER_BYTES);
    let mut messages = Vec::new();
    let mut batch = BatchEncoder::new();
    let mut start = 0;
    for (i, event) in events.iter().enumerate() {
        let canonical = event.encode();
        if canonical.len() > budget {
            return Err(NetError::EventTooLarge {
                size: canonical.len(),
                limit: budget,
            });
        }
        if !batch.is_empty() && batch.event_bytes() + canonical.len() > budget {
            let full = std::mem::take(&mut batch);
            seal(full, &events[start..i], max_batch_bytes, &mut messages)?;
            start = i;
        }
        batch.push_encoded(event, &canonical);
    }
    seal(batch, &events[start..], max_batch_bytes, &mut messages)?;
    Ok(messages)
}

/// Finishes `batch` (the encoding of `events`) into `out`, halving `events` while the
/// encoding is over `max_batch_bytes`.
fn seal(
    batch: BatchEncoder,
    events: &[Event],
    max_batch_bytes: usize,
    out: &mut Vec<GossipMessage>,
) -> Result<(), NetError> {
    if batch.encoded_len() <= max_batch_bytes {
        out.push(GossipMessage {
            events: batch.len(),
            data: batch.finish(),
        });
        return Ok(());
    }
    if events.len() <= 1 {
        return Err(NetError::EventTooLarge {
            size: batch.encoded_len(),
            limit: max_batch_bytes,
        });
    }
    let (a, b) = events.split_at(events.len() / 2);
    for half in [a, b] {
        let mut batch = BatchEncoder::new();
        for e in half {
            batch.push(e);
        }
        seal(batch, half, max_batch_bytes, out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_crdt::compact::decode_batch;

    use crate::wire::tests::sample_events as events;

    #[test]
    fn small_batches_stay_in_one_message() {
        let evs = events(3, 10);
        let msgs = split_batches(&evs, 64 * 1024).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].events, 3);
        assert_eq!(decode_batch(&msgs[0].data, 64 * 1024).unwrap(), evs);
    }

    #[test]
    fn large_batches_are_split_in_order_under_the_limit() {
        let evs = events(20, 10_000);
        let limit = 32 * 1024;
        let msgs = split_batches(&evs, limit).unwrap();
        assert!(msgs.len() >= 7, "{} messages", msgs.len());
        let mut all = Vec::new();
        for m in &msgs {
            assert!(m.data.len() <= limit, "{} > {limit}", m.data.len());
            // What the receiver allows: decoded events within its gossip limit.
            let decoded = decode_batch(&m.data, limit).unwrap();
            assert_eq!(decoded.len(), m.events);
            all.extend(decoded);
        }
        assert_eq!(all, evs);
    }

    #[test]
    fn a_batch_of_many_node_ids_is_halved_until_it_fits() {
        // Each event names many other nodes once; their ids cost the compact form a few
        // bytes more than the canonical one.
        let key = weft_crdt::SigningKey::from_bytes(&[5; 32]);
        let origin = weft_crdt::NodeId::of(&key);
        let space = SpaceName::default_space();
        let evs: Vec<Event> = (0..8u32)
            .map(|i| {
                let mut clock: weft_crdt::VectorClock = (0..200u32)
                    .map(|j| {
                        let mut b = [0u8; 32];
                        b[..4].copy_from_slice(&(i * 1000 + j).to_be_bytes());
                        (weft_crdt::NodeId::from_bytes(b), 300)
                    })
                    .collect();
                clock.set(origin, 1);
                weft_crdt::UnsignedEvent {
                    origin,
                    seq: 1,
                    clock,
                    hlc: weft_crdt::Hlc(1),
                    key: format!("k{i}"),
                    op: weft_crdt::Op::Put,
                    kind: String::new(),
                    payload: vec![],
                    meta: Default::default(),
                    prev: None,
                }
                .sign(&space, &key)
            })
            .collect();
        let canonical: usize = evs.iter().map(|e| e.encode().len()).sum();
        let limit = canonical + BATCH_HEADER_BYTES;
        let msgs = split_batches(&evs, limit).unwrap();
        assert!(
            msgs.len() > 1,
            "the one canonical-sized batch was too large"
        );
        let mut all = Vec::new();
        for m in &msgs {
            assert!(m.data.len() <= limit, "{} > {limit}", m.data.len());
            all.extend(decode_batch(&m.data, limit).unwrap());
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
