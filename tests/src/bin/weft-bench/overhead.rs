//! `weft-bench overhead`: bytes on the wire per replicated event beyond its key and
//! value.
//!
//! Two nodes in this process on loopback (mDNS off, B bootstrapped to A, default sync
//! settings). Concurrent writer tasks write `--events` events into A; B replicates them
//! by gossip (and pull, where gossip leaves a gap). The run ends when B has every event;
//! then the two nodes' traffic counters ([`weft_node::Node::traffic`], every TCP byte
//! with noise and yamux framing) give
//!
//! ```text
//! overhead = (bytes A sent + bytes B sent during the run - key and value bytes) / events
//! ```
//!
//! Everything on the connection in both directions counts: gossip, pulls,
//! anti-entropy, pings, framing. The baseline `baseline_canonical_event_<n>_writers` is
//! what the same run's events cost in their canonical encoding beyond key and value: what
//! sending each event by itself, with no message, stream or connection framing at all,
//! would cost. (How many events carry a signature depends on how the store's commits
//! group them, so the baseline is taken per run.)
//!
//! Diagnostics, per event: the bytes sent on gossip and sync substreams (payload
//! included), on other substreams, and the framing (the wire's bytes beyond every
//! substream's); events per gossip message; events B had to pull; the signed fraction.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use weft_crdt::SpaceName;
use weft_net::Traffic;
use weft_node::{Durability, Node, NodeBuilder, Op, Payload, WriteRequest};

use crate::common::{self, median, note, Figure};

/// How long the nodes get to connect and form their gossip mesh.
const CONNECT_WAIT: Duration = Duration::from_secs(30);
/// How long B may take to have every event after the last write.
const DRAIN_WAIT: Duration = Duration::from_secs(120);
/// How long the two ends get to agree on the bytes between them after the run.
const SETTLE_WAIT: Duration = Duration::from_secs(2);

#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Concurrent writers on A, comma-separated; one measurement each.
    // `std::vec::Vec`: clap's derive would read a plain `Vec` as a repeated option.
    #[arg(long, value_parser = common::parse_list, default_value = "2,10,100")]
    writers: std::vec::Vec<usize>,
    /// Events written per measurement (split evenly over the writers).
    #[arg(long, default_value_t = 10_000)]
    events: usize,
    /// Value size in bytes (a CBOR byte string).
    #[arg(long, default_value_t = 200)]
    value_bytes: usize,
    /// Write with `Durability::Relaxed` (no fsync per commit) instead of the default.
    #[arg(long)]
    relaxed: bool,
    /// Rounds; every figure is the median over rounds.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Parent of the temporary directories (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// What one measurement saw.
struct Run {
    events: usize,
    /// Key and value bytes of the events written.
    content: u64,
    a: Traffic,
    b: Traffic,
    secs: f64,
    /// Mean canonical encoding of the run's events beyond key and value.
    canonical_overhead: f64,
    /// Fraction of the run's events that carry a signature.
    signed: f64,
}

impl Run {
    fn per_event(&self, bytes: u64) -> f64 {
        bytes as f64 / self.events as f64
    }

    fn overhead(&self) -> f64 {
        let wire = self.a.bytes_out + self.b.bytes_out;
        (wire as f64 - self.content as f64) / self.events as f64
    }
}

pub async fn run(args: Args) -> Result<()> {
    ensure!(
        args.repeat >= 1 && args.events >= 1,
        "--repeat and --events must be positive"
    );
    ensure!(
        args.writers.iter().all(|&w| w >= 1 && w <= args.events),
        "every writer count must be between 1 and --events"
    );
    let durability = if args.relaxed {
        Durability::relaxed()
    } else {
        Durability::Full
    };
    let root = common::tempdir(args.dir.as_deref())?;
    let mut rounds: Vec<Vec<Figure>> = Vec::new();
    for r in 0..args.repeat {
        let mut figures = Vec::new();
        for &writers in &args.writers {
            let dir = common::tempdir(Some(root.path()))?;
            let run = measure(dir.path(), writers, &args, durability).await?;
            note(format!(
                "round {}: {writers} writers: {} events in {:.2} s; {:.1} B/event on the wire \
                 beyond key and value ({} B sent by A, {} B by B); gossip {:.1} B/event, sync \
                 {:.1}, other {:.1}; {:.1} events per gossip message; {} events pulled; \
                 {:.0}% signed",
                r + 1,
                run.events,
                run.secs,
                run.overhead(),
                run.a.bytes_out,
                run.b.bytes_out,
                run.per_event(run.a.gossip.bytes() + run.b.gossip.bytes()) / 2.0,
                run.per_event(run.a.sync.bytes() + run.b.sync.bytes()) / 2.0,
                run.per_event(run.a.other.bytes() + run.b.other.bytes()) / 2.0,
                events_per_message(&run.a),
                run.b.events_pulled,
                run.signed * 100.0,
            ));
            push_figures(&mut figures, writers, &run);
        }
        rounds.push(figures);
    }
    drop(root);
    common::report(
        "weft-bench overhead (bytes on the wire per event beyond key and value, 2 nodes, loopback)",
        &medians(rounds),
        args.json,
    )
}

