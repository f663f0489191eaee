//! How the API's `Instance` message maps onto the stored [`InstanceSpec`], in both directions,
//! and what makes a spec valid. Create and update share `apply`: a create applies every path,
//! an update the paths of its field mask; either way an unset or zero value means the default.

use super::error::{ApiError, ApiResult};
use crate::crypto::{Keyring, sha256_hex};
use crate::store::{AgentSpec, BehaviorSpec, EvolutionSpec, InstanceRecord, InstanceSpec, Sealed};
use omni_core::access::Action;
use omni_core::kinds::{AgentProtocol, Channel};
use omni_proto::v1 as pb;

/// Every field-mask path an update accepts.
pub const UPDATABLE_PATHS: &[&str] = &[
    "active",
    "default_access",
    "require_webhook_token",
    "trace_retention_seconds",
    "agent.url",
    "agent.key",
    "agent.agent_id",
    "agent.protocol",
    "agent.timeout_seconds",
    "agent.stream_mode",
    "evolution.url",
    "evolution.key",
    "evolution.instance_name",
    "discord.token",
    "discord.application_id",
    "discord.guild_ids",
    "slack.bot_token",
    "slack.signing_secret",
    "slack.bot_user_id",
    "behavior.split_limit",
    "behavior.reply_to_all_group_messages",
    "behavior.typing_indicator",
    "behavior.fallback_text",
    "behavior.max_message_age_seconds",
];

pub const DEFAULT_AGENT_TIMEOUT_SECS: u32 = 60;
pub const MAX_AGENT_TIMEOUT_SECS: u32 = 600;
pub const DEFAULT_MAX_MESSAGE_AGE_SECS: u32 = 300;
const MAX_MESSAGE_AGE_SECS: u32 = 7 * 24 * 3600;
const MAX_FALLBACK_TEXT: usize = 4096;
const MAX_TRACE_RETENTION_SECS: i64 = 10 * 366 * 24 * 3600;
const MAX_SHORT_FIELD: usize = 256;

/// Seals and describes one instance's secrets. The associated data names the instance id and
/// field, so a sealed value is only valid where it was written.
pub struct Secrets<'a> {
    pub keyring: &'a Keyring,
    pub instance_id: &'a str,
}

impl Secrets<'_> {
    fn context(&self, field: &str) -> String {
        format!("instance/{}/{field}", self.instance_id)
    }

    pub fn seal(&self, field: &str, plaintext: &str) -> Option<Sealed> {
        (!plaintext.is_empty()).then(|| Sealed(self.keyring.seal(&self.context(field), plaintext)))
    }

    pub fn open(&self, field: &str, sealed: &Sealed) -> ApiResult<String> {
        Ok(self.keyring.open(&self.context(field), &sealed.0)?)
    }

    /// Whether a secret is set and, for secrets long enough that it gives little away, its
    /// last four characters.
    fn status(&self, field: &str, sealed: &Option<Sealed>) -> Option<pb::SecretStatus> {
        let Some(sealed) = sealed else {
            return Some(pb::SecretStatus { set: false, last4: String::new() });
        };
        let last4 = match self.open(field, sealed) {
            Ok(plain) if plain.chars().count() >= 12 => {
                plain.chars().rev().take(4).collect::<Vec<_>>().into_iter().rev().collect()
            }
            Ok(_) => String::new(),
            Err(e) => {
                tracing::warn!(instance_id = self.instance_id, field, error = %e, "stored secret does not open");
                String::new()
            }
        };
        Some(pb::SecretStatus { set: true, last4 })
    }
}

/// The key for calls about the instance itself (sends, state, QR, deletion): the token
/// Evolution issued it when the hub provisioned it, else the configured key (which may be the
/// server's global key).
pub fn evolution_instance_key(secrets: &Secrets<'_>, evolution: &EvolutionSpec) -> ApiResult<Option<String>> {
    match (&evolution.instance_token, &evolution.key) {
        (Some(token), _) => secrets.open("evolution.instance_token", token).map(Some),
        (None, Some(key)) => secrets.open("evolution.key", key).map(Some),
        (None, None) => Ok(None),
    }
}

