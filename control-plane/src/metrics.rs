//! The control plane's Prometheus metrics, served on their own listener (`--metrics-listen`)
//! so that scraping never shares a port with the admin API.

use crate::api::nodes::node_status;
use crate::store::{Store, now_millis};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use omni_core::metrics::{self, Exposition, Histogram};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Metrics {
    pub trace_reports: AtomicU64,
    /// Stages stored (resent ones not counted).
    pub trace_events: AtomicU64,
    pub trace_report_latency: Histogram,
    pub retention_runs: AtomicU64,
    pub retention_deleted: AtomicU64,
    pub retention_errors: AtomicU64,
}

struct Page {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

pub fn router(store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Router {
    Router::new().route("/metrics", get(render)).with_state(Arc::new(Page { store, metrics }))
}

async fn render(State(page): State<Arc<Page>>) -> Response {
    let (revision, nodes) = match (page.store.config_revision().await, page.store.list_nodes().await) {
        (Ok(revision), Ok(nodes)) => (revision, nodes),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "metrics: the database is unreachable");
            return (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n").into_response();
        }
    };
    let m = &page.metrics;
    let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    let mut out = Exposition::new();
    out.single("omni_cp_config_revision", "gauge", "The latest committed config revision.", revision);
    let now = now_millis();
    // As `node list` says: connected, and heard from recently.
    let live: Vec<_> = nodes.iter().filter(|n| node_status(n, now) == "connected").collect();
    out.single("omni_cp_nodes_connected", "gauge", "Data-plane nodes with a live config stream.", live.len());
    out.family("omni_cp_node_revision_lag", "gauge", "Config revisions a connected node has yet to apply.");
    for node in live {
        out.sample("omni_cp_node_revision_lag", &[("node", &node.id)], (revision - node.applied_revision).max(0));
    }
    out.family("omni_cp_node_last_seen_seconds", "gauge", "Seconds since each known node was last heard from.");
    for node in &nodes {
        let age = (now - node.last_seen_at).max(0) as f64 / 1000.0;
        out.sample("omni_cp_node_last_seen_seconds", &[("node", &node.id)], age);
    }
    out.single("omni_cp_trace_reports_total", "counter", "Trace reports received from nodes.", load(&m.trace_reports));
    out.single("omni_cp_trace_events_total", "counter", "Trace stages stored.", load(&m.trace_events));
    out.family("omni_cp_trace_report_seconds", "histogram", "Time to store one trace report.").histogram(
        "omni_cp_trace_report_seconds",
        &[],
        &m.trace_report_latency,
    );
    out.single("omni_cp_retention_runs_total", "counter", "Trace retention passes run here.", load(&m.retention_runs));
    out.single(
        "omni_cp_retention_deleted_total",
        "counter",
        "Traces deleted by retention here.",
        load(&m.retention_deleted),
    );
    out.single("omni_cp_retention_errors_total", "counter", "Retention passes that failed.", load(&m.retention_errors));
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], out.finish()).into_response()
}
