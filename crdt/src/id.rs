use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::ParseError;

/// A node's identity: its 32-byte ed25519 public key.
///
/// Displayed in the libp2p peer-id form (`12D3KooW...`), because the same key is the
/// node's libp2p identity: a user sees one name per node in `weft status`, in logs and in
/// version vectors. The encoding is the identity multihash of the protobuf-encoded key,
/// written here directly so this crate needs no libp2p.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId([u8; 32]);

/// identity multihash (0x00), length 36, protobuf: field 1 KeyType=Ed25519 (0x08 0x01),
/// field 2 bytes of length 32 (0x12 0x20).
const PEER_ID_PREFIX: [u8; 6] = [0x00, 0x24, 0x08, 0x01, 0x12, 0x20];

impl NodeId {
    /// Wraps raw public-key bytes. The bytes are checked to be a valid curve point only
    /// when a signature is verified against them.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        NodeId(bytes)
    }

    /// The raw public-key bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The node id of a signing key.
    pub fn of(key: &ed25519_dalek::SigningKey) -> Self {
        NodeId(key.verifying_key().to_bytes())
    }

    /// The bytes of the libp2p `PeerId` for this key (the multihash form).
    pub fn peer_id_bytes(&self) -> [u8; 38] {
        let mut out = [0u8; 38];
        out[..6].copy_from_slice(&PEER_ID_PREFIX);
        out[6..].copy_from_slice(&self.0);
        out
    }

    /// Parses the multihash bytes of an ed25519 libp2p `PeerId`.
    pub fn from_peer_id_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 38 || bytes[..6] != PEER_ID_PREFIX {
            return None;
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&bytes[6..]);
        Some(NodeId(key))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&bs58::encode(self.peer_id_bytes()).into_string())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl FromStr for NodeId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = bs58::decode(s)
            .into_vec()
            .map_err(|_| ParseError::NodeId(s.to_owned()))?;
        NodeId::from_peer_id_bytes(&bytes).ok_or_else(|| ParseError::NodeId(s.to_owned()))
    }
}

impl Serialize for NodeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            let b = serde_bytes::ByteBuf::deserialize(d)?;
            let arr: [u8; 32] = b.as_slice().try_into().map_err(|_| {
                serde::de::Error::custom(format!("node id must be 32 bytes, got {}", b.len()))
            })?;
            Ok(NodeId(arr))
        }
    }
}

/// The id of an event: its origin and its sequence number there (1, 2, 3, ... per origin
/// and space). Displayed as `<node id>:<seq>`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct EventId {
    /// The node that wrote the event.
    pub origin: NodeId,
    /// Its position in the origin's sequence for the space, from 1.
    pub seq: u64,
}

impl EventId {
    /// Builds an id.
    pub const fn new(origin: NodeId, seq: u64) -> Self {
        EventId { origin, seq }
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.origin, self.seq)
    }
}

impl FromStr for EventId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseError::EventId(s.to_owned());
        let (origin, seq) = s.rsplit_once(':').ok_or_else(bad)?;
        let origin: NodeId = origin.parse().map_err(|_| bad())?;
        let seq: u64 = seq.parse().map_err(|_| bad())?;
        if seq == 0 {
            return Err(bad());
        }
        Ok(EventId { origin, seq })
    }
}

/// The name of a space, the unit of replication. Validated when parsed, so every
/// `SpaceName` is safe in a gossip topic (`weft/<space>/events/1`), a URL path and a
/// file name.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct SpaceName(String);

impl SpaceName {
    /// The longest space name, in characters.
    pub const MAX_LEN: usize = 64;

    /// Validates and wraps a name.
    pub fn new(name: impl Into<String>) -> Result<Self, ParseError> {
        let name = name.into();
        let ok = !name.is_empty()
            && name.len() <= Self::MAX_LEN
            && name.as_bytes()[0].is_ascii_alphanumeric()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if ok {
            Ok(SpaceName(name))
        } else {
            Err(ParseError::SpaceName(name))
        }
    }

    /// The space every command uses when none is named.
    pub fn default_space() -> Self {
        SpaceName("default".to_owned())
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SpaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for SpaceName {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpaceName::new(s)
    }
}

impl Serialize for SpaceName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SpaceName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SpaceName::new(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_displays_as_peer_id_and_parses_back() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let id = NodeId::of(&key);
        let s = id.to_string();
        assert!(s.starts_with("12D3KooW"), "{s}");
        assert_eq!(s.parse::<NodeId>().unwrap(), id);
        assert!("12D3KooWnot-base58".parse::<NodeId>().is_err());
    }

    #[test]
    fn event_id_round_trips_and_rejects_seq_zero() {
        let id = EventId::new(NodeId::from_bytes([1; 32]), 42);
        assert_eq!(id.to_string().parse::<EventId>().unwrap(), id);
        let zero = format!("{}:0", id.origin);
        assert!(zero.parse::<EventId>().is_err());
    }

    #[test]
    fn space_names_are_validated() {
        for ok in ["default", "todo", "a", "My_space-1.2"] {
            assert!(SpaceName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", "has/slash", "sp ace", "ünï", &"x".repeat(65)] {
            assert!(SpaceName::new(bad).is_err(), "{bad}");
        }
    }
}
