//! The journal: what makes [`crate::Durability::Full`] durable.
//!
//! Why: an fsynced LMDB commit writes out every B-tree page its batch touched. Appends
//! to many keys touch many scattered index pages, so one durable commit of 64 appends
//! wrote about half a megabyte and took milliseconds. The journal instead appends each
//! batch's events to one preallocated file, so the durable write is a few sequential
//! kilobytes and one `fdatasync`, and that flush runs on a thread of its own while the
//! writer builds the next batch. LMDB itself runs with `NO_SYNC`.
//!
//! The protocol, per batch (see `writer.rs`):
//! 1. the writer runs the batch in its write transaction;
//! 2. it appends the batch's record to the journal (a plain `write`: the page cache)
//!    and puts the journal position after it into the transaction's `meta`;
//! 3. it commits without fsync;
//! 4. the flush thread `fdatasync`s the journal (once for every batch queued by then),
//!    and only then hands the batch's events to subscribers and answers its callers.
//!
//! A batch of nothing but remote ingests is journaled as received before it is
//! applied (steps 2 and 4 first), so its flush overlaps the apply; should the attempt
//! fail, the record is rewound and the batch runs again.
//!
//! What survives:
//! - `kill -9`: the kernel keeps both files' pages. LMDB is at its last commit, and the
//!   journal holds at least that much (the record is written before the commit). On
//!   the next open (same boot) LMDB is trusted, and journal records past the position
//!   LMDB recorded, from a batch that never committed and was never answered, are cut.
//! - a power cut or kernel crash: a `NO_SYNC` LMDB file may be torn (file systems do
//!   not keep write order), but the journal's flushed prefix holds every answered
//!   batch. The state file records the boot id of the run that had the directory open;
//!   an open that finds another boot id there rebuilds LMDB from the journal.
//!
//! File layout: a 16-byte magic, then records `[len u32][seq u64][check 16 B][payload]`
//! (little endian), where `check` is BLAKE3 over the previous record's check, the seq
//! and the payload. A scan stops at the first record whose length, seq or check does
//! not follow: a torn tail, or the zeros of preallocated space. Payloads are lists of
//! operations (`Op`), each replayable by the writer.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write as _};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::watch;

use crate::StoreError;

/// The journal file in a data directory.
pub(crate) const JOURNAL_FILE: &str = "journal.wj";
/// Which kind of run last had the directory open, and whether it closed cleanly.
pub(crate) const STATE_FILE: &str = "journal.state";

const MAGIC: &[u8; 16] = b"weft journal v1\n";
const HEAD: u64 = 4 + 8 + 16;
/// A record is one batch: far below this unless something is corrupt.
const MAX_RECORD: u64 = 1 << 30;
/// The file is preallocated with zeros in steps of this: overwriting blocks that
/// already hold zeros needs no metadata update, so a flush writes data only. The flush
/// thread adds one step per flush while less than [`AHEAD`] is left, and each step is
/// sent to the disk as it is written (see `Room::extend`).
const STEP: u64 = 1 << 20;
const AHEAD: u64 = 8 << 20;

/// Where the journal stands after a record: recorded in LMDB's `meta` by the commit
/// that holds the record's batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Position {
    pub seq: u64,
    /// Offset of the record that ends here (the magic's length for an empty journal).
    pub start: u64,
    pub end: u64,
    pub check: [u8; 16],
}

impl Position {
    pub const EMPTY: Position = Position {
        seq: 0,
        start: MAGIC.len() as u64,
        end: MAGIC.len() as u64,
        check: [0; 16],
    };

    pub fn to_bytes(self) -> [u8; 40] {
        let mut b = [0; 40];
        b[..8].copy_from_slice(&self.seq.to_be_bytes());
        b[8..16].copy_from_slice(&self.start.to_be_bytes());
        b[16..24].copy_from_slice(&self.end.to_be_bytes());
        b[24..].copy_from_slice(&self.check);
        b
    }

    pub fn from_bytes(b: &[u8]) -> Result<Position, StoreError> {
        let b: &[u8; 40] = b
            .try_into()
            .map_err(|_| StoreError::Corrupt("stored journal position is not 40 bytes".into()))?;
        let u = |r: std::ops::Range<usize>| {
            let mut a = [0; 8];
            a.copy_from_slice(&b[r]);
            u64::from_be_bytes(a)
        };
        let mut check = [0; 16];
        check.copy_from_slice(&b[24..]);
        Ok(Position {
            seq: u(0..8),
            start: u(8..16),
            end: u(16..24),
            check,
        })
    }
}

