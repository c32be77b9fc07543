//! Multi-host scenarios (issue 6): nodes in network namespaces that find each other by
//! mDNS or through bootstrap addresses, are partitioned, killed in the middle of a
//! catch-up, restarted one after another, kept away for a long stretch of writes, and
//! shaken by a seeded random nemesis. Every scenario ends the same way: within a bounded
//! wait every node shows the same state digest and version vector, and every write a
//! node acknowledged (every id a `weft tx` printed) is in every node's log exactly once,
//! at contiguous local positions. Needs root; see `weft_tests::netns`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_tests::netns::{require_root, Lan};
use weft_tests::{parse_event_id, wait_until, DEFAULT_SPACE};

const DISCOVERY: Duration = Duration::from_secs(60);
const CONVERGE: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(500);

// ---- helpers ----

/// Every id a node acknowledged, by origin.
#[derive(Default)]
struct Acked {
    ids: Vec<String>,
}

impl Acked {
    fn extend(&mut self, ids: impl IntoIterator<Item = String>) {
        self.ids.extend(ids);
    }

    fn len(&self) -> usize {
        self.ids.len()
    }

    /// The highest acknowledged seq per origin.
    fn max_seq(&self) -> BTreeMap<String, u64> {
        let mut max = BTreeMap::new();
        for id in &self.ids {
            let (origin, seq) =
                parse_event_id(id).unwrap_or_else(|| panic!("acknowledged id {id:?} is malformed"));
            let entry = max.entry(origin.to_owned()).or_insert(0);
            *entry = (*entry).max(seq);
        }
        max
    }
}

/// `count` puts of `<prefix>/<i>` = `"<value>"`.
fn puts(prefix: &str, count: usize, value: &str) -> Vec<(String, String)> {
    (0..count)
        .map(|i| (format!("{prefix}/{i}"), format!("\"{value}\"")))
        .collect()
}

/// What `status --json` says about the default space of one node.
struct SpaceState {
    digest: String,
    vv: BTreeMap<String, u64>,
    events: u64,
    pending: u64,
}

async fn space_state(lan: &Lan, i: usize) -> SpaceState {
    let node = lan.weft(i);
    let entry = node.space_status(DEFAULT_SPACE).await;
    let digest = entry
        .get("digest")
        .and_then(Value::as_str)
        .unwrap_or_else(|| node.fail(format!("status without digest: {entry}")))
        .to_owned();
    let vv = entry
        .get("version_vector")
        .and_then(Value::as_object)
        .unwrap_or_else(|| node.fail(format!("status without version_vector: {entry}")))
        .iter()
        .map(|(origin, seq)| (origin.clone(), seq.as_u64().unwrap_or(0)))
        .collect();
    let n = |k: &str| entry.get(k).and_then(Value::as_u64).unwrap_or(u64::MAX);
    SpaceState {
        digest,
        vv,
        events: n("events"),
        pending: n("pending"),
    }
}

