//! `weft-bench latency`: from a write's acknowledgement on one node to its application
//! on another, over loopback, with every node in this process (one monotonic clock).
//!
//! The writer records the instant each `Node::write` returns; every receiver records
//! the instant its `Node::subscribe` stream yields the event. Before timing, the nodes
//! are connected (a chain of bootstrap addresses, mDNS off), given three gossipsub
//! heartbeats to graft their meshes, and a warm-up shows every write reaching every
//! receiver promptly.
//!
//! Runs: two nodes with `Durability::Relaxed` (no fsync before an ack or an apply) and
//! with the default `Durability::Full`; a mesh of five with `Relaxed`. Diagnostics split
//! the path: `diag_gossip_transit` is `weft_net` alone (publish on one client to the
//! `Gossip` event on another, no store), `diag_ingest_one_event` is `Store::ingest` of a
//! one-event batch alone (no network); the mesh again at the two-node rate shows how
//! the latency depends on load, and CPU per write and gossip bytes per receiver show
//! what each write costs.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_crdt::{PolicyKind, SigningKey, SpaceName};
use weft_net::{NetConfig, NetEvent, Verdict};
use weft_node::{Durability, Node, NodeBuilder, Op, Payload, WriteRequest};
use weft_store::{Store, StoreConfig};

use crate::catchup::{chain, load_average};
use crate::common::{self, median, note, Figure};

/// A warm-up write must reach every receiver within this for the mesh to count as
/// formed.
const WARM_MAX_LATENCY: Duration = Duration::from_millis(50);
/// Writes per warm-up attempt, and attempts before giving up.
const WARM_WRITES: usize = 20;
const WARM_ATTEMPTS: usize = 30;
/// How long the nodes get to connect to each other.
const CONNECT_WAIT: Duration = Duration::from_secs(30);
/// Settling time once connected: three gossipsub heartbeats (500 ms each), in which
/// meshes are grafted, before the warm-up.
const MESH_SETTLE: Duration = Duration::from_millis(1500);
/// How long receivers may lag behind the writer's last write before the run fails.
const DRAIN_WAIT: Duration = Duration::from_secs(30);
/// A relaxed flush interval longer than any run: no periodic fsync while measuring
/// (the store still flushes when it closes).
const NO_FLUSH: Duration = Duration::from_secs(3600);

#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Writes of the two-node runs.
    #[arg(long, default_value_t = 1_000)]
    writes: usize,
    /// Writes per second of the two-node runs (one at a time, each awaited).
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Nodes of the mesh run (one writer, every other node timed; 0 skips it).
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// Writes of the mesh run.
    #[arg(long, default_value_t = 5_000)]
    mesh_writes: usize,
    /// Writes per second of the mesh run.
    #[arg(long, default_value_t = 1_000.0)]
    mesh_rate: f64,
    /// Payload size in bytes (a CBOR byte string).
    #[arg(long, default_value_t = 200)]
    value_bytes: usize,
    /// Rounds; every figure is the median over rounds.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Skip the diagnostic runs and figures (gossip transit, one-event ingest, the mesh
    /// at the two-node rate, relaxed without periodic flush, CPU and traffic per write).
    #[arg(long)]
    no_diag: bool,
    /// Parent of the temporary directories (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
}

pub async fn run(args: Args) -> Result<()> {
    ensure!(
        args.repeat >= 1
            && args.writes >= 1
            && args.mesh_writes >= 1
            && args.rate > 0.0
            && args.mesh_rate > 0.0,
        "--repeat, --writes, --mesh-writes, --rate and --mesh-rate must be positive"
    );
    ensure!(args.nodes != 1, "--nodes must be 0 (skip) or at least 2");
    let root = common::tempdir(args.dir.as_deref())?;
    let mut rounds = Vec::new();
    for r in 0..args.repeat {
        let dir = common::tempdir(Some(root.path()))?;
        let figures = round(&args, dir.path()).await?;
        note(format!("round {} done", r + 1));
        rounds.push(figures);
    }
    drop(root);
    common::report(
        "weft-bench latency (write acknowledged on one node -> applied on another, loopback)",
        &medians(rounds),
        args.json,
    )
}

