use clap::Parser;
use omni_data_plane::channels::discord::client::DiscordClients;
use omni_data_plane::channels::slack::client::SlackClient;
use omni_data_plane::config::Limits;
use omni_data_plane::daemon::{init_logging, shutdown_signal};
use omni_data_plane::node::{self, ChannelEndpoints, NodeOptions};
use omni_data_plane::sync::SyncSettings;
use std::net::SocketAddr;
use std::path::PathBuf;

// glibc's allocator took a fifth of the node's CPU at full speed, much of it in frees of buffers
// another thread allocated (the spool writer frees what request handlers built); mimalloc cut
// the node's CPU per message by 15-18% (`omni-bench whatsapp`, alternated runs). Without
// transparent huge pages, which raised the RSS of an idle node with 10,000 instances from 37 to
// 68 MiB.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Omni data-plane node: streams tenant config from the control plane and serves channel
/// webhooks. Holds no database; keeps its last good config in an encrypted cache.
///
/// OMNI_NODE_CACHE_KEY (base64 of 32 bytes) encrypts the config cache; without it the node
/// generates <data dir>/cache.key.
#[derive(Parser)]
#[command(name = "omni-data-plane", version)]
struct Args {
    /// gRPC address of the control plane.
    #[arg(long, env = "OMNI_CONTROL_PLANE", default_value = "http://127.0.0.1:50051")]
    control_plane: String,
    /// CA certificate (PEM) to trust for an https:// control plane, besides the public roots.
    #[arg(long, env = "OMNI_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Address for webhooks, /health, /ready and /metrics.
    #[arg(long, env = "OMNI_HTTP_LISTEN", default_value = "0.0.0.0:8882")]
    http_listen: SocketAddr,
    /// Node id, config cache and cache key.
    #[arg(long, env = "OMNI_DATA_DIR", default_value = "./omni-node")]
    data_dir: PathBuf,
    /// The control plane's node token (default: read from the control plane's data dir).
    #[arg(long, env = "OMNI_NODE_TOKEN", hide_env_values = true, allow_hyphen_values = true)]
    node_token: Option<String>,
    /// Data dir of a control plane on this machine, to read its node token from.
    #[arg(long, env = "OMNI_CONTROL_PLANE_DATA_DIR", default_value = "./omni-data")]
    control_plane_data_dir: PathBuf,
    /// Node id (default: generated once and kept in the data dir).
    #[arg(long, env = "OMNI_NODE_ID")]
    node_id: Option<String>,
    /// Largest webhook body accepted, in bytes (larger ones get 413).
    #[arg(long, env = "OMNI_MAX_BODY_BYTES", default_value_t = NodeOptions::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Messages of one tenant handled at the same time, at most.
    #[arg(long, env = "OMNI_TENANT_CONCURRENCY", default_value_t = NodeOptions::DEFAULT_TENANT_CONCURRENCY)]
    tenant_concurrency: usize,
    /// Refuse (NACK) configs with more instances than this node is sized for.
    #[arg(long, env = "OMNI_MAX_INSTANCES", default_value_t = 1_000_000)]
    max_instances: usize,
    /// Slack's Web API.
    #[arg(long, env = "OMNI_SLACK_API_URL", default_value = SlackClient::DEFAULT_API_URL)]
    slack_api_url: String,
    /// Discord's REST API (an http:// URL means plain HTTP).
    #[arg(long, env = "OMNI_DISCORD_API_URL", default_value = DiscordClients::DEFAULT_API_URL)]
    discord_api_url: String,
    /// Discord's gateway (default: Discord's own; a ws:// URL works).
    #[arg(long, env = "OMNI_DISCORD_GATEWAY_URL")]
    discord_gateway_url: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let args = Args::parse();
    let ca_cert_pem = match &args.ca_cert {
        Some(path) => Some(std::fs::read(path).map_err(|e| anyhow::anyhow!("--ca-cert {}: {e}", path.display()))?),
        None => None,
    };
    let options = NodeOptions {
        control_plane: args.control_plane,
        ca_cert_pem,
        http_listen: args.http_listen,
        data_dir: args.data_dir,
        node_token: args.node_token,
        control_plane_data_dir: args.control_plane_data_dir,
        node_id: args.node_id,
        cache_key: std::env::var("OMNI_NODE_CACHE_KEY").ok().filter(|k| !k.trim().is_empty()),
        limits: Limits { max_instances: args.max_instances },
        sync: SyncSettings::default(),
        max_body_bytes: args.max_body_bytes,
        tenant_concurrency: args.tenant_concurrency,
        channels: ChannelEndpoints {
            slack_api_url: args.slack_api_url,
            discord_api_url: args.discord_api_url,
            discord_gateway_url: args.discord_gateway_url.filter(|u| !u.trim().is_empty()),
        },
    };
    node::run(options, shutdown_signal()).await?;
    Ok(())
}
