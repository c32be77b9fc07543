//! Spaces and their modes (issue #5): nodes hosting overlapping sets of spaces exchange
//! exactly the spaces both host; a pull-only space is a read replica that refuses local
//! writes, still receives others' and serves what it replicated; a push-only space
//! sends its writes and takes nothing in, not even by an explicit sync.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use weft_crdt::{PolicyKind, SigningKey, VersionVector};
use weft_net::{NetConfig, PullRequest, PullResponse};
use weft_node::{Multiaddr, Node, NodeError, SpaceMode, SpaceName, WriteRequest};
use weft_tests::in_process::{eventually, loopback_node, p2p_addr};
use weft_tests::{run_cli, wait_until, WeftProcess};

const REPLICATION: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(250);

async fn start(dir: &Path, spaces: &[(&str, SpaceMode)], bootstrap: &[Multiaddr]) -> Result<Node> {
    let spaces = spaces
        .iter()
        .map(|(name, mode)| Ok((SpaceName::new(*name)?, *mode)))
        .collect::<Result<Vec<_>>>()?;
    loopback_node(dir, |mut b| {
        for (space, mode) in spaces {
            b = b.space_mode(space, mode);
        }
        for addr in bootstrap {
            b = b.bootstrap(addr.clone());
        }
        b
    })
    .await
}

