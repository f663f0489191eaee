//! Evolution webhook bodies → [`Inbound`] messages.
//!
//! Accepted shapes: `data` as one message object (v2), `data.messages[]` (older servers), and
//! `data` as a base64 string of a whole envelope. Binary and Long fields arrive in several
//! encodings, so everything is read from `serde_json::Value`.

pub use crate::channels::ParseError;
use crate::channels::{Inbound, Media, RawJson};
use base64::Engine as _;
use serde_json::{Map, Value};

/// What a webhook body holds.
#[derive(Debug)]
pub enum Event {
    Messages {
        own_jid: String,
        messages: Vec<Message>,
    },
    ConnectionUpdate(Value),
    QrCodeUpdated(Value),
    /// Any other event; acknowledged and dropped.
    Other(String),
}

/// One message as parsed, before the instance's rules decide what to do with it.
#[derive(Debug, Clone)]
pub struct Message {
    pub inbound: Inbound,
    pub from_me: bool,
    /// The bot's own JID appears in the message's mentions.
    pub mentions_bot: bool,
}

/// Why a message is accepted but not answered.
pub fn ignore_reason(
    message: &Message,
    reply_to_all_group_messages: bool,
    max_age_secs: u32,
    now_secs: i64,
) -> Option<&'static str> {
    let jid = &message.inbound.conversation;
    if message.from_me {
        return Some("own message");
    }
    if jid == "status@broadcast" || jid.ends_with("@broadcast") || jid.ends_with("@newsletter") {
        return Some("broadcast or newsletter");
    }
    if message.inbound.sent_at > 0 && now_secs - message.inbound.sent_at > i64::from(max_age_secs) {
        return Some("stale: older than the instance's max message age");
    }
    if message.inbound.is_group && !reply_to_all_group_messages && !message.mentions_bot {
        return Some("group message without a mention of the bot");
    }
    if message.inbound.text.trim().is_empty() && message.inbound.media.is_empty() {
        return Some("nothing to answer (unsupported message type)");
    }
    None
}

/// Parses a webhook body. `instance`/`instance_id` name the Omni instance; `now_ms` stamps
/// arrival; `new_id` makes trace ids.
pub fn parse(
    body: &[u8],
    instance: &str,
    instance_id: &str,
    now_ms: i64,
    new_id: &mut dyn FnMut() -> String,
) -> Result<Event, ParseError> {
    let envelope: Value = serde_json::from_slice(body).map_err(|e| ParseError::Json(e.to_string()))?;
    let envelope = match envelope.get("data") {
        // Webhook base64 mode: `data` is a whole envelope, encoded.
        Some(Value::String(encoded)) => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|_| ParseError::Shape("data is a string but not base64".into()))?;
            let inner: Value = serde_json::from_slice(&decoded).map_err(|e| ParseError::Json(e.to_string()))?;
            if inner.get("data").is_some_and(Value::is_string) {
                return Err(ParseError::Shape("data nests another encoded envelope".into()));
            }
            inner
        }
        _ => envelope,
    };
    let Value::Object(mut envelope) = envelope else {
        return Err(ParseError::Shape("body is not a JSON object".into()));
    };
    let event =
        envelope.get("event").and_then(Value::as_str).unwrap_or_default().to_ascii_lowercase().replace('_', ".");
    // Taken, not copied: what the agent and the trace see is rebuilt per message below.
    let mut data = envelope.remove("data").unwrap_or(Value::Null);
    match event.as_str() {
        "messages.upsert" => {}
        "connection.update" => return Ok(Event::ConnectionUpdate(data)),
        "qrcode.updated" => return Ok(Event::QrCodeUpdated(data)),
        other => return Ok(Event::Other(other.to_owned())),
    }
    let own_jid = envelope.get("sender").and_then(Value::as_str).unwrap_or_default().to_owned();
    let items: Vec<Value> = if let Some(Value::Array(messages)) = data.get_mut("messages") {
        std::mem::take(messages)
    } else if data.get("key").is_some() {
        vec![data]
    } else {
        return Err(ParseError::Shape("messages.upsert without a message".into()));
    };
    // The instance token never leaves the parser.
    envelope.remove("apikey");
    let messages = items
        .into_iter()
        .map(|item| message(item, &own_jid, instance, instance_id, now_ms, new_id(), &envelope))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Event::Messages { own_jid, messages })
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> &'a str {
    path.iter().try_fold(value, |v, key| v.get(key)).and_then(Value::as_str).unwrap_or_default()
}

