//! Relaxed durability's periodic flush, on a thread of its own.
//!
//! In `Durability::Relaxed` the environment runs with `NO_SYNC`, and commits reach the
//! disk when something calls `force_sync` (an `fdatasync` of the data file). That call
//! takes milliseconds on a loaded disk. Made by the writer thread, it stalled every
//! command queued behind it — a remote event arriving during a flush waited for it —
//! which showed as the tail of gossip latency in a mesh of relaxed nodes. LMDB's sync
//! (with `WRITE_MAP`: reading the meta pages, `msync` of the mapping) is safe beside a
//! running write transaction, so this thread makes it instead and the writer only marks
//! that it committed. It is not safe beside a resize, which unmaps the mapping, so each
//! flush holds the map's shared lock (`map.rs`), as reads do.
//!
//! What a flush makes durable: every commit that returned before the flush began. A
//! commit racing with it is covered by the next flush, which the writer's mark (set
//! after each commit) schedules.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::map::MapControl;

#[derive(Default)]
struct State {
    /// Committed since the flush that last began.
    dirty: bool,
    /// The writer is exiting: flush what is dirty, then end.
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is two flags, valid whatever a panicking holder was doing.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The flush thread's handle, owned by the writer. Dropping it flushes what is still
/// unflushed and joins the thread, so the environment is closed (and durable) once the
/// writer is gone.
pub(crate) struct Flusher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Flusher {
    /// Starts a thread that flushes the environment of `map` at most every `every`
    /// while there are commits it has not flushed.
    ///
    /// Each flush holds the map's shared lock: with `WRITE_MAP`, LMDB's sync reads the
    /// meta pages and `msync`s through the mapping, which a resize unmaps. Without the
    /// lock a resize during a flush crashed the process (SIGSEGV in
    /// `mdb_env_pick_meta`, found by `weft-bench ingest`).
    pub fn start(map: Arc<MapControl>, every: Duration) -> std::io::Result<Flusher> {
        Flusher::start_with(every, move || {
            let _guard = map.read_guard();
            map.env().force_sync()
        })
    }

    /// [`Flusher::start`] with the flush itself given, so tests can count flushes.
    fn start_with<F>(every: Duration, flush: F) -> std::io::Result<Flusher>
    where
        F: FnMut() -> Result<(), heed::Error> + Send + 'static,
    {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("weft-store-flush".into())
                .spawn(move || run(flush, &shared, every))?
        };
        Ok(Flusher {
            shared,
            thread: Some(thread),
        })
    }

    /// Records a commit the next flush must cover. Cheap: a flag, and a wake-up only
    /// when the thread is idle.
    pub fn committed(&self) {
        let mut st = self.shared.lock();
        if !st.dirty {
            st.dirty = true;
            self.shared.wake.notify_one();
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("store flush thread panicked");
            }
        }
    }
}

fn run(mut flush: impl FnMut() -> Result<(), heed::Error>, shared: &Shared, every: Duration) {
    // The first flush may come at once: nothing was flushed "recently".
    let mut last = Instant::now()
        .checked_sub(every)
        .unwrap_or_else(Instant::now);
    loop {
        let mut st = shared.lock();
        while !st.dirty && !st.stop {
            st = shared.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        // Commits since the last flush: wait out the interval, unless the store closes.
        let due = last + every;
        while !st.stop {
            let now = Instant::now();
            if now >= due {
                break;
            }
            st = shared
                .wake
                .wait_timeout(st, due - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let (dirty, stop) = (st.dirty, st.stop);
        // Cleared before the flush begins: a commit during it marks the state again.
        st.dirty = false;
        drop(st);
        if dirty {
            if let Err(e) = flush() {
                // The commits stay in the page cache; the next interval tries again.
                tracing::error!("store: flushing to disk failed: {e}");
                shared.lock().dirty = true;
            }
            last = Instant::now();
        }
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn counting(every: Duration) -> (Flusher, Arc<AtomicUsize>) {
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let f = Flusher::start_with(every, move || {
            c.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .expect("spawning the flush thread");
        (f, count)
    }

    fn wait_for(count: &AtomicUsize, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while count.load(Ordering::SeqCst) < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(count.load(Ordering::SeqCst), n, "flushes made");
    }

    #[test]
    fn a_first_commit_is_flushed_at_once_and_later_ones_wait_for_the_interval_or_the_close() {
        let (f, count) = counting(Duration::from_secs(3600));
        f.committed();
        wait_for(&count, 1);
        // Within the hour: marked, not flushed.
        f.committed();
        f.committed();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(count.load(Ordering::SeqCst), 1);
        // Closing flushes what is left, once.
        drop(f);
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn commits_are_flushed_again_after_each_interval() {
        let (f, count) = counting(Duration::from_millis(5));
        for n in 1..=3 {
            f.committed();
            wait_for(&count, n);
        }
        drop(f);
        assert_eq!(count.load(Ordering::SeqCst), 3, "nothing was left to flush");
    }

    #[test]
    fn a_store_that_committed_nothing_is_never_flushed() {
        let (f, count) = counting(Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(20));
        drop(f);
        assert_eq!(count.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_failed_flush_is_tried_again() {
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let f = Flusher::start_with(Duration::from_millis(5), move || {
            // The first flush fails, as an fsync on a full or failing disk would.
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(heed::Error::Io(std::io::Error::other("disk on fire")))
            } else {
                Ok(())
            }
        })
        .expect("spawning the flush thread");
        f.committed();
        wait_for(&count, 2);
        drop(f);
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }
}