/// The fingerprint stored beside an instance's sealed Discord token (`discord_token_sha256`,
/// unique across instances, so one bot serves one instance), from the request that set the
/// token: `None` when the validated `spec` has no token (other channels). The SHA-256 of the
/// trimmed token, unkeyed like API keys' (bot tokens are long random secrets), so it is
/// computed here, where the token is plain, and never needs a token opened again.
pub fn discord_token_sha256(src: &pb::Instance, spec: &InstanceSpec) -> Option<String> {
    spec.discord.token.as_ref()?;
    Some(sha256_hex(src.discord.as_ref().map_or("", |d| d.token.trim())))
}

/// The spec a new instance starts from, before the request's fields are applied.
pub fn default_spec(channel: Channel, webhook_token: Sealed) -> InstanceSpec {
    InstanceSpec {
        default_access: Action::Allow,
        agent: AgentSpec {
            url: String::new(),
            key: None,
            agent_id: String::new(),
            protocol: AgentProtocol::Omni,
            timeout_secs: DEFAULT_AGENT_TIMEOUT_SECS,
            stream_mode: false,
        },
        evolution: Default::default(),
        discord: Default::default(),
        slack: Default::default(),
        behavior: BehaviorSpec {
            split_limit: channel.default_split_limit(),
            reply_to_all_group_messages: false,
            typing_indicator: true,
            fallback_text: String::new(),
            max_message_age_secs: DEFAULT_MAX_MESSAGE_AGE_SECS,
        },
        webhook_token,
        require_webhook_token: true,
        trace_retention_secs: 0,
    }
}

pub fn channel_from_pb(value: i32) -> ApiResult<Channel> {
    match pb::Channel::try_from(value) {
        Ok(pb::Channel::Whatsapp) => Ok(Channel::Whatsapp),
        Ok(pb::Channel::Discord) => Ok(Channel::Discord),
        Ok(pb::Channel::Slack) => Ok(Channel::Slack),
        _ => Err(ApiError::invalid("channel is required: whatsapp, discord or slack")),
    }
}

pub fn channel_to_pb(channel: Channel) -> pb::Channel {
    match channel {
        Channel::Whatsapp => pb::Channel::Whatsapp,
        Channel::Discord => pb::Channel::Discord,
        Channel::Slack => pb::Channel::Slack,
    }
}

/// An access action; `UNSPECIFIED` gives `None`.
pub fn action_from_pb(value: i32) -> ApiResult<Option<Action>> {
    match pb::AccessAction::try_from(value) {
        Ok(pb::AccessAction::Unspecified) => Ok(None),
        Ok(pb::AccessAction::Allow) => Ok(Some(Action::Allow)),
        Ok(pb::AccessAction::Block) => Ok(Some(Action::Block)),
        Err(_) => Err(ApiError::invalid(format!("unknown access action {value}"))),
    }
}

pub fn action_to_pb(action: Action) -> pb::AccessAction {
    match action {
        Action::Allow => pb::AccessAction::Allow,
        Action::Block => pb::AccessAction::Block,
    }
}

fn protocol_from_pb(value: i32) -> ApiResult<AgentProtocol> {
    match pb::AgentProtocol::try_from(value) {
        Ok(pb::AgentProtocol::Unspecified | pb::AgentProtocol::Omni) => Ok(AgentProtocol::Omni),
        Ok(pb::AgentProtocol::Automagik) => Ok(AgentProtocol::Automagik),
        Ok(pb::AgentProtocol::Openai) => Ok(AgentProtocol::Openai),
        Err(_) => Err(ApiError::invalid(format!("unknown agent protocol {value}"))),
    }
}

pub fn protocol_to_pb(protocol: AgentProtocol) -> pb::AgentProtocol {
    match protocol {
        AgentProtocol::Omni => pb::AgentProtocol::Omni,
        AgentProtocol::Automagik => pb::AgentProtocol::Automagik,
        AgentProtocol::Openai => pb::AgentProtocol::Openai,
    }
}

/// Expands a mask path naming a whole settings group ("agent") into its fields.
pub fn expand_path(path: &str) -> ApiResult<Vec<&'static str>> {
    if let Some(known) = UPDATABLE_PATHS.iter().find(|p| **p == path) {
        return Ok(vec![known]);
    }
    let group: Vec<&'static str> = UPDATABLE_PATHS
        .iter()
        .copied()
        .filter(|p| p.strip_prefix(path).is_some_and(|rest| rest.starts_with('.')))
        .collect();
    if !group.is_empty() {
        return Ok(group);
    }
    Err(match path {
        "name" | "channel" => ApiError::invalid(format!("{path} cannot be changed: create a new instance instead")),
        "webhook_path" | "create_time" | "update_time" | "revision" => {
            ApiError::invalid(format!("{path} is output only"))
        }
        _ => ApiError::invalid(format!("unknown field {path:?} in update_mask")),
    })
}