fn events_per_message(t: &Traffic) -> f64 {
    if t.gossip_messages_sent == 0 {
        0.0
    } else {
        t.gossip_events_sent as f64 / t.gossip_messages_sent as f64
    }
}

fn push_figures(figures: &mut Vec<Figure>, writers: usize, run: &Run) {
    let w = writers;
    figures.push(Figure::new(
        format!("overhead_{w}_writers"),
        run.overhead(),
        "B/event",
    ));
    figures.push(Figure::new(
        format!("baseline_canonical_event_{w}_writers"),
        run.canonical_overhead,
        "B/event",
    ));
    // Each byte once, as sent: gossip and sync as counted on their substreams (payload
    // and negotiation), framing as the rest of the wire (yamux, noise, handshakes).
    let sent = |f: fn(&Traffic) -> u64| run.per_event(f(&run.a) + f(&run.b));
    figures.push(Figure::new(
        format!("diag_overhead_{w}_writers_gossip_bytes"),
        sent(|t| t.gossip.bytes_out),
        "B/event",
    ));
    figures.push(Figure::new(
        format!("diag_overhead_{w}_writers_sync_bytes"),
        sent(|t| t.sync.bytes_out),
        "B/event",
    ));
    figures.push(Figure::new(
        format!("diag_overhead_{w}_writers_other_bytes"),
        sent(|t| t.other.bytes_out),
        "B/event",
    ));
    figures.push(Figure::new(
        format!("diag_overhead_{w}_writers_framing_bytes"),
        sent(|t| {
            t.bytes_out
                .saturating_sub(t.gossip.bytes_out + t.sync.bytes_out + t.other.bytes_out)
        }),
        "B/event",
    ));
    figures.push(Figure::new(
        format!("diag_overhead_{w}_writers_events_per_gossip_message"),
        events_per_message(&run.a),
        "events",
    ));
    figures.push(Figure::new(
        format!("diag_overhead_{w}_writers_events_pulled"),
        run.b.events_pulled as f64,
        "events",
    ));
    figures.push(Figure::new(
        format!("diag_overhead_{w}_writers_signed_fraction"),
        run.signed,
        "ratio",
    ));
}

/// The median of each figure over rounds, in the first round's order.
fn medians(rounds: Vec<Vec<Figure>>) -> Vec<Figure> {
    let Some(first) = rounds.first() else {
        return Vec::new();
    };
    let mut by_name: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for f in rounds.iter().flatten() {
        by_name.entry(&f.name).or_default().push(f.value);
    }
    first
        .iter()
        .map(|f| {
            Figure::new(
                f.name.clone(),
                median(by_name[f.name.as_str()].clone()),
                &f.unit,
            )
        })
        .collect()
}

async fn measure(dir: &Path, writers: usize, args: &Args, durability: Durability) -> Result<Run> {
    let space = SpaceName::default_space();
    let listen: weft_node::Multiaddr = "/ip4/127.0.0.1/tcp/0".parse()?;
    let start = |name: &str| {
        NodeBuilder::new(dir.join(name))
            .mdns(false)
            .listen(listen.clone())
            .durability(durability)
    };
    let a = start("a").start().await.context("starting node A")?;
    let b = match weft_tests::in_process::p2p_addr(&a).await {
        Ok(addr) => start("b").bootstrap(addr).start().await,
        Err(e) => {
            a.shutdown().await;
            return Err(e);
        }
    };
    let b = match b {
        Ok(b) => b,
        Err(e) => {
            a.shutdown().await;
            return Err(e).context("starting node B");
        }
    };
    let result = measured(&a, &b, &space, writers, args).await;
    a.shutdown().await;
    b.shutdown().await;
    result
}

