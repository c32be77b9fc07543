//! Faulting in the map ahead of the writer, on a thread of its own.
//!
//! With `WRITE_MAP` the writer writes B-tree pages straight into LMDB's shared mapping
//! of `data.mdb`. LMDB sizes that file to the whole map, sparsely, so the first write
//! to each page above the file's high-water mark is a page fault that allocates a
//! page-cache page, zeroes it (with readahead, a whole large folio of them) and sets up
//! delayed allocation. Profiles of 64 concurrent appenders put 10–15% of the writer
//! thread's time there, on the one thread every write goes through.
//!
//! `madvise(MADV_POPULATE_WRITE)` does the same work ahead of time: it faults a range
//! in as if written, without changing a byte of it. This thread keeps the [`AHEAD`]
//! bytes above the high-water mark populated, so that the writer finds its new pages
//! mapped and writable. Pages past the high-water mark hold nothing LMDB reads, and
//! populating does not change their contents, so the thread needs no coordination with
//! the writer beyond knowing where the map is: it holds the map's shared lock
//! ([`MapControl::read_guard`]) while it touches the mapping, so a resize (which
//! remaps) waits for it.
//!
//! The map's address is not exposed by LMDB (`mdb_env_info` reports it only for
//! `MDB_FIXEDMAP`): it is found as the mapping in `/proc/self/maps` that holds a value a
//! read transaction returned. Where that fails, or the kernel predates
//! `MADV_POPULATE_WRITE` (Linux 5.14), the thread stops and the writer faults its pages
//! in itself, as before; only speed differs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use crate::map::MapControl;
use crate::tables::{Tables, META_FORMAT};

/// Bytes kept populated above the high-water mark. A write burst (catch-up commits
/// pages of 24 pulls at a time) stays inside it, and it is small next to the map.
const AHEAD: usize = 16 << 20;

/// Bytes populated per `madvise`, so that a resize waiting for the shared lock waits
/// for one chunk at most.
const CHUNK: usize = 1 << 20;

#[derive(Default)]
struct State {
    /// The writer committed since the thread last looked.
    nudged: bool,
    /// The writer is exiting.
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// Offset in the file up to which the current mapping is populated; 0 after a
    /// remap. Read by the writer to decide whether a nudge is needed.
    populated: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Two flags, valid whatever a panicking holder was doing.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The prefault thread's handle, owned by the writer. Dropping it stops and joins the
/// thread, before the writer closes the environment.
pub(crate) struct Prefaulter {
    shared: Arc<Shared>,
    map: Arc<MapControl>,
    thread: Option<JoinHandle<()>>,
}

impl Prefaulter {
    /// Starts the thread. It does nothing until the first commit: a store that is
    /// only read never has its map populated.
    pub fn start(map: Arc<MapControl>, tables: Tables) -> std::io::Result<Prefaulter> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            populated: AtomicUsize::new(0),
        });
        let thread = {
            let (shared, map) = (shared.clone(), map.clone());
            std::thread::Builder::new()
                .name("weft-store-prefault".into())
                .spawn(move || run(&shared, &map, tables))?
        };
        Ok(Prefaulter {
            shared,
            map,
            thread: Some(thread),
        })
    }

    /// Called after each commit: wakes the thread once the high-water mark has used up
    /// half of what is populated ahead of it. Cheap otherwise: LMDB's meta page is read,
    /// no system call is made.
    pub fn committed(&self) {
        let used = self.map.used();
        if used.saturating_add(AHEAD / 2) <= self.shared.populated.load(Ordering::Relaxed) {
            return;
        }
        let mut st = self.shared.lock();
        if !st.nudged {
            st.nudged = true;
            self.shared.wake.notify_one();
        }
    }
}

impl Drop for Prefaulter {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("store prefault thread panicked");
            }
        }
    }
}

/// Where the map currently is, and under which map size it was found.
struct Mapping {
    base: usize,
    size: usize,
}

