//! Deletes traces past their instance's retention. Every control plane runs this loop, but only
//! the holder of the `trace-retention` lease does the work, so replicas do not race each other.

use crate::metrics::Metrics;
use crate::shutdown::Stopping;
use crate::store::{Store, now_millis};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

const LEASE: &str = "trace-retention";

#[derive(Debug, Clone, Copy)]
pub struct RetentionSettings {
    /// For instances that set none; zero keeps their traces.
    pub default_retention: Duration,
    /// Between passes.
    pub interval: Duration,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        RetentionSettings { default_retention: Duration::from_secs(30 * 86_400), interval: Duration::from_secs(600) }
    }
}

/// Runs passes until the control plane stops. `holder` names this control plane in the lease.
pub async fn run(
    store: Arc<dyn Store>,
    settings: RetentionSettings,
    holder: String,
    metrics: Arc<Metrics>,
    stopping: Stopping,
) {
    let interval_ms = settings.interval.as_millis() as i64;
    loop {
        let now = now_millis();
        // The lease outlives a few intervals, so a holder that stops is replaced soon after.
        match store.try_lease(LEASE, &holder, now, now + 3 * interval_ms).await {
            Ok(true) => match store.apply_trace_retention(settings.default_retention.as_millis() as i64, now).await {
                Ok(deleted) => {
                    metrics.retention_runs.fetch_add(1, Ordering::Relaxed);
                    metrics.retention_deleted.fetch_add(deleted as u64, Ordering::Relaxed);
                    if deleted > 0 {
                        tracing::info!(deleted, "trace retention: deleted expired traces");
                    }
                }
                Err(e) => {
                    metrics.retention_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "trace retention pass failed; retrying at the next interval");
                }
            },
            Ok(false) => tracing::debug!("trace retention runs on another control plane"),
            Err(e) => {
                metrics.retention_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "trace retention: could not take the lease");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.interval) => {}
            _ = stopping.clone().wait() => return,
        }
    }
}
