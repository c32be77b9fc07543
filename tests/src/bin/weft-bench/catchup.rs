//! `weft-bench catchup`: a fresh node pulls a large log from one peer over loopback.
//!
//! The source node's log is built before it starts, untimed: one origin's chain of
//! events (runs of [`RUN`] signed only at their end, as the store's commits are) is
//! ingested through `Store::ingest` into the store of the source's data directory,
//! opened with the source's own identity key. Then the source starts, and a fresh node
//! with the source as its only bootstrap address is timed from its start until its
//! version vector equals the source's. The fresh node takes the ordinary path: pull
//! pages, signature and hash-chain checks, durable commits (`Durability::Full`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_crdt::{
    Event, Hlc, NodeId, Op, PolicyKind, SigningKey, SpaceName, UnsignedEvent, VectorClock,
    VersionVector,
};
use weft_node::{Node, NodeBuilder};
use weft_store::{Durability, Store, StoreConfig};

use crate::common::{self, median, note, Figure};

/// Events per run of the generated chain: the last of each is signed and vouches for
/// the others through their hashes. At most `weft_crdt::limits::MAX_UNSIGNED_RUN`.
pub const RUN: usize = 250;

/// Events per pull page of the node's sync loop (`SyncConfig::page_events`): the
/// commit size of the batched-append baseline and the page of the local-ingest
/// diagnostic, so that both are measured in the shape the catch-up commits in.
const PAGE: usize = 1_000;

/// Records per commit of the second batched-append baseline: a bulk load's commits.
const BIG_COMMIT: u64 = 10_000;

/// Events per `Store::ingest` call while building the source's log; a multiple of
/// [`RUN`], so every batch ends on a signed event.
const BUILD_PAGE: usize = 4 * RUN;

/// Where the node keeps its identity key and its log inside its data directory.
const IDENTITY_FILE: &str = "identity.key";
const LOG_DIR: &str = "log";

/// How often the fresh node's version vector is read while it catches up.
const POLL: Duration = Duration::from_millis(10);

#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Events in the source's log.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Payload size in bytes (a CBOR byte string).
    #[arg(long, default_value_t = 200)]
    value_bytes: usize,
    /// Distinct keys the events write (round robin).
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Rounds (a fresh node's catch-up and the baselines each round); every figure is
    /// the median.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Skip the diagnostic figures (the same pages through `Store::ingest` without a
    /// network, time to the first event, CPU per event).
    #[arg(long)]
    no_diag: bool,
    /// Give up (with an error) when one catch-up or one baseline takes longer than
    /// this many seconds.
    #[arg(long, default_value_t = 900.0)]
    max_secs: f64,
    /// Parent of the temporary directories (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
}

