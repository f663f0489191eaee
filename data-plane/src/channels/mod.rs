//! Channels: each turns its platform's payloads into [`Inbound`] messages and sends replies.
//! Everything after that (spool, access, agent, splitting, traces) is one pipeline for all.

pub mod discord;
pub mod evolution;
pub mod ingest;
pub mod slack;

use crate::pipeline::split;
use omni_core::kinds::Channel;
use omni_proto::v1 as pb;
use serde::{Deserialize, Serialize};

/// One inbound message, normalized, as it waits in the spool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inbound {
    /// Also the trace id.
    pub id: String,
    pub instance: String,
    pub instance_id: String,
    /// The channel's id of the message (Evolution: `key.id`; Slack: `ts`; Discord: message id).
    pub external_id: String,
    /// Where replies go: the JID (or channel id) the message came from.
    pub conversation: String,
    /// The thread replies join (Slack: the thread's `ts`); empty where the channel has none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub thread: String,
    /// Who wrote it, as access rules and users know them: a phone number when the channel
    /// reveals one, else the channel's user id.
    pub sender: String,
    pub sender_name: String,
    pub text: String,
    pub message_type: String,
    pub media: Vec<Media>,
    pub is_group: bool,
    /// Unix seconds, as the channel stamped it.
    pub sent_at: i64,
    /// Unix milliseconds, when the hub accepted it.
    pub received_at: i64,
    /// The channel's payload with secrets removed, for the agent and the trace.
    pub raw: RawJson,
}

/// A channel's payload as JSON text: serialized once, when the message is parsed, then copied
/// as it is into the spool, the trace and the agent's request, instead of walked as a tree (and
/// copied as one into the agent's request) for each of them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawJson(Box<serde_json::value::RawValue>);

impl RawJson {
    /// `value` as JSON text; `null` for a value that does not serialize (none of the channels'
    /// payloads, which are JSON to begin with), since a message is not to fail for its payload.
    pub fn new(value: &impl Serialize) -> RawJson {
        let null = || serde_json::value::to_raw_value(&serde_json::Value::Null).expect("null serializes");
        RawJson(serde_json::value::to_raw_value(value).unwrap_or_else(|_| null()))
    }

    pub fn get(&self) -> &str {
        self.0.get()
    }

    pub fn as_raw(&self) -> &serde_json::value::RawValue {
        &self.0
    }

    /// As a tree (to look into it).
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_str(self.get()).expect("raw JSON is valid JSON")
    }
}

