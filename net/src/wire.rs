//! The messages of the `/weft/sync/1` request-response protocol and their CBOR encoding.
//!
//! Every message is a CBOR array whose first element is the wire version
//! ([`SYNC_VERSION`]); a message of any other version is refused with an error that names
//! both versions, so mixed-version meshes fail loudly instead of misreading each other.
//!
//! ```text
//! PullRequest                [2, space, have, max_events, max_bytes, [policy, version]]
//! PullResponse::Events       [2, 0, batch, done, have]
//! PullResponse::Refused      [2, 1, reason]
//! PullResponse::Incompatible [2, 2, [policy, version]]
//! ```
//!
//! `batch` is a byte string holding the page's events as one compact batch
//! ([`weft_crdt::compact`]: node ids once per page, each event coded against the previous
//! event of its origin). Version 1 sent them as an array of canonical events; nothing
//! else changed.
//!
//! Decoding checks the size limit before parsing; a page's events are bounded, in their
//! canonical encoding, by the same limit as the response, and each is structurally
//! validated ([`weft_crdt::Event::validate`]); signatures are the node's job.

use std::fmt;

use serde::de::{self, IgnoredAny, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_bytes::{ByteBuf, Bytes};
use thiserror::Error;
use weft_crdt::compact::{self, BatchEncoder, BatchError};
use weft_crdt::{Event, PolicyIdentity, SpaceName, VersionVector};

/// The wire version of every `/weft/sync/1` message this build reads and writes.
pub const SYNC_VERSION: u64 = 2;

const TAG_EVENTS: u8 = 0;
const TAG_REFUSED: u8 = 1;
const TAG_INCOMPATIBLE: u8 = 2;

/// Asks a peer for the events of `space` that `have` lacks.
#[derive(Clone, Debug, PartialEq)]
pub struct PullRequest {
    /// The space to pull from.
    pub space: SpaceName,
    /// What the requester already has; the responder sends what is beyond it.
    pub have: VersionVector,
    /// Most events the responder should put in one response.
    pub max_events: u32,
    /// Most encoded event bytes the responder should put in one response.
    pub max_bytes: u32,
    /// The requester's conflict policy for the space. Replicas with different policies
    /// would read the same events differently, so the responder refuses to serve a
    /// requester whose policy differs from its own.
    pub policy: PolicyIdentity,
}

/// A peer's answer to a [`PullRequest`].
#[derive(Clone, Debug, PartialEq)]
pub enum PullResponse {
    /// A page of events in causal order.
    Events {
        /// The events, in causal order.
        events: Vec<Event>,
        /// True when the responder had nothing more beyond this page.
        done: bool,
        /// The responder's version vector for the space.
        have: VersionVector,
    },
    /// The responder will not serve this request (unknown space, overloaded, ...).
    Refused {
        /// Why, for logs.
        reason: String,
    },
    /// The responder hosts the space with a different conflict policy: the two must
    /// not exchange its events.
    Incompatible {
        /// The responder's policy for the space.
        policy: PolicyIdentity,
    },
}

/// Why a `/weft/sync/1` message could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// The message is over the configured size limit.
    #[error("{what} of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Which message ("sync request" or "sync response").
        what: &'static str,
        /// Its size (for a read: at least this many bytes arrived).
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The bytes are not a message of this protocol (includes unknown versions).
    #[error("malformed {what}: {reason}")]
    Decode {
        /// Which message.
        what: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A response carries an event that is structurally invalid.
    #[error("invalid event in sync response: {0}")]
    InvalidEvent(String),
}

const REQUEST: &str = "sync request";
const RESPONSE: &str = "sync response";

/// Encodes a request, refusing one larger than `limit` bytes.
pub fn encode_request(request: &PullRequest, limit: usize) -> Result<Vec<u8>, WireError> {
    encode(request, REQUEST, limit)
}

/// Encodes a response, refusing one larger than `limit` bytes or whose events, in their
/// canonical encoding, are (the receiver bounds a page's decoded events by its limit).
pub fn encode_response(response: &PullResponse, limit: usize) -> Result<Vec<u8>, WireError> {
    let wire = match response {
        PullResponse::Events { events, done, have } => {
            let mut batch = BatchEncoder::new();
            for e in events {
                batch.push(e);
            }
            if batch.event_bytes() > limit {
                return Err(WireError::TooLarge {
                    what: RESPONSE,
                    size: batch.event_bytes(),
                    limit,
                });
            }
            WireResponse::Events {
                batch: ByteBuf::from(batch.finish()),
                done: *done,
                have: have.clone(),
            }
        }
        PullResponse::Refused { reason } => WireResponse::Refused {
            reason: reason.clone(),
        },
        PullResponse::Incompatible { policy } => WireResponse::Incompatible {
            policy: policy.clone(),
        },
    };
    encode(&wire, RESPONSE, limit)
}

/// Decodes a request of at most `limit` bytes.
pub fn decode_request(bytes: &[u8], limit: usize) -> Result<PullRequest, WireError> {
    decode(bytes, REQUEST, limit)
}

/// Decodes a response of at most `limit` bytes, whose events take at most `limit` bytes
/// in their canonical encoding, and validates the structure of each event.
pub fn decode_response(bytes: &[u8], limit: usize) -> Result<PullResponse, WireError> {
    Ok(match decode(bytes, RESPONSE, limit)? {
        WireResponse::Events { batch, done, have } => PullResponse::Events {
            events: compact::decode_batch(&batch, limit).map_err(|e| match e {
                BatchError::Event { .. } => WireError::InvalidEvent(e.to_string()),
                other => WireError::Decode {
                    what: RESPONSE,
                    reason: other.to_string(),
                },
            })?,
            done,
            have,
        },
        WireResponse::Refused { reason } => PullResponse::Refused { reason },
        WireResponse::Incompatible { policy } => PullResponse::Incompatible { policy },
    })
}

fn encode<T: Serialize>(value: &T, what: &'static str, limit: usize) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).map_err(|e| WireError::Decode {
        what,
        reason: format!("cannot encode: {e}"),
    })?;
    if out.len() > limit {
        return Err(WireError::TooLarge {
            what,
            size: out.len(),
            limit,
        });
    }
    Ok(out)
}

