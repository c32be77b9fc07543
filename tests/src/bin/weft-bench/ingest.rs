//! `weft-bench ingest`: remote pages of signed events fed to `Store::ingest`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Result};
use weft_crdt::{Event, Hlc, NodeId, Op, SigningKey, SpaceName, UnsignedEvent, VectorClock};
use weft_store::{Durability, Store, StoreConfig};

use crate::common::{self, median, note, Figure};

#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Events per variant (pre-generated and signed before timing).
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Events per ingested page.
    #[arg(long, default_value_t = 1_000)]
    page: usize,
    /// Origins of the multi-origin variant (0 skips it).
    #[arg(long, default_value_t = 4)]
    origins: usize,
    /// Distinct keys the events write (round robin).
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Payload size in bytes (a CBOR byte string).
    #[arg(long, default_value_t = 200)]
    value_bytes: usize,
    /// Rounds (store run and baselines each round); every figure is the median.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Skip the diagnostic figures (verify-only rate, ingest with Durability::Relaxed).
    #[arg(long)]
    no_diag: bool,
    /// Give up on one ingest run after this many seconds (the rate covers what was done).
    #[arg(long, default_value_t = 60.0)]
    max_secs: f64,
    /// Parent of the temporary directories (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
}

pub async fn run(args: Args) -> Result<()> {
    ensure!(
        args.repeat >= 1 && args.page >= 1 && args.events >= 1 && args.keys >= 1,
        "--repeat, --page, --events and --keys must be positive"
    );
    let space = SpaceName::new("bench")?;
    let base = args.dir.as_deref();
    let max_time = Duration::from_secs_f64(args.max_secs);
    let mut figures = Vec::new();

    // Variant 1: one origin's chain.
    let t = Instant::now();
    let chain = {
        let (space, n, keys, vb) = (space.clone(), args.events, args.keys, args.value_bytes);
        tokio::task::spawn_blocking(move || multi_origin(&space, 1, n, keys, vb)).await?
    };
    note(format!(
        "generated and signed {} chain events in {:.2} s",
        chain.len(),
        t.elapsed().as_secs_f64()
    ));
    let mut variants = vec![("chain", chain)];
    if args.origins >= 1 {
        let t = Instant::now();
        let events = {
            let (space, o, n, keys, vb) = (
                space.clone(),
                args.origins,
                args.events,
                args.keys,
                args.value_bytes,
            );
            tokio::task::spawn_blocking(move || multi_origin(&space, o, n, keys, vb)).await?
        };
        note(format!(
            "generated and signed {} events of {} origins in {:.2} s",
            events.len(),
            args.origins,
            t.elapsed().as_secs_f64()
        ));
        variants.push(("multi_origin", events));
    }

    for (name, events) in &variants {
        let encoded: Vec<Vec<u8>> = events.iter().map(Event::encode).collect();
        let avg_bytes = encoded.iter().map(Vec::len).sum::<usize>() as f64 / encoded.len() as f64;
        let suffix = if *name == "chain" {
            String::new()
        } else {
            format!("_{name}")
        };
        figures.push(Figure::new(format!("event_bytes{suffix}"), avg_bytes, "B"));

        // Each round: the per-page baseline before and after the store run (so a disk
        // whose speed drifts biases neither side), then the per-10k baseline. Ratios are
        // taken within a round; every figure is the median over rounds.
        let mut ingest = Vec::new();
        let mut per_page = Vec::new();
        let mut per_10k = Vec::new();
        let mut ratio = Vec::new();
        let mut ratio_10k = Vec::new();
        let mut keyed = Vec::new();
        let mut keyed_ratio = Vec::new();
        let values: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
        let record_keys: Vec<&[u8]> = events.iter().map(|e| e.key.as_bytes()).collect();
        let n = events.len() as u64;
        let page = args.page as u64;
        for r in 0..args.repeat {
            let dir = common::tempdir(base)?;
            let before = common::heed_batched_append(
                &dir.path().join("before"),
                &values,
                n,
                page,
                max_time,
            )?;
            let rate =
                measure_ingest(base, &space, events, args.page, Durability::Full, max_time).await?;
            let after =
                common::heed_batched_append(&dir.path().join("after"), &values, n, page, max_time)?;
            let k = common::heed_batched_append(
                &dir.path().join("per-10k"),
                &values,
                n,
                10_000,
                max_time,
            )?;
            // The same record count twice: records over total time is the harmonic mean.
            let p = 2.0 / (1.0 / before + 1.0 / after);
            if !args.no_diag {
                // The same, plus one key-index entry per event: raw heed's own cost of
                // indexing these keys, with no store CPU.
                let kr = common::heed_batched_append_keyed(
                    &dir.path().join("keyed"),
                    &values,
                    &record_keys,
                    n,
                    page,
                    max_time,
                )?;
                note(format!(
                    "round {}: heed batched append with a key index, commit per page: {kr:.0}/s = {:.1}% of the plain one",
                    r + 1,
                    100.0 * kr / p
                ));
                keyed.push(kr);
                keyed_ratio.push(100.0 * kr / p);
            }
            note(format!(
                "round {}: ingest {name}: {rate:.0} events/s; heed batched append of the same bytes: {before:.0}/s and {after:.0}/s per page, {k:.0}/s per 10k",
                r + 1
            ));
            ingest.push(rate);
            per_page.push(p);
            per_10k.push(k);
            ratio.push(100.0 * rate / p);
            ratio_10k.push(100.0 * rate / k);
        }
        figures.push(Figure::new(
            format!("ingest{suffix}"),
            median(ingest),
            "events/s",
        ));
        figures.push(Figure::new(
            format!("baseline_heed_batched_append{suffix}"),
            median(per_page),
            "records/s",
        ));
        figures.push(Figure::new(
            format!("baseline_heed_batched_append{suffix}_commit_10k"),
            median(per_10k),
            "records/s",
        ));
        figures.push(Figure::new(
            format!("ingest{suffix}_vs_batched_append"),
            median(ratio),
            "%",
        ));
        figures.push(Figure::new(
            format!("ingest{suffix}_vs_batched_append_commit_10k"),
            median(ratio_10k),
            "%",
        ));

        if !args.no_diag {
            figures.push(Figure::new(
                format!("diag_heed_batched_append{suffix}_keyed"),
                median(keyed),
                "records/s",
            ));
            figures.push(Figure::new(
                format!("diag_heed_batched_append{suffix}_keyed_vs_batched_append"),
                median(keyed_ratio),
                "%",
            ));
            // Where the time goes: the signature/hash check alone (what `ingest` runs on a
            // blocking thread before the writer sees the page), and the whole ingest
            // without the fsync per commit.
            let t = Instant::now();
            for page in events.chunks(args.page) {
                weft_crdt::sync::verify_batch(&space, page)
                    .map_err(|(id, e)| anyhow::anyhow!("{id}: {e}"))?;
            }
            let verify = events.len() as f64 / t.elapsed().as_secs_f64();
            let relaxed = measure_ingest(
                base,
                &space,
                events,
                args.page,
                Durability::relaxed(),
                max_time,
            )
            .await?;
            note(format!(
                "diag {name}: verify only {verify:.0} events/s; ingest with Durability::Relaxed {relaxed:.0} events/s"
            ));
            figures.push(Figure::new(
                format!("diag_verify_only{suffix}"),
                verify,
                "events/s",
            ));
            figures.push(Figure::new(
                format!("diag_ingest{suffix}_relaxed_durability"),
                relaxed,
                "events/s",
            ));
        }
    }
    common::report(
        "weft-bench ingest (Durability::Full, pages fed one after another)",
        &figures,
        args.json,
    )
}

