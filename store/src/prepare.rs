//! Encoding and hashing a remote batch on two threads, for the writer.
//!
//! A page of a catch-up is a thousand events, whose encodings and hashes take about
//! 0.6 ms of CPU, all of it on the path from a received page to its commit. Two fixed
//! halves wasted much of the second core: the helper thread often started a tenth of
//! a millisecond after the first, and then the first waited for it. Here the calling
//! thread takes chunks of [`CHUNK`] events from a shared counter and the helper takes
//! them too from whenever it starts, so the two finish together; if the helper starts
//! late, the caller has simply done more.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use weft_crdt::Event;

use crate::writer::Prepared;

/// Events per claim: about 35 µs of work, small next to a page, large next to a claim.
const CHUNK: usize = 64;

/// What the caller and the helper share to read; the helper lets go of it before it
/// says it is gone, so that the caller gets the events back without a copy.
struct Work {
    events: Vec<Event>,
    /// The next chunk to claim; past the last one, nothing is left.
    next: AtomicUsize,
    chunks: usize,
}

struct Progress {
    state: Mutex<State>,
    changed: Condvar,
}

struct State {
    /// Each chunk's output, once done.
    done: Vec<Option<Vec<Prepared>>>,
    /// The helper has run (or was dropped unrun) and holds no chunk and no events.
    helper_gone: bool,
}

impl Progress {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Filled slots stay valid whatever a panicking holder was doing.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Claims and prepares chunks until none is left.
fn drain(work: &Work, progress: &Progress) {
    loop {
        let c = work.next.fetch_add(1, Ordering::Relaxed);
        if c >= work.chunks {
            return;
        }
        let out: Vec<Prepared> = chunk(&work.events, c).iter().map(Prepared::of).collect();
        progress.lock().done[c] = Some(out);
        progress.changed.notify_all();
    }
}

fn chunk(events: &[Event], c: usize) -> &[Event] {
    &events[c * CHUNK..((c + 1) * CHUNK).min(events.len())]
}

/// The helper's side. Dropping it (when its closure has run, panicked, or was dropped
/// unrun by a runtime shutting down) releases the events, then marks it gone.
struct Helper {
    work: Option<Arc<Work>>,
    progress: Arc<Progress>,
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.work.take();
        self.progress.lock().helper_gone = true;
        self.progress.changed.notify_all();
    }
}

/// Each event's encoding and hash, in order, computed on the calling thread and on
/// one helper that `spawn` starts (it must run the closure it is given at most once,
/// on another thread, or drop it). Blocks, so call it on a blocking thread. Returns
/// the events too: they are shared with the helper while it may run.
pub(crate) fn prepare_shared(
    events: Vec<Event>,
    spawn: impl FnOnce(Box<dyn FnOnce() + Send>),
) -> (Vec<Event>, Vec<Prepared>) {
    let chunks = events.len().div_ceil(CHUNK);
    let work = Arc::new(Work {
        events,
        next: AtomicUsize::new(0),
        chunks,
    });
    let progress = Arc::new(Progress {
        state: Mutex::new(State {
            done: (0..chunks).map(|_| None).collect(),
            helper_gone: false,
        }),
        changed: Condvar::new(),
    });
    let helper = Helper {
        work: Some(work.clone()),
        progress: progress.clone(),
    };
    spawn(Box::new(move || {
        if let Some(work) = &helper.work {
            drain(work, &helper.progress);
        }
    }));
    drain(&work, &progress);
    // Wait for the helper's chunks, and for the helper itself, so that the events are
    // ours again. It ends at once when it starts and finds nothing left to claim.
    let done = {
        let mut st = progress.lock();
        while !st.helper_gone {
            st = progress
                .changed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        std::mem::take(&mut st.done)
    };
    let events = match Arc::try_unwrap(work) {
        Ok(w) => w.events,
        // Not reached: the helper let go before it said it was gone.
        Err(shared) => shared.events.clone(),
    };
    let mut prepared = Vec::with_capacity(events.len());
    for (c, slot) in done.into_iter().enumerate() {
        match slot {
            Some(out) => prepared.extend(out),
            // Claimed by a helper that panicked: done here.
            None => prepared.extend(chunk(&events, c).iter().map(Prepared::of)),
        }
    }
    (events, prepared)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_crdt::{Hlc, NodeId, Op, SigningKey, SpaceName, UnsignedEvent, VectorClock};

    fn events(n: u64) -> Vec<Event> {
        let key = SigningKey::from_bytes(&[9; 32]);
        let space = SpaceName::new("p").unwrap();
        let origin = NodeId::of(&key);
        (1..=n)
            .map(|seq| {
                let mut clock = VectorClock::new();
                clock.set(origin, seq);
                UnsignedEvent {
                    origin,
                    seq,
                    clock,
                    hlc: Hlc::new(seq, 0),
                    key: format!("k{seq}"),
                    op: Op::Put,
                    kind: String::new(),
                    payload: vec![seq as u8; 3],
                    meta: Default::default(),
                    prev: None,
                }
                .sign(&space, &key)
            })
            .collect()
    }

    fn expected(events: &[Event]) -> Vec<(Vec<u8>, weft_crdt::EventHash)> {
        events
            .iter()
            .map(|e| {
                let p = Prepared::of(e);
                (p.bytes, p.hash)
            })
            .collect()
    }

    fn got(prepared: Vec<Prepared>) -> Vec<(Vec<u8>, weft_crdt::EventHash)> {
        prepared.into_iter().map(|p| (p.bytes, p.hash)).collect()
    }

    #[test]
    fn every_event_is_prepared_in_order_with_a_helper_on_another_thread() {
        // Sizes around the chunk edges, and one that the caller mostly does alone.
        for n in [1, CHUNK as u64 - 1, CHUNK as u64, CHUNK as u64 + 1, 1000] {
            let all = events(n);
            let want = expected(&all);
            let (back, prepared) = prepare_shared(all.clone(), |job| {
                std::thread::spawn(job);
            });
            assert_eq!(back, all, "n = {n}: the events come back unchanged");
            assert_eq!(got(prepared), want, "n = {n}");
        }
    }

    #[test]
    fn a_helper_that_never_runs_leaves_nothing_missing_and_no_wait() {
        let all = events(300);
        let want = expected(&all);
        // Dropped unrun, as a runtime shutting down drops a queued blocking task.
        let (back, prepared) = prepare_shared(all.clone(), drop);
        assert_eq!(back, all);
        assert_eq!(got(prepared), want);
        // Dies before it runs, on its own thread.
        let (back, prepared) = prepare_shared(all.clone(), |job| {
            let handle = std::thread::spawn(move || {
                let _job = job;
                panic!("helper dies holding its closure");
            });
            assert!(handle.join().is_err());
        });
        assert_eq!(back, all);
        assert_eq!(got(prepared), want);
    }
}
