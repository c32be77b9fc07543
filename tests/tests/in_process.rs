//! Several nodes in one process on loopback, joined through bootstrap addresses with
//! mDNS off.

use anyhow::Result;
use weft_node::{Multiaddr, Node, NodeBuilder, SpaceName};
use weft_tests::in_process::{eventually, loopback_node, p2p_addr};

async fn start(dir: &std::path::Path, bootstrap: &[Multiaddr]) -> Result<Node> {
    loopback_node(dir, |b| {
        bootstrap.iter().cloned().fold(b, NodeBuilder::bootstrap)
    })
    .await
}

async fn value(node: &Node, key: &str) -> Result<Option<String>> {
    let space = SpaceName::default_space();
    Ok(match node.get(&space, key).await? {
        Some(r) => Some(r.value.decode::<String>()?),
        None => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_and_agree_on_concurrent_writes() -> Result<()> {
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir())
        .collect::<Result<_, _>>()?;
    let a = start(dirs[0].path(), &[]).await?;
    let a_addr = p2p_addr(&a).await?;
    let b = start(dirs[1].path(), std::slice::from_ref(&a_addr)).await?;
    let b_addr = p2p_addr(&b).await?;
    let c = start(dirs[2].path(), &[b_addr]).await?;
    let nodes = [a, b, c];
    let space = SpaceName::default_space();

    // Writes on each node become readable on all three.
    for (i, n) in nodes.iter().enumerate() {
        n.put(&space, &format!("from/{i}"), &format!("hello from {i}"))
            .await?;
    }
    for n in &nodes {
        for i in 0..nodes.len() {
            let key = format!("from/{i}");
            let want = format!("hello from {i}");
            eventually(&format!("{key} on {}", n.peer_id()), || async {
                Ok(value(n, &key).await?.as_deref() == Some(want.as_str()))
            })
            .await?;
        }
    }

    // Concurrent writes to one key end with the same value everywhere.
    let writes = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let n = n.clone();
            let space = space.clone();
            async move { n.put(&space, "contested", &format!("writer {i}")).await }
        })
        .collect::<Vec<_>>();
    for w in futures::future::join_all(writes).await {
        w?;
    }
    eventually("equal version vectors", || async {
        let first = nodes[0].version_vector(&space).await?;
        let mut same = first.total() == 6;
        for n in &nodes[1..] {
            same &= n.version_vector(&space).await? == first;
        }
        Ok(same)
    })
    .await?;
    let winner = value(&nodes[0], "contested").await?;
    assert!(winner.is_some());
    for n in &nodes[1..] {
        assert_eq!(value(n, "contested").await?, winner);
    }
    for n in nodes {
        n.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_keeps_identity_log_and_state_and_never_reuses_positions() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let space = SpaceName::default_space();
    let (id, last) = {
        let n = start(dir.path(), &[]).await?;
        n.put(&space, "k", "v1").await?;
        let w = n.put(&space, "k", "v2").await?;
        let id = n.node_id();
        n.shutdown().await;
        (id, w)
    };
    // The data directory is free again once every handle is gone.
    let n = start(dir.path(), &[]).await?;
    assert_eq!(n.node_id(), id);
    assert_eq!(value(&n, "k").await?.as_deref(), Some("v2"));
    let w = n.put(&space, "k", "v3").await?;
    assert_eq!(w.id.seq, last.id.seq + 1);
    assert_eq!(w.lsn, last.lsn + 1);
    assert_eq!(n.events_since(&space, 0, 10).await?.len(), 3);
    n.shutdown().await;
    Ok(())
}
