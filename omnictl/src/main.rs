//! omnictl: the command-line client of Omni's control plane. A plain gRPC client: everything it
//! does, other services can do through the same API.

mod access;
mod apikey;
mod client;
mod instance;
mod node;
mod output;
mod send;
mod trace;

use clap::{Parser, Subcommand};
use output::Format;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "omnictl", version, about = "Manage an Omni messaging hub through its control plane")]
struct Cli {
    /// Control plane gRPC address.
    #[arg(long, global = true, env = "OMNI_SERVER", default_value = "http://127.0.0.1:50051")]
    server: String,
    /// CA certificate (PEM) to trust for an https:// server, besides the public roots.
    #[arg(long, global = true, env = "OMNI_CA_CERT")]
    ca_cert: Option<std::path::PathBuf>,
    /// API key (admin, or scoped to instance patterns).
    #[arg(long, global = true, env = "OMNI_API_KEY", hide_env_values = true, allow_hyphen_values = true)]
    api_key: Option<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value = "table")]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, inspect, change and delete instances (one connected number, bot or app each).
    #[command(subcommand)]
    Instance(Box<instance::InstanceCommand>),
    /// Decide who may talk to an instance's bot.
    #[command(subcommand)]
    Access(access::AccessCommand),
    /// Manage API keys (admin keys only).
    #[command(subcommand)]
    Apikey(apikey::ApiKeyCommand),
    /// Data-plane nodes and the config revision each has applied.
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// What happened to each message, stage by stage.
    #[command(subcommand)]
    Trace(trace::TraceCommand),
    /// The people who wrote to an instance.
    #[command(subcommand)]
    User(trace::UserCommand),
    /// Send a message the hub initiates (a node sends it, traced like replies).
    #[command(subcommand)]
    Send(send::SendCommand),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = async {
        let client = client::Client::connect(&cli.server, cli.ca_cert.as_deref(), cli.api_key.as_deref()).await?;
        match cli.command {
            Command::Instance(command) => instance::run(*command, &client, cli.output).await,
            Command::Access(command) => access::run(command, &client, cli.output).await,
            Command::Apikey(command) => apikey::run(command, &client, cli.output).await,
            Command::Node(command) => node::run(command, &client, cli.output).await,
            Command::Trace(command) => trace::run(command, &client, cli.output).await,
            Command::User(command) => trace::run_users(command, &client, cli.output).await,
            Command::Send(command) => send::run(command, &client, cli.output).await,
        }
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