fn chain(prev: &[u8; 16], seq: u64, payload: &[u8]) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(prev);
    h.update(&seq.to_le_bytes());
    h.update(payload);
    let mut out = [0; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

fn corrupt(path: &Path, what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("journal {}: {what}", path.display()))
}

/// The preallocated end of the file, shared by the writer and the flush thread, which
/// extends it ahead of need so that the writer rarely waits for zeros to be written.
struct Room {
    allocated: AtomicU64,
    /// Where the writer's next record goes.
    used: AtomicU64,
    /// Held while extending, so two extensions never interleave.
    extending: Mutex<()>,
}

impl Room {
    /// Makes the file hold zeros up to at least `need` (and at least `step` more).
    /// Writes only past `allocated`,
    /// where no record is written before `allocated` moves past it.
    ///
    /// The zeros are sent to the disk at once (`sync_file_range`, which does not wait):
    /// left dirty, they went out with the next `fdatasync`, the one a batch's callers
    /// wait for, which then took about twice as long and now and then several
    /// milliseconds (BENCHMARKS.md, section 2).
    fn extend(&self, file: &File, need: u64, step: u64) -> io::Result<()> {
        let _guard = self
            .extending
            .lock()
            .map_err(|_| io::Error::other("journal extension lock poisoned"))?;
        let start = self.allocated.load(Ordering::Acquire);
        if start >= need {
            return Ok(());
        }
        let target = need.max(start + step);
        let zeros = vec![0u8; (target - start).min(1 << 20) as usize];
        let mut at = start;
        while at < target {
            let n = (target - at).min(zeros.len() as u64);
            file.write_all_at(&zeros[..n as usize], at)?;
            at += n;
        }
        // SAFETY: plain syscall on an open descriptor; it reads and writes no memory
        // of ours.
        let rc = unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                start as libc::off64_t,
                (target - start) as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if rc != 0 {
            // Only a head start: the next flush writes them, and reports what fails.
            tracing::debug!(
                "store: starting to write the journal's zeros: {}",
                io::Error::last_os_error()
            );
        }
        self.allocated.store(at, Ordering::Release);
        Ok(())
    }
}

/// The writer's side of the journal: appends records in the page cache.
pub(crate) struct Journal {
    path: PathBuf,
    file: Arc<File>,
    pos: Position,
    /// Records appended by this process, rewound ones included: unlike seqs, which a
    /// rewind reuses, a mark names one write of one record, which is what a flush
    /// covers.
    marks: u64,
    room: Arc<Room>,
    buf: Vec<u8>,
}

