//! Calling a tenant's agent: three wire protocols, retries on connection errors and 5xx within
//! the instance's time budget, and one answer text out.

use crate::channels::{Inbound, Media, RawJson};
use crate::http_client::{CallError, HttpClient};
use http::HeaderName;
use omni_proto::v1::{self as pb, AgentProtocol};
use serde::{Serialize, Serializer};
use serde_json::Value;
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum AgentError {
    #[error("no answer within the {0}s budget")]
    Timeout(u32),
    #[error("agent answered HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("agent unreachable: {0}")]
    Unreachable(String),
    #[error("agent reported failure: {0}")]
    Rejected(String),
    #[error("agent answer unreadable: {0}")]
    BadAnswer(String),
}

/// A successful call: the answer, and what was exchanged (for the trace; no keys in either).
#[derive(Debug)]
pub struct AgentAnswer {
    pub text: String,
    pub attempts: u32,
    /// What was sent, but the channel's payload (the trace has it from the message's arrival).
    pub request: RawJson,
    pub response: Value,
}

/// A request's body: the protocol's fields (a JSON object), then the channel's payload copied in
/// as it is. The fields are serialized once, for this and for the trace.
fn body(fields: &RawJson, channel_payload: Option<&serde_json::value::RawValue>) -> bytes::Bytes {
    let fields = fields.get();
    let (Some(payload), Some(open)) = (channel_payload, fields.strip_suffix('}')) else {
        return bytes::Bytes::copy_from_slice(fields.as_bytes());
    };
    let mut body = Vec::with_capacity(fields.len() + payload.get().len() + 24);
    body.extend_from_slice(open.as_bytes());
    if open != "{" {
        body.push(b',');
    }
    body.extend_from_slice(b"\"channel_payload\":");
    body.extend_from_slice(payload.get().as_bytes());
    body.push(b'}');
    body.into()
}

#[derive(Clone)]
pub struct AgentClient {
    http: HttpClient,
}

/// Who is asking, in the agent's terms.
pub struct Caller<'a> {
    pub user_id: &'a str,
    pub session_name: &'a str,
}

/// The sender as agents know them, in every protocol that sends one.
#[derive(Serialize)]
struct AgentUser<'a> {
    phone_number: PhoneNumber<'a>,
    email: Option<&'a str>,
    display_name: &'a str,
    user_data: UserData<'a>,
}

#[derive(Serialize)]
struct UserData<'a> {
    identity: &'a str,
    channel: &'a str,
}

/// `+` and the number on WhatsApp; empty elsewhere.
struct PhoneNumber<'a>(Option<&'a str>);

impl Serialize for PhoneNumber<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(number) => serializer.collect_str(&format_args!("+{number}")),
            None => serializer.serialize_str(""),
        }
    }
}

/// A message's media, each as agents read it.
struct MediaList<'a>(&'a [Media]);

impl Serialize for MediaList<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|m| MediaItem {
            kind: &m.kind,
            mime_type: &m.mime_type,
            url: &m.url,
            data: m.base64.as_deref(),
            file_name: &m.file_name,
            seconds: m.seconds,
            voice_note: m.voice_note,
        }))
    }
}

#[derive(Serialize)]
struct MediaItem<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    mime_type: &'a str,
    url: &'a str,
    data: Option<&'a str>,
    file_name: &'a str,
    seconds: Option<u64>,
    voice_note: bool,
}

/// `omni`: `POST {url}/api/agent/chat`.
#[derive(Serialize)]
struct OmniFields<'a> {
    user_id: &'a str,
    session_id: &'a str,
    session_name: &'a str,
    message: &'a str,
    message_type: &'a str,
    session_origin: &'a str,
    agent_id: &'a str,
    user: AgentUser<'a>,
    context: OmniContext<'a>,
    media: MediaList<'a>,
}

#[derive(Serialize)]
struct OmniContext<'a> {
    instance: &'a str,
    channel: &'a str,
    conversation_id: &'a str,
    is_group: bool,
}

