//! Slack Events API bodies → what to answer. Requests are verified before anything here runs.
//!
//! A channel mention arrives twice, as `message` and as `app_mention`, with different
//! `event_id`s but the same (channel, ts): that pair is the idempotency key, and it also covers
//! Slack's retries of one event (same event, same ts).

pub use crate::channels::ParseError;
use crate::channels::{Inbound, Media, RawJson};
use omni_core::kinds::media_kind;
use serde_json::Value;

/// Why a message is accepted but not answered.
pub type IgnoreReason = Option<String>;

/// What a verified body holds.
#[derive(Debug)]
pub enum Event {
    /// Answer with the challenge.
    UrlVerification(String),
    /// A message or mention: the message, and why not to answer it, if so.
    Message(Box<Inbound>, IgnoreReason),
    /// Slack stopped sending events for a while (over 30,000 an hour).
    RateLimited,
    /// Anything else; acknowledged and dropped.
    Other(String),
}

fn text<'a>(value: &'a Value, key: &str) -> &'a str {
    value.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// Message subtypes that are people talking; every other subtype (edits, deletions, joins,
/// bot messages, ...) is not answered.
const ANSWERED_SUBTYPES: [&str; 3] = ["", "thread_broadcast", "file_share"];

/// Parses a verified body for the instance whose bot user is `bot_user_id` (empty: take it
/// from the envelope's authorizations).
pub fn parse(
    body: &[u8],
    instance: &str,
    instance_id: &str,
    bot_user_id: &str,
    reply_to_all: bool,
    now_ms: i64,
    id: String,
) -> Result<Event, ParseError> {
    let mut envelope: Value = serde_json::from_slice(body).map_err(|e| ParseError::Json(e.to_string()))?;
    match text(&envelope, "type") {
        "url_verification" => return Ok(Event::UrlVerification(text(&envelope, "challenge").to_owned())),
        "app_rate_limited" => return Ok(Event::RateLimited),
        "event_callback" => {}
        other => return Ok(Event::Other(other.to_owned())),
    }
    // The verification token is a credential of the app; it goes nowhere.
    if let Some(object) = envelope.as_object_mut() {
        object.remove("token");
    }
    let event = envelope
        .get("event")
        .filter(|e| e.is_object())
        .ok_or_else(|| ParseError::Shape("event_callback without an event object".into()))?;
    let kind = text(event, "type");
    if kind != "message" && kind != "app_mention" {
        return Ok(Event::Other(kind.to_owned()));
    }
    let bot_user = match bot_user_id {
        "" => envelope.pointer("/authorizations/0/user_id").and_then(Value::as_str).unwrap_or_default(),
        id => id,
    };
    let (channel, ts, user) = (text(event, "channel"), text(event, "ts"), text(event, "user"));
    if channel.is_empty() || ts.is_empty() {
        return Err(ParseError::Shape(format!("{kind} event without channel or ts")));
    }
    let channel_type = text(event, "channel_type");
    let mention = format!("<@{bot_user}>");
    let raw_text = text(event, "text");
    let mentions_bot = kind == "app_mention" || (!bot_user.is_empty() && raw_text.contains(&mention));
    let is_group = kind == "app_mention" || channel_type != "im";
    let subtype = text(event, "subtype");
    let ignore = if !text(event, "bot_id").is_empty() || subtype == "bot_message" {
        Some("bot message".to_owned())
    } else if !ANSWERED_SUBTYPES.contains(&subtype) {
        Some(format!("message subtype {subtype} (edits, deletions and joins are not answered)"))
    } else if event.get("edited").is_some_and(|e| !e.is_null()) {
        Some("edited message".to_owned())
    } else if user.is_empty() {
        Some("message without a user".to_owned())
    } else if !bot_user.is_empty() && user == bot_user {
        Some("own message".to_owned())
    } else if is_group && !reply_to_all && !mentions_bot {
        Some("channel message without a mention of the bot".to_owned())
    } else {
        None
    };
    let files = event.get("files").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let media = files
        .iter()
        .map(|file| {
            let mime = text(file, "mimetype");
            Media {
                kind: media_kind(mime).to_owned(),
                mime_type: mime.to_owned(),
                url: text(file, "url_private").to_owned(),
                base64: None,
                file_name: text(file, "name").to_owned(),
                seconds: None,
                voice_note: false,
            }
        })
        .collect::<Vec<_>>();
    let words = raw_text.replace(&mention, "").trim().to_owned();
    let ignore = match ignore {
        None if words.is_empty() && media.is_empty() => Some("nothing to answer (empty message)".to_owned()),
        other => other,
    };
    let thread = match text(event, "thread_ts") {
        "" => ts,
        thread => thread,
    };
    let sender_name = event
        .pointer("/user_profile/display_name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .or_else(|| event.pointer("/user_profile/real_name").and_then(Value::as_str))
        .unwrap_or_default();
    let message_type = if media.is_empty() { "text" } else { media[0].kind.as_str() };
    let inbound = Inbound {
        id,
        instance: instance.to_owned(),
        instance_id: instance_id.to_owned(),
        external_id: ts.to_owned(),
        conversation: channel.to_owned(),
        thread: thread.to_owned(),
        sender: user.to_owned(),
        sender_name: sender_name.to_owned(),
        text: words,
        message_type: message_type.to_owned(),
        media,
        is_group,
        sent_at: ts.split('.').next().and_then(|s| s.parse().ok()).unwrap_or(now_ms / 1000),
        received_at: now_ms,
        raw: RawJson::new(&envelope),
    };
    Ok(Event::Message(Box::new(inbound), ignore))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn envelope(event: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "token": "verification-token", "team_id": "T1", "api_app_id": "A1", "type": "event_callback",
            "event_id": "Ev1", "event_time": 1_700_000_000,
            "authorizations": [{ "team_id": "T1", "user_id": "UBOT", "is_bot": true }],
            "event": event,
        }))
        .unwrap()
    }

    fn run(event: Value, reply_to_all: bool) -> (Inbound, IgnoreReason) {
        match parse(&envelope(event), "acme", "i1", "", reply_to_all, 1_700_000_001_000, "t1".into()).unwrap() {
            Event::Message(inbound, ignore) => (*inbound, ignore),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn direct_message_is_answered() {
        let (inbound, ignore) = run(
            json!({"type": "message", "channel": "D1", "channel_type": "im", "user": "U1", "text": "hi", "ts": "1700000000.000100"}),
            false,
        );
        assert_eq!(ignore, None);
        assert_eq!((inbound.conversation.as_str(), inbound.thread.as_str()), ("D1", "1700000000.000100"));
        assert_eq!((inbound.sender.as_str(), inbound.text.as_str(), inbound.is_group), ("U1", "hi", false));
        assert!(inbound.raw.to_value().get("token").is_none(), "the verification token is removed");
    }

    #[test]
    fn mention_is_stripped_and_answered_in_its_thread() {
        let (inbound, ignore) = run(
            json!({"type": "app_mention", "channel": "C1", "user": "U1", "text": "<@UBOT> hello there",
                   "ts": "1700000000.000200", "thread_ts": "1699999999.000050"}),
            false,
        );
        assert_eq!(ignore, None);
        assert_eq!((inbound.text.as_str(), inbound.thread.as_str()), ("hello there", "1699999999.000050"));
    }

    #[test]
    fn what_is_not_answered() {
        let cases = [
            (
                json!({"type": "app_mention", "channel": "C1", "user": "U1", "text": "<@UBOT> x", "ts": "1.6", "edited": {"user": "U1", "ts": "1.7"}}),
                "edited message",
            ),
            (
                json!({"type": "message", "channel": "D1", "channel_type": "im", "bot_id": "B1", "text": "x", "ts": "1.1"}),
                "bot message",
            ),
            (
                json!({"type": "message", "subtype": "message_changed", "channel": "D1", "channel_type": "im", "ts": "1.2"}),
                "message subtype message_changed",
            ),
            (
                json!({"type": "message", "channel": "D1", "channel_type": "im", "user": "UBOT", "text": "x", "ts": "1.3"}),
                "own message",
            ),
            (
                json!({"type": "message", "channel": "C1", "channel_type": "channel", "user": "U1", "text": "chatter", "ts": "1.4"}),
                "channel message without a mention",
            ),
        ];
        for (event, why) in cases {
            let (_, ignore) = run(event, false);
            assert!(ignore.as_deref().is_some_and(|i| i.starts_with(why)), "{ignore:?} vs {why}");
        }
        let (_, ignore) = run(
            json!({"type": "message", "channel": "C1", "channel_type": "channel", "user": "U1", "text": "chatter", "ts": "1.5"}),
            true,
        );
        assert_eq!(ignore, None, "reply_to_all answers channel messages");
    }

    #[test]
    fn other_bodies() {
        let challenge = br#"{"token":"x","challenge":"abc","type":"url_verification"}"#;
        assert!(
            matches!(parse(challenge, "a", "i", "", false, 0, String::new()), Ok(Event::UrlVerification(c)) if c == "abc")
        );
        let limited = br#"{"type":"app_rate_limited","team_id":"T1","minute_rate_limited":1518467820}"#;
        assert!(matches!(parse(limited, "a", "i", "", false, 0, String::new()), Ok(Event::RateLimited)));
        assert!(matches!(parse(b"{", "a", "i", "", false, 0, String::new()), Err(ParseError::Json(_))));
        let reaction = envelope(json!({"type": "reaction_added"}));
        assert!(
            matches!(parse(&reaction, "a", "i", "", false, 0, String::new()), Ok(Event::Other(k)) if k == "reaction_added")
        );
    }
}
