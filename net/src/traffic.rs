//! Traffic accounting: what this node sends and receives, in bytes on the wire and in
//! weft's own messages.
//!
//! Two layers are counted, by wrappers built into the transport in [`crate::start`]:
//!
//! - **The wire.** Every TCP connection's stream is wrapped ([`CountedStream`]) below
//!   noise and yamux, so [`Traffic::bytes_in`] / [`Traffic::bytes_out`] are the bytes
//!   handed to and taken from the kernel's sockets: payloads, multistream-select
//!   negotiation, yamux frame headers and window updates, noise handshakes, frame
//!   lengths and tags. Only TCP/IP headers and acknowledgements are not in them.
//! - **Per protocol.** Every yamux substream is wrapped ([`CountedSubstream`]) above the
//!   muxer and attributed to the first protocol its opener proposes in
//!   multistream-select: `/meshsub/...` is gossip, `/weft/sync/...` is sync, anything
//!   else (identify, Kademlia, ping) is other. These count the substream's bytes,
//!   negotiation included, but not yamux's or noise's framing, so the three protocol
//!   counts add up to somewhat less than the wire totals.
//!
//! The event loop adds message counts (gossip messages and the events in them, pulls and
//! pages, both ways). Everything is a relaxed atomic counter shared by the connection
//! tasks, the event loop and every [`crate::NetClient`]: reading a [`Traffic`] snapshot
//! never waits for the network task.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures::io::{IoSlice, IoSliceMut};
use futures::{AsyncRead, AsyncWrite};
use libp2p::core::muxing::{StreamMuxer, StreamMuxerEvent};

/// Bytes of one protocol family, counted on its yamux substreams.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamTraffic {
    /// Bytes read from this family's substreams.
    pub bytes_in: u64,
    /// Bytes written to this family's substreams.
    pub bytes_out: u64,
    /// Substreams opened (by either side).
    pub streams: u64,
}

impl StreamTraffic {
    /// Both directions.
    pub fn bytes(&self) -> u64 {
        self.bytes_in + self.bytes_out
    }

    fn since(&self, earlier: &StreamTraffic) -> StreamTraffic {
        StreamTraffic {
            bytes_in: self.bytes_in.saturating_sub(earlier.bytes_in),
            bytes_out: self.bytes_out.saturating_sub(earlier.bytes_out),
            streams: self.streams.saturating_sub(earlier.streams),
        }
    }
}

/// A snapshot of everything this node has sent and received since its network
/// started. Counters only grow; [`Traffic::since`] gives the traffic of a window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes read from TCP connections: everything peers sent us, framing included.
    pub bytes_in: u64,
    /// Bytes written to TCP connections: everything we sent, framing included.
    pub bytes_out: u64,
    /// TCP connections opened, inbound and outbound (including ones whose handshake
    /// then failed).
    pub connections: u64,
    /// Gossipsub substreams (`/meshsub/...`).
    pub gossip: StreamTraffic,
    /// Pull sync substreams (`/weft/sync/...`).
    pub sync: StreamTraffic,
    /// Every other substream: identify, Kademlia, ping.
    pub other: StreamTraffic,
    /// Gossip messages we published (forwarding by gossipsub is not counted here).
    pub gossip_messages_sent: u64,
    /// Events in the gossip messages we published.
    pub gossip_events_sent: u64,
    /// Gossip messages received that decoded, on a configured topic.
    pub gossip_messages_received: u64,
    /// Events in those messages.
    pub gossip_events_received: u64,
    /// Pull requests we sent.
    pub pulls_sent: u64,
    /// Pages of events received in answer.
    pub pages_received: u64,
    /// Events in those pages.
    pub events_pulled: u64,
    /// Pull requests from peers that we answered.
    pub pulls_served: u64,
    /// Events in the pages we sent.
    pub events_served: u64,
}

impl Traffic {
    /// Bytes on the wire in both directions.
    pub fn bytes(&self) -> u64 {
        self.bytes_in + self.bytes_out
    }

