//! Conflict policies across nodes: mismatched resolvers are refused, conflicts are
//! visible, and the mergeable value types converge.

use std::time::Duration;

use std::sync::Arc;

use anyhow::{Context, Result};
use futures::StreamExt;
use weft_crdt::{Event, FnResolver, Resolution};
use weft_node::{Node, Policy, PolicyKind, SpaceName};

use weft_tests::in_process::{eventually, loopback_node, p2p_addr, EVENTUALLY as WAIT};

async fn start(dir: &std::path::Path, policy: Policy) -> Result<Node> {
    loopback_node(dir, |b| b.space_policy(SpaceName::default_space(), policy)).await
}

async fn in_sync(a: &Node, b: &Node, events: u64) -> Result<bool> {
    let s = SpaceName::default_space();
    let va = a.version_vector(&s).await?;
    Ok(va.total() == events && va == b.version_vector(&s).await?)
}

/// Two nodes that wrote while apart, then connected.
async fn pair_after_partition(
    policy: impl Fn() -> Policy,
    writes_a: &[serde_json::Value],
    writes_b: &[serde_json::Value],
    key: &str,
) -> Result<(Node, Node, tempfile::TempDir, tempfile::TempDir)> {
    let (da, db) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let a = start(da.path(), policy()).await?;
    let b = start(db.path(), policy()).await?;
    let space = SpaceName::default_space();
    for v in writes_a {
        a.put(&space, key, v).await?;
    }
    for v in writes_b {
        b.put(&space, key, v).await?;
    }
    b.dial(p2p_addr(&a).await?).await?;
    let total = (writes_a.len() + writes_b.len()) as u64;
    eventually("replicas in sync", || in_sync(&a, &b, total)).await?;
    Ok((a, b, da, db))
}

