//! Replies through a tenant's Evolution server: `sendText` per chunk and a typing presence.

use crate::agent::root_cause;
use omni_proto::v1 as pb;
use serde_json::{Value, json};
use std::time::Duration;

const SEND_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The request never left: safe to try again.
    #[error("Evolution unreachable: {0}")]
    NotSent(String),
    /// It may or may not have been delivered: never resend.
    #[error("no answer from Evolution: {0}")]
    Unknown(String),
    #[error("Evolution answered HTTP {status}: {body}")]
    Refused { status: u16, body: String },
}

impl SendError {
    pub fn retryable(&self) -> bool {
        matches!(self, SendError::NotSent(_))
    }
}

#[derive(Clone)]
pub struct EvolutionClient {
    http: reqwest::Client,
}

fn endpoint(evolution: &pb::NodeEvolution, action: &str) -> String {
    format!("{}/{action}/{}", evolution.url.trim_end_matches('/'), evolution.instance_name)
}

impl EvolutionClient {
    pub fn new(http: reqwest::Client) -> EvolutionClient {
        EvolutionClient { http }
    }

    /// Sends one text to `number` (the JID the message came from, LIDs and groups included).
    /// Returns Evolution's message id.
    pub async fn send_text(
        &self,
        evolution: &pb::NodeEvolution,
        number: &str,
        text: &str,
    ) -> Result<String, SendError> {
        let response = self
            .http
            .post(endpoint(evolution, "message/sendText"))
            .header("apikey", &evolution.key)
            .timeout(SEND_TIMEOUT)
            .json(&json!({ "number": number, "text": text }))
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() { SendError::NotSent(root_cause(&e)) } else { SendError::Unknown(root_cause(&e)) }
            })?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(SendError::Refused { status: status.as_u16(), body: body.chars().take(300).collect() });
        }
        let parsed: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        Ok(parsed.pointer("/key/id").and_then(Value::as_str).unwrap_or_default().to_owned())
    }

    /// Shows "typing…" to `number` for up to `for_ms`. Evolution holds the response that long,
    /// so callers run this in the background and may drop it at any time.
    pub async fn typing(&self, evolution: &pb::NodeEvolution, number: &str, for_ms: u64) {
        let result = self
            .http
            .post(endpoint(evolution, "chat/sendPresence"))
            .header("apikey", &evolution.key)
            .timeout(Duration::from_millis(for_ms) + Duration::from_secs(5))
            .json(&json!({ "number": number, "presence": "composing", "delay": for_ms }))
            .send()
            .await;
        if let Err(e) = result {
            tracing::debug!(error = %root_cause(&e), "typing presence not shown");
        }
    }
}
