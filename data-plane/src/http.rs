//! The node's HTTP surface. Channel webhooks join these routes as channels arrive.

use crate::config::ConfigHandle;
use crate::sync::SyncStatus;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde_json::json;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;

pub struct NodeState {
    pub node_id: String,
    pub config: Arc<ConfigHandle>,
    pub sync: Arc<SyncStatus>,
}

pub fn router(state: Arc<NodeState>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
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
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
