//! Config sync: how fast a change reaches every node, and what a large snapshot costs.

use crate::stats::{mib, ms, percentile, rss_bytes};
use omni_data_plane::config::{ConfigHandle, Limits};
use omni_data_plane::sync::{SyncClient, SyncSettings, SyncStatus};
use omni_proto::FieldMask;
use omni_proto::v1::{self as pb, instance_service_client::InstanceServiceClient};
use omni_tests::process::{ControlPlane, ControlPlaneOptions, DataPlane, DataPlaneOptions};
use prost::Message;
use std::sync::Arc;
use std::time::Instant;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const ADMIN_KEY: &str = "omni_bench_0123456789abcdef0123456789abcdef";
const NODE_TOKEN: &str = "bench-node-token-0123456789abcdef";
const MASTER_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Nodes receiving the changes.
    #[arg(long, default_value_t = 10)]
    nodes: usize,
    /// Config changes, made one after another.
    #[arg(long, default_value_t = 1000)]
    changes: usize,
    /// Instances in the snapshot measurement.
    #[arg(long, default_value_t = 10_000)]
    instances: usize,
    /// Run the control plane on Postgres (a fresh, empty database) instead of SQLite.
    #[arg(long)]
    database_url: Option<String>,
}

type Api = InstanceServiceClient<
    InterceptedService<Channel, fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>>,
>;