async fn round(args: &Args, dir: &Path) -> Result<Vec<Figure>> {
    let space = SpaceName::default_space();
    let mut figures = Vec::new();
    let us = "µs";
    let load = load_average();

    let rtt = tcp_roundtrip(args.writes.max(100), args.value_bytes + 200).await?;
    figures.push(Figure::new(
        "baseline_tcp_roundtrip_p50",
        pct(&rtt, 50.0),
        us,
    ));
    figures.push(Figure::new(
        "baseline_tcp_roundtrip_p99",
        pct(&rtt, 99.0),
        us,
    ));

    // (a) Two nodes, relaxed durability (the writer's ack and the receiver's apply wait
    // for no fsync), then the default, `Durability::Full`. As a diagnostic, relaxed
    // without the periodic flush: the store's writer thread runs that fsync itself, and
    // any write arriving meanwhile waits for it.
    let mut pairs = vec![
        (
            "latency_2_nodes",
            "baseline_local_append_ack",
            Durability::relaxed(),
        ),
        (
            "latency_2_nodes_durable",
            "baseline_local_append_ack_durable",
            Durability::Full,
        ),
    ];
    if !args.no_diag {
        pairs.push((
            "diag_latency_2_nodes_no_periodic_flush",
            "diag_local_append_ack_no_periodic_flush",
            Durability::Relaxed {
                flush_every: NO_FLUSH,
            },
        ));
    }
    for (name, append_name, durability) in pairs {
        let nodes = start_chain(&dir.join(name), 2, durability).await?;
        let run = measured(&nodes, &space, args.writes, args.rate, args.value_bytes).await;
        shutdown(nodes).await;
        let run = run?;
        note(format!(
            "{name}: {} writes at {:.0}/s; ack -> applied p50 {:.0} µs, p99 {:.0} µs, \
             max {:.0} µs; append ack p50 {:.0} µs, p99 {:.0} µs",
            args.writes,
            run.rate,
            pct(&run.latency, 50.0),
            pct(&run.latency, 99.0),
            pct(&run.latency, 100.0),
            pct(&run.append, 50.0),
            pct(&run.append, 99.0),
        ));
        figures.extend(spread(name, &run.latency));
        figures.push(Figure::new(
            format!("{append_name}_p50"),
            pct(&run.append, 50.0),
            us,
        ));
        figures.push(Figure::new(
            format!("{append_name}_p99"),
            pct(&run.append, 99.0),
            us,
        ));
        if !args.no_diag {
            let diag = name.strip_prefix("diag_").unwrap_or(name);
            figures.push(Figure::new(
                format!("diag_{diag}_cpu_per_write"),
                run.cpu_per_write,
                "µs (whole process: both nodes)",
            ));
            figures.push(Figure::new(
                format!("diag_{diag}_gossip_bytes_in_per_write"),
                run.gossip_bytes_per_write,
                "B",
            ));
        }
        if run.early > 0 {
            note(format!(
                "{name}: {} receipts came before the writer saw its ack (counted as 0 µs)",
                run.early
            ));
        }
    }

    // (b) A mesh: one writer at a steady rate, every other node timed. As a diagnostic,
    // the same mesh again at the two-node rate: whether the latency comes with the load.
    if args.nodes >= 2 {
        let n = args.nodes;
        let nodes = start_chain(&dir.join("mesh"), n, Durability::relaxed()).await?;
        let mut runs = vec![(
            format!("latency_{n}_nodes"),
            args.mesh_writes,
            args.mesh_rate,
        )];
        if !args.no_diag {
            runs.push((
                format!("diag_latency_{n}_nodes_at_{:.0}_per_s", args.rate),
                args.writes,
                args.rate,
            ));
        }
        let mut results = Vec::new();
        for (name, writes, rate) in runs {
            let run = measured(&nodes, &space, writes, rate, args.value_bytes).await;
            results.push((name, writes, run));
            if results.last().is_some_and(|(_, _, r)| r.is_err()) {
                break;
            }
        }
        shutdown(nodes).await;
        for (name, writes, run) in results {
            let run = run?;
            note(format!(
                "{name}: {writes} writes at {:.0}/s, {} receipts; ack -> applied p50 {:.0} µs, \
                 p99 {:.0} µs, max {:.0} µs; {:.0} µs CPU per write, {:.2} cores busy",
                run.rate,
                run.latency.len(),
                pct(&run.latency, 50.0),
                pct(&run.latency, 99.0),
                pct(&run.latency, 100.0),
                run.cpu_per_write,
                run.cores_busy,
            ));
            figures.extend(spread(&name, &run.latency));
            figures.push(Figure::new(
                format!("{name}_write_rate"),
                run.rate,
                "writes/s",
            ));
            let diag = name.strip_prefix("diag_").unwrap_or(&name);
            figures.push(Figure::new(
                format!("diag_{diag}_cpu_per_write"),
                run.cpu_per_write,
                "µs (whole process: every node)",
            ));
            figures.push(Figure::new(
                format!("diag_{diag}_cores_busy"),
                run.cores_busy,
                "cores",
            ));
            figures.push(Figure::new(
                format!("diag_{diag}_gossip_bytes_in_per_write"),
                run.gossip_bytes_per_write,
                "B per receiver",
            ));
            figures.push(Figure::new(
                format!("diag_{diag}_gossip_messages_per_write"),
                run.gossip_messages_per_write,
                "per receiver",
            ));
            figures.push(Figure::new(
                format!("diag_{diag}_pulls_per_1k_writes"),
                run.pulls_per_1k_writes,
                "all receivers",
            ));
        }
    }

    if !args.no_diag {
        figures.push(Figure::new(
            "diag_load_average_at_start",
            load,
            "runnable tasks (1 min)",
        ));
        figures.push(Figure::new(
            "diag_load_average_at_end",
            load_average(),
            "runnable tasks (1 min)",
        ));
        let transit = gossip_transit(args.writes, args.rate, args.value_bytes).await?;
        figures.push(Figure::new(
            "diag_gossip_transit_p50",
            pct(&transit, 50.0),
            us,
        ));
        figures.push(Figure::new(
            "diag_gossip_transit_p99",
            pct(&transit, 99.0),
            us,
        ));
        for (suffix, durability) in [("", Durability::relaxed()), ("_durable", Durability::Full)] {
            let ingest =
                ingest_one_event(&dir.join(format!("ingest{suffix}")), durability, args).await?;
            figures.push(Figure::new(
                format!("diag_ingest_one_event{suffix}_p50"),
                pct(&ingest, 50.0),
                us,
            ));
            figures.push(Figure::new(
                format!("diag_ingest_one_event{suffix}_p99"),
                pct(&ingest, 99.0),
                us,
            ));
        }
    }
    Ok(figures)
}

