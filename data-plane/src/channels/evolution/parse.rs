//! Evolution webhook bodies → [`Inbound`] messages.
//!
//! Accepted shapes: `data` as one message object (v2), `data.messages[]` (older servers), and
//! `data` as a base64 string of a whole envelope. Binary and Long fields arrive in several
//! encodings, so fields are read leniently: a field of an unexpected type reads as absent.
//!
//! Bodies are not built into a `serde_json::Value` tree: each object is read as its members in
//! document order with their values left as JSON text, and only the members a message needs are
//! looked into. What the agent and the trace see is the body's own text, spliced (the `apikey`
//! member dropped, `data` replaced by the one message), not a tree serialized again.

pub use crate::channels::ParseError;
use crate::channels::{Inbound, Media, RawJson};
use base64::Engine as _;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

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
    let envelope = Object::from_body(body)?;
    match envelope.get("data") {
        // Webhook base64 mode: `data` is a whole envelope, encoded.
        Some(data) if data.get().starts_with('"') => {
            let encoded = text(Some(data));
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|_| ParseError::Shape("data is a string but not base64".into()))?;
            let inner = Object::from_body(&decoded)?;
            if inner.get("data").is_some_and(|d| d.get().starts_with('"')) {
                return Err(ParseError::Shape("data nests another encoded envelope".into()));
            }
            envelope_event(&inner, instance, instance_id, now_ms, new_id)
        }
        _ => envelope_event(&envelope, instance, instance_id, now_ms, new_id),
    }
}

fn envelope_event(
    envelope: &Object<'_>,
    instance: &str,
    instance_id: &str,
    now_ms: i64,
    new_id: &mut dyn FnMut() -> String,
) -> Result<Event, ParseError> {
    let event = text(envelope.get("event"));
    let data = envelope.get("data");
    let tree = || data.and_then(|d| serde_json::from_str(d.get()).ok()).unwrap_or(Value::Null);
    // `MESSAGES_UPSERT` and `messages.upsert` are the same event.
    let is = |name: &str| event.len() == name.len() && event.bytes().zip(name.bytes()).all(|(a, b)| same(a, b));
    if is("connection.update") {
        return Ok(Event::ConnectionUpdate(tree()));
    }
    if is("qrcode.updated") {
        return Ok(Event::QrCodeUpdated(tree()));
    }
    if !is("messages.upsert") {
        return Ok(Event::Other(event.to_ascii_lowercase().replace('_', ".")));
    }
    let own_jid = text(envelope.get("sender")).into_owned();
    let data_object = Object::of(data);
    let shared = Shared { envelope, own_jid: &own_jid, instance, instance_id, now_ms };
    let messages = match (data_object.get("messages"), data) {
        (Some(messages), _) if messages.get().starts_with('[') => {
            let items: Vec<&RawValue> =
                serde_json::from_str(messages.get()).map_err(|e| ParseError::Shape(format!("data.messages: {e}")))?;
            items
                .into_iter()
                .map(|json| shared.message(json, Object::of(Some(json)), new_id()))
                .collect::<Result<Vec<_>, _>>()?
        }
        (_, Some(json)) if data_object.get("key").is_some() => {
            vec![shared.message(json, data_object, new_id())?]
        }
        _ => return Err(ParseError::Shape("messages.upsert without a message".into())),
    };
    Ok(Event::Messages { own_jid, messages })
}

/// `a` (from the body) matches `b` (lower case, dots) ignoring case and `_` for `.`.
fn same(a: u8, b: u8) -> bool {
    a.to_ascii_lowercase() == b || (a == b'_' && b == b'.')
}

/// A JSON object's members in document order, their values as JSON text; empty for anything
/// that is not an object. Lookups are linear: webhook objects have a dozen members.
#[derive(Default)]
struct Object<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Object<'a> {
    /// A body's top level, which must be an object.
    fn from_body(body: &'a [u8]) -> Result<Object<'a>, ParseError> {
        serde_json::from_slice(body).map_err(|e| {
            if e.is_data() {
                ParseError::Shape("body is not a JSON object".into())
            } else {
                ParseError::Json(e.to_string())
            }
        })
    }

    fn of(value: Option<&'a RawValue>) -> Object<'a> {
        match value {
            Some(v) if v.get().starts_with('{') => serde_json::from_str(v.get()).unwrap_or_default(),
            _ => Object::default(),
        }
    }

    /// The last member named `key`, the one a tree would keep.
    fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    fn without(&self, key: &str) -> Object<'a> {
        Object(self.0.iter().filter(|(k, _)| k != key).cloned().collect())
    }
}