impl Journal {
    /// Creates an empty journal at `path`, replacing any file there, and makes it and
    /// its directory entry durable.
    pub fn create(path: &Path) -> Result<Journal, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.write_all_at(MAGIC, 0)?;
        let room = Room {
            allocated: AtomicU64::new(MAGIC.len() as u64),
            used: AtomicU64::new(MAGIC.len() as u64),
            extending: Mutex::new(()),
        };
        room.extend(&file, STEP, STEP)?;
        file.sync_all()?;
        sync_dir(path)?;
        Ok(Journal {
            path: path.to_path_buf(),
            file: Arc::new(file),
            pos: Position::EMPTY,
            marks: 0,
            room: Arc::new(room),
            buf: Vec::new(),
        })
    }

    /// Opens the journal at `path` positioned at `pos`, which LMDB recorded: checks that
    /// a record with that seq and check ends there, and cuts whatever follows it (a
    /// batch written before a commit that never happened). `Ok(None)` when the file is
    /// missing or does not hold that record: the caller writes a new journal.
    pub fn open_at(path: &Path, pos: Position) -> Result<Option<Journal>, StoreError> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let len = file.metadata()?.len();
        let mut magic = [0; 16];
        if len < pos.end || file.read_exact_at(&mut magic, 0).is_err() || &magic != MAGIC {
            return Ok(None);
        }
        if pos.seq > 0 {
            let mut head = [0; HEAD as usize];
            file.read_exact_at(&mut head, pos.start)?;
            let (n, seq, check) = split_head(&head);
            if pos.start + HEAD + n != pos.end || seq != pos.seq || check != pos.check {
                return Ok(None);
            }
        } else if pos != Position::EMPTY {
            return Ok(None);
        }
        // Zeros where the next record goes: a scan stops here until it is written.
        if pos.end + HEAD <= len {
            file.write_all_at(&[0; HEAD as usize], pos.end)?;
        } else if pos.end < len {
            file.write_all_at(&vec![0; (len - pos.end) as usize], pos.end)?;
        }
        file.sync_data()?;
        let room = Room {
            allocated: AtomicU64::new(len),
            used: AtomicU64::new(pos.end),
            extending: Mutex::new(()),
        };
        Ok(Some(Journal {
            path: path.to_path_buf(),
            file: Arc::new(file),
            pos,
            marks: 0,
            room: Arc::new(room),
            buf: Vec::new(),
        }))
    }

    pub fn position(&self) -> Position {
        self.pos
    }

    /// The mark of the last record appended (0: none yet).
    pub fn mark(&self) -> u64 {
        self.marks
    }

    /// The buffer the next record's payload is appended to. It starts with room for
    /// the record's head, so the record goes out in one write without a copy.
    pub fn payload(&mut self) -> &mut Vec<u8> {
        self.buf.clear();
        self.buf.extend_from_slice(&[0; HEAD as usize]);
        &mut self.buf
    }

    /// Writes the payload built in [`Journal::payload`] as the next record and returns
    /// the position before it (for [`Journal::rewind`]) and after it.
    pub fn append(&mut self) -> Result<(Position, Position), StoreError> {
        let len = (self.buf.len() as u64).saturating_sub(HEAD);
        if len > MAX_RECORD {
            return Err(StoreError::Io(io::Error::other(format!(
                "a journal record of {len} bytes is over the {MAX_RECORD}-byte limit"
            ))));
        }
        let before = self.pos;
        let seq = before.seq + 1;
        let check = chain(&before.check, seq, &self.buf[HEAD as usize..]);
        let start = before.end;
        let end = start + HEAD + len;
        // A zero head after the record ends scans; room for it is kept.
        if end + HEAD > self.room.allocated.load(Ordering::Acquire) {
            self.room.extend(&self.file, end + HEAD, STEP)?;
        }
        self.buf[..4].copy_from_slice(&(len as u32).to_le_bytes());
        self.buf[4..12].copy_from_slice(&seq.to_le_bytes());
        self.buf[12..HEAD as usize].copy_from_slice(&check);
        self.file.write_all_at(&self.buf, start)?;
        self.room.used.store(end, Ordering::Relaxed);
        self.marks += 1;
        self.pos = Position {
            seq,
            start,
            end,
            check,
        };
        Ok((before, self.pos))
    }

    /// Forgets the records after `pos`, whose batch did not commit: the next record
    /// overwrites them, and until then the zero head written here ends a scan.
    pub fn rewind(&mut self, pos: Position) -> Result<(), StoreError> {
        self.file.write_all_at(&[0; HEAD as usize], pos.end)?;
        self.room.used.store(pos.end, Ordering::Relaxed);
        self.pos = pos;
        Ok(())
    }

    /// Flushes what has been appended.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.file.sync_data().map_err(Into::into)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn split_head(head: &[u8; HEAD as usize]) -> (u64, u64, [u8; 16]) {
    let mut n = [0; 4];
    n.copy_from_slice(&head[..4]);
    let mut s = [0; 8];
    s.copy_from_slice(&head[4..12]);
    let mut check = [0; 16];
    check.copy_from_slice(&head[12..]);
    (
        u64::from(u32::from_le_bytes(n)),
        u64::from_le_bytes(s),
        check,
    )
}

/// Reads a journal's valid records from the start.
pub(crate) struct Scan {
    path: PathBuf,
    reader: BufReader<File>,
    len: u64,
    pos: Position,
    done: bool,
}