fn run(shared: &Shared, map: &MapControl, tables: Tables) {
    let mut mapping: Option<Mapping> = None;
    loop {
        {
            let mut st = shared.lock();
            while !st.nudged && !st.stop {
                st = shared.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
            if st.stop {
                return;
            }
            st.nudged = false;
        }
        if let Err(why) = populate(shared, map, tables, &mut mapping) {
            tracing::debug!("store: no longer faulting the map in ahead of the writer: {why}");
            // The writer keeps nudging only while `populated` trails; park it past any
            // file so the nudges stop, and wait for the stop.
            shared.populated.store(usize::MAX, Ordering::Relaxed);
            let mut st = shared.lock();
            while !st.stop {
                st = shared.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
            return;
        }
    }
}

/// Populates up to [`AHEAD`] bytes above the high-water mark, a [`CHUNK`] per hold of
/// the map's shared lock. Errors mean populating is not possible here.
fn populate(
    shared: &Shared,
    map: &MapControl,
    tables: Tables,
    mapping: &mut Option<Mapping>,
) -> Result<(), String> {
    loop {
        if shared.lock().stop {
            return Ok(());
        }
        let _guard = map.read_guard();
        let size = map.map_size();
        if mapping.as_ref().is_none_or(|m| m.size != size) {
            // A resize remaps, and the new mapping has nothing populated.
            let found = locate(map, tables, size)?;
            no_readahead_above(&found, map.used());
            *mapping = Some(found);
            shared.populated.store(0, Ordering::Relaxed);
        }
        let Some(m) = mapping.as_ref() else {
            return Ok(());
        };
        let used = map.used();
        let target = used.saturating_add(AHEAD).min(m.size);
        let from = shared.populated.load(Ordering::Relaxed).max(used);
        if from >= target {
            return Ok(());
        }
        let len = (target - from).min(CHUNK);
        // SAFETY: [from, from + len) lies inside the mapping of `data.mdb` (checked
        // against /proc/self/maps under the map size it was found with, and the shared
        // lock held keeps LMDB from remapping). MADV_POPULATE_WRITE changes no byte of
        // the range; it only faults its pages in as if they were written.
        let rc = unsafe {
            libc::madvise(
                (m.base + from) as *mut libc::c_void,
                len,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc != 0 {
            return Err(format!("madvise: {}", std::io::Error::last_os_error()));
        }
        shared.populated.store(from + len, Ordering::Relaxed);
    }
}

/// Finds the map: the mapping that holds a value LMDB returned from it.
fn locate(map: &MapControl, tables: Tables, size: usize) -> Result<Mapping, String> {
    let env = map.env();
    let txn = env.read_txn().map_err(|e| e.to_string())?;
    let value = tables
        .meta
        .get(&txn, META_FORMAT)
        .map_err(|e| e.to_string())?
        .ok_or("the store has no format record")?;
    let inside = value.as_ptr() as usize;
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| e.to_string())?;
    let (start, end) = maps
        .lines()
        .filter_map(mapping_range)
        .find(|&(start, end)| start <= inside && inside < end)
        .ok_or("no mapping holds the map")?;
    // A mapping of another size is not LMDB's whole map (or was merged with a
    // neighbour): populating by offset would go wrong.
    if end - start != size {
        return Err(format!(
            "the mapping holding the map is {} bytes, the map {size}",
            end - start
        ));
    }
    Ok(Mapping { base: start, size })
}

/// Turns read-ahead off for the map above `used`, the part this process will write.
///
/// With read-ahead on, the first touch of a page there (by `MADV_POPULATE_WRITE` or the
/// writer) makes the kernel read around it and put the range in the page cache as one
/// large folio, up to 512 KiB on the benchmark machine. A later write to any of its
/// pages, after writeback cleaned it, dirties and accounts the whole folio again.
/// With single pages, 64 appenders and remote-page ingest were faster in every
/// alternating round measured (BENCHMARKS.md section 1). The data below `used` keeps
/// read-ahead: reading a cold store of 1,000,000 events with it off took 2.3 times as
/// long. The next mapping (after a resize or reopen) starts with
/// read-ahead everywhere again; only pages written since then go without it.
fn no_readahead_above(m: &Mapping, used: usize) {
    const PAGE: usize = 4096;
    let from = used.div_ceil(PAGE) * PAGE;
    if from >= m.size {
        return;
    }
    // SAFETY: [from, size) lies inside the mapping of `data.mdb` (see `populate`);
    // MADV_RANDOM changes no byte, only how the kernel reads the range in.
    let rc = unsafe {
        libc::madvise(
            (m.base + from) as *mut libc::c_void,
            m.size - from,
            libc::MADV_RANDOM,
        )
    };
    if rc != 0 {
        // Only speed differs.
        tracing::debug!(
            "store: keeping read-ahead above the map's high-water mark: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The address range at the start of a `/proc/self/maps` line.
fn mapping_range(line: &str) -> Option<(usize, usize)> {
    let range = line.split_whitespace().next()?;
    let (start, end) = range.split_once('-')?;
    Some((
        usize::from_str_radix(start, 16).ok()?,
        usize::from_str_radix(end, 16).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::mapping_range;

    #[test]
    fn a_maps_line_gives_its_range() {
        assert_eq!(
            mapping_range("7f12a000-7f12c000 rw-s 00000000 fd:01 1234  /tmp/x/data.mdb"),
            Some((0x7f12_a000, 0x7f12_c000))
        );
        assert_eq!(mapping_range("garbage"), None);
        assert_eq!(mapping_range(""), None);
    }
}
