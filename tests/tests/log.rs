//! The durable log as users read and write it through a node: atomic transactions that
//! no replica ever shows in part, reads in every shape, time travel, and bad input.

use anyhow::{bail, Context, Result};
use weft_node::{EventQuery, Node, NodeBuilder, Op, Payload, SpaceName, Start, WriteRequest};

use weft_tests::in_process::{loopback_node, p2p_addr, EVENTUALLY as WAIT};

async fn start(dir: &std::path::Path) -> Result<Node> {
    loopback_node(dir, |b| b).await
}

fn put(key: &str, value: serde_json::Value) -> Result<WriteRequest> {
    Ok(WriteRequest {
        key: key.into(),
        op: Op::Put,
        value: Some(Payload::encode(&value)?),
        kind: String::new(),
        meta: Default::default(),
    })
}

/// A writer moves units between accounts in transactions that keep the total at 100;
/// a reader on the replica checks the total between every replicated step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_never_shows_part_of_a_transaction() -> Result<()> {
    let (da, db) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let a = start(da.path()).await?;
    let b = start(db.path()).await?;
    b.dial(p2p_addr(&a).await?).await?;
    let space = SpaceName::default_space();
    const ACCOUNTS: usize = 5;
    const ROUNDS: usize = 60;

    let writer = {
        let a = a.clone();
        let space = space.clone();
        tokio::spawn(async move {
            let mut balances = [20i64; ACCOUNTS];
            for round in 0..ROUNDS {
                if round > 0 {
                    let (from, to) = (round % ACCOUNTS, (round * 3 + 1) % ACCOUNTS);
                    if from != to {
                        balances[from] -= 1;
                        balances[to] += 1;
                    }
                }
                let writes = (0..ACCOUNTS)
                    .map(|i| put(&format!("acct/{i}"), balances[i].into()))
                    .collect::<Result<Vec<_>>>()?;
                a.transact(&space, writes).await?;
            }
            anyhow::Ok(())
        })
    };

    let mut observations = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut seen = Vec::new();
        // One read of each key: if a transaction were half-applied, the sum would be off.
        let vv_before = b.version_vector(&space).await?;
        for i in 0..ACCOUNTS {
            if let Some(r) = b.get(&space, &format!("acct/{i}")).await? {
                seen.push(r.value.decode::<i64>()?);
            }
        }
        let vv_after = b.version_vector(&space).await?;
        if vv_before == vv_after && !seen.is_empty() {
            observations += 1;
            assert_eq!(seen.len(), ACCOUNTS, "some accounts missing: {seen:?}");
            assert_eq!(
                seen.iter().sum::<i64>(),
                100,
                "partial transaction seen: {seen:?}"
            );
        }
        if vv_after.total() == (ACCOUNTS * ROUNDS) as u64 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("replication did not finish: {} events", vv_after.total());
        }
    }
    writer.await??;
    assert!(observations > 0, "the reader never observed the replica");
    // Every transaction is whole in the replica's log too.
    let page = b
        .read_events(
            &space,
            EventQuery {
                limit: 1000,
                ..Default::default()
            },
        )
        .await?;
    assert_eq!(page.events.len(), ACCOUNTS * ROUNDS);
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_with_one_invalid_write_stores_nothing() -> Result<()> {
    let d = tempfile::tempdir()?;
    let n = start(d.path()).await?;
    let space = SpaceName::default_space();
    let mut bad = put("", 1.into())?;
    bad.key = String::new();
    let err = n
        .transact(&space, vec![put("ok", 1.into())?, bad])
        .await
        .expect_err("an empty key is invalid");
    assert!(err.to_string().contains("key"), "{err}");
    assert_eq!(n.version_vector(&space).await?.total(), 0);
    // The next write gets seq 1: nothing was consumed.
    let w = n.put(&space, "ok", &1).await?;
    assert_eq!((w.id.seq, w.lsn), (1, 1));
    n.shutdown().await;
    Ok(())
}