impl Scan {
    /// `Ok(None)` when there is no journal file.
    pub fn open(path: &Path) -> Result<Option<Scan>, StoreError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let len = file.metadata()?.len();
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut magic = [0; 16];
        reader
            .read_exact(&mut magic)
            .map_err(|_| corrupt(path, "shorter than its header"))?;
        if &magic != MAGIC {
            return Err(corrupt(path, "not a weft journal (bad magic)"));
        }
        Ok(Some(Scan {
            path: path.to_path_buf(),
            reader,
            len,
            pos: Position::EMPTY,
            done: false,
        }))
    }

    /// The position after the last valid record read so far.
    pub fn at(&self) -> Position {
        self.pos
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn next_record(&mut self) -> Result<Option<Vec<u8>>, StoreError> {
        let start = self.pos.end;
        if self.done || start + HEAD > self.len {
            return Ok(None);
        }
        let mut head = [0; HEAD as usize];
        self.reader.read_exact(&mut head)?;
        let (n, seq, check) = split_head(&head);
        if n == 0 || n > MAX_RECORD || start + HEAD + n > self.len || seq != self.pos.seq + 1 {
            return Ok(None);
        }
        let mut payload = vec![0; n as usize];
        self.reader.read_exact(&mut payload)?;
        if chain(&self.pos.check, seq, &payload) != check {
            return Ok(None);
        }
        self.pos = Position {
            seq,
            start,
            end: start + HEAD + n,
            check,
        };
        Ok(Some(payload))
    }
}

impl Iterator for Scan {
    type Item = Result<Vec<u8>, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.next_record() {
            Ok(Some(p)) => Some(Ok(p)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// One replayable operation of a record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Op<'a> {
    /// Events applied (or parked) by one command, in the order the writer took them:
    /// the encodings of a remote batch as received, or the local events as committed.
    Events {
        space: &'a str,
        events: Vec<&'a [u8]>,
    },
    /// A space's policy was first recorded: the CBOR of its `StoredPolicy`.
    Configure { space: &'a str, policy: &'a [u8] },
}

const OP_EVENTS: u8 = 1;
const OP_CONFIGURE: u8 = 2;

/// Appends an `Events` operation; `events` yields each event's encoding.
pub(crate) fn put_events<'e>(
    out: &mut Vec<u8>,
    space: &str,
    events: impl ExactSizeIterator<Item = &'e [u8]>,
) {
    out.push(OP_EVENTS);
    put_str(out, space);
    out.extend_from_slice(&(events.len() as u32).to_le_bytes());
    for e in events {
        out.extend_from_slice(&(e.len() as u32).to_le_bytes());
        out.extend_from_slice(e);
    }
}

/// Appends an `Events` operation of `count` events, each written into the payload by
/// `encode(index, payload)`.
pub(crate) fn put_encoded_events(
    out: &mut Vec<u8>,
    space: &str,
    count: usize,
    encode: impl Fn(usize, &mut Vec<u8>),
) {
    out.push(OP_EVENTS);
    put_str(out, space);
    out.extend_from_slice(&(count as u32).to_le_bytes());
    for i in 0..count {
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        encode(i, out);
        let n = (out.len() - at - 4) as u32;
        out[at..at + 4].copy_from_slice(&n.to_le_bytes());
    }
}

pub(crate) fn put_configure(out: &mut Vec<u8>, space: &str, policy: &[u8]) {
    out.push(OP_CONFIGURE);
    put_str(out, space);
    out.extend_from_slice(&(policy.len() as u32).to_le_bytes());
    out.extend_from_slice(policy);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The operations of a payload, in order.
pub(crate) fn ops(payload: &[u8]) -> Result<Vec<Op<'_>>, StoreError> {
    let bad = |what: &str| StoreError::Corrupt(format!("journal record: {what}"));
    let mut r = Cursor(payload);
    let mut out = Vec::new();
    while !r.0.is_empty() {
        let tag = r.take(1).ok_or_else(|| bad("truncated operation"))?[0];
        let space = r.str().ok_or_else(|| bad("truncated space name"))?;
        match tag {
            OP_EVENTS => {
                let n = r.u32().ok_or_else(|| bad("truncated event count"))?;
                let mut events = Vec::with_capacity((n as usize).min(r.0.len() / 4));
                for _ in 0..n {
                    let len = r.u32().ok_or_else(|| bad("truncated event length"))?;
                    events.push(r.take(len as usize).ok_or_else(|| bad("truncated event"))?);
                }
                out.push(Op::Events { space, events });
            }
            OP_CONFIGURE => {
                let len = r.u32().ok_or_else(|| bad("truncated policy length"))?;
                let policy = r
                    .take(len as usize)
                    .ok_or_else(|| bad("truncated policy"))?;
                out.push(Op::Configure { space, policy });
            }
            other => return Err(bad(&format!("unknown operation {other}"))),
        }
    }
    Ok(out)
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn str(&mut self) -> Option<&'a str> {
        let n = self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))?;
        std::str::from_utf8(self.take(n as usize)?).ok()
    }
}

