//! The SQL behind [`Store`], written once and instantiated per backend by `sql_store!`.
//! The statements are portable between Postgres and SQLite (`$n` parameters, `RETURNING`,
//! `ON CONFLICT`), and each backend keeps its native driver and types.
//!
//! Every config-changing transaction starts by bumping `config_head`: on Postgres the row lock
//! orders those transactions, and on SQLite it takes the write lock before anything is read, so
//! no transaction has to upgrade a read lock.

use super::stages::{self, StageRef};
use super::*;
use omni_core::kinds::Channel;
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::str::FromStr;
use std::time::Duration;

const INSTANCE_COLUMNS: &str =
    "id, name, channel, active, spec, created_at, updated_at, revision, discord_token_sha256";
const API_KEY_COLUMNS: &str =
    "id, key_hash, admin, instance_patterns, description, created_at, last_used_at, revoked_at";

/// Postgres channel notified (with the new revision) when a config transaction commits.
pub const CONFIG_NOTIFY_CHANNEL: &str = "omni_config";

/// A SQL condition restricting `column` (an instance name) to `scope`, with its parameters
/// numbered from `first_param`. Scope patterns are validated instance-name characters, so they
/// carry no LIKE metacharacters besides the `%` added here.
fn scope_filter(scope: &Scope, column: &str, first_param: usize) -> (String, Vec<String>) {
    let patterns = match scope {
        Scope::Admin => return ("1 = 1".to_owned(), Vec::new()),
        Scope::Instances(patterns) if patterns.is_empty() => {
            return ("1 = 0".to_owned(), Vec::new());
        }
        Scope::Instances(patterns) => patterns,
    };
    let mut clauses = Vec::with_capacity(patterns.len());
    let mut binds = Vec::with_capacity(patterns.len());
    for (i, pattern) in patterns.iter().enumerate() {
        let n = first_param + i;
        match pattern.strip_suffix('*') {
            Some(prefix) => {
                clauses.push(format!("{column} LIKE ${n}"));
                binds.push(format!("{prefix}%"));
            }
            None => {
                clauses.push(format!("{column} = ${n}"));
                binds.push(pattern.clone());
            }
        }
    }
    (format!("({})", clauses.join(" OR ")), binds)
}

/// Rows per multi-row statement of trace ingest, a power of two (SQLite allows 32766
/// parameters per statement).
const INGEST_ROWS: usize = 128;

/// `items` in chunks of at most [`INGEST_ROWS`], for statements with a row per item. `shaped`:
/// chunk lengths are powers of two, so that such a statement takes one of eight shapes, each
/// prepared once per connection and then cached, instead of a new one for each batch size
/// (SQLite: preparing a statement of many rows costs more than running it, and each statement
/// is a call within the process; for Postgres each is a round trip, so fewer is better).
fn ingest_chunks<T>(mut items: &[T], shaped: bool) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        let n = items.len().min(INGEST_ROWS);
        if n == 0 {
            return None;
        }
        let (chunk, rest) = items.split_at(if shaped { 1 << n.ilog2() } else { n });
        items = rest;
        Some(chunk)
    })
}

/// `($1, $2), ($3, $4)` for `rows` rows of `columns` parameters; with `numbered` false,
/// `(?, ?), (?, ?)`. SQLite resolves each named parameter with a linear scan, which makes
/// statements with thousands of `$n` parameters quadratic; anonymous ones bind in order.
fn values(rows: usize, columns: usize, numbered: bool) -> String {
    let mut sql = String::with_capacity(rows * columns * 5);
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for column in 0..columns {
            if column > 0 {
                sql.push_str(", ");
            }
            if numbered {
                let _ = write!(sql, "${}", row * columns + column + 1);
            } else {
                sql.push('?');
            }
        }
        sql.push(')');
    }
    sql
}

/// `$1, $2, ...` (or `?, ?, ...`, see [`values`]) for a list of `n` parameters.
fn placeholders(n: usize, numbered: bool) -> String {
    let mut sql = String::with_capacity(n * 4);
    for i in 1..=n {
        if i > 1 {
            sql.push_str(", ");
        }
        if numbered {
            let _ = write!(sql, "${i}");
        } else {
            sql.push('?');
        }
    }
    sql
}

/// A `LIKE ... ESCAPE '\'` pattern matching `text` anywhere in a value.
fn contains_pattern(text: &str) -> String {
    let mut pattern = String::with_capacity(text.len() + 2);
    pattern.push('%');
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

/// The WHERE conditions selecting the traces (`t`, joined to instances `i`) that `scope` may
/// see and `filter` names. String values become parameters appended to `binds`; integers are
/// written inline. `ilike` is the backend's case-insensitive LIKE.
fn trace_conditions(scope: &Scope, filter: &TraceFilter, ilike: &str, binds: &mut Vec<String>) -> String {
    let (mut sql, scope_binds) = scope_filter(scope, "i.name", binds.len() + 1);
    binds.extend(scope_binds);
    let mut bound = |sql: &mut String, condition: &str, value: String| {
        binds.push(value);
        sql.push_str(&format!(" AND {condition} ${}", binds.len()));
    };
    if let Some(instance) = &filter.instance {
        bound(&mut sql, "i.name =", instance.clone());
    }
    if let Some(status) = &filter.status {
        bound(&mut sql, "t.status =", status.clone());
    }
    if let Some(channel) = &filter.channel {
        bound(&mut sql, "t.channel =", channel.clone());
    }
    if let Some(sender) = &filter.sender {
        bound(&mut sql, "t.sender =", sender.clone());
    }
    if let Some(text) = &filter.text_contains {
        binds.push(contains_pattern(text));
        sql.push_str(&format!(" AND t.text {ilike} ${} ESCAPE '\\'", binds.len()));
    }
    if let Some(since) = filter.since {
        sql.push_str(&format!(" AND t.received_at >= {since}"));
    }
    if let Some(until) = filter.until {
        sql.push_str(&format!(" AND t.received_at < {until}"));
    }
    sql
}

/// Traces deleted per transaction by purges and retention, so no lock is held for long.
const PURGE_BATCH: usize = 2000;

/// Postgres channel carrying ids of traces that reached a final status: `origin:id,id,...`.
pub const TRACES_NOTIFY_CHANNEL: &str = "omni_traces";

/// Trace ids per notification (Postgres limits a payload to 8000 bytes).
const NOTIFY_IDS: usize = 150;

fn decompress_payload(compressed: &[u8]) -> Result<String> {
    let bytes = lz4_flex::block::decompress_size_prepended(compressed)
        .map_err(|e| corrupt(format!("trace payload does not decompress: {e}")))?;
    String::from_utf8(bytes).map_err(|e| corrupt(format!("trace payload is not UTF-8: {e}")))
}

/// Nearest-rank index of percentile `p` among `n` sorted values.
fn rank(p: f64, n: i64) -> i64 {
    ((p * n as f64).ceil() as i64 - 1).clamp(0, (n - 1).max(0))
}

/// A sender's messages in one ingest batch.
struct UserDelta {
    id: String,
    instance_id: String,
    identity: String,
    name: String,
    first_seen: i64,
    last_seen: i64,
    count: i64,
}

/// One row per (instance, sender): a multi-row upsert may not touch a row twice.
fn users_of<'a>(headers: impl Iterator<Item = (&'a TraceEventRecord, &'a TraceHeaderRecord)>) -> Vec<UserDelta> {
    let mut users: Vec<UserDelta> = Vec::new();
    let mut index: HashMap<(&str, &str), usize> = HashMap::new();
    // Messages the hub sent (the API's sends) say nothing about who wrote to it.
    for (event, header) in headers.filter(|(_, h)| !h.sender.is_empty() && !h.message_type.starts_with("outbound")) {
        match index.get(&(event.instance_id.as_str(), header.sender.as_str())) {
            Some(&i) => {
                let user = &mut users[i];
                user.count += 1;
                user.first_seen = user.first_seen.min(header.received_at);
                if header.received_at >= user.last_seen {
                    user.last_seen = header.received_at;
                    if !header.sender_name.is_empty() {
                        user.name = header.sender_name.clone();
                    }
                }
            }
            None => {
                index.insert((&event.instance_id, &header.sender), users.len());
                users.push(UserDelta {
                    id: header.user_id.clone(),
                    instance_id: event.instance_id.clone(),
                    identity: header.sender.clone(),
                    name: header.sender_name.clone(),
                    first_seen: header.received_at,
                    last_seen: header.received_at,
                    count: 1,
                });
            }
        }
    }
    // Rows locked in one order by every writer: concurrent ingests cannot deadlock.
    users.sort_unstable_by(|a, b| (&a.instance_id, &a.identity).cmp(&(&b.instance_id, &b.identity)));
    users
}

/// What a batch's stages say about one trace: its latest status, its first error and the
/// agent's latency.
#[derive(Clone, Copy)]
struct TraceState<'a> {
    latest: &'a TraceEventRecord,
    first_error: Option<&'a TraceEventRecord>,
    agent_ms: i64,
}

impl<'a> TraceState<'a> {
    fn error(&self) -> (&'a str, &'a str) {
        self.first_error.map_or(("", ""), |e| (e.stage.as_str(), e.error.as_str()))
    }
}

