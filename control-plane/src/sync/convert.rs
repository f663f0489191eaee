//! Stored instance configs → what nodes receive (secrets opened for the authenticated stream).

use crate::api::error::ApiResult;
use crate::api::spec::{Secrets, action_to_pb, behavior_to_pb, channel_to_pb, evolution_instance_key, protocol_to_pb};
use crate::crypto::Keyring;
use crate::store::{InstanceConfig, Sealed};
use omni_proto::v1 as pb;

pub fn instance_config_to_pb(config: &InstanceConfig, keyring: &Keyring) -> ApiResult<pb::InstanceConfig> {
    let instance = &config.instance;
    let spec = &instance.spec;
    let secrets = Secrets { keyring, instance_id: &instance.id };
    let open = |field: &str, sealed: &Option<Sealed>| -> ApiResult<String> {
        sealed.as_ref().map_or(Ok(String::new()), |s| secrets.open(field, s))
    };
    Ok(pb::InstanceConfig {
        id: instance.id.clone(),
        name: instance.name.clone(),
        channel: channel_to_pb(instance.channel) as i32,
        active: instance.active,
        default_access: action_to_pb(spec.default_access) as i32,
        revision: instance.revision,
        agent: Some(pb::NodeAgent {
            url: spec.agent.url.clone(),
            key: open("agent.key", &spec.agent.key)?,
            agent_id: spec.agent.agent_id.clone(),
            protocol: protocol_to_pb(spec.agent.protocol) as i32,
            timeout_seconds: spec.agent.timeout_secs,
            stream_mode: spec.agent.stream_mode,
        }),
        evolution: Some(pb::NodeEvolution {
            url: spec.evolution.url.clone(),
            key: evolution_instance_key(&secrets, &spec.evolution)?.unwrap_or_default(),
            instance_name: spec.evolution.instance_name.clone(),
        }),
        discord: Some(pb::NodeDiscord {
            token: open("discord.token", &spec.discord.token)?,
            application_id: spec.discord.application_id.clone(),
            guild_ids: spec.discord.guild_ids.clone(),
        }),
        slack: Some(pb::NodeSlack {
            bot_token: open("slack.bot_token", &spec.slack.bot_token)?,
            signing_secret: open("slack.signing_secret", &spec.slack.signing_secret)?,
            bot_user_id: spec.slack.bot_user_id.clone(),
        }),
        behavior: Some(behavior_to_pb(&spec.behavior)),
        webhook_token: secrets.open("webhook_token", &spec.webhook_token)?,
        require_webhook_token: spec.require_webhook_token,
        rules: config
            .rules
            .iter()
            .map(|r| pb::NodeAccessRule { id: r.id, pattern: r.pattern.clone(), action: action_to_pb(r.action) as i32 })
            .collect(),
    })
}