/// Copies the field at `path` from the request message into `spec` (and `active`).
pub fn apply(
    path: &str,
    src: &pb::Instance,
    channel: Channel,
    active: &mut bool,
    spec: &mut InstanceSpec,
    secrets: &Secrets<'_>,
) -> ApiResult<()> {
    let agent = src.agent.clone().unwrap_or_default();
    let evolution = src.evolution.clone().unwrap_or_default();
    let discord = src.discord.clone().unwrap_or_default();
    let slack = src.slack.clone().unwrap_or_default();
    let behavior = src.behavior.clone().unwrap_or_default();
    match path {
        "active" => *active = src.active.unwrap_or(true),
        "default_access" => spec.default_access = action_from_pb(src.default_access)?.unwrap_or(Action::Allow),
        "require_webhook_token" => spec.require_webhook_token = src.require_webhook_token.unwrap_or(true),
        "trace_retention_seconds" => spec.trace_retention_secs = src.trace_retention_seconds,
        "agent.url" => spec.agent.url = agent.url.trim().to_owned(),
        "agent.key" => spec.agent.key = secrets.seal(path, &agent.key),
        "agent.agent_id" => spec.agent.agent_id = agent.agent_id.trim().to_owned(),
        "agent.protocol" => spec.agent.protocol = protocol_from_pb(agent.protocol)?,
        "agent.timeout_seconds" => {
            spec.agent.timeout_secs = nonzero_or(agent.timeout_seconds, DEFAULT_AGENT_TIMEOUT_SECS)
        }
        "agent.stream_mode" => spec.agent.stream_mode = agent.stream_mode,
        "evolution.url" => spec.evolution.url = evolution.url.trim().to_owned(),
        "evolution.key" => spec.evolution.key = secrets.seal(path, &evolution.key),
        "evolution.instance_name" => spec.evolution.instance_name = evolution.instance_name.trim().to_owned(),
        // Trimmed, as its fingerprint is: the stored token and the one checked for reuse agree.
        "discord.token" => spec.discord.token = secrets.seal(path, discord.token.trim()),
        "discord.application_id" => spec.discord.application_id = discord.application_id.trim().to_owned(),
        "discord.guild_ids" => spec.discord.guild_ids = discord.guild_ids.iter().map(|g| g.trim().to_owned()).collect(),
        "slack.bot_token" => spec.slack.bot_token = secrets.seal(path, &slack.bot_token),
        "slack.signing_secret" => spec.slack.signing_secret = secrets.seal(path, &slack.signing_secret),
        "slack.bot_user_id" => spec.slack.bot_user_id = slack.bot_user_id.trim().to_owned(),
        "behavior.split_limit" => {
            spec.behavior.split_limit = nonzero_or(behavior.split_limit, channel.default_split_limit())
        }
        "behavior.reply_to_all_group_messages" => {
            spec.behavior.reply_to_all_group_messages = behavior.reply_to_all_group_messages
        }
        "behavior.typing_indicator" => spec.behavior.typing_indicator = behavior.typing_indicator.unwrap_or(true),
        "behavior.fallback_text" => spec.behavior.fallback_text = behavior.fallback_text,
        "behavior.max_message_age_seconds" => {
            spec.behavior.max_message_age_secs =
                nonzero_or(behavior.max_message_age_seconds, DEFAULT_MAX_MESSAGE_AGE_SECS)
        }
        other => return Err(ApiError::invalid(format!("unknown field {other:?}"))),
    }
    Ok(())
}

fn nonzero_or(value: u32, default: u32) -> u32 {
    if value == 0 { default } else { value }
}

/// The largest reply chunk each platform accepts.
fn max_split_limit(channel: Channel) -> u32 {
    match channel {
        Channel::Whatsapp => 65_536,
        Channel::Slack => 40_000,
        Channel::Discord => 2_000,
    }
}

