//! Seeded simulation of a weft mesh, driven only through the sans-I/O sync core.
//!
//! Each seed builds 3–6 in-memory [`Replica`]s of one space under one policy and runs
//! rounds of: local writes (gossiped to every peer as they happen), pull requests and
//! their paged responses, and message deliveries through a simulated network that
//! drops, duplicates and reorders messages and cuts the mesh into partitions that
//! change over time. A gossip message that leaves a gap triggers a pull, as in the
//! node. Then the network heals: remaining messages are delivered, and every replica
//! pulls from every other, page by page, until they agree (bounded rounds). Every
//! replica must then hold every write, read every key the same, and have the same
//! version vector and state digest.
//!
//! `WEFT_SIM_SEEDS` (default 1000) seeds are run from `WEFT_SIM_SEED` (default 0); a
//! failure names its seed and the command that replays it alone.

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use ciborium::Value;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use weft_crdt::sync::Replica;
use weft_crdt::{
    Event, FnResolver, Op, Policy, PolicyKind, Resolution, SigningKey, SpaceName, VersionVector,
};

/// One message on the simulated network.
#[derive(Clone, Debug)]
enum Payload {
    /// A gossip batch: events pushed as they are written.
    Gossip(Vec<Event>),
    /// `Pull { have }`: the sender wants what it lacks.
    Pull(VersionVector),
    /// A page of events answering a pull.
    Page(Vec<Event>, bool),
}

#[derive(Clone, Debug)]
struct Message {
    from: usize,
    to: usize,
    payload: Payload,
}

/// Chances per delivery, in percent. High enough that every seed exercises loss,
/// duplication and parking; low enough that progress is made before the heal.
const DROP_PERCENT: u32 = 15;
const DUPLICATE_PERCENT: u32 = 10;
/// Chance per step that the partition changes.
const REPARTITION_PERCENT: u32 = 8;
/// Anti-entropy rounds the heal may take. Two always suffice (the first spreads every
/// event to the last puller, the second from it to everyone); more means a bug.
const HEAL_ROUNDS: usize = 4;

struct Sim {
    rng: StdRng,
    replicas: Vec<Replica>,
    kind: Option<PolicyKind>,
    keys: u8,
    queue: Vec<Message>,
    /// `group[i]`: which side of the cut replica `i` is on; messages across are lost.
    group: Vec<u8>,
    wall_ms: u64,
    writes: u64,
}

fn cbor(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).expect("encoding into a Vec");
    out
}

