use clap::Parser;
use omni_control_plane::retention::RetentionSettings;
use omni_control_plane::server::{self, Config, MasterKeySource, TlsFiles};
use omni_control_plane::store::StoreOptions;
use omni_control_plane::sync::SyncSettings;
use omni_data_plane::daemon::{init_logging, shutdown_signal};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Omni control plane: tenant configuration, API keys and traces behind a gRPC API.
///
/// Secrets: OMNI_MASTER_KEY (comma-separated base64 32-byte keys; the first encrypts) or
/// OMNI_MASTER_KEY_FILE. Without either, a SQLite deployment generates <data dir>/master.key.
/// OMNI_BOOTSTRAP_API_KEY registers an admin API key of your choosing; without it, the first
/// start creates one, prints it once and saves it to <data dir>/admin-api-key.
#[derive(Parser)]
#[command(name = "omni-control-plane", version)]
struct Args {
    /// Address of the gRPC API.
    #[arg(long, env = "OMNI_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// postgres://... or sqlite://... (default: sqlite://<data dir>/omni.db, created).
    #[arg(long, env = "OMNI_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Where the SQLite database and generated keys live.
    #[arg(long, env = "OMNI_DATA_DIR", default_value = "./omni-data")]
    data_dir: PathBuf,
    /// Secret that data-plane nodes present (default: generated into <data dir>/node-token).
    /// Give every control-plane replica the same one.
    #[arg(long, env = "OMNI_NODE_TOKEN", hide_env_values = true, allow_hyphen_values = true)]
    node_token: Option<String>,
    /// Revisions of config history kept for nodes to resume from; older nodes get a snapshot.
    #[arg(long, env = "OMNI_CHANGE_LOG_RETENTION", default_value_t = 10_000, value_parser = clap::value_parser!(i64).range(1..))]
    change_log_retention: i64,
    /// Standalone mode: also run a data-plane node in this process.
    #[arg(long)]
    embedded_data_plane: bool,
    /// Serve gRPC over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "OMNI_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "OMNI_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// How long traces are kept where an instance sets no retention of its own (e.g. 30d;
    /// 0 keeps them).
    #[arg(long, env = "OMNI_TRACE_RETENTION", default_value = "30d", value_parser = parse_duration)]
    trace_retention: Duration,
    /// How often expired traces are deleted (one control plane does it for all).
    #[arg(long, env = "OMNI_RETENTION_INTERVAL", default_value = "10m", value_parser = parse_positive_duration)]
    retention_interval: Duration,
    /// How long a Discord bot's gateway lease holds unless its node renews it (nodes renew at a
    /// third of it). A node cut off from the control plane this long closes its gateways; the
    /// bots then move to other nodes.
    #[arg(long, env = "OMNI_GATEWAY_LEASE_TTL", default_value = "30s", value_parser = parse_positive_duration)]
    gateway_lease_ttl: Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics (off unless set).
    #[arg(long, env = "OMNI_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// HTTP address of the embedded data plane (webhooks, /ready, /metrics).
    #[arg(long, env = "OMNI_HTTP_LISTEN", default_value = "0.0.0.0:8882")]
    http_listen: SocketAddr,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    omni_core::duration::parse_secs(text).map(|secs| Duration::from_secs(secs as u64))
}

fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    omni_core::duration::parse_positive_secs(text).map(|secs| Duration::from_secs(secs as u64))
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

// As in the data plane: glibc's allocator took a seventh of the control plane's CPU while it
// stored traces (SQLite's own allocations stay with glibc). mimalloc took its instructions per
// message stored from 201,000 to 178,000 (callgrind, `omni-bench whatsapp --control-plane-wrapper`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let args = Args::parse();
    let master_key = match (non_empty_env("OMNI_MASTER_KEY"), non_empty_env("OMNI_MASTER_KEY_FILE")) {
        (Some(keys), _) => MasterKeySource::Inline(keys),
        (None, Some(path)) => MasterKeySource::File(path.into()),
        (None, None) => MasterKeySource::Unset,
    };
    let config = Config {
        listen: args.listen,
        database_url: args.database_url,
        data_dir: args.data_dir,
        master_key,
        bootstrap_api_key: non_empty_env("OMNI_BOOTSTRAP_API_KEY"),
        node_token: args.node_token,
        store: StoreOptions { change_log_retention: args.change_log_retention },
        sync: SyncSettings { gateway_lease_ttl: args.gateway_lease_ttl, ..SyncSettings::default() },
        embedded_data_plane: args.embedded_data_plane.then_some(args.http_listen),
        tls: args.tls_cert.zip(args.tls_key).map(|(cert, key)| TlsFiles { cert, key }),
        retention: RetentionSettings { default_retention: args.trace_retention, interval: args.retention_interval },
        metrics_listen: args.metrics_listen,
    };
    server::run(config, shutdown_signal()).await?;
    Ok(())
}
