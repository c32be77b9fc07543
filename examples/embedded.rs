//! Two nodes embedded in one process replicate over loopback.
//!
//! `cargo run -p weft-examples --example embedded`

use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use weft_node::{NodeBuilder, SpaceName};

#[tokio::main]
async fn main() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let space = SpaceName::new("todo")?;

    let alice = NodeBuilder::new(dir.path().join("alice"))
        .space(space.clone())
        .mdns(false)
        .listen("/ip4/127.0.0.1/tcp/0".parse()?)
        .start()
        .await?;
    let alice_addr = alice
        .listen_addrs()
        .await?
        .into_iter()
        .next()
        .context("alice is not listening")?;

    let bob = NodeBuilder::new(dir.path().join("bob"))
        .space(space.clone())
        .mdns(false)
        .listen("/ip4/127.0.0.1/tcp/0".parse()?)
        .bootstrap(alice_addr)
        .start()
        .await?;
    let mut bob_sees = Box::pin(bob.subscribe(&space));

    alice.put(&space, "todos/1", &"buy milk").await?;
    let applied = tokio::time::timeout(Duration::from_secs(30), bob_sees.next())
        .await
        .context("bob did not receive the write in time")?
        .context("bob's subscription ended")?;
    println!(
        "bob applied {} at lsn {}: {} = {:?}",
        applied.event.id(),
        applied.lsn,
        applied.event.key,
        bob.get(&space, "todos/1").await?.map(|r| r.value.to_json())
    );

    alice.shutdown().await;
    bob.shutdown().await;
    Ok(())
}
