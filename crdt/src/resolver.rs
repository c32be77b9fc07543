use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use thiserror::Error;

use crate::event::{Event, Op};

/// What a read of one key returns, as decided by a [`Resolver`] from the key's frontier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution<'a> {
    /// The event whose payload is the value; `None` when the key reads as absent
    /// (deleted, or never written).
    pub value: Option<&'a Event>,
    /// When the resolver leaves a conflict unresolved, every concurrent value (the
    /// puts of the frontier, ordered by `(hlc, origin)`); otherwise empty.
    pub siblings: Vec<&'a Event>,
}

/// Decides what a key reads as when its frontier holds concurrent events.
///
/// Must be deterministic and depend only on the frontier's contents, not its order, so
/// that every replica reads the same value from the same set of events.
pub trait Resolver: Send + Sync + fmt::Debug {
    /// Stable name, recorded per space (`"lww"`, `"multi"`).
    fn name(&self) -> &str;
    /// Version of the rule; a change of rule must change it.
    fn version(&self) -> u32 {
        1
    }
    /// Resolves a non-empty frontier.
    fn resolve<'a>(&self, frontier: &[&'a Event]) -> Resolution<'a>;
}

/// `(hlc, origin)`: the total order last-writer-wins decides by.
fn lww_key(e: &Event) -> (crate::Hlc, crate::NodeId) {
    (e.hlc, e.origin)
}

/// Last-writer-wins: of concurrent events, the one with the greatest `(hlc, origin)`
/// decides; if it is a delete, the key reads as absent.
///
/// **Put vs delete:** a put and a delete that are concurrent are ordered like any two
/// writes, by `(hlc, origin)`, and the later one wins.
#[derive(Debug, Clone, Copy, Default)]
pub struct LastWriterWins;

impl Resolver for LastWriterWins {
    fn name(&self) -> &str {
        "lww"
    }
    fn resolve<'a>(&self, frontier: &[&'a Event]) -> Resolution<'a> {
        let winner = frontier.iter().copied().max_by_key(|e| lww_key(e));
        Resolution {
            value: winner.filter(|e| e.op == Op::Put),
            siblings: Vec::new(),
        }
    }
}

/// Multi-value: concurrent puts are all kept as siblings until a write that has seen
/// them all supersedes them. A put concurrent with a delete survives; the key reads as
/// absent only when every frontier event is a delete. `value` is the sibling
/// last-writer-wins would pick, for readers that want one value.
///
/// **Put vs delete:** a put concurrent with a delete survives it, and the key reads as
/// absent only when every concurrent write is a delete.
#[derive(Debug, Clone, Copy, Default)]
pub struct MultiValue;

impl Resolver for MultiValue {
    fn name(&self) -> &str {
        "multi"
    }
    fn resolve<'a>(&self, frontier: &[&'a Event]) -> Resolution<'a> {
        let mut puts: Vec<&Event> = frontier
            .iter()
            .copied()
            .filter(|e| e.op == Op::Put)
            .collect();
        puts.sort_by_key(|e| lww_key(e));
        let value = puts.last().copied();
        Resolution {
            value,
            siblings: if puts.len() > 1 { puts } else { Vec::new() },
        }
    }
}

type ResolveFn = dyn for<'a> Fn(&[&'a Event]) -> Resolution<'a> + Send + Sync;

/// A [`Resolver`] made of a closure, for an application that embeds weft and decides
/// conflicts its own way. The closure is held to the [`Resolver`] contract: the same
/// frontier, in any order, must give the same resolution.
///
/// **Put vs delete:** whatever the closure decides; it should state the rule in one
/// sentence as the built-in resolvers do.
#[derive(Clone)]
pub struct FnResolver {
    name: String,
    version: u32,
    resolve: Arc<ResolveFn>,
}

impl FnResolver {
    /// A resolver named `name` (recorded per space and compared between peers, with
    /// `version`) that resolves a non-empty frontier with `resolve`.
    pub fn new(
        name: impl Into<String>,
        version: u32,
        resolve: impl for<'a> Fn(&[&'a Event]) -> Resolution<'a> + Send + Sync + 'static,
    ) -> Self {
        FnResolver {
            name: name.into(),
            version,
            resolve: Arc::new(resolve),
        }
    }
}

