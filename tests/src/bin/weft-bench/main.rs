//! `weft-bench`: benchmarks of the store and of replication between nodes, each with
//! its baselines (raw heed, raw TCP) measured in the same run, on the same machine, with
//! the same bytes.
//!
//! ```text
//! weft-bench append [--json] [--secs 3] [--writers 1,8,64] [--repeat 1]
//! weft-bench ingest [--json] [--events 100000] [--origins 4] [--repeat 1]
//! weft-bench catchup [--json] [--events 1000000] [--value-bytes 200] [--repeat 1]
//! weft-bench latency [--json] [--writes 1000] [--rate 200] [--nodes 5] [--mesh-writes 5000]
//! weft-bench overhead [--json] [--writers 2,10,100] [--events 10000] [--value-bytes 200]
//! ```
//!
//! A table goes to stdout by default; with `--json`, exactly one object
//! `{"figures": [{"name", "value", "unit"}, ...]}` and nothing else (progress notes go to
//! stderr). Every file lives in a temporary directory (`--dir` picks its parent; the
//! default is the system's temp dir), removed at the end. Every loop is bounded in count
//! and in time.

mod append;
mod catchup;
mod common;
mod ingest;
mod latency;
mod overhead;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "weft-bench", about = "weft benchmarks with same-run baselines")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Durable acknowledged `Store::append`s/s with 1, 8 and 64 concurrent writers.
    Append(append::Args),
    /// `Store::ingest` of remote pages of 1,000 signed events, events/s.
    Ingest(ingest::Args),
    /// A fresh node pulling 1,000,000 events from one peer over loopback, events/s.
    Catchup(catchup::Args),
    /// Write acknowledged on one node -> applied on another: 2 nodes and a 5-node mesh.
    Latency(latency::Args),
    /// Bytes on the wire per replicated event beyond key and value, 2, 10, 100 writers.
    Overhead(overhead::Args),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.bench {
        Bench::Append(args) => runtime.block_on(append::run(args)),
        Bench::Ingest(args) => runtime.block_on(ingest::run(args)),
        Bench::Catchup(args) => runtime.block_on(catchup::run(args)),
        Bench::Latency(args) => runtime.block_on(latency::run(args)),
        Bench::Overhead(args) => runtime.block_on(overhead::run(args)),
    }
}