/// A number that may be a JSON number, a numeric string, or a protobuf Long `{low, high}`.
fn long(value: Option<&Value>) -> Option<i64> {
    match value? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        Value::Object(o) => {
            let low = o.get("low")?.as_i64()? & 0xffff_ffff;
            let high = o.get("high").and_then(Value::as_i64).unwrap_or(0);
            Some((high << 32) | low)
        }
        _ => None,
    }
}

/// The user part of a JID: `5511999999999:12@s.whatsapp.net` → `5511999999999`.
pub fn jid_user(jid: &str) -> &str {
    let user = jid.split('@').next().unwrap_or(jid);
    user.split(':').next().unwrap_or(user)
}

const MEDIA_KINDS: &[(&str, &str)] = &[
    ("imageMessage", "image"),
    ("videoMessage", "video"),
    ("audioMessage", "audio"),
    ("documentMessage", "document"),
    ("stickerMessage", "sticker"),
    ("ptvMessage", "video"),
];

fn message(
    mut item: Value,
    own_jid: &str,
    instance: &str,
    instance_id: &str,
    now_ms: i64,
    id: String,
    envelope: &Map<String, Value>,
) -> Result<Message, ParseError> {
    let key = item.get("key").ok_or_else(|| ParseError::Shape("message without key".into()))?;
    let remote_jid = str_at(key, &["remoteJid"]);
    let external_id = str_at(key, &["id"]);
    if remote_jid.is_empty() || external_id.is_empty() {
        return Err(ParseError::Shape("message key needs remoteJid and id".into()));
    }
    let is_group = remote_jid.ends_with("@g.us");
    let (author, author_alt) = if is_group {
        (str_at(key, &["participant"]), str_at(key, &["participantAlt"]))
    } else {
        (remote_jid, str_at(key, &["remoteJidAlt"]))
    };
    // A LID says nothing about the phone; when the alternate JID has the number, use it, so
    // access rules and users keyed by phone keep working.
    let sender =
        if author.ends_with("@lid") && !author_alt.is_empty() { jid_user(author_alt) } else { jid_user(author) };

    let empty = Value::Object(Map::new());
    let content = item.get("message").unwrap_or(&empty);
    let mut text = str_at(content, &["conversation"]).to_owned();
    if text.is_empty() {
        text = str_at(content, &["extendedTextMessage", "text"]).to_owned();
    }
    let mut media = Vec::new();
    let mut mentions: Vec<&str> = Vec::new();
    fn collect<'v>(mentions: &mut Vec<&'v str>, context: Option<&'v Value>) {
        if let Some(Value::Array(jids)) = context.and_then(|c| c.get("mentionedJid")) {
            mentions.extend(jids.iter().filter_map(Value::as_str));
        }
    }
    collect(&mut mentions, item.get("contextInfo"));
    collect(&mut mentions, content.get("extendedTextMessage").and_then(|m| m.get("contextInfo")));
    let inline_base64 = content.get("base64").or_else(|| item.get("base64")).and_then(Value::as_str);
    let media_url = content.get("mediaUrl").or_else(|| item.get("mediaUrl")).and_then(Value::as_str);
    for (field, kind) in MEDIA_KINDS {
        let Some(m) = content.get(*field) else { continue };
        collect(&mut mentions, m.get("contextInfo"));
        if text.is_empty() {
            text = str_at(m, &["caption"]).to_owned();
        }
        media.push(Media {
            kind: (*kind).to_owned(),
            mime_type: str_at(m, &["mimetype"]).to_owned(),
            url: media_url.unwrap_or(str_at(m, &["url"])).to_owned(),
            base64: inline_base64.or_else(|| m.get("base64").and_then(Value::as_str)).map(str::to_owned),
            file_name: str_at(m, &["fileName"]).to_owned(),
            seconds: long(m.get("seconds")).map(|s| s.max(0) as u64),
            voice_note: m.get("ptt").and_then(Value::as_bool).unwrap_or(false),
        });
    }
    let own_user = jid_user(own_jid);
    let mentions_bot = !own_user.is_empty() && mentions.iter().any(|m| jid_user(m) == own_user);

    let message_type = item
        .get("messageType")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| content.as_object().and_then(|o| o.keys().next().cloned()).unwrap_or_default());
    let inbound = Inbound {
        id,
        instance: instance.to_owned(),
        instance_id: instance_id.to_owned(),
        external_id: external_id.to_owned(),
        conversation: remote_jid.to_owned(),
        thread: String::new(),
        sender: sender.to_owned(),
        sender_name: str_at(&item, &["pushName"]).to_owned(),
        text,
        message_type,
        media,
        is_group,
        sent_at: long(item.get("messageTimestamp")).unwrap_or(0),
        received_at: now_ms,
        raw: RawJson::default(),
    };
    let from_me = key.get("fromMe").and_then(Value::as_bool).unwrap_or(false);

    // What the agent and the trace see: the envelope with this message, minus the token and
    // minus inline media (it travels once, in `media`).
    if let Some(Value::Object(m)) = item.get_mut("message") {
        m.remove("base64");
    }
    if let Value::Object(d) = &mut item {
        d.remove("base64");
    }
    let mut raw = envelope.clone();
    raw.insert("data".into(), item);
    Ok(Message { from_me, mentions_bot, inbound: Inbound { raw: RawJson::new(&raw), ..inbound } })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_SECS: i64 = 1_763_638_839 + 10;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/../tests/fixtures/evolution/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn messages(name: &str) -> (String, Vec<Message>) {
        let mut n = 0;
        let mut ids = || {
            n += 1;
            format!("trace-{n}")
        };
        match parse(&fixture(name), "acme-wa", "inst-1", NOW_SECS * 1000, &mut ids).unwrap() {
            Event::Messages { own_jid, messages } => (own_jid, messages),
            other => panic!("{name}: {other:?}"),
        }
    }

    fn one(name: &str) -> Message {
        let (_, mut all) = messages(name);
        assert_eq!(all.len(), 1, "{name}");
        all.remove(0)
    }

    fn verdict(m: &Message) -> Option<&'static str> {
        ignore_reason(m, false, 300, NOW_SECS)
    }

    #[test]
    fn text_dm() {
        let m = one("text_dm.json");
        assert_eq!(m.inbound.conversation, "5511999999999@s.whatsapp.net");
        assert_eq!(m.inbound.sender, "5511999999999");
        assert!(!m.inbound.text.is_empty());
        assert_eq!(verdict(&m), None);
        let raw = m.inbound.raw.get();
        assert!(!raw.contains("EVO-INSTANCE-TOKEN-DO-NOT-LEAK"), "the apikey never leaves the parser");
    }

    #[test]
    fn lid_sender_is_answered_at_its_lid_and_known_by_phone() {
        let m = one("text_dm_lid.json");
        assert_eq!(m.inbound.conversation, "137180000000001@lid");
        assert_eq!(m.inbound.sender, "5511977777777");
        assert_eq!(m.inbound.text, "Hello from a LID sender");
        assert_eq!(verdict(&m), None);
    }

    #[test]
    fn legacy_extended_text() {
        let m = one("extended_text_legacy.json");
        assert!(!m.inbound.text.is_empty());
        assert_eq!(verdict(&m), None);
    }

    #[test]
    fn groups_need_a_mention() {
        let m = one("group_mention.json");
        assert!(m.inbound.is_group && m.mentions_bot);
        assert_eq!(m.inbound.sender, "5511966666666");
        assert_eq!(m.inbound.conversation, "120363025246125888@g.us");
        assert_eq!(verdict(&m), None);
        let m = one("group_no_mention.json");
        assert!(m.inbound.is_group && !m.mentions_bot);
        assert_eq!(verdict(&m), Some("group message without a mention of the bot"));
        assert_eq!(ignore_reason(&m, true, 300, NOW_SECS), None, "unless the instance answers every group message");
    }

    #[test]
    fn image_with_base64() {
        let m = one("image_base64.json");
        assert_eq!(m.inbound.text, "what is this?");
        assert_eq!(m.inbound.media.len(), 1);
        let media = &m.inbound.media[0];
        assert_eq!((media.kind.as_str(), media.mime_type.as_str()), ("image", "image/jpeg"));
        assert_eq!(media.base64.as_deref(), Some("/9j/4CBub3QgcmVhbGx5IGEganBlZw=="));
        assert!(!m.inbound.raw.get().contains("/9j/4CBub3"), "media travels once");
        assert_eq!(verdict(&m), None);
    }

    #[test]
    fn voice_note_without_base64() {
        let m = one("audio_ptt.json");
        let media = &m.inbound.media[0];
        assert_eq!((media.kind.as_str(), media.voice_note, media.seconds), ("audio", true, Some(4)));
        assert!(media.base64.is_none() && !media.url.is_empty());
        assert_eq!(verdict(&m), None, "media alone is worth answering");
    }

    #[test]
    fn own_messages_and_broadcasts_are_ignored() {
        assert_eq!(verdict(&one("from_me.json")), Some("own message"));
        assert_eq!(verdict(&one("status_broadcast.json")), Some("broadcast or newsletter"));
    }

    #[test]
    fn legacy_array_keeps_order() {
        let (_, all) = messages("legacy_messages_array.json");
        assert_eq!(all.iter().map(|m| m.inbound.text.as_str()).collect::<Vec<_>>(), ["first", "second"]);
        assert_eq!(all.iter().map(|m| m.inbound.id.as_str()).collect::<Vec<_>>(), ["trace-1", "trace-2"]);
    }

    #[test]
    fn base64_data_string() {
        let m = one("data_base64_string.json");
        assert_eq!(m.inbound.text, "sent with webhook base64 on");
        assert_eq!(m.inbound.conversation, "5511933333333@s.whatsapp.net");
    }

    #[test]
    fn connection_and_qr_events() {
        let mut ids = || String::new();
        assert!(matches!(
            parse(&fixture("connection_update_open.json"), "acme-wa", "i", 0, &mut ids),
            Ok(Event::ConnectionUpdate(_))
        ));
        assert!(matches!(
            parse(&fixture("qrcode_updated.json"), "acme-wa", "i", 0, &mut ids),
            Ok(Event::QrCodeUpdated(_))
        ));
    }

    #[test]
    fn stale_messages_and_bad_bodies() {
        let m = one("text_dm.json");
        assert_eq!(
            ignore_reason(&m, false, 300, NOW_SECS + 3600),
            Some("stale: older than the instance's max message age")
        );
        let mut ids = || String::new();
        assert!(matches!(parse(b"{not json", "a", "i", 0, &mut ids), Err(ParseError::Json(_))));
        assert!(matches!(
            parse(br#"{"event":"messages.upsert","data":{}}"#, "a", "i", 0, &mut ids),
            Err(ParseError::Shape(_))
        ));
        assert!(matches!(parse(br#"[1,2]"#, "a", "i", 0, &mut ids), Err(ParseError::Shape(_))));
    }

    #[test]
    fn longs_in_every_encoding() {
        assert_eq!(long(Some(&serde_json::json!(5))), Some(5));
        assert_eq!(long(Some(&serde_json::json!("1763638839"))), Some(1_763_638_839));
        assert_eq!(long(Some(&serde_json::json!({"low": 52311, "high": 0, "unsigned": true}))), Some(52311));
        assert_eq!(long(Some(&serde_json::json!({"low": -1, "high": 1}))), Some((1 << 32) | 0xffff_ffff));
        assert_eq!(jid_user("5511999999999:12@s.whatsapp.net"), "5511999999999");
    }
}
