//! weft-crdt: the pure logic of weft replication.
//!
//! Identifiers ([`NodeId`], [`EventId`], [`SpaceName`]), clocks ([`VectorClock`],
//! [`VersionVector`], [`Hlc`]), the signed, hash-chained [`Event`] with its canonical
//! CBOR encoding, the causal-delivery and frontier rules, and the conflict
//! [`Resolver`]s and mergeable types ([`merge`]), and the sans-I/O synchronisation
//! core ([`sync`]) with an in-memory [`sync::Replica`] that simulations drive.
//!
//! Architecture invariant: this crate does no I/O. It reads no clock (callers pass the
//! wall time in), touches no disk and no socket, and has no tokio dependency, so every
//! rule here can be tested and simulated deterministically.

mod clock;
mod codec;
pub mod compact;
mod error;
mod event;
mod frontier;
mod hlc;
mod id;
pub mod limits;
pub mod merge;
mod policy;
mod resolver;
pub mod sync;

pub use clock::{Causality, VectorClock, VersionVector};
pub use error::{EventError, ParseError};
pub use event::{check_write_fields, Event, EventHash, Op, Readiness, UnsignedEvent};
pub use frontier::Frontier;
pub use hlc::{Hlc, HlcClock};
pub use id::{EventId, NodeId, SpaceName};
pub use merge::{AddWinsSet, Counter, FnMerge, JsonMerge};
pub use policy::{Merge, MergeError, Policy, PolicyIdentity, PolicyKind, UnknownPolicy};
pub use resolver::{
    FnResolver, LastWriterWins, MultiValue, Resolution, Resolver, ResolverKind, UnknownResolver,
};

/// The ed25519 signing key of a node. Its verifying key is the [`NodeId`].
pub use ed25519_dalek::SigningKey;
