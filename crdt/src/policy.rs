//! How a space decides what a key reads as: a [`Resolver`] choosing among the concurrent
//! events of the key's frontier, or a [`Merge`] folding every event of the key into a
//! state whose operations commute.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use thiserror::Error;

use crate::event::{Event, Op};
use crate::resolver::{LastWriterWins, MultiValue, Resolver};

/// A payload or state a merge function cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0}")]
pub struct MergeError(pub String);

/// A mergeable value type: every event of a key is folded into the key's state.
///
/// Contract (checked by the convergence property tests): `apply` is deterministic, and
/// applying causally ready events in any order consistent with causality gives the same
/// state. Events are applied exactly once each, in causal order, so ops only need to
/// commute when they are concurrent.
pub trait Merge: Send + Sync + fmt::Debug {
    /// Stable name, recorded per space.
    fn name(&self) -> &str;
    /// Version of the rule; a change of rule must change it.
    fn version(&self) -> u32 {
        1
    }
    /// Checks a local write before it is signed, so a malformed op is refused with a
    /// clear error instead of being replicated.
    fn check(&self, op: Op, payload: &[u8]) -> Result<(), MergeError>;
    /// Folds a causally ready event into the key's state (`None`: the key has none yet).
    fn apply(&self, state: Option<&[u8]>, event: &Event) -> Result<Vec<u8>, MergeError>;
    /// The value the state reads as (CBOR), or `None` when the key reads as absent.
    fn read(&self, state: &[u8]) -> Result<Option<Vec<u8>>, MergeError>;
}

/// A space's conflict policy.
#[derive(Clone, Debug)]
pub enum Policy {
    /// Reads pass the key's frontier through a resolver.
    Resolve(Arc<dyn Resolver>),
    /// Every event is folded into a per-key state by a merge function.
    Merge(Arc<dyn Merge>),
}

impl Policy {
    /// `(name, version)`: two replicas of a space exchange events only when these match.
    pub fn identity(&self) -> PolicyIdentity {
        match self {
            Policy::Resolve(r) => PolicyIdentity {
                name: r.name().to_owned(),
                version: r.version(),
            },
            Policy::Merge(m) => PolicyIdentity {
                name: m.name().to_owned(),
                version: m.version(),
            },
        }
    }
}

/// The name and version of a space's policy, as recorded in the store and compared
/// between peers.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PolicyIdentity {
    /// e.g. `"lww"`, `"multi"`, `"counter"`.
    pub name: String,
    /// The rule's version.
    pub version: u32,
}

impl fmt::Display for PolicyIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.name, self.version)
    }
}

/// The built-in policies, by the names `weft run --resolver` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PolicyKind {
    /// Last-writer-wins by `(hlc, origin)`.
    #[default]
    Lww,
    /// Concurrent puts kept as siblings.
    Multi,
    /// A counter: puts carry integer increments that add up.
    Counter,
    /// An add-wins set of values.
    Set,
    /// A JSON object merged field by field (each field last-writer-wins).
    Json,
}

/// A policy name that is not built in.
#[derive(Debug, Clone, Error)]
#[error("unknown resolver {0:?}: choose lww, multi, counter, set or json")]
pub struct UnknownPolicy(pub String);

impl FromStr for PolicyKind {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "lww" => PolicyKind::Lww,
            "multi" => PolicyKind::Multi,
            "counter" => PolicyKind::Counter,
            "set" => PolicyKind::Set,
            "json" => PolicyKind::Json,
            other => return Err(UnknownPolicy(other.to_owned())),
        })
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl PolicyKind {
    /// Every built-in policy, in the order the CLI lists them.
    pub const ALL: [PolicyKind; 5] = [
        PolicyKind::Lww,
        PolicyKind::Multi,
        PolicyKind::Counter,
        PolicyKind::Set,
        PolicyKind::Json,
    ];

    /// The name `--resolver` takes and [`Policy::identity`] records: `"lww"`, `"multi"`,
    /// `"counter"`, `"set"` or `"json"`.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Lww => "lww",
            PolicyKind::Multi => "multi",
            PolicyKind::Counter => "counter",
            PolicyKind::Set => "set",
            PolicyKind::Json => "json",
        }
    }

    /// The policy this kind names.
    pub fn policy(self) -> Policy {
        match self {
            PolicyKind::Lww => Policy::Resolve(Arc::new(LastWriterWins)),
            PolicyKind::Multi => Policy::Resolve(Arc::new(MultiValue)),
            PolicyKind::Counter => Policy::Merge(Arc::new(crate::merge::Counter)),
            PolicyKind::Set => Policy::Merge(Arc::new(crate::merge::AddWinsSet)),
            PolicyKind::Json => Policy::Merge(Arc::new(crate::merge::JsonMerge)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_displays_the_name_it_parses_from_and_records() {
        for kind in PolicyKind::ALL {
            let name = kind.to_string();
            assert_eq!(name.parse::<PolicyKind>().unwrap(), kind);
            assert_eq!(kind.policy().identity().name, name);
        }
        assert!("fifo".parse::<PolicyKind>().is_err());
    }
}