async fn measured(
    a: &Node,
    b: &Node,
    space: &SpaceName,
    writers: usize,
    args: &Args,
) -> Result<Run> {
    let origin = a.node_id();
    // Warm up until a write reaches B by gossip: connected, subscribed, mesh formed.
    let deadline = Instant::now() + CONNECT_WAIT;
    let mut written = 0u64;
    loop {
        let gossip_before = b.traffic().gossip_events_received;
        put(a, space, "warmup", &common::cbor_value(args.value_bytes, 0)).await?;
        written += 1;
        let step = Instant::now() + Duration::from_millis(500);
        while Instant::now() < step && b.traffic().gossip_events_received == gossip_before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if b.traffic().gossip_events_received > gossip_before {
            break;
        }
        if Instant::now() >= deadline {
            bail!("no write reached B by gossip within {CONNECT_WAIT:?}");
        }
    }
    wait_for(b, space, origin, written, CONNECT_WAIT).await?;
    let first_lsn = a.version_vector(space).await?.total() + 1;

    let (a0, b0) = (a.traffic(), b.traffic());
    let started = Instant::now();
    let per_writer = args.events / writers;
    let extra = args.events % writers;
    let mut tasks = Vec::with_capacity(writers);
    for w in 0..writers {
        let node = a.clone();
        let space = space.clone();
        let count = per_writer + usize::from(w < extra);
        let value_bytes = args.value_bytes;
        tasks.push(tokio::spawn(async move {
            let mut content = 0u64;
            for i in 0..count {
                let key = format!("w{w}/{i}");
                let value = common::cbor_value(value_bytes, (w * 1_000_003 + i) as u64 + 1);
                content += (key.len() + value.len()) as u64;
                put(&node, &space, &key, &value).await?;
            }
            anyhow::Ok(content)
        }));
    }
    let mut content = 0u64;
    for t in tasks {
        content += t.await??;
    }
    written += args.events as u64;
    wait_for(b, space, origin, written, DRAIN_WAIT).await?;
    let secs = started.elapsed().as_secs_f64();
    // Let bytes in flight land, so both ends count the same connection traffic.
    let settle = Instant::now() + SETTLE_WAIT;
    while Instant::now() < settle {
        let (ta, tb) = (a.traffic(), b.traffic());
        if ta.bytes_out == tb.bytes_in && tb.bytes_out == ta.bytes_in {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (a1, b1) = (a.traffic(), b.traffic());

    // The run's events as stored, for the canonical baseline.
    let mut canonical = 0u64;
    let mut signed = 0usize;
    let mut seen = 0usize;
    let mut after = first_lsn - 1;
    while seen < args.events {
        let page = a.events_since(space, after, 1_000).await?;
        let Some(last) = page.last() else {
            bail!(
                "A's log ends after {seen} of the run's {} events",
                args.events
            );
        };
        after = last.lsn;
        for applied in page.iter().take(args.events - seen) {
            let e = &applied.event;
            canonical += (e.encode().len() - e.key.len() - e.payload.len()) as u64;
            signed += usize::from(e.sig.is_some());
        }
        seen = (seen + page.len()).min(args.events);
    }

    Ok(Run {
        events: args.events,
        content,
        a: a1.since(&a0),
        b: b1.since(&b0),
        secs,
        canonical_overhead: canonical as f64 / args.events as f64,
        signed: signed as f64 / args.events as f64,
    })
}

async fn put(node: &Node, space: &SpaceName, key: &str, value: &[u8]) -> Result<()> {
    node.write(
        space,
        WriteRequest {
            key: key.to_owned(),
            op: Op::Put,
            value: Some(Payload(value.to_vec())),
            kind: String::new(),
            meta: BTreeMap::new(),
        },
    )
    .await?;
    Ok(())
}

/// Waits until `node` has `count` events of `origin`.
async fn wait_for(
    node: &Node,
    space: &SpaceName,
    origin: weft_crdt::NodeId,
    count: u64,
    within: Duration,
) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let have = node.version_vector(space).await?.get(&origin);
        if have >= count {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("B has {have} of {count} events after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