pub fn validate_http_url(field: &str, value: &str) -> ApiResult<()> {
    if value.is_empty() {
        return Err(ApiError::invalid(format!("{field} is required")));
    }
    let uri: http::Uri =
        value.parse().map_err(|_| ApiError::invalid(format!("{field} {value:?} is not a valid URL")))?;
    // Credentials in a URL would be shown wherever the URL is (answers, errors, logs); the
    // value is not quoted back for the same reason.
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(ApiError::invalid(format!(
            "{field} must not carry credentials (user:password@); use the key setting"
        )));
    }
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    let host_ok = uri.host().is_some_and(|h| !h.is_empty());
    if !scheme_ok || !host_ok || uri.query().is_some() {
        return Err(ApiError::invalid(format!(
            "{field} {value:?} must be an http:// or https:// URL with a host and no query"
        )));
    }
    Ok(())
}

fn check_len(field: &str, value: &str, max: usize) -> ApiResult<()> {
    if value.chars().count() > max {
        return Err(ApiError::invalid(format!("{field} is longer than {max} characters")));
    }
    Ok(())
}

/// A stored key goes only where it went before: an update that points the agent or Evolution
/// settings somewhere else (URL, or Evolution instance) must give the key again, or the key
/// of whoever set it up would be sent to the new place.
pub fn check_keys_follow_targets(before: &InstanceSpec, after: &InstanceSpec, paths: &[&str]) -> ApiResult<()> {
    let given = |path: &str| paths.contains(&path);
    if after.agent.key.is_some() && before.agent.url != after.agent.url && !given("agent.key") {
        return Err(ApiError::invalid("changing the agent URL needs the agent key again (--agent-key)"));
    }
    let evolution_moved =
        before.evolution.url != after.evolution.url || before.evolution.instance_name != after.evolution.instance_name;
    if after.evolution.key.is_some() && evolution_moved && !given("evolution.key") {
        return Err(ApiError::invalid(
            "changing the Evolution URL or instance needs the Evolution key again (--evolution-key)",
        ));
    }
    Ok(())
}

/// Fills defaults that depend on the instance name, then checks that the spec is complete and
/// consistent for its channel.
pub fn normalize_and_validate(name: &str, channel: Channel, spec: &mut InstanceSpec) -> ApiResult<()> {
    validate_http_url("agent url", &spec.agent.url)?;
    check_len("agent id", &spec.agent.agent_id, MAX_SHORT_FIELD)?;
    if spec.agent.agent_id.is_empty() && spec.agent.protocol != AgentProtocol::Omni {
        return Err(ApiError::invalid(format!(
            "agent id is required with the {} protocol (it names the agent or model)",
            spec.agent.protocol
        )));
    }
    if spec.agent.timeout_secs > MAX_AGENT_TIMEOUT_SECS {
        return Err(ApiError::invalid(format!("agent timeout must be at most {MAX_AGENT_TIMEOUT_SECS} seconds")));
    }
    let max_split = max_split_limit(channel);
    if spec.behavior.split_limit > max_split {
        return Err(ApiError::invalid(format!("split limit must be at most {max_split} characters for {channel}")));
    }
    if spec.behavior.max_message_age_secs > MAX_MESSAGE_AGE_SECS {
        return Err(ApiError::invalid(format!("max message age must be at most {MAX_MESSAGE_AGE_SECS} seconds")));
    }
    check_len("fallback text", &spec.behavior.fallback_text, MAX_FALLBACK_TEXT)?;
    if !(0..=MAX_TRACE_RETENTION_SECS).contains(&spec.trace_retention_secs) {
        return Err(ApiError::invalid("trace retention must be between 0 (the default) and 10 years"));
    }

    let has_evolution = !spec.evolution.url.is_empty() || spec.evolution.key.is_some();
    let has_discord = spec.discord.token.is_some() || !spec.discord.application_id.is_empty();
    let has_slack = spec.slack.bot_token.is_some() || spec.slack.signing_secret.is_some();
    let foreign = match channel {
        Channel::Whatsapp => (has_discord || has_slack).then_some("discord/slack"),
        Channel::Discord => (has_evolution || has_slack).then_some("evolution/slack"),
        Channel::Slack => (has_evolution || has_discord).then_some("evolution/discord"),
    };
    if let Some(other) = foreign {
        return Err(ApiError::invalid(format!("{other} settings do not apply to a {channel} instance")));
    }
    match channel {
        Channel::Whatsapp => {
            validate_http_url("evolution url", &spec.evolution.url)?;
            if spec.evolution.key.is_none() {
                return Err(ApiError::invalid("evolution key is required for a whatsapp instance"));
            }
            if spec.evolution.instance_name.is_empty() {
                spec.evolution.instance_name = name.to_owned();
            }
            check_len("evolution instance name", &spec.evolution.instance_name, MAX_SHORT_FIELD)?;
            // It goes into Evolution's URL paths as is.
            let name_ok =
                spec.evolution.instance_name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !name_ok || spec.evolution.instance_name.starts_with('.') {
                return Err(ApiError::invalid(
                    "evolution instance name may only hold letters, digits, '-', '_' and '.' (not first)",
                ));
            }
        }
        Channel::Discord => {
            if spec.discord.token.is_none() {
                return Err(ApiError::invalid("discord token is required for a discord instance"));
            }
            let snowflake = |s: &String| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
            if !spec.discord.application_id.is_empty() && !snowflake(&spec.discord.application_id) {
                return Err(ApiError::invalid("discord application id must be a numeric id"));
            }
            if let Some(bad) = spec.discord.guild_ids.iter().find(|g| !snowflake(g)) {
                return Err(ApiError::invalid(format!("discord guild id {bad:?} must be a numeric id")));
            }
        }
        Channel::Slack => {
            if spec.slack.bot_token.is_none() || spec.slack.signing_secret.is_none() {
                return Err(ApiError::invalid("slack bot token and signing secret are required for a slack instance"));
            }
            check_len("slack bot user id", &spec.slack.bot_user_id, MAX_SHORT_FIELD)?;
        }
    }
    Ok(())
}