    /// The traffic between `earlier` (a snapshot of the same node) and `self`.
    pub fn since(&self, earlier: &Traffic) -> Traffic {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        Traffic {
            bytes_in: d(self.bytes_in, earlier.bytes_in),
            bytes_out: d(self.bytes_out, earlier.bytes_out),
            connections: d(self.connections, earlier.connections),
            gossip: self.gossip.since(&earlier.gossip),
            sync: self.sync.since(&earlier.sync),
            other: self.other.since(&earlier.other),
            gossip_messages_sent: d(self.gossip_messages_sent, earlier.gossip_messages_sent),
            gossip_events_sent: d(self.gossip_events_sent, earlier.gossip_events_sent),
            gossip_messages_received: d(
                self.gossip_messages_received,
                earlier.gossip_messages_received,
            ),
            gossip_events_received: d(self.gossip_events_received, earlier.gossip_events_received),
            pulls_sent: d(self.pulls_sent, earlier.pulls_sent),
            pages_received: d(self.pages_received, earlier.pages_received),
            events_pulled: d(self.events_pulled, earlier.events_pulled),
            pulls_served: d(self.pulls_served, earlier.pulls_served),
            events_served: d(self.events_served, earlier.events_served),
        }
    }
}

#[derive(Debug, Default)]
struct StreamCounters {
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    streams: AtomicU64,
}

impl StreamCounters {
    fn snapshot(&self) -> StreamTraffic {
        StreamTraffic {
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            streams: self.streams.load(Ordering::Relaxed),
        }
    }
}

/// The live counters behind [`Traffic`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    connections: AtomicU64,
    gossip: StreamCounters,
    sync: StreamCounters,
    other: StreamCounters,
    pub(crate) gossip_messages_sent: AtomicU64,
    pub(crate) gossip_events_sent: AtomicU64,
    pub(crate) gossip_messages_received: AtomicU64,
    pub(crate) gossip_events_received: AtomicU64,
    pub(crate) pulls_sent: AtomicU64,
    pub(crate) pages_received: AtomicU64,
    pub(crate) events_pulled: AtomicU64,
    pub(crate) pulls_served: AtomicU64,
    pub(crate) events_served: AtomicU64,
}

/// Adds `n` to a counter.
pub(crate) fn add(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn snapshot(&self) -> Traffic {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Traffic {
            bytes_in: get(&self.bytes_in),
            bytes_out: get(&self.bytes_out),
            connections: get(&self.connections),
            gossip: self.gossip.snapshot(),
            sync: self.sync.snapshot(),
            other: self.other.snapshot(),
            gossip_messages_sent: get(&self.gossip_messages_sent),
            gossip_events_sent: get(&self.gossip_events_sent),
            gossip_messages_received: get(&self.gossip_messages_received),
            gossip_events_received: get(&self.gossip_events_received),
            pulls_sent: get(&self.pulls_sent),
            pages_received: get(&self.pages_received),
            events_pulled: get(&self.events_pulled),
            pulls_served: get(&self.pulls_served),
            events_served: get(&self.events_served),
        }
    }

    fn family(&self, family: Family) -> &StreamCounters {
        match family {
            Family::Gossip => &self.gossip,
            Family::Sync => &self.sync,
            Family::Other => &self.other,
        }
    }
}

/// A TCP connection's byte stream, counted into [`Traffic::bytes_in`] and
/// [`Traffic::bytes_out`].
pub(crate) struct CountedStream<S> {
    inner: S,
    counters: Arc<Counters>,
}

impl<S> CountedStream<S> {
    /// Wraps a newly opened connection (and counts it).
    pub(crate) fn new(inner: S, counters: Arc<Counters>) -> Self {
        add(&counters.connections, 1);
        CountedStream { inner, counters }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CountedStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        add(&self.counters.bytes_in, n);
        Poll::Ready(Ok(n))
    }