fn decode<T: for<'de> Deserialize<'de>>(
    bytes: &[u8],
    what: &'static str,
    limit: usize,
) -> Result<T, WireError> {
    if bytes.len() > limit {
        return Err(WireError::TooLarge {
            what,
            size: bytes.len(),
            limit,
        });
    }
    if bytes.is_empty() {
        return Err(WireError::Decode {
            what,
            reason: "the stream ended before any message arrived".into(),
        });
    }
    ciborium::from_reader(bytes).map_err(|e| WireError::Decode {
        what,
        reason: match e {
            ciborium::de::Error::Semantic(_, msg) => msg,
            ciborium::de::Error::Syntax(at) => format!("invalid CBOR at byte {at}"),
            ciborium::de::Error::Io(e) => format!("truncated or unreadable CBOR: {e}"),
            ciborium::de::Error::RecursionLimitExceeded => "CBOR nested too deeply".into(),
        },
    })
}

fn check_version<'de, A: SeqAccess<'de>>(seq: &mut A) -> Result<(), A::Error> {
    let version: u64 = seq
        .next_element()?
        .ok_or_else(|| de::Error::custom("empty message: missing the version"))?;
    if version != SYNC_VERSION {
        return Err(de::Error::custom(format!(
            "unsupported sync message version {version} (this build speaks version {SYNC_VERSION})"
        )));
    }
    Ok(())
}

fn field<'de, A: SeqAccess<'de>, T: Deserialize<'de>>(
    seq: &mut A,
    name: &str,
) -> Result<T, A::Error> {
    seq.next_element()?
        .ok_or_else(|| de::Error::custom(format!("missing field `{name}`")))
}

fn no_trailing<'de, A: SeqAccess<'de>>(seq: &mut A) -> Result<(), A::Error> {
    match seq.next_element::<IgnoredAny>()? {
        None => Ok(()),
        Some(_) => Err(de::Error::custom("unexpected trailing fields")),
    }
}

impl Serialize for PullRequest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(6)?;
        t.serialize_element(&SYNC_VERSION)?;
        t.serialize_element(&self.space)?;
        t.serialize_element(&self.have)?;
        t.serialize_element(&self.max_events)?;
        t.serialize_element(&self.max_bytes)?;
        t.serialize_element(&(&self.policy.name, self.policy.version))?;
        t.end()
    }
}

impl<'de> Deserialize<'de> for PullRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PullRequest;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a pull request array [version, space, have, max_events, max_bytes, policy]",
                )
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PullRequest, A::Error> {
                check_version(&mut seq)?;
                let request = PullRequest {
                    space: field(&mut seq, "space")?,
                    have: field(&mut seq, "have")?,
                    max_events: field(&mut seq, "max_events")?,
                    max_bytes: field(&mut seq, "max_bytes")?,
                    policy: {
                        let (name, version): (String, u32) = field(&mut seq, "policy")?;
                        PolicyIdentity { name, version }
                    },
                };
                no_trailing(&mut seq)?;
                Ok(request)
            }
        }
        d.deserialize_seq(V)
    }
}