impl Default for RawJson {
    fn default() -> RawJson {
        RawJson::new(&serde_json::Value::Null)
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &RawJson) -> bool {
        self.get() == other.get()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Media {
    /// image, video, audio, document, sticker.
    pub kind: String,
    pub mime_type: String,
    /// Where the channel keeps it (may need the channel's decryption).
    pub url: String,
    /// The file itself, when the channel sent it.
    pub base64: Option<String>,
    pub file_name: String,
    pub seconds: Option<u64>,
    pub voice_note: bool,
}

impl Inbound {
    /// Conversations are processed one message at a time, in order; this names one.
    pub fn conversation_key(&self) -> String {
        format!("{}\u{0}{}", self.instance, self.conversation)
    }
}

/// Why a channel's body could not be read (a 400 for webhooks).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParseError {
    #[error("body is not JSON: {0}")]
    Json(String),
    #[error("{0}")]
    Shape(String),
}

/// How a send to a channel went wrong. What matters to callers is whether the message may
/// have gone out: a send whose outcome is unknown is never repeated.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The request never left (or the channel said it did nothing): safe to try again.
    #[error("{0} unreachable: {1}")]
    NotSent(&'static str, String),
    /// It may or may not have been delivered: never resend.
    #[error("no answer from {0}: {1}")]
    Unknown(&'static str, String),
    /// The channel refused it; nothing was delivered.
    #[error("{0} refused the message: {1}")]
    Refused(&'static str, String),
}

impl SendError {
    pub fn retryable(&self) -> bool {
        matches!(self, SendError::NotSent(..))
    }

    pub fn outcome_unknown(&self) -> bool {
        matches!(self, SendError::Unknown(..))
    }

    /// A request to `service` that failed without an answer: never sent if the connection
    /// was never made, else perhaps delivered.
    pub fn without_answer(service: &'static str, error: &reqwest::Error) -> SendError {
        let why = omni_core::errors::root_cause(error);
        if error.is_connect() { SendError::NotSent(service, why) } else { SendError::Unknown(service, why) }
    }
}

/// The channel an instance speaks.
pub fn channel_of(instance: &pb::InstanceConfig) -> pb::Channel {
    pb::Channel::try_from(instance.channel).unwrap_or(pb::Channel::Unspecified)
}

/// The channel as both planes name it (`omni_core::kinds`).
fn kind_of(channel: pb::Channel) -> Option<Channel> {
    match channel {
        pb::Channel::Whatsapp => Some(Channel::Whatsapp),
        pb::Channel::Slack => Some(Channel::Slack),
        pb::Channel::Discord => Some(Channel::Discord),
        pb::Channel::Unspecified => None,
    }
}

pub fn channel_name(channel: pb::Channel) -> &'static str {
    kind_of(channel).map_or("unknown", Channel::as_str)
}

/// The instance's Evolution settings, which a WhatsApp send cannot do without.
fn evolution_of(instance: &pb::InstanceConfig) -> Result<&pb::NodeEvolution, SendError> {
    instance
        .evolution
        .as_ref()
        .ok_or_else(|| SendError::Refused("Evolution", "the instance has no Evolution settings".into()))
}

/// The instance's Slack bot token, which a Slack send cannot do without.
fn slack_token_of(instance: &pb::InstanceConfig) -> Result<&str, SendError> {
    instance
        .slack
        .as_ref()
        .map(|s| s.bot_token.as_str())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| SendError::Refused("Slack", "the instance has no bot token".into()))
}

/// The clients of every channel: one place that sends, splits and shows typing the way the
/// instance's channel wants.
#[derive(Clone)]
pub struct Channels {
    pub evolution: evolution::send::EvolutionClient,
    pub slack: slack::client::SlackClient,
    pub discord: discord::client::DiscordClients,
}

impl Channels {
    /// The reply cut into chunks the channel accepts (Discord keeps code fences balanced).
    pub fn split(&self, instance: &pb::InstanceConfig, text: &str) -> Vec<String> {
        let channel = kind_of(channel_of(instance));
        let most = channel.map_or(4000, Channel::default_split_limit) as usize;
        let limit = instance.behavior.as_ref().map(|b| b.split_limit as usize).filter(|l| *l > 0).unwrap_or(most);
        match channel {
            Some(Channel::Discord) => split::split_code_aware(text, limit.min(most)),
            _ => split::split(text, limit),
        }
    }

    /// Sends one chunk to `to` (a JID or a channel id), in `thread` where the channel has
    /// threads. Returns the channel's id of the message sent.
    pub async fn send_text(
        &self,
        instance: &pb::InstanceConfig,
        to: &str,
        thread: &str,
        text: &str,
    ) -> Result<String, SendError> {
        match channel_of(instance) {
            pb::Channel::Whatsapp => self.evolution.send_text(evolution_of(instance)?, to, text).await,
            pb::Channel::Slack => self.slack.post_message(slack_token_of(instance)?, to, thread, text).await,
            pb::Channel::Discord => self.discord.for_instance(instance)?.send_text(to, text).await,
            pb::Channel::Unspecified => Err(SendError::Refused("channel", "the instance has no channel".into())),
        }
    }

    /// Sends one file with a caption.
    pub async fn send_media(
        &self,
        instance: &pb::InstanceConfig,
        to: &str,
        media: &pb::OutboundMedia,
        caption: &str,
    ) -> Result<String, SendError> {
        match channel_of(instance) {
            pb::Channel::Whatsapp => self.evolution.send_media(evolution_of(instance)?, to, media, caption).await,
            pb::Channel::Slack => self.slack.send_media(slack_token_of(instance)?, to, media, caption).await,
            pb::Channel::Discord => self.discord.for_instance(instance)?.send_media(to, media, caption).await,
            pb::Channel::Unspecified => Err(SendError::Refused("channel", "the instance has no channel".into())),
        }
    }

    /// Shows "typing" in the conversation while the agent works (best effort; the caller
    /// aborts it when the answer is there).
    pub async fn typing(&self, instance: &pb::InstanceConfig, to: &str) {
        match channel_of(instance) {
            pb::Channel::Whatsapp => {
                if let Ok(evolution) = evolution_of(instance) {
                    self.evolution.typing(evolution, to, 15_000).await
                }
            }
            // Discord shows typing for ten seconds per trigger.
            pb::Channel::Discord => {
                if let Ok(client) = self.discord.for_instance(instance) {
                    loop {
                        client.typing(to).await;
                        tokio::time::sleep(std::time::Duration::from_secs(8)).await;
                    }
                }
            }
            // Slack has no typing indicator for bots on the Web API.
            pb::Channel::Slack | pb::Channel::Unspecified => {}
        }
    }
}
