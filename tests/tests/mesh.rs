//! A mesh from bootstrap addresses alone (issue 5), at node level: six embedded nodes on
//! 127.0.0.1 (port 0, mDNS off), each given only the previous node's address, end up
//! each connected to at least four others, and a write on the last node is readable on
//! the first. (`net/tests/discovery.rs` shows the same for bare `weft-net` clients.)

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use weft_node::{Node, SpaceName};
use weft_tests::in_process::{eventually, loopback_node, p2p_addr};

const NODES: usize = 6;
const MIN_PEERS: usize = 4;
/// How long discovery may take: Kademlia's first lookup runs about half a second after
/// a node's first connection, but a loaded 2-core machine runs six nodes and other tests.
const MESH_WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(200);

/// How many of `others` each node lists among its connected peers.
async fn peer_counts(nodes: &[Node], others: &HashSet<String>) -> Result<Vec<usize>> {
    let mut counts = Vec::with_capacity(nodes.len());
    for node in nodes {
        let me = node.peer_id().to_string();
        let peers = node.status().await?.peers;
        counts.push(
            peers
                .iter()
                .filter(|p| **p != me && others.contains(*p))
                .count(),
        );
    }
    Ok(counts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_nodes_chained_by_bootstrap_addresses_form_a_mesh_that_replicates() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut nodes: Vec<Node> = Vec::with_capacity(NODES);
    for i in 0..NODES {
        let previous = match nodes.last() {
            Some(p) => Some(p2p_addr(p).await?),
            None => None,
        };
        let node = loopback_node(&dir.path().join(format!("node{i}")), |b| match previous {
            Some(addr) => b.bootstrap(addr),
            None => b,
        })
        .await?;
        nodes.push(node);
    }
    let ids: HashSet<String> = nodes.iter().map(|n| n.peer_id().to_string()).collect();

    // Every node knows only its predecessor; discovery must find the rest.
    let deadline = tokio::time::Instant::now() + MESH_WAIT;
    loop {
        let counts = peer_counts(&nodes, &ids).await?;
        if counts.iter().all(|&c| c >= MIN_PEERS) {
            eprintln!("peers of each node: {counts:?}");
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "after {MESH_WAIT:?} the nodes are connected to {counts:?} of the others; \
                 each needs {MIN_PEERS}"
            );
        }
        tokio::time::sleep(POLL).await;
    }

    let space = SpaceName::default_space();
    let last = &nodes[NODES - 1];
    let first = &nodes[0];
    let written = last.put(&space, "mesh/hello", "from the last node").await?;
    eventually("the first node reads the last node's write", || async {
        Ok(first.get(&space, "mesh/hello").await?.is_some())
    })
    .await?;
    let record = first
        .get(&space, "mesh/hello")
        .await?
        .context("the value vanished")?;
    assert_eq!(record.value.decode::<String>()?, "from the last node");
    assert_eq!(record.frontier, vec![written.id]);

    for node in nodes {
        node.shutdown().await;
    }
    Ok(())
}
