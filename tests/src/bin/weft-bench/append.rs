//! `weft-bench append`: durable acknowledged appends through `Store::append`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use weft_crdt::{SigningKey, SpaceName};
use weft_store::{Durability, Store, StoreConfig, Write};

use crate::common::{self, median, note, Figure};

#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Concurrent writers, comma-separated; one measurement each.
    #[arg(long, value_parser = common::parse_list, default_value = "1,8,64")]
    writers: std::vec::Vec<usize>,
    /// Seconds each writer count runs (and the single-commit baseline runs).
    #[arg(long, default_value_t = 2.0)]
    secs: f64,
    /// Cap on the appends of each writer per measurement.
    #[arg(long, default_value_t = 1_000_000)]
    max_per_writer: u64,
    /// Value size in bytes (a CBOR byte string).
    #[arg(long, default_value_t = 200)]
    value_bytes: usize,
    /// Records of the batched-append baseline (committed per 10,000).
    #[arg(long, default_value_t = 1_000_000)]
    batched_records: u64,
    /// Rounds (store runs and baselines each round); every figure is the median.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Skip the diagnostic figures (CPU per append, the largest writer count with
    /// Durability::Relaxed).
    #[arg(long)]
    no_diag: bool,
    /// Parent of the temporary directories (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
}