fn with_key(mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    let value: MetadataValue<_> = format!("Bearer {ADMIN_KEY}").parse().expect("ascii");
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

fn whatsapp(name: String) -> pb::Instance {
    pb::Instance {
        name,
        channel: pb::Channel::Whatsapp as i32,
        agent: Some(pb::AgentSettings {
            url: "http://127.0.0.1:9000".into(),
            key: "agent-key-0123456789".into(),
            ..Default::default()
        }),
        evolution: Some(pb::EvolutionSettings {
            url: "http://127.0.0.1:8080".into(),
            key: "evolution-key-0123456789".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A node's sync client running in this process: the data plane's own code, minus HTTP.
fn spawn_node(cp: &ControlPlane, id: String) -> (Arc<ConfigHandle>, tokio::task::JoinHandle<()>) {
    let handle = Arc::new(ConfigHandle::new());
    let client = SyncClient {
        endpoint: omni_proto::client::endpoint(&cp.url(), None).expect("control plane URL"),
        token: omni_data_plane::sync::NodeToken(format!("Bearer {NODE_TOKEN}").parse().expect("ascii")),
        node_id: id,
        address: "bench".into(),
        config: handle.clone(),
        limits: Limits::default(),
        status: Arc::new(SyncStatus::default()),
        settings: SyncSettings::default(),
        sends: None,
        leases: None,
        release: None,
        beats: Default::default(),
    };
    (handle, tokio::spawn(client.run()))
}

async fn all_applied(handles: &[Arc<ConfigHandle>], revision: i64) {
    for handle in handles {
        let mut applied = handle.subscribe();
        let _ = applied.wait_for(|r| *r >= revision && handle.load().is_some()).await;
    }
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cp_options = ControlPlaneOptions {
        database_url: options.database_url.clone(),
        master_key: Some(MASTER_KEY.into()),
        bootstrap_api_key: Some(ADMIN_KEY.into()),
        node_token: Some(NODE_TOKEN.into()),
        listen: Some(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string()),
        ..Default::default()
    };
    let cp = ControlPlane::start(&dir.path().join("cp"), &cp_options).await;
    let channel = omni_proto::client::endpoint(&cp.url(), None)?.connect().await?;
    let mut api: Api = InstanceServiceClient::with_interceptor(channel.clone(), with_key as _);
    let mut nodes_api = pb::node_service_client::NodeServiceClient::with_interceptor(channel, with_key);
    let backend = if options.database_url.is_some() { "postgres" } else { "sqlite" };
    println!("config sync benchmark: control plane on {backend}, {} nodes, {} changes", options.nodes, options.changes);

    // Propagation: each change, from the update request to its revision applied on every node.
    let nodes: Vec<_> = (0..options.nodes).map(|i| spawn_node(&cp, format!("bench-node-{i}"))).collect();
    let handles: Vec<_> = nodes.iter().map(|(h, _)| h.clone()).collect();
    all_applied(&handles, 0).await;
    let created = api
        .create_instance(pb::CreateInstanceRequest {
            instance: Some(whatsapp("bench-wa".into())),
            ..Default::default()
        })
        .await?;
    all_applied(&handles, created.into_inner().instance.unwrap_or_default().revision).await;

    let mut commit = Vec::with_capacity(options.changes);
    let mut propagation = Vec::with_capacity(options.changes);
    let started = Instant::now();
    for i in 0..options.changes {
        let mut instance = whatsapp("bench-wa".into());
        instance.agent.as_mut().unwrap().timeout_seconds = 1 + (i % 600) as u32;
        let t0 = Instant::now();
        let updated = api
            .update_instance(pb::UpdateInstanceRequest {
                instance: Some(instance),
                update_mask: Some(FieldMask { paths: vec!["agent.timeout_seconds".into()] }),
            })
            .await?
            .into_inner();
        commit.push(t0.elapsed());
        all_applied(&handles, updated.revision).await;
        propagation.push(t0.elapsed());
    }
    let elapsed = started.elapsed();
    for (_, task) in &nodes {
        task.abort();
    }
    println!(
        "  update committed (RPC):              p50 {}  p99 {}",
        ms(percentile(&mut commit, 50.0)),
        ms(percentile(&mut commit, 99.0))
    );
    println!(
        "  request -> applied on all {} nodes:  p50 {}  p99 {}  max {}",
        options.nodes,
        ms(percentile(&mut propagation, 50.0)),
        ms(percentile(&mut propagation, 99.0)),
        ms(percentile(&mut propagation, 100.0))
    );
    println!(
        "  {} changes in {:.2} s ({:.0} changes/s, sequential)",
        options.changes,
        elapsed.as_secs_f64(),
        options.changes as f64 / elapsed.as_secs_f64()
    );

    // Snapshot: seed instances, then a fresh node takes everything at once.
    let seed_start = Instant::now();
    let mut pending = tokio::task::JoinSet::new();
    for i in 1..options.instances {
        if pending.len() >= 32 {
            pending.join_next().await.expect("pending")??;
        }
        let mut api = api.clone();
        pending.spawn(async move {
            api.create_instance(pb::CreateInstanceRequest {
                instance: Some(whatsapp(format!("seed-{i:06}"))),
                ..Default::default()
            })
            .await
            .map(drop)
        });
    }
    while let Some(done) = pending.join_next().await {
        done??;
    }
    println!("  seeded {} instances in {:.1} s", options.instances, seed_start.elapsed().as_secs_f64());

    let t0 = Instant::now();
    let (handle, task) = spawn_node(&cp, "bench-snapshot".into());
    let head = nodes_api.list_nodes(pb::ListNodesRequest {}).await?.into_inner().head_revision;
    let mut applied = handle.subscribe();
    let _ = applied.wait_for(|r| *r >= head).await;
    let snapshot_time = t0.elapsed();
    task.abort();
    let config = handle.load().expect("applied");
    let bytes: usize = config.instances.values().map(|i| i.encoded_len()).sum();
    println!(
        "  snapshot of {} instances: {} from connect to applied, {} on the wire",
        config.instances.len(),
        ms(snapshot_time),
        mib(bytes as u64)
    );

    // A real node process with all of it: memory, then a restart from its cache with the
    // control plane down.
    let node_options =
        DataPlaneOptions { control_plane: cp.url(), node_token: NODE_TOKEN.into(), ..Default::default() };
    let node = DataPlane::start(&dir.path().join("node"), &node_options).await;
    node.wait_for_revision(config.revision).await;
    let rss = node.pid().and_then(rss_bytes).unwrap_or(0);
    node.terminate().await;
    let cache_size = std::fs::metadata(dir.path().join("node/config.cache")).map(|m| m.len()).unwrap_or(0);
    cp.kill().await;
    let t0 = Instant::now();
    let node = DataPlane::start(&dir.path().join("node"), &node_options).await;
    let (status, ready) = node.ready().await;
    let startup = t0.elapsed();
    anyhow::ensure!(status == 200 && ready["revision"] == config.revision, "node not ready from its cache: {ready}");
    println!(
        "  omni-data-plane with {} instances: RSS {}, cache file {}",
        config.instances.len(),
        mib(rss),
        mib(cache_size)
    );
    println!("  restart from cache with the control plane down: ready in {}", ms(startup));
    Ok(())
}