impl<'de> Deserialize<'de> for Object<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Object<'de>, D::Error> {
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = Object<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Object<'de>, M::Error> {
                let mut members = Vec::with_capacity(16);
                while let Some(Key(key)) = map.next_key()? {
                    members.push((key, map.next_value()?));
                }
                Ok(Object(members))
            }
        }
        deserializer.deserialize_map(Members)
    }
}

impl Serialize for Object<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, value) in &self.0 {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

/// A member name, borrowed from the body unless it had escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Key<'de>, D::Error> {
        struct Name;
        impl<'de> Visitor<'de> for Name {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, name: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(name)))
            }
            fn visit_str<E>(self, name: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(name.to_owned())))
            }
        }
        deserializer.deserialize_str(Name)
    }
}

/// The envelope as the agent and the trace see it: without the `apikey`, with `data` holding
/// one message.
struct Spliced<'e, 'a> {
    envelope: &'e Object<'a>,
    data: &'e RawValue,
}

impl Serialize for Spliced<'_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let members = &self.envelope.0;
        let last_data = members.iter().rposition(|(k, _)| k == "data");
        let mut map = serializer.serialize_map(None)?;
        for (i, (key, value)) in members.iter().enumerate() {
            match key.as_ref() {
                // The instance token never leaves the parser.
                "apikey" => {}
                "data" if Some(i) == last_data => map.serialize_entry(key, self.data)?,
                "data" => {}
                _ => map.serialize_entry(key, value)?,
            }
        }
        if last_data.is_none() {
            map.serialize_entry("data", self.data)?;
        }
        map.end()
    }
}

/// A string member's text; `None` when absent or not a string.
fn string(value: Option<&RawValue>) -> Option<Cow<'_, str>> {
    let json = value?.get();
    if !json.starts_with('"') {
        return None;
    }
    // Without escapes, the text between the quotes is the string itself.
    if !json.contains('\\') {
        return Some(Cow::Borrowed(&json[1..json.len() - 1]));
    }
    Some(Cow::Owned(serde_json::from_str(json).unwrap_or_else(|_| unescape_lossy(&json[1..json.len() - 1]))))
}

/// A JSON string's contents with its escapes resolved, where serde_json refuses one: a lone
/// UTF-16 surrogate (`"\ud83d"`, text cut in the middle of an emoji) becomes U+FFFD, so that
/// the rest of the text still reaches the agent.
fn unescape_lossy(escaped: &str) -> String {
    let hex = |chars: &mut std::str::Chars<'_>| {
        let digits: String = chars.by_ref().take(4).collect();
        if digits.len() == 4 { u32::from_str_radix(&digits, 16).ok() } else { None }
    };
    let mut out = String::with_capacity(escaped.len());
    let mut chars = escaped.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some('u') => {
                let decoded = match hex(&mut chars) {
                    Some(high @ 0xd800..=0xdbff) => {
                        let mut ahead = chars.clone();
                        let pair = ahead.next() == Some('\\') && ahead.next() == Some('u');
                        match pair.then(|| hex(&mut ahead)).flatten() {
                            Some(low @ 0xdc00..=0xdfff) => {
                                chars = ahead;
                                char::from_u32(0x10000 + ((high - 0xd800) << 10) + (low - 0xdc00))
                            }
                            _ => None,
                        }
                    }
                    Some(unit) => char::from_u32(unit),
                    None => None,
                };
                out.push(decoded.unwrap_or(char::REPLACEMENT_CHARACTER));
            }
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

/// A string member's text; empty when absent or not a string.
fn text(value: Option<&RawValue>) -> Cow<'_, str> {
    string(value).unwrap_or_default()
}

fn boolean(value: Option<&RawValue>) -> bool {
    value.is_some_and(|v| v.get() == "true")
}