pub async fn run(args: Args) -> Result<()> {
    ensure!(
        args.repeat >= 1 && args.secs > 0.0,
        "--repeat and --secs must be positive"
    );
    let secs = Duration::from_secs_f64(args.secs);
    let value = common::cbor_value(args.value_bytes, 1);
    let base = args.dir.as_deref();
    let mut figures = Vec::new();

    // Every round measures the store and its baselines back to back, same disk, same
    // value bytes: the single-commit baseline in two halves around the store runs, so
    // that a disk whose fsync latency drifts (shared virtual disks do) biases neither.
    // Ratios are taken within a round; every figure is the median over rounds.
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); args.writers.len()];
    let mut p50s: Vec<Vec<f64>> = vec![Vec::new(); args.writers.len()];
    let mut p99s: Vec<Vec<f64>> = vec![Vec::new(); args.writers.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); args.writers.len()];
    let mut cpus: Vec<Vec<f64>> = vec![Vec::new(); args.writers.len()];
    let mut per_commit: Vec<Vec<f64>> = vec![Vec::new(); args.writers.len()];
    let mut disk: Vec<Vec<f64>> = vec![Vec::new(); args.writers.len()];
    let mut single = Vec::new();
    let mut batched = Vec::new();
    // Raw heed's own group commit with the store's record shape, per round.
    let most = args.writers.iter().copied().max().unwrap_or(1) as u64;
    let event_bytes = sample_event(&value, 2).seal_unsigned().encode();
    let mut ceilings: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); 2];
    for r in 0..args.repeat {
        let dir = common::tempdir(base)?;
        let half = secs / 2;
        let before = single_commit(&dir.path().join("single-before"), &value, half).await?;
        let mut round = Vec::new();
        for (i, &writers) in args.writers.iter().enumerate() {
            ensure!(writers >= 1, "a writer count must be at least 1");
            let m = measure_store(
                base,
                writers,
                &value,
                secs,
                args.max_per_writer,
                Durability::Full,
            )
            .await?;
            note(format!(
                "round {}: {writers} writers: {} acked in {:.2} s = {:.0}/s, p50 {:.0} µs, p99 {:.0} µs, process CPU {:.0} µs per append, {:.1} appends per commit, {:.0} disk bytes per append",
                r + 1,
                m.acked,
                m.secs,
                m.rate(),
                m.p50_us,
                m.p99_us,
                m.cpu_us_per_append(),
                m.appends_per_commit(),
                m.disk_bytes_per_append()
            ));
            cpus[i].push(m.cpu_us_per_append());
            per_commit[i].push(m.appends_per_commit());
            disk[i].push(m.disk_bytes_per_append());
            rates[i].push(m.rate());
            p50s[i].push(m.p50_us);
            p99s[i].push(m.p99_us);
            round.push(m.rate());
        }
        let after = single_commit(&dir.path().join("single-after"), &value, half).await?;
        // Records over time of both halves (equal durations): the arithmetic mean.
        let s = (before + after) / 2.0;
        if !args.no_diag {
            let shapes = [
                common::GroupShape::LogOnly,
                common::GroupShape::Keyed { writers: most },
            ];
            for (i, shape) in shapes.into_iter().enumerate() {
                let (path, bytes) = (dir.path().join(format!("group-{i}")), event_bytes.clone());
                let rate = tokio::task::spawn_blocking(move || {
                    common::heed_group_commit(&path, &bytes, most, shape, half)
                })
                .await??;
                note(format!(
                    "round {}: heed group commit, {most} records of {} B per commit, {shape:?}: {rate:.0}/s = {:.1}x single commit",
                    r + 1,
                    event_bytes.len(),
                    rate / s
                ));
                ceilings[i].0.push(rate);
                ceilings[i].1.push(rate / s);
            }
        }
        let v = value.clone();
        let path = dir.path().join("batched");
        let n = args.batched_records;
        let b = tokio::task::spawn_blocking(move || {
            common::heed_batched_append(&path, &[&v], n, 10_000, Duration::from_secs(60))
        })
        .await??;
        note(format!(
            "round {}: heed durable single commit {before:.0}/s before, {after:.0}/s after; batched append {b:.0}/s",
            r + 1
        ));
        for (i, rate) in round.into_iter().enumerate() {
            ratios[i].push(rate / s);
        }
        single.push(s);
        batched.push(b);
    }
    for (i, &writers) in args.writers.iter().enumerate() {
        figures.push(Figure::new(
            format!("append_{writers}_writers"),
            median(rates[i].clone()),
            "appends/s",
        ));
        figures.push(Figure::new(
            format!("append_{writers}_writers_latency_p50"),
            median(p50s[i].clone()),
            "us",
        ));
        figures.push(Figure::new(
            format!("append_{writers}_writers_latency_p99"),
            median(p99s[i].clone()),
            "us",
        ));
        if !args.no_diag {
            figures.push(Figure::new(
                format!("diag_append_{writers}_writers_cpu_per_append"),
                median(cpus[i].clone()),
                "us",
            ));
            figures.push(Figure::new(
                format!("diag_append_{writers}_writers_appends_per_commit"),
                median(per_commit[i].clone()),
                "appends",
            ));
            figures.push(Figure::new(
                format!("diag_append_{writers}_writers_disk_bytes_per_append"),
                median(disk[i].clone()),
                "B",
            ));
        }
    }
    figures.push(Figure::new(
        "baseline_heed_durable_single_commit",
        median(single),
        "appends/s",
    ));
    figures.push(Figure::new(
        "baseline_heed_batched_append",
        median(batched),
        "records/s",
    ));
    for (i, &writers) in args.writers.iter().enumerate() {
        figures.push(Figure::new(
            format!("append_{writers}_vs_single_commit"),
            median(ratios[i].clone()),
            "x",
        ));
    }
    if !args.no_diag {
        for (name, (rates, ratios)) in ["log_only", "keyed"].into_iter().zip(ceilings) {
            figures.push(Figure::new(
                format!("diag_heed_group_commit_{most}_{name}"),
                median(rates),
                "records/s",
            ));
            figures.push(Figure::new(
                format!("diag_heed_group_commit_{most}_{name}_vs_single_commit"),
                median(ratios),
                "x",
            ));
        }
    }
    if let (false, Some(&most)) = (args.no_diag, args.writers.iter().max()) {
        // Where the time goes: the same run without an fsync per commit.
        let m = measure_store(
            base,
            most,
            &value,
            secs,
            args.max_per_writer,
            Durability::relaxed(),
        )
        .await?;
        note(format!(
            "diag: {most} writers with Durability::Relaxed: {:.0}/s, p50 {:.0} µs, process CPU {:.0} µs per append, {:.1} appends per commit",
            m.rate(),
            m.p50_us,
            m.cpu_us_per_append(),
            m.appends_per_commit()
        ));
        figures.push(Figure::new(
            format!("diag_append_{most}_writers_relaxed_durability"),
            m.rate(),
            "appends/s",
        ));
        figures.push(Figure::new(
            format!("diag_append_{most}_writers_relaxed_cpu_per_append"),
            m.cpu_us_per_append(),
            "us",
        ));
    }
    if !args.no_diag {
        // What the writer thread pays per append before any table is touched: signing
        // the event and hashing its encoding (the next event's `prev`), single-threaded.
        let (sign, hash) = sign_and_hash_cost(&value, 2_000)?;
        note(format!(
            "diag: sign {sign:.1} µs, encode+hash {hash:.1} µs per event"
        ));
        figures.push(Figure::new("diag_sign_per_event", sign, "us"));
        figures.push(Figure::new("diag_encode_and_hash_per_event", hash, "us"));
    }
    common::report(
        "weft-bench append (Durability::Full, values of 200 bytes unless --value-bytes)",
        &figures,
        args.json,
    )
}

/// An event shaped like the ones `append` makes here (one-entry clock, the bench's
/// value, a `prev` hash), signed by the bench's key.
fn sample_event(value: &[u8], seq: u64) -> weft_crdt::UnsignedEvent {
    use weft_crdt::{EventHash, Hlc, NodeId, Op, UnsignedEvent, VectorClock};
    let origin = NodeId::of(&SigningKey::from_bytes(&[1; 32]));
    let mut clock = VectorClock::new();
    clock.set(origin, seq);
    UnsignedEvent {
        origin,
        seq,
        clock,
        hlc: Hlc::new(1_700_000_000_000 + seq, 0),
        key: format!("w0/k{seq}"),
        op: Op::Put,
        kind: String::new(),
        payload: value.to_vec(),
        meta: Default::default(),
        prev: (seq > 1).then_some(EventHash([7; 32])),
    }
}

