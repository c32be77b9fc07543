//! Figures, output and the raw-heed baselines every benchmark measures in its own run.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use heed::types::Bytes;
use heed::{CommitOrAbort, Database, Env, EnvOpenOptions, PutFlags, WithoutTls};
use serde::Serialize;

/// One measured number.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: String,
}

impl Figure {
    pub fn new(name: impl Into<String>, value: f64, unit: impl Into<String>) -> Self {
        Figure {
            name: name.into(),
            value,
            unit: unit.into(),
        }
    }
}

/// Prints the figures: a table, or exactly one JSON object on stdout.
pub fn report(title: &str, figures: &[Figure], json: bool) -> Result<()> {
    if json {
        #[derive(Serialize)]
        struct Out<'a> {
            figures: &'a [Figure],
        }
        println!("{}", serde_json::to_string(&Out { figures })?);
        return Ok(());
    }
    let width = figures
        .iter()
        .map(|f| f.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!("{title}");
    println!("{:<width$}  {:>14}  unit", "name", "value");
    println!("{}", "-".repeat(width + 24));
    for f in figures {
        println!("{:<width$}  {:>14}  {}", f.name, fmt_value(f.value), f.unit);
    }
    Ok(())
}

fn fmt_value(v: f64) -> String {
    if v.abs() >= 1000.0 {
        // Thousands separators for rates.
        let s = format!("{:.0}", v);
        let (sign, digits) = s.split_at(usize::from(s.starts_with('-')));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else {
        format!("{v:.2}")
    }
}

/// Progress and notes go to stderr, so `--json` output stays one object.
pub fn note(msg: impl AsRef<str>) {
    eprintln!("weft-bench: {}", msg.as_ref());
}

/// The median of repeated measurements (the upper one of the middle pair).
pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// A raw LMDB environment with one unnamed-style table, opened the way the store opens
/// its own (default flags: every commit is fsynced, like `Durability::Full`).
fn raw_env(
    dir: &Path,
    map_size: usize,
) -> Result<(Env<WithoutTls>, Database<'static, Bytes, Bytes>)> {
    std::fs::create_dir_all(dir)?;
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.map_size(map_size).max_dbs(2);
    // SAFETY: the directory is a fresh temporary directory only this process uses.
    let env = unsafe { options.open(dir) }.context("opening raw heed env")?;
    let txn = env.write_txn()?;
    let db = env
        .create_databases_and_commit(txn, |dbo, txn| {
            let db = dbo.create_database::<Bytes, Bytes>(txn, Some("bench"))?;
            Ok::<_, heed::Error>(CommitOrAbort::<_, ()>::Commit(db))
        })?
        .commit()
        .context("creating the table was aborted")?;
    Ok((env, db))
}

/// Raw heed, one put and one durable commit per record, for at most `max_time` or
/// `max_records`. Returns records/s.
pub fn heed_durable_single_commit(
    dir: &Path,
    value: &[u8],
    max_time: Duration,
    max_records: u64,
) -> Result<f64> {
    let (env, db) = raw_env(dir, 1 << 30)?;
    let start = Instant::now();
    let deadline = start + max_time;
    let mut n: u64 = 0;
    while n < max_records && Instant::now() < deadline {
        let mut txn = env.write_txn()?;
        db.put_with_flags(&mut txn, PutFlags::APPEND, &n.to_be_bytes(), value)?;
        txn.commit()?;
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(env);
    Ok(n as f64 / secs)
}

/// Raw heed, `PutFlags::APPEND` puts of big-endian u64 keys, one durable commit per
/// `per_commit` records, of the records `values` yields (cycled through until `total`).
/// Stops early after `max_time`. Returns records/s.
pub fn heed_batched_append(
    dir: &Path,
    values: &[&[u8]],
    total: u64,
    per_commit: u64,
    max_time: Duration,
) -> Result<f64> {
    ensure!(!values.is_empty() && per_commit > 0, "nothing to append");
    let bytes: u64 = values.iter().map(|v| v.len() as u64 + 64).sum::<u64>() / values.len() as u64;
    // Generous and sparse: the file grows only as far as it is written.
    let map = ((total * bytes * 2) as usize)
        .max(64 << 20)
        .next_power_of_two();
    let (env, db) = raw_env(dir, map)?;
    let start = Instant::now();
    let deadline = start + max_time;
    let mut n: u64 = 0;
    while n < total && Instant::now() < deadline {
        let mut txn = env.write_txn()?;
        let end = (n + per_commit).min(total);
        while n < end {
            let v = values[(n % values.len() as u64) as usize];
            db.put_with_flags(&mut txn, PutFlags::APPEND, &n.to_be_bytes(), v)?;
            n += 1;
        }
        txn.commit()?;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(env);
    Ok(n as f64 / secs)
}

/// [`heed_batched_append`] plus, per record, one entry in a key-ordered index shaped
/// like the store's `by_key`: `record_keys[i]` (the key of `values[i]`), 0x00, the
/// record number; empty value. The least a store that indexes keys writes. Returns
/// records/s.
pub fn heed_batched_append_keyed(
    dir: &Path,
    values: &[&[u8]],
    record_keys: &[&[u8]],
    total: u64,
    per_commit: u64,
    max_time: Duration,
) -> Result<f64> {
    ensure!(
        !values.is_empty() && values.len() == record_keys.len() && per_commit > 0,
        "nothing to append"
    );
    let bytes: u64 = values.iter().map(|v| v.len() as u64 + 128).sum::<u64>() / values.len() as u64;
    let map = ((total * bytes * 3) as usize)
        .max(64 << 20)
        .next_power_of_two();
    let (env, [log, index]) = raw_env_with(dir, map, ["log", "index"])?;
    let start = Instant::now();
    let deadline = start + max_time;
    let mut n: u64 = 0;
    let mut key = Vec::with_capacity(64);
    while n < total && Instant::now() < deadline {
        let mut txn = env.write_txn()?;
        let end = (n + per_commit).min(total);
        while n < end {
            let i = (n % values.len() as u64) as usize;
            log.put_with_flags(&mut txn, PutFlags::APPEND, &n.to_be_bytes(), values[i])?;
            key.clear();
            key.extend_from_slice(record_keys[i]);
            key.push(0);
            key.extend_from_slice(&n.to_be_bytes());
            index.put(&mut txn, &key, &[])?;
            n += 1;
        }
        txn.commit()?;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(env);
    Ok(n as f64 / secs)
}

/// What one record of [`heed_group_commit`] writes besides its log entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupShape {
    /// Only the log: `PutFlags::APPEND` of the value under a big-endian u64 key.
    LogOnly,
    /// The log and one entry in a key-ordered index, shaped like the store's `by_key`:
    /// the record key of writer `n % writers` (`w<writer>/k<i>`, as `weft-bench append`
    /// writes them), 0x00, the record number; empty value.
    Keyed { writers: u64 },
}

/// Raw heed, closed-loop group commit without a store: `per_commit` records per durable
/// commit (each shaped by `shape`), back to back, for `max_time`. The ceiling a store
/// doing the same writes could reach with no CPU of its own. Returns records/s.
pub fn heed_group_commit(
    dir: &Path,
    value: &[u8],
    per_commit: u64,
    shape: GroupShape,
    max_time: Duration,
) -> Result<f64> {
    ensure!(per_commit > 0, "nothing to commit");
    let (env, [log, index]) = raw_env_with(dir, 1 << 30, ["log", "index"])?;
    let start = Instant::now();
    let deadline = start + max_time;
    let mut n: u64 = 0;
    let mut key = Vec::with_capacity(64);
    while Instant::now() < deadline {
        let mut txn = env.write_txn()?;
        for _ in 0..per_commit {
            log.put_with_flags(&mut txn, PutFlags::APPEND, &n.to_be_bytes(), value)?;
            if let GroupShape::Keyed { writers } = shape {
                key.clear();
                let w = n % writers.max(1);
                key.extend_from_slice(format!("w{w}/k{}", n / writers.max(1)).as_bytes());
                key.push(0);
                key.extend_from_slice(&n.to_be_bytes());
                index.put(&mut txn, &key, &[])?;
            }
            n += 1;
        }
        txn.commit()?;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(env);
    Ok(n as f64 / secs)
}

type Table = Database<'static, Bytes, Bytes>;

/// [`raw_env`] with several named tables.
fn raw_env_with<const N: usize>(
    dir: &Path,
    map_size: usize,
    names: [&str; N],
) -> Result<(Env<WithoutTls>, [Table; N])> {
    std::fs::create_dir_all(dir)?;
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.map_size(map_size).max_dbs(N as u32 + 1);
    // SAFETY: the directory is a fresh temporary directory only this process uses.
    let env = unsafe { options.open(dir) }.context("opening raw heed env")?;
    let txn = env.write_txn()?;
    let dbs = env
        .create_databases_and_commit(txn, |dbo, txn| {
            let mut made = Vec::with_capacity(N);
            for name in names {
                made.push(dbo.create_database::<Bytes, Bytes>(txn, Some(name))?);
            }
            let all: [_; N] = made
                .try_into()
                .unwrap_or_else(|_| unreachable!("one table per name"));
            Ok::<_, heed::Error>(CommitOrAbort::<_, ()>::Commit(all))
        })?
        .commit()
        .context("creating the tables was aborted")?;
    Ok((env, dbs))
}

/// User plus system CPU time of this process so far, in seconds.
pub fn process_cpu_secs() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// Bytes this process has caused to be written to storage so far (`/proc/self/io`),
/// or 0 where that is not available.
pub fn process_write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("write_bytes:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The id of the last write transaction committed in the (closed) LMDB environment in
/// `dir`: the number of commits it has seen.
pub fn last_txn_id(dir: &Path) -> Result<u64> {
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.map_size(1 << 36).max_dbs(16).max_readers(1024);
    // SAFETY: the directory is a closed benchmark store only this process uses.
    let env = unsafe { options.open(dir) }.context("reopening a store for its txn id")?;
    let id = env.info().last_txn_id as u64;
    drop(env);
    Ok(id)
}

/// A fresh temporary directory under `base` (or the system's temp dir).
pub fn tempdir(base: Option<&Path>) -> Result<tempfile::TempDir> {
    let b = tempfile::Builder::new().prefix("weft-bench-").to_owned();
    Ok(match base {
        Some(p) => b.tempdir_in(p)?,
        None => b.tempdir()?,
    })
}

/// A 200-byte (or `len`-byte) value that is itself valid CBOR: a byte string.
pub fn cbor_value(len: usize, salt: u64) -> Vec<u8> {
    let mut body = Vec::with_capacity(len);
    let mut x = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    // Header size depends on the body length; pick the body so the total is `len`
    // (exact for every length but 25 and 258, which no byte string has).
    let body_len = match len {
        0..=24 => len.saturating_sub(1),
        25..=257 => len.max(26) - 2,
        258..=65538 => len.max(259) - 3,
        _ => len - 5,
    };
    for _ in 0..body_len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        body.push(x as u8);
    }
    let mut out = Vec::with_capacity(len);
    ciborium::into_writer(&ciborium::Value::Bytes(body), &mut out).expect("CBOR into a Vec");
    out
}

/// Parses "1,8,64".
pub fn parse_list(s: &str) -> Result<Vec<usize>, String> {
    s.split(',')
        .map(|p| p.trim().parse::<usize>().map_err(|e| format!("{p:?}: {e}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cbor_value_has_the_asked_length() {
        for len in [1, 24, 26, 200, 257, 259, 1000, 65538] {
            assert_eq!(cbor_value(len, 7).len(), len, "{len}");
        }
    }
}
