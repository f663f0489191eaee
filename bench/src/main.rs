//! `omni-bench`: measures Omni's real binaries and prints the figures.
//!
//! Build everything in release mode first: `cargo build --release --workspace`, then run
//! `./target/release/omni-bench sync`.

mod discord;
mod floor;
mod stats;
mod sync;
mod traces;
mod whatsapp;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "omni-bench", about = "Benchmarks of Omni's real binaries")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Discord bots on one node against a fake gateway: time until all are ready, RSS, idle CPU.
    Discord(discord::Options),
    /// Config propagation to nodes, snapshot time and size, node memory and startup from cache.
    Sync(sync::Options),
    /// Traces at scale on Postgres: ingest rate, then query latencies with them stored.
    Traces(traces::Options),
    /// WhatsApp webhooks: ingest rate against bare axum, end-to-end latency, CPU per message.
    Whatsapp(whatsapp::Options),
    /// (internal) the bare axum server the whatsapp benchmark compares against.
    #[command(hide = true)]
    BaselineServer,
    /// (internal) the minimal relay the whatsapp benchmark takes as the floor.
    #[command(hide = true)]
    FloorRelay { agent: String, evolution: String, dir: std::path::PathBuf },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().bench {
        Bench::Discord(options) => discord::run(options).await,
        Bench::Sync(options) => sync::run(options).await,
        Bench::Traces(options) => traces::run(options).await,
        Bench::Whatsapp(options) => whatsapp::run(options).await,
        Bench::BaselineServer => whatsapp::baseline_server().await,
        Bench::FloorRelay { agent, evolution, dir } => floor::serve(agent, evolution, dir).await,
    }
}