fn trace_states<'a>(events: impl Iterator<Item = &'a TraceEventRecord>) -> HashMap<&'a str, TraceState<'a>> {
    let mut states: HashMap<&str, TraceState> = HashMap::new();
    for e in events {
        let state =
            states.entry(e.trace_id.as_str()).or_insert(TraceState { latest: e, first_error: None, agent_ms: 0 });
        if e.seq > state.latest.seq {
            state.latest = e;
        }
        // The first failure names the stage; later stages only report its consequences.
        if !e.error.is_empty() && state.first_error.is_none_or(|f| e.seq < f.seq) {
            state.first_error = Some(e);
        }
        state.agent_ms = state.agent_ms.max(e.agent_ms);
    }
    states
}

/// The stored form of a batch's stages of one trace, in seq order.
fn stage_refs<'a>(events: &[&'a TraceEventRecord]) -> Vec<StageRef<'a>> {
    let mut stages: Vec<StageRef<'a>> = events
        .iter()
        .map(|e| StageRef {
            seq: e.seq,
            stage: &e.stage,
            at: e.at,
            duration_ms: e.duration_ms,
            detail: &e.detail,
            payload: &e.payload,
        })
        .collect();
    stages.sort_unstable_by_key(|s| s.seq);
    stages
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn instance_not_found(name: &str) -> StoreError {
    StoreError::NotFound(format!("instance {name:?}"))
}

/// The unique index that holds one Discord bot to one instance (migration 6).
const DISCORD_TOKEN_INDEX: &str = "instances_by_discord_token";

/// Whether a write failed on [`DISCORD_TOKEN_INDEX`]. Postgres names the violated index; SQLite
/// names only its column ("UNIQUE constraint failed: instances.discord_token_sha256").
fn is_discord_token_violation(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(e) if e.is_unique_violation() => {
            e.constraint() == Some(DISCORD_TOKEN_INDEX) || e.message().ends_with("instances.discord_token_sha256")
        }
        _ => false,
    }
}

fn encode_scope(scope: &Scope) -> (bool, String) {
    match scope {
        Scope::Admin => (true, "[]".to_owned()),
        Scope::Instances(patterns) => (false, serde_json::to_string(patterns).expect("strings serialize")),
    }
}

fn decode_scope(admin: bool, patterns: &str) -> Result<Scope> {
    if admin {
        return Ok(Scope::Admin);
    }
    serde_json::from_str(patterns).map(Scope::Instances).map_err(|e| corrupt(format!("api key patterns: {e}")))
}

const TRACE_COLUMNS: &str = "t.id, i.name AS instance, t.channel, t.external_id, t.conversation_id, t.sender, \
     t.sender_name, t.user_id, t.message_type, t.text, t.status, t.error_stage, t.error, t.received_at, t.updated_at, \
     t.agent_ms, t.node_id";

const NODE_COLUMNS: &str = "id, address, version, applied_revision, first_seen_at, last_seen_at, connected, last_error";

/// The instances (`i`) with their connection reports (`c`), for [`GATEWAY_ELIGIBLE`].
const GATEWAY_SOURCES: &str = "instances i LEFT JOIN instance_connections c ON c.instance_id = i.id";

/// The instances whose Discord bot should run somewhere: active, and not stopped by a fatal
/// gateway error reported for the instance's current config (restarting it would fail the same
/// way). Judged by revision, not by clocks: an update (a higher `i.revision`) lets the bot try
/// again, and an error about an older config never blocks a newer one.
const GATEWAY_ELIGIBLE: &str = "i.channel = 'discord' AND i.active = TRUE \
     AND NOT (COALESCE(c.gateway_state, '') = 'error' AND COALESCE(c.gateway_revision, 0) >= i.revision)";

