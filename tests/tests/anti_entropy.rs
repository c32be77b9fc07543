//! Anti-entropy between two nodes that are already in sync costs a few hundred bytes per
//! round, whatever the size of their log: a round is one pull carrying a version vector
//! each way and an empty page, and nothing in it grows with the number of events.
//!
//! Measured with the nodes' traffic counters (every TCP byte, framing included) over a
//! window of anti-entropy rounds with no writes, at two log sizes. Not a timing test:
//! the window is a number of rounds, however long they take.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use weft_net::Traffic;
use weft_node::{Durability, Node, NodeBuilder, Op, Payload, SpaceName, WriteRequest};
use weft_tests::in_process::{eventually, loopback_node, p2p_addr};

/// Anti-entropy period of both nodes: short, so a window of rounds passes quickly.
const ANTI_ENTROPY: Duration = Duration::from_millis(200);
/// Rounds (pull exchanges, both nodes together) per measured window.
const ROUNDS: u64 = 12;
/// Value size of the events: one event is about this plus 200 bytes on the wire.
const VALUE_BYTES: usize = 1024;

struct Window {
    rounds: u64,
    bytes: u64,
    a: Traffic,
    b: Traffic,
}

impl Window {
    fn per_round(&self) -> f64 {
        self.bytes as f64 / self.rounds as f64
    }
}

async fn start(dir: &std::path::Path, bootstrap: Option<weft_node::Multiaddr>) -> Result<Node> {
    loopback_node(dir, |b| {
        let b = b
            .anti_entropy_interval(ANTI_ENTROPY)
            .durability(Durability::relaxed());
        bootstrap.into_iter().fold(b, NodeBuilder::bootstrap)
    })
    .await
}

/// Two nodes holding the same `events` events (written on A), then the traffic of a
/// window of at least [`ROUNDS`] anti-entropy rounds.
async fn window_with_log_of(events: usize) -> Result<Window> {
    let (da, db) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let a = start(da.path(), None).await?;
    let b = start(db.path(), Some(p2p_addr(&a).await?)).await?;
    let result = measure(&a, &b, events).await;
    a.shutdown().await;
    b.shutdown().await;
    result
}

async fn measure(a: &Node, b: &Node, events: usize) -> Result<Window> {
    let space = SpaceName::default_space();
    let value = vec![0x5a; VALUE_BYTES];
    // Eight writers, so building the larger log takes a moment only.
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (a, space, value) = (a.clone(), space.clone(), value.clone());
        tasks.push(tokio::spawn(async move {
            for i in (w..events).step_by(8) {
                let mut payload = Vec::new();
                ciborium::into_writer(&ciborium::Value::Bytes(value.clone()), &mut payload)?;
                a.write(
                    &space,
                    WriteRequest {
                        key: format!("k/{i}"),
                        op: Op::Put,
                        value: Some(Payload(payload)),
                        kind: String::new(),
                        meta: BTreeMap::new(),
                    },
                )
                .await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let total = a.version_vector(&space).await?.total();
    ensure!(total == events as u64, "A has {total} events");
    eventually("B has every event of A", || async {
        Ok(b.version_vector(&space).await?.total() == total)
    })
    .await?;
    // Let catch-up pulls and gossip still in flight finish: two rounds in a row in
    // which no event moves either way.
    let mut quiet = 0;
    let mut last = (a.traffic(), b.traffic());
    eventually("two rounds with no event moving", || {
        let now = (a.traffic(), b.traffic());
        let (da, db) = (now.0.since(&last.0), now.1.since(&last.1));
        last = now;
        let moved = da.events_pulled
            + db.events_pulled
            + da.gossip_events_received
            + db.gossip_events_received;
        if moved > 0 {
            quiet = 0;
        } else {
            quiet += da.pages_received + db.pages_received;
        }
        let done = quiet >= 2;
        async move { Ok(done) }
    })
    .await?;

    let (a0, b0) = (a.traffic(), b.traffic());
    eventually("a window of anti-entropy rounds", || async {
        let rounds = a.traffic().since(&a0).pages_received + b.traffic().since(&b0).pages_received;
        Ok(rounds >= ROUNDS)
    })
    .await?;
    // Both ends count the same connection once the bytes in flight have landed.
    eventually("both ends agree on the bytes between them", || async {
        let (ta, tb) = (a.traffic(), b.traffic());
        Ok(ta.bytes_out == tb.bytes_in && tb.bytes_out == ta.bytes_in)
    })
    .await?;
    let (wa, wb) = (a.traffic().since(&a0), b.traffic().since(&b0));
    Ok(Window {
        rounds: wa.pages_received + wb.pages_received,
        bytes: wa.bytes_out + wb.bytes_out,
        a: wa,
        b: wb,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_entropy_between_synced_nodes_costs_the_same_at_any_log_size() -> Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let small = window_with_log_of(100).await.context("log of 100 events")?;
    let large = window_with_log_of(5_000)
        .await
        .context("log of 5,000 events")?;
    eprintln!(
        "anti-entropy: {:.0} B/round over {} rounds with 100 events, {:.0} B/round over {} \
         rounds with 5,000 events",
        small.per_round(),
        small.rounds,
        large.per_round(),
        large.rounds
    );
    for (w, n) in [(&small, 100), (&large, 5_000)] {
        // Anti-entropy happened, and moved nothing: the nodes were in sync.
        assert!(w.rounds >= ROUNDS, "{n} events: {} rounds", w.rounds);
        assert!(
            w.bytes > 0,
            "{n} events: no bytes moved in {} rounds",
            w.rounds
        );
        for t in [&w.a, &w.b] {
            assert_eq!(t.events_pulled, 0, "{n} events: {t:?}");
            assert_eq!(t.gossip_events_received, 0, "{n} events: {t:?}");
            assert!(t.sync.bytes() > 0, "{n} events: {t:?}");
        }
        // A round is a request and an empty page with a version vector each, and their
        // framing: far less than even one event of this test.
        assert!(
            w.per_round() < VALUE_BYTES as f64,
            "{n} events: {:.0} bytes per round",
            w.per_round()
        );
    }
    // Fifty times the events, the same bytes per round (with room for the odd ping or
    // Kademlia refresh that lands in one window).
    assert!(
        large.per_round() < small.per_round() * 1.5 + 64.0,
        "bytes per round grew with the log: {:.0} with 100 events, {:.0} with 5,000",
        small.per_round(),
        large.per_round()
    );
    Ok(())
}
