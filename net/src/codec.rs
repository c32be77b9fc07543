//! [`SyncCodec`]: the `request_response::Codec` of `/weft/sync/1`.
//!
//! Each stream carries one request and one response, each a single CBOR message (see
//! [`crate::wire`]) that fills the stream until its writer closes it. Reads go through
//! `take(limit + 1)`, so a peer can never make us buffer more than the limit plus one
//! byte, and a message over the limit is reported as such rather than as a confusing
//! truncated-CBOR error.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::request_response;
use libp2p::StreamProtocol;

use crate::wire::{self, PullRequest, PullResponse, WireError};

/// The protocol name of weft's pull sync.
pub const SYNC_PROTOCOL: StreamProtocol = StreamProtocol::new("/weft/sync/1");

/// Reads and writes `/weft/sync/1` messages with explicit size limits.
#[derive(Clone, Debug)]
pub struct SyncCodec {
    max_request_bytes: usize,
    max_response_bytes: usize,
}

impl SyncCodec {
    /// A codec refusing requests over `max_request_bytes` and responses over
    /// `max_response_bytes`, in both directions.
    pub fn new(max_request_bytes: usize, max_response_bytes: usize) -> Self {
        SyncCodec {
            max_request_bytes,
            max_response_bytes,
        }
    }
}

fn invalid(e: WireError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

async fn read_limited<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    limit: usize,
) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    io.take(cap).read_to_end(&mut buf).await?;
    Ok(buf)
}

impl request_response::Codec for SyncCodec {
    type Protocol = StreamProtocol;
    type Request = PullRequest;
    type Response = PullResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<PullRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        let bytes = read_limited(io, self.max_request_bytes).await?;
        wire::decode_request(&bytes, self.max_request_bytes).map_err(invalid)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<PullResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        let bytes = read_limited(io, self.max_response_bytes).await?;
        if bytes.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the stream without answering (it failed or declined to respond)",
            ));
        }
        wire::decode_response(&bytes, self.max_response_bytes).map_err(invalid)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: PullRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let bytes = wire::encode_request(&request, self.max_request_bytes).map_err(invalid)?;
        io.write_all(&bytes).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: PullResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let bytes = wire::encode_response(&response, self.max_response_bytes).map_err(invalid)?;
        io.write_all(&bytes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tests::sample_events;
    use futures::io::Cursor;
    use libp2p::request_response::Codec;
    use weft_crdt::{SpaceName, VersionVector};

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        futures::executor::block_on(f)
    }

    #[test]
    fn request_and_response_round_trip_through_the_codec() {
        let mut codec = SyncCodec::new(1 << 20, 16 << 20);
        let request = PullRequest {
            space: SpaceName::default_space(),
            have: VersionVector::new(),
            max_events: 10,
            max_bytes: 4096,
            policy: weft_crdt::PolicyIdentity {
                name: "lww".into(),
                version: 1,
            },
        };
        let mut buf = Vec::new();
        block_on(codec.write_request(&SYNC_PROTOCOL, &mut buf, request.clone())).unwrap();
        let read = block_on(codec.read_request(&SYNC_PROTOCOL, &mut Cursor::new(buf))).unwrap();
        assert_eq!(read, request);

        let response = PullResponse::Events {
            events: sample_events(2, 100),
            done: true,
            have: VersionVector::new(),
        };
        let mut buf = Vec::new();
        block_on(codec.write_response(&SYNC_PROTOCOL, &mut buf, response.clone())).unwrap();
        let read = block_on(codec.read_response(&SYNC_PROTOCOL, &mut Cursor::new(buf))).unwrap();
        assert_eq!(read, response);
    }

    #[test]
    fn oversize_response_is_a_clear_error_not_a_truncation() {
        let response = PullResponse::Events {
            events: sample_events(10, 4000),
            done: true,
            have: VersionVector::new(),
        };
        let mut buf = Vec::new();
        let mut big = SyncCodec::new(1 << 20, 16 << 20);
        block_on(big.write_response(&SYNC_PROTOCOL, &mut buf, response.clone())).unwrap();
        let mut small = SyncCodec::new(1 << 20, 16 * 1024);
        let err = block_on(small.read_response(&SYNC_PROTOCOL, &mut Cursor::new(buf))).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let msg = err.to_string();
        assert!(
            msg.contains("sync response") && msg.contains("exceeds the limit of 16384 bytes"),
            "{msg}"
        );

        let mut sink = Vec::new();
        let err = block_on(small.write_response(&SYNC_PROTOCOL, &mut sink, response)).unwrap_err();
        assert!(err.to_string().contains("exceeds"), "{err}");
        assert!(
            sink.is_empty(),
            "nothing is written when the response is over the limit"
        );
    }

    #[test]
    fn an_empty_response_stream_says_the_peer_did_not_answer() {
        let mut codec = SyncCodec::new(1 << 20, 16 << 20);
        let err = block_on(codec.read_response(&SYNC_PROTOCOL, &mut Cursor::new(Vec::new())))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("without answering"), "{err}");
    }
}