/// `automagik`: `POST {url}/api/v1/agent/{agent id}/run`.
#[derive(Serialize)]
struct AutomagikFields<'a> {
    message_content: &'a str,
    message_type: &'a str,
    user_id: &'a str,
    user: AgentUser<'a>,
    session_name: &'a str,
    session_origin: &'a str,
    media_contents: MediaList<'a>,
    message_limit: u32,
}

/// `openai`: `POST {url}/v1/chat/completions`.
#[derive(Serialize)]
struct OpenaiFields<'a> {
    model: &'a str,
    messages: [OpenaiMessage<'a>; 1],
    user: &'a str,
}

#[derive(Serialize)]
struct OpenaiMessage<'a> {
    role: &'static str,
    content: &'a str,
}

fn snippet(text: &str) -> String {
    text.chars().take(300).collect()
}

impl AgentClient {
    pub fn new(http: HttpClient) -> AgentClient {
        AgentClient { http }
    }

    /// The URL and body fields of one protocol (serialized once, for the request and its
    /// trace), and whether the channel's payload goes with them.
    fn request(
        agent: &pb::NodeAgent,
        inbound: &Inbound,
        caller: &Caller<'_>,
        channel: &str,
    ) -> (String, RawJson, bool) {
        let base = agent.url.trim_end_matches('/');
        let user = || AgentUser {
            phone_number: PhoneNumber((channel == "whatsapp").then_some(inbound.sender.as_str())),
            email: None,
            display_name: &inbound.sender_name,
            user_data: UserData { identity: &inbound.sender, channel },
        };
        match AgentProtocol::try_from(agent.protocol).unwrap_or(AgentProtocol::Omni) {
            AgentProtocol::Automagik => (
                format!("{base}/api/v1/agent/{}/run", agent.agent_id),
                RawJson::new(&AutomagikFields {
                    message_content: &inbound.text,
                    message_type: &inbound.message_type,
                    user_id: caller.user_id,
                    user: user(),
                    session_name: caller.session_name,
                    session_origin: channel,
                    media_contents: MediaList(&inbound.media),
                    message_limit: 100,
                }),
                true,
            ),
            AgentProtocol::Openai => (
                format!("{base}/v1/chat/completions"),
                RawJson::new(&OpenaiFields {
                    model: &agent.agent_id,
                    messages: [OpenaiMessage { role: "user", content: &inbound.text }],
                    user: caller.user_id,
                }),
                false,
            ),
            AgentProtocol::Omni | AgentProtocol::Unspecified => (
                format!("{base}/api/agent/chat"),
                RawJson::new(&OmniFields {
                    user_id: caller.user_id,
                    session_id: caller.session_name,
                    session_name: caller.session_name,
                    message: &inbound.text,
                    message_type: &inbound.message_type,
                    session_origin: channel,
                    agent_id: &agent.agent_id,
                    user: user(),
                    context: OmniContext {
                        instance: &inbound.instance,
                        channel,
                        conversation_id: &inbound.conversation,
                        is_group: inbound.is_group,
                    },
                    media: MediaList(&inbound.media),
                }),
                true,
            ),
        }
    }

    fn answer(protocol: AgentProtocol, body: &Value) -> Result<String, AgentError> {
        if body.get("success") == Some(&Value::Bool(false)) {
            let why = body.get("error").or_else(|| body.get("message")).map(Value::to_string).unwrap_or_default();
            return Err(AgentError::Rejected(snippet(&why)));
        }
        let text = match protocol {
            AgentProtocol::Openai => body.pointer("/choices/0/message/content").and_then(Value::as_str),
            AgentProtocol::Automagik => body.get("message").and_then(Value::as_str),
            _ => ["message", "text", "response"].iter().find_map(|k| body.get(*k).and_then(Value::as_str)),
        };
        match (text, body) {
            (Some(text), _) => Ok(text.to_owned()),
            (None, Value::String(text)) => Ok(text.clone()),
            _ => Err(AgentError::BadAnswer(format!("no answer text in {}", snippet(&body.to_string())))),
        }
    }

