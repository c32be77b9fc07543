//! weft-node: the [`Node`] an application embeds, the loop that joins the durable log
//! (`weft-store`) to the network (`weft-net`), and the HTTP API the `weft` command talks
//! to.
//!
//! ```no_run
//! # async fn demo() -> Result<(), weft_node::NodeError> {
//! use weft_node::{NodeBuilder, SpaceName};
//! let node = NodeBuilder::new("./my-app-data").mdns(true).start().await?;
//! let space = SpaceName::default_space();
//! node.put(&space, "todos/1", &"buy milk").await?;
//! let record = node.get(&space, "todos/1").await?;
//! assert!(record.is_some());
//! node.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Architecture invariant: this is the only crate that knows both storage and network.
//! It holds no replication rules of its own beyond *when* to pull and push; what to send
//! and what is ready to apply are decided by `weft-store` and `weft-crdt`.

mod api;
mod error;
mod identity;
mod mode;
mod node;
mod payload;
mod sync;
mod sync_now;

pub use api::serve as serve_api;
pub use error::NodeError;
pub use mode::{SpaceMode, UnknownSpaceMode};
pub use node::{
    Conflict, Node, NodeBuilder, NodeStatus, PeerSyncStatus, Record, SpaceStatus, TrafficStatus,
    WriteRequest, Written,
};
pub use payload::Payload;
pub use sync_now::{ExchangeReport, SyncProgress, SyncReport};
pub use weft_crdt::{
    EventId, Merge, NodeId, Op, Policy, PolicyIdentity, PolicyKind, Resolver, SpaceName,
};
pub use weft_net::{Multiaddr, PeerId};
pub use weft_store::{Applied, Durability, EventPage, EventQuery, Start};