    fn poll_read_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_read_vectored(cx, bufs))?;
        add(&self.counters.bytes_in, n);
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountedStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        add(&self.counters.bytes_out, n);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs))?;
        add(&self.counters.bytes_out, n);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// A connection's stream muxer whose substreams are counted per protocol family.
pub(crate) struct CountingMuxer<M> {
    inner: M,
    counters: Arc<Counters>,
}

impl<M> CountingMuxer<M> {
    pub(crate) fn new(inner: M, counters: Arc<Counters>) -> Self {
        CountingMuxer { inner, counters }
    }
}

impl<M> StreamMuxer for CountingMuxer<M>
where
    M: StreamMuxer + Unpin,
    M::Substream: Unpin,
{
    type Substream = CountedSubstream<M::Substream>;
    type Error = M::Error;

    fn poll_inbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let s = ready!(Pin::new(&mut self.inner).poll_inbound(cx))?;
        Poll::Ready(Ok(CountedSubstream::new(s, self.counters.clone(), false)))
    }

    fn poll_outbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let s = ready!(Pin::new(&mut self.inner).poll_outbound(cx))?;
        Poll::Ready(Ok(CountedSubstream::new(s, self.counters.clone(), true)))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
        Pin::new(&mut self.inner).poll(cx)
    }
}

/// A protocol family, as traffic is attributed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Gossip,
    Sync,
    Other,
}

/// The most bytes of a substream's opening kept to find its protocol. The opener's
/// first two multistream-select messages (the header, 20 bytes, and the proposed
/// protocol) fit many times over; a substream that has not named its protocol by then
/// counts as other.
const SNIFF_LIMIT: usize = 256;

/// The multistream-select header message, length prefix included.
const MULTISTREAM_HEADER: &[u8] = b"\x13/multistream/1.0.0\n";

/// The family of the protocol the opener of a substream proposes first, read from the
/// opener's first bytes; `None` while more bytes are needed.
fn classify(opening: &[u8]) -> Option<Family> {
    let Some(rest) = opening.strip_prefix(MULTISTREAM_HEADER) else {
        let could_still_match =
            opening.len() < MULTISTREAM_HEADER.len() && MULTISTREAM_HEADER.starts_with(opening);
        return (!could_still_match).then_some(Family::Other);
    };
    // A protocol message: an unsigned-varint length (multistream-select caps messages at
    // 16 bits, so at most 3 bytes), the name and a line feed.
    let mut len = 0usize;
    let mut at = 0;
    loop {
        let &b = rest.get(at)?;
        len |= usize::from(b & 0x7f) << (7 * at);
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
        if at == 3 {
            return Some(Family::Other);
        }
    }
    let name = rest.get(at..at + len)?;
    Some(if name.starts_with(b"/meshsub/") {
        Family::Gossip
    } else if name.starts_with(b"/weft/sync/") {
        Family::Sync
    } else {
        Family::Other
    })
}

/// A yamux substream whose bytes are counted for its protocol family.
///
/// The family is learned from the opener's side of the stream: what we write on a
/// substream we opened, what we read on one the peer opened. Bytes moved before it is
/// known are held and added once it is; a substream dropped before naming a protocol
/// counts as other.
pub(crate) struct CountedSubstream<S> {
    inner: S,
    counters: Arc<Counters>,
    opened_here: bool,
    family: Option<Family>,
    opening: Vec<u8>,
    held_in: usize,
    held_out: usize,
}

impl<S> CountedSubstream<S> {
    fn new(inner: S, counters: Arc<Counters>, opened_here: bool) -> Self {
        CountedSubstream {
            inner,
            counters,
            opened_here,
            family: None,
            opening: Vec::new(),
            held_in: 0,
            held_out: 0,
        }
    }

    fn settle(&mut self, family: Family) {
        self.family = Some(family);
        self.opening = Vec::new();
        let c = self.counters.family(family);
        add(&c.streams, 1);
        add(&c.bytes_in, std::mem::take(&mut self.held_in));
        add(&c.bytes_out, std::mem::take(&mut self.held_out));
    }

