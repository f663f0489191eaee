//! Starting the control plane: data dir, master key, database, bootstrap key, gRPC server.

use crate::api::ApiContext;
use crate::api::access::AccessApi;
use crate::api::api_keys::ApiKeyApi;
use crate::api::instances::InstanceApi;
use crate::api::messages::{MAX_MEDIA_BYTES, MessageApi};
use crate::api::nodes::NodeApi;
use crate::api::traces::TraceApi;
use crate::auth::{Authenticator, Bootstrap, ensure_bootstrap_key};
use crate::crypto::random_token;
use crate::crypto::{CryptoError, Keyring};
use crate::metrics::{self, Metrics};
use crate::retention::{self, RetentionSettings};
use crate::shutdown::{self, Stopping};
use crate::store::{self, Backend, StoreError, StoreOptions};
use crate::sync::dispatch::Dispatcher;
use crate::sync::{MAX_NODE_MESSAGE_BYTES, SyncApi, SyncSettings};
use omni_proto::v1::access_service_server::AccessServiceServer;
use omni_proto::v1::api_key_service_server::ApiKeyServiceServer;
use omni_proto::v1::instance_service_server::InstanceServiceServer;
use omni_proto::v1::message_service_server::MessageServiceServer;
use omni_proto::v1::node_service_server::NodeServiceServer;
use omni_proto::v1::node_sync_service_server::NodeSyncServiceServer;
use omni_proto::v1::trace_service_server::TraceServiceServer;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

/// No `Debug`: it holds the node token and the bootstrap key, which must never reach a log.
#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// `None`: SQLite in the data dir.
    pub database_url: Option<String>,
    pub data_dir: PathBuf,
    pub master_key: MasterKeySource,
    /// An admin key the operator chose (`OMNI_BOOTSTRAP_API_KEY`).
    pub bootstrap_api_key: Option<String>,
    /// The secret data-plane nodes present; `None`: read or generate `<data dir>/node-token`.
    pub node_token: Option<String>,
    pub store: StoreOptions,
    pub sync: SyncSettings,
    /// Standalone mode: also run a data-plane node in this process, serving HTTP here.
    pub embedded_data_plane: Option<SocketAddr>,
    /// Serve gRPC over TLS with this certificate chain and key (PEM files).
    pub tls: Option<TlsFiles>,
    pub retention: RetentionSettings,
    /// Serve Prometheus metrics (`/metrics`) on this address.
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone)]
pub enum MasterKeySource {
    /// Comma-separated base64 keys (`OMNI_MASTER_KEY`).
    Inline(String),
    /// A file holding them (`OMNI_MASTER_KEY_FILE`).
    File(PathBuf),
    /// Neither: SQLite deployments get a generated key file; Postgres ones refuse to start.
    Unset,
}

#[derive(Debug, Error)]
pub enum StartError {
    #[error("data dir {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("master key: {0}")]
    MasterKey(String),
    #[error(
        "a Postgres-backed control plane needs a master key: set OMNI_MASTER_KEY (base64 of 32 random bytes, \
         e.g. from `openssl rand -base64 32`) or OMNI_MASTER_KEY_FILE, the same on every replica"
    )]
    MasterKeyRequired,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("node token: {0}")]
    NodeToken(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("embedded data plane: {0}")]
    EmbeddedNode(String),
}

/// Send requests carry media of up to MAX_MEDIA_BYTES, and so do the commands to nodes.
const MAX_SEND_REQUEST_BYTES: usize = MAX_MEDIA_BYTES + 1024 * 1024;

const MASTER_KEY_FILE: &str = "master.key";
const ADMIN_KEY_FILE: &str = "admin-api-key";
/// Where a generated node token is kept; a data plane on the same machine reads it from here.
pub const NODE_TOKEN_FILE: &str = "node-token";
const MIN_NODE_TOKEN_LEN: usize = 16;