/// A batch waiting for its record to be flushed: `then` broadcasts and answers it,
/// given the flush's error if it failed.
pub(crate) struct Job {
    /// The journal's mark once the batch's record was written.
    pub mark: u64,
    pub then: Box<dyn FnOnce(Option<StoreError>) + Send>,
}

/// The flush thread and what the writer and readers share with it.
pub(crate) struct Flush {
    jobs: Option<SyncSender<Job>>,
    handle: Option<JoinHandle<()>>,
    /// Set once a flush failed: what was appended since is not known to be on disk,
    /// so the writer refuses further batches.
    pub failed: Arc<AtomicBool>,
}

/// What readers need to hold back data that is not yet durable from peers: the
/// highest mark that may be visible in a snapshot (stored before each commit), and the
/// highest flushed one.
#[derive(Clone)]
pub(crate) struct Durable {
    pub written: Arc<AtomicU64>,
    pub flushed: watch::Receiver<u64>,
}

impl Durable {
    /// Returns once the journal is flushed up to `mark`. `Err` only if the flush
    /// thread has stopped.
    pub async fn wait_for(&self, mark: u64) -> Result<(), StoreError> {
        let mut rx = self.flushed.clone();
        rx.wait_for(|s| *s >= mark)
            .await
            .map(drop)
            .map_err(|_| StoreError::Closed)
    }
}

impl Flush {
    /// Starts the flush thread for `journal` (whose current position is flushed).
    pub fn start(journal: &Journal, queue: usize) -> Result<(Flush, Durable), StoreError> {
        let (jobs, rx) = std::sync::mpsc::sync_channel(queue.max(1));
        let mark = journal.marks;
        let (flushed_tx, flushed) = watch::channel(mark);
        let failed = Arc::new(AtomicBool::new(false));
        let file = journal.file.clone();
        let room = journal.room.clone();
        let fail = failed.clone();
        let handle = std::thread::Builder::new()
            .name("weft-journal-flush".into())
            .spawn(move || flush_loop(rx, &file, &room, &fail, &flushed_tx))?;
        Ok((
            Flush {
                jobs: Some(jobs),
                handle: Some(handle),
                failed,
            },
            Durable {
                written: Arc::new(AtomicU64::new(mark)),
                flushed,
            },
        ))
    }

    /// Queues a committed batch; blocks while the queue is full (back-pressure from
    /// the disk). Runs `job` at once, with an error, if the thread is gone.
    pub fn submit(&self, job: Job) {
        let gone = match &self.jobs {
            Some(tx) => tx.send(job).err().map(|e| e.0),
            None => Some(job),
        };
        if let Some(job) = gone {
            (job.then)(Some(StoreError::Closed));
        }
    }
}

impl Drop for Flush {
    /// Flushes and answers whatever is queued, then joins the thread.
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                tracing::error!("journal flush thread panicked");
            }
        }
    }
}

/// One `fdatasync` for every job queued by the time it starts (the writer keeps
/// committing meanwhile, so under load each flush covers several batches), then the
/// jobs' callers are answered.
fn flush_loop(
    jobs: Receiver<Job>,
    file: &File,
    room: &Room,
    failed: &AtomicBool,
    flushed: &watch::Sender<u64>,
) {
    // The highest mark a successful flush covered: a job a flush already covered (its
    // record was written ahead and flushed while the batch was applied) needs none.
    let mut synced = *flushed.borrow();
    // Where the page cache has been released up to (see `drop_behind`).
    let mut dropped = 0;
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while let Ok(j) = jobs.try_recv() {
            batch.push(j);
        }
        // A batch whose record was written ahead and flushed while it was applied is
        // answered now, not after the flush that the next batch's record needs.
        let (covered, batch): (Vec<Job>, Vec<Job>) =
            batch.into_iter().partition(|j| j.mark <= synced);
        for job in covered {
            (job.then)(None);
        }
        if !batch.is_empty() {
            let written = room.used.load(Ordering::Acquire);
            if flush_and_answer(batch, file, failed, flushed, &mut synced) {
                dropped = drop_behind(file, dropped, written);
            }
        }
        // Extend ahead of the writer, off its thread, while there is time.
        let allocated = room.allocated.load(Ordering::Acquire);
        if allocated.saturating_sub(room.used.load(Ordering::Relaxed)) < AHEAD {
            if let Err(e) = room.extend(file, allocated + STEP, STEP) {
                tracing::warn!("store: preallocating the journal: {e}");
            }
        }
    }
}

