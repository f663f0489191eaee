//! The node's HTTP surface. Channel webhooks join these routes as channels arrive.

use crate::channels::evolution::webhook::{self, TOKEN_HEADER};
use crate::config::ConfigHandle;
use crate::pipeline::Pipeline;
use crate::spool::Spool;
use crate::sync::SyncStatus;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde_json::json;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

pub struct NodeState {
    pub node_id: String,
    pub config: Arc<ConfigHandle>,
    pub sync: Arc<SyncStatus>,
    pub spool: Spool,
    pub pipeline: Arc<Pipeline>,
    pub ingest: IngestStats,
}

/// What webhooks brought in.
#[derive(Debug, Default)]
pub struct IngestStats {
    pub accepted: AtomicU64,
    pub duplicates: AtomicU64,
    pub ignored: AtomicU64,
}

pub fn router(state: Arc<NodeState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/webhook/evolution/{instance}", post(evolution_webhook).layer(DefaultBodyLimit::max(max_body_bytes)))
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

/// Ready means a config is applied (from the control plane or the cache), not "connected":
/// a node keeps serving its last good config while the control plane is away.
async fn ready(State(state): State<Arc<NodeState>>) -> Response {
    let connected = state.sync.connected.load(Ordering::Relaxed);
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
    let sync = &state.sync;
    let mut out = String::with_capacity(1024);
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    };
    metric(
        "omni_node_config_revision",
        "gauge",
        "Config revision this node has applied (0: none).",
        config.as_ref().map_or(0, |c| c.revision).to_string(),
    );
    metric(
        "omni_node_instances",
        "gauge",
        "Instances in the applied config.",
        config.as_ref().map_or(0, |c| c.instances.len()).to_string(),
    );
    metric(
        "omni_node_sync_connected",
        "gauge",
        "1 while the config stream to the control plane is open.",
        u8::from(sync.connected.load(Ordering::Relaxed)).to_string(),
    );
    metric(
        "omni_node_config_acks_total",
        "counter",
        "Config revisions applied.",
        sync.acks.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "omni_node_config_nacks_total",
        "counter",
        "Config revisions rejected.",
        sync.nacks.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "omni_node_config_snapshots_total",
        "counter",
        "Full config snapshots received (resyncs).",
        sync.snapshots.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "omni_node_sync_reconnects_total",
        "counter",
        "Times the config stream was reopened.",
        sync.reconnects.load(Ordering::Relaxed).to_string(),
    );
    let counters: [(&str, &str, &AtomicU64); 7] = [
        ("omni_node_messages_accepted_total", "Webhook messages accepted for an answer.", &state.ingest.accepted),
        ("omni_node_messages_duplicate_total", "Redeliveries of messages already accepted.", &state.ingest.duplicates),
        (
            "omni_node_messages_ignored_at_ingest_total",
            "Messages not to be answered (own, broadcast, stale, ...).",
            &state.ingest.ignored,
        ),
        ("omni_node_messages_completed_total", "Messages answered.", &state.pipeline.stats.completed),
        ("omni_node_messages_failed_total", "Messages whose handling failed.", &state.pipeline.stats.failed),
        ("omni_node_messages_denied_total", "Messages refused by access rules.", &state.pipeline.stats.denied),
        (
            "omni_node_messages_ignored_total",
            "Messages ignored while handled (empty or suppressed answer, ...).",
            &state.pipeline.stats.ignored,
        ),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", value.load(Ordering::Relaxed));
    }
    if let Ok((inbox, outbox)) = state.spool.depths().await {
        let _ = writeln!(
            out,
            "# HELP omni_node_spool_depth Accepted messages not finished.\n# TYPE omni_node_spool_depth gauge\nomni_node_spool_depth {inbox}"
        );
        let _ = writeln!(
            out,
            "# HELP omni_node_trace_outbox_depth Trace stages waiting to be shipped.\n# TYPE omni_node_trace_outbox_depth gauge\nomni_node_trace_outbox_depth {outbox}"
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
