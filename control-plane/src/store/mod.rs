//! Persistence for the control plane: one [`Store`] trait, implemented for Postgres and SQLite
//! by the same SQL (see `sql.rs`). Every read of tenant data takes the caller's [`Scope`], so an
//! instance outside it is indistinguishable from one that does not exist.

mod migrations;
mod model;
mod sql;
mod stages;

pub use model::*;
pub use sql::{PostgresStore, SqliteStore};

use async_trait::async_trait;
use omni_core::access::Action;
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0} was changed concurrently")]
    Conflict(String),
    /// Another instance has the same `discord_token_sha256`.
    #[error("this Discord bot token is already used by another instance")]
    DiscordTokenInUse,
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("unsupported database URL {0:?}: use postgres://... or sqlite://...")]
    UnsupportedUrl(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    pub fn from_url(url: &str) -> Result<Backend> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else {
            Err(StoreError::UnsupportedUrl(redact_url(url)))
        }
    }
}

/// A database URL with its password replaced, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// Connects to the database named by `url`, applying any pending migrations first.
/// Migrations take a database lock, so control planes starting together are safe.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>> {
    connect_with(url, StoreOptions::default()).await
}

pub async fn connect_with(url: &str, options: StoreOptions) -> Result<Arc<dyn Store>> {
    Ok(match Backend::from_url(url)? {
        Backend::Postgres => Arc::new(PostgresStore::connect(url, options).await?),
        Backend::Sqlite => Arc::new(SqliteStore::connect(url, options).await?),
    })
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    fn backend(&self) -> Backend;

    // Instances. Each change is one config revision.
    /// Refuses a taken name with [`StoreError::AlreadyExists`] (even when the Discord token is
    /// taken too), else a taken `discord_token_sha256` with [`StoreError::DiscordTokenInUse`].
    async fn create_instance(&self, instance: &InstanceRecord) -> Result<InstanceRecord>;
    async fn get_instance(&self, scope: &Scope, name: &str) -> Result<InstanceRecord>;
    async fn list_instances(&self, scope: &Scope, query: &ListInstances) -> Result<Vec<InstanceRecord>>;
    /// Replaces `active`, `spec` and `discord_token_sha256` (the caller passes the current one
    /// when the token does not change) if the instance is still at `expected_revision` (else
    /// [`StoreError::Conflict`]). A fingerprint another instance has gives
    /// [`StoreError::DiscordTokenInUse`].
    async fn update_instance(
        &self,
        scope: &Scope,
        name: &str,
        expected_revision: i64,
        active: bool,
        spec: &InstanceSpec,
        discord_token_sha256: Option<&str>,
    ) -> Result<InstanceRecord>;
    async fn delete_instance(&self, scope: &Scope, name: &str) -> Result<()>;

    // Access rules. Each change is one config revision of the rule's instance.
    /// Adds a rule, or sets the action of the instance's rule with the same pattern.
    async fn put_access_rule(
        &self,
        scope: &Scope,
        instance: &str,
        pattern: &str,
        action: Action,
    ) -> Result<AccessRuleRecord>;
    async fn list_access_rules(&self, scope: &Scope, instance: &str) -> Result<Vec<AccessRuleRecord>>;
    async fn remove_access_rule(&self, scope: &Scope, instance: &str, id: i64) -> Result<()>;

    // API keys (admin-only at the API).
    async fn create_api_key(&self, key: &ApiKeyRecord) -> Result<()>;
    async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>>;
    async fn find_api_key_by_hash(&self, key_hash: &str) -> Result<Option<ApiKeyRecord>>;
    async fn revoke_api_key(&self, id: &str, now: i64) -> Result<ApiKeyRecord>;
    async fn touch_api_key(&self, id: &str, now: i64) -> Result<()>;
    async fn count_api_keys(&self) -> Result<i64>;

    // Config revisions and distribution.
    async fn config_revision(&self) -> Result<i64>;
    async fn config_log_bounds(&self) -> Result<LogBounds>;
    /// Change-log entries with `after < revision <= through`, in revision order.
    async fn config_changes(&self, after: i64, through: i64) -> Result<Vec<ConfigChange>>;
    /// Every instance with its rules, all as of one revision (returned with it).
    async fn config_snapshot(&self) -> Result<(i64, Vec<InstanceConfig>)>;
    /// The latest committed revision this process has heard of: updated after its own commits
    /// and, on Postgres, when another control plane commits (LISTEN/NOTIFY). A hint to re-read
    /// the log, never a substitute for it.
    fn watch_revision(&self) -> tokio::sync::watch::Receiver<i64>;

    // Data-plane node registry.
    /// Registers a node that said hello (keeping its first-seen time) as connected.
    async fn node_connected(&self, node: &NodeRecord) -> Result<()>;
    async fn node_acked(&self, id: &str, revision: i64, now: i64) -> Result<()>;
    async fn node_nacked(&self, id: &str, error: &str, now: i64) -> Result<()>;
    async fn node_seen(&self, id: &str, now: i64) -> Result<()>;
    async fn node_disconnected(&self, id: &str, now: i64) -> Result<()>;
    async fn list_nodes(&self) -> Result<Vec<NodeRecord>>;
    /// Nodes connected and heard from at or after `seen_since` (on any control plane).
    async fn count_live_nodes(&self, seen_since: i64) -> Result<i64>;

    // Discord gateway leases: which node runs each bot.
    /// In one transaction: extends `node_id`'s unexpired leases on eligible bots (active Discord
    /// instances not stopped by an `error` gateway report for their current revision) to
    /// `now + ttl_ms`, and claims free or expired ones (in instance-id order) up to its share of
    /// the eligible bots among `live_nodes` (counting only the eligible ones it holds). Returns
    /// the eligible bots `node_id` now holds unexpired, sorted. A lease is never freed early
    /// (only its holder may hand it back: [`Store::release_gateway_leases`]): one on a bot no
    /// longer eligible is left to run out (its holder may still run the bot until it hears so),
    /// and nobody else gets the bot before then. So a bot never has two unexpired holders.
    async fn renew_gateway_leases(&self, node_id: &str, now: i64, ttl_ms: i64, live_nodes: i64) -> Result<Vec<String>>;
    /// For a node that has closed every gateway and is shutting down: in one transaction, ends
    /// each unexpired lease `node_id` holds (its `expires_at` becomes `now`, so any node may
    /// claim the bot from `now` on, as if the lease had run out) and stops counting the node as
    /// live (`connected` false, as at a disconnect) so the other nodes' shares cover its bots.
    /// Anything the node says next (a heartbeat, an ACK) counts it again. Other nodes' leases
    /// are untouched. Returns how many leases it ended.
    async fn release_gateway_leases(&self, node_id: &str, now: i64) -> Result<u64>;
    /// The instance's lease and last gateway report; `None` when it has neither.
    async fn gateway_status(&self, instance_id: &str) -> Result<Option<GatewayStatusRecord>>;

    // Traces and the users they reveal.
    /// Stores reported stages; a stage already stored is skipped. A first stage creates its
    /// trace and counts a message for its sender. Returns how many events were new.
    async fn ingest_trace_events(&self, node_id: &str, events: &[TraceEventRecord]) -> Result<usize>;
    /// Newest first, one page.
    async fn list_traces(&self, scope: &Scope, query: &TraceQuery) -> Result<Vec<TraceRecord>>;
    /// Those of `ids` that match `filter` (for the live tail), oldest first.
    async fn traces_by_ids(&self, scope: &Scope, ids: &[String], filter: &TraceFilter) -> Result<Vec<TraceRecord>>;
    /// The trace with its stages; their payloads only when asked for.
    async fn get_trace(&self, scope: &Scope, id: &str, payloads: bool) -> Result<(TraceRecord, Vec<TraceStageRecord>)>;
    /// Aggregates over the traces `filter` selects, computed by the database.
    async fn trace_stats(&self, scope: &Scope, filter: &TraceFilter) -> Result<TraceStatsRecord>;
    /// Deletes the traces `filter` selects (its `until` is required) with their stages, or only
    /// counts them. An admin purge without an instance also takes traces of deleted instances.
    async fn purge_traces(&self, scope: &Scope, filter: &TraceFilter, dry_run: bool) -> Result<i64>;
    /// Deletes traces older than their instance's retention (`default_retention_ms` where the
    /// instance sets none, and for traces of deleted instances). Returns how many.
    async fn apply_trace_retention(&self, default_retention_ms: i64, now: i64) -> Result<i64>;
    /// Ids of traces that reached a final status, as batches are stored (on Postgres, by any
    /// control plane on the database).
    fn finished_traces(&self) -> tokio::sync::broadcast::Receiver<Arc<[String]>>;
    async fn list_users(&self, scope: &Scope, query: &UserQuery) -> Result<Vec<UserRecord>>;

    // Channel connection state, as nodes report it.
    /// Keeps the latest connection event, the latest QR event and the latest gateway report
    /// of each instance. An `error` is not replaced by a report about an older revision, nor
    /// by a `closed` one about the same revision (the node closing what failed).
    async fn record_instance_events(&self, events: &[InstanceEventRecord]) -> Result<()>;
    async fn instance_connection(&self, instance_id: &str) -> Result<Option<ConnectionRecord>>;

    // Jobs that one control plane runs for all.
    /// Takes or renews the lease `name` for `holder` until `expires_at`, when it is free,
    /// expired at `now`, or already `holder`'s. Returns whether `holder` has it.
    async fn try_lease(&self, name: &str, holder: &str, now: i64, expires_at: i64) -> Result<bool>;
}

/// Whether a trace in this status is done: no later stage changes it.
pub fn is_final_status(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "denied" | "ignored")
}

/// Unix time in milliseconds.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(Backend::from_url("postgres://u@h/db").unwrap(), Backend::Postgres);
        assert_eq!(Backend::from_url("sqlite://./x.db").unwrap(), Backend::Sqlite);
        let err = Backend::from_url("mysql://u:hunter2@h/db").unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert_eq!(redact_url("postgres://u:pw@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    }
}