/// Ingests `events` page by page into a fresh store, waiting for each page's answer;
/// returns events/s. Checks every event was applied.
async fn measure_ingest(
    base: Option<&Path>,
    space: &SpaceName,
    events: &[Event],
    page: usize,
    durability: Durability,
    max_time: Duration,
) -> Result<f64> {
    let dir = common::tempdir(base)?;
    let store = Store::open(
        &dir.path().join("store"),
        SigningKey::from_bytes(&[1; 32]),
        StoreConfig {
            durability,
            ..StoreConfig::default()
        },
    )?;
    // Copied before timing: the pages a puller would hold after decoding.
    let pages: Vec<Vec<Event>> = events.chunks(page).map(<[Event]>::to_vec).collect();
    let cpu_start = common::process_cpu_secs();
    let disk_start = common::process_write_bytes();
    let start = Instant::now();
    let deadline = start + max_time;
    let mut applied = 0usize;
    for page in pages {
        if Instant::now() >= deadline {
            note("ingest: time limit reached; the rate covers the pages done");
            break;
        }
        let n = page.len();
        let out = store.ingest(space, page).await?;
        ensure!(
            out.applied.len() == n && out.parked == 0 && out.duplicates == 0,
            "page of {n}: applied {}, parked {}, duplicates {}",
            out.applied.len(),
            out.parked,
            out.duplicates
        );
        applied += n;
    }
    let secs = start.elapsed().as_secs_f64();
    let per = (applied.max(1)) as f64;
    let cpu_us = (common::process_cpu_secs() - cpu_start) * 1e6 / per;
    let disk = common::process_write_bytes().saturating_sub(disk_start) as f64 / per;
    note(format!(
        "ingest ({durability:?}): {applied} events in {secs:.2} s, process CPU {cpu_us:.1} µs and {disk:.0} disk bytes per event"
    ));
    let stats = store.stats(space).await?;
    ensure!(
        stats.events == applied as u64,
        "store holds {} events, {applied} were applied",
        stats.events
    );
    drop(store);
    drop(dir);
    Ok(applied as f64 / secs)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `total` events of `origins` origins (keys other than the store's), interleaved round
/// robin in causal order: origin j's event s has seen every other origin's events up to
/// where the interleaving is (`s` for origins before j, `s - 1` after), as a replica
/// that is writing while it syncs would. One origin gives a plain chain. Chains are
/// signed in parallel (they depend only on their own previous hashes).
fn multi_origin(
    space: &SpaceName,
    origins: usize,
    total: u64,
    keys: u64,
    value_bytes: usize,
) -> Vec<Event> {
    let signers: Vec<SigningKey> = (0..origins)
        .map(|j| SigningKey::from_bytes(&[2 + j as u8; 32]))
        .collect();
    let ids: Vec<NodeId> = signers.iter().map(NodeId::of).collect();
    let per_origin = total.div_ceil(origins as u64);
    let wall = now_ms();
    let chains: Vec<Vec<Event>> = std::thread::scope(|scope| {
        let handles: Vec<_> = signers
            .iter()
            .enumerate()
            .map(|(j, key)| {
                let ids = &ids;
                scope.spawn(move || {
                    let mut out: Vec<Event> = Vec::with_capacity(per_origin as usize);
                    let mut prev = None;
                    for s in 1..=per_origin {
                        let n = (s - 1) * origins as u64 + j as u64; // position in the stream
                        if n >= total {
                            break;
                        }
                        let mut clock = VectorClock::new();
                        for (i, id) in ids.iter().enumerate() {
                            let seen = if i <= j { s } else { s - 1 };
                            if seen > 0 {
                                clock.set(*id, seen);
                            }
                        }
                        let e = UnsignedEvent {
                            origin: ids[j],
                            seq: s,
                            clock,
                            hlc: Hlc::new(wall + n / 1000, (n % 1000) as u16),
                            key: format!("k/{}", n % keys),
                            op: Op::Put,
                            kind: String::new(),
                            payload: common::cbor_value(value_bytes, n),
                            meta: Default::default(),
                            prev,
                        }
                        .sign(space, key);
                        prev = Some(e.hash());
                        out.push(e);
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("generator thread panicked"))
            .collect()
    });
    let mut iters: Vec<_> = chains.into_iter().map(Vec::into_iter).collect();
    let mut out = Vec::with_capacity(total as usize);
    'outer: for _ in 0..per_origin {
        for it in iters.iter_mut() {
            match it.next() {
                Some(e) => out.push(e),
                None => break 'outer,
            }
        }
    }
    out
}