/// Microseconds per event to sign, and to encode and hash, `n` events shaped like the
/// ones `append` makes here (one-entry clock, 200-byte payload).
fn sign_and_hash_cost(value: &[u8], n: u64) -> Result<(f64, f64)> {
    let key = SigningKey::from_bytes(&[1; 32]);
    let space = SpaceName::new("bench")?;
    let mut sign = Duration::ZERO;
    let mut hash = Duration::ZERO;
    let mut prev = None;
    for seq in 1..=n {
        let mut e = sample_event(value, seq);
        e.prev = prev;
        let t = Instant::now();
        let e = e.sign(&space, &key);
        sign += t.elapsed();
        let t = Instant::now();
        prev = Some(e.hash());
        hash += t.elapsed();
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    Ok((per(sign), per(hash)))
}

/// The raw single-commit baseline on a blocking thread.
async fn single_commit(path: &std::path::Path, value: &[u8], secs: Duration) -> Result<f64> {
    let (path, value) = (path.to_path_buf(), value.to_vec());
    tokio::task::spawn_blocking(move || {
        common::heed_durable_single_commit(&path, &value, secs, u64::MAX)
    })
    .await?
}

struct Measured {
    acked: u64,
    secs: f64,
    cpu_secs: f64,
    /// Write transactions committed in the timed part.
    commits: u64,
    /// Bytes written to storage in the timed part.
    disk_bytes: u64,
    p50_us: f64,
    p99_us: f64,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.acked as f64 / self.secs
    }
    /// CPU time of the whole process (writers, runtime, store writer thread) per
    /// acknowledged append.
    fn cpu_us_per_append(&self) -> f64 {
        self.cpu_secs * 1e6 / self.acked.max(1) as f64
    }
    fn appends_per_commit(&self) -> f64 {
        self.acked as f64 / self.commits.max(1) as f64
    }
    fn disk_bytes_per_append(&self) -> f64 {
        self.disk_bytes as f64 / self.acked.max(1) as f64
    }
}

/// One fresh store, `writers` tasks appending sequentially until `secs` passes (or
/// `max_per_writer` each), every append awaited until durable.
async fn measure_store(
    base: Option<&std::path::Path>,
    writers: usize,
    value: &[u8],
    secs: Duration,
    max_per_writer: u64,
    durability: Durability,
) -> Result<Measured> {
    let dir = common::tempdir(base)?;
    let path = dir.path().join("store");
    // Commits before the timed part (open, warm-up), counted on a twin store.
    let setup_commits = {
        let twin = dir.path().join("twin");
        let store = Store::open(
            &twin,
            SigningKey::from_bytes(&[1; 32]),
            StoreConfig::default(),
        )?;
        store
            .append(
                &SpaceName::new("bench")?,
                Write::put("warmup", value.to_vec()),
            )
            .await?;
        drop(store);
        common::last_txn_id(&twin)?
    };
    let store = Store::open(
        &path,
        SigningKey::from_bytes(&[1; 32]),
        StoreConfig {
            durability,
            ..StoreConfig::default()
        },
    )?;
    let space = SpaceName::new("bench")?;
    // Warm-up: creates the space and touches the writer path once.
    store
        .append(&space, Write::put("warmup", value.to_vec()))
        .await?;

    let cpu_start = common::process_cpu_secs();
    let disk_start = common::process_write_bytes();
    let start = Instant::now();
    let deadline = start + secs;
    let mut tasks = Vec::with_capacity(writers);
    for w in 0..writers {
        let store = store.clone();
        let space = space.clone();
        let value = value.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i: u64 = 0;
            while i < max_per_writer && Instant::now() < deadline {
                let t = Instant::now();
                store
                    .append(&space, Write::put(format!("w{w}/k{i}"), value.clone()))
                    .await?;
                latencies.push(t.elapsed().as_secs_f64() * 1e6);
                i += 1;
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu_secs = common::process_cpu_secs() - cpu_start;
    let disk_bytes = common::process_write_bytes().saturating_sub(disk_start);
    let acked = latencies.len() as u64;
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    let stats = store.stats(&space).await?;
    ensure!(
        stats.events == acked + 1,
        "store holds {} events, {} were acknowledged",
        stats.events,
        acked + 1
    );
    drop(store);
    let commits = common::last_txn_id(&path)?.saturating_sub(setup_commits);
    let m = Measured {
        acked,
        secs,
        cpu_secs,
        commits,
        disk_bytes,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    };
    drop(dir);
    Ok(m)
}
