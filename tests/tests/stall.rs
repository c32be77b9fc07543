//! A catch-up whose source stops answering (issue 5): a pull that makes no progress for
//! a bounded time is abandoned and resumed, from the same or another peer, where it
//! stopped.
//!
//! `weft run` processes on 127.0.0.1 (mDNS off). A source holds tens of thousands of
//! events; a fresh node bootstraps to it and, once it holds some but not all of them,
//! the source is frozen with SIGSTOP (its connections stay open; it just never answers
//! again until SIGCONT). Two cases:
//!
//! 1. The source is the only peer: nothing can arrive while it is frozen. It stays
//!    frozen past the node's page timeout (10 s), so the pull in flight is abandoned;
//!    after SIGCONT the catch-up must resume from the same peer and complete.
//! 2. A second peer holds the same events and stays reachable: the catch-up must
//!    complete from it while the source stays frozen.
//!
//! Both end with the fresh node holding exactly the source's version vector and as many
//! events as that vector counts (nothing lost, nothing twice). No timing is asserted:
//! every wait is a generous bound for a loaded 2-core machine.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use weft_tests::{wait_until, WeftProcess, DEFAULT_SPACE};

/// Events in the source's log: enough that a catch-up takes a while on any machine.
const EVENTS: usize = 40_000;
/// Writes per transaction while filling the source (the store's limit).
const TXN: usize = 256;
/// Distinct keys the filler writes (few, so `/status`'s digest stays cheap to compute).
const KEYS: usize = 1_000;
/// Longer than the node's page timeout (10 s, `SyncConfig::page_timeout`): a pull in
/// flight when the source froze has been given up by the time it runs again.
const FROZEN: Duration = Duration::from_secs(15);
/// Bound on a catch-up of [`EVENTS`] and on replication between the seed nodes.
const CATCH_UP: Duration = Duration::from_secs(180);
/// Bound on seeing the first events arrive at the fresh node.
const FIRST_EVENTS: Duration = Duration::from_secs(60);
/// Fresh nodes tried before giving up on freezing the source in the middle.
const ATTEMPTS: usize = 3;

/// Fills `node` with `EVENTS` puts of ~200-byte values, in transactions, over HTTP.
async fn fill(node: &WeftProcess) {
    let value = "v".repeat(200);
    let mut written = 0;
    while written < EVENTS {
        let n = TXN.min(EVENTS - written);
        let writes: Vec<Value> = (written..written + n)
            .map(|i| json!({"key": format!("stall/{}", i % KEYS), "value": format!("{value}{i}")}))
            .collect();
        let body = json!({ "writes": writes }).to_string().into_bytes();
        let reply = node
            .http(
                reqwest::Method::POST,
                &format!("/spaces/{DEFAULT_SPACE}/transactions"),
                Some(("application/json", body)),
            )
            .await;
        if reply.status != 201 {
            node.fail(format!(
                "transaction of {n} writes: HTTP {} {}",
                reply.status, reply.body
            ));
        }
        written += n;
    }
}

/// The space's status entry over HTTP (cheaper than spawning `weft status`, so it can
/// be polled closely while a catch-up runs).
async fn space_status(node: &WeftProcess) -> Value {
    let reply = node.http(reqwest::Method::GET, "/status", None).await;
    if reply.status != 200 {
        node.fail(format!("GET /status: {} {}", reply.status, reply.body));
    }
    match reply.json().pointer(&format!("/spaces/{DEFAULT_SPACE}")) {
        Some(entry) => entry.clone(),
        None => node.fail(format!("/status has no space {DEFAULT_SPACE}")),
    }
}

async fn event_count(node: &WeftProcess) -> u64 {
    let entry = space_status(node).await;
    entry
        .get("events")
        .and_then(Value::as_u64)
        .unwrap_or_else(|| node.fail(format!("status without an events count: {entry}")))
}

async fn version_vector(node: &WeftProcess) -> BTreeMap<String, u64> {
    let entry = space_status(node).await;
    let Some(vv) = entry.get("version_vector").and_then(Value::as_object) else {
        node.fail(format!("status without a version vector: {entry}"));
    };
    vv.iter()
        .map(|(origin, seq)| match seq.as_u64() {
            Some(seq) => (origin.clone(), seq),
            None => node.fail(format!("version vector entry {origin}: {seq}")),
        })
        .collect()
}

/// A source node holding [`EVENTS`] events; returns it with its version vector.
async fn filled_source() -> (WeftProcess, BTreeMap<String, u64>) {
    let source = WeftProcess::start().await;
    let started = Instant::now();
    fill(&source).await;
    let vv = version_vector(&source).await;
    let total: u64 = vv.values().sum();
    assert_eq!(total, EVENTS as u64, "the source holds {vv:?}");
    eprintln!(
        "filled the source with {EVENTS} events in {:.1?}",
        started.elapsed()
    );
    (source, vv)
}