    pub async fn call(
        &self,
        agent: &pb::NodeAgent,
        inbound: &Inbound,
        caller: &Caller<'_>,
        channel: &str,
    ) -> Result<AgentAnswer, AgentError> {
        let protocol = AgentProtocol::try_from(agent.protocol).unwrap_or(AgentProtocol::Omni);
        let (url, fields, with_payload) = Self::request(agent, inbound, caller, channel);
        let body = body(&fields, with_payload.then(|| inbound.raw.as_raw()));
        let budget = Duration::from_secs(u64::from(agent.timeout_seconds.max(1)));
        let deadline = Instant::now() + budget;
        let mut backoff = Duration::from_millis(200);
        let bearer;
        let mut headers: Vec<(HeaderName, &str)> = Vec::with_capacity(2);
        if !agent.key.is_empty() {
            headers.push((HeaderName::from_static("x-api-key"), &agent.key));
            if protocol != AgentProtocol::Automagik {
                bearer = format!("Bearer {}", agent.key);
                headers.push((http::header::AUTHORIZATION, &bearer));
            }
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(AgentError::Timeout(agent.timeout_seconds));
            }
            let retryable = match self.http.post_json(&url, &headers, body.clone(), remaining).await {
                Ok(answer) if answer.is_success() => {
                    let parsed: Value = serde_json::from_slice(&answer.body)
                        .unwrap_or_else(|_| Value::String(answer.text().into_owned()));
                    let text = Self::answer(protocol, &parsed)?;
                    return Ok(AgentAnswer { text, attempts, request: fields, response: parsed });
                }
                Ok(answer) => {
                    let status = answer.status;
                    let error = AgentError::Status { status, body: snippet(&answer.text()) };
                    if status < 500 && status != 429 {
                        return Err(error);
                    }
                    error
                }
                Err(CallError::Timeout(_)) => return Err(AgentError::Timeout(agent.timeout_seconds)),
                // The agent answered; what it answered cannot be read (asking again would run it
                // again), unless it failed.
                Err(CallError::Unread { status, why }) if status < 500 => return Err(AgentError::BadAnswer(why)),
                Err(CallError::Unread { status, why }) => AgentError::Status { status, body: snippet(&why) },
                Err(e @ CallError::Invalid(_)) => return Err(AgentError::Unreachable(e.to_string())),
                Err(e) => AgentError::Unreachable(e.to_string()),
            };
            let pause = backoff.min(deadline.saturating_duration_since(Instant::now()));
            if pause.is_zero() {
                return Err(retryable);
            }
            tracing::debug!(attempt = attempts, error = %retryable, "agent call failed; retrying");
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            if Instant::now() >= deadline {
                return Err(retryable);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_protocol_sends_its_fields() {
        let inbound = Inbound {
            id: "t1".into(),
            instance: "acme-wa".into(),
            instance_id: "i1".into(),
            external_id: "3EB0".into(),
            conversation: "5511999999999@s.whatsapp.net".into(),
            thread: String::new(),
            sender: "5511999999999".into(),
            sender_name: "Maria \"M\"".into(),
            text: "hi".into(),
            message_type: "imageMessage".into(),
            media: vec![Media {
                kind: "image".into(),
                mime_type: "image/jpeg".into(),
                url: "https://mmg.whatsapp.net/x".into(),
                base64: None,
                file_name: String::new(),
                seconds: None,
                voice_note: false,
            }],
            is_group: false,
            sent_at: 1,
            received_at: 2,
            raw: RawJson::default(),
        };
        let caller = Caller { user_id: "u1", session_name: "acme-wa_5511999999999" };
        let fields = |protocol: AgentProtocol, channel: &str| {
            let agent = pb::NodeAgent {
                url: "http://agent/".into(),
                agent_id: "bot".into(),
                protocol: protocol as i32,
                ..Default::default()
            };
            let (url, fields, with_payload) = AgentClient::request(&agent, &inbound, &caller, channel);
            (url, fields.to_value(), with_payload)
        };
        let media = json!([{
            "type": "image", "mime_type": "image/jpeg", "url": "https://mmg.whatsapp.net/x", "data": null,
            "file_name": "", "seconds": null, "voice_note": false,
        }]);
        let user = json!({
            "phone_number": "+5511999999999", "email": null, "display_name": "Maria \"M\"",
            "user_data": { "identity": "5511999999999", "channel": "whatsapp" },
        });
        assert_eq!(
            fields(AgentProtocol::Omni, "whatsapp"),
            (
                "http://agent/api/agent/chat".into(),
                json!({
                    "user_id": "u1", "session_id": "acme-wa_5511999999999", "session_name": "acme-wa_5511999999999",
                    "message": "hi", "message_type": "imageMessage", "session_origin": "whatsapp", "agent_id": "bot",
                    "user": user,
                    "context": {
                        "instance": "acme-wa", "channel": "whatsapp",
                        "conversation_id": "5511999999999@s.whatsapp.net", "is_group": false,
                    },
                    "media": media,
                }),
                true
            )
        );
        assert_eq!(
            fields(AgentProtocol::Automagik, "whatsapp"),
            (
                "http://agent/api/v1/agent/bot/run".into(),
                json!({
                    "message_content": "hi", "message_type": "imageMessage", "user_id": "u1", "user": user,
                    "session_name": "acme-wa_5511999999999", "session_origin": "whatsapp",
                    "media_contents": media, "message_limit": 100,
                }),
                true
            )
        );
        assert_eq!(
            fields(AgentProtocol::Openai, "whatsapp"),
            (
                "http://agent/v1/chat/completions".into(),
                json!({ "model": "bot", "messages": [{ "role": "user", "content": "hi" }], "user": "u1" }),
                false
            )
        );
        let slack = fields(AgentProtocol::Omni, "slack").1;
        assert_eq!(slack["user"]["phone_number"], "", "a phone number only on WhatsApp");
    }

    #[test]
    fn the_body_is_the_fields_with_the_channel_payload_copied_in() {
        let payload =
            serde_json::value::RawValue::from_string(r#"{"event":"messages.upsert","n":[1, 2]}"#.into()).unwrap();
        let fields = RawJson::new(&json!({ "message": "hi }", "user": { "id": 1 } }));
        let spliced: Value = serde_json::from_slice(&body(&fields, Some(&payload))).unwrap();
        assert_eq!(
            spliced,
            json!({ "message": "hi }", "user": { "id": 1 }, "channel_payload": { "event": "messages.upsert", "n": [1, 2] } })
        );
        let spliced: Value = serde_json::from_slice(&body_of_empty(&payload)).unwrap();
        assert_eq!(spliced, json!({ "channel_payload": { "event": "messages.upsert", "n": [1, 2] } }));
        assert_eq!(&body(&fields, None)[..], fields.get().as_bytes(), "without a payload, the fields alone");
    }

    fn body_of_empty(payload: &serde_json::value::RawValue) -> bytes::Bytes {
        body(&RawJson::new(&json!({})), Some(payload))
    }

    #[test]
    fn answers_by_protocol() {
        let omni = |v: Value| AgentClient::answer(AgentProtocol::Omni, &v);
        assert_eq!(omni(json!({"message": "hi"})).unwrap(), "hi");
        assert_eq!(omni(json!({"text": "hi"})).unwrap(), "hi");
        assert_eq!(omni(json!({"response": "hi"})).unwrap(), "hi");
        assert_eq!(omni(json!("plain")).unwrap(), "plain");
        assert!(matches!(omni(json!({"success": false, "error": "nope"})), Err(AgentError::Rejected(_))));
        assert!(matches!(omni(json!({"other": 1})), Err(AgentError::BadAnswer(_))));
        let openai = json!({"choices": [{"message": {"role": "assistant", "content": "hello"}}]});
        assert_eq!(AgentClient::answer(AgentProtocol::Openai, &openai).unwrap(), "hello");
        assert_eq!(AgentClient::answer(AgentProtocol::Automagik, &json!({"message": "ok"})).unwrap(), "ok");
    }
}