async fn json_of(node: &Node, key: &str) -> Result<Option<serde_json::Value>> {
    Ok(node
        .get(&SpaceName::default_space(), key)
        .await?
        .map(|r| r.value.to_json()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_resolvers_refuse_each_other_and_change_nothing() -> Result<()> {
    let (da, db) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let a = start(da.path(), PolicyKind::Lww.policy()).await?;
    let b = start(db.path(), PolicyKind::Multi.policy()).await?;
    let space = SpaceName::default_space();
    a.put(&space, "k", "from a").await?;
    b.put(&space, "k", "from b").await?;
    let (va, vb) = (
        a.version_vector(&space).await?,
        b.version_vector(&space).await?,
    );
    b.dial(p2p_addr(&a).await?).await?;

    let refused_by = |n: &Node, other: &Node| {
        let (n, other) = (n.clone(), other.peer_id().to_string());
        async move {
            let st = n.status().await?;
            Ok(st.spaces["default"].incompatible_peers.contains_key(&other))
        }
    };
    eventually("a refuses b", || refused_by(&a, &b)).await?;
    eventually("b refuses a", || refused_by(&b, &a)).await?;
    let st = a.status().await?;
    assert_eq!(
        st.spaces["default"].incompatible_peers[&b.peer_id().to_string()],
        "multi/1"
    );
    // Gossip and anti-entropy keep running; give them several rounds to do harm.
    b.put(&space, "k2", "more from b").await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        a.version_vector(&space).await?,
        va,
        "a's store is unchanged"
    );
    assert_eq!(b.version_vector(&space).await?.total(), vb.total() + 1);
    assert_eq!(json_of(&a, "k").await?, Some("from a".into()));
    assert_eq!(json_of(&b, "k").await?, Some("from b".into()));
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_value_keeps_siblings_counts_and_notifies_conflicts() -> Result<()> {
    let (da, db) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let a = start(da.path(), PolicyKind::Multi.policy()).await?;
    let b = start(db.path(), PolicyKind::Multi.policy()).await?;
    let space = SpaceName::default_space();
    let mut conflicts = Box::pin(a.conflicts(&space));
    a.put(&space, "doc", "a's edit").await?;
    b.put(&space, "doc", "b's edit").await?;
    b.dial(p2p_addr(&a).await?).await?;
    eventually("in sync", || in_sync(&a, &b, 2)).await?;

    let note = tokio::time::timeout(WAIT, conflicts.next())
        .await
        .context("no conflict notification")?
        .context("conflict stream ended")?;
    assert_eq!(note.key, "doc");
    for n in [&a, &b] {
        let r = n.get(&space, "doc").await?.context("doc has a value")?;
        let mut sibs: Vec<String> = r
            .siblings
            .iter()
            .map(|p| p.decode())
            .collect::<Result<_, _>>()?;
        sibs.sort();
        assert_eq!(sibs, ["a's edit", "b's edit"]);
        assert_eq!(r.frontier.len(), 2);
        assert_eq!(n.status().await?.spaces["default"].conflicts, 1);
    }
    // A write that has seen both siblings supersedes them.
    a.put(&space, "doc", "merged").await?;
    eventually("merge replicated", || async {
        Ok(json_of(&b, "doc").await? == Some("merged".into()))
    })
    .await?;
    let r = b.get(&space, "doc").await?.context("doc")?;
    assert!(r.siblings.is_empty());
    assert_eq!(b.status().await?.spaces["default"].conflicts, 0);
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_counter_increments_add_up() -> Result<()> {
    let (a, b, _da, _db) = pair_after_partition(
        || PolicyKind::Counter.policy(),
        &[5.into(), 2.into()],
        &[10.into(), (-1).into()],
        "hits",
    )
    .await?;
    for n in [&a, &b] {
        assert_eq!(json_of(n, "hits").await?, Some(16.into()));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_add_wins_over_concurrent_remove() -> Result<()> {
    use serde_json::json;
    let (a, b, _da, _db) = pair_after_partition(
        || PolicyKind::Set.policy(),
        &[json!({"add": ["x", "y"]})],
        &[
            json!({"add": ["x"]}),
            json!({"remove": ["x"]}),
            json!({"add": ["z"]}),
        ],
        "tags",
    )
    .await?;
    // b removed only the "x" it had seen; a's concurrent add of "x" survives.
    for n in [&a, &b] {
        assert_eq!(json_of(n, "tags").await?, Some(json!(["x", "y", "z"])));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_objects_merge_field_by_field() -> Result<()> {
    use serde_json::json;
    let (a, b, _da, _db) = pair_after_partition(
        || PolicyKind::Json.policy(),
        &[json!({"title": "milk", "done": false})],
        &[json!({"owner": "bob"})],
        "todos/1",
    )
    .await?;
    let want = json!({"title": "milk", "done": false, "owner": "bob"});
    for n in [&a, &b] {
        assert_eq!(json_of(n, "todos/1").await?, Some(want.clone()));
    }
    Ok(())
}

/// An application's own rule, as a closure: of concurrent puts, the shortest value wins
/// (ties by origin). Last-writer-wins would pick by timestamp instead.
fn shortest_wins() -> Policy {
    Policy::Resolve(Arc::new(FnResolver::new(
        "shortest",
        1,
        |frontier: &[&Event]| -> Resolution<'_> {
            let winner = frontier
                .iter()
                .copied()
                .filter(|e| e.op == weft_crdt::Op::Put)
                .min_by_key(|e| (e.payload.len(), e.origin));
            Resolution {
                value: winner,
                siblings: Vec::new(),
            }
        },
    )))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closure_resolver_decides_concurrent_writes_everywhere() -> Result<()> {
    // b writes last, so last-writer-wins would pick b's long value.
    let (a, b, _da, _db) = pair_after_partition(
        shortest_wins,
        &["short".into()],
        &["a much longer value".into()],
        "k",
    )
    .await?;
    for n in [&a, &b] {
        assert_eq!(json_of(n, "k").await?, Some("short".into()));
        assert_eq!(n.status().await?.spaces["default"].resolver, "shortest/1");
    }
    Ok(())
}
