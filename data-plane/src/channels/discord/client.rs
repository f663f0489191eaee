//! Discord's REST API through twilight-http: one client per bot, so each bot's rate-limit
//! buckets are shared by all its sends (twilight waits on them and retries 429s itself).

use crate::channels::SendError;
use crate::config::ConfigHandle;
use omni_proto::v1 as pb;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use twilight_http::error::ErrorType;
use twilight_model::http::attachment::Attachment;
use twilight_model::id::Id;
use twilight_model::id::marker::ChannelMarker;

const SERVICE: &str = "Discord";
/// Each request to Discord, up to its answer's headers (twilight's own timeout).
const TIMEOUT: Duration = Duration::from_secs(30);
/// A whole send: rate-limit waits, the request and its answer's body.
const SEND_BUDGET: Duration = Duration::from_secs(90);

/// Where the REST API is: twilight takes a host and whether to speak plain HTTP.
#[derive(Clone, Debug, Default)]
struct Proxy(Option<(String, bool)>);

/// The REST clients of the bots this node sends for, made on first use and replaced when a
/// bot's token changes.
#[derive(Clone)]
pub struct DiscordClients {
    proxy: Proxy,
    bots: Arc<Mutex<Bots>>,
}

/// Per instance id: the token its client was made with, and the client.
type Bots = HashMap<String, (String, Arc<DiscordBot>)>;

pub struct DiscordBot {
    http: twilight_http::Client,
}

impl DiscordClients {
    pub const DEFAULT_API_URL: &str = "https://discord.com";

    /// `api_url` is `https://discord.com` unless pointed elsewhere; `http://` means plain HTTP.
    pub fn new(api_url: &str) -> DiscordClients {
        let trimmed = api_url.trim_end_matches('/');
        let proxy = match trimmed.split_once("://") {
            _ if trimmed == Self::DEFAULT_API_URL => None,
            Some(("http", host)) => Some((host.to_owned(), true)),
            Some((_, host)) => Some((host.to_owned(), false)),
            None => Some((trimmed.to_owned(), false)),
        };
        DiscordClients { proxy: Proxy(proxy), bots: Arc::default() }
    }

    pub fn for_instance(&self, instance: &pb::InstanceConfig) -> Result<Arc<DiscordBot>, SendError> {
        let token = instance.discord.as_ref().map(|d| d.token.as_str()).unwrap_or_default();
        if token.is_empty() {
            return Err(SendError::Refused(SERVICE, "the instance has no bot token".into()));
        }
        let mut bots = self.bots.lock().expect("discord clients lock");
        if let Some((held, bot)) = bots.get(&instance.id)
            && held == token
        {
            return Ok(bot.clone());
        }
        let mut builder = twilight_http::Client::builder().token(token.to_owned()).timeout(TIMEOUT);
        if let Some((host, plain)) = &self.proxy.0 {
            builder = builder.proxy(host.clone(), *plain);
        }
        let bot = Arc::new(DiscordBot { http: builder.build() });
        bots.insert(instance.id.clone(), (token.to_owned(), bot.clone()));
        Ok(bot)
    }

    /// Drops the clients (and their rate limiters) of bots no longer in `config`, whenever a
    /// config is applied, until the task is dropped.
    pub async fn forget_removed_bots(self, config: Arc<ConfigHandle>) {
        let mut applied = config.subscribe();
        while applied.changed().await.is_ok() {
            let Some(current) = config.load() else { continue };
            let present: HashSet<&str> = current.instances.values().map(|i| i.id.as_str()).collect();
            self.bots.lock().expect("discord clients lock").retain(|id, _| present.contains(id.as_str()));
        }
    }
}

fn channel_id(to: &str) -> Result<Id<ChannelMarker>, SendError> {
    to.trim()
        .parse::<u64>()
        .ok()
        .and_then(Id::new_checked)
        .ok_or_else(|| SendError::Refused(SERVICE, format!("{to:?} is not a channel id")))
}

/// Bounds a whole send; one cut short may or may not have been delivered.
async fn within_budget<T>(send: impl Future<Output = Result<T, SendError>>) -> Result<T, SendError> {
    tokio::time::timeout(SEND_BUDGET, send)
        .await
        .unwrap_or_else(|_| Err(SendError::Unknown(SERVICE, format!("no answer within {} s", SEND_BUDGET.as_secs()))))
}

fn send_error(error: twilight_http::Error) -> SendError {
    match error.kind() {
        ErrorType::Response { status, body, .. } => {
            let body: String = String::from_utf8_lossy(body).chars().take(300).collect();
            match status.get() {
                // A gateway in front of Discord gave up waiting: the message may exist.
                502 | 504 => SendError::Unknown(SERVICE, format!("HTTP {}: {body}", status.get())),
                s => SendError::Refused(SERVICE, format!("HTTP {s}: {body}")),
            }
        }
        ErrorType::Unauthorized => SendError::Refused(SERVICE, "the bot token was refused (401)".into()),
        ErrorType::Validation | ErrorType::BuildingRequest | ErrorType::CreatingHeader { .. } | ErrorType::Json => {
            SendError::Refused(SERVICE, error.to_string())
        }
        // The request may have reached Discord.
        _ => SendError::Unknown(SERVICE, error.to_string()),
    }
}

impl DiscordBot {
    /// Posts one message (at most 2000 characters). Returns its id.
    pub async fn send_text(&self, to: &str, text: &str) -> Result<String, SendError> {
        let channel = channel_id(to)?;
        within_budget(async {
            let response = self.http.create_message(channel).content(text).await.map_err(send_error)?;
            Ok(response.model().await.map(|m| m.id.to_string()).unwrap_or_default())
        })
        .await
    }

    /// A file: from a URL, posted as a link Discord embeds; from bytes, attached.
    pub async fn send_media(&self, to: &str, media: &pb::OutboundMedia, caption: &str) -> Result<String, SendError> {
        let channel = channel_id(to)?;
        if !media.url.is_empty() {
            let text = if caption.is_empty() { media.url.clone() } else { format!("{caption}\n{}", media.url) };
            return self.send_text(to, &text).await;
        }
        let name = if media.file_name.is_empty() { "file".to_owned() } else { media.file_name.clone() };
        let attachments = [Attachment::from_bytes(name, media.data.clone(), 1)];
        within_budget(async {
            let sent = self.http.create_message(channel).content(caption).attachments(&attachments).await;
            let response = sent.map_err(send_error)?;
            Ok(response.model().await.map(|m| m.id.to_string()).unwrap_or_default())
        })
        .await
    }

    /// Shows "typing" in the channel for about ten seconds (best effort).
    pub async fn typing(&self, to: &str) {
        let Ok(channel) = channel_id(to) else { return };
        match tokio::time::timeout(TIMEOUT, self.http.create_typing_trigger(channel)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "typing indicator not shown"),
            Err(_) => tracing::debug!("typing indicator not shown: no answer in time"),
        }
    }
}
