//! What the store keeps. Secrets appear here only sealed (see `crate::crypto`).

use omni_core::access::Action;
use omni_core::kinds::{AgentProtocol, Channel};
use omni_core::names::pattern_matches;
use serde::{Deserialize, Serialize};

/// Which instances a caller may see and change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Admin,
    /// Instance-name patterns: exact names or prefixes ending in `*`.
    Instances(Vec<String>),
}

impl Scope {
    pub fn covers(&self, instance: &str) -> bool {
        match self {
            Scope::Admin => true,
            Scope::Instances(patterns) => patterns.iter().any(|p| pattern_matches(p, instance)),
        }
    }

    pub fn is_admin(&self) -> bool {
        matches!(self, Scope::Admin)
    }
}

/// A secret as stored: the output of `Keyring::seal`, never plaintext.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Sealed(pub String);

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealed(..)")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub id: String,
    pub name: String,
    pub channel: Channel,
    pub active: bool,
    pub spec: InstanceSpec,
    /// Unix milliseconds.
    pub created_at: i64,
    pub updated_at: i64,
    /// The config revision that last changed the instance or its access rules.
    pub revision: i64,
    /// A Discord instance's bot token fingerprint: the lowercase hex SHA-256 of the trimmed
    /// token, `None` for other channels. Unique across instances (the store refuses a second
    /// one with [`StoreError::DiscordTokenInUse`](super::StoreError::DiscordTokenInUse)), so
    /// one bot serves one instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discord_token_sha256: Option<String>,
}

/// Everything configurable about an instance apart from its identity, stored as one JSON
/// document so that settings can grow without a migration per field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceSpec {
    pub default_access: Action,
    pub agent: AgentSpec,
    #[serde(default)]
    pub evolution: EvolutionSpec,
    #[serde(default)]
    pub discord: DiscordSpec,
    #[serde(default)]
    pub slack: SlackSpec,
    pub behavior: BehaviorSpec,
    pub webhook_token: Sealed,
    pub require_webhook_token: bool,
    /// Seconds traces are kept; 0 means the control plane's default.
    #[serde(default)]
    pub trace_retention_secs: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentSpec {
    pub url: String,
    pub key: Option<Sealed>,
    pub agent_id: String,
    pub protocol: AgentProtocol,
    pub timeout_secs: u32,
    pub stream_mode: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvolutionSpec {
    pub url: String,
    pub key: Option<Sealed>,
    pub instance_name: String,
    /// The instance's own token, as Evolution issued it when the hub provisioned the instance.
    #[serde(default)]
    pub instance_token: Option<Sealed>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiscordSpec {
    pub token: Option<Sealed>,
    pub application_id: String,
    pub guild_ids: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SlackSpec {
    pub bot_token: Option<Sealed>,
    pub signing_secret: Option<Sealed>,
    pub bot_user_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BehaviorSpec {
    pub split_limit: u32,
    pub reply_to_all_group_messages: bool,
    pub typing_indicator: bool,
    pub fallback_text: String,
    pub max_message_age_secs: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessRuleRecord {
    pub id: i64,
    pub instance: String,
    pub pattern: String,
    pub action: Action,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApiKeyRecord {
    /// Public part of the key, shown in listings and used to revoke it.
    pub id: String,
    /// SHA-256 of the whole key, hex.
    pub key_hash: String,
    pub scope: Scope,
    pub description: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// One entry of the config change log: what a revision changed.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigChange {
    pub revision: i64,
    pub kind: String,
    pub key: String,
    pub op: ChangeOp,
    /// For upserts, the whole resource as JSON (secrets still sealed).
    pub payload: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeOp {
    Upsert,
    Delete,
}

impl ChangeOp {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeOp::Upsert => "upsert",
            ChangeOp::Delete => "delete",
        }
    }
}

/// The unit of config distributed to data-plane nodes: an instance with its access rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceConfig {
    pub instance: InstanceRecord,
    pub rules: Vec<AccessRuleRecord>,
}

/// The change-log kind of [`InstanceConfig`] resources.
pub const KIND_INSTANCE: &str = "instance";

#[derive(Debug, Clone, Default)]
pub struct ListInstances {
    /// Names strictly after this one (the page token).
    pub after: Option<String>,
    pub limit: u32,
    pub channel: Option<Channel>,
}

/// Where the config change log stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogBounds {
    /// The latest committed revision.
    pub head: i64,
    /// Entries at or below this revision were deleted; resuming from here needs a snapshot.
    pub compacted: i64,
}

/// A data-plane node as the registry knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRecord {
    pub id: String,
    pub address: String,
    pub version: String,
    pub applied_revision: i64,
    pub first_seen_at: i64,
    pub last_seen_at: i64,
    pub connected: bool,
    pub last_error: String,
}

/// Tuning of a store.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// How many revisions of the change log to keep for resuming nodes.
    pub change_log_retention: i64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { change_log_retention: 10_000 }
    }
}

