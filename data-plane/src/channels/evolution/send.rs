//! Sending through a tenant's Evolution server: `sendText` per chunk, `sendMedia`, and a typing
//! presence.

use crate::channels::SendError;
use crate::urls::ParsedUrls;
use omni_core::errors::root_cause;
use omni_proto::v1 as pb;
use serde_json::{Value, json};
use std::time::Duration;

const SEND_TIMEOUT: Duration = Duration::from_secs(30);

const SERVICE: &str = "Evolution";

#[derive(Clone)]
pub struct EvolutionClient {
    http: reqwest::Client,
    urls: ParsedUrls,
}

fn endpoint(evolution: &pb::NodeEvolution, action: &str) -> String {
    format!("{}/{action}/{}", evolution.url.trim_end_matches('/'), evolution.instance_name)
}

impl EvolutionClient {
    pub fn new(http: reqwest::Client) -> EvolutionClient {
        EvolutionClient { http, urls: ParsedUrls::default() }
    }

    /// Sends one text to `number` (the JID the message came from, LIDs and groups included).
    /// Returns Evolution's message id.
    pub async fn send_text(
        &self,
        evolution: &pb::NodeEvolution,
        number: &str,
        text: &str,
    ) -> Result<String, SendError> {
        self.post_message(evolution, "message/sendText", &json!({ "number": number, "text": text })).await
    }

    /// Sends one file (a URL Evolution fetches, or the bytes, base64) with an optional caption.
    /// Returns Evolution's message id.
    pub async fn send_media(
        &self,
        evolution: &pb::NodeEvolution,
        number: &str,
        media: &pb::OutboundMedia,
        caption: &str,
    ) -> Result<String, SendError> {
        use base64::Engine as _;
        let source = if media.url.is_empty() {
            base64::engine::general_purpose::STANDARD.encode(&media.data)
        } else {
            media.url.clone()
        };
        let mut body = json!({ "number": number, "mediatype": media.media_type, "media": source });
        for (key, value) in [("mimetype", &media.mime_type), ("fileName", &media.file_name)] {
            if !value.is_empty() {
                body[key] = json!(value);
            }
        }
        if !caption.is_empty() {
            body["caption"] = json!(caption);
        }
        self.post_message(evolution, "message/sendMedia", &body).await
    }

    /// Posts a message, trying again (three times in all) only when the request never left.
    async fn post_message(
        &self,
        evolution: &pb::NodeEvolution,
        action: &str,
        body: &Value,
    ) -> Result<String, SendError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.post_message_once(evolution, action, body).await {
                Err(e) if e.retryable() && attempt < 3 => {
                    tokio::time::sleep(Duration::from_millis(300 * attempt)).await
                }
                other => return other,
            }
        }
    }

    async fn post_message_once(
        &self,
        evolution: &pb::NodeEvolution,
        action: &str,
        body: &Value,
    ) -> Result<String, SendError> {
        let response = self
            .urls
            .post(&self.http, &endpoint(evolution, action))
            .header("apikey", &evolution.key)
            .timeout(SEND_TIMEOUT)
            .json(body)
            .send()
            .await
            .map_err(|e| SendError::without_answer(SERVICE, &e))?;
        let status = response.status().as_u16();
        let answer = response.text().await.unwrap_or_default();
        if (200..300).contains(&status) {
            let parsed: Value = serde_json::from_str(&answer).unwrap_or(Value::Null);
            return Ok(parsed.pointer("/key/id").and_then(Value::as_str).unwrap_or_default().to_owned());
        }
        let mut quoted: String = answer.chars().take(300).collect();
        if !evolution.key.is_empty() {
            // Evolution may echo the key; the error goes to traces and to API callers.
            quoted = quoted.replace(&evolution.key, "[redacted]");
        }
        Err(match status {
            // A gateway in front of Evolution gave up waiting: the message may have gone out.
            502 | 504 => SendError::Unknown(SERVICE, format!("HTTP {status}: {quoted}")),
            _ => SendError::Refused(SERVICE, format!("HTTP {status}: {quoted}")),
        })
    }

    /// Shows "typing" in the conversation for `for_ms` (best effort).
    pub async fn typing(&self, evolution: &pb::NodeEvolution, number: &str, for_ms: u64) {
        let result = self
            .urls
            .post(&self.http, &endpoint(evolution, "chat/sendPresence"))
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