fn custom_resolver() -> Policy {
    // Smallest origin's put wins: deliberately unlike last-writer-wins.
    Policy::Resolve(Arc::new(FnResolver::new("first-origin", 1, |frontier| {
        Resolution {
            value: frontier
                .iter()
                .copied()
                .filter(|e| e.op == Op::Put)
                .min_by_key(|e| (e.origin, e.seq)),
            siblings: Vec::new(),
        }
    })))
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = rng.gen_range(3..=6);
        let (policy, kind) = match rng.gen_range(0..6) {
            0 => (PolicyKind::Lww.policy(), Some(PolicyKind::Lww)),
            1 => (PolicyKind::Multi.policy(), Some(PolicyKind::Multi)),
            2 => (PolicyKind::Counter.policy(), Some(PolicyKind::Counter)),
            3 => (PolicyKind::Set.policy(), Some(PolicyKind::Set)),
            4 => (PolicyKind::Json.policy(), Some(PolicyKind::Json)),
            _ => (custom_resolver(), None),
        };
        let space = SpaceName::new("sim").expect("valid space name");
        let replicas = (0..n)
            .map(|_| {
                let key = SigningKey::from_bytes(&rng.gen());
                Replica::new(space.clone(), policy.clone(), key)
            })
            .collect();
        Sim {
            keys: rng.gen_range(1..=4),
            rng,
            replicas,
            kind,
            queue: Vec::new(),
            group: vec![0; n],
            wall_ms: 1_700_000_000_000,
            writes: 0,
        }
    }

    fn payload(&mut self) -> Vec<u8> {
        let small = Value::from(self.rng.gen_range(-3i64..=5));
        match self.kind {
            Some(PolicyKind::Set) => {
                let op = if self.rng.gen_bool(0.3) {
                    "remove"
                } else {
                    "add"
                };
                let items = (0..self.rng.gen_range(0..=2))
                    .map(|_| Value::from(self.rng.gen_range(0i64..4)))
                    .collect();
                cbor(&Value::Map(vec![(
                    Value::Text(op.into()),
                    Value::Array(items),
                )]))
            }
            Some(PolicyKind::Json) => {
                let fields = (0..self.rng.gen_range(1..=2))
                    .map(|_| {
                        let name = ["title", "done", "owner"][self.rng.gen_range(0..3)];
                        let v = if self.rng.gen_bool(0.2) {
                            Value::Null
                        } else {
                            small.clone()
                        };
                        (Value::Text(name.into()), v)
                    })
                    .collect();
                cbor(&Value::Map(fields))
            }
            _ => cbor(&small),
        }
    }

    fn send(&mut self, from: usize, to: usize, payload: Payload) {
        self.queue.push(Message { from, to, payload });
    }

    fn local_write(&mut self) -> Result<(), String> {
        let who = self.rng.gen_range(0..self.replicas.len());
        // A third of the writes come as runs, the way a store's group commit makes
        // them: only the run's last event is signed and vouches for the others.
        let n = if self.rng.gen_bool(0.3) {
            self.rng.gen_range(2..=4)
        } else {
            1
        };
        let mut writes = Vec::with_capacity(n);
        for _ in 0..n {
            let key = format!("k{}", self.rng.gen_range(0..self.keys));
            let (op, body) = if self.rng.gen_bool(0.15) {
                (Op::Delete, Vec::new())
            } else {
                (Op::Put, self.payload())
            };
            writes.push((key, op, body));
        }
        // Clocks drift and sometimes step back; the HLC must cope.
        self.wall_ms =
            (self.wall_ms + self.rng.gen_range(0..20)).saturating_sub(self.rng.gen_range(0..5));
        let events = self.replicas[who]
            .write_run(writes, self.wall_ms)
            .map_err(|e| format!("local write refused: {e}"))?;
        self.writes += events.len() as u64;
        for peer in 0..self.replicas.len() {
            if peer != who {
                self.send(who, peer, Payload::Gossip(events.clone()));
            }
        }
        Ok(())
    }

    fn pull(&mut self, from: usize, to: usize) {
        let have = self.replicas[from].version_vector().clone();
        self.send(from, to, Payload::Pull(have));
    }

    fn page_size(&mut self) -> (usize, usize) {
        (self.rng.gen_range(1..=8), self.rng.gen_range(300..=4_000))
    }

    /// Delivers one message; `lossy` applies the partition, drops and duplicates.
    fn deliver(&mut self, m: Message, lossy: bool) -> Result<(), String> {
        if lossy {
            if self.group[m.from] != self.group[m.to] || self.rng.gen_ratio(DROP_PERCENT, 100) {
                return Ok(());
            }
            if self.rng.gen_ratio(DUPLICATE_PERCENT, 100) {
                self.queue.push(m.clone());
            }
        }
        match m.payload {
            Payload::Gossip(events) => {
                let out = self.replicas[m.to]
                    .ingest(events)
                    .map_err(|e| format!("replica {} refused gossip: {e}", m.to))?;
                if out.parked > 0 {
                    // A gap: fetch what is missing from the gossiper, as the node does.
                    self.pull(m.to, m.from);
                }
            }
            Payload::Pull(have) => {
                let (max_events, max_bytes) = self.page_size();
                let (events, done) = self.replicas[m.to].pull_page(&have, max_events, max_bytes);
                self.send(m.to, m.from, Payload::Page(events, done));
            }
            Payload::Page(events, done) => {
                self.replicas[m.to]
                    .ingest(events)
                    .map_err(|e| format!("replica {} refused a page: {e}", m.to))?;
                if !done {
                    self.pull(m.to, m.from);
                }
            }
        }
        Ok(())
    }

    fn repartition(&mut self) {
        let n = self.replicas.len();
        if self.rng.gen_bool(0.3) {
            self.group = vec![0; n];
        } else {
            let sides = self.rng.gen_range(2..=3);
            self.group = (0..n).map(|_| self.rng.gen_range(0..sides)).collect();
        }
    }

    fn run(&mut self) -> Result<(), String> {
        let target = self.rng.gen_range(20..=60);
        let n = self.replicas.len();
        let mut steps = 0u32;
        while self.writes < target {
            steps += 1;
            if self.rng.gen_ratio(REPARTITION_PERCENT, 100) {
                self.repartition();
            }
            match self.rng.gen_range(0..10) {
                0..=2 => self.local_write()?,
                3 => {
                    let (a, b) = (self.rng.gen_range(0..n), self.rng.gen_range(0..n));
                    if a != b {
                        self.pull(a, b);
                    }
                }
                _ if !self.queue.is_empty() => {
                    // Any queued message may go next: the network reorders freely.
                    let i = self.rng.gen_range(0..self.queue.len());
                    let m = self.queue.swap_remove(i);
                    self.deliver(m, true)?;
                }
                _ => {}
            }
            if steps > 100_000 {
                return Err("simulation made no progress".into());
            }
        }

        // Heal: no more cuts or losses. What is in flight arrives, in random order.
        self.group = vec![0; n];
        let mut bounded = 0;
        while !self.queue.is_empty() {
            let i = self.rng.gen_range(0..self.queue.len());
            let m = self.queue.swap_remove(i);
            // Answers to pulls generate more messages; pages are bounded by what is
            // missing, so this ends, but cap it so a bug shows as a failure.
            bounded += 1;
            if bounded > 100_000 {
                return Err("in-flight messages never drained".into());
            }
            self.deliver(m, false)?;
        }
        for round in 0.. {
            if self.converged() {
                break;
            }
            if round == HEAL_ROUNDS {
                return Err(format!(
                    "not converged after {HEAL_ROUNDS} anti-entropy rounds"
                ));
            }
            for a in 0..n {
                for b in 0..n {
                    if a != b {
                        self.pull_until_done(a, b)?;
                    }
                }
            }
        }
        self.check(self.writes)
    }

    fn pull_until_done(&mut self, puller: usize, from: usize) -> Result<(), String> {
        for _ in 0..10_000 {
            let (max_events, max_bytes) = self.page_size();
            let have = self.replicas[puller].version_vector().clone();
            let (events, done) = self.replicas[from].pull_page(&have, max_events, max_bytes);
            let out = self.replicas[puller]
                .ingest(events)
                .map_err(|e| format!("replica {puller} refused a heal page: {e}"))?;
            if out.parked > 0 {
                return Err(format!("a pull page left {} events parked", out.parked));
            }
            if done {
                return Ok(());
            }
        }
        Err("pulling never finished".into())
    }

    fn converged(&self) -> bool {
        let first = self.replicas[0].version_vector();
        self.replicas.iter().all(|r| r.version_vector() == first)
    }

    fn check(&self, writes: u64) -> Result<(), String> {
        let first = &self.replicas[0];
        if first.version_vector().total() != writes {
            return Err(format!(
                "{} events replicated, {writes} written",
                first.version_vector().total()
            ));
        }
        let keys: BTreeSet<&str> = first.keys().collect();
        for (i, r) in self.replicas.iter().enumerate() {
            if !r.pending().is_empty() {
                return Err(format!(
                    "replica {i} still has {} parked events",
                    r.pending().len()
                ));
            }
            if r.version_vector() != first.version_vector() {
                return Err(format!("replica {i}'s version vector differs"));
            }
            if r.keys().collect::<BTreeSet<_>>() != keys {
                return Err(format!("replica {i} has other keys"));
            }
            for key in &keys {
                let mine = r.read(key).map_err(|e| e.to_string())?;
                let theirs = first.read(key).map_err(|e| e.to_string())?;
                if mine != theirs {
                    return Err(format!(
                        "replica {i} reads {key} as {mine:?}, replica 0 as {theirs:?}"
                    ));
                }
            }
            if r.state_digest() != first.state_digest() {
                return Err(format!("replica {i}'s state digest differs"));
            }
        }
        Ok(())
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a non-negative integer, got {v:?}")),
        Err(_) => default,
    }
}

fn run_seed(seed: u64) -> Result<(), String> {
    match catch_unwind(AssertUnwindSafe(|| Sim::new(seed).run())) {
        Ok(result) => result,
        Err(panic) => Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into())),
    }
}

#[test]
fn replicas_converge_through_drops_duplicates_reorders_and_partitions() {
    let first = env_u64("WEFT_SIM_SEED", 0);
    let count = env_u64("WEFT_SIM_SEEDS", 1000);
    // Seeds are independent: spread them over the cores CI has.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8) as u64;
    let failures: Vec<(u64, String)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (first..first.saturating_add(count))
                        .filter(|seed| seed % threads == t)
                        .filter_map(|seed| run_seed(seed).err().map(|e| (seed, e)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect()
    });
    let mut failures = failures;
    failures.sort();
    for (seed, why) in &failures {
        eprintln!(
            "simulation failed for seed {seed} (rerun: WEFT_SIM_SEED={seed} WEFT_SIM_SEEDS=1 cargo test -p weft-crdt --test simulation): {why}"
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {count} seeds failed",
        failures.len()
    );
}
