//! `weft sync`, `POST /sync` and `Node::sync_now`: after a node was offline, an explicit
//! sync reports the peer it pulled from and how many events, shows its progress, and
//! leaves both version vectors equal.
//!
//! The node that was offline runs with automatic pulls off (`--no-auto-pull`,
//! `NodeBuilder::auto_pull(false)`), so that everything it lacks is left for the sync
//! to pull and the counts are exact.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use weft_node::{Op, SpaceName, SyncProgress, WriteRequest};
use weft_tests::in_process::{eventually, loopback_node, p2p_addr};
use weft_tests::{run_cli, wait_until, WeftProcess, DEFAULT_SPACE};

const CONNECT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(250);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_now_after_being_offline_reports_the_peer_and_the_events_pulled() -> Result<()> {
    /// Events per pull page of the node's sync loop (`SyncConfig::page_events`).
    const PAGE_EVENTS: u64 = 1_000;
    const WRITES: u64 = 2_500;
    const PER_TRANSACTION: u64 = 100;
    let dirs: Vec<_> = (0..2)
        .map(|_| tempfile::tempdir())
        .collect::<Result<_, _>>()?;
    let space = SpaceName::default_space();
    let a = loopback_node(dirs[0].path(), |b| b).await?;

    // B ran once, then was offline while A took writes.
    loopback_node(dirs[1].path(), |b| b.auto_pull(false))
        .await?
        .shutdown()
        .await;
    for t in 0..WRITES / PER_TRANSACTION {
        let writes = (0..PER_TRANSACTION)
            .map(|i| {
                Ok(WriteRequest {
                    key: format!("items/{}", t * PER_TRANSACTION + i),
                    op: Op::Put,
                    value: Some(weft_node::Payload::encode(&i)?),
                    kind: String::new(),
                    meta: Default::default(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        a.transact(&space, writes).await?;
    }
    let a_addr = p2p_addr(&a).await?;
    let b = loopback_node(dirs[1].path(), |b| b.auto_pull(false).bootstrap(a_addr)).await?;
    let a_peer = a.peer_id().to_string();
    eventually("B is connected to A", || async {
        Ok(b.status().await?.peers.contains(&a_peer))
    })
    .await?;
    assert_eq!(b.version_vector(&space).await?.total(), 0);

    let mut progress: Vec<SyncProgress> = Vec::new();
    let report = b
        .sync_now_with_progress(|p| progress.push(p.clone()))
        .await?;
    let exchange = report
        .peers
        .get(&a_peer)
        .and_then(|s| s.get("default"))
        .with_context(|| format!("the report names no exchange with A: {report:?}"))?;
    assert_eq!(exchange.pulled, WRITES, "{report:?}");
    assert_eq!(exchange.error, None);
    assert!(exchange.pages >= WRITES / PAGE_EVENTS, "{report:?}");
    assert!(exchange.bytes > 0);
    assert_eq!(exchange.peer_lacks, Some(0));
    assert_eq!(report.pulled, WRITES);
    assert_eq!(report.errors, 0);
    assert_eq!(report.connected_peers, 1);
    assert!(!report.timed_out);
    assert_eq!(
        b.version_vector(&space).await?,
        a.version_vector(&space).await?
    );

    // Progress only grows and ends at the whole, which the peer's vector announced.
    let last = progress.last().context("no progress was reported")?;
    assert_eq!((last.applied, last.expected), (WRITES, WRITES));
    assert_eq!((last.exchanges_done, last.exchanges), (1, 1));
    assert!(progress.windows(2).all(|w| w[0].applied <= w[1].applied));

    let json = serde_json::to_value(&report)?;
    assert_eq!(json["peers"][&a_peer]["default"]["pulled"], json!(WRITES));

    // Both sides' status counts the exchange.
    let (tb, ta) = (b.status().await?.traffic, a.status().await?.traffic);
    assert!(tb.pulls_sent >= exchange.pages, "{tb:?}");
    assert!(tb.events_pulled >= WRITES, "{tb:?}");
    // The report counts the events' canonical bytes; the wire carries them compactly.
    assert!(
        tb.bytes_in > 0 && tb.bytes_in > ta.bytes_in,
        "{tb:?}, A: {ta:?}"
    );
    assert!(ta.events_served >= WRITES, "{ta:?}");
    assert!(ta.pulls_served >= exchange.pages, "{ta:?}");

    // Nothing is left to pull.
    let again = b.sync_now().await?;
    assert_eq!(again.peers[&a_peer]["default"].pulled, 0);
    assert_eq!(again.errors, 0);

    b.shutdown().await;
    a.shutdown().await;
    Ok(())
}

/// `weft sync --json`, parsed; fails the test unless it exits 0.
async fn sync_json(node: &WeftProcess) -> Value {
    let out = node.cli_ok(&["sync", "--json"]).await;
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| node.fail(format!("weft sync --json is not JSON ({e}): {out}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_sync_after_being_offline_names_the_peer_and_the_count() {
    const WRITES: u64 = 600;
    let a = WeftProcess::start().await;
    let mut b = WeftProcess::builder()
        .arg("--no-auto-pull")
        .bootstrap(a.listen_addr())
        .start()
        .await;
    let a_id = a.peer_id().to_owned();
    wait_until("B is connected to A", CONNECT, POLL, async || {
        b.peers().await.contains(&a_id)
    })
    .await;

    b.stop().await;
    for t in 0..WRITES / 200 {
        let writes: Vec<(String, String)> = (0..200)
            .map(|i| (format!("items/{}", t * 200 + i), i.to_string()))
            .collect();
        a.tx_put(DEFAULT_SPACE, &writes).await;
    }
    b.start_again().await;
    wait_until("B is connected to A again", CONNECT, POLL, async || {
        b.peers().await.contains(&a_id)
    })
    .await;
    assert_eq!(b.event_count(DEFAULT_SPACE).await, 0);

    let report = sync_json(&b).await;
    assert_eq!(
        report.pointer(&format!("/peers/{a_id}/default/pulled")),
        Some(&json!(WRITES)),
        "{report}"
    );
    assert_eq!(report["pulled"], json!(WRITES));
    assert_eq!(report["errors"], json!(0));
    let status = b.http(reqwest::Method::GET, "/status", None).await.json();
    let pulled = status
        .pointer("/traffic/events_pulled")
        .and_then(Value::as_u64);
    assert!(pulled.is_some_and(|n| n >= WRITES), "{status}");
    let out = b.cli_ok(&["status"]).await;
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("traffic: ") && l.contains("pulled")),
        "{out}"
    );
    assert_eq!(
        b.version_vector(DEFAULT_SPACE).await,
        a.version_vector(DEFAULT_SPACE).await
    );

    // The human table names the peer; stderr is no terminal here, so no progress bar.
    let out = b.cli_ok(&["sync"]).await;
    assert!(out.stdout.contains(&a_id), "{out}");
    assert!(out.stdout.contains("0 events pulled"), "{out}");
    assert!(out.stderr.is_empty(), "{out}");

    // The streaming API: progress lines, then the report.
    let reply = b
        .http(reqwest::Method::POST, "/sync?progress=1", None)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let lines: Vec<Value> = reply
        .body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    let (last, before) = lines.split_last().expect("at least the report line");
    assert!(last.get("report").is_some(), "{}", reply.body);
    assert!(
        before.iter().all(|l| l.get("progress").is_some()),
        "{}",
        reply.body
    );
    let plain = b.http(reqwest::Method::POST, "/sync", None).await;
    assert_eq!(plain.status, 200, "{}", plain.body);
    assert!(plain.json()["peers"].get(&a_id).is_some(), "{}", plain.body);
    let bad = b
        .http(reqwest::Method::POST, "/sync?progress=maybe", None)
        .await;
    assert_eq!(bad.status, 400, "{}", bad.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_sync_fails_in_one_line_without_a_peer_or_a_node() {
    let lone = WeftProcess::start().await;
    let out = lone.cli(&["sync"]).await;
    assert_eq!(out.code(), Some(1), "{out}");
    assert_eq!(
        out.stderr_lines(),
        ["error: no connected peer to sync with"],
        "{out}"
    );

    let out = lone.cli(&["sync", "--json"]).await;
    assert_eq!(out.code(), Some(1), "{out}");
    let report: Value = serde_json::from_str(&out.stdout).expect("--json prints the report");
    assert_eq!(report["connected_peers"], json!(0));

    let nowhere = run_cli(None, ["sync", "--api", "127.0.0.1:1"]).await;
    assert!(!nowhere.success(), "{nowhere}");
    assert_eq!(nowhere.stderr_lines().len(), 1, "{nowhere}");
    assert!(nowhere.stderr.contains("cannot reach"), "{nowhere}");
}