/// A [`PullResponse`] as it is on the wire: the events of a page still encoded as a
/// compact batch, which [`decode_response`] decodes with the response's limit.
enum WireResponse {
    Events {
        batch: ByteBuf,
        done: bool,
        have: VersionVector,
    },
    Refused {
        reason: String,
    },
    Incompatible {
        policy: PolicyIdentity,
    },
}

impl Serialize for WireResponse {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            WireResponse::Events { batch, done, have } => {
                let mut t = s.serialize_tuple(5)?;
                t.serialize_element(&SYNC_VERSION)?;
                t.serialize_element(&TAG_EVENTS)?;
                t.serialize_element(Bytes::new(batch))?;
                t.serialize_element(done)?;
                t.serialize_element(have)?;
                t.end()
            }
            WireResponse::Refused { reason } => {
                let mut t = s.serialize_tuple(3)?;
                t.serialize_element(&SYNC_VERSION)?;
                t.serialize_element(&TAG_REFUSED)?;
                t.serialize_element(reason)?;
                t.end()
            }
            WireResponse::Incompatible { policy } => {
                let mut t = s.serialize_tuple(3)?;
                t.serialize_element(&SYNC_VERSION)?;
                t.serialize_element(&TAG_INCOMPATIBLE)?;
                t.serialize_element(&(&policy.name, policy.version))?;
                t.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for WireResponse {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = WireResponse;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a pull response array [version, kind, ...]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<WireResponse, A::Error> {
                check_version(&mut seq)?;
                let tag: u8 = field(&mut seq, "kind")?;
                let response = match tag {
                    TAG_EVENTS => WireResponse::Events {
                        batch: field(&mut seq, "events")?,
                        done: field(&mut seq, "done")?,
                        have: field(&mut seq, "have")?,
                    },
                    TAG_REFUSED => WireResponse::Refused {
                        reason: field(&mut seq, "reason")?,
                    },
                    TAG_INCOMPATIBLE => {
                        let (name, version): (String, u32) = field(&mut seq, "policy")?;
                        WireResponse::Incompatible {
                            policy: PolicyIdentity { name, version },
                        }
                    }
                    other => {
                        return Err(de::Error::custom(format!(
                            "unknown pull response kind {other}"
                        )))
                    }
                };
                no_trailing(&mut seq)?;
                Ok(response)
            }
        }
        d.deserialize_seq(V)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use weft_crdt::{Hlc, NodeId, Op, SigningKey, UnsignedEvent, VectorClock};

    pub(crate) fn sample_events(n: u64, payload: usize) -> Vec<Event> {
        let key = SigningKey::from_bytes(&[5; 32]);
        let origin = NodeId::of(&key);
        let space = SpaceName::default_space();
        let mut prev = None;
        (1..=n)
            .map(|seq| {
                let mut clock = VectorClock::new();
                clock.set(origin, seq);
                let e = UnsignedEvent {
                    origin,
                    seq,
                    clock,
                    hlc: Hlc::new(1_700_000_000_000 + seq, 0),
                    key: format!("todos/{seq}"),
                    op: Op::Put,
                    kind: "TodoAdded".into(),
                    payload: vec![0x41; payload],
                    meta: Default::default(),
                    prev,
                }
                .sign(&space, &key);
                prev = Some(e.hash());
                e
            })
            .collect()
    }

    fn request() -> PullRequest {
        let mut have = VersionVector::new();
        have.set(NodeId::from_bytes([9; 32]), 7);
        PullRequest {
            space: SpaceName::new("todo").unwrap(),
            have,
            max_events: 500,
            max_bytes: 1 << 20,
            policy: PolicyIdentity {
                name: "lww".into(),
                version: 1,
            },
        }
    }

    const LIMIT: usize = 1 << 20;

    #[test]
    fn request_round_trips() {
        let r = request();
        let bytes = encode_request(&r, LIMIT).unwrap();
        assert_eq!(decode_request(&bytes, LIMIT).unwrap(), r);
    }

    #[test]
    fn responses_round_trip() {
        let events = sample_events(3, 20);
        let mut have = VersionVector::new();
        have.set(events[0].origin, 3);
        for r in [
            PullResponse::Events {
                events,
                done: true,
                have,
            },
            PullResponse::Events {
                events: vec![],
                done: false,
                have: VersionVector::new(),
            },
            PullResponse::Refused {
                reason: "unknown space".into(),
            },
            PullResponse::Incompatible {
                policy: PolicyIdentity {
                    name: "multi".into(),
                    version: 2,
                },
            },
        ] {
            let bytes = encode_response(&r, LIMIT).unwrap();
            assert_eq!(decode_response(&bytes, LIMIT).unwrap(), r);
        }
    }

    #[test]
    fn unknown_version_is_rejected_with_a_clear_error() {
        // A version 1 request (the previous wire version) names both versions.
        let r = request();
        let mut bytes = Vec::new();
        ciborium::into_writer(
            &(
                1u64,
                &r.space,
                &r.have,
                r.max_events,
                r.max_bytes,
                (&r.policy.name, r.policy.version),
            ),
            &mut bytes,
        )
        .unwrap();
        let err = decode_request(&bytes, LIMIT).unwrap_err().to_string();
        assert!(
            err.contains("version 1") && err.contains("speaks version 2"),
            "{err}"
        );

        let mut bytes = Vec::new();
        ciborium::into_writer(&(9u64, 1u8, "nope"), &mut bytes).unwrap();
        let err = decode_response(&bytes, LIMIT).unwrap_err().to_string();
        assert!(err.contains("version 9"), "{err}");

        // A version 1 page (canonical events in an array) is refused the same way.
        let events = sample_events(2, 8);
        let mut bytes = Vec::new();
        ciborium::into_writer(
            &(1u64, TAG_EVENTS, &events, true, VersionVector::new()),
            &mut bytes,
        )
        .unwrap();
        let err = decode_response(&bytes, LIMIT).unwrap_err().to_string();
        assert!(err.contains("version 1"), "{err}");
    }

    #[test]
    fn a_page_is_smaller_than_its_events_in_canonical_form() {
        let events = sample_events(100, 20);
        let canonical: usize = events.iter().map(|e| e.encode().len()).sum();
        let bytes = encode_response(
            &PullResponse::Events {
                events,
                done: true,
                have: VersionVector::new(),
            },
            LIMIT,
        )
        .unwrap();
        assert!(
            bytes.len() * 3 < canonical * 2,
            "{} vs {canonical}",
            bytes.len()
        );
    }

    #[test]
    fn a_page_whose_events_exceed_the_limit_is_refused_both_ways() {
        let events = sample_events(40, 100);
        let canonical: usize = events.iter().map(|e| e.encode().len()).sum();
        let r = PullResponse::Events {
            events,
            done: true,
            have: VersionVector::new(),
        };
        let limit = canonical - 1;
        let err = encode_response(&r, limit).unwrap_err();
        assert!(matches!(err, WireError::TooLarge { .. }), "{err}");
        // The compact page itself fits easily; its events decode past the limit.
        let bytes = encode_response(&r, LIMIT).unwrap();
        assert!(bytes.len() < limit);
        let err = decode_response(&bytes, limit).unwrap_err().to_string();
        assert!(
            err.contains(&format!("more than {limit} bytes of events")),
            "{err}"
        );
        assert_eq!(decode_response(&bytes, canonical).unwrap(), r);
    }

    #[test]
    fn garbage_and_trailing_fields_are_rejected() {
        assert!(decode_request(b"\xff\x00garbage", LIMIT).is_err());
        assert!(decode_response(&[], LIMIT).is_err());
        let r = request();
        let mut bytes = Vec::new();
        ciborium::into_writer(
            &(
                SYNC_VERSION,
                &r.space,
                &r.have,
                r.max_events,
                r.max_bytes,
                (&r.policy.name, r.policy.version),
                0u8,
            ),
            &mut bytes,
        )
        .unwrap();
        let err = decode_request(&bytes, LIMIT).unwrap_err().to_string();
        assert!(err.contains("trailing"), "{err}");
    }

    #[test]
    fn oversize_messages_are_rejected_both_ways() {
        // Payloads are sent as they are: the compact form saves nothing on them.
        let r = PullResponse::Events {
            events: sample_events(4, 4000),
            done: true,
            have: VersionVector::new(),
        };
        let err = encode_response(&r, 8 * 1024).unwrap_err();
        assert!(matches!(err, WireError::TooLarge { .. }), "{err}");
        let bytes = encode_response(&r, LIMIT).unwrap();
        let err = decode_response(&bytes, 8 * 1024).unwrap_err().to_string();
        assert!(err.contains("exceeds the limit of 8192 bytes"), "{err}");
    }

    #[test]
    fn structurally_invalid_events_in_a_response_are_rejected() {
        let mut events = sample_events(1, 4);
        events[0].clock = VectorClock::new(); // the clock must contain origin -> seq
        let r = PullResponse::Events {
            events,
            done: true,
            have: VersionVector::new(),
        };
        let bytes = encode_response(&r, LIMIT).unwrap();
        let err = decode_response(&bytes, LIMIT).unwrap_err();
        assert!(matches!(err, WireError::InvalidEvent(_)), "{err}");
    }
}