/// Waits (bounded by `timeout`) until every node in `nodes` shows the same digest and
/// version vector, nothing pending, and a version vector that covers every acknowledged
/// write; then checks each node's log: event count = version vector sum, local positions
/// contiguous, no id twice, every acknowledged id present.
async fn assert_converged(lan: &Lan, nodes: &[usize], acked: &Acked, timeout: Duration) {
    let started = Instant::now();
    let wanted = acked.max_seq();
    let mut last = String::new();
    let mut converged = false;
    while started.elapsed() < timeout {
        let mut states = Vec::new();
        for &i in nodes {
            states.push(space_state(lan, i).await);
        }
        let first = &states[0];
        let same = states
            .iter()
            .all(|s| s.digest == first.digest && s.vv == first.vv && s.pending == 0);
        let covers = wanted
            .iter()
            .all(|(origin, seq)| first.vv.get(origin).copied().unwrap_or(0) >= *seq);
        last = states
            .iter()
            .zip(nodes)
            .map(|(s, i)| {
                format!(
                    "  host {i}: digest {} events {} pending {} vv sum {}",
                    &s.digest[..s.digest.len().min(12)],
                    s.events,
                    s.pending,
                    s.vv.values().sum::<u64>()
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        if same && covers {
            converged = true;
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    assert!(
        converged,
        "no convergence within {timeout:?} ({} acknowledged writes):\n{last}",
        acked.len()
    );
    eprintln!(
        "converged in {:.1?} ({} acknowledged writes):\n{last}",
        started.elapsed(),
        acked.len()
    );

    let acked_ids: BTreeSet<&str> = acked.ids.iter().map(String::as_str).collect();
    assert_eq!(
        acked_ids.len(),
        acked.len(),
        "a node acknowledged an id twice"
    );
    for &i in nodes {
        let state = space_state(lan, i).await;
        let vv_sum: u64 = state.vv.values().sum();
        assert_eq!(
            state.events, vv_sum,
            "host {i}: event count differs from the version vector sum"
        );
        let lines = lan.weft(i).log_lines(DEFAULT_SPACE).await;
        assert_eq!(
            lines.len() as u64,
            state.events,
            "host {i}: `weft log` lines differ from the event count"
        );
        let mut ids = BTreeSet::new();
        let mut first_lsn = None;
        for (k, line) in lines.iter().enumerate() {
            let mut fields = line.split_whitespace();
            let lsn: u64 = fields
                .next()
                .and_then(|f| f.parse().ok())
                .unwrap_or_else(|| panic!("host {i}: log line without lsn: {line:?}"));
            let base = *first_lsn.get_or_insert(lsn);
            assert_eq!(
                lsn,
                base + k as u64,
                "host {i}: local positions not contiguous at line {k}"
            );
            let id = fields
                .next()
                .unwrap_or_else(|| panic!("host {i}: log line without id: {line:?}"));
            assert!(ids.insert(id.to_owned()), "host {i}: event {id} twice");
        }
        let missing: Vec<&&str> = acked_ids
            .iter()
            .filter(|id| !ids.contains(**id))
            .take(5)
            .collect();
        assert!(
            missing.is_empty(),
            "host {i} lacks acknowledged writes, e.g. {missing:?}"
        );
    }
}

/// Waits until every node in `nodes` is connected to at least `peers` others.
async fn await_peers(lan: &Lan, nodes: &[usize], peers: usize) {
    wait_until(
        &format!("every node has {peers} peers"),
        DISCOVERY,
        POLL,
        async || {
            for &i in nodes {
                if lan.weft(i).peers().await.len() < peers {
                    return false;
                }
            }
            true
        },
    )
    .await;
}

/// Starts `n` hosts with a node each, mDNS on.
async fn mdns_lan(n: usize) -> Lan {
    let mut lan = Lan::new(n);
    for i in 0..n {
        lan.start_weft(i, |node| node).await;
    }
    lan
}

/// Each node in `nodes` writes `per_node` puts (in transactions of at most 250) under
/// `<tag>/<host>/..`, all nodes at once.
async fn write_on(lan: &Lan, nodes: &[usize], tag: &str, per_node: usize, acked: &mut Acked) {
    let writes = nodes.iter().map(|&i| async move {
        let mut ids = Vec::new();
        let mut done = 0;
        while done < per_node {
            let n = (per_node - done).min(250);
            let batch: Vec<(String, String)> = (done..done + n)
                .map(|k| (format!("{tag}/{i}/{k}"), format!("\"v{k}\"")))
                .collect();
            ids.extend(lan.weft(i).tx_put(DEFAULT_SPACE, &batch).await);
            done += n;
        }
        ids
    });
    for ids in futures::future::join_all(writes).await {
        acked.extend(ids);
    }
}

fn report(name: &str, started: Instant) {
    eprintln!("{name}: {:.1?}", started.elapsed());
}

// ---- scenarios ----

/// 1. Five nodes find each other by mDNS alone, write on each, converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_find_each_other_by_mdns_alone_and_converge() {
    if !require_root() {
        return;
    }
    let started = Instant::now();
    let all = [0, 1, 2, 3, 4];
    let lan = mdns_lan(5).await;
    await_peers(&lan, &all, 4).await;

    let mut acked = Acked::default();
    write_on(&lan, &all, "mdns", 40, &mut acked).await;
    assert_converged(&lan, &all, &acked, CONVERGE).await;
    report("mdns", started);
}

/// 2. Five nodes joined only by bootstrap addresses in a chain (node i dials node i-1),
///    mDNS off, converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_chained_by_bootstrap_addresses_converge_without_mdns() {
    if !require_root() {
        return;
    }
    let started = Instant::now();
    let all = [0, 1, 2, 3, 4];
    let mut lan = Lan::new(5);
    lan.start_weft(0, |node| node.mdns(false)).await;
    for i in 1..5 {
        let previous = lan.lan_listen_addr(i - 1);
        lan.start_weft(i, |node| node.mdns(false).bootstrap(&previous))
            .await;
    }
    await_peers(&lan, &all, 1).await;

    let mut acked = Acked::default();
    write_on(&lan, &all, "chain", 40, &mut acked).await;
    assert_converged(&lan, &all, &acked, CONVERGE).await;
    report("bootstrap chain", started);
}

/// 3. Partition 2 | 3 (unreachable routes between the sides; each side talks within
///    itself), concurrent writes to overlapping keys on both sides, heal: every node
///    decides every conflict the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_three_partition_heals_and_conflicts_are_decided_identically() {
    if !require_root() {
        return;
    }
    let started = Instant::now();
    let all = [0, 1, 2, 3, 4];
    let (side_a, side_b) = ([0, 1], [2, 3, 4]);
    let lan = mdns_lan(5).await;
    await_peers(&lan, &all, 4).await;
    let mut acked = Acked::default();
    write_on(&lan, &all, "before", 5, &mut acked).await;
    assert_converged(&lan, &all, &acked, CONVERGE).await;

    lan.partition(&side_a, &side_b);
    // Connections across may linger (their packets now go nowhere); the reads below
    // show that nothing crosses.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Every node writes the same keys, with its own values, concurrently.
    let overlapping: Vec<String> = (0..10).map(|k| format!("shared/{k}")).collect();
    let writes = all.iter().map(|&i| {
        let batch: Vec<(String, String)> = overlapping
            .iter()
            .map(|key| (key.clone(), format!("\"from host {i}\"")))
            .chain(puts(&format!("own/{i}"), 10, "x"))
            .collect();
        let lan = &lan;
        async move { lan.weft(i).tx_put(DEFAULT_SPACE, &batch).await }
    });
    for ids in futures::future::join_all(writes).await {
        acked.extend(ids);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let across = lan.weft(0).get(DEFAULT_SPACE, "own/3/0").await;
    assert_eq!(
        across, None,
        "side A read side B's write through the partition"
    );
    let within = lan.weft(1).get(DEFAULT_SPACE, "own/0/0").await;
    assert!(within.is_some(), "side A does not replicate within itself");

    lan.heal_partition(&side_a, &side_b);
    assert_converged(&lan, &all, &acked, CONVERGE).await;
    for key in &overlapping {
        let mut values = Vec::new();
        for &i in &all {
            values.push(lan.weft(i).get(DEFAULT_SPACE, key).await);
        }
        assert!(values[0].is_some(), "{key} has no value");
        assert!(
            values.iter().all(|v| *v == values[0]),
            "{key} is decided differently: {values:?}"
        );
    }
    report("partition", started);
}

/// 4. A node killed (SIGKILL) in the middle of a catch-up of 20,000 events loses
///    nothing and duplicates nothing once it runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_in_the_middle_of_a_catch_up_loses_and_duplicates_nothing() {
    if !require_root() {
        return;
    }
    const BATCH: usize = 20_000;
    const ATTEMPTS: usize = 3;
    let started = Instant::now();
    let all = [0, 1, 2];
    let writers = [0, 1];
    let away = 2;
    let mut lan = mdns_lan(3).await;
    await_peers(&lan, &all, 2).await;
    let mut acked = Acked::default();

    let mut caught_mid_way = None;
    for attempt in 0..ATTEMPTS {
        // Away: stopped and cut off while the others write.
        lan.weft_mut(away).stop().await;
        lan.link_down(away);
        write_on(
            &lan,
            &writers,
            &format!("batch{attempt}"),
            BATCH / 2,
            &mut acked,
        )
        .await;
        // Every event in the space is an acknowledged write.
        let total = acked.len() as u64;
        lan.weft_mut(away).start_again().await;
        let before = lan.weft(away).event_count(DEFAULT_SPACE).await;
        lan.link_up(away);

        // Kill it as soon as it has some but not all.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = before;
        while seen == before && Instant::now() < deadline {
            seen = lan.weft(away).event_count(DEFAULT_SPACE).await;
        }
        lan.weft_mut(away).kill();
        eprintln!("attempt {attempt}: killed at {seen} of {total} events (had {before})");

        // Restart it cut off, to see what the killed run kept.
        lan.link_down(away);
        lan.weft_mut(away).start_again().await;
        let kept = lan.weft(away).event_count(DEFAULT_SPACE).await;
        let kept_state = space_state(&lan, away).await;
        assert_eq!(
            kept_state.events,
            kept_state.vv.values().sum::<u64>(),
            "after the kill: event count differs from the version vector sum"
        );
        lan.link_up(away);
        if kept > before && kept < total {
            caught_mid_way = Some((kept, total));
            break;
        }
        eprintln!("attempt {attempt}: kept {kept} of {total}: not in the middle, again");
        // Let it finish before the next attempt.
        assert_converged(&lan, &all, &acked, CONVERGE).await;
    }
    let (kept, total) = caught_mid_way.unwrap_or_else(|| {
        panic!("no kill landed in the middle of a catch-up in {ATTEMPTS} attempts")
    });
    eprintln!("the killed node had kept {kept} of {total} events");

    assert_converged(&lan, &all, &acked, CONVERGE).await;
    let state = space_state(&lan, away).await;
    assert_eq!(
        state.events as usize,
        acked.len(),
        "events beyond the acknowledged writes"
    );
    report("kill mid catch-up", started);
}

/// 5. Every node is stopped and started again, one at a time, while the others keep
///    writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_writes_loses_nothing() {
    if !require_root() {
        return;
    }
    let started = Instant::now();
    let all = [0, 1, 2, 3, 4];
    let mut lan = mdns_lan(5).await;
    await_peers(&lan, &all, 4).await;
    let mut acked = Acked::default();

    for down in all {
        lan.weft_mut(down).stop().await;
        let others: Vec<usize> = all.iter().copied().filter(|&i| i != down).collect();
        for round in 0..3 {
            write_on(&lan, &others, &format!("roll{down}-{round}"), 5, &mut acked).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        lan.weft_mut(down).start_again().await;
        write_on(&lan, &all, &format!("back{down}"), 3, &mut acked).await;
    }
    assert_converged(&lan, &all, &acked, CONVERGE).await;
    report("rolling restart", started);
}

/// 6. A node away for 50,000 events comes back and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_away_for_fifty_thousand_events_catches_up() {
    if !require_root() {
        return;
    }
    const AWAY_FOR: usize = 50_000;
    let started = Instant::now();
    let all = [0, 1, 2];
    let writers = [0, 1];
    let away = 2;
    let mut lan = mdns_lan(3).await;
    await_peers(&lan, &all, 2).await;
    let mut acked = Acked::default();
    write_on(&lan, &all, "before", 10, &mut acked).await;
    assert_converged(&lan, &all, &acked, CONVERGE).await;

    lan.weft_mut(away).stop().await;
    let writing = Instant::now();
    write_on(&lan, &writers, "while-away", AWAY_FOR / 2, &mut acked).await;
    eprintln!("wrote {AWAY_FOR} events in {:.1?}", writing.elapsed());

    lan.weft_mut(away).start_again().await;
    let catching_up = Instant::now();
    assert_converged(&lan, &all, &acked, Duration::from_secs(120)).await;
    eprintln!(
        "caught up on {AWAY_FOR} events in {:.1?}",
        catching_up.elapsed()
    );
    report("away for 50k", started);
}

/// A small deterministic generator (splitmix64), so a seed replays a schedule.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Proc {
    Running,
    /// Killed; started again at this tick.
    Killed(u64),
    /// Paused; resumed at this tick.
    Paused(u64),
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

/// 7. A seeded random nemesis: link cuts and heals, SIGKILL + restart, SIGSTOP +
///    SIGCONT of random nodes under a steady write load; then everything heals and the
///    nodes converge. `WEFT_NEMESIS_SECS` (default 60) sets its length,
///    `WEFT_NEMESIS_SEED` replays a schedule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_nemesis_under_writes_then_healing_converges() {
    if !require_root() {
        return;
    }
    const TICK: Duration = Duration::from_secs(1);
    const N: usize = 5;
    let seed = env_u64("WEFT_NEMESIS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let secs = env_u64("WEFT_NEMESIS_SECS").unwrap_or(60);
    eprintln!("nemesis seed {seed} (rerun: WEFT_NEMESIS_SEED={seed})");
    let started = Instant::now();
    let all: Vec<usize> = (0..N).collect();
    let mut lan = mdns_lan(N).await;
    await_peers(&lan, &all, N - 1).await;
    let mut rng = Rng(seed);
    let mut acked = Acked::default();
    let mut procs = [Proc::Running; N];
    let mut link_up = [true; N];
    let mut failed_writes = 0;
    let ticks = secs; // one tick a second

    for tick in 0..ticks {
        let tick_started = Instant::now();
        // Scheduled returns.
        for (i, proc) in procs.iter_mut().enumerate() {
            match *proc {
                Proc::Killed(at) if at <= tick => {
                    lan.weft_mut(i).start_again().await;
                    *proc = Proc::Running;
                }
                Proc::Paused(at) if at <= tick => {
                    lan.weft(i).resume();
                    *proc = Proc::Running;
                }
                _ => {}
            }
        }
        // One random fault (or none).
        let target = rng.below(N as u64) as usize;
        let hold = 2 + rng.below(6);
        let running = procs.iter().filter(|p| **p == Proc::Running).count();
        match rng.below(6) {
            0 if link_up[target] => {
                eprintln!("tick {tick}: cut host {target}");
                lan.link_down(target);
                link_up[target] = false;
            }
            1 => {
                if let Some(i) = (0..N).find(|&i| !link_up[(target + i) % N]) {
                    let i = (target + i) % N;
                    eprintln!("tick {tick}: reconnect host {i}");
                    lan.link_up(i);
                    link_up[i] = true;
                }
            }
            2 if procs[target] == Proc::Running && running > 2 => {
                eprintln!("tick {tick}: SIGKILL host {target} for {hold} s");
                lan.weft_mut(target).kill();
                procs[target] = Proc::Killed(tick + hold);
            }
            3 if procs[target] == Proc::Running && running > 2 => {
                eprintln!("tick {tick}: SIGSTOP host {target} for {hold} s");
                lan.weft(target).pause();
                procs[target] = Proc::Paused(tick + hold);
            }
            _ => {}
        }
        // The write load: a transaction of 3 puts on every running node.
        let writers: Vec<usize> = (0..N).filter(|&i| procs[i] == Proc::Running).collect();
        let lan_ref = &lan;
        let writes = writers.iter().map(|&i| async move {
            let batch = puts(&format!("nemesis/{i}/{tick}"), 3, &format!("t{tick}"));
            lan_ref.weft(i).try_tx_put(DEFAULT_SPACE, &batch).await
        });
        for ids in futures::future::join_all(writes).await {
            match ids {
                Some(ids) => acked.extend(ids),
                None => failed_writes += 1,
            }
        }
        if let Some(rest) = TICK.checked_sub(tick_started.elapsed()) {
            tokio::time::sleep(rest).await;
        }
    }

    eprintln!("nemesis over after {:.1?}: healing", started.elapsed());
    for (i, proc) in procs.iter().enumerate() {
        match proc {
            Proc::Killed(_) => lan.weft_mut(i).start_again().await,
            Proc::Paused(_) => lan.weft(i).resume(),
            Proc::Running => {}
        }
        if !link_up[i] {
            lan.link_up(i);
        }
    }
    assert_eq!(
        failed_writes, 0,
        "writes to running nodes failed (seed {seed})"
    );
    assert_converged(&lan, &all, &acked, CONVERGE).await;
    report(&format!("nemesis (seed {seed})"), started);
}
