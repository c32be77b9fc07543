use thiserror::Error;

/// A string that does not name a valid weft identifier.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseError {
    /// Space names are 1–64 characters of `A-Z a-z 0-9 - _ .`, starting with a letter or digit.
    #[error("invalid space name {0:?}: use 1-64 characters of letters, digits, '-', '_' or '.', starting with a letter or digit")]
    SpaceName(String),
    /// A node id is the base58 peer-id form of an ed25519 public key (`12D3KooW...`).
    #[error("invalid node id {0:?}: expected an ed25519 peer id such as 12D3KooW...")]
    NodeId(String),
    /// An event id is `<node id>:<seq>` with seq >= 1.
    #[error("invalid event id {0:?}: expected <node id>:<seq>")]
    EventId(String),
}

/// Why an event was refused: malformed, over a limit, or not authentic.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EventError {
    /// The bytes are not a CBOR event of a version this build understands.
    #[error("undecodable event: {0}")]
    Decode(String),
    /// A field breaks a documented limit (see [`crate::limits`]).
    #[error("{0}")]
    Limit(String),
    /// The fields contradict each other (for example the clock lacks the event's own seq).
    #[error("malformed event: {0}")]
    Malformed(String),
    /// The ed25519 signature does not match the origin's key over the canonical encoding.
    #[error("bad signature on event {0}")]
    BadSignature(String),
    /// An unsigned event arrived without a later signed event of its origin in the
    /// same batch to vouch for it through the hash chain.
    #[error("event {0} is unsigned and no later signed event of its origin vouches for it")]
    Unsigned(String),
}