/// Releases the page cache of the journal's flushed records, from `from` up to the
/// page holding `written` (where the writer's next record starts, so it never has to
/// read a page back), once that is a [`STEP`] or more, and returns the new low mark.
///
/// A step at a time rather than after every flush: a release can make the kernel
/// drain the page lists of every CPU, and under many writers there are thousands of
/// flushes a second (measured equal or better for appends and ingest, session 11).
///
/// Nothing reads the journal while the store is open, so cached records only crowd
/// out data that is read. And the pages freed here are what the next extension's
/// zeros get: where the memory of a virtual machine is handed back to the host once
/// it has been free a moment (free page reporting), a page that was never, or not
/// lately, used costs the host a fault on its first write; writes into just-freed
/// pages ran about seven times faster on the machine of BENCHMARKS.md. Only clean
/// pages go; a flushed range holds no dirty ones but for a record rewritten after a
/// rewind, which the kernel then starts writing back, as it may at any time.
fn drop_behind(file: &File, from: u64, written: u64) -> u64 {
    const PAGE: u64 = 4096;
    let to = written / PAGE * PAGE;
    if to < from {
        // A rewind moved the writer back; a later flush catches up.
        return to;
    }
    if to - from < STEP {
        return from;
    }
    // SAFETY: plain syscall on an open descriptor; it reads and writes no memory of ours.
    let rc = unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            from as libc::off_t,
            (to - from) as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    if rc != 0 {
        tracing::debug!(
            "store: releasing flushed journal pages: {}",
            io::Error::from_raw_os_error(rc)
        );
    }
    to
}

/// One `fdatasync` covering every job of `batch` (none of which an earlier one
/// covered), then their answers, with the error if it failed. Returns whether the
/// flush succeeded.
fn flush_and_answer(
    batch: Vec<Job>,
    file: &File,
    failed: &AtomicBool,
    flushed: &watch::Sender<u64>,
    synced: &mut u64,
) -> bool {
    let mark = batch.iter().map(|j| j.mark).max().unwrap_or(0);
    let result = if failed.load(Ordering::Acquire) {
        Err(io::Error::other("an earlier journal flush failed"))
    } else {
        file.sync_data()
    };
    match &result {
        Ok(()) => {
            *synced = (*synced).max(mark);
            flushed.send_modify(|s| *s = (*s).max(mark));
        }
        Err(e) => {
            failed.store(true, Ordering::Release);
            tracing::error!("store: flushing the journal failed; the store refuses writes until it is reopened: {e}");
        }
    }
    let err = result.as_ref().err().map(|e| (e.kind(), e.to_string()));
    for job in batch {
        let err = err.as_ref().map(|(kind, e)| {
            StoreError::Io(io::Error::new(*kind, format!("flushing the journal: {e}")))
        });
        (job.then)(err);
    }
    result.is_ok()
}

/// Fsyncs the directory holding `path`, so a created or renamed file's entry is durable.
pub(crate) fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}

/// What the state file says about the last run that opened the directory.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LastRun {
    /// No state file: a new directory, or one from before the journal.
    Unknown,
    /// Closed cleanly: LMDB was flushed.
    Clean,
    /// A `Durability::Relaxed` run: there is no journal to rebuild from.
    Relaxed,
    /// Open (or killed) in `Durability::Full` under this boot id (`None`: unknown).
    Open(Option<String>),
}

pub(crate) fn read_state(dir: &Path) -> Result<LastRun, StoreError> {
    let text = match std::fs::read_to_string(dir.join(STATE_FILE)) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(LastRun::Unknown),
        // A torn state file only comes from a crash: treat it as one of unknown boot.
        Err(e) if e.kind() == io::ErrorKind::InvalidData => return Ok(LastRun::Open(None)),
        Err(e) => return Err(e.into()),
    };
    let mut words = text.split_whitespace();
    Ok(match (words.next(), words.next()) {
        (Some("clean"), None) => LastRun::Clean,
        (Some("relaxed"), None) => LastRun::Relaxed,
        (Some("open"), Some(boot)) if boot != "unknown" => LastRun::Open(Some(boot.to_owned())),
        _ => LastRun::Open(None),
    })
}