/// A trace as listed: the message and where it stands.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TraceRecord {
    pub id: String,
    /// The instance's name (traces are stored against its id).
    pub instance: String,
    pub channel: String,
    pub external_id: String,
    pub conversation_id: String,
    pub sender: String,
    pub sender_name: String,
    pub user_id: String,
    pub message_type: String,
    pub text: String,
    pub status: String,
    pub error_stage: String,
    pub error: String,
    pub received_at: i64,
    pub updated_at: i64,
    pub agent_ms: i64,
    pub node_id: String,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct TraceStageRecord {
    pub seq: i64,
    pub stage: String,
    pub at: i64,
    pub duration_ms: i64,
    pub detail: String,
    pub payload: String,
}

/// One reported stage. The first stage of a trace (seq 0) carries its header.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TraceEventRecord {
    pub trace_id: String,
    pub seq: i64,
    pub instance_id: String,
    pub stage: String,
    pub at: i64,
    pub status: String,
    pub detail: String,
    pub duration_ms: i64,
    pub payload: String,
    pub error: String,
    pub agent_ms: i64,
    pub header: Option<TraceHeaderRecord>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct TraceHeaderRecord {
    pub channel: String,
    pub external_id: String,
    pub conversation_id: String,
    pub sender: String,
    pub sender_name: String,
    pub user_id: String,
    pub message_type: String,
    pub text: String,
    pub received_at: i64,
}

/// Which traces to list, count or delete. Unset filters match everything.
#[derive(Debug, Clone, Default)]
pub struct TraceFilter {
    pub instance: Option<String>,
    pub status: Option<String>,
    pub channel: Option<String>,
    pub sender: Option<String>,
    /// Received at or after (unix ms).
    pub since: Option<i64>,
    /// Received before (unix ms).
    pub until: Option<i64>,
    /// Message text containing this, case-insensitively.
    pub text_contains: Option<String>,
}

/// Where a page of traces ends: the last trace listed, in list order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceCursor {
    pub received_at: i64,
    pub id: String,
}

#[derive(Debug, Clone, Default)]
pub struct TraceQuery {
    pub filter: TraceFilter,
    /// Traces after this one in list order (newest first).
    pub after: Option<TraceCursor>,
    pub limit: u32,
}

/// Milliseconds over the traces that have the measure.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LatencyStats {
    pub samples: i64,
    pub avg_ms: i64,
    pub p50_ms: i64,
    pub p95_ms: i64,
    pub p99_ms: i64,
    pub max_ms: i64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TraceStatsRecord {
    pub total: i64,
    pub by_status: Vec<(String, i64)>,
    pub by_error_stage: Vec<(String, i64)>,
    pub by_message_type: Vec<(String, i64)>,
    pub by_instance: Vec<(String, i64)>,
    pub agent_latency: LatencyStats,
    pub total_latency: LatencyStats,
    /// (start of the hour in unix ms, messages received in it), oldest first.
    pub per_hour: Vec<(i64, i64)>,
}

#[derive(Debug, Clone, Default)]
pub struct UserQuery {
    pub instance: String,
    /// Identity or display name containing this, case-insensitively.
    pub search: Option<String>,
    /// Users after this one in list order: (last seen, identity).
    pub after: Option<(i64, String)>,
    pub limit: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UserRecord {
    pub id: String,
    pub instance: String,
    pub identity: String,
    pub display_name: String,
    pub first_seen_at: i64,
    pub last_seen_at: i64,
    pub message_count: i64,
}

/// A channel connection event a node reported.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct InstanceEventRecord {
    pub instance_id: String,
    /// `connection` or `qrcode` (Evolution), or `gateway` (a Discord bot's gateway).
    pub kind: String,
    pub state: String,
    pub status_reason: i64,
    pub wuid: String,
    pub profile_name: String,
    /// When it happened; for `gateway`, when the control plane received it (nodes' clocks
    /// are not compared).
    pub at: i64,
    /// `gateway`: why the state is `error`.
    pub detail: String,
    /// `gateway`: the instance's config revision the gateway ran with.
    pub revision: i64,
    /// The node that reported it.
    pub node_id: String,
}

/// The latest connection events of an instance.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConnectionRecord {
    pub state: String,
    pub status_reason: i64,
    pub wuid: String,
    pub profile_name: String,
    /// When the last connection.update arrived (0: never).
    pub connection_at: i64,
    /// When the last qrcode.updated arrived (0: never).
    pub qr_at: i64,
}

/// Where a Discord bot runs and what its gateway last reported.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GatewayStatusRecord {
    /// The node holding the lease (empty: none), and when it ends unless renewed (0: none).
    /// A lease that has expired is still shown: nobody may have taken it since.
    pub lease_node_id: String,
    pub lease_expires_at: i64,
    /// The last report: connecting, ready, error or closed (empty: none).
    pub state: String,
    /// With state `error`: the fatal reason.
    pub error: String,
    pub node_id: String,
    /// When the control plane received it (0: never).
    pub at: i64,
    /// The instance's config revision the reporting gateway ran with.
    pub revision: i64,
}
