//! Calling a tenant's agent: three wire protocols, retries on connection errors and 5xx within
//! the instance's time budget, and one answer text out.

use crate::channels::{Inbound, RawJson};
use crate::http_client::{CallError, HttpClient};
use http::HeaderName;
use omni_proto::v1::{self as pb, AgentProtocol};
use serde_json::{Value, json};
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

fn media_json(inbound: &Inbound) -> Vec<Value> {
    inbound
        .media
        .iter()
        .map(|m| {
            json!({
                "type": m.kind, "mime_type": m.mime_type, "url": m.url, "data": m.base64,
                "file_name": m.file_name, "seconds": m.seconds, "voice_note": m.voice_note,
            })
        })
        .collect()
}

fn snippet(text: &str) -> String {
    text.chars().take(300).collect()
}

impl AgentClient {
    pub fn new(http: HttpClient) -> AgentClient {
        AgentClient { http }
    }

    /// The URL and body fields of one protocol, and whether the channel's payload goes with them.
    fn request(agent: &pb::NodeAgent, inbound: &Inbound, caller: &Caller<'_>, channel: &str) -> (String, Value, bool) {
        let base = agent.url.trim_end_matches('/');
        let user = json!({
            "phone_number": if channel == "whatsapp" { format!("+{}", inbound.sender) } else { String::new() },
            "email": Value::Null,
            "display_name": inbound.sender_name,
            "user_data": { "identity": inbound.sender, "channel": channel },
        });
        match AgentProtocol::try_from(agent.protocol).unwrap_or(AgentProtocol::Omni) {
            AgentProtocol::Automagik => (
                format!("{base}/api/v1/agent/{}/run", agent.agent_id),
                json!({
                    "message_content": inbound.text,
                    "message_type": inbound.message_type,
                    "user_id": caller.user_id,
                    "user": user,
                    "session_name": caller.session_name,
                    "session_origin": channel,
                    "media_contents": media_json(inbound),
                    "message_limit": 100,
                }),
                true,
            ),
            AgentProtocol::Openai => (
                format!("{base}/v1/chat/completions"),
                json!({
                    "model": agent.agent_id,
                    "messages": [{ "role": "user", "content": inbound.text }],
                    "user": caller.user_id,
                }),
                false,
            ),
            AgentProtocol::Omni | AgentProtocol::Unspecified => (
                format!("{base}/api/agent/chat"),
                json!({
                    "user_id": caller.user_id,
                    "session_id": caller.session_name,
                    "session_name": caller.session_name,
                    "message": inbound.text,
                    "message_type": inbound.message_type,
                    "session_origin": channel,
                    "agent_id": agent.agent_id,
                    "user": user,
                    "context": {
                        "instance": inbound.instance,
                        "channel": channel,
                        "conversation_id": inbound.conversation,
                        "is_group": inbound.is_group,
                    },
                    "media": media_json(inbound),
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
        let fields = RawJson::new(&fields);
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
