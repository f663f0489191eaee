//! The node's HTTP surface. Channel webhooks join these routes as channels arrive.

use crate::channels::discord::gateway::GatewayStats;
use crate::channels::evolution::webhook::{self, TOKEN_HEADER};
use crate::channels::ingest::Intake;
use crate::channels::slack;
use crate::config::ConfigHandle;
use crate::connection_events::ConnectionEvents;
use crate::pipeline::{OUTCOMES, Pipeline};
use crate::spool::Spool;
use crate::sync::SyncStatus;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use omni_core::metrics::{self, Exposition};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

pub struct NodeState {
    pub node_id: String,
    pub config: Arc<ConfigHandle>,
    pub sync: Arc<SyncStatus>,
    pub spool: Spool,
    pub pipeline: Arc<Pipeline>,
    pub intake: Intake,
    pub connection_events: ConnectionEvents,
    pub gateways: Arc<GatewayStats>,
}

pub fn router(state: Arc<NodeState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/webhook/evolution/{instance}", post(evolution_webhook).layer(DefaultBodyLimit::max(max_body_bytes)))
        .route("/webhook/slack/{instance}", post(slack_webhook).layer(DefaultBodyLimit::max(max_body_bytes)))
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn evolution_webhook(
    State(state): State<Arc<NodeState>>,
    Path(instance): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = headers.get(TOKEN_HEADER).map(|v| v.as_bytes());
    let (status, answer) = webhook::ingest(&state, &instance, token, &body).await;
    (status, Json(answer)).into_response()
}

async fn slack_webhook(
    State(state): State<Arc<NodeState>>,
    Path(instance): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (status, answer) = slack::webhook::ingest(&state, &instance, &headers, &body).await;
    (status, Json(answer)).into_response()
}

/// Ready means a config is applied (from the control plane or the cache) and the spool takes
/// messages, not "connected": a node keeps serving its last good config while the control plane
/// is away.
async fn ready(State(state): State<Arc<NodeState>>) -> Response {
    let connected = state.sync.connected.load(Ordering::Relaxed);
    // The cause is in the node's log; the endpoint may be public.
    if state.spool.failed().is_some() {
        let failed = "stopped after a failed checkpoint: restart the node";
        let answer = json!({ "ready": false, "connected": connected, "node_id": state.node_id, "spool": failed });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(answer)).into_response();
    }
    match state.config.load() {
        Some(config) => Json(json!({
            "ready": true,
            "revision": config.revision,
            "instances": config.instances.len(),
            "connected": connected,
            "node_id": state.node_id,
        }))
        .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "revision": 0, "connected": connected, "node_id": state.node_id })),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<Arc<NodeState>>) -> Response {
    let config = state.config.load();
    let (sync, ingest, handled) = (&state.sync, &state.intake.stats, &state.pipeline.stats);
    let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    let (spool_depth, outbox_depth) = state.spool.depths().await.unwrap_or_default();
    let gateways = &state.gateways;
    let metrics: [(&str, &str, &str, u64); 21] = [
        (
            "omni_node_config_revision",
            "gauge",
            "Config revision this node has applied (0: none).",
            config.as_ref().map_or(0, |c| c.revision) as u64,
        ),
        (
            "omni_node_instances",
            "gauge",
            "Instances in the applied config.",
            config.as_ref().map_or(0, |c| c.instances.len()) as u64,
        ),
        (
            "omni_node_sync_connected",
            "gauge",
            "1 while the config stream to the control plane is open.",
            u64::from(sync.connected.load(Ordering::Relaxed)),
        ),
        ("omni_node_config_acks_total", "counter", "Config revisions applied.", load(&sync.acks)),
        ("omni_node_config_nacks_total", "counter", "Config revisions rejected.", load(&sync.nacks)),
        (
            "omni_node_config_snapshots_total",
            "counter",
            "Full config snapshots received (resyncs).",
            load(&sync.snapshots),
        ),
        ("omni_node_sync_reconnects_total", "counter", "Times the config stream was reopened.", load(&sync.reconnects)),
        (
            "omni_node_messages_accepted_total",
            "counter",
            "Webhook messages accepted for an answer.",
            load(&ingest.accepted),
        ),
        (
            "omni_node_messages_duplicate_total",
            "counter",
            "Redeliveries of messages already accepted.",
            load(&ingest.duplicates),
        ),
        (
            "omni_node_messages_ignored_at_ingest_total",
            "counter",
            "Messages not to be answered (own, broadcast, stale, ...).",
            load(&ingest.ignored),
        ),
        ("omni_node_messages_completed_total", "counter", "Messages answered.", load(&handled.completed)),
        ("omni_node_messages_failed_total", "counter", "Messages whose handling failed.", load(&handled.failed)),
        ("omni_node_messages_denied_total", "counter", "Messages refused by access rules.", load(&handled.denied)),
        (
            "omni_node_messages_ignored_total",
            "counter",
            "Messages ignored while handled (empty or suppressed answer, ...).",
            load(&handled.ignored),
        ),
        ("omni_node_spool_depth", "gauge", "Accepted messages not finished.", spool_depth),
        ("omni_node_trace_outbox_depth", "gauge", "Trace stages waiting to be shipped.", outbox_depth),
        (
            "omni_node_discord_leases",
            "gauge",
            "Discord bots this node holds a valid gateway lease for.",
            load(&gateways.leased),
        ),
        ("omni_node_discord_gateways", "gauge", "Discord gateways running on this node.", load(&gateways.running)),
        (
            "omni_node_discord_lease_answers_total",
            "counter",
            "Gateway lease sets received from the control plane (each renews the leases).",
            load(&sync.lease_answers),
        ),
        (
            "omni_node_discord_fatal_closes_total",
            "counter",
            "Discord gateways closed for good (bad token, disallowed intents).",
            load(&gateways.fatal_closes),
        ),
        (
            "omni_node_conversations_queued",
            "gauge",
            "Conversations with messages waiting or being handled.",
            state.pipeline.active_conversations() as u64,
        ),
    ];
    let mut page = Exposition::new();
    for (name, kind, help, value) in metrics {
        page.single(name, kind, help, value);
    }
    page.family("omni_node_messages_total", "counter", "Messages handled, by instance, channel and outcome.");
    // Copied out, so that finishing messages never wait for the page to be written.
    let by_instance: Vec<_> = handled.by_instance.lock().expect("stats lock poisoned").clone().into_iter().collect();
    for (instance, (channel, counts)) in &by_instance {
        for (outcome, count) in OUTCOMES.iter().zip(counts) {
            let labels = [("instance", instance.as_str()), ("channel", *channel), ("outcome", *outcome)];
            page.sample("omni_node_messages_total", &labels, count);
        }
    }
    page.family("omni_node_agent_latency_seconds", "histogram", "Time waiting for agents, retries included.")
        .histogram("omni_node_agent_latency_seconds", &[], &handled.agent_latency);
    page.family("omni_node_spool_commit_seconds", "histogram", "Spool transactions, from start to on disk.").histogram(
        "omni_node_spool_commit_seconds",
        &[],
        &state.spool.commits,
    );
    page.family(
        "omni_node_spool_checkpoint_seconds",
        "histogram",
        "Spool checkpoints, from the start to redb's durable commit (commits go on meanwhile).",
    )
    .histogram("omni_node_spool_checkpoint_seconds", &[], &state.spool.checkpoints);
    let out = page.finish();
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], out).into_response()
}
