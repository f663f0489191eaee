//! Starting a node: data dir, identity, credentials, cached config, HTTP, config stream.

use crate::agent::AgentClient;
use crate::cache::{ConfigCache, write_behind};
use crate::channels::Channels;
use crate::channels::discord::client::DiscordClients;
use crate::channels::discord::gateway::{self, GatewaySettings, Leases};
use crate::channels::evolution::send::EvolutionClient;
use crate::channels::ingest::Intake;
use crate::channels::slack::client::SlackClient;
use crate::config::{ConfigHandle, Limits};
use crate::connection_events::ConnectionEvents;
use crate::http::{NodeState, router};
use crate::http_client::HttpClient;
use crate::pipeline::Pipeline;
use crate::spool::{Op, Spool};
use crate::sync::{Sends, SyncClient, SyncSettings, SyncStatus};
use axum::serve::ListenerExt;
use omni_core::crypto::Keyring;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// No `Debug`: it holds the node token and the cache key, which must never reach a log.
#[derive(Clone)]
pub struct NodeOptions {
    pub control_plane: String,
    /// A CA certificate (PEM) to trust for an `https://` control plane.
    pub ca_cert_pem: Option<Vec<u8>>,
    pub http_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub node_token: Option<String>,
    /// Where to look for the node token of a control plane on this machine.
    pub control_plane_data_dir: PathBuf,
    pub node_id: Option<String>,
    /// Base64 key for the config cache (`OMNI_NODE_CACHE_KEY`); default: `<data dir>/cache.key`.
    pub cache_key: Option<String>,
    pub limits: Limits,
    pub sync: SyncSettings,
    /// Largest webhook body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Messages of one tenant handled at once, at most.
    pub tenant_concurrency: usize,
    pub channels: ChannelEndpoints,
}

/// Where the channels' APIs are; tests point them at loopback fakes.
#[derive(Debug, Clone)]
pub struct ChannelEndpoints {
    /// `OMNI_SLACK_API_URL`.
    pub slack_api_url: String,
    /// `OMNI_DISCORD_API_URL`; an `http://` URL means plain HTTP.
    pub discord_api_url: String,
    /// `OMNI_DISCORD_GATEWAY_URL`; Discord's own when unset.
    pub discord_gateway_url: Option<String>,
}

impl ChannelEndpoints {
    /// The real services, unless the environment says otherwise.
    pub fn from_env() -> ChannelEndpoints {
        let var = |name: &str| std::env::var(name).ok().map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        ChannelEndpoints {
            slack_api_url: var("OMNI_SLACK_API_URL").unwrap_or_else(|| SlackClient::DEFAULT_API_URL.to_owned()),
            discord_api_url: var("OMNI_DISCORD_API_URL").unwrap_or_else(|| DiscordClients::DEFAULT_API_URL.to_owned()),
            discord_gateway_url: var("OMNI_DISCORD_GATEWAY_URL"),
        }
    }
}

impl NodeOptions {
    pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
    pub const DEFAULT_TENANT_CONCURRENCY: usize = 8;
}

#[derive(Debug, Error)]
pub enum NodeError {
    #[error("data dir {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error(
        "no node token: pass --node-token (OMNI_NODE_TOKEN), or run beside a control plane whose data dir is {0} \
         (it keeps the token in node-token)"
    )]
    NoNodeToken(PathBuf),
    #[error("node token contains characters that cannot be sent")]
    BadNodeToken,
    #[error("control plane {0}")]
    ControlPlaneEndpoint(#[from] omni_proto::client::EndpointError),
    #[error("cache key: {0}")]
    CacheKey(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error("spool: {0}")]
    Spool(#[from] crate::spool::SpoolError),
    #[error("HTTP client: {0}")]
    HttpClient(String),
    #[error(transparent)]
    Client(#[from] crate::http_client::ClientError),
}

fn data_dir_error(path: &Path) -> impl FnOnce(std::io::Error) -> NodeError + '_ {
    move |source| NodeError::DataDir { path: path.to_owned(), source }
}

/// Reads a small owner-only file, creating it with `make` when missing.
fn read_or_create(path: &Path, make: impl FnOnce() -> String) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.trim().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let value = make();
            let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
            std::io::Write::write_all(&mut file, format!("{value}\n").as_bytes())?;
            file.sync_all()?;
            Ok(value)
        }
        Err(e) => Err(e),
    }
}