/// A known log: 30 events over keys a/0..a/4 and b/0..b/4, every third a delete, kinds
/// alternating.
async fn known_log(n: &Node) -> Result<()> {
    let space = SpaceName::default_space();
    for i in 0..30u32 {
        let key = format!("{}/{}", if i % 2 == 0 { "a" } else { "b" }, i % 5);
        let req = if i % 3 == 2 {
            WriteRequest {
                key,
                op: Op::Delete,
                value: None,
                kind: "Removed".into(),
                meta: Default::default(),
            }
        } else {
            WriteRequest {
                kind: if i % 2 == 0 { "Even" } else { "Odd" }.into(),
                ..put(&key, i.into())?
            }
        };
        n.write(&space, req).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_start_filter_paginate_and_travel_in_time() -> Result<()> {
    let d = tempfile::tempdir()?;
    let n = start(d.path()).await?;
    known_log(&n).await?;
    let space = SpaceName::default_space();
    let lsns = |p: &weft_node::EventPage| p.events.iter().map(|a| a.lsn).collect::<Vec<_>>();
    let read = |q: EventQuery| {
        let n = n.clone();
        let space = space.clone();
        async move { n.read_events(&space, q).await }
    };

    // Start positions.
    let p = read(EventQuery {
        start: Start::AtLsn(10),
        limit: 3,
        ..Default::default()
    })
    .await?;
    assert_eq!(lsns(&p), [10, 11, 12]);
    let p = read(EventQuery {
        start: Start::AfterLsn(10),
        limit: 3,
        ..Default::default()
    })
    .await?;
    assert_eq!(lsns(&p), [11, 12, 13]);
    let p = read(EventQuery {
        start: Start::Latest,
        limit: 3,
        descending: true,
        ..Default::default()
    })
    .await?;
    assert_eq!(lsns(&p), [30, 29, 28]);
    let p = read(EventQuery {
        start: Start::Latest,
        ..Default::default()
    })
    .await?;
    assert!(p.events.is_empty());
    let follow = p.next.context("latest hands out a cursor")?;
    n.put(&space, "late", &1).await?;
    let p = read(EventQuery {
        start: follow.into(),
        ..Default::default()
    })
    .await?;
    assert_eq!(lsns(&p), [31]);

    // Pagination with cursors covers the log exactly once.
    let mut all = Vec::new();
    let mut start = Start::Oldest;
    for _ in 0..20 {
        let p = read(EventQuery {
            start,
            limit: 7,
            ..Default::default()
        })
        .await?;
        all.extend(lsns(&p));
        match (p.at_end, p.next) {
            (false, Some(c)) => start = c.into(),
            _ => break,
        }
    }
    assert_eq!(all, (1..=31).collect::<Vec<u64>>());

    // Filters.
    let p = read(EventQuery {
        key_prefix: Some("a/".into()),
        limit: 100,
        ..Default::default()
    })
    .await?;
    assert!(!p.events.is_empty() && p.events.iter().all(|a| a.event.key.starts_with("a/")));
    assert_eq!(p.events.len(), 15);
    let p = read(EventQuery {
        op: Some(Op::Delete),
        limit: 100,
        ..Default::default()
    })
    .await?;
    assert_eq!(p.events.len(), 10);
    assert!(p.events.iter().all(|a| a.event.op == Op::Delete));
    let p = read(EventQuery {
        kind: Some("Odd".into()),
        limit: 100,
        ..Default::default()
    })
    .await?;
    assert!(p.events.iter().all(|a| a.event.kind == "Odd"));
    assert_eq!(p.events.len(), 10);

    // Key history and time travel: a/0 is put at lsn 1 (0) and 11 (10) and deleted at
    // 21 (20 % 3 == 2); b/0 is deleted at lsn 6 (5 % 3 == 2), put at 16 (15) and 26 (25).
    let h = n.key_history(&space, "a/0", None, 100).await?;
    assert_eq!(h.iter().map(|a| a.lsn).collect::<Vec<_>>(), [1, 11, 21]);
    let at = |key: &'static str, lsn| {
        let n = n.clone();
        let space = space.clone();
        async move {
            Ok::<_, anyhow::Error>(
                n.get_at(&space, key, lsn)
                    .await?
                    .map(|r| r.value.decode::<u32>())
                    .transpose()?,
            )
        }
    };
    assert_eq!(at("a/0", 0).await?, None);
    assert_eq!(at("a/0", 1).await?, Some(0));
    assert_eq!(at("a/0", 15).await?, Some(10));
    assert_eq!(at("a/0", 20).await?, Some(10));
    assert_eq!(at("a/0", 30).await?, None, "deleted at lsn 21");
    assert_eq!(at("b/0", 6).await?, None, "deleted at lsn 6");
    assert_eq!(at("b/0", 16).await?, Some(15));
    n.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cursors_and_filters_get_a_clear_4xx() -> Result<()> {
    let d = tempfile::tempdir()?;
    let n = NodeBuilder::new(d.path())
        .mdns(false)
        .listen("/ip4/127.0.0.1/tcp/0".parse()?)
        .api("127.0.0.1:0".parse()?)
        .start()
        .await?;
    known_log(&n).await?;
    let api = format!("http://{}", n.api_addr().context("api address")?);
    let http = reqwest::Client::new();
    for (query, needle) in [
        ("cursor=not-a-cursor", "cursor"),
        ("op=rename", "op"),
        ("order=sideways", "order"),
        ("start=yesterday", "start"),
        ("limit=0", "limit"),
        ("since=3&cursor=c1-a-4", "at most one"),
        ("colour=red", "colour"),
    ] {
        let r = http
            .get(format!("{api}/spaces/default/events?{query}"))
            .send()
            .await?;
        assert_eq!(r.status().as_u16(), 400, "{query}");
        let body: serde_json::Value = r.json().await?;
        let msg = body["error"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{query}: {msg}");
    }
    let r = http
        .post(format!("{api}/spaces/default/transactions"))
        .json(&serde_json::json!({"writes": [
            {"key": "x", "value": 1},
            {"key": "y", "op": "delete", "value": 2}
        ]}))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(
        n.version_vector(&SpaceName::default_space()).await?.total(),
        30
    );
    n.shutdown().await;
    Ok(())
}
