//! `omnictl instance ...`

use crate::client::Client;
use crate::output::{self, Format, enum_name, time, time_json};
use crate::trace::ChannelArg;
use clap::{Args, Subcommand, ValueEnum};
use omni_proto::FieldMask;
use omni_proto::v1 as pb;
use serde_json::{Value, json};

#[derive(Debug, Subcommand)]
pub enum InstanceCommand {
    /// Create an instance; prints its webhook path and token once.
    Create {
        name: String,
        #[arg(long, value_enum)]
        channel: ChannelArg,
        /// WhatsApp: create the instance on the Evolution server too (--evolution-key is then its
        /// global key), or point an existing one's webhook at this hub.
        #[arg(long, requires = "public_url")]
        provision: bool,
        /// The hub's public base URL, as Evolution reaches it (with --provision).
        #[arg(long, value_name = "URL")]
        public_url: Option<String>,
        #[command(flatten)]
        settings: Settings,
    },
    /// List instances.
    List {
        #[arg(long, value_enum)]
        channel: Option<ChannelArg>,
    },
    /// Show one instance (secrets only as set / last 4 characters).
    Get { name: String },
    /// Change the given settings of an instance; the rest stay as they are.
    Update {
        name: String,
        #[command(flatten)]
        settings: Settings,
    },
    /// Delete an instance and its access rules.
    Delete {
        name: String,
        /// WhatsApp: delete the instance on the Evolution server too.
        #[arg(long)]
        deprovision: bool,
    },
    /// WhatsApp: the connection state Evolution reports, and the last connection.update.
    /// Discord: the node running the bot, and what its gateway last reported.
    Status { name: String },
    /// WhatsApp: the QR code to link the phone, drawn in the terminal.
    Qr {
        name: String,
        /// Also write Evolution's PNG of the QR code to this file.
        #[arg(long, value_name = "FILE")]
        png: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ProtocolArg {
    Omni,
    Automagik,
    Openai,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ActionArg {
    Allow,
    Block,
}

/// Instance settings. On create, what is not given takes its default; on update, only what is
/// given changes (an empty value clears an optional setting).
#[derive(Debug, Args)]
pub struct Settings {
    /// Base URL of the tenant's agent.
    #[arg(long)]
    agent_url: Option<String>,
    /// Key sent to the agent.
    #[arg(long)]
    agent_key: Option<String>,
    /// Agent (or model) id, as the agent protocol needs it.
    #[arg(long)]
    agent_id: Option<String>,
    #[arg(long, value_enum)]
    agent_protocol: Option<ProtocolArg>,
    /// Seconds an agent call may take, retries included (default 60).
    #[arg(long, value_name = "SECS")]
    agent_timeout: Option<u32>,
    #[arg(long, value_name = "BOOL")]
    agent_stream: Option<bool>,
    /// Evolution API server of this WhatsApp number.
    #[arg(long)]
    evolution_url: Option<String>,
    #[arg(long)]
    evolution_key: Option<String>,
    /// Instance name on the Evolution server (default: the Omni instance name).
    #[arg(long)]
    evolution_instance: Option<String>,
    #[arg(long)]
    discord_token: Option<String>,
    #[arg(long)]
    discord_application_id: Option<String>,
    /// Only answer in these guilds (repeat the flag; DMs are always answered).
    #[arg(long = "discord-guild", value_name = "GUILD_ID")]
    discord_guilds: Option<Vec<String>>,
    #[arg(long)]
    slack_bot_token: Option<String>,
    #[arg(long)]
    slack_signing_secret: Option<String>,
    #[arg(long)]
    slack_bot_user_id: Option<String>,
    /// Longest reply chunk in characters (default: the channel's limit).
    #[arg(long, value_name = "N")]
    split_limit: Option<u32>,
    /// Answer every group message, not only those mentioning the bot.
    #[arg(long, value_name = "BOOL")]
    reply_to_all_group_messages: Option<bool>,
    #[arg(long, value_name = "BOOL")]
    typing_indicator: Option<bool>,
    /// Sent to the user when the agent fails (default: nothing).
    #[arg(long)]
    fallback_text: Option<String>,
    /// Messages older than this on arrival are not answered (default 300).
    #[arg(long, value_name = "SECS")]
    max_message_age: Option<u32>,
    /// What to do with senders no access rule matches (default allow).
    #[arg(long, value_enum)]
    default_access: Option<ActionArg>,
    #[arg(long, value_name = "BOOL")]
    active: Option<bool>,
    /// Require the x-omni-webhook-token header on webhooks (default true).
    #[arg(long, value_name = "BOOL")]
    require_webhook_token: Option<bool>,
    /// Delete this instance's traces this long after they arrive (e.g. 14d; 0: the control
    /// plane's default).
    #[arg(long, value_name = "DURATION", value_parser = omni_core::duration::parse_secs)]
    trace_retention: Option<i64>,
}

impl Settings {
    /// The request message and the field-mask paths of every setting given.
    fn to_message(&self, name: &str) -> (pb::Instance, Vec<String>) {
        let mut paths = Vec::new();
        let mut mark = |given: bool, path: &str| {
            if given {
                paths.push(path.to_owned());
            }
        };
        mark(self.agent_url.is_some(), "agent.url");
        mark(self.agent_key.is_some(), "agent.key");
        mark(self.agent_id.is_some(), "agent.agent_id");
        mark(self.agent_protocol.is_some(), "agent.protocol");
        mark(self.agent_timeout.is_some(), "agent.timeout_seconds");
        mark(self.agent_stream.is_some(), "agent.stream_mode");
        mark(self.evolution_url.is_some(), "evolution.url");
        mark(self.evolution_key.is_some(), "evolution.key");
        mark(self.evolution_instance.is_some(), "evolution.instance_name");
        mark(self.discord_token.is_some(), "discord.token");
        mark(self.discord_application_id.is_some(), "discord.application_id");
        mark(self.discord_guilds.is_some(), "discord.guild_ids");
        mark(self.slack_bot_token.is_some(), "slack.bot_token");
        mark(self.slack_signing_secret.is_some(), "slack.signing_secret");
        mark(self.slack_bot_user_id.is_some(), "slack.bot_user_id");
        mark(self.split_limit.is_some(), "behavior.split_limit");
        mark(self.reply_to_all_group_messages.is_some(), "behavior.reply_to_all_group_messages");
        mark(self.typing_indicator.is_some(), "behavior.typing_indicator");
        mark(self.fallback_text.is_some(), "behavior.fallback_text");
        mark(self.max_message_age.is_some(), "behavior.max_message_age_seconds");
        mark(self.default_access.is_some(), "default_access");
        mark(self.active.is_some(), "active");
        mark(self.require_webhook_token.is_some(), "require_webhook_token");
        mark(self.trace_retention.is_some(), "trace_retention_seconds");

        let text = |v: &Option<String>| v.clone().unwrap_or_default();
        let instance = pb::Instance {
            name: name.to_owned(),
            active: self.active,
            default_access: self.default_access.map_or(0, |a| match a {
                ActionArg::Allow => pb::AccessAction::Allow as i32,
                ActionArg::Block => pb::AccessAction::Block as i32,
            }),
            agent: Some(pb::AgentSettings {
                url: text(&self.agent_url),
                key: text(&self.agent_key),
                agent_id: text(&self.agent_id),
                protocol: self.agent_protocol.map_or(0, |p| match p {
                    ProtocolArg::Omni => pb::AgentProtocol::Omni as i32,
                    ProtocolArg::Automagik => pb::AgentProtocol::Automagik as i32,
                    ProtocolArg::Openai => pb::AgentProtocol::Openai as i32,
                }),
                timeout_seconds: self.agent_timeout.unwrap_or(0),
                stream_mode: self.agent_stream.unwrap_or(false),
                ..Default::default()
            }),
            evolution: Some(pb::EvolutionSettings {
                url: text(&self.evolution_url),
                key: text(&self.evolution_key),
                instance_name: text(&self.evolution_instance),
                ..Default::default()
            }),
            discord: Some(pb::DiscordSettings {
                token: text(&self.discord_token),
                application_id: text(&self.discord_application_id),
                guild_ids: self.discord_guilds.clone().unwrap_or_default(),
                ..Default::default()
            }),
            slack: Some(pb::SlackSettings {
                bot_token: text(&self.slack_bot_token),
                signing_secret: text(&self.slack_signing_secret),
                bot_user_id: text(&self.slack_bot_user_id),
                ..Default::default()
            }),
            behavior: Some(pb::Behavior {
                split_limit: self.split_limit.unwrap_or(0),
                reply_to_all_group_messages: self.reply_to_all_group_messages.unwrap_or(false),
                typing_indicator: self.typing_indicator,
                fallback_text: text(&self.fallback_text),
                max_message_age_seconds: self.max_message_age.unwrap_or(0),
            }),
            require_webhook_token: self.require_webhook_token,
            trace_retention_seconds: self.trace_retention.unwrap_or(0),
            ..Default::default()
        };
        (instance, paths)
    }
}

pub async fn run(command: InstanceCommand, client: &Client, format: Format) -> anyhow::Result<()> {
    let mut api = client.instances();
    match command {
        InstanceCommand::Create { name, channel, provision, public_url, settings } => {
            let (mut instance, _) = settings.to_message(&name);
            instance.channel = channel.to_pb() as i32;
            let created = api
                .create_instance(pb::CreateInstanceRequest {
                    instance: Some(instance),
                    provision,
                    public_url: public_url.unwrap_or_default(),
                })
                .await
                .map_err(|s| client.error(s))?
                .into_inner();
            let instance = created.instance.unwrap_or_default();
            match format {
                Format::Json => output::json(&json!({
                    "instance": instance_json(&instance),
                    "webhook_token": created.webhook_token,
                })),
                Format::Table => {
                    println!("created instance {} (revision {})", instance.name, instance.revision);
                    if instance.webhook_path.is_empty() {
                        println!("no webhook: the hub connects to the channel itself");
                    } else {
                        println!("webhook path:  {}", instance.webhook_path);
                        println!("webhook token: {}", created.webhook_token);
                        println!("(the token is shown only now; send it in the x-omni-webhook-token header)");
                    }
                }
            }
        }
        InstanceCommand::List { channel } => {
            let mut instances = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = api
                    .list_instances(pb::ListInstancesRequest {
                        page_size: 500,
                        page_token,
                        channel: channel.map_or(0, |c| c.to_pb() as i32),
                    })
                    .await
                    .map_err(|s| client.error(s))?
                    .into_inner();
                instances.extend(page.instances);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            match format {
                Format::Json => output::json(&Value::Array(instances.iter().map(instance_json).collect())),
                Format::Table => output::table(
                    &["NAME", "CHANNEL", "ACTIVE", "AGENT URL", "UPDATED"],
                    &instances
                        .iter()
                        .map(|i| {
                            vec![
                                i.name.clone(),
                                channel_name(i.channel),
                                i.active.unwrap_or(false).to_string(),
                                i.agent.as_ref().map(|a| a.url.clone()).unwrap_or_default(),
                                time(i.update_time.as_ref()),
                            ]
                        })
                        .collect::<Vec<_>>(),
                ),
            }
        }
        InstanceCommand::Get { name } => {
            let instance =
                api.get_instance(pb::GetInstanceRequest { name }).await.map_err(|s| client.error(s))?.into_inner();
            print_instance(&instance, format);
        }
        InstanceCommand::Update { name, settings } => {
            let (instance, paths) = settings.to_message(&name);
            if paths.is_empty() {
                anyhow::bail!("nothing to update: give at least one setting flag (see --help)");
            }
            let updated = api
                .update_instance(pb::UpdateInstanceRequest {
                    instance: Some(instance),
                    update_mask: Some(FieldMask { paths }),
                })
                .await
                .map_err(|s| client.error(s))?
                .into_inner();
            print_instance(&updated, format);
        }
        InstanceCommand::Delete { name, deprovision } => {
            api.delete_instance(pb::DeleteInstanceRequest { name: name.clone(), deprovision })
                .await
                .map_err(|s| client.error(s))?;
            match format {
                Format::Json => output::json(&json!({ "deleted": name })),
                Format::Table => println!("deleted instance {name}"),
            }
        }
        InstanceCommand::Status { name } => {
            let status = api
                .get_instance_status(pb::GetInstanceStatusRequest { name })
                .await
                .map_err(|s| client.error(s))?
                .into_inner();
            print_status(&status, format);
        }
        InstanceCommand::Qr { name, png } => {
            let qr = api
                .get_instance_qr(pb::GetInstanceQrRequest { name: name.clone() })
                .await
                .map_err(|s| client.error(s))?
                .into_inner();
            if let Some(path) = &png
                && !qr.already_connected
            {
                use base64::Engine as _;
                let encoded = qr.png_base64.rsplit_once(',').map_or(qr.png_base64.as_str(), |(_, data)| data);
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(encoded.trim())
                    .map_err(|e| anyhow::anyhow!("Evolution's PNG is not base64: {e}"))?;
                std::fs::write(path, bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            }
            match format {
                Format::Json => output::json(&json!({
                    "already_connected": qr.already_connected,
                    "code": qr.code,
                    "pairing_code": qr.pairing_code,
                    "png_file": png.filter(|_| !qr.already_connected).map(|p| p.display().to_string()),
                })),
                Format::Table if qr.already_connected => println!("{name} is already connected: no QR code to scan"),
                Format::Table => {
                    let code = qrcode::QrCode::new(qr.code.as_bytes())
                        .map_err(|e| anyhow::anyhow!("cannot draw the QR code: {e}"))?;
                    let drawn = code
                        .render::<qrcode::render::unicode::Dense1x2>()
                        .dark_color(qrcode::render::unicode::Dense1x2::Light)
                        .light_color(qrcode::render::unicode::Dense1x2::Dark)
                        .build();
                    println!("{drawn}");
                    println!("scan it in WhatsApp: Settings > Linked devices > Link a device");
                    if !qr.pairing_code.is_empty() {
                        println!("or link with the code {}", qr.pairing_code);
                    }
                    if let Some(path) = png {
                        println!("PNG written to {}", path.display());
                    }
                }
            }
        }
    }
    Ok(())
}

fn print_status(status: &pb::InstanceStatus, format: Format) {
    let channel = status.channel;
    let last = status.last_connection.as_ref();
    if format == Format::Json {
        output::json(&json!({
            "name": status.name,
            "channel": channel_name(channel),
            "state": status.state,
            "state_error": status.state_error,
            "last_connection": last.map(|c| json!({
                "state": c.state, "status_reason": c.status_reason, "wuid": c.wuid,
                "profile_name": c.profile_name, "time": time_json(c.time.as_ref()),
            })),
            "last_qr_time": time_json(status.last_qr_time.as_ref()),
            "node_id": status.node_id,
            "lease_expire_time": time_json(status.lease_expire_time.as_ref()),
            "gateway_state": status.gateway_state,
            "gateway_error": status.gateway_error,
            "gateway_node_id": status.gateway_node_id,
            "gateway_time": time_json(status.gateway_time.as_ref()),
        }));
        return;
    }
    let mut rows = vec![("instance", status.name.clone())];
    match pb::Channel::try_from(channel) {
        Ok(pb::Channel::Whatsapp) => whatsapp_rows(status, &mut rows),
        Ok(pb::Channel::Discord) => discord_rows(status, &mut rows),
        _ => rows.push(("channel", format!("{}: no connection to report", channel_name(channel)))),
    }
    output::fields(&rows);
}

fn whatsapp_rows(status: &pb::InstanceStatus, rows: &mut Vec<(&str, String)>) {
    let state =
        if status.state.is_empty() { format!("unknown ({})", status.state_error) } else { status.state.clone() };
    rows.push(("state", state));
    match status.last_connection.as_ref() {
        Some(c) => {
            rows.push((
                "last update",
                format!("{} (reason {}) at {}", c.state, c.status_reason, time(c.time.as_ref())),
            ));
            if !c.wuid.is_empty() {
                rows.push(("phone", format!("{} {}", c.wuid, c.profile_name).trim_end().to_owned()));
            }
        }
        None => rows.push(("last update", "none received".to_owned())),
    }
    if status.last_qr_time.is_some() {
        rows.push(("last QR code", time(status.last_qr_time.as_ref())));
    }
}

fn discord_rows(status: &pb::InstanceStatus, rows: &mut Vec<(&str, String)>) {
    let node = if status.node_id.is_empty() {
        "none (no node holds the bot's lease)".to_owned()
    } else {
        format!("{} (lease until {})", status.node_id, time(status.lease_expire_time.as_ref()))
    };
    rows.push(("node", node));
    let gateway = match status.gateway_state.as_str() {
        "" => "no report yet".to_owned(),
        state => {
            let what = if status.gateway_error.is_empty() {
                state.to_owned()
            } else {
                format!("{state}: {}", status.gateway_error)
            };
            format!("{what} (at {} on node {})", time(status.gateway_time.as_ref()), status.gateway_node_id)
        }
    };
    rows.push(("gateway", gateway));
    // The control plane gives the error only while it keeps the bot down: it was about the
    // instance's current config.
    if !status.gateway_error.is_empty() {
        rows.push(("note", "the bot stays down until the instance is updated (e.g. a new --discord-token)".to_owned()));
    } else if status.gateway_state == "error" {
        rows.push(("note", "that error was about an earlier config: nodes try the updated one".to_owned()));
    }
}

fn channel_name(value: i32) -> String {
    pb::Channel::try_from(value).map_or_else(|_| value.to_string(), |c| enum_name(c.as_str_name(), "CHANNEL_"))
}

fn action_name(value: i32) -> String {
    pb::AccessAction::try_from(value)
        .map_or_else(|_| value.to_string(), |a| enum_name(a.as_str_name(), "ACCESS_ACTION_"))
}

fn protocol_name(value: i32) -> String {
    pb::AgentProtocol::try_from(value)
        .map_or_else(|_| value.to_string(), |p| enum_name(p.as_str_name(), "AGENT_PROTOCOL_"))
}

pub fn access_action_name(value: i32) -> String {
    action_name(value)
}

fn secret(status: Option<&pb::SecretStatus>) -> String {
    match status {
        Some(s) if s.set && !s.last4.is_empty() => format!("set (…{})", s.last4),
        Some(s) if s.set => "set".to_owned(),
        _ => "not set".to_owned(),
    }
}

fn secret_json(status: Option<&pb::SecretStatus>) -> Value {
    let status = status.cloned().unwrap_or_default();
    json!({ "set": status.set, "last4": status.last4 })
}

fn print_instance(i: &pb::Instance, format: Format) {
    if format == Format::Json {
        return output::json(&instance_json(i));
    }
    let agent = i.agent.clone().unwrap_or_default();
    let behavior = i.behavior.clone().unwrap_or_default();
    let mut rows = vec![
        ("name", i.name.clone()),
        ("channel", channel_name(i.channel)),
        ("active", i.active.unwrap_or(false).to_string()),
        ("default access", action_name(i.default_access)),
        ("agent url", agent.url),
        ("agent key", secret(agent.key_status.as_ref())),
        ("agent id", agent.agent_id),
        ("agent protocol", protocol_name(agent.protocol)),
        ("agent timeout", format!("{}s", agent.timeout_seconds)),
    ];
    if let Some(e) = &i.evolution {
        rows.push(("evolution url", e.url.clone()));
        rows.push(("evolution key", secret(e.key_status.as_ref())));
        rows.push(("evolution instance", e.instance_name.clone()));
    }
    if let Some(d) = &i.discord {
        rows.push(("discord token", secret(d.token_status.as_ref())));
        rows.push(("discord application", d.application_id.clone()));
        rows.push(("discord guilds", d.guild_ids.join(",")));
    }
    if let Some(s) = &i.slack {
        rows.push(("slack bot token", secret(s.bot_token_status.as_ref())));
        rows.push(("slack signing secret", secret(s.signing_secret_status.as_ref())));
        rows.push(("slack bot user", s.bot_user_id.clone()));
    }
    rows.extend([
        ("split limit", behavior.split_limit.to_string()),
        ("all group messages", behavior.reply_to_all_group_messages.to_string()),
        ("typing indicator", behavior.typing_indicator.unwrap_or(false).to_string()),
        ("fallback text", behavior.fallback_text),
        ("max message age", format!("{}s", behavior.max_message_age_seconds)),
        ("webhook path", i.webhook_path.clone()),
        ("webhook token required", i.require_webhook_token.unwrap_or(true).to_string()),
        (
            "trace retention",
            match i.trace_retention_seconds {
                0 => "default".to_owned(),
                secs => omni_core::duration::format_secs(secs),
            },
        ),
        ("created", time(i.create_time.as_ref())),
        ("updated", time(i.update_time.as_ref())),
        ("revision", i.revision.to_string()),
    ]);
    output::fields(&rows);
}

pub fn instance_json(i: &pb::Instance) -> Value {
    let agent = i.agent.clone().unwrap_or_default();
    let behavior = i.behavior.clone().unwrap_or_default();
    let mut value = json!({
        "name": i.name,
        "channel": channel_name(i.channel),
        "active": i.active.unwrap_or(false),
        "default_access": action_name(i.default_access),
        "agent": {
            "url": agent.url,
            "key": secret_json(agent.key_status.as_ref()),
            "agent_id": agent.agent_id,
            "protocol": protocol_name(agent.protocol),
            "timeout_seconds": agent.timeout_seconds,
            "stream_mode": agent.stream_mode,
        },
        "behavior": {
            "split_limit": behavior.split_limit,
            "reply_to_all_group_messages": behavior.reply_to_all_group_messages,
            "typing_indicator": behavior.typing_indicator.unwrap_or(false),
            "fallback_text": behavior.fallback_text,
            "max_message_age_seconds": behavior.max_message_age_seconds,
        },
        "require_webhook_token": i.require_webhook_token.unwrap_or(true),
        "trace_retention_seconds": i.trace_retention_seconds,
        "webhook_path": i.webhook_path,
        "create_time": time_json(i.create_time.as_ref()),
        "update_time": time_json(i.update_time.as_ref()),
        "revision": i.revision,
    });
    if let Some(e) = &i.evolution {
        value["evolution"] = json!({
            "url": e.url, "key": secret_json(e.key_status.as_ref()), "instance_name": e.instance_name,
        });
    }
    if let Some(d) = &i.discord {
        value["discord"] = json!({
            "token": secret_json(d.token_status.as_ref()), "application_id": d.application_id, "guild_ids": d.guild_ids,
        });
    }
    if let Some(s) = &i.slack {
        value["slack"] = json!({
            "bot_token": secret_json(s.bot_token_status.as_ref()),
            "signing_secret": secret_json(s.signing_secret_status.as_ref()),
            "bot_user_id": s.bot_user_id,
        });
    }
    value
}