/// Runs a node until `shutdown` resolves. Prints `omni-data-plane listening on ADDR` once the
/// HTTP port is bound.
pub async fn run(options: NodeOptions, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), NodeError> {
    let dir = options.data_dir.clone();
    std::fs::create_dir_all(&dir).map_err(data_dir_error(&dir))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(data_dir_error(&dir))?;

    let node_id = match &options.node_id {
        Some(id) => id.clone(),
        None => {
            read_or_create(&dir.join("node-id"), || uuid::Uuid::new_v4().to_string()).map_err(data_dir_error(&dir))?
        }
    };
    let token = match &options.node_token {
        Some(token) => token.trim().to_owned(),
        None => std::fs::read_to_string(options.control_plane_data_dir.join("node-token"))
            .map(|t| t.trim().to_owned())
            .map_err(|_| NodeError::NoNodeToken(options.control_plane_data_dir.clone()))?,
    };
    let token = crate::sync::NodeToken(format!("Bearer {token}").parse().map_err(|_| NodeError::BadNodeToken)?);
    let cache_key = match &options.cache_key {
        Some(key) => key.clone(),
        None => read_or_create(&dir.join("cache.key"), Keyring::generate_encoded).map_err(data_dir_error(&dir))?,
    };
    let keyring = Keyring::parse(&cache_key).map_err(|e| NodeError::CacheKey(e.to_string()))?;
    let cache = Arc::new(ConfigCache::new(dir.join("config.cache"), keyring));

    let config = Arc::new(ConfigHandle::new());
    if let Some(cached) = cache.load(options.limits) {
        tracing::info!(revision = cached.revision, instances = cached.instances.len(), "serving the cached config");
        config.store(cached);
    }

    let endpoint = omni_proto::client::endpoint(&options.control_plane, options.ca_cert_pem.as_deref())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);

    let listener = tokio::net::TcpListener::bind(options.http_listen)
        .await
        .map_err(|source| NodeError::Bind { addr: options.http_listen, source })?;
    let local = listener.local_addr().map_err(|source| NodeError::Bind { addr: options.http_listen, source })?;

    let status = Arc::new(SyncStatus::default());
    let (commands, commands_rx) = tokio::sync::mpsc::channel(256);
    let (results_tx, results) = tokio::sync::mpsc::channel(256);
    let (leases, leases_rx) = tokio::sync::watch::channel(Leases::default());
    let release = Arc::new(crate::sync::LeaseRelease::default());
    let client = SyncClient {
        endpoint: endpoint.clone(),
        token: token.clone(),
        node_id: node_id.clone(),
        address: local.to_string(),
        config: config.clone(),
        limits: options.limits,
        status: status.clone(),
        settings: options.sync.clone(),
        sends: Some(Sends { commands, results: tokio::sync::Mutex::new(results) }),
        leases: Some(leases),
        release: Some(release.clone()),
        beats: Default::default(),
    };

    // rustls needs one process-wide crypto provider; tonic's TLS uses ring too.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // One read of the platform's CA store for both clients.
    let tls = crate::http_client::platform_tls()?;
    let mut slack_tls = tls.clone();
    slack_tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(slack_tls)
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
        .map_err(|e| NodeError::HttpClient(e.to_string()))?;
    let proxies = crate::http_client::Proxies::from_env()?;
    if let Some(proxies) = proxies.describe() {
        tracing::info!(%proxies, "agent and Evolution calls go through a proxy");
    }
    let per_message = HttpClient::with_tls(tls, proxies);
    let spool = Spool::open(&dir.join("spool.redb"))?;
    // Only now that nothing can fail any more: a node that does not start must not be left
    // connected to its control plane.
    let sync_task = tokio::spawn(client.run());
    let discord = DiscordClients::new(&options.channels.discord_api_url);
    let pipeline = Arc::new(Pipeline::new(
        spool.clone(),
        config.clone(),
        AgentClient::new(per_message.clone()),
        Channels {
            evolution: EvolutionClient::new(per_message),
            slack: SlackClient::new(http, &options.channels.slack_api_url),
            discord: discord.clone(),
        },
        options.tenant_concurrency,
    ));
    let connection_events = ConnectionEvents::default();
    let intake = Intake { spool: spool.clone(), pipeline: pipeline.clone(), stats: Default::default() };
    let background = vec![
        tokio::spawn(resume_when_configured(pipeline.clone(), config.clone())),
        tokio::spawn(crate::traces::ship(
            spool.clone(),
            endpoint.connect_lazy(),
            token.clone(),
            node_id.clone(),
            spool.traces_added(),
        )),
        tokio::spawn(forget_old_deliveries(spool.clone())),
        tokio::spawn(discord.forget_removed_bots(config.clone())),
        tokio::spawn(crate::pipeline::outbound::run(pipeline.clone(), commands_rx, results_tx)),
        tokio::spawn(crate::connection_events::report(
            connection_events.clone(),
            endpoint.connect_lazy(),
            token.clone(),
            node_id.clone(),
        )),
    ];
    let (stop_gateways, gateways_stopped) = tokio::sync::watch::channel(false);
    let gateway_stats = Arc::new(gateway::GatewayStats::default());
    let gateways = tokio::spawn(gateway::run(
        leases_rx,
        config.clone(),
        intake.clone(),
        connection_events.clone(),
        GatewaySettings { gateway_url: options.channels.discord_gateway_url.clone() },
        gateway_stats.clone(),
        gateways_stopped,
    ));
    let (stop_cache, cache_stopped) = tokio::sync::watch::channel(false);
    let cache_task = tokio::spawn(write_behind(cache, config.clone(), cache_stopped));

    let sync_status = status.clone();
    let state = Arc::new(NodeState {
        node_id: node_id.clone(),
        config,
        sync: status,
        spool: spool.clone(),
        pipeline,
        intake,
        connection_events,
        gateways: gateway_stats,
    });
    tracing::info!(%node_id, addr = %local, control_plane = %options.control_plane, "node listening");
    println!("omni-data-plane listening on {local}");
    // Replies go out in one piece, without Nagle's algorithm waiting for an ACK.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let served = axum::serve(listener, router(state, options.max_body_bytes)).with_graceful_shutdown(shutdown).await;
    // Close the bots' gateways, then hand their leases back, so that other nodes take the bots
    // now rather than when the leases expire. Both bounded: shutdown must not hang.
    let _ = stop_gateways.send(true);
    let mut gateways = gateways;
    let closed = tokio::time::timeout(Duration::from_secs(3), &mut gateways).await.is_ok();
    if !closed {
        // Dropping every gateway now; a bot not known to be closed is not handed back.
        gateways.abort();
        let _ = gateways.await;
        tracing::warn!("gateways did not close in time: leases left to expire");
    } else if !sync_status.connected.load(std::sync::atomic::Ordering::Relaxed) {
        // Without a stream (the control plane may be stopping too) there is no one to ask.
        tracing::info!("gateway leases not handed back (no config stream); they will expire");
    } else {
        match tokio::time::timeout(Duration::from_secs(2), release.release()).await {
            Ok(true) => {}
            Ok(false) => tracing::info!("gateway leases not handed back (control plane unreachable); they will expire"),
            Err(_) => tracing::info!("gateway leases not handed back (no answer in time); they will expire"),
        }
    }
    sync_task.abort();
    for task in background {
        task.abort();
    }
    // What was finished or shipped meanwhile is deferred, and some of it applied to the
    // spool's memory alone: all of it on disk before the process ends, so that the next start
    // redoes only what messages still being handled commit after this.
    if let Err(e) = spool.checkpoint().await {
        tracing::error!(error = %e, "could not checkpoint the spool at shutdown");
    }
    // Leave the latest applied config on disk for the next start.
    let _ = stop_cache.send(true);
    let _ = cache_task.await;
    served.map_err(NodeError::Serve)
}

/// Resumes the messages a previous run accepted but did not finish, once a config is there to
/// handle them with.
async fn resume_when_configured(pipeline: Arc<Pipeline>, config: Arc<ConfigHandle>) {
    let mut applied = config.subscribe();
    let _ = applied.wait_for(|_| config.load().is_some()).await;
    let resumed = pipeline.resume().await;
    if resumed > 0 {
        tracing::info!(resumed, "resumed messages accepted before a restart");
    }
}

/// Channel redeliveries come within hours; idempotency keys are kept for two days.
async fn forget_old_deliveries(spool: Spool) {
    const KEEP_MS: i64 = 48 * 3600 * 1000;
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    loop {
        every.tick().await;
        let before_ms = crate::traces::now_ms() - KEEP_MS;
        if let Err(e) = spool.defer(vec![Op::PruneSeen { before_ms }]) {
            tracing::warn!(error = %e, "could not prune old idempotency keys");
        }
    }
}