async fn load_node_token(config: &Config) -> Result<String, StartError> {
    if let Some(token) = &config.node_token {
        let token = token.trim();
        if token.len() < MIN_NODE_TOKEN_LEN {
            return Err(StartError::NodeToken(format!("must be at least {MIN_NODE_TOKEN_LEN} characters")));
        }
        return Ok(token.to_owned());
    }
    let path = config.data_dir.join(NODE_TOKEN_FILE);
    match tokio::fs::read_to_string(&path).await {
        Ok(token) if token.trim().len() >= MIN_NODE_TOKEN_LEN => Ok(token.trim().to_owned()),
        Ok(_) => Err(StartError::NodeToken(format!("{} is too short", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Prefixed: a bare base64url token may start with '-' and read as a flag.
            let token = format!("node_{}", random_token());
            write_private(&path, &format!("{token}\n"))
                .await
                .map_err(|e| StartError::NodeToken(format!("{}: {e}", path.display())))?;
            tracing::info!(path = %path.display(), "generated the node token");
            Ok(token)
        }
        Err(e) => Err(StartError::NodeToken(format!("{}: {e}", path.display()))),
    }
}

/// This machine's name, to tell control planes apart in leases and logs.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "control-plane".to_owned())
}

/// Writes a file only its owner can read.
async fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    let mut file = tokio::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).await?;
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600)).await?;
    file.write_all(contents.as_bytes()).await?;
    file.sync_all().await
}

async fn load_keyring(config: &Config, backend: Backend) -> Result<Keyring, StartError> {
    let parse = |text: &str, origin: &str| {
        Keyring::parse(text.trim()).map_err(|e: CryptoError| StartError::MasterKey(format!("{origin}: {e}")))
    };
    match &config.master_key {
        MasterKeySource::Inline(list) => parse(list, "OMNI_MASTER_KEY"),
        MasterKeySource::File(path) => {
            let text = tokio::fs::read_to_string(path)
                .await
                .map_err(|e| StartError::MasterKey(format!("{}: {e}", path.display())))?;
            parse(&text, &path.display().to_string())
        }
        MasterKeySource::Unset if backend == Backend::Postgres => Err(StartError::MasterKeyRequired),
        MasterKeySource::Unset => {
            let path = config.data_dir.join(MASTER_KEY_FILE);
            match tokio::fs::read_to_string(&path).await {
                Ok(text) => parse(&text, &path.display().to_string()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let encoded = Keyring::generate_encoded();
                    write_private(&path, &format!("{encoded}\n"))
                        .await
                        .map_err(|e| StartError::MasterKey(format!("{}: {e}", path.display())))?;
                    tracing::warn!(
                        path = %path.display(),
                        "generated a master key for the stored secrets; back it up: without it they cannot be read"
                    );
                    parse(&encoded, &path.display().to_string())
                }
                Err(e) => Err(StartError::MasterKey(format!("{}: {e}", path.display()))),
            }
        }
    }
}