impl fmt::Debug for FnResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnResolver")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Resolver for FnResolver {
    fn name(&self) -> &str {
        &self.name
    }
    fn version(&self) -> u32 {
        self.version
    }
    fn resolve<'a>(&self, frontier: &[&'a Event]) -> Resolution<'a> {
        (self.resolve)(frontier)
    }
}

/// The built-in resolvers, by the names `weft run --resolver` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResolverKind {
    /// [`LastWriterWins`].
    #[default]
    Lww,
    /// [`MultiValue`].
    Multi,
}

/// A resolver name that is not built in.
#[derive(Debug, Clone, Error)]
#[error("unknown resolver {0:?}: choose lww or multi")]
pub struct UnknownResolver(pub String);

impl FromStr for ResolverKind {
    type Err = UnknownResolver;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "lww" => Ok(ResolverKind::Lww),
            "multi" => Ok(ResolverKind::Multi),
            other => Err(UnknownResolver(other.to_owned())),
        }
    }
}

impl ResolverKind {
    /// The resolver this kind names.
    pub fn resolver(self) -> Arc<dyn Resolver> {
        match self {
            ResolverKind::Lww => Arc::new(LastWriterWins),
            ResolverKind::Multi => Arc::new(MultiValue),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EventHash, Hlc, NodeId, SpaceName, UnsignedEvent, VectorClock};

    fn ev(origin: u8, hlc: u64, op: Op) -> Event {
        let k = ed25519_dalek::SigningKey::from_bytes(&[origin; 32]);
        let o = NodeId::of(&k);
        let clock: VectorClock = [(o, 1)].into_iter().collect();
        UnsignedEvent {
            origin: o,
            seq: 1,
            clock,
            hlc: Hlc::new(hlc, 0),
            key: "k".into(),
            op,
            kind: String::new(),
            payload: if op == Op::Put { vec![origin] } else { vec![] },
            meta: Default::default(),
            prev: None::<EventHash>,
        }
        .sign(&SpaceName::default_space(), &k)
    }

    #[test]
    fn lww_picks_highest_hlc_then_origin_in_any_order() {
        let a = ev(1, 10, Op::Put);
        let b = ev(2, 20, Op::Put);
        let c = ev(3, 20, Op::Put);
        let want = if c.origin > b.origin { &c } else { &b };
        for order in [[&a, &b, &c], [&c, &b, &a], [&b, &a, &c]] {
            let r = LastWriterWins.resolve(&order);
            assert_eq!(r.value, Some(want));
            assert!(r.siblings.is_empty());
        }
    }

    #[test]
    fn lww_delete_winning_reads_absent() {
        let a = ev(1, 10, Op::Put);
        let d = ev(2, 30, Op::Delete);
        assert_eq!(LastWriterWins.resolve(&[&a, &d]).value, None);
    }

    #[test]
    fn multi_keeps_all_concurrent_puts() {
        let a = ev(1, 10, Op::Put);
        let b = ev(2, 5, Op::Put);
        let d = ev(3, 50, Op::Delete);
        let r = MultiValue.resolve(&[&d, &a, &b]);
        assert_eq!(r.siblings, vec![&b, &a]);
        assert_eq!(r.value, Some(&a));
        assert_eq!(MultiValue.resolve(&[&d]).value, None);
    }

    #[test]
    fn fn_resolver_runs_its_closure() {
        // Smallest origin wins: a rule no built-in resolver has.
        let r = FnResolver::new("first-origin", 3, |f| Resolution {
            value: f.iter().copied().min_by_key(|e| e.origin),
            siblings: Vec::new(),
        });
        let a = ev(1, 10, Op::Put);
        let b = ev(2, 20, Op::Put);
        let want = if a.origin < b.origin { &a } else { &b };
        assert_eq!(r.resolve(&[&a, &b]).value, Some(want));
        assert_eq!((r.name(), r.version()), ("first-origin", 3));
        assert!(format!("{r:?}").contains("first-origin"));
    }

    #[test]
    fn resolver_names_parse() {
        assert_eq!("lww".parse::<ResolverKind>().unwrap(), ResolverKind::Lww);
        assert_eq!(
            "multi".parse::<ResolverKind>().unwrap().resolver().name(),
            "multi"
        );
        assert!("fifo".parse::<ResolverKind>().is_err());
    }
}
