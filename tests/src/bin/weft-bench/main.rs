//! `weft-bench`: throughput benchmarks of the store, each with its raw-heed baselines
//! measured in the same run, on the same machine, with the same bytes.
//!
//! ```text
//! weft-bench append [--json] [--secs 3] [--writers 1,8,64] [--repeat 1]
//! weft-bench ingest [--json] [--events 100000] [--origins 4] [--repeat 1]
//! ```
//!
//! A table goes to stdout by default; with `--json`, exactly one object
//! `{"figures": [{"name", "value", "unit"}, ...]}` and nothing else (progress notes go to
//! stderr). Every file lives in a temporary directory (`--dir` picks its parent; the
//! default is the system's temp dir), removed at the end. Every loop is bounded in count
//! and in time.

mod append;
mod common;
mod ingest;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "weft-bench",
    about = "weft store benchmarks with same-run baselines"
)]
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
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.bench {
        Bench::Append(args) => runtime.block_on(append::run(args)),
        Bench::Ingest(args) => runtime.block_on(ingest::run(args)),
    }
}