/// `$notify`: SQL run in each config transaction to wake other control planes (Postgres only).
/// `$snapshot_isolation`: SQL that gives a transaction one consistent view (SQLite's read
/// transactions already have one).
/// `$numbered_values`: whether generated multi-row parameter lists use `$n` (Postgres) or `?`.
/// `$ilike`: case-insensitive LIKE (SQLite's LIKE already is, for ASCII).
/// `$begin_ingest`, `$for_update`: how trace ingest starts its transaction and locks the rows
/// it reads. `$shaped_statements`: see [`ingest_chunks`].
macro_rules! sql_store {
    (
        $store:ident, $db:ty, $backend:expr, $notify:expr, $snapshot_isolation:expr, $numbered_values:expr, $ilike:expr,
        $begin_ingest:expr, $for_update:expr, $shaped_statements:expr
    ) => {
        pub struct $store {
            pool: sqlx::Pool<$db>,
            options: StoreOptions,
            revision: tokio::sync::watch::Sender<i64>,
            finished: tokio::sync::broadcast::Sender<Arc<[String]>>,
            /// Tells this store's trace notifications from other control planes'.
            origin: String,
        }

        impl $store {
            pub async fn from_pool(pool: sqlx::Pool<$db>, options: StoreOptions) -> Result<Self> {
                migrations::migrator($backend).await?.run(&pool).await?;
                let head: i64 = sqlx::query_scalar("SELECT revision FROM config_head WHERE id = 1").fetch_one(&pool).await?;
                Ok(Self {
                    pool,
                    options,
                    revision: tokio::sync::watch::Sender::new(head),
                    finished: tokio::sync::broadcast::Sender::new(1024),
                    origin: uuid::Uuid::new_v4().simple().to_string(),
                })
            }

            /// Records that `revision` is committed, for `watch_revision` subscribers.
            fn announce(&self, revision: i64) {
                self.revision.send_if_modified(|current| {
                    let newer = revision > *current;
                    if newer {
                        *current = revision;
                    }
                    newer
                });
            }

            pub fn pool(&self) -> &sqlx::Pool<$db> {
                &self.pool
            }

            /// Opens a config-changing transaction and takes its revision.
            async fn begin_change(&self) -> Result<(sqlx::Transaction<'static, $db>, i64)> {
                let mut tx = self.pool.begin().await?;
                let revision: i64 =
                    sqlx::query_scalar("UPDATE config_head SET revision = revision + 1 WHERE id = 1 RETURNING revision")
                        .fetch_one(&mut *tx)
                        .await?;
                Ok((tx, revision))
            }

            /// Compacts the change log past its retention, wakes watchers and commits.
            async fn commit_change(&self, tx: sqlx::Transaction<'static, $db>, revision: i64) -> Result<()> {
                let mut tx = tx;
                let compact_through = revision - self.options.change_log_retention;
                if compact_through > 0 {
                    sqlx::query("DELETE FROM config_changes WHERE revision <= $1")
                        .bind(compact_through)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query("UPDATE config_head SET compacted_revision = $1 WHERE id = 1 AND compacted_revision < $1")
                        .bind(compact_through)
                        .execute(&mut *tx)
                        .await?;
                }
                let notify: Option<&str> = $notify;
                if let Some(sql) = notify {
                    sqlx::query(sql).bind(CONFIG_NOTIFY_CHANNEL).bind(revision.to_string()).execute(&mut *tx).await?;
                }
                tx.commit().await?;
                self.announce(revision);
                Ok(())
            }

            /// Runs a `SELECT k, n` query of (key, count) rows.
            async fn counts(
                conn: &mut <$db as sqlx::Database>::Connection,
                sql: &str,
                binds: &[String],
            ) -> Result<Vec<(String, i64)>> {
                let mut q = sqlx::query(sql);
                for bind in binds {
                    q = q.bind(bind);
                }
                q.fetch_all(&mut *conn)
                    .await?
                    .iter()
                    .map(|row| Ok((row.try_get::<String, _>("k")?, row.try_get::<i64, _>("n")?)))
                    .collect()
            }

            /// Count, mean, maximum and percentiles of the `v` column `values` selects.
            async fn latency(
                conn: &mut <$db as sqlx::Database>::Connection,
                values: &str,
                binds: &[String],
            ) -> Result<LatencyStats> {
                const PERCENTILES: [f64; 3] = [0.5, 0.95, 0.99];
                let postgres = $backend == Backend::Postgres;
                let sql = if postgres {
                    format!(
                        "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(v), 0) AS BIGINT) AS sum, COALESCE(MAX(v), 0) AS max, \
                         COALESCE(percentile_disc(0.5) WITHIN GROUP (ORDER BY v), 0) AS p50, \
                         COALESCE(percentile_disc(0.95) WITHIN GROUP (ORDER BY v), 0) AS p95, \
                         COALESCE(percentile_disc(0.99) WITHIN GROUP (ORDER BY v), 0) AS p99 FROM ({values}) s"
                    )
                } else {
                    format!(
                        "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(v), 0) AS BIGINT) AS sum, COALESCE(MAX(v), 0) AS max \
                         FROM ({values}) s"
                    )
                };
                let mut q = sqlx::query(&sql);
                for bind in binds {
                    q = q.bind(bind);
                }
                let row = q.fetch_one(&mut *conn).await?;
                let samples: i64 = row.try_get("n")?;
                let sum: i64 = row.try_get("sum")?;
                // The mean from the exact sum: the backends round AVG differently.
                let mut stats = LatencyStats {
                    samples,
                    avg_ms: if samples > 0 { sum / samples } else { 0 },
                    max_ms: row.try_get("max")?,
                    ..LatencyStats::default()
                };
                if postgres {
                    stats.p50_ms = row.try_get("p50")?;
                    stats.p95_ms = row.try_get("p95")?;
                    stats.p99_ms = row.try_get("p99")?;
                } else if stats.samples > 0 {
                    // SQLite has no percentile aggregate: read the value at each rank.
                    let mut found = [0i64; 3];
                    for (slot, p) in found.iter_mut().zip(PERCENTILES) {
                        let sql =
                            format!("SELECT v FROM ({values}) s ORDER BY v LIMIT 1 OFFSET {}", rank(p, stats.samples));
                        let mut q = sqlx::query_scalar(&sql);
                        for bind in binds {
                            q = q.bind(bind);
                        }
                        *slot = q.fetch_one(&mut *conn).await?;
                    }
                    [stats.p50_ms, stats.p95_ms, stats.p99_ms] = found;
                }
                Ok(stats)
            }

            /// Deletes the traces (`t`) that `from` (a FROM ... WHERE clause) selects, with
            /// their stages, a batch per transaction.
            async fn delete_traces(&self, from: &str, binds: &[String]) -> Result<i64> {
                let select = format!("SELECT t.id {from} LIMIT {PURGE_BATCH}");
                let mut deleted = 0;
                loop {
                    let mut q = sqlx::query_scalar(&select);
                    for bind in binds {
                        q = q.bind(bind);
                    }
                    let ids: Vec<String> = q.fetch_all(&self.pool).await?;
                    if ids.is_empty() {
                        return Ok(deleted);
                    }
                    let list = placeholders(ids.len(), $numbered_values);
                    let mut tx = self.pool.begin().await?;
                    for table in ["trace_stages WHERE trace_id", "traces WHERE id"] {
                        let sql = format!("DELETE FROM {table} IN ({list})");
                        let mut q = sqlx::query(&sql);
                        for id in &ids {
                            q = q.bind(id);
                        }
                        q.execute(&mut *tx).await?;
                    }
                    tx.commit().await?;
                    deleted += ids.len() as i64;
                    if ids.len() < PURGE_BATCH {
                        return Ok(deleted);
                    }
                }
            }

            /// The stage numbers stored in `trace_stages` (before stages moved into the trace's
            /// row) of the traces among `rows` (`id, stages`) that have no stored stages column.
            async fn legacy_stage_numbers(
                tx: &mut sqlx::Transaction<'_, $db>,
                rows: &[<$db as sqlx::Database>::Row],
            ) -> Result<HashMap<String, Vec<i64>>> {
                let mut legacy: Vec<String> = Vec::new();
                for row in rows {
                    if row.try_get::<Option<Vec<u8>>, _>("stages")?.is_none() {
                        legacy.push(row.try_get("id")?);
                    }
                }
                let mut numbers: HashMap<String, Vec<i64>> = HashMap::new();
                if legacy.is_empty() {
                    return Ok(numbers);
                }
                let sql = format!(
                    "SELECT trace_id, seq FROM trace_stages WHERE trace_id IN ({})",
                    placeholders(legacy.len(), $numbered_values)
                );
                let mut q = sqlx::query(&sql);
                for id in &legacy {
                    q = q.bind(id);
                }
                for row in q.fetch_all(&mut **tx).await? {
                    numbers.entry(row.try_get("trace_id")?).or_default().push(row.try_get("seq")?);
                }
                Ok(numbers)
            }

            fn trace_from_row(row: &<$db as sqlx::Database>::Row) -> Result<TraceRecord> {
                Ok(TraceRecord {
                    id: row.try_get("id")?,
                    instance: row.try_get("instance")?,
                    channel: row.try_get("channel")?,
                    external_id: row.try_get("external_id")?,
                    conversation_id: row.try_get("conversation_id")?,
                    sender: row.try_get("sender")?,
                    sender_name: row.try_get("sender_name")?,
                    user_id: row.try_get("user_id")?,
                    message_type: row.try_get("message_type")?,
                    text: row.try_get("text")?,
                    status: row.try_get("status")?,
                    error_stage: row.try_get("error_stage")?,
                    error: row.try_get("error")?,
                    received_at: row.try_get("received_at")?,
                    updated_at: row.try_get("updated_at")?,
                    agent_ms: row.try_get("agent_ms")?,
                    node_id: row.try_get("node_id")?,
                })
            }

            fn node_from_row(row: &<$db as sqlx::Database>::Row) -> Result<NodeRecord> {
                Ok(NodeRecord {
                    id: row.try_get("id")?,
                    address: row.try_get("address")?,
                    version: row.try_get("version")?,
                    applied_revision: row.try_get("applied_revision")?,
                    first_seen_at: row.try_get("first_seen_at")?,
                    last_seen_at: row.try_get("last_seen_at")?,
                    connected: row.try_get("connected")?,
                    last_error: row.try_get("last_error")?,
                })
            }

            fn instance_from_row(row: &<$db as sqlx::Database>::Row) -> Result<InstanceRecord> {
                let name: String = row.try_get("name")?;
                let channel: String = row.try_get("channel")?;
                let spec: String = row.try_get("spec")?;
                Ok(InstanceRecord {
                    id: row.try_get("id")?,
                    channel: Channel::parse(&channel)
                        .ok_or_else(|| corrupt(format!("instance {name:?} has channel {channel:?}")))?,
                    active: row.try_get("active")?,
                    spec: serde_json::from_str(&spec).map_err(|e| corrupt(format!("instance {name:?} spec: {e}")))?,
                    created_at: row.try_get("created_at")?,
                    updated_at: row.try_get("updated_at")?,
                    revision: row.try_get("revision")?,
                    discord_token_sha256: row.try_get("discord_token_sha256")?,
                    name,
                })
            }

            fn rule_from_row(instance: &str, row: &<$db as sqlx::Database>::Row) -> Result<AccessRuleRecord> {
                let action: String = row.try_get("action")?;
                Ok(AccessRuleRecord {
                    id: row.try_get("id")?,
                    instance: instance.to_owned(),
                    pattern: row.try_get("pattern")?,
                    action: Action::parse(&action).ok_or_else(|| corrupt(format!("access rule action {action:?}")))?,
                    created_at: row.try_get("created_at")?,
                })
            }

            fn api_key_from_row(row: &<$db as sqlx::Database>::Row) -> Result<ApiKeyRecord> {
                let patterns: String = row.try_get("instance_patterns")?;
                Ok(ApiKeyRecord {
                    id: row.try_get("id")?,
                    key_hash: row.try_get("key_hash")?,
                    scope: decode_scope(row.try_get("admin")?, &patterns)?,
                    description: row.try_get("description")?,
                    created_at: row.try_get("created_at")?,
                    last_used_at: row.try_get("last_used_at")?,
                    revoked_at: row.try_get("revoked_at")?,
                })
            }

            async fn find_instance(
                conn: &mut <$db as sqlx::Database>::Connection,
                scope: &Scope,
                name: &str,
            ) -> Result<InstanceRecord> {
                let (filter, binds) = scope_filter(scope, "name", 2);
                let sql = format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE name = $1 AND {filter}");
                let mut query = sqlx::query(&sql).bind(name);
                for bind in &binds {
                    query = query.bind(bind);
                }
                match query.fetch_optional(&mut *conn).await? {
                    Some(row) => Self::instance_from_row(&row),
                    None => Err(instance_not_found(name)),
                }
            }

            async fn rules_of(
                conn: &mut <$db as sqlx::Database>::Connection,
                instance: &InstanceRecord,
            ) -> Result<Vec<AccessRuleRecord>> {
                let rows = sqlx::query(
                    "SELECT id, pattern, action, created_at FROM access_rules WHERE instance_id = $1 ORDER BY id",
                )
                .bind(&instance.id)
                .fetch_all(&mut *conn)
                .await?;
                rows.iter().map(|row| Self::rule_from_row(&instance.name, row)).collect()
            }

            /// Appends the instance's whole current config to the change log at `revision`.
            async fn log_instance(
                conn: &mut <$db as sqlx::Database>::Connection,
                revision: i64,
                name: &str,
            ) -> Result<InstanceConfig> {
                let instance = Self::find_instance(&mut *conn, &Scope::Admin, name).await?;
                let rules = Self::rules_of(&mut *conn, &instance).await?;
                let config = InstanceConfig { instance, rules };
                let payload = serde_json::to_string(&config).map_err(|e| corrupt(e))?;
                sqlx::query(
                    "INSERT INTO config_changes (revision, kind, key, op, payload, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(revision)
                .bind(KIND_INSTANCE)
                .bind(name)
                .bind(ChangeOp::Upsert.as_str())
                .bind(payload)
                .bind(now_millis())
                .execute(&mut *conn)
                .await?;
                Ok(config)
            }

            /// Marks the instance as changed at `revision` (rule changes are instance changes).
            async fn stamp_instance(
                conn: &mut <$db as sqlx::Database>::Connection,
                instance_id: &str,
                revision: i64,
            ) -> Result<()> {
                sqlx::query("UPDATE instances SET revision = $1, updated_at = $2 WHERE id = $3")
                    .bind(revision)
                    .bind(now_millis())
                    .bind(instance_id)
                    .execute(&mut *conn)
                    .await?;
                Ok(())
            }
        }

        #[async_trait]
        impl Store for $store {
            fn backend(&self) -> Backend {
                $backend
            }

            async fn create_instance(&self, instance: &InstanceRecord) -> Result<InstanceRecord> {
                let (mut tx, revision) = self.begin_change().await?;
                let now = now_millis();
                let spec = serde_json::to_string(&instance.spec).map_err(|e| corrupt(e))?;
                // A taken name is checked first (as the conflict target), so it is what a create
                // that repeats an existing instance, token and all, is told. Which unique index
                // each backend would check first otherwise differs.
                let inserted = sqlx::query(
                    "INSERT INTO instances \
                     (id, name, channel, active, spec, created_at, updated_at, revision, discord_token_sha256) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (name) DO NOTHING",
                )
                .bind(&instance.id)
                .bind(&instance.name)
                .bind(instance.channel.as_str())
                .bind(instance.active)
                .bind(spec)
                .bind(now)
                .bind(now)
                .bind(revision)
                .bind(&instance.discord_token_sha256)
                .execute(&mut *tx)
                .await;
                let taken = || StoreError::AlreadyExists(format!("instance {:?}", instance.name));
                match inserted {
                    Ok(done) if done.rows_affected() == 0 => return Err(taken()),
                    Ok(_) => {}
                    Err(e) if is_discord_token_violation(&e) => return Err(StoreError::DiscordTokenInUse),
                    Err(sqlx::Error::Database(e)) if e.is_unique_violation() => return Err(taken()),
                    Err(e) => return Err(e.into()),
                }
                let config = Self::log_instance(&mut tx, revision, &instance.name).await?;
                self.commit_change(tx, revision).await?;
                Ok(config.instance)
            }

            async fn get_instance(&self, scope: &Scope, name: &str) -> Result<InstanceRecord> {
                let mut conn = self.pool.acquire().await?;
                Self::find_instance(&mut conn, scope, name).await
            }

            async fn list_instances(&self, scope: &Scope, query: &ListInstances) -> Result<Vec<InstanceRecord>> {
                let (filter, mut binds) = scope_filter(scope, "name", 1);
                let mut sql = format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE {filter}");
                if let Some(after) = &query.after {
                    binds.push(after.clone());
                    sql.push_str(&format!(" AND name > ${}", binds.len()));
                }
                if let Some(channel) = query.channel {
                    binds.push(channel.as_str().to_owned());
                    sql.push_str(&format!(" AND channel = ${}", binds.len()));
                }
                sql.push_str(&format!(" ORDER BY name LIMIT {}", query.limit));
                let mut q = sqlx::query(&sql);
                for bind in &binds {
                    q = q.bind(bind);
                }
                let rows = q.fetch_all(&self.pool).await?;
                rows.iter().map(Self::instance_from_row).collect()
            }

            async fn update_instance(
                &self,
                scope: &Scope,
                name: &str,
                expected_revision: i64,
                active: bool,
                spec: &InstanceSpec,
                discord_token_sha256: Option<&str>,
            ) -> Result<InstanceRecord> {
                let (mut tx, revision) = self.begin_change().await?;
                let spec = serde_json::to_string(spec).map_err(|e| corrupt(e))?;
                let (filter, binds) = scope_filter(scope, "name", 8);
                let sql = format!(
                    "UPDATE instances SET active = $1, spec = $2, updated_at = $3, revision = $4, \
                     discord_token_sha256 = $7 WHERE name = $5 AND revision = $6 AND {filter}"
                );
                let mut q = sqlx::query(&sql)
                    .bind(active)
                    .bind(spec)
                    .bind(now_millis())
                    .bind(revision)
                    .bind(name)
                    .bind(expected_revision)
                    .bind(discord_token_sha256);
                for bind in &binds {
                    q = q.bind(bind);
                }
                let updated = match q.execute(&mut *tx).await {
                    Err(e) if is_discord_token_violation(&e) => return Err(StoreError::DiscordTokenInUse),
                    other => other?,
                };
                if updated.rows_affected() == 0 {
                    // Tell a lost race from an instance that is not there (for this caller).
                    Self::find_instance(&mut tx, scope, name).await?;
                    return Err(StoreError::Conflict(format!("instance {name:?}")));
                }
                let config = Self::log_instance(&mut tx, revision, name).await?;
                self.commit_change(tx, revision).await?;
                Ok(config.instance)
            }

            async fn delete_instance(&self, scope: &Scope, name: &str) -> Result<()> {
                let (mut tx, revision) = self.begin_change().await?;
                let (filter, binds) = scope_filter(scope, "name", 2);
                let sql = format!("DELETE FROM instances WHERE name = $1 AND {filter}");
                let mut q = sqlx::query(&sql).bind(name);
                for bind in &binds {
                    q = q.bind(bind);
                }
                if q.execute(&mut *tx).await?.rows_affected() == 0 {
                    return Err(instance_not_found(name));
                }
                sqlx::query(
                    "INSERT INTO config_changes (revision, kind, key, op, payload, created_at) VALUES ($1, $2, $3, $4, NULL, $5)",
                )
                .bind(revision)
                .bind(KIND_INSTANCE)
                .bind(name)
                .bind(ChangeOp::Delete.as_str())
                .bind(now_millis())
                .execute(&mut *tx)
                .await?;
                self.commit_change(tx, revision).await
            }

            async fn put_access_rule(
                &self,
                scope: &Scope,
                instance: &str,
                pattern: &str,
                action: Action,
            ) -> Result<AccessRuleRecord> {
                let (mut tx, revision) = self.begin_change().await?;
                let record = Self::find_instance(&mut tx, scope, instance).await?;
                let row = sqlx::query(
                    "INSERT INTO access_rules (instance_id, pattern, action, created_at) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (instance_id, pattern) DO UPDATE SET action = excluded.action \
                     RETURNING id, pattern, action, created_at",
                )
                .bind(&record.id)
                .bind(pattern)
                .bind(action.as_str())
                .bind(now_millis())
                .fetch_one(&mut *tx)
                .await?;
                let rule = Self::rule_from_row(instance, &row)?;
                Self::stamp_instance(&mut tx, &record.id, revision).await?;
                Self::log_instance(&mut tx, revision, instance).await?;
                self.commit_change(tx, revision).await?;
                Ok(rule)
            }

            async fn list_access_rules(&self, scope: &Scope, instance: &str) -> Result<Vec<AccessRuleRecord>> {
                let mut conn = self.pool.acquire().await?;
                let record = Self::find_instance(&mut conn, scope, instance).await?;
                Self::rules_of(&mut conn, &record).await
            }

            async fn remove_access_rule(&self, scope: &Scope, instance: &str, id: i64) -> Result<()> {
                let (mut tx, revision) = self.begin_change().await?;
                let record = Self::find_instance(&mut tx, scope, instance).await?;
                let deleted = sqlx::query("DELETE FROM access_rules WHERE id = $1 AND instance_id = $2")
                    .bind(id)
                    .bind(&record.id)
                    .execute(&mut *tx)
                    .await?;
                if deleted.rows_affected() == 0 {
                    return Err(StoreError::NotFound(format!("access rule {id} of instance {instance:?}")));
                }
                Self::stamp_instance(&mut tx, &record.id, revision).await?;
                Self::log_instance(&mut tx, revision, instance).await?;
                self.commit_change(tx, revision).await
            }

            async fn create_api_key(&self, key: &ApiKeyRecord) -> Result<()> {
                let (admin, patterns) = encode_scope(&key.scope);
                let inserted = sqlx::query(
                    "INSERT INTO api_keys (id, key_hash, admin, instance_patterns, description, created_at, last_used_at, revoked_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&key.id)
                .bind(&key.key_hash)
                .bind(admin)
                .bind(patterns)
                .bind(&key.description)
                .bind(key.created_at)
                .bind(key.last_used_at)
                .bind(key.revoked_at)
                .execute(&self.pool)
                .await;
                match inserted {
                    Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                        Err(StoreError::AlreadyExists(format!("api key {:?}", key.id)))
                    }
                    other => other.map(drop).map_err(Into::into),
                }
            }

            async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>> {
                let sql = format!("SELECT {API_KEY_COLUMNS} FROM api_keys ORDER BY created_at, id");
                let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
                rows.iter().map(Self::api_key_from_row).collect()
            }

            async fn find_api_key_by_hash(&self, key_hash: &str) -> Result<Option<ApiKeyRecord>> {
                let sql = format!("SELECT {API_KEY_COLUMNS} FROM api_keys WHERE key_hash = $1");
                let row = sqlx::query(&sql).bind(key_hash).fetch_optional(&self.pool).await?;
                row.as_ref().map(Self::api_key_from_row).transpose()
            }

            async fn revoke_api_key(&self, id: &str, now: i64) -> Result<ApiKeyRecord> {
                let sql = format!(
                    "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2 RETURNING {API_KEY_COLUMNS}"
                );
                let row = sqlx::query(&sql).bind(now).bind(id).fetch_optional(&self.pool).await?;
                match row {
                    Some(row) => Self::api_key_from_row(&row),
                    None => Err(StoreError::NotFound(format!("api key {id:?}"))),
                }
            }

            async fn touch_api_key(&self, id: &str, now: i64) -> Result<()> {
                sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
                    .bind(now)
                    .bind(id)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn count_api_keys(&self) -> Result<i64> {
                Ok(sqlx::query_scalar("SELECT COUNT(*) FROM api_keys").fetch_one(&self.pool).await?)
            }

            async fn config_revision(&self) -> Result<i64> {
                Ok(sqlx::query_scalar("SELECT revision FROM config_head WHERE id = 1").fetch_one(&self.pool).await?)
            }

            async fn config_log_bounds(&self) -> Result<LogBounds> {
                let row = sqlx::query("SELECT revision, compacted_revision FROM config_head WHERE id = 1")
                    .fetch_one(&self.pool)
                    .await?;
                Ok(LogBounds { head: row.try_get("revision")?, compacted: row.try_get("compacted_revision")? })
            }

            async fn config_changes(&self, after: i64, through: i64) -> Result<Vec<ConfigChange>> {
                let rows = sqlx::query(
                    "SELECT revision, kind, key, op, payload FROM config_changes \
                     WHERE revision > $1 AND revision <= $2 ORDER BY revision, kind, key",
                )
                .bind(after)
                .bind(through)
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|row| {
                        let op: String = row.try_get("op")?;
                        Ok(ConfigChange {
                            revision: row.try_get("revision")?,
                            kind: row.try_get("kind")?,
                            key: row.try_get("key")?,
                            op: match op.as_str() {
                                "upsert" => ChangeOp::Upsert,
                                "delete" => ChangeOp::Delete,
                                other => return Err(corrupt(format!("config change op {other:?}"))),
                            },
                            payload: row.try_get("payload")?,
                        })
                    })
                    .collect()
            }

            async fn config_snapshot(&self) -> Result<(i64, Vec<InstanceConfig>)> {
                let mut tx = self.pool.begin().await?;
                let isolation: Option<&str> = $snapshot_isolation;
                if let Some(sql) = isolation {
                    sqlx::query(sql).execute(&mut *tx).await?;
                }
                let revision: i64 =
                    sqlx::query_scalar("SELECT revision FROM config_head WHERE id = 1").fetch_one(&mut *tx).await?;
                let sql = format!("SELECT {INSTANCE_COLUMNS} FROM instances ORDER BY name");
                let rows = sqlx::query(&sql).fetch_all(&mut *tx).await?;
                let mut configs = Vec::with_capacity(rows.len());
                let mut index = std::collections::HashMap::with_capacity(rows.len());
                for row in &rows {
                    let instance = Self::instance_from_row(row)?;
                    index.insert(instance.id.clone(), configs.len());
                    configs.push(InstanceConfig { instance, rules: Vec::new() });
                }
                let rules = sqlx::query(
                    "SELECT id, instance_id, pattern, action, created_at FROM access_rules ORDER BY id",
                )
                .fetch_all(&mut *tx)
                .await?;
                for row in &rules {
                    let instance_id: String = row.try_get("instance_id")?;
                    let Some(&i) = index.get(&instance_id) else {
                        return Err(corrupt(format!("access rule of unknown instance {instance_id}")));
                    };
                    let rule = Self::rule_from_row(&configs[i].instance.name, row)?;
                    configs[i].rules.push(rule);
                }
                tx.commit().await?;
                Ok((revision, configs))
            }

            fn watch_revision(&self) -> tokio::sync::watch::Receiver<i64> {
                self.revision.subscribe()
            }

            async fn node_connected(&self, node: &NodeRecord) -> Result<()> {
                sqlx::query(
                    "INSERT INTO nodes (id, address, version, applied_revision, first_seen_at, last_seen_at, connected, last_error) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                     ON CONFLICT (id) DO UPDATE SET address = excluded.address, version = excluded.version, \
                     applied_revision = excluded.applied_revision, last_seen_at = excluded.last_seen_at, \
                     connected = excluded.connected, last_error = excluded.last_error",
                )
                .bind(&node.id)
                .bind(&node.address)
                .bind(&node.version)
                .bind(node.applied_revision)
                .bind(node.first_seen_at)
                .bind(node.last_seen_at)
                .bind(true)
                .bind(&node.last_error)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn node_acked(&self, id: &str, revision: i64, now: i64) -> Result<()> {
                // A node that speaks is connected, even if an older session of it just ended.
                sqlx::query("UPDATE nodes SET applied_revision = $1, last_error = '', last_seen_at = $2, connected = $4 WHERE id = $3")
                    .bind(revision)
                    .bind(now)
                    .bind(id)
                    .bind(true)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn node_nacked(&self, id: &str, error: &str, now: i64) -> Result<()> {
                sqlx::query("UPDATE nodes SET last_error = $1, last_seen_at = $2 WHERE id = $3")
                    .bind(error)
                    .bind(now)
                    .bind(id)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn node_seen(&self, id: &str, now: i64) -> Result<()> {
                sqlx::query("UPDATE nodes SET last_seen_at = $1, connected = $3 WHERE id = $2")
                    .bind(now)
                    .bind(id)
                    .bind(true)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn node_disconnected(&self, id: &str, now: i64) -> Result<()> {
                sqlx::query("UPDATE nodes SET connected = $1, last_seen_at = $2 WHERE id = $3")
                    .bind(false)
                    .bind(now)
                    .bind(id)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn list_nodes(&self) -> Result<Vec<NodeRecord>> {
                let sql = format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY id");
                let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
                rows.iter().map(Self::node_from_row).collect()
            }

            async fn count_live_nodes(&self, seen_since: i64) -> Result<i64> {
                Ok(sqlx::query_scalar("SELECT COUNT(*) FROM nodes WHERE connected = $1 AND last_seen_at >= $2")
                    .bind(true)
                    .bind(seen_since)
                    .fetch_one(&self.pool)
                    .await?)
            }

            async fn ingest_trace_events(&self, node_id: &str, events: &[TraceEventRecord]) -> Result<usize> {
                // The batch's stages by trace (a stage reported twice counts once), and the
                // traces in one order for every writer, then their senders in one order, so
                // that concurrent ingests seldom deadlock (the trace rows are locked in two
                // passes, new and known; Postgres fails one of two deadlocked ingests, and its
                // node reports again).
                let mut by_trace: HashMap<&str, Vec<&TraceEventRecord>> = HashMap::new();
                for e in events {
                    let stages = by_trace.entry(e.trace_id.as_str()).or_default();
                    if !stages.iter().any(|s| s.seq == e.seq) {
                        stages.push(e);
                    }
                }
                let mut ids: Vec<&str> = by_trace.keys().copied().collect();
                ids.sort_unstable();
                let mut tx = self.pool.begin_with($begin_ingest).await?;
                // A trace first seen here is inserted with what the whole batch says about it,
                // its stages included: a trace reported in one piece is written once.
                let batch = trace_states(events.iter());
                let headers: Vec<(&TraceEventRecord, &TraceHeaderRecord)> =
                    ids.iter().filter_map(|id| by_trace[id].iter().find_map(|e| e.header.as_ref().map(|h| (*e, h)))).collect();
                let mut created: HashSet<String> = HashSet::new();
                for rows in ingest_chunks(&headers, $shaped_statements) {
                    let sql = format!(
                        "INSERT INTO traces (id, instance_id, channel, external_id, conversation_id, sender, sender_name, \
                         user_id, message_type, text, status, status_seq, error_stage, error, received_at, updated_at, \
                         agent_ms, node_id, stages) VALUES {} ON CONFLICT (id) DO NOTHING RETURNING id",
                        values(rows.len(), 19, $numbered_values)
                    );
                    let mut q = sqlx::query(&sql);
                    for (event, header) in rows {
                        let state = batch[event.trace_id.as_str()];
                        let (error_stage, error) = state.error();
                        q = q
                            .bind(&event.trace_id)
                            .bind(&event.instance_id)
                            .bind(&header.channel)
                            .bind(&header.external_id)
                            .bind(&header.conversation_id)
                            .bind(&header.sender)
                            .bind(&header.sender_name)
                            .bind(&header.user_id)
                            .bind(&header.message_type)
                            .bind(&header.text)
                            .bind(&state.latest.status)
                            .bind(state.latest.seq)
                            .bind(error_stage)
                            .bind(error)
                            .bind(header.received_at)
                            .bind(state.latest.at)
                            .bind(state.agent_ms)
                            .bind(node_id)
                            .bind(stages::encode(stage_refs(&by_trace[event.trace_id.as_str()])));
                    }
                    for row in q.fetch_all(&mut *tx).await? {
                        created.insert(row.try_get("id")?);
                    }
                }
                let mut fresh: Vec<&TraceEventRecord> =
                    created.iter().flat_map(|id| by_trace[id.as_str()].iter().copied()).collect();
                // Traces stored before: their stored stages, with those of the batch they lack.
                // Stages of a trace that is not stored (purged meanwhile) have nowhere to go.
                let known: Vec<&str> = ids.iter().copied().filter(|id| !created.contains(*id)).collect();
                let mut merged: Vec<(&str, Vec<u8>)> = Vec::new();
                for chunk in ingest_chunks(&known, $shaped_statements) {
                    let sql = format!(
                        "SELECT id, stages FROM traces WHERE id IN ({}) ORDER BY id{}",
                        placeholders(chunk.len(), $numbered_values),
                        $for_update
                    );
                    let mut q = sqlx::query(&sql);
                    for id in chunk {
                        q = q.bind(*id);
                    }
                    let rows = q.fetch_all(&mut *tx).await?;
                    let mut legacy = Self::legacy_stage_numbers(&mut tx, &rows).await?;
                    for row in &rows {
                        let id: String = row.try_get("id")?;
                        let Some((id, batch_stages)) = by_trace.get_key_value(id.as_str()) else { continue };
                        let blob: Option<Vec<u8>> = row.try_get("stages")?;
                        let stored = blob.as_deref().map(stages::decode).transpose()?.unwrap_or_default();
                        let earlier = legacy.remove(*id).unwrap_or_default();
                        let have: HashSet<i64> = stored.iter().map(|s| s.seq).chain(earlier).collect();
                        let added: Vec<&TraceEventRecord> =
                            batch_stages.iter().copied().filter(|e| !have.contains(&e.seq)).collect();
                        if !added.is_empty() {
                            let mut all: Vec<StageRef<'_>> = stored.iter().map(StageRef::from).collect();
                            all.extend(stage_refs(&added));
                            all.sort_unstable_by_key(|s| s.seq);
                            merged.push((id, stages::encode(all)));
                            fresh.extend(added);
                        }
                    }
                }
                // One update each with what their new stages change.
                let changed = trace_states(fresh.iter().copied());
                let blobs: HashMap<&str, Vec<u8>> = merged.into_iter().collect();
                let updates: Vec<&str> = known.iter().copied().filter(|id| blobs.contains_key(id)).collect();
                for rows in ingest_chunks(&updates, $shaped_statements) {
                    let sql = format!(
                        "UPDATE traces SET \
                         status = CASE WHEN v.column3 > traces.status_seq THEN v.column2 ELSE traces.status END, \
                         updated_at = CASE WHEN v.column3 > traces.status_seq THEN v.column4 ELSE traces.updated_at END, \
                         status_seq = CASE WHEN v.column3 > traces.status_seq THEN v.column3 ELSE traces.status_seq END, \
                         error_stage = CASE WHEN traces.error = '' AND v.column6 <> '' THEN v.column5 ELSE traces.error_stage END, \
                         error = CASE WHEN traces.error = '' AND v.column6 <> '' THEN v.column6 ELSE traces.error END, \
                         agent_ms = CASE WHEN v.column7 > traces.agent_ms THEN v.column7 ELSE traces.agent_ms END, \
                         stages = v.column8 \
                         FROM (VALUES {}) AS v WHERE traces.id = v.column1",
                        values(rows.len(), 8, $numbered_values)
                    );
                    let mut q = sqlx::query(&sql);
                    for id in rows {
                        let state = changed[id];
                        let (error_stage, error) = state.error();
                        let latest = state.latest;
                        q = q
                            .bind(&latest.trace_id)
                            .bind(&latest.status)
                            .bind(latest.seq)
                            .bind(latest.at)
                            .bind(error_stage)
                            .bind(error)
                            .bind(state.agent_ms)
                            .bind(&blobs[id]);
                    }
                    q.execute(&mut *tx).await?;
                }
                // The senders of the traces new here, after every trace row is locked.
                let users = users_of(headers.iter().filter(|(e, _)| created.contains(&e.trace_id)).copied());
                for users in ingest_chunks(&users, $shaped_statements) {
                    let sql = format!(
                        "INSERT INTO users (id, instance_id, identity, display_name, first_seen_at, last_seen_at, message_count) \
                         VALUES {} ON CONFLICT (instance_id, identity) DO UPDATE SET \
                         display_name = CASE WHEN excluded.display_name <> '' THEN excluded.display_name ELSE users.display_name END, \
                         last_seen_at = CASE WHEN excluded.last_seen_at > users.last_seen_at THEN excluded.last_seen_at ELSE users.last_seen_at END, \
                         message_count = users.message_count + excluded.message_count",
                        values(users.len(), 7, $numbered_values)
                    );
                    let mut q = sqlx::query(&sql);
                    for u in users {
                        q = q
                            .bind(&u.id)
                            .bind(&u.instance_id)
                            .bind(&u.identity)
                            .bind(&u.name)
                            .bind(u.first_seen)
                            .bind(u.last_seen)
                            .bind(u.count);
                    }
                    q.execute(&mut *tx).await?;
                }
                // Traces that reached a final status with a stage stored now.
                let finished: Vec<String> = changed
                    .values()
                    .filter(|s| is_final_status(&s.latest.status))
                    .map(|s| s.latest.trace_id.clone())
                    .collect();
                let notify: Option<&str> = $notify;
                if let Some(sql) = notify {
                    for ids in finished.chunks(NOTIFY_IDS) {
                        let payload = format!("{}:{}", self.origin, ids.join(","));
                        sqlx::query(sql).bind(TRACES_NOTIFY_CHANNEL).bind(payload).execute(&mut *tx).await?;
                    }
                }
                tx.commit().await?;
                if !finished.is_empty() {
                    // No receiver (no one tailing) is fine.
                    let _ = self.finished.send(finished.into());
                }
                Ok(fresh.len())
            }

            async fn list_traces(&self, scope: &Scope, query: &TraceQuery) -> Result<Vec<TraceRecord>> {
                let mut binds = Vec::new();
                let mut conditions = trace_conditions(scope, &query.filter, $ilike, &mut binds);
                if let Some(after) = &query.after {
                    binds.push(after.id.clone());
                    conditions.push_str(&format!(
                        " AND (t.received_at < {r} OR (t.received_at = {r} AND t.id < ${n}))",
                        r = after.received_at,
                        n = binds.len()
                    ));
                }
                let sql = format!(
                    "SELECT {TRACE_COLUMNS} FROM traces t JOIN instances i ON i.id = t.instance_id WHERE {conditions} \
                     ORDER BY t.received_at DESC, t.id DESC LIMIT {}",
                    query.limit
                );
                let mut q = sqlx::query(&sql);
                for bind in &binds {
                    q = q.bind(bind);
                }
                let rows = q.fetch_all(&self.pool).await?;
                rows.iter().map(Self::trace_from_row).collect()
            }

            async fn traces_by_ids(
                &self,
                scope: &Scope,
                ids: &[String],
                filter: &TraceFilter,
            ) -> Result<Vec<TraceRecord>> {
                let mut traces = Vec::with_capacity(ids.len());
                for ids in ids.chunks(INGEST_ROWS) {
                    let mut binds = Vec::new();
                    let conditions = trace_conditions(scope, filter, $ilike, &mut binds);
                    let first = binds.len() + 1;
                    let list: Vec<String> = (first..first + ids.len()).map(|n| format!("${n}")).collect();
                    let sql = format!(
                        "SELECT {TRACE_COLUMNS} FROM traces t JOIN instances i ON i.id = t.instance_id \
                         WHERE {conditions} AND t.id IN ({}) ORDER BY t.updated_at, t.id",
                        list.join(", ")
                    );
                    let mut q = sqlx::query(&sql);
                    for bind in binds.iter().chain(ids) {
                        q = q.bind(bind);
                    }
                    for row in q.fetch_all(&self.pool).await? {
                        traces.push(Self::trace_from_row(&row)?);
                    }
                }
                Ok(traces)
            }

            async fn get_trace(
                &self,
                scope: &Scope,
                id: &str,
                payloads: bool,
            ) -> Result<(TraceRecord, Vec<TraceStageRecord>)> {
                let (filter, binds) = scope_filter(scope, "i.name", 2);
                let sql = format!(
                    "SELECT {TRACE_COLUMNS}, t.stages FROM traces t JOIN instances i ON i.id = t.instance_id \
                     WHERE t.id = $1 AND {filter}"
                );
                let mut q = sqlx::query(&sql).bind(id);
                for bind in &binds {
                    q = q.bind(bind);
                }
                let Some(row) = q.fetch_optional(&self.pool).await? else {
                    return Err(StoreError::NotFound(format!("trace {id:?}")));
                };
                let trace = Self::trace_from_row(&row)?;
                let blob: Option<Vec<u8>> = row.try_get("stages")?;
                let mut stages = blob.as_deref().map(stages::decode).transpose()?.unwrap_or_default();
                // Stages stored before they moved into the trace's row.
                let payload_columns = if payloads { "payload, payload_lz4" } else { "'' AS payload, NULL AS payload_lz4" };
                let sql = format!(
                    "SELECT seq, stage, at, duration_ms, detail, {payload_columns} FROM trace_stages \
                     WHERE trace_id = $1 ORDER BY seq"
                );
                for row in sqlx::query(&sql).bind(id).fetch_all(&self.pool).await? {
                    let compressed: Option<Vec<u8>> = row.try_get("payload_lz4")?;
                    let seq: i64 = row.try_get("seq")?;
                    if stages.iter().any(|s| s.seq == seq) {
                        continue;
                    }
                    stages.push(TraceStageRecord {
                        seq,
                        stage: row.try_get("stage")?,
                        at: row.try_get("at")?,
                        duration_ms: row.try_get("duration_ms")?,
                        detail: row.try_get("detail")?,
                        payload: match compressed {
                            Some(bytes) => decompress_payload(&bytes)?,
                            None => row.try_get("payload")?,
                        },
                    });
                }
                stages.sort_by_key(|s| s.seq);
                if !payloads {
                    for stage in &mut stages {
                        stage.payload.clear();
                    }
                }
                Ok((trace, stages))
            }

            async fn trace_stats(&self, scope: &Scope, filter: &TraceFilter) -> Result<TraceStatsRecord> {
                let mut binds = Vec::new();
                let conditions = trace_conditions(scope, filter, $ilike, &mut binds);
                let from = format!("FROM traces t JOIN instances i ON i.id = t.instance_id WHERE {conditions}");
                // One consistent view for all the aggregates.
                let mut tx = self.pool.begin().await?;
                let isolation: Option<&str> = $snapshot_isolation;
                if let Some(sql) = isolation {
                    sqlx::query(sql).execute(&mut *tx).await?;
                }
                let grouped = |key: &str| {
                    format!("SELECT {key} AS k, COUNT(*) AS n {from} GROUP BY {key} ORDER BY n DESC, k")
                };
                let by_status = Self::counts(&mut tx, &grouped("t.status"), &binds).await?;
                let by_error_stage = Self::counts(
                    &mut tx,
                    &format!(
                        "SELECT t.error_stage AS k, COUNT(*) AS n {from} AND t.status = 'failed' \
                         GROUP BY t.error_stage ORDER BY n DESC, k"
                    ),
                    &binds,
                )
                .await?;
                let by_message_type = Self::counts(&mut tx, &grouped("t.message_type"), &binds).await?;
                let by_instance = Self::counts(&mut tx, &grouped("i.name"), &binds).await?;
                let agent_latency =
                    Self::latency(&mut tx, &format!("SELECT t.agent_ms AS v {from} AND t.agent_ms > 0"), &binds).await?;
                let total_latency = Self::latency(
                    &mut tx,
                    &format!(
                        "SELECT t.updated_at - t.received_at AS v {from} AND t.status IN ('completed', 'failed')"
                    ),
                    &binds,
                )
                .await?;
                let sql = format!(
                    "SELECT (t.received_at / 3600000) * 3600000 AS hour, COUNT(*) AS n {from} GROUP BY hour ORDER BY hour"
                );
                let mut q = sqlx::query(&sql);
                for bind in &binds {
                    q = q.bind(bind);
                }
                let per_hour = q
                    .fetch_all(&mut *tx)
                    .await?
                    .iter()
                    .map(|row| Ok((row.try_get::<i64, _>("hour")?, row.try_get::<i64, _>("n")?)))
                    .collect::<Result<Vec<_>>>()?;
                tx.commit().await?;
                Ok(TraceStatsRecord {
                    total: by_status.iter().map(|(_, n)| n).sum(),
                    by_status,
                    by_error_stage,
                    by_message_type,
                    by_instance,
                    agent_latency,
                    total_latency,
                    per_hour,
                })
            }

            async fn purge_traces(&self, scope: &Scope, filter: &TraceFilter, dry_run: bool) -> Result<i64> {
                if filter.until.is_none() {
                    return Err(corrupt("a purge needs a time before which traces go"));
                }
                let mut binds = Vec::new();
                let conditions = trace_conditions(scope, filter, $ilike, &mut binds);
                // A left join, so that an admin purge also reaches traces of deleted instances.
                let from = format!("FROM traces t LEFT JOIN instances i ON i.id = t.instance_id WHERE {conditions}");
                if dry_run {
                    let sql = format!("SELECT COUNT(*) {from}");
                    let mut q = sqlx::query_scalar(&sql);
                    for bind in &binds {
                        q = q.bind(bind);
                    }
                    return Ok(q.fetch_one(&self.pool).await?);
                }
                self.delete_traces(&from, &binds).await
            }

            async fn apply_trace_retention(&self, default_retention_ms: i64, now: i64) -> Result<i64> {
                let rows = sqlx::query("SELECT id, spec FROM instances").fetch_all(&self.pool).await?;
                let mut deleted = 0;
                for row in &rows {
                    let id: String = row.try_get("id")?;
                    let spec: String = row.try_get("spec")?;
                    let own = serde_json::from_str::<InstanceSpec>(&spec)
                        .map_err(|e| corrupt(format!("instance {id} spec: {e}")))?
                        .trace_retention_secs
                        * 1000;
                    let retention = if own > 0 { own } else { default_retention_ms };
                    if retention <= 0 {
                        continue;
                    }
                    let from = format!("FROM traces t WHERE t.instance_id = $1 AND t.received_at < {}", now - retention);
                    deleted += self.delete_traces(&from, &[id]).await?;
                }
                if default_retention_ms > 0 {
                    let from = format!(
                        "FROM traces t WHERE t.received_at < {} AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = t.instance_id)",
                        now - default_retention_ms
                    );
                    deleted += self.delete_traces(&from, &[]).await?;
                }
                Ok(deleted)
            }

            fn finished_traces(&self) -> tokio::sync::broadcast::Receiver<Arc<[String]>> {
                self.finished.subscribe()
            }

            async fn list_users(&self, scope: &Scope, query: &UserQuery) -> Result<Vec<UserRecord>> {
                let mut conn = self.pool.acquire().await?;
                let record = Self::find_instance(&mut conn, scope, &query.instance).await?;
                let mut binds = vec![record.id.clone()];
                let mut sql = "SELECT id, identity, display_name, first_seen_at, last_seen_at, message_count FROM users \
                     WHERE instance_id = $1"
                    .to_owned();
                if let Some(search) = &query.search {
                    binds.push(contains_pattern(search));
                    sql.push_str(&format!(
                        " AND (identity {like} $2 ESCAPE '\\' OR display_name {like} $2 ESCAPE '\\')",
                        like = $ilike
                    ));
                }
                if let Some((last_seen, identity)) = &query.after {
                    binds.push(identity.clone());
                    sql.push_str(&format!(
                        " AND (last_seen_at < {last_seen} OR (last_seen_at = {last_seen} AND identity > ${}))",
                        binds.len()
                    ));
                }
                sql.push_str(&format!(" ORDER BY last_seen_at DESC, identity LIMIT {}", query.limit));
                let mut q = sqlx::query(&sql);
                for bind in &binds {
                    q = q.bind(bind);
                }
                let rows = q.fetch_all(&mut *conn).await?;
                rows.iter()
                    .map(|row| {
                        Ok(UserRecord {
                            id: row.try_get("id")?,
                            instance: record.name.clone(),
                            identity: row.try_get("identity")?,
                            display_name: row.try_get("display_name")?,
                            first_seen_at: row.try_get("first_seen_at")?,
                            last_seen_at: row.try_get("last_seen_at")?,
                            message_count: row.try_get("message_count")?,
                        })
                    })
                    .collect()
            }

            async fn record_instance_events(&self, events: &[InstanceEventRecord]) -> Result<()> {
                let mut tx = self.pool.begin().await?;
                for e in events {
                    match e.kind.as_str() {
                        "qrcode" => {
                            sqlx::query(
                                "INSERT INTO instance_connections \
                                 (instance_id, state, status_reason, wuid, profile_name, connection_at, qr_at) \
                                 VALUES ($1, '', 0, '', '', 0, $2) ON CONFLICT (instance_id) DO UPDATE SET \
                                 qr_at = CASE WHEN excluded.qr_at > instance_connections.qr_at \
                                 THEN excluded.qr_at ELSE instance_connections.qr_at END",
                            )
                            .bind(&e.instance_id)
                            .bind(e.at)
                            .execute(&mut *tx)
                            .await?;
                        }
                        // An error stands against reports about an older config, and against the
                        // `closed` a node reports after closing the gateway that failed: else
                        // the bot would be leased again to fail the same way.
                        "gateway" => {
                            sqlx::query(
                                "INSERT INTO instance_connections \
                                 (instance_id, state, status_reason, wuid, profile_name, connection_at, qr_at, \
                                 gateway_state, gateway_error, gateway_node_id, gateway_at, gateway_revision) \
                                 VALUES ($1, '', 0, '', '', 0, 0, $3, $4, $5, $2, $6) ON CONFLICT (instance_id) DO UPDATE SET \
                                 gateway_state = excluded.gateway_state, gateway_error = excluded.gateway_error, \
                                 gateway_node_id = excluded.gateway_node_id, gateway_at = excluded.gateway_at, \
                                 gateway_revision = excluded.gateway_revision \
                                 WHERE excluded.gateway_at >= instance_connections.gateway_at \
                                 AND NOT (instance_connections.gateway_state = 'error' \
                                 AND (excluded.gateway_revision < instance_connections.gateway_revision \
                                 OR (excluded.gateway_revision = instance_connections.gateway_revision \
                                 AND excluded.gateway_state = 'closed')))",
                            )
                            .bind(&e.instance_id)
                            .bind(e.at)
                            .bind(&e.state)
                            .bind(&e.detail)
                            .bind(&e.node_id)
                            .bind(e.revision)
                            .execute(&mut *tx)
                            .await?;
                        }
                        _ => {
                            sqlx::query(
                                "INSERT INTO instance_connections \
                                 (instance_id, state, status_reason, wuid, profile_name, connection_at, qr_at) \
                                 VALUES ($1, $3, $4, $5, $6, $2, 0) ON CONFLICT (instance_id) DO UPDATE SET \
                                 state = excluded.state, status_reason = excluded.status_reason, wuid = excluded.wuid, \
                                 profile_name = excluded.profile_name, connection_at = excluded.connection_at \
                                 WHERE excluded.connection_at >= instance_connections.connection_at",
                            )
                            .bind(&e.instance_id)
                            .bind(e.at)
                            .bind(&e.state)
                            .bind(e.status_reason)
                            .bind(&e.wuid)
                            .bind(&e.profile_name)
                            .execute(&mut *tx)
                            .await?;
                        }
                    }
                }
                tx.commit().await?;
                Ok(())
            }

            async fn instance_connection(&self, instance_id: &str) -> Result<Option<ConnectionRecord>> {
                let row = sqlx::query(
                    "SELECT state, status_reason, wuid, profile_name, connection_at, qr_at \
                     FROM instance_connections WHERE instance_id = $1",
                )
                .bind(instance_id)
                .fetch_optional(&self.pool)
                .await?;
                row.map(|row| {
                    Ok(ConnectionRecord {
                        state: row.try_get("state")?,
                        status_reason: row.try_get("status_reason")?,
                        wuid: row.try_get("wuid")?,
                        profile_name: row.try_get("profile_name")?,
                        connection_at: row.try_get("connection_at")?,
                        qr_at: row.try_get("qr_at")?,
                    })
                })
                .transpose()
            }

            async fn renew_gateway_leases(
                &self,
                node_id: &str,
                now: i64,
                ttl_ms: i64,
                live_nodes: i64,
            ) -> Result<Vec<String>> {
                let expires_at = now + ttl_ms;
                let mut tx = self.pool.begin().await?;
                // A write first: on SQLite it takes the write lock before anything is read.
                // An expired lease is not renewed: another node may hold it by now. It can
                // only be claimed again below, like any free bot. A lease on a bot no longer
                // eligible is neither renewed nor deleted: its holder may still run the bot
                // until it hears so, so the lease runs out before anyone else may take it.
                let held = sqlx::query(&format!(
                    "UPDATE gateway_leases SET expires_at = $1 WHERE node_id = $2 AND expires_at > $3 \
                     AND instance_id IN (SELECT i.id FROM {GATEWAY_SOURCES} WHERE {GATEWAY_ELIGIBLE})"
                ))
                .bind(expires_at)
                .bind(node_id)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected() as i64;
                let eligible: i64 =
                    sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {GATEWAY_SOURCES} WHERE {GATEWAY_ELIGIBLE}"))
                        .fetch_one(&mut *tx)
                        .await?;
                let nodes = live_nodes.max(1);
                let mut wanted = (eligible + nodes - 1) / nodes - held;
                if wanted > 0 {
                    let candidates: Vec<String> = sqlx::query_scalar(&format!(
                        "SELECT i.id FROM {GATEWAY_SOURCES} LEFT JOIN gateway_leases l ON l.instance_id = i.id \
                         WHERE {GATEWAY_ELIGIBLE} AND (l.instance_id IS NULL OR l.expires_at <= $1) ORDER BY i.id"
                    ))
                    .bind(now)
                    .fetch_all(&mut *tx)
                    .await?;
                    // Every free bot is a candidate, not just `wanted` of them: another control
                    // plane may win the first few, and this node should then take the next.
                    for instance_id in candidates {
                        // Taken only if still free or expired when the row is locked, so of two
                        // control planes claiming it at once, one wins and the other skips it.
                        let claimed = sqlx::query(
                            "INSERT INTO gateway_leases (instance_id, node_id, expires_at, granted_at) \
                             VALUES ($1, $2, $3, $4) ON CONFLICT (instance_id) DO UPDATE SET \
                             node_id = excluded.node_id, expires_at = excluded.expires_at, granted_at = excluded.granted_at \
                             WHERE gateway_leases.expires_at <= $4 RETURNING instance_id",
                        )
                        .bind(&instance_id)
                        .bind(node_id)
                        .bind(expires_at)
                        .bind(now)
                        .fetch_optional(&mut *tx)
                        .await?;
                        if claimed.is_some() {
                            wanted -= 1;
                            if wanted == 0 {
                                break;
                            }
                        }
                    }
                }
                let held: Vec<String> = sqlx::query_scalar(&format!(
                    "SELECT i.id FROM {GATEWAY_SOURCES} JOIN gateway_leases l ON l.instance_id = i.id \
                     WHERE l.node_id = $1 AND l.expires_at > $2 AND {GATEWAY_ELIGIBLE} ORDER BY i.id"
                ))
                .bind(node_id)
                .bind(now)
                .fetch_all(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(held)
            }

            async fn release_gateway_leases(&self, node_id: &str, now: i64) -> Result<u64> {
                let mut tx = self.pool.begin().await?;
                // Ended, not deleted: a claim takes a row with `expires_at <= now` like any
                // expired lease, and the status still shows who ran the bot last. Rows already
                // expired are free already and left as they are.
                let released = sqlx::query(
                    "UPDATE gateway_leases SET expires_at = $1 WHERE node_id = $2 AND expires_at > $1",
                )
                .bind(now)
                .bind(node_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                sqlx::query("UPDATE nodes SET connected = $1 WHERE id = $2")
                    .bind(false)
                    .bind(node_id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(released)
            }

            async fn gateway_status(&self, instance_id: &str) -> Result<Option<GatewayStatusRecord>> {
                let lease = sqlx::query("SELECT node_id, expires_at FROM gateway_leases WHERE instance_id = $1")
                    .bind(instance_id)
                    .fetch_optional(&self.pool)
                    .await?;
                let report = sqlx::query(
                    "SELECT gateway_state, gateway_error, gateway_node_id, gateway_at, gateway_revision \
                     FROM instance_connections \
                     WHERE instance_id = $1 AND gateway_at > 0",
                )
                .bind(instance_id)
                .fetch_optional(&self.pool)
                .await?;
                if lease.is_none() && report.is_none() {
                    return Ok(None);
                }
                let mut status = GatewayStatusRecord::default();
                if let Some(row) = lease {
                    status.lease_node_id = row.try_get("node_id")?;
                    status.lease_expires_at = row.try_get("expires_at")?;
                }
                if let Some(row) = report {
                    status.state = row.try_get("gateway_state")?;
                    status.error = row.try_get("gateway_error")?;
                    status.node_id = row.try_get("gateway_node_id")?;
                    status.at = row.try_get("gateway_at")?;
                    status.revision = row.try_get("gateway_revision")?;
                }
                Ok(Some(status))
            }

            async fn try_lease(&self, name: &str, holder: &str, now: i64, expires_at: i64) -> Result<bool> {
                let held = sqlx::query(
                    "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
                     WHERE leases.holder = excluded.holder OR leases.expires_at < $4 RETURNING holder",
                )
                .bind(name)
                .bind(holder)
                .bind(expires_at)
                .bind(now)
                .fetch_optional(&self.pool)
                .await?;
                Ok(held.is_some())
            }
        }
    };
}

sql_store!(
    PostgresStore,
    sqlx::Postgres,
    Backend::Postgres,
    Some("SELECT pg_notify($1, $2)"),
    Some("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"),
    true,
    "ILIKE",
    "BEGIN",
    " FOR UPDATE",
    false
);
// Trace ingest reads stored stages before it writes them back: on SQLite it takes the write
// lock first, so that no other writer can come between (a read lock cannot be upgraded).
sql_store!(SqliteStore, sqlx::Sqlite, Backend::Sqlite, None, None, false, "LIKE", "BEGIN IMMEDIATE", "", true);

impl PostgresStore {
    pub async fn connect(url: &str, options: StoreOptions) -> Result<Self> {
        let connect_options = PgConnectOptions::from_str(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(connect_options)
            .await?;
        let store = Self::from_pool(pool, options).await?;
        store.listen_for_other_control_planes().await?;
        Ok(store)
    }

    /// Follows commits made through other control planes on the same database.
    async fn listen_for_other_control_planes(&self) -> Result<()> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen_all([CONFIG_NOTIFY_CHANNEL, TRACES_NOTIFY_CHANNEL]).await?;
        let pool = self.pool.clone();
        let revision = self.revision.clone();
        let finished = self.finished.clone();
        let origin = format!("{}:", self.origin);
        tokio::spawn(async move {
            let announce = |seen: i64| {
                revision.send_if_modified(|current| {
                    let newer = seen > *current;
                    if newer {
                        *current = seen;
                    }
                    newer
                })
            };
            loop {
                match listener.try_recv().await {
                    Ok(Some(notification)) if notification.channel() == TRACES_NOTIFY_CHANNEL => {
                        // This store published its own batches when it committed them.
                        if let Some((_, ids)) = notification.payload().split_once(':')
                            && !notification.payload().starts_with(&origin)
                        {
                            let _ = finished.send(ids.split(',').map(str::to_owned).collect());
                        }
                    }
                    Ok(Some(notification)) => {
                        if let Ok(seen) = notification.payload().parse::<i64>() {
                            announce(seen);
                        }
                    }
                    // The connection dropped (and will be re-established): notifications may
                    // have been missed, so catch up from the table.
                    Ok(None) => {
                        if let Ok(head) = sqlx::query_scalar::<_, i64>("SELECT revision FROM config_head WHERE id = 1")
                            .fetch_one(&pool)
                            .await
                        {
                            announce(head);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "config notifications interrupted; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                if revision.is_closed() && revision.receiver_count() == 0 && pool.is_closed() {
                    break;
                }
            }
        });
        Ok(())
    }
}

impl SqliteStore {
    /// Opens (creating if missing) a SQLite database file. In-memory databases are not
    /// supported: every pooled connection would see a different one.
    pub async fn connect(url: &str, options: StoreOptions) -> Result<Self> {
        let connect_options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            // Trace ingest touches index pages all over the file (random trace ids): a larger page
            // cache (16 MiB per connection, filled only as used) and reads through mmap keep it
            // off pread; statement journals stay in memory.
            .pragma("cache_size", "-16384")
            .pragma("mmap_size", "268435456")
            .pragma("temp_store", "memory");
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(connect_options)
            .await?;
        Self::from_pool(pool, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_filters() {
        assert_eq!(scope_filter(&Scope::Admin, "name", 1), ("1 = 1".to_owned(), vec![]));
        assert_eq!(scope_filter(&Scope::Instances(vec![]), "name", 1).0, "1 = 0");
        let (sql, binds) = scope_filter(&Scope::Instances(vec!["acme-*".into(), "solo".into()]), "name", 3);
        assert_eq!(sql, "(name LIKE $3 OR name = $4)");
        assert_eq!(binds, vec!["acme-%".to_owned(), "solo".to_owned()]);
    }

    #[test]
    fn chunks_take_few_shapes() {
        let lengths = |n: usize| ingest_chunks(&vec![0; n], true).map(<[i32]>::len).collect::<Vec<_>>();
        assert_eq!(lengths(0), Vec::<usize>::new());
        assert_eq!(lengths(1), [1]);
        assert_eq!(lengths(7), [4, 2, 1]);
        assert_eq!(lengths(128), [128]);
        assert_eq!(lengths(450), [128, 128, 128, 64, 2]);
        let unshaped = ingest_chunks(&[0; 450], false).map(<[i32]>::len).collect::<Vec<_>>();
        assert_eq!(unshaped, [128, 128, 128, 66]);
    }
}
