//! [`crate::Node::sync_now`]: pull every space from every connected peer now, wait for
//! it, and report what moved.
//!
//! One *exchange* per (connected peer, hosted space that takes events in). Each runs
//! the sync loop's own pull (pipelined pages, stall timeout) through
//! [`sync::start_pull`], or joins the pull of that pair already running, and resumes
//! it from the same peer when it is interrupted in transit. Everything is bounded by
//! `SyncConfig::sync_timeout`; a pull still running then goes on in the background.
//!
//! Progress is counted from the pulls themselves (events applied, which counts each
//! event once however many peers send it) against what the peers' version vectors
//! show this node lacked when the sync began.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use weft_crdt::{SpaceName, VersionVector};
use weft_net::PeerId;

use crate::error::NodeError;
use crate::node::{store_error, Node};
use crate::sync::{self, PullError, PullTrack};

/// How often progress is computed while a sync runs.
const PROGRESS_TICK: Duration = Duration::from_millis(250);

/// The longest the progress callback goes uncalled while a sync runs, so a streaming
/// client (`POST /sync?progress=1`) can tell a long sync from a dead node.
const PROGRESS_HEARTBEAT: Duration = Duration::from_secs(1);

/// What one [`crate::Node::sync_now`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SyncReport {
    /// Per peer (PeerId) and space: what moved between this node and that peer. A
    /// space the peer does not host has no entry; a peer hosting none of this node's
    /// spaces has none at all.
    pub peers: BTreeMap<String, BTreeMap<String, ExchangeReport>>,
    /// Hosted spaces this sync did not pull because they are push-only here.
    pub push_only: Vec<String>,
    /// Events applied, over every exchange.
    pub pulled: u64,
    /// Events served to peers' pulls while the sync ran, over every exchange.
    pub pushed: u64,
    /// Exchanges that ended in an error.
    pub errors: u64,
    /// Peers connected when the sync began.
    pub connected_peers: u64,
    /// True when the sync's time bound ran out before every pull finished.
    pub timed_out: bool,
    /// How long the whole sync took, in milliseconds.
    pub duration_ms: u64,
}

/// What moved between this node and one peer for one space during a sync.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ExchangeReport {
    /// Events the pulls from this peer applied here: the pulled events, plus events that
    /// had arrived earlier (by gossip) and waited in the pending set for them. Events
    /// another peer delivered first are not counted again. When the sync joined a pull
    /// of the pair that was already running, what that pull applied before the sync
    /// began is included.
    pub pulled: u64,
    /// Events this node served to the peer's pulls of the space while the sync ran
    /// (a sync does not make peers pull; they do on their own schedule).
    pub pushed: u64,
    /// Pages the peer answered.
    pub pages: u64,
    /// Canonical encoded size of the events received, in bytes.
    pub bytes: u64,
    /// Events this node holds that the peer lacked at its last answer: what the peer
    /// will pull from here (or from others) on its own. `None` when it never answered.
    pub peer_lacks: Option<u64>,
    /// Why the exchange failed, if it did.
    pub error: Option<String>,
    /// How long the exchange took, in milliseconds.
    pub duration_ms: u64,
}

/// How far a running sync has come, for a progress bar.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SyncProgress {
    /// Events applied by the sync's pulls so far.
    pub applied: u64,
    /// Events the sync expects to apply: what the peers' version vectors show this node
    /// lacked when the sync began (refined as their answers arrive), never less than
    /// `applied`. Zero when nothing is known to be missing.
    pub expected: u64,
    /// Pages answered so far.
    pub pages: u64,
    /// Encoded bytes received so far.
    pub bytes: u64,
    /// Exchanges finished.
    pub exchanges_done: u64,
    /// Exchanges in this sync.
    pub exchanges: u64,
    /// Milliseconds since the sync began.
    pub elapsed_ms: u64,
}

/// The counts of one exchange, live: the pulls it finished plus the one it waits on.
#[derive(Default)]
struct Live {
    inner: Mutex<LiveCounts>,
}

#[derive(Default)]
struct LiveCounts {
    applied: u64,
    pages: u64,
    bytes: u64,
    current: Option<Arc<PullTrack>>,
    done: bool,
}