/// Replaces the state file durably (written aside, fsynced, renamed, directory synced).
pub(crate) fn write_state(dir: &Path, state: &LastRun) -> Result<(), StoreError> {
    let text = match state {
        LastRun::Unknown => return Ok(()),
        LastRun::Clean => "clean\n".to_owned(),
        LastRun::Relaxed => "relaxed\n".to_owned(),
        LastRun::Open(boot) => format!("open {}\n", boot.as_deref().unwrap_or("unknown")),
    };
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(STATE_FILE))?;
    sync_dir(&dir.join(STATE_FILE))?;
    Ok(())
}

/// This boot's id, which changes with every boot: how an open tells a killed process
/// (the page cache survived) from a machine crash (it did not).
pub(crate) fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && !s.contains(char::is_whitespace))
}

/// Events per record when a journal is written from an existing store.
const SEED_EVENTS: usize = 1000;

/// Writes a new journal holding everything `env` holds: each space's policy, its log in
/// lsn order, then its parked events, as if they had arrived in that order. For
/// directories that were last written without a journal (`Durability::Relaxed`, or a
/// version before it). Returns the journal, flushed, and its position.
pub(crate) fn seed(
    path: &Path,
    env: &heed::Env<heed::WithoutTls>,
    tables: &crate::tables::Tables,
) -> Result<Journal, StoreError> {
    let mut journal = Journal::create(path)?;
    let txn = env.read_txn()?;
    for (name, sid) in tables.all_spaces(&txn)? {
        if let Some(policy) = tables.stored_policy(&txn, sid)? {
            let out = journal.payload();
            put_configure(out, &name, &crate::tables::encode_cbor(&policy, 32));
            journal.append()?;
        }
        let mut chunk: Vec<&[u8]> = Vec::with_capacity(SEED_EVENTS);
        let log = tables.events_from(&txn, sid, 1)?.map(|e| e.map(|(_, b)| b));
        let parked = tables
            .pending
            .prefix_iter(&txn, &sid.to_be_bytes())?
            .map(|e| e.map(|(_, b)| b).map_err(StoreError::from));
        for bytes in log.chain(parked) {
            chunk.push(bytes?);
            if chunk.len() == SEED_EVENTS {
                put_events(journal.payload(), &name, chunk.drain(..));
                journal.append()?;
            }
        }
        if !chunk.is_empty() {
            put_events(journal.payload(), &name, chunk.drain(..));
            journal.append()?;
        }
    }
    drop(txn);
    journal.sync()?;
    Ok(journal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(path: &Path) -> (Vec<Vec<u8>>, Position) {
        let mut scan = Scan::open(path).unwrap().unwrap();
        let all = scan.by_ref().map(Result::unwrap).collect();
        (all, scan.at())
    }

    fn append(j: &mut Journal, events: &[&[u8]]) -> Position {
        put_events(j.payload(), "s", events.iter().copied());
        j.append().unwrap().1
    }

    #[test]
    fn records_read_back_in_order_with_their_operations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let mut j = Journal::create(&path).unwrap();
        append(&mut j, &[b"one", b"two"]);
        put_configure(j.payload(), "t", b"policy");
        let end = j.append().unwrap().1;
        j.sync().unwrap();
        let (all, at) = records(&path);
        assert_eq!(at, end);
        assert_eq!(
            ops(&all[0]).unwrap(),
            [Op::Events {
                space: "s",
                events: vec![b"one".as_slice(), b"two".as_slice()]
            }]
        );
        assert_eq!(
            ops(&all[1]).unwrap(),
            [Op::Configure {
                space: "t",
                policy: b"policy".as_slice()
            }]
        );
    }

    #[test]
    fn a_scan_stops_at_a_torn_record_and_at_a_broken_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let mut j = Journal::create(&path).unwrap();
        let first = append(&mut j, &[b"a"]);
        let second = append(&mut j, &[b"b"]);
        append(&mut j, &[b"c"]);
        drop(j);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        // The third record's last byte never reached the disk.
        file.write_all_at(b"X", second.end + HEAD + 10).unwrap();
        let (all, at) = records(&path);
        assert_eq!((all.len(), at), (2, second));
        // A changed second record breaks its check, and so ends the journal after the
        // first, even though the third would parse.
        file.write_all_at(b"Y", first.end + HEAD + 2).unwrap();
        let (all, at) = records(&path);
        assert_eq!((all.len(), at), (1, first));
    }

    #[test]
    fn reopening_at_a_position_cuts_what_follows_and_appends_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let mut j = Journal::create(&path).unwrap();
        let first = append(&mut j, &[b"a"]);
        append(&mut j, &[b"never committed"]);
        drop(j);
        let mut j = Journal::open_at(&path, first).unwrap().unwrap();
        assert_eq!(records(&path).0.len(), 1);
        let again = append(&mut j, &[b"b"]);
        assert_eq!(again.seq, 2);
        let (all, at) = records(&path);
        assert_eq!((all.len(), at), (2, again));
        // A position the file does not hold is refused, not trusted.
        let wrong = Position {
            check: [9; 16],
            ..first
        };
        assert!(Journal::open_at(&path, wrong).unwrap().is_none());
        assert!(Journal::open_at(&dir.path().join("none"), first)
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_rewound_record_is_overwritten_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let mut j = Journal::create(&path).unwrap();
        let first = append(&mut j, &[b"a"]);
        put_events(j.payload(), "s", [b"failed commit".as_slice()].into_iter());
        let (before, _) = j.append().unwrap();
        assert_eq!(before, first);
        j.rewind(before).unwrap();
        assert_eq!(records(&path).0.len(), 1);
        let next = append(&mut j, &[b"b"]);
        let (all, at) = records(&path);
        assert_eq!((all.len(), at), (2, next));
        assert_eq!(
            ops(&all[1]).unwrap(),
            [Op::Events {
                space: "s",
                events: vec![b"b".as_slice()]
            }]
        );
    }

    #[test]
    fn the_file_grows_past_its_preallocation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let mut j = Journal::create(&path).unwrap();
        let big = vec![7u8; 300_000];
        for _ in 0..10 {
            append(&mut j, &[&big]);
        }
        let (all, at) = records(&path);
        assert_eq!(all.len(), 10);
        assert!(at.end > STEP * 2);
    }

    #[test]
    fn records_rewritten_over_released_pages_read_back_intact() {
        // The flush thread releases the page cache of what it flushed, so a rewind
        // after a flush makes the next record overwrite pages that must be read back
        // from the disk first. What the file then holds must be exactly the records
        // kept, whatever was released. Records of 0.6 steps: the flush of each
        // rewound one passes a release point, and the kept one after overwrites it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let mut j = Journal::create(&path).unwrap();
        let (flush, _durable) = Flush::start(&j, 4).unwrap();
        let flush_now = |j: &Journal| {
            let (tx, rx) = std::sync::mpsc::channel();
            flush.submit(Job {
                mark: j.mark(),
                then: Box::new(move |failed| tx.send(failed.is_none()).unwrap()),
            });
            assert!(rx.recv().unwrap(), "the flush failed");
        };
        let big: Vec<u8> = (0..(STEP * 3 / 5) as u32)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut kept = Vec::new();
        for round in 0..5u8 {
            let tail = vec![round; 3];
            kept.push(append(&mut j, &[&big, &tail]));
            flush_now(&j);
            put_events(j.payload(), "s", [big.as_slice()].into_iter());
            let (before, _) = j.append().unwrap();
            flush_now(&j);
            j.rewind(before).unwrap();
            flush_now(&j);
        }
        kept.push(append(&mut j, &[b"last"]));
        flush_now(&j);
        drop(flush);
        let (all, at) = records(&path);
        assert_eq!((all.len(), at), (kept.len(), *kept.last().unwrap()));
        for (round, record) in all.iter().take(5).enumerate() {
            let tail = vec![round as u8; 3];
            assert_eq!(
                ops(record).unwrap(),
                [Op::Events {
                    space: "s",
                    events: vec![big.as_slice(), tail.as_slice()]
                }]
            );
        }
    }

    #[test]
    fn the_state_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_state(dir.path()).unwrap(), LastRun::Unknown);
        for state in [
            LastRun::Clean,
            LastRun::Relaxed,
            LastRun::Open(Some("abc".into())),
            LastRun::Open(None),
        ] {
            write_state(dir.path(), &state).unwrap();
            assert_eq!(read_state(dir.path()).unwrap(), state);
        }
    }
}
