//! Nodes embedded in the test process, on loopback with mDNS off.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use weft_node::{Multiaddr, Node, NodeBuilder};

/// How long [`eventually`] waits.
pub const EVENTUALLY: Duration = Duration::from_secs(30);

/// Starts a node in `dir` listening on `127.0.0.1:0`, mDNS off, anti-entropy every
/// second; `configure` adds anything else (bootstrap addresses, policies, an API).
pub async fn loopback_node(
    dir: &Path,
    configure: impl FnOnce(NodeBuilder) -> NodeBuilder,
) -> Result<Node> {
    let builder = NodeBuilder::new(dir)
        .mdns(false)
        .listen("/ip4/127.0.0.1/tcp/0".parse()?)
        .anti_entropy_interval(Duration::from_secs(1));
    Ok(configure(builder).start().await?)
}

/// The node's first listen address with its `/p2p/<peer id>`, ready to dial.
pub async fn p2p_addr(node: &Node) -> Result<Multiaddr> {
    let addr = node
        .listen_addrs()
        .await?
        .into_iter()
        .next()
        .context("the node has no listen address")?;
    Ok(format!("{addr}/p2p/{}", node.peer_id()).parse()?)
}

/// Polls `check` every 100 ms until it holds, failing after [`EVENTUALLY`] with `what`.
pub async fn eventually<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {EVENTUALLY:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