/// Runs the control plane until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), StartError> {
    // One signal stops the gRPC server and then, in standalone mode, the embedded node.
    let (stop, stopping) = Stopping::channel();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    let data_dir_error = |source| StartError::DataDir { path: config.data_dir.clone(), source };
    tokio::fs::DirBuilder::new().recursive(true).mode(0o700).create(&config.data_dir).await.map_err(data_dir_error)?;
    // It holds the master key and the admin key: owner only, even if it existed before.
    tokio::fs::set_permissions(&config.data_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .await
        .map_err(data_dir_error)?;

    let database_url = match &config.database_url {
        Some(url) => url.clone(),
        None => {
            // Created owner-only before SQLite opens it; its -wal and -shm files inherit the mode.
            let path = config.data_dir.join("omni.db");
            if !tokio::fs::try_exists(&path).await.unwrap_or(false) {
                write_private(&path, "").await.map_err(data_dir_error)?;
            }
            format!("sqlite://{}", path.display())
        }
    };
    let backend = Backend::from_url(&database_url)?;
    let keyring = Arc::new(load_keyring(&config, backend).await?);
    let store = store::connect_with(&database_url, config.store).await?;
    tracing::info!(database = %store::redact_url(&database_url), master_key_id = keyring.current_key_id(), "database ready");

    match ensure_bootstrap_key(store.as_ref(), config.bootstrap_api_key.as_deref()).await? {
        Bootstrap::Generated(key) => {
            let path = config.data_dir.join(ADMIN_KEY_FILE);
            write_private(&path, &format!("{key}\n")).await.map_err(data_dir_error)?;
            // Shown once, on stdout rather than in the log, so it stays out of log collectors.
            println!("Created the first admin API key (shown only now; also saved to {}):", path.display());
            println!("  export OMNI_API_KEY={key}");
        }
        Bootstrap::Configured => {
            tracing::info!("bootstrap admin key from OMNI_BOOTSTRAP_API_KEY is registered")
        }
        Bootstrap::Existing => {}
    }

    let node_token: Arc<str> = load_node_token(&config).await?.into();
    let metrics = Arc::new(Metrics::default());
    let dispatcher = Arc::new(Dispatcher::default());
    let sync = SyncApi::new(
        store.clone(),
        keyring.clone(),
        node_token.clone(),
        config.sync,
        metrics.clone(),
        dispatcher.clone(),
        stopping.clone(),
    );
    if let Some(addr) = config.metrics_listen {
        let listener = TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })?;
        let local = listener.local_addr().map_err(|source| StartError::Bind { addr, source })?;
        tracing::info!(addr = %local, "metrics listening");
        let app = metrics::router(store.clone(), metrics.clone());
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let stop = stopping.clone().wait();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
                tracing::error!(error = %e, "metrics listener failed");
            }
        });
    }
    let holder = format!("{}/{}", hostname(), uuid::Uuid::new_v4().simple());
    tokio::spawn(retention::run(store.clone(), config.retention, holder, metrics, stopping.clone()));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ctx = ApiContext {
        store: store.clone(),
        keyring,
        auth: Arc::new(Authenticator::new(store.clone())),
        http: crate::evolution::client(),
        stopping: stopping.clone(),
    };
    let (mut health, health_service) = tonic_health::server::health_reporter();
    let services = [
        "",
        <InstanceServiceServer<InstanceApi> as NamedService>::NAME,
        <AccessServiceServer<AccessApi> as NamedService>::NAME,
        <ApiKeyServiceServer<ApiKeyApi> as NamedService>::NAME,
        <NodeServiceServer<NodeApi> as NamedService>::NAME,
        <TraceServiceServer<TraceApi> as NamedService>::NAME,
        <MessageServiceServer<MessageApi> as NamedService>::NAME,
        <NodeSyncServiceServer<SyncApi> as NamedService>::NAME,
    ];
    for service in services {
        health.set_service_status(service, ServingStatus::Serving).await;
    }
    // From the stop on, health watches are told NOT_SERVING and then end (their streams would
    // hold the stop open), and checks answer NOT_FOUND, while requests finish.
    let stop = stopping.clone();
    tokio::spawn(async move {
        stop.wait().await;
        for service in services {
            health.set_service_status(service, ServingStatus::NotServing).await;
            health.clear_service_status(service).await;
        }
    });
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(omni_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let mut server = tonic::transport::Server::builder();
    let mut tls_cert_pem = None;
    if let Some(tls) = &config.tls {
        let read =
            |path: &PathBuf| std::fs::read(path).map_err(|e| StartError::Tls(format!("{}: {e}", path.display())));
        let (cert, key) = (read(&tls.cert)?, read(&tls.key)?);
        let identity = tonic::transport::Identity::from_pem(&cert, key);
        server = server
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| StartError::Tls(e.to_string()))?;
        tls_cert_pem = Some(cert);
    }

    let listener =
        TcpListener::bind(config.listen).await.map_err(|source| StartError::Bind { addr: config.listen, source })?;
    let local = listener.local_addr().map_err(|source| StartError::Bind { addr: config.listen, source })?;
    tracing::info!(addr = %local, tls = config.tls.is_some(), "gRPC API listening");
    println!("omni-control-plane listening on {local}");

    // The embedded node stops once the gRPC server has: its config stream, like any node's, is
    // held open at a stop until the sends under way on it have been reported.
    let (stopped_serving, server_done) = tokio::sync::oneshot::channel::<()>();
    let embedded = config.embedded_data_plane.map(|http_listen| {
        let loopback = SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), local.port());
        let control_plane = if local.ip().is_unspecified() { loopback } else { local };
        // With TLS the embedded node checks the certificate like any client: it trusts the
        // control plane's own certificate (self-signed deployments) for the name "localhost".
        let control_plane = match &tls_cert_pem {
            Some(_) => format!("https://localhost:{}", control_plane.port()),
            None => format!("http://{control_plane}"),
        };
        let options = omni_data_plane::node::NodeOptions {
            control_plane,
            ca_cert_pem: tls_cert_pem.clone(),
            http_listen,
            data_dir: config.data_dir.join("node"),
            node_token: Some(node_token.to_string()),
            control_plane_data_dir: config.data_dir.clone(),
            node_id: None,
            cache_key: None,
            limits: Default::default(),
            sync: Default::default(),
            max_body_bytes: omni_data_plane::node::NodeOptions::DEFAULT_MAX_BODY_BYTES,
            tenant_concurrency: omni_data_plane::node::NodeOptions::DEFAULT_TENANT_CONCURRENCY,
            channels: omni_data_plane::node::ChannelEndpoints::from_env(),
        };
        tokio::spawn(omni_data_plane::node::run(options, async move {
            let _ = server_done.await;
        }))
    });

    let serving = server
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(InstanceServiceServer::new(InstanceApi::new(ctx.clone())))
        .add_service(AccessServiceServer::new(AccessApi::new(ctx.clone())))
        .add_service(ApiKeyServiceServer::new(ApiKeyApi::new(ctx.clone())))
        .add_service(NodeServiceServer::new(NodeApi::new(ctx.clone())))
        .add_service(TraceServiceServer::new(TraceApi::new(ctx.clone())))
        .add_service(
            MessageServiceServer::new(MessageApi::new(ctx, dispatcher))
                .max_decoding_message_size(MAX_SEND_REQUEST_BYTES),
        )
        .add_service(NodeSyncServiceServer::new(sync).max_decoding_message_size(MAX_NODE_MESSAGE_BYTES))
        // An incoming stream of our own does not inherit the server's nodelay setting; without
        // it, Nagle's algorithm holds multi-frame responses back by a delayed ACK (~40 ms).
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), stopping.clone().wait());
    let cut_off = async {
        stopping.wait().await;
        tokio::time::sleep(shutdown::GRACE).await;
    };
    // The embedded node runs until the server has stopped: one that ends before failed to start
    // (its port taken, say), and a standalone hub without its node is not to run on.
    let mut embedded = embedded;
    let node_failed = async {
        match embedded.as_mut() {
            Some(node) => match node.await {
                Ok(Err(e)) => e.to_string(),
                Ok(Ok(())) => "stopped on its own".to_owned(),
                Err(e) => format!("panicked: {e}"),
            },
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        served = serving => served?,
        _ = cut_off => tracing::warn!(grace = ?shutdown::GRACE, "requests still open after the grace period were cut off"),
        failed = node_failed => return Err(StartError::EmbeddedNode(failed)),
    }
    drop(stopped_serving);
    if let Some(node) = embedded {
        match node.await {
            Ok(Err(e)) => tracing::error!(error = %e, "embedded data plane failed"),
            Err(e) => tracing::error!(error = %e, "embedded data plane panicked"),
            Ok(Ok(())) => {}
        }
    }
    tracing::info!("stopped");
    Ok(())
}
