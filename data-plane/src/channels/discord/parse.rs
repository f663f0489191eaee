//! A gateway MESSAGE_CREATE → what to answer: DMs, and guild messages that mention the bot
//! (mention stripped), unless the instance answers every message. Bots, webhooks and system
//! messages are never answered.

use crate::channels::{Inbound, Media, RawJson};
use omni_core::kinds::media_kind;
use omni_proto::v1 as pb;
use twilight_model::channel::Message;
use twilight_model::channel::message::MessageType;

/// The message as the pipeline sees it, and why not to answer it, if so.
pub fn parse(
    message: &Message,
    instance: &pb::InstanceConfig,
    bot_user_id: u64,
    now_ms: i64,
    id: String,
) -> (Inbound, Option<String>) {
    let guild_ids = instance.discord.as_ref().map(|d| d.guild_ids.as_slice()).unwrap_or_default();
    let reply_to_all = instance.behavior.as_ref().is_some_and(|b| b.reply_to_all_group_messages);
    let mentions_bot = message.mentions.iter().any(|u| u.id.get() == bot_user_id);
    let is_dm = message.guild_id.is_none();
    let text = strip_mentions(&message.content, bot_user_id);
    let ignore = if message.author.bot || message.author.id.get() == bot_user_id {
        Some("bot message")
    } else if message.webhook_id.is_some() {
        Some("webhook message")
    } else if !matches!(message.kind, MessageType::Regular | MessageType::Reply) {
        Some("system message")
    } else if message.guild_id.is_some_and(|g| !guild_ids.is_empty() && !guild_ids.contains(&g.to_string())) {
        Some("guild not in the instance's guild list")
    } else if !is_dm && !reply_to_all && !mentions_bot {
        Some("guild message without a mention of the bot")
    } else if text.is_empty() && message.attachments.is_empty() {
        Some("nothing to answer (empty message)")
    } else {
        None
    };
    let media: Vec<Media> = message
        .attachments
        .iter()
        .map(|a| {
            let mime = a.content_type.clone().unwrap_or_default();
            Media {
                kind: media_kind(&mime).to_owned(),
                mime_type: mime,
                url: a.url.clone(),
                base64: None,
                file_name: a.filename.clone(),
                seconds: a.duration_secs.map(|s| s as u64),
                voice_note: false,
            }
        })
        .collect();
    let message_type = media.first().map_or("text", |m| m.kind.as_str()).to_owned();
    let sender_name = message.author.global_name.clone().unwrap_or_else(|| message.author.name.clone());
    let inbound = Inbound {
        id,
        instance: instance.name.clone(),
        instance_id: instance.id.clone(),
        external_id: message.id.to_string(),
        conversation: message.channel_id.to_string(),
        thread: String::new(),
        sender: message.author.id.to_string(),
        sender_name,
        text,
        message_type,
        media,
        is_group: !is_dm,
        sent_at: message.timestamp.as_secs(),
        received_at: now_ms,
        raw: RawJson::new(message),
    };
    (inbound, ignore.map(str::to_owned))
}

/// The text without the bot's mention (`<@id>` or the older `<@!id>`).
fn strip_mentions(content: &str, bot_user_id: u64) -> String {
    content.replace(&format!("<@{bot_user_id}>"), "").replace(&format!("<@!{bot_user_id}>"), "").trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn message(guild: bool, content: &str, mentions: &[u64], bot_author: bool) -> Message {
        let mut value = json!({
            "id": "1100000000000000002", "channel_id": "123",
            "author": {"id": "42", "username": "alice", "discriminator": "0", "avatar": null,
                       "global_name": "Alice", "bot": bot_author},
            "content": content, "timestamp": "2025-01-01T00:00:01.000000+00:00", "edited_timestamp": null,
            "tts": false, "mention_everyone": false,
            "mentions": mentions.iter().map(|id| json!({"id": id.to_string(), "username": "hubbot",
                "discriminator": "0", "avatar": null, "bot": true, "public_flags": 0})).collect::<Vec<_>>(),
            "mention_roles": [], "attachments": [], "embeds": [], "pinned": false, "type": 0,
        });
        if guild {
            value["guild_id"] = json!("456");
        }
        serde_json::from_value(value).unwrap()
    }

    fn instance(guilds: &[&str], reply_to_all: bool) -> pb::InstanceConfig {
        pb::InstanceConfig {
            name: "d".into(),
            id: "i".into(),
            discord: Some(pb::NodeDiscord {
                guild_ids: guilds.iter().map(|g| g.to_string()).collect(),
                ..Default::default()
            }),
            behavior: Some(pb::Behavior { reply_to_all_group_messages: reply_to_all, ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn dms_and_mentions_are_answered() {
        let (dm, ignore) = parse(&message(false, "hello", &[], false), &instance(&[], false), 999, 0, "t".into());
        assert_eq!((ignore, dm.text.as_str(), dm.is_group), (None, "hello", false));
        assert_eq!((dm.sender.as_str(), dm.sender_name.as_str(), dm.conversation.as_str()), ("42", "Alice", "123"));
        assert_eq!(dm.sent_at, 1735689601);
        let (mention, ignore) =
            parse(&message(true, "<@999> what's up", &[999], false), &instance(&[], false), 999, 0, "t".into());
        assert_eq!((ignore, mention.text.as_str(), mention.is_group), (None, "what's up", true));
    }

    #[test]
    fn what_is_not_answered() {
        let bot = parse(&message(false, "hi", &[], true), &instance(&[], false), 999, 0, String::new()).1;
        assert_eq!(bot.as_deref(), Some("bot message"));
        let chatter = parse(&message(true, "hi all", &[], false), &instance(&[], false), 999, 0, String::new()).1;
        assert_eq!(chatter.as_deref(), Some("guild message without a mention of the bot"));
        let all = parse(&message(true, "hi all", &[], false), &instance(&[], true), 999, 0, String::new()).1;
        assert_eq!(all, None);
        let other_guild =
            parse(&message(true, "<@999> hi", &[999], false), &instance(&["7"], false), 999, 0, String::new()).1;
        assert_eq!(other_guild.as_deref(), Some("guild not in the instance's guild list"));
        let empty = parse(&message(true, "<@999>", &[999], false), &instance(&[], false), 999, 0, String::new()).1;
        assert_eq!(empty.as_deref(), Some("nothing to answer (empty message)"));
    }
}