pub fn timestamp(millis: i64) -> omni_proto::Timestamp {
    omni_proto::Timestamp { seconds: millis.div_euclid(1000), nanos: (millis.rem_euclid(1000) * 1_000_000) as i32 }
}

pub fn webhook_path(channel: Channel, name: &str) -> String {
    match channel {
        Channel::Whatsapp => format!("/webhook/evolution/{name}"),
        Channel::Slack => format!("/webhook/slack/{name}"),
        // Discord is a gateway connection the hub opens; nothing calls in.
        Channel::Discord => String::new(),
    }
}

pub fn behavior_to_pb(behavior: &BehaviorSpec) -> pb::Behavior {
    pb::Behavior {
        split_limit: behavior.split_limit,
        reply_to_all_group_messages: behavior.reply_to_all_group_messages,
        typing_indicator: Some(behavior.typing_indicator),
        fallback_text: behavior.fallback_text.clone(),
        max_message_age_seconds: behavior.max_message_age_secs,
    }
}

/// The API view of a stored instance: secrets only as set/last-4.
pub fn instance_to_pb(record: &InstanceRecord, keyring: &Keyring) -> pb::Instance {
    let secrets = Secrets { keyring, instance_id: &record.id };
    let spec = &record.spec;
    let (evolution, discord, slack) = match record.channel {
        Channel::Whatsapp => (
            Some(pb::EvolutionSettings {
                url: spec.evolution.url.clone(),
                key: String::new(),
                key_status: secrets.status("evolution.key", &spec.evolution.key),
                instance_name: spec.evolution.instance_name.clone(),
            }),
            None,
            None,
        ),
        Channel::Discord => (
            None,
            Some(pb::DiscordSettings {
                token: String::new(),
                token_status: secrets.status("discord.token", &spec.discord.token),
                application_id: spec.discord.application_id.clone(),
                guild_ids: spec.discord.guild_ids.clone(),
            }),
            None,
        ),
        Channel::Slack => (
            None,
            None,
            Some(pb::SlackSettings {
                bot_token: String::new(),
                bot_token_status: secrets.status("slack.bot_token", &spec.slack.bot_token),
                signing_secret: String::new(),
                signing_secret_status: secrets.status("slack.signing_secret", &spec.slack.signing_secret),
                bot_user_id: spec.slack.bot_user_id.clone(),
            }),
        ),
    };
    pb::Instance {
        name: record.name.clone(),
        channel: channel_to_pb(record.channel) as i32,
        active: Some(record.active),
        default_access: action_to_pb(spec.default_access) as i32,
        agent: Some(pb::AgentSettings {
            url: spec.agent.url.clone(),
            key: String::new(),
            key_status: secrets.status("agent.key", &spec.agent.key),
            agent_id: spec.agent.agent_id.clone(),
            protocol: protocol_to_pb(spec.agent.protocol) as i32,
            timeout_seconds: spec.agent.timeout_secs,
            stream_mode: spec.agent.stream_mode,
        }),
        evolution,
        discord,
        slack,
        behavior: Some(behavior_to_pb(&spec.behavior)),
        require_webhook_token: Some(spec.require_webhook_token),
        trace_retention_seconds: spec.trace_retention_secs,
        webhook_path: webhook_path(record.channel, &record.name),
        create_time: Some(timestamp(record.created_at)),
        update_time: Some(timestamp(record.updated_at)),
        revision: record.revision,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_paths_expand() {
        assert_eq!(expand_path("agent.url").unwrap(), vec!["agent.url"]);
        assert_eq!(expand_path("slack").unwrap(), vec!["slack.bot_token", "slack.signing_secret", "slack.bot_user_id"]);
        assert!(expand_path("name").unwrap_err().to_string().contains("cannot be changed"));
        assert!(expand_path("revision").unwrap_err().to_string().contains("output only"));
        assert!(expand_path("agent.urls").unwrap_err().to_string().contains("unknown field"));
        assert!(expand_path("agen").is_err());
    }

    #[test]
    fn urls() {
        assert!(validate_http_url("u", "http://127.0.0.1:9000").is_ok());
        assert!(validate_http_url("u", "https://agent.example.com/base").is_ok());
        for bad in ["", "ftp://x", "127.0.0.1:9000", "http://", "not a url", "http://h/?q=1"] {
            assert!(validate_http_url("u", bad).is_err(), "{bad}");
        }
    }

    /// What `InstanceApi::create` does with a request: every path applied to the defaults.
    fn create(channel: Channel, src: pb::Instance) -> ApiResult<InstanceSpec> {
        let keyring = Keyring::parse(&Keyring::generate_encoded()).unwrap();
        let secrets = Secrets { keyring: &keyring, instance_id: "i1" };
        let mut spec = default_spec(channel, secrets.seal("webhook_token", "t").unwrap());
        let mut active = true;
        for path in UPDATABLE_PATHS {
            apply(path, &src, channel, &mut active, &mut spec, &secrets)?;
        }
        normalize_and_validate("acme", channel, &mut spec)?;
        Ok(spec)
    }

    #[test]
    fn created_instances_get_their_channel_defaults_and_need_their_secrets() {
        let base = pb::Instance {
            agent: Some(pb::AgentSettings { url: "http://agent:1".into(), ..Default::default() }),
            behavior: Some(pb::Behavior { split_limit: 0, ..Default::default() }),
            ..Default::default()
        };
        let discord = pb::Instance {
            discord: Some(pb::DiscordSettings { token: "bot-token".into(), ..Default::default() }),
            ..base.clone()
        };
        let slack = pb::Instance {
            slack: Some(pb::SlackSettings {
                bot_token: "xoxb-1".into(),
                signing_secret: "s".into(),
                ..Default::default()
            }),
            ..base.clone()
        };
        let whatsapp = pb::Instance {
            evolution: Some(pb::EvolutionSettings {
                url: "http://evo:8080".into(),
                key: "k".into(),
                ..Default::default()
            }),
            ..base.clone()
        };
        assert_eq!(create(Channel::Discord, discord).unwrap().behavior.split_limit, 2000);
        assert_eq!(create(Channel::Slack, slack.clone()).unwrap().behavior.split_limit, 4000);
        assert_eq!(create(Channel::Whatsapp, whatsapp).unwrap().behavior.split_limit, 4000);

        let no_token = create(Channel::Discord, base.clone()).unwrap_err();
        assert!(matches!(no_token, ApiError::InvalidArgument(_)), "{no_token:?}");
        assert!(no_token.to_string().contains("discord token is required"), "{no_token}");
        let mut no_secret = slack;
        no_secret.slack.as_mut().unwrap().signing_secret.clear();
        let no_secret = create(Channel::Slack, no_secret).unwrap_err();
        assert!(matches!(no_secret, ApiError::InvalidArgument(_)), "{no_secret:?}");
        assert!(no_secret.to_string().contains("signing secret are required"), "{no_secret}");
    }

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(1_500), omni_proto::Timestamp { seconds: 1, nanos: 500_000_000 });
        assert_eq!(timestamp(-1), omni_proto::Timestamp { seconds: -1, nanos: 999_000_000 });
    }
}