/// For each figure name, the median over rounds (in the first round's order).
fn medians(rounds: Vec<Vec<Figure>>) -> Vec<Figure> {
    let mut values: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for f in rounds.iter().flatten() {
        values.entry(f.name.clone()).or_default().push(f.value);
    }
    rounds
        .first()
        .map(|first| {
            first
                .iter()
                .map(|f| {
                    let v = values.remove(&f.name).unwrap_or_default();
                    Figure::new(f.name.clone(), median(v), f.unit.clone())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The `p`th percentile (nearest rank) of `xs`; 0 when empty.
/// `{name}_p50`, `_p90`, `_p99` and `_max` of latencies in microseconds.
fn spread(name: &str, latency: &[f64]) -> Vec<Figure> {
    [(50.0, "p50"), (90.0, "p90"), (99.0, "p99"), (100.0, "max")]
        .into_iter()
        .map(|(p, label)| Figure::new(format!("{name}_{label}"), pct(latency, p), "µs"))
        .collect()
}

fn pct(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// `n` nodes in `dir`, each with the previous one as its only bootstrap address, mDNS
/// off; returns [`MESH_SETTLE`] after each is connected to every other (discovery makes
/// a chain a full mesh at these sizes) or, after [`CONNECT_WAIT`], to at least one.
async fn start_chain(dir: &Path, n: usize, durability: Durability) -> Result<Vec<Node>> {
    let mut nodes: Vec<Node> = Vec::with_capacity(n);
    for i in 0..n {
        let mut b = NodeBuilder::new(dir.join(format!("node{i}")))
            .mdns(false)
            .listen("/ip4/127.0.0.1/tcp/0".parse()?)
            .durability(durability);
        if let Some(prev) = nodes.last() {
            b = b.bootstrap(weft_tests::in_process::p2p_addr(prev).await?);
        }
        nodes.push(b.start().await.context("starting a node")?);
    }
    let deadline = Instant::now() + CONNECT_WAIT;
    loop {
        let mut counts = Vec::with_capacity(n);
        for node in &nodes {
            counts.push(node.status().await?.peers.len());
        }
        if counts.iter().all(|&c| c + 1 >= n) {
            break;
        }
        if Instant::now() >= deadline {
            if counts.contains(&0) {
                shutdown(nodes).await;
                bail!("after {CONNECT_WAIT:?} some node has no peer: {counts:?}");
            }
            note(format!(
                "after {CONNECT_WAIT:?} the nodes have {counts:?} peers (not a full mesh); measuring anyway"
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(MESH_SETTLE).await;
    Ok(nodes)
}

async fn shutdown(nodes: Vec<Node>) {
    for node in nodes {
        node.shutdown().await;
    }
}

/// One timed run: ack -> applied latencies (µs) over every receiver and write.
struct Run {
    latency: Vec<f64>,
    /// The writer's own `Node::write` latencies, µs.
    append: Vec<f64>,
    /// Writes per second achieved.
    rate: f64,
    /// Receipts recorded before the writer recorded the write's ack.
    early: usize,
    /// Receipts that never came within the drain wait.
    missing: usize,
    /// CPU time of the whole process (every node) per write, µs.
    cpu_per_write: f64,
    /// CPU time of the whole process over wall time: cores kept busy.
    cores_busy: f64,
    /// Bytes each receiver read on its gossip substreams per write (every copy a peer
    /// forwarded counts, not only the first).
    gossip_bytes_per_write: f64,
    /// Gossip messages each receiver delivered to its node per write (below 1 when the
    /// writer's publisher batched several writes into one message).
    gossip_messages_per_write: f64,
    /// Pulls the receivers started per 1,000 writes: each is a gap gossip showed (an
    /// event that arrived before its predecessor), and costs a round trip and a read.
    pulls_per_1k_writes: f64,
}

/// Warms up until every receiver gets writes promptly, then measures `count` writes at
/// `rate` from `nodes[0]` to every other node.
async fn measured(
    nodes: &[Node],
    space: &SpaceName,
    count: usize,
    rate: f64,
    value_bytes: usize,
) -> Result<Run> {
    let (writer, receivers) = nodes.split_first().context("no nodes")?;
    let mut formed = false;
    for attempt in 1..=WARM_ATTEMPTS {
        let warm = timed_writes(writer, receivers, space, WARM_WRITES, 50.0, value_bytes).await?;
        let worst = pct(&warm.latency, 100.0);
        if warm.missing == 0 && worst <= micros(WARM_MAX_LATENCY) {
            note(format!(
                "warm-up: every write reached every receiver within {worst:.0} µs (attempt {attempt})"
            ));
            formed = true;
            break;
        }
    }
    ensure!(
        formed,
        "after {WARM_ATTEMPTS} warm-ups of {WARM_WRITES} writes some write still took over \
         {WARM_MAX_LATENCY:?} to reach a receiver (or never did)"
    );
    let run = timed_writes(writer, receivers, space, count, rate, value_bytes).await?;
    ensure!(
        run.missing == 0,
        "{} receipts of {} writes x {} receivers never came within {DRAIN_WAIT:?}",
        run.missing,
        count,
        receivers.len()
    );
    Ok(run)
}

/// `count` writes on `writer`, started every `1/rate` s (each awaited before the next;
/// a late one starts at once), and their receipt on every receiver.
async fn timed_writes(
    writer: &Node,
    receivers: &[Node],
    space: &SpaceName,
    count: usize,
    rate: f64,
    value_bytes: usize,
) -> Result<Run> {
    let origin = writer.node_id();
    // Only the writer writes, so its next `count` events have the seqs after this.
    let s0 = writer.version_vector(space).await?.get(&origin);
    let period = Duration::from_secs_f64(1.0 / rate);
    let planned = period.mul_f64(count as f64);
    let stop = tokio::time::Instant::now() + planned + DRAIN_WAIT;
    let mut tasks = Vec::with_capacity(receivers.len());
    for r in receivers {
        // Subscribed before the first write, so no receipt is missed.
        let mut feed = Box::pin(r.subscribe(space));
        tasks.push(tokio::spawn(async move {
            let mut got: HashMap<u64, Instant> = HashMap::with_capacity(count);
            let deadline = tokio::time::sleep_until(stop);
            tokio::pin!(deadline);
            while got.len() < count {
                tokio::select! {
                    a = feed.next() => match a {
                        Some(a) => {
                            let now = Instant::now();
                            let seq = a.event.seq;
                            if a.event.origin == origin && seq > s0 && seq <= s0 + count as u64 {
                                got.entry(seq).or_insert(now);
                            }
                        }
                        None => break,
                    },
                    _ = &mut deadline => break,
                }
            }
            got
        }));
    }
    let mut acks: Vec<(u64, Instant)> = Vec::with_capacity(count);
    let mut append = Vec::with_capacity(count);
    let traffic_start: Vec<_> = receivers.iter().map(Node::traffic).collect();
    let cpu_start = common::process_cpu_secs();
    let start = Instant::now();
    for i in 0..count {
        let due = start + period.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let t = Instant::now();
        let written = writer
            .write(
                space,
                WriteRequest {
                    key: format!("lat/{}", i % 1000),
                    op: Op::Put,
                    value: Some(Payload(common::cbor_value(value_bytes, i as u64))),
                    kind: String::new(),
                    meta: BTreeMap::new(),
                },
            )
            .await?;
        let ack = Instant::now();
        acks.push((written.id.seq, ack));
        append.push(micros(ack - t));
    }
    let wall = start.elapsed().as_secs_f64();
    let rate = count as f64 / wall;
    let cpu = common::process_cpu_secs() - cpu_start;
    let mut latency = Vec::with_capacity(count * receivers.len());
    let mut early = 0;
    let mut missing = 0;
    // Receivers are done once they have every write (or the drain wait is over), so the
    // traffic below covers the whole run.
    let mut gossip_bytes = 0u64;
    let mut gossip_messages = 0u64;
    let mut pulls = 0u64;
    for task in tasks {
        let got = task.await?;
        for (seq, ack) in &acks {
            match got.get(seq) {
                Some(at) => match at.checked_duration_since(*ack) {
                    Some(d) => latency.push(micros(d)),
                    None => {
                        early += 1;
                        latency.push(0.0);
                    }
                },
                None => missing += 1,
            }
        }
    }
    for (r, before) in receivers.iter().zip(&traffic_start) {
        let t = r.traffic().since(before);
        gossip_bytes += t.gossip.bytes_in;
        gossip_messages += t.gossip_messages_received;
        pulls += t.pulls_sent;
    }
    let per = (count * receivers.len()).max(1) as f64;
    Ok(Run {
        latency,
        append,
        rate,
        early,
        missing,
        cpu_per_write: cpu * 1e6 / count as f64,
        cores_busy: cpu / wall,
        gossip_bytes_per_write: gossip_bytes as f64 / per,
        gossip_messages_per_write: gossip_messages as f64 / per,
        pulls_per_1k_writes: pulls as f64 * 1000.0 / count.max(1) as f64,
    })
}

/// Raw tokio TCP ping-pong over 127.0.0.1 (`TCP_NODELAY`): `count` round trips of a
/// `bytes`-byte message; µs each.
async fn tcp_roundtrip(count: usize, bytes: usize) -> Result<Vec<f64>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let echo = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        socket.set_nodelay(true)?;
        let mut buf = vec![0u8; bytes];
        for _ in 0..count {
            socket.read_exact(&mut buf).await?;
            socket.write_all(&buf).await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let pings = async {
        let mut socket = tokio::net::TcpStream::connect(addr).await?;
        socket.set_nodelay(true)?;
        let msg = common::cbor_value(bytes, 1);
        let mut buf = vec![0u8; bytes];
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            let t = Instant::now();
            socket.write_all(&msg).await?;
            socket.read_exact(&mut buf).await?;
            out.push(micros(t.elapsed()));
        }
        echo.await??;
        Ok::<_, anyhow::Error>(out)
    };
    tokio::time::timeout(Duration::from_secs(60), pings)
        .await
        .context("the TCP round-trip baseline timed out")?
}

/// `weft_net` alone: two clients on loopback, `count` one-event gossip batches at
/// `rate`; µs from each `publish` call to the receiver's `Gossip` event.
async fn gossip_transit(count: usize, rate: f64, value_bytes: usize) -> Result<Vec<f64>> {
    let space = SpaceName::default_space();
    let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let config = |key: SigningKey| -> Result<NetConfig> {
        let mut c = NetConfig::new(key);
        c.listen = vec!["/ip4/127.0.0.1/tcp/0".parse()?];
        c.mdns = false;
        c.spaces = vec![space.clone()];
        Ok(c)
    };
    let (sender, mut sender_events) = weft_net::start(config(key.clone())?)?;
    let addr = sender
        .wait_listening(Duration::from_secs(10))
        .await?
        .into_iter()
        .next()
        .context("the sender has no listen address")?;
    let mut rc = config(SigningKey::from_bytes(&rand::random::<[u8; 32]>()))?;
    rc.bootstrap = vec![format!("{addr}/p2p/{}", sender.local_peer_id()).parse()?];
    let (receiver, mut receiver_events) = weft_net::start(rc)?;

    // The sender's events are only drained (pull requests are dropped unanswered).
    let drain = tokio::spawn(async move { while sender_events.recv().await.is_some() {} });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let listen = {
        let receiver = receiver.clone();
        tokio::spawn(async move {
            while let Some(ev) = receiver_events.recv().await {
                if let NetEvent::Gossip {
                    source,
                    message_id,
                    events,
                    ..
                } = ev
                {
                    let now = Instant::now();
                    if let Some(e) = events.first() {
                        if tx.send((e.seq, now)).is_err() {
                            break;
                        }
                    }
                    let _ = receiver
                        .report_validation(message_id, source, Verdict::Accept)
                        .await;
                }
            }
        })
    };

    // Each event signed on its own (runs of one), chained like a writer's.
    const WARM: usize = 200;
    let events = chain(&space, &key, (WARM + count) as u64, 1000, value_bytes, 1);
    let result = async {
        // Warm-up: one event every 50 ms until one arrives (subscriptions exchanged).
        let mut sent_warm = 0;
        let arrived = loop {
            if sent_warm >= WARM {
                break false;
            }
            sender
                .publish(space.clone(), vec![events[sent_warm].clone()])
                .await?;
            sent_warm += 1;
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(50), rx.recv()).await {
                break true;
            }
        };
        ensure!(arrived, "no gossip arrived after {WARM} warm-up messages");
        let mut sent: HashMap<u64, Instant> = HashMap::with_capacity(count);
        let period = Duration::from_secs_f64(1.0 / rate);
        let start = Instant::now();
        for (i, e) in events[WARM..].iter().enumerate() {
            tokio::time::sleep_until((start + period.mul_f64(i as f64)).into()).await;
            sent.insert(e.seq, Instant::now());
            sender.publish(space.clone(), vec![e.clone()]).await?;
        }
        let mut out = Vec::with_capacity(count);
        let deadline = tokio::time::Instant::now() + DRAIN_WAIT;
        while out.len() < count {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((seq, at))) => {
                    if let Some(t) = sent.remove(&seq) {
                        out.push(micros(at.saturating_duration_since(t)));
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        ensure!(
            out.len() == count,
            "gossip transit: {} of {count} messages arrived",
            out.len()
        );
        Ok(out)
    }
    .await;
    drop(sender);
    drop(receiver);
    drain.abort();
    listen.abort();
    if let Ok(ref t) = result {
        note(format!(
            "diag: weft_net gossip publish -> Gossip event: p50 {:.0} µs, p99 {:.0} µs",
            pct(t, 50.0),
            pct(t, 99.0)
        ));
    }
    result
}

/// `Store::ingest` alone: one-event batches (each event signed, chained), one after
/// the other; µs per call.
async fn ingest_one_event(dir: &Path, durability: Durability, args: &Args) -> Result<Vec<f64>> {
    let space = SpaceName::default_space();
    let store = Store::open(
        dir,
        SigningKey::from_bytes(&[1; 32]),
        StoreConfig {
            durability,
            ..StoreConfig::default()
        },
    )?;
    store
        .configure_space(&space, PolicyKind::Lww.policy())
        .await?;
    let key = SigningKey::from_bytes(&[9; 32]);
    let events = chain(&space, &key, args.writes as u64, 1000, args.value_bytes, 1);
    let mut out = Vec::with_capacity(events.len());
    let deadline = Instant::now() + Duration::from_secs(120);
    for e in events {
        ensure!(
            Instant::now() < deadline,
            "one-event ingests took over 120 s"
        );
        let t = Instant::now();
        let outcome = store.ingest(&space, vec![e]).await?;
        out.push(micros(t.elapsed()));
        ensure!(
            outcome.applied.len() == 1,
            "a one-event ingest applied nothing"
        );
    }
    drop(store);
    note(format!(
        "diag: Store::ingest of one event ({durability:?}): p50 {:.0} µs, p99 {:.0} µs",
        pct(&out, 50.0),
        pct(&out, 99.0)
    ));
    Ok(out)
}
