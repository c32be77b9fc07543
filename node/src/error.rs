use std::path::PathBuf;

use thiserror::Error;
use weft_crdt::SpaceName;

/// Everything that can go wrong in a [`crate::Node`].
#[derive(Debug, Error)]
pub enum NodeError {
    /// The write or read was refused because of its input; nothing was stored.
    #[error("{0}")]
    Invalid(String),
    /// The space is not hosted by this node.
    #[error("space {0:?} is not hosted by this node (start it with --space {0})")]
    UnknownSpace(SpaceName),
    /// The space is hosted pull-only (a read replica), which takes no local writes.
    #[error(
        "space {0} is pull-only on this node (a read replica): it takes no local writes; \
         write on a node that hosts it as full or push-only"
    )]
    ReadOnlySpace(SpaceName),
    /// Another process holds the data directory.
    #[error("data directory {0} is in use by another weft process")]
    DataDirInUse(PathBuf),
    /// The identity key file exists but cannot be used.
    #[error("identity key {path}: {reason}")]
    Identity {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The durable log failed.
    #[error("store: {0}")]
    Store(#[from] weft_store::StoreError),
    /// The network layer failed.
    #[error("network: {0}")]
    Net(#[from] weft_net::NetError),
    /// A file or socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The node has shut down.
    #[error("the node has shut down")]
    Closed,
}

impl NodeError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        NodeError::Io {
            context: context.into(),
            source,
        }
    }
}
