//! A LAN node: finds its peers by mDNS, writes a greeting, and prints every event it
//! applies. Run it on two machines of one LAN (or in two network namespaces).
//!
//! `cargo run -p weft-examples --example lan -- ./lan-data`

use anyhow::Result;
use futures::StreamExt;
use weft_node::{NodeBuilder, SpaceName};

#[tokio::main]
async fn main() -> Result<()> {
    let data = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "./lan-data".into());
    let node = NodeBuilder::new(data).mdns(true).start().await?;
    let space = SpaceName::default_space();
    println!("peer {}", node.peer_id());
    let mut applied = Box::pin(node.subscribe(&space));
    node.put(&space, &format!("hello/{}", node.peer_id()), &"hi")
        .await?;
    loop {
        tokio::select! {
            a = applied.next() => match a {
                Some(a) => println!("{} {} {} {}", a.lsn, a.event.id(), a.event.op, a.event.key),
                None => break,
            },
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    node.shutdown().await;
    Ok(())
}