/// A number that may be a JSON number, a numeric string, or a protobuf Long `{low, high}`.
fn long(value: Option<&RawValue>) -> Option<i64> {
    let json = value?.get();
    match json.as_bytes().first()? {
        b'"' => string(value)?.parse().ok(),
        b'{' => {
            let long = Object::of(value);
            let low = long.get("low")?.get().parse::<i64>().ok()? & 0xffff_ffff;
            let high = long.get("high").and_then(|h| h.get().parse::<i64>().ok()).unwrap_or(0);
            Some((high << 32) | low)
        }
        _ => json.parse().ok(),
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

/// Members of `message` that are not its kind.
const ACCOMPANYING: &[&str] = &["messageContextInfo", "senderKeyDistributionMessage", "base64", "mediaUrl"];

/// The JIDs a `contextInfo` mentions, added to `into`.
fn mentioned<'a>(into: &mut Vec<Cow<'a, str>>, context: Option<&'a RawValue>) {
    let Some(jids) = Object::of(context).get("mentionedJid").filter(|j| j.get().starts_with('[')) else {
        return;
    };
    let jids: Vec<&RawValue> = serde_json::from_str(jids.get()).unwrap_or_default();
    into.extend(jids.into_iter().filter_map(|jid| string(Some(jid))));
}

/// What the messages of one body share.
struct Shared<'e, 'a> {
    envelope: &'e Object<'a>,
    own_jid: &'e str,
    instance: &'e str,
    instance_id: &'e str,
    now_ms: i64,
}

impl Shared<'_, '_> {
    /// One message; `item` is `item_json`'s members.
    fn message(&self, item_json: &RawValue, item: Object<'_>, id: String) -> Result<Message, ParseError> {
        let Shared { envelope, own_jid, instance, instance_id, now_ms } = *self;
        let key = Object::of(Some(item.get("key").ok_or_else(|| ParseError::Shape("message without key".into()))?));
        let remote_jid = text(key.get("remoteJid"));
        let external_id = text(key.get("id"));
        if remote_jid.is_empty() || external_id.is_empty() {
            return Err(ParseError::Shape("message key needs remoteJid and id".into()));
        }
        let is_group = remote_jid.ends_with("@g.us");
        let (author, author_alt) = if is_group {
            (text(key.get("participant")), text(key.get("participantAlt")))
        } else {
            (remote_jid.clone(), text(key.get("remoteJidAlt")))
        };
        // A LID says nothing about the phone; when the alternate JID has the number, use it, so
        // access rules and users keyed by phone keep working.
        let sender =
            if author.ends_with("@lid") && !author_alt.is_empty() { jid_user(&author_alt) } else { jid_user(&author) };

        let content = Object::of(item.get("message"));
        let extended = Object::of(content.get("extendedTextMessage"));
        let mut text_of = text(content.get("conversation"));
        if text_of.is_empty() {
            text_of = text(extended.get("text"));
        }
        let mut media = Vec::new();
        let mut mentions = Vec::new();
        mentioned(&mut mentions, item.get("contextInfo"));
        mentioned(&mut mentions, extended.get("contextInfo"));
        let inline_base64 = content.get("base64").or_else(|| item.get("base64"));
        let media_url = string(content.get("mediaUrl").or_else(|| item.get("mediaUrl")));
        for (field, kind) in MEDIA_KINDS {
            let Some(m) = content.get(field) else { continue };
            let m = Object::of(Some(m));
            mentioned(&mut mentions, m.get("contextInfo"));
            if text_of.is_empty() {
                text_of = text(m.get("caption"));
            }
            media.push(Media {
                kind: (*kind).to_owned(),
                mime_type: text(m.get("mimetype")).into_owned(),
                url: media_url.clone().unwrap_or_else(|| text(m.get("url"))).into_owned(),
                base64: string(inline_base64).or_else(|| string(m.get("base64"))).map(Cow::into_owned),
                file_name: text(m.get("fileName")).into_owned(),
                seconds: long(m.get("seconds")).map(|s| s.max(0) as u64),
                voice_note: boolean(m.get("ptt")),
            });
        }
        let own_user = jid_user(own_jid);
        let mentions_bot = !own_user.is_empty() && mentions.iter().any(|m| jid_user(m) == own_user);

        let message_type = match string(item.get("messageType")) {
            Some(kind) => kind.into_owned(),
            // Baileys writes a message's fields in proto order: its kind comes first, after
            // what only accompanies a message.
            None => content
                .0
                .iter()
                .map(|(kind, _)| kind)
                .find(|kind| !ACCOMPANYING.contains(&kind.as_ref()))
                .map(|kind| kind.clone().into_owned())
                .unwrap_or_default(),
        };

        // What the agent and the trace see: the envelope with this message, minus the token and
        // minus inline media (it travels once, in `media`).
        let content_without_media;
        let item_without_media;
        let data = if item.get("base64").is_none() && content.get("base64").is_none() {
            item_json
        } else {
            let mut stripped = item.without("base64");
            if let Some(slot) = stripped.0.iter_mut().rev().find(|(k, _)| k == "message") {
                content_without_media = serde_json::value::to_raw_value(&content.without("base64"))
                    .map_err(|e| ParseError::Shape(e.to_string()))?;
                slot.1 = &content_without_media;
            }
            item_without_media =
                serde_json::value::to_raw_value(&stripped).map_err(|e| ParseError::Shape(e.to_string()))?;
            &item_without_media
        };
        let raw = RawJson::new(&Spliced { envelope, data });

        let inbound = Inbound {
            id,
            instance: instance.to_owned(),
            instance_id: instance_id.to_owned(),
            external_id: external_id.into_owned(),
            conversation: remote_jid.into_owned(),
            thread: String::new(),
            sender: sender.to_owned(),
            sender_name: text(item.get("pushName")).into_owned(),
            text: text_of.into_owned(),
            message_type,
            media,
            is_group,
            sent_at: long(item.get("messageTimestamp")).unwrap_or(0),
            received_at: now_ms,
            raw,
        };
        Ok(Message { from_me: boolean(key.get("fromMe")), mentions_bot, inbound })
    }
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
        let raw = |json: &str| RawValue::from_string(json.to_owned()).unwrap();
        assert_eq!(long(Some(&raw("5"))), Some(5));
        assert_eq!(long(Some(&raw(r#""1763638839""#))), Some(1_763_638_839));
        assert_eq!(long(Some(&raw(r#"{"low": 52311, "high": 0, "unsigned": true}"#))), Some(52311));
        assert_eq!(long(Some(&raw(r#"{"low": -1, "high": 1}"#))), Some((1 << 32) | 0xffff_ffff));
        assert_eq!(long(Some(&raw("1.5"))), None);
        assert_eq!(long(Some(&raw("null"))), None);
        assert_eq!(jid_user("5511999999999:12@s.whatsapp.net"), "5511999999999");
    }

    #[test]
    fn the_agent_sees_the_envelope_as_sent_minus_the_token() {
        let m = one("text_dm.json");
        let mut expected: Value = serde_json::from_slice(&fixture("text_dm.json")).unwrap();
        expected.as_object_mut().unwrap().remove("apikey");
        assert_eq!(m.inbound.raw.to_value(), expected);

        let m = one("image_base64.json");
        let mut expected: Value = serde_json::from_slice(&fixture("image_base64.json")).unwrap();
        expected.as_object_mut().unwrap().remove("apikey");
        expected["data"]["message"].as_object_mut().unwrap().remove("base64");
        assert_eq!(m.inbound.raw.to_value(), expected);

        let (_, all) = messages("legacy_messages_array.json");
        let envelope: Value = serde_json::from_slice(&fixture("legacy_messages_array.json")).unwrap();
        for (i, m) in all.iter().enumerate() {
            let raw = m.inbound.raw.to_value();
            assert_eq!(raw["data"], envelope["data"]["messages"][i], "each message travels alone");
            assert!(raw.get("apikey").is_none());
        }
    }

    #[test]
    fn the_kind_is_the_first_member_that_is_a_message() {
        let body = br#"{"event":"messages.upsert","data":{"key":{"remoteJid":"120363025246125888@g.us","id":"K1"},
            "message":{"senderKeyDistributionMessage":{"groupId":"g"},"imageMessage":{"mimetype":"image/jpeg"}}}}"#;
        let mut ids = || "t".to_owned();
        let Ok(Event::Messages { messages, .. }) = parse(body, "a", "i", 0, &mut ids) else { panic!() };
        assert_eq!(messages[0].inbound.message_type, "imageMessage");
    }

    #[test]
    fn a_lone_surrogate_costs_one_character_not_the_message() {
        let body = br#"{"event":"messages.upsert","data":{"key":{"remoteJid":"5511999999999@s.whatsapp.net","id":"S1"},
            "message":{"conversation":"cut \ud83d here, kept \ud83d\ude00 and \u00e9\n"}}}"#;
        let mut ids = || "t".to_owned();
        let Ok(Event::Messages { messages, .. }) = parse(body, "a", "i", 0, &mut ids) else { panic!() };
        assert_eq!(messages[0].inbound.text, "cut \u{fffd} here, kept \u{1f600} and é\n");
        assert_eq!(unescape_lossy(r#"\"q\" \\ \/ \t \ud800x \u12"#), "\"q\" \\ / \t \u{fffd}x \u{fffd}");
    }

    #[test]
    fn escapes_upper_case_events_and_repeated_members() {
        let body = br#"{"event":"MESSAGES_UPSERT","sender":"5511888888888@s.whatsapp.net",
            "apikey":"one","data":{"key":{"remoteJid":"5511999999999@s.whatsapp.net","id":"X1"},
            "pushName":"Jo\u00e3o","message":{"conversation":"line one\nline \"two\""},
            "messageTimestamp":{"low":1763638839,"high":0}},"api\u006bey":"two","apikey":"three"}"#;
        let mut ids = || "t".to_owned();
        let Ok(Event::Messages { messages, .. }) = parse(body, "a", "i", 0, &mut ids) else { panic!() };
        let m = &messages[0].inbound;
        assert_eq!((m.sender_name.as_str(), m.text.as_str()), ("João", "line one\nline \"two\""));
        assert_eq!((m.sent_at, m.message_type.as_str()), (1_763_638_839, "conversation"));
        let raw = m.raw.get();
        assert!(!raw.contains("one\"") && !raw.contains("two\"") && !raw.contains("three"), "{raw}");
        assert_eq!(m.raw.to_value()["data"]["pushName"], "João");
    }
}