pub async fn run(args: Args) -> Result<()> {
    ensure!(
        args.repeat >= 1 && args.events >= 1 && args.keys >= 1,
        "--repeat, --events and --keys must be positive"
    );
    let space = SpaceName::default_space();
    let max_time = Duration::from_secs_f64(args.max_secs);
    let root = common::tempdir(args.dir.as_deref())?;
    let load = load_average();

    let t = Instant::now();
    let events = {
        let (space, n, keys, vb) = (space.clone(), args.events, args.keys, args.value_bytes);
        let key = SigningKey::from_bytes(&[7; 32]);
        tokio::task::spawn_blocking(move || chain(&space, &key, n, keys, vb, RUN)).await?
    };
    let encoded: Vec<Vec<u8>> = events.iter().map(Event::encode).collect();
    let total_bytes: u64 = encoded.iter().map(|e| e.len() as u64).sum();
    let event_bytes = total_bytes as f64 / encoded.len() as f64;
    note(format!(
        "generated {} events ({:.1} MB encoded, {event_bytes:.0} B each) in {:.2} s",
        events.len(),
        total_bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    ));

    let source_dir = root.path().join("source");
    let t = Instant::now();
    let expected = build_source_log(&source_dir, &space, &events).await?;
    note(format!(
        "built the source's log in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    let source = NodeBuilder::new(&source_dir)
        .mdns(false)
        .listen("/ip4/127.0.0.1/tcp/0".parse()?)
        .start()
        .await
        .context("starting the source node")?;
    let have = source.version_vector(&space).await?;
    ensure!(
        have == expected,
        "the source node does not hold the log built for it (its data directory layout \
         changed?): it has {} events, expected {}",
        have.total(),
        expected.total()
    );
    let source_addr = weft_tests::in_process::p2p_addr(&source).await?;

    let values: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
    let n = events.len() as u64;
    let mut catchup = Vec::new();
    let mut mbps = Vec::new();
    let mut batched = Vec::new();
    let mut ratio = Vec::new();
    let mut tcp = Vec::new();
    let mut first_event = Vec::new();
    let mut cpu = Vec::new();
    let mut wire = Vec::new();
    let mut pulled = Vec::new();
    let mut disk = Vec::new();
    let mut batched_10k = Vec::new();
    let mut ratio_10k = Vec::new();
    for r in 0..args.repeat {
        let round = common::tempdir(Some(root.path()))?;
        let before = common::heed_batched_append(
            &round.path().join("before"),
            &values,
            n,
            PAGE as u64,
            max_time,
        )?;
        let run = catch_up(
            &round.path().join("fresh"),
            &space,
            source_addr.clone(),
            &expected,
            max_time,
        )
        .await?;
        let after = common::heed_batched_append(
            &round.path().join("after"),
            &values,
            n,
            PAGE as u64,
            max_time,
        )?;
        // The store may commit several queued pages at once, so the same bytes are
        // also appended with the large commits a bulk load would use.
        let big = common::heed_batched_append(
            &round.path().join("big"),
            &values,
            n,
            BIG_COMMIT,
            max_time,
        )?;
        let tcp_mbps = tcp_loopback(total_bytes, max_time).await?;
        drop(round);
        // The same record count twice: records over total time is the harmonic mean.
        let base = 2.0 / (1.0 / before + 1.0 / after);
        let rate = n as f64 / run.secs;
        note(format!(
            "round {}: catch-up of {n} events in {:.2} s: {rate:.0} events/s, {:.1} MB/s; \
             heed batched append of the same bytes {before:.0}/s and {after:.0}/s \
             (commit per {PAGE}), {big:.0}/s (commit per {BIG_COMMIT}); \
             TCP loopback {tcp_mbps:.0} MB/s",
            r + 1,
            run.secs,
            total_bytes as f64 / run.secs / 1e6
        ));
        catchup.push(rate);
        mbps.push(total_bytes as f64 / run.secs / 1e6);
        batched.push(base);
        ratio.push(100.0 * rate / base);
        batched_10k.push(big);
        ratio_10k.push(100.0 * rate / big);
        tcp.push(tcp_mbps);
        first_event.push(run.first_event_ms);
        cpu.push(run.cpu_us_per_event);
        wire.push(run.wire_bytes_in as f64 / n as f64);
        pulled.push(run.events_pulled as f64);
        disk.push(run.disk_bytes_per_event);
    }

    let mut figures = vec![
        Figure::new("events", n as f64, "events"),
        Figure::new("event_bytes", event_bytes, "B"),
        Figure::new("catchup", median(catchup), "events/s"),
        Figure::new("catchup_bytes", median(mbps), "MB/s"),
        Figure::new("baseline_heed_batched_append", median(batched), "records/s"),
        Figure::new("baseline_tcp_loopback", median(tcp), "MB/s"),
        Figure::new("catchup_vs_batched_append", median(ratio), "%"),
        Figure::new(
            "baseline_heed_batched_append_commit_10k",
            median(batched_10k),
            "records/s",
        ),
        Figure::new(
            "catchup_vs_batched_append_commit_10k",
            median(ratio_10k),
            "%",
        ),
    ];
    if !args.no_diag {
        figures.push(Figure::new(
            "diag_load_average_at_start",
            load,
            "runnable tasks (1 min)",
        ));
        figures.push(Figure::new(
            "diag_first_event_after_start",
            median(first_event),
            "ms",
        ));
        figures.push(Figure::new(
            "diag_wire_bytes_in_per_event",
            median(wire),
            "B (the fresh node's TCP reads)",
        ));
        figures.push(Figure::new("diag_events_pulled", median(pulled), "events"));
        figures.push(Figure::new(
            "diag_disk_bytes_per_event",
            median(disk),
            "B written to storage",
        ));
        figures.push(Figure::new(
            "diag_cpu_per_event",
            median(cpu),
            "µs (whole process: both nodes)",
        ));
        // The same events through the store alone, page by page as a pull delivers
        // them: what the fresh node would reach if the network cost nothing.
        let rate = local_ingest(root.path(), &space, &events, max_time).await?;
        note(format!(
            "diag: the same pages through Store::ingest alone: {rate:.0} events/s"
        ));
        figures.push(Figure::new("diag_local_ingest", rate, "events/s"));
    }
    source.shutdown().await;
    drop(root);
    common::report(
        "weft-bench catchup (fresh node pulls from one peer over loopback, Durability::Full)",
        &figures,
        args.json,
    )
}

/// The 1-minute load average (`/proc/loadavg`), or 0 where that is not available. On a
/// shared machine it tells how much other work competed with a run.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Milliseconds since the Unix epoch, for HLC readings.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `total` events of one origin (the holder of `key`), chained by `prev` hashes, in
/// runs of `run` events of which only the last is signed (the last event overall is
/// always signed). Each event writes key `k/<n % keys>` with a `value_bytes` payload.
pub fn chain(
    space: &SpaceName,
    key: &SigningKey,
    total: u64,
    keys: u64,
    value_bytes: usize,
    run: usize,
) -> Vec<Event> {
    let origin = NodeId::of(key);
    let wall = now_ms();
    let run = run.max(1) as u64;
    let mut out: Vec<Event> = Vec::with_capacity(total as usize);
    let mut prev = None;
    for seq in 1..=total {
        let mut clock = VectorClock::new();
        clock.set(origin, seq);
        let n = seq - 1;
        let e = UnsignedEvent {
            origin,
            seq,
            clock,
            hlc: Hlc::new(wall + n / 1000, (n % 1000) as u16),
            key: format!("k/{}", n % keys.max(1)),
            op: Op::Put,
            kind: String::new(),
            payload: common::cbor_value(value_bytes, n),
            meta: Default::default(),
            prev,
        };
        let e = if seq % run == 0 || seq == total {
            e.sign(space, key)
        } else {
            e.seal_unsigned()
        };
        prev = Some(e.hash());
        out.push(e);
    }
    out
}

/// Writes a node identity into `dir` and ingests `events` into the store the node will
/// open there; returns the version vector they make.
async fn build_source_log(
    dir: &Path,
    space: &SpaceName,
    events: &[Event],
) -> Result<VersionVector> {
    std::fs::create_dir_all(dir)?;
    let identity = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    std::fs::write(dir.join(IDENTITY_FILE), identity.to_bytes())?;
    // Relaxed: this is setup; the store flushes everything when it closes.
    let store = Store::open(
        &dir.join(LOG_DIR),
        identity,
        StoreConfig {
            durability: Durability::relaxed(),
            ..StoreConfig::default()
        },
    )?;
    store
        .configure_space(space, PolicyKind::Lww.policy())
        .await?;
    let mut expected = VersionVector::new();
    let mut last_note = Instant::now();
    for (i, page) in events.chunks(BUILD_PAGE).enumerate() {
        let out = store.ingest(space, page.to_vec()).await?;
        ensure!(
            out.applied.len() == page.len() && out.parked == 0,
            "building the source's log: a page of {} applied {} and parked {}",
            page.len(),
            out.applied.len(),
            out.parked
        );
        for e in page {
            expected.set(e.origin, e.seq.max(expected.get(&e.origin)));
        }
        if last_note.elapsed() > Duration::from_secs(5) {
            note(format!(
                "building the source's log: {} of {} events",
                (i + 1) * BUILD_PAGE,
                events.len()
            ));
            last_note = Instant::now();
        }
    }
    let stats = store.stats(space).await?;
    ensure!(
        stats.version_vector == expected,
        "the source's store does not hold the events ingested into it"
    );
    drop(store);
    Ok(expected)
}

/// One fresh node's catch-up.
struct CatchUp {
    secs: f64,
    first_event_ms: f64,
    cpu_us_per_event: f64,
    /// What the fresh node read from its TCP connections, framing included.
    wire_bytes_in: u64,
    /// Events in the pull pages it received (more than the log when pages overlap).
    events_pulled: u64,
    /// Bytes the process caused to be written to storage during the catch-up (the
    /// source only reads), per event.
    disk_bytes_per_event: f64,
}

/// Starts a fresh node in `dir` with `source` as its only bootstrap address and waits
/// until its version vector is `expected`; the time runs from just before its start.
async fn catch_up(
    dir: &Path,
    space: &SpaceName,
    source: weft_node::Multiaddr,
    expected: &VersionVector,
    max_time: Duration,
) -> Result<CatchUp> {
    let cpu_start = common::process_cpu_secs();
    let disk_start = common::process_write_bytes();
    let start = Instant::now();
    let deadline = start + max_time;
    let node = NodeBuilder::new(dir)
        .mdns(false)
        .listen("/ip4/127.0.0.1/tcp/0".parse()?)
        .bootstrap(source)
        .start()
        .await
        .context("starting the fresh node")?;
    let result = wait_for(&node, space, expected, start, deadline).await;
    let cpu = common::process_cpu_secs() - cpu_start;
    let disk = common::process_write_bytes().saturating_sub(disk_start);
    let traffic = node.traffic();
    node.shutdown().await;
    let (secs, first_event_ms) = result?;
    Ok(CatchUp {
        secs,
        first_event_ms,
        cpu_us_per_event: cpu * 1e6 / expected.total().max(1) as f64,
        wire_bytes_in: traffic.bytes_in,
        events_pulled: traffic.events_pulled,
        disk_bytes_per_event: disk as f64 / expected.total().max(1) as f64,
    })
}

/// Polls `node`'s version vector until it equals `expected`; returns seconds since
/// `start` and milliseconds until the first event had arrived.
async fn wait_for(
    node: &Node,
    space: &SpaceName,
    expected: &VersionVector,
    start: Instant,
    deadline: Instant,
) -> Result<(f64, f64)> {
    let mut first: Option<f64> = None;
    let mut last_note = Instant::now();
    loop {
        let have = node.version_vector(space).await?;
        if first.is_none() && !have.is_empty() {
            first = Some(start.elapsed().as_secs_f64() * 1e3);
        }
        if have == *expected {
            let secs = start.elapsed().as_secs_f64();
            return Ok((secs, first.unwrap_or(secs * 1e3)));
        }
        if Instant::now() >= deadline {
            bail!(
                "the fresh node holds {} of {} events after {:.0} s: giving up",
                have.total(),
                expected.total(),
                start.elapsed().as_secs_f64()
            );
        }
        if last_note.elapsed() > Duration::from_secs(5) {
            note(format!(
                "catch-up: {} of {} events after {:.1} s",
                have.total(),
                expected.total(),
                start.elapsed().as_secs_f64()
            ));
            last_note = Instant::now();
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Raw tokio TCP over 127.0.0.1: `total` bytes sent in 1 MiB writes and read in 1 MiB
/// reads; MB/s from the first write until the reader has seen the last byte.
pub async fn tcp_loopback(total: u64, max_time: Duration) -> Result<f64> {
    const CHUNK: usize = 1 << 20;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let reader = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0u64;
        // Bounded: every read takes at least one byte of the `total` the writer sends,
        // and the writer closes its side after them.
        loop {
            let n = socket.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        Ok::<_, std::io::Error>((got, Instant::now()))
    });
    let chunk: Vec<u8> = (0..CHUNK).map(|i| (i * 31) as u8).collect();
    let transfer = async {
        let mut socket = tokio::net::TcpStream::connect(addr).await?;
        socket.set_nodelay(true)?;
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < total {
            let n = (total - sent).min(CHUNK as u64) as usize;
            socket.write_all(&chunk[..n]).await?;
            sent += n as u64;
        }
        socket.shutdown().await?;
        drop(socket);
        let (got, end) = reader.await??;
        ensure!(got == total, "the reader got {got} of {total} bytes");
        Ok::<_, anyhow::Error>(total as f64 / end.duration_since(start).as_secs_f64() / 1e6)
    };
    tokio::time::timeout(max_time, transfer)
        .await
        .context("the TCP loopback baseline timed out")?
}

/// The events through `Store::ingest` of a fresh store (`Durability::Full`) in pages of
/// [`PAGE`], as the sync loop's pull delivers them, one after the other (no pipeline);
/// events/s.
async fn local_ingest(
    base: &Path,
    space: &SpaceName,
    events: &[Event],
    max_time: Duration,
) -> Result<f64> {
    let dir = common::tempdir(Some(base))?;
    let store = Store::open(
        &dir.path().join("store"),
        SigningKey::from_bytes(&[1; 32]),
        StoreConfig::default(),
    )?;
    store
        .configure_space(space, PolicyKind::Lww.policy())
        .await?;
    let pages: Vec<Vec<Event>> = events.chunks(PAGE).map(<[Event]>::to_vec).collect();
    let start = Instant::now();
    let deadline = start + max_time;
    let mut applied = 0usize;
    for page in pages {
        if Instant::now() >= deadline {
            bail!("local ingest: more than {max_time:?}");
        }
        applied += store.ingest(space, page).await?.applied.len();
    }
    let secs = start.elapsed().as_secs_f64();
    ensure!(
        applied == events.len(),
        "local ingest applied {applied} of {}",
        events.len()
    );
    drop(store);
    Ok(applied as f64 / secs)
}
