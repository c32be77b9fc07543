//! How a node takes part in replicating each space it hosts.
//!
//! A mode is a choice of this run of the node, not a property of the data: it is not
//! stored, and a node restarted in another mode keeps every event it has. Whatever the
//! mode, a node answers pulls for every space it hosts with the events it holds, and
//! exchanges nothing of a space its peer does not host.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// How a node replicates one space.
///
/// | mode        | local writes | takes events in   | sends events out               |
/// |-------------|--------------|-------------------|--------------------------------|
/// | `full`      | yes          | pull and gossip   | gossip, serves pulls           |
/// | `pull-only` | refused      | pull and gossip   | serves pulls of what it holds  |
/// | `push-only` | yes          | nothing           | gossip, serves pulls           |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SpaceMode {
    /// Writes locally, gossips its writes, pulls and takes gossip in, serves pulls.
    #[default]
    Full,
    /// A read replica: takes events in by pull and gossip and refuses local writes
    /// ([`crate::NodeError::ReadOnlySpace`]). It has no writes of its own to send, but
    /// it serves pulls (and forwards valid gossip) with what it replicated, so a
    /// replica can feed further replicas.
    PullOnly,
    /// A source: its local writes go out by gossip and are served to pullers, but it
    /// takes nothing in. It never pulls the space and ignores the space's gossip
    /// (without forwarding it: peers of a push-only node should be connected to the
    /// writers they need, or receive their events by pull).
    PushOnly,
}

impl SpaceMode {
    /// Every mode, in the order the CLI lists them.
    pub const ALL: [SpaceMode; 3] = [SpaceMode::Full, SpaceMode::PullOnly, SpaceMode::PushOnly];

    /// The name used on the command line and in `/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            SpaceMode::Full => "full",
            SpaceMode::PullOnly => "pull-only",
            SpaceMode::PushOnly => "push-only",
        }
    }

    /// Whether the node appends local writes to the space.
    pub fn takes_local_writes(self) -> bool {
        self != SpaceMode::PullOnly
    }

    /// Whether the node takes peers' events of the space in (pulls it, ingests its
    /// gossip).
    pub fn takes_remote_events(self) -> bool {
        self != SpaceMode::PushOnly
    }
}

impl fmt::Display for SpaceMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A space mode name that is not one of `full`, `pull-only`, `push-only`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown space mode {0:?}: use full, pull-only or push-only")]
pub struct UnknownSpaceMode(pub String);

impl FromStr for SpaceMode {
    type Err = UnknownSpaceMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpaceMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| UnknownSpaceMode(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_round_trip_through_their_names_and_json() {
        for mode in SpaceMode::ALL {
            assert_eq!(mode.as_str().parse::<SpaceMode>(), Ok(mode));
            let json = serde_json::to_string(&mode).unwrap();
            assert_eq!(json, format!("\"{}\"", mode.as_str()));
            assert_eq!(serde_json::from_str::<SpaceMode>(&json).unwrap(), mode);
        }
    }

    #[test]
    fn an_unknown_mode_names_the_valid_ones() {
        let err = "read-only".parse::<SpaceMode>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown space mode \"read-only\": use full, pull-only or push-only"
        );
        assert!("Full".parse::<SpaceMode>().is_err());
    }

    #[test]
    fn only_pull_only_refuses_writes_and_only_push_only_takes_nothing_in() {
        assert!(SpaceMode::Full.takes_local_writes() && SpaceMode::Full.takes_remote_events());
        assert!(!SpaceMode::PullOnly.takes_local_writes());
        assert!(SpaceMode::PullOnly.takes_remote_events());
        assert!(SpaceMode::PushOnly.takes_local_writes());
        assert!(!SpaceMode::PushOnly.takes_remote_events());
    }
}