/// Starts a fresh node bootstrapping to `peers`, waits (polling closely) until it holds
/// some events, and freezes `source` at once. Returns the fresh node and its event count
/// read right after the freeze (so at least what it held when the source stopped), or
/// `None` when that count was already complete: the freeze missed the middle, and the
/// source runs again and the fresh node is stopped.
async fn freeze_mid_catch_up(
    source: &WeftProcess,
    peers: &[&WeftProcess],
) -> Option<(WeftProcess, u64)> {
    let mut builder = WeftProcess::builder();
    for p in peers {
        builder = builder.bootstrap(p.listen_addr());
    }
    let mut fresh = builder.start().await;
    let deadline = Instant::now() + FIRST_EVENTS;
    let mut seen = 0;
    while seen == 0 {
        if Instant::now() > deadline {
            fresh.fail(format!("no event arrived within {FIRST_EVENTS:?}"));
        }
        seen = event_count(&fresh).await;
    }
    source.pause();
    let after = event_count(&fresh).await;
    eprintln!("froze the source with the fresh node at {seen}, then {after}, of {EVENTS} events");
    if after >= EVENTS as u64 {
        source.resume();
        fresh.stop().await;
        return None;
    }
    Some((fresh, after))
}

/// [`freeze_mid_catch_up`] with a fresh node each time, until a freeze lands in the
/// middle of a catch-up.
async fn freeze_with_retries(source: &WeftProcess, peers: &[&WeftProcess]) -> (WeftProcess, u64) {
    for attempt in 1..=ATTEMPTS {
        if let Some(frozen) = freeze_mid_catch_up(source, peers).await {
            return frozen;
        }
        eprintln!("attempt {attempt}: the catch-up finished before the freeze landed");
    }
    panic!("in {ATTEMPTS} attempts no freeze landed in the middle of a catch-up");
}

/// Whether the node's log says a pull was interrupted and resumed (informational: the
/// wording is the node's, not a contract).
fn report_resumes(node: &WeftProcess) {
    let log = std::fs::read_to_string(node.stderr_log()).unwrap_or_default();
    let resumed = log.lines().filter(|l| l.contains("resuming")).count();
    eprintln!("the fresh node's log mentions {resumed} resumed pull(s)");
}

/// Asserts `node` ends with exactly `vv` and as many events as it counts.
async fn assert_caught_up(node: &WeftProcess, vv: &BTreeMap<String, u64>) {
    wait_until(
        "the fresh node holds the source's version vector",
        CATCH_UP,
        Duration::from_millis(500),
        async || version_vector(node).await == *vv,
    )
    .await;
    let total: u64 = vv.values().sum();
    let entry = space_status(node).await;
    assert_eq!(
        entry.get("events").and_then(Value::as_u64),
        Some(total),
        "events applied differ from the version vector's count: {entry}"
    );
    assert_eq!(
        entry.get("pending").and_then(Value::as_u64),
        Some(0),
        "events left pending: {entry}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_stalled_by_its_only_source_resumes_where_it_stopped() {
    let (source, vv) = filled_source().await;
    let (fresh, at_freeze) = freeze_with_retries(&source, &[&source]).await;
    eprintln!("the fresh node held {at_freeze} of {EVENTS} events when the source froze");

    // Nobody else holds the events: the catch-up stands still while the source is
    // frozen, past the page timeout.
    tokio::time::sleep(FROZEN).await;
    let during = event_count(&fresh).await;
    assert!(
        during < EVENTS as u64,
        "the fresh node got every event while its only source was frozen"
    );
    eprintln!("{during} of {EVENTS} events after {FROZEN:?} frozen; resuming the source");
    source.resume();

    let resumed = Instant::now();
    assert_caught_up(&fresh, &vv).await;
    eprintln!(
        "caught up {:.1?} after the source resumed",
        resumed.elapsed()
    );
    report_resumes(&fresh);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_completes_from_another_peer_while_its_source_stays_frozen() {
    let (source, vv) = filled_source().await;
    // A second peer with the same events, taken from the source.
    let other = WeftProcess::builder()
        .bootstrap(source.listen_addr())
        .start()
        .await;
    wait_until(
        "the second peer holds the source's events",
        CATCH_UP,
        Duration::from_millis(500),
        async || version_vector(&other).await == vv,
    )
    .await;

    // The fresh node knows both; the source freezes as soon as events arrive.
    let (fresh, at_freeze) = freeze_with_retries(&source, &[&source, &other]).await;
    eprintln!("the fresh node held {at_freeze} of {EVENTS} events when the source froze");
    let started = Instant::now();
    assert_caught_up(&fresh, &vv).await;
    eprintln!(
        "caught up from the second peer {:.1?} after the freeze, the source still frozen",
        started.elapsed()
    );
    report_resumes(&fresh);
    source.resume();
}