/// The spaces of a `weft status --json` answer.
fn status_spaces(status: &Value) -> BTreeSet<String> {
    status
        .get("spaces")
        .and_then(Value::as_object)
        .map(|s| s.keys().cloned().collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_overlapping_spaces_hold_exactly_the_spaces_they_host() {
    const WRITES: u64 = 20;
    let a = WeftProcess::builder().space("a").space("b").start().await;
    let b = WeftProcess::builder()
        .space("b")
        .space("c")
        .bootstrap(a.listen_addr())
        .start()
        .await;
    let c = WeftProcess::builder()
        .space("a")
        .space("c")
        .bootstrap(a.listen_addr())
        .bootstrap(b.listen_addr())
        .start()
        .await;
    let mut nodes = [(a, ["a", "b"]), (b, ["b", "c"]), (c, ["a", "c"])];
    let ids: Vec<String> = nodes.iter().map(|(n, _)| n.peer_id().to_owned()).collect();
    for (i, (node, _)) in nodes.iter().enumerate() {
        let others: Vec<&String> = ids
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, id)| id)
            .collect();
        wait_until(
            "every node lists the other two as peers",
            REPLICATION,
            POLL,
            async || {
                let peers = node.peers().await;
                others.iter().all(|o| peers.contains(o))
            },
        )
        .await;
    }

    // Every node writes in every space it hosts.
    for (i, (node, spaces)) in nodes.iter().enumerate() {
        for space in spaces {
            let writes: Vec<(String, String)> = (0..WRITES)
                .map(|k| (format!("{space}/{i}/{k}"), format!("\"from {i}\"")))
                .collect();
            node.tx_put(space, &writes).await;
        }
    }

    // Each space ends on exactly its hosts, with exactly its hosts' events.
    let hosts_of = |space: &str| -> BTreeMap<String, u64> {
        nodes
            .iter()
            .filter(|(_, spaces)| spaces.contains(&space))
            .map(|(n, _)| (n.peer_id().to_owned(), WRITES))
            .collect()
    };
    for (node, spaces) in &nodes {
        for space in spaces {
            let want = hosts_of(space);
            wait_until(
                &format!("{} holds space {space} from both its hosts", node.peer_id()),
                REPLICATION,
                POLL,
                async || node.version_vector(space).await == want,
            )
            .await;
        }
    }
    for (node, spaces) in &nodes {
        let status = node.status().await;
        let hosted: BTreeSet<String> = spaces.iter().map(|s| s.to_string()).collect();
        assert_eq!(status_spaces(&status), hosted, "{status}");
        for space in spaces {
            assert_eq!(node.event_count(space).await, 2 * WRITES);
            assert_eq!(
                status.pointer(&format!("/spaces/{space}/mode")),
                Some(&json!("full"))
            );
        }
    }

    // An explicit sync exchanges, with each peer, only the spaces both host.
    for (node, spaces) in &nodes {
        let out = node.cli_ok(&["sync", "--json"]).await;
        let report: Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| node.fail(format!("sync --json is not JSON ({e}): {out}")));
        assert_eq!(report["errors"], json!(0), "{report}");
        assert_eq!(report["connected_peers"], json!(2), "{report}");
        for (other, other_spaces) in &nodes {
            if other.peer_id() == node.peer_id() {
                continue;
            }
            let shared: BTreeSet<String> = spaces
                .iter()
                .filter(|s| other_spaces.contains(s))
                .map(|s| s.to_string())
                .collect();
            let exchanged: BTreeSet<String> = report["peers"][other.peer_id()]
                .as_object()
                .map(|s| s.keys().cloned().collect())
                .unwrap_or_default();
            assert_eq!(exchanged, shared, "{report}");
        }
    }

    // On disk, each log holds its hosted spaces and nothing else.
    for (node, spaces) in &mut nodes {
        node.stop().await;
        let data = node.data_dir().display().to_string();
        let out = run_cli(None, ["check", "--data", data.as_str()]).await;
        assert!(out.success(), "{out}");
        let mut on_disk: Vec<String> = out
            .stdout_lines()
            .iter()
            .filter(|l| l.starts_with("space "))
            .map(|l| (*l).to_owned())
            .collect();
        on_disk.sort();
        let want: Vec<String> = spaces
            .iter()
            .map(|s| format!("space {s}: {} events, 0 violations", 2 * WRITES))
            .collect();
        assert_eq!(on_disk, want, "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_only_replica_refuses_local_writes_receives_others_and_serves_pulls() -> Result<()> {
    let dirs: Vec<_> = (0..2)
        .map(|_| tempfile::tempdir())
        .collect::<Result<_, _>>()?;
    let todo = SpaceName::new("todo")?;
    let writer = start(dirs[0].path(), &[("todo", SpaceMode::Full)], &[]).await?;
    let replica = start(
        dirs[1].path(),
        &[("todo", SpaceMode::PullOnly)],
        &[p2p_addr(&writer).await?],
    )
    .await?;
    assert_eq!(replica.space_mode(&todo), Some(SpaceMode::PullOnly));

    // Local writes of every form are refused with a clear error, and nothing is stored.
    let refused = |r: Result<(), NodeError>| match r {
        Err(NodeError::ReadOnlySpace(s)) if s == todo => Ok(()),
        Err(e) => bail!("expected a pull-only refusal, got: {e}"),
        Ok(()) => bail!("a pull-only space took a local write"),
    };
    let err = replica.put(&todo, "k", &"v").await.map(drop);
    if let Err(e) = &err {
        assert!(e.to_string().contains("pull-only"), "{e}");
    }
    refused(err)?;
    refused(replica.delete(&todo, "k").await.map(drop))?;
    let write = WriteRequest {
        key: "k".into(),
        op: weft_node::Op::Delete,
        value: None,
        kind: String::new(),
        meta: Default::default(),
    };
    refused(replica.transact(&todo, vec![write]).await.map(drop))?;
    assert_eq!(replica.version_vector(&todo).await?.total(), 0);

    // Others' writes still arrive.
    for i in 0..10 {
        writer.put(&todo, &format!("k{i}"), &i).await?;
    }
    eventually("the replica holds the writer's 10 events", || async {
        let theirs = writer.version_vector(&todo).await?;
        Ok(theirs.total() == 10 && replica.version_vector(&todo).await? == theirs)
    })
    .await?;
    let record = replica.get(&todo, "k3").await?.context("k3 replicated")?;
    assert_eq!(record.value.decode::<i32>()?, 3);
    assert_eq!(
        replica.status().await?.spaces["todo"].mode,
        SpaceMode::PullOnly
    );

    // It serves what it replicated: a bare peer pulls the writer's events from it.
    let mut config = NetConfig::new(SigningKey::from_bytes(&[7; 32]));
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse()?];
    config.mdns = false;
    config.bootstrap = vec![p2p_addr(&replica).await?];
    let (bare, mut net_events) = weft_net::start(config)?;
    // The bare peer answers nothing: the replica's pulls of it fail and are let go.
    let drain = tokio::spawn(async move { while net_events.recv().await.is_some() {} });
    eventually("the bare peer is connected to the replica", || async {
        Ok(bare.connected_peers().await?.contains(&replica.peer_id()))
    })
    .await?;
    let request = |space: SpaceName| PullRequest {
        space,
        have: VersionVector::new(),
        max_events: 1_000,
        max_bytes: 4 * 1024 * 1024,
        policy: PolicyKind::Lww.policy().identity(),
    };
    match bare.pull(replica.peer_id(), request(todo.clone())).await? {
        PullResponse::Events { events, done, have } => {
            assert_eq!(events.len(), 10);
            assert!(done);
            assert!(events.iter().all(|e| e.origin == writer.node_id()));
            assert_eq!(have, writer.version_vector(&todo).await?);
        }
        other => bail!("the replica did not serve its events: {other:?}"),
    }
    // A space it does not host is refused.
    match bare
        .pull(replica.peer_id(), request(SpaceName::new("elsewhere")?))
        .await?
    {
        PullResponse::Refused { reason } => assert!(reason.contains("not hosted"), "{reason}"),
        other => bail!("a pull of an unhosted space was answered: {other:?}"),
    }
    drain.abort();
    replica.shutdown().await;
    writer.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_only_source_sends_its_writes_and_takes_nothing_in() -> Result<()> {
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir())
        .collect::<Result<_, _>>()?;
    let feed = SpaceName::new("feed")?;
    let source = start(dirs[0].path(), &[("feed", SpaceMode::PushOnly)], &[]).await?;
    let sink = start(
        dirs[1].path(),
        &[("feed", SpaceMode::Full)],
        &[p2p_addr(&source).await?],
    )
    .await?;
    let third = start(
        dirs[2].path(),
        &[("feed", SpaceMode::Full)],
        &[p2p_addr(&sink).await?],
    )
    .await?;
    assert_eq!(
        source.status().await?.spaces["feed"].mode,
        SpaceMode::PushOnly
    );

    // Its writes reach the others.
    for i in 0..5 {
        source.put(&feed, &format!("news/{i}"), &i).await?;
    }
    for n in [&sink, &third] {
        eventually("the source's 5 writes reach a full node", || async {
            Ok(n.version_vector(&feed).await?.get(&source.node_id()) == 5)
        })
        .await?;
    }

    // Others' writes spread among the full nodes but never reach it: not by gossip,
    // not by anti-entropy (every second here), not by an explicit sync.
    for i in 0..5 {
        sink.put(&feed, &format!("reply/{i}"), &i).await?;
    }
    eventually("the sink's writes reach the third node", || async {
        Ok(third.version_vector(&feed).await?.get(&sink.node_id()) == 5)
    })
    .await?;
    let report = source.sync_now().await?;
    assert_eq!(report.push_only, vec!["feed".to_owned()]);
    assert_eq!(report.pulled, 0);
    assert_eq!(report.errors, 0);
    assert!(report
        .peers
        .values()
        .flat_map(|spaces| spaces.values())
        .all(|e| e.pulled == 0 && e.pages == 0));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let vv = source.version_vector(&feed).await?;
    assert_eq!(vv.len(), 1, "the source took in another origin: {vv:?}");
    assert_eq!(vv.get(&source.node_id()), 5);
    assert_eq!(source.status().await?.spaces["feed"].events, 5);
    assert!(source.get(&feed, "reply/0").await?.is_none());

    for n in [third, sink, source] {
        n.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modes_on_the_command_line_in_status_and_over_http() {
    // Bad mode arguments are one line on stderr and a non-zero exit, before any start.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let data = dir.path().join("data").display().to_string();
    for (spaces, expected) in [
        (
            vec!["--space", "todo:read-only"],
            "unknown space mode \"read-only\": use full, pull-only or push-only",
        ),
        (
            vec!["--space", "todo", "--space", "todo:push-only"],
            "space todo is given twice, as full and as push-only",
        ),
    ] {
        let mut args = vec![
            "run",
            "--data",
            data.as_str(),
            "--no-mdns",
            "--api",
            "127.0.0.1:0",
        ];
        args.extend(["--listen", "/ip4/127.0.0.1/tcp/0"]);
        args.extend(spaces);
        let out = run_cli(None, args).await;
        assert!(!out.success(), "{out}");
        assert_eq!(out.stderr_lines().len(), 1, "{out}");
        assert!(out.stderr.contains(expected), "{out}");
    }

    let writer = WeftProcess::builder()
        .space("todo")
        .space("notes")
        .start()
        .await;
    let replica = WeftProcess::builder()
        .space("todo:pull-only")
        .space("notes")
        .bootstrap(writer.listen_addr())
        .start()
        .await;

    // A write to the pull-only space: one line, non-zero exit; 403 over HTTP.
    let out = replica.cli(&["put", "k", "v", "--space", "todo"]).await;
    assert!(!out.success(), "{out}");
    assert_eq!(out.stderr_lines().len(), 1, "{out}");
    assert!(out.stderr.contains("pull-only"), "{out}");
    let reply = replica
        .http_post_event("todo", &json!({"key": "k", "value": 1}))
        .await;
    assert_eq!(reply.status, 403, "{}", reply.body);
    let error = reply.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(error.contains("pull-only"), "{error}");
    assert!(replica
        .try_tx_put("todo", &[("k".into(), "v".into())])
        .await
        .is_none());
    assert_eq!(replica.event_count("todo").await, 0);
    // Its full space takes writes as usual.
    replica.put("notes", "n", "1").await;

    // Modes in status, JSON and human.
    let status = replica.status().await;
    assert_eq!(
        status.pointer("/spaces/todo/mode"),
        Some(&json!("pull-only"))
    );
    assert_eq!(status.pointer("/spaces/notes/mode"), Some(&json!("full")));
    assert_eq!(
        writer.status().await.pointer("/spaces/todo/mode"),
        Some(&json!("full"))
    );
    let human = replica.cli_ok(&["status", "--space", "todo"]).await;
    assert!(human.stdout.contains("mode pull-only"), "{human}");

    // The writer's writes reach the replica.
    writer.put("todo", "k", "from the writer").await;
    wait_until(
        "the replica reads the writer's k",
        REPLICATION,
        POLL,
        async || replica.get("todo", "k").await.as_deref() == Some("from the writer"),
    )
    .await;
    wait_until(
        "the writer reads the replica's notes",
        REPLICATION,
        POLL,
        async || writer.get("notes", "n").await.as_deref() == Some("1"),
    )
    .await;
}