    /// Counts `bytes` moved in (`inbound`) or out.
    fn record(&mut self, inbound: bool, bytes: &[u8]) {
        if let Some(family) = self.family {
            let c = self.counters.family(family);
            add(
                if inbound { &c.bytes_in } else { &c.bytes_out },
                bytes.len(),
            );
            return;
        }
        if inbound {
            self.held_in += bytes.len();
        } else {
            self.held_out += bytes.len();
        }
        if inbound != self.opened_here {
            let room = SNIFF_LIMIT.saturating_sub(self.opening.len());
            self.opening
                .extend_from_slice(&bytes[..bytes.len().min(room)]);
            match classify(&self.opening) {
                Some(family) => self.settle(family),
                None if self.opening.len() >= SNIFF_LIMIT => self.settle(Family::Other),
                None => {}
            }
        }
    }
}

impl<S> Drop for CountedSubstream<S> {
    fn drop(&mut self) {
        if self.family.is_none() {
            self.settle(Family::Other);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CountedSubstream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        self.record(true, &buf[..n]);
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountedSubstream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        self.record(false, &buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{AsyncReadExt, AsyncWriteExt};

    fn opening(protocol: &str) -> Vec<u8> {
        let mut v = MULTISTREAM_HEADER.to_vec();
        v.push(protocol.len() as u8 + 1);
        v.extend_from_slice(protocol.as_bytes());
        v.push(b'\n');
        v
    }

    #[test]
    fn substreams_are_classified_by_the_first_proposed_protocol() {
        assert_eq!(classify(&opening("/meshsub/1.2.0")), Some(Family::Gossip));
        assert_eq!(classify(&opening("/weft/sync/1")), Some(Family::Sync));
        assert_eq!(classify(&opening("/ipfs/id/1.0.0")), Some(Family::Other));
        assert_eq!(classify(b"\x13/multi"), None);
        assert_eq!(classify(&opening("/weft/sync/1")[..25]), None);
        assert_eq!(classify(b"GET / HTTP/1.1"), Some(Family::Other));
        assert_eq!(classify(b""), None);
    }

    #[test]
    fn bytes_are_attributed_once_the_protocol_is_known_in_any_chunking() {
        let counters = Arc::new(Counters::default());
        let mut data = opening("/weft/sync/1");
        data.extend_from_slice(&[7; 1000]);
        // Written by us on a substream we opened, a few bytes at a time.
        let mut s = CountedSubstream::new(Vec::new(), counters.clone(), true);
        futures::executor::block_on(async {
            for chunk in data.chunks(3) {
                s.write_all(chunk).await.unwrap();
            }
        });
        // Read by us on a substream the peer opened.
        let mut r = CountedSubstream::new(
            futures::io::Cursor::new(data.clone()),
            counters.clone(),
            false,
        );
        let mut back = Vec::new();
        futures::executor::block_on(r.read_to_end(&mut back)).unwrap();
        assert_eq!(back, data);
        drop((s, r));
        let t = counters.snapshot();
        let n = data.len() as u64;
        assert_eq!(
            t.sync,
            StreamTraffic {
                bytes_in: n,
                bytes_out: n,
                streams: 2
            }
        );
        assert_eq!(t.gossip, StreamTraffic::default());

        // A substream that never names a protocol counts as other when dropped.
        let mut s = CountedSubstream::new(Vec::new(), counters.clone(), true);
        futures::executor::block_on(s.write_all(b"\x13/multi")).unwrap();
        drop(s);
        assert_eq!(counters.snapshot().other.bytes_out, 7);
        assert_eq!(counters.snapshot().other.streams, 1);
    }

    #[test]
    fn snapshots_subtract_into_windows() {
        let counters = Counters::default();
        add(&counters.bytes_in, 10);
        let before = counters.snapshot();
        add(&counters.bytes_in, 5);
        add(&counters.pulls_sent, 2);
        let window = counters.snapshot().since(&before);
        assert_eq!(
            (window.bytes_in, window.pulls_sent, window.bytes()),
            (5, 2, 5)
        );
    }
}