impl Live {
    fn lock(&self) -> std::sync::MutexGuard<'_, LiveCounts> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait_on(&self, track: Arc<PullTrack>) {
        self.lock().current = Some(track);
    }

    /// Folds the current pull's counts in; from here on they no longer change.
    fn settle(&self) {
        let mut c = self.lock();
        if let Some(t) = c.current.take() {
            c.applied += t.applied.load(Ordering::Relaxed);
            c.pages += t.pages.load(Ordering::Relaxed);
            c.bytes += t.bytes.load(Ordering::Relaxed);
        }
    }

    fn finish(&self) {
        self.settle();
        self.lock().done = true;
    }

    /// (applied, pages, bytes, done)
    fn now(&self) -> (u64, u64, u64, bool) {
        let c = self.lock();
        let (a, p, b) = c.current.as_ref().map_or((0, 0, 0), |t| {
            (
                t.applied.load(Ordering::Relaxed),
                t.pages.load(Ordering::Relaxed),
                t.bytes.load(Ordering::Relaxed),
            )
        });
        (c.applied + a, c.pages + p, c.bytes + b, c.done)
    }
}

/// How one exchange ended.
struct Outcome {
    hosted: bool,
    error: Option<String>,
    timed_out: bool,
    duration: Duration,
}

/// Runs one sync of `node`; see [`crate::Node::sync_now`].
pub(crate) async fn sync_now(
    node: &Node,
    on_progress: &mut (dyn FnMut(&SyncProgress) + Send),
) -> Result<SyncReport, NodeError> {
    let started = Instant::now();
    let inner = &node.inner;
    let deadline = tokio::time::Instant::now() + inner.sync_config.sync_timeout;
    let peers = inner.net.connected_peers().await?;
    let mut pulled_spaces = Vec::new();
    let mut push_only = Vec::new();
    for (space, mode) in &inner.modes {
        if mode.takes_remote_events() {
            pulled_spaces.push(space.clone());
        } else {
            push_only.push(space.to_string());
        }
    }
    let mut start_vv: HashMap<SpaceName, VersionVector> = HashMap::new();
    for space in &pulled_spaces {
        let vv = inner
            .store
            .version_vector(space)
            .await
            .map_err(store_error)?;
        start_vv.insert(space.clone(), vv);
    }
    let served_before = sync::lock(&inner.peer_spaces).served.clone();

    let pairs: Vec<(PeerId, SpaceName, Live)> = peers
        .iter()
        .flat_map(|p| {
            pulled_spaces
                .iter()
                .map(|s| (*p, s.clone(), Live::default()))
        })
        .collect();
    let exchanges = futures::future::join_all(
        pairs
            .iter()
            .map(|(peer, space, live)| exchange(node, *peer, space, live, deadline)),
    );
    tokio::pin!(exchanges);
    let progress = |pairs: &[(PeerId, SpaceName, Live)]| -> SyncProgress {
        let mut p = SyncProgress {
            exchanges: pairs.len() as u64,
            elapsed_ms: started.elapsed().as_millis() as u64,
            ..SyncProgress::default()
        };
        for (_, _, live) in pairs {
            let (applied, pages, bytes, done) = live.now();
            p.applied += applied;
            p.pages += pages;
            p.bytes += bytes;
            p.exchanges_done += u64::from(done);
        }
        let st = sync::lock(&inner.peer_spaces);
        for (space, start) in &start_vv {
            let mut target = start.clone();
            for peer in &peers {
                if let Some(seen) = st.seen.get(&(*peer, space.clone())) {
                    target.merge(&seen.version_vector);
                }
            }
            p.expected += sync::events_lacking(&target, start);
        }
        p.expected = p.expected.max(p.applied);
        p
    };
    let mut tick = tokio::time::interval(PROGRESS_TICK);
    let mut last: Option<(SyncProgress, Instant)> = None;
    let outcomes = loop {
        tokio::select! {
            outcomes = &mut exchanges => break outcomes,
            _ = tick.tick() => {
                let now = progress(&pairs);
                let due = last.as_ref().is_none_or(|(before, at)| {
                    (before.applied, before.pages) != (now.applied, now.pages)
                        || at.elapsed() >= PROGRESS_HEARTBEAT
                });
                if due {
                    on_progress(&now);
                    last = Some((now, Instant::now()));
                }
            }
        }
    };
    on_progress(&progress(&pairs));

    let mut end_vv: HashMap<SpaceName, VersionVector> = HashMap::new();
    for space in inner.modes.keys() {
        let vv = inner
            .store
            .version_vector(space)
            .await
            .map_err(store_error)?;
        end_vv.insert(space.clone(), vv);
    }
    let st = sync::lock(&inner.peer_spaces);
    let pushed_to = |peer: &PeerId, space: &SpaceName| -> u64 {
        let key = (*peer, space.clone());
        let after = st.served.get(&key).copied().unwrap_or(0);
        after.saturating_sub(served_before.get(&key).copied().unwrap_or(0))
    };
    let peer_lacks = |peer: &PeerId, space: &SpaceName| -> Option<u64> {
        let theirs = &st.seen.get(&(*peer, space.clone()))?.version_vector;
        Some(sync::events_lacking(end_vv.get(space)?, theirs))
    };
    let mut report = SyncReport {
        push_only,
        connected_peers: peers.len() as u64,
        ..SyncReport::default()
    };
    for ((peer, space, live), outcome) in pairs.iter().zip(outcomes) {
        report.timed_out |= outcome.timed_out;
        if !outcome.hosted {
            continue;
        }
        let (applied, pages, bytes, _) = live.now();
        let entry = ExchangeReport {
            pulled: applied,
            pushed: pushed_to(peer, space),
            pages,
            bytes,
            peer_lacks: peer_lacks(peer, space),
            error: outcome.error,
            duration_ms: outcome.duration.as_millis() as u64,
        };
        report
            .peers
            .entry(peer.to_string())
            .or_default()
            .insert(space.to_string(), entry);
    }
    // Push-only spaces are not pulled, but peers may have pulled them meanwhile.
    for peer in &peers {
        for (space, mode) in &inner.modes {
            let pushed = pushed_to(peer, space);
            if mode.takes_remote_events() || pushed == 0 {
                continue;
            }
            let entry = ExchangeReport {
                pushed,
                peer_lacks: peer_lacks(peer, space),
                ..ExchangeReport::default()
            };
            report
                .peers
                .entry(peer.to_string())
                .or_default()
                .insert(space.to_string(), entry);
        }
    }
    drop(st);
    for e in report.peers.values().flat_map(BTreeMap::values) {
        report.pulled += e.pulled;
        report.pushed += e.pushed;
        report.errors += u64::from(e.error.is_some());
    }
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// Pulls `space` from `peer` until the peer has nothing more, resuming from the same
/// peer when a page does not arrive, within `deadline`.
async fn exchange(
    node: &Node,
    peer: PeerId,
    space: &SpaceName,
    live: &Live,
    deadline: tokio::time::Instant,
) -> Outcome {
    let started = Instant::now();
    let inner = &node.inner;
    let config = &inner.sync_config;
    let mut outcome = Outcome {
        hosted: true,
        error: None,
        timed_out: false,
        duration: Duration::ZERO,
    };
    for attempt in 0..=sync::MAX_PULL_RESUMES {
        let Some(track) =
            sync::start_pull(node, peer, space.clone(), &inner.peer_spaces, config, None)
        else {
            let policy = sync::lock(&inner.peer_spaces)
                .incompatible
                .get(&(peer, space.clone()))
                .map_or_else(|| "another policy".to_owned(), |p| p.to_string());
            outcome.error = Some(format!(
                "the peer uses resolver {policy} for this space, which differs from this \
                 node's: its events are refused"
            ));
            break;
        };
        live.wait_on(track.clone());
        let end = tokio::time::timeout_at(deadline, track.finished()).await;
        live.settle();
        match end {
            Err(_) => {
                outcome.timed_out = true;
                outcome.error = Some(format!(
                    "not finished within the sync's bound of {:?}; the pull goes on in the \
                     background",
                    config.sync_timeout
                ));
                break;
            }
            Ok(Ok(())) => break,
            Ok(Err(PullError::NotHosted)) => {
                outcome.hosted = false;
                break;
            }
            Ok(Err(PullError::Final(e))) => {
                outcome.error = Some(e);
                break;
            }
            Ok(Err(PullError::Resumable(e))) => {
                let delay = sync::resume_delay(attempt);
                if attempt == sync::MAX_PULL_RESUMES
                    || tokio::time::Instant::now() + delay >= deadline
                {
                    outcome.error = Some(format!("interrupted {} times: {e}", attempt + 1));
                    break;
                }
                tokio::time::sleep(delay).await;
                let connected = inner
                    .net
                    .connected_peers()
                    .await
                    .is_ok_and(|p| p.contains(&peer));
                if !connected {
                    outcome.error = Some(format!("{e}; the peer has disconnected"));
                    break;
                }
            }
        }
    }
    live.finish();
    outcome.duration = started.elapsed();
    outcome
}
