//! Sending through a tenant's Evolution server: `sendText` per chunk, `sendMedia`, and a typing
//! presence.

use crate::channels::SendError;
use crate::http_client::{CallError, HttpClient};
use http::HeaderName;
use omni_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::Duration;

const SEND_TIMEOUT: Duration = Duration::from_secs(30);

const SERVICE: &str = "Evolution";

const APIKEY: HeaderName = HeaderName::from_static("apikey");

/// The part of Evolution's answer to a send that Omni keeps.
#[derive(Deserialize)]
struct Sent {
    #[serde(default)]
    key: SentKey,
}

#[derive(Deserialize, Default)]
struct SentKey {
    #[serde(default)]
    id: String,
}

#[derive(Clone)]
pub struct EvolutionClient {
    http: HttpClient,
}

fn endpoint(evolution: &pb::NodeEvolution, action: &str) -> String {
    format!("{}/{action}/{}", evolution.url.trim_end_matches('/'), evolution.instance_name)
}

impl EvolutionClient {
    pub fn new(http: HttpClient) -> EvolutionClient {
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
        #[derive(Serialize)]
        struct SendText<'a> {
            number: &'a str,
            text: &'a str,
        }
        self.post_message(evolution, "message/sendText", &SendText { number, text }).await
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
        body: &(impl Serialize + Sync),
    ) -> Result<String, SendError> {
        let body = bytes::Bytes::from(serde_json::to_vec(body).expect("JSON values serialize"));
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.post_message_once(evolution, action, body.clone()).await {
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
        body: bytes::Bytes,
    ) -> Result<String, SendError> {
        let sent =
            self.http.post_json(&endpoint(evolution, action), &[(APIKEY, &evolution.key)], body, SEND_TIMEOUT).await;
        let (status, answer) = match sent {
            Ok(answer) if answer.is_success() => {
                return Ok(serde_json::from_slice::<Sent>(&answer.body).map(|sent| sent.key.id).unwrap_or_default());
            }
            Ok(answer) => (answer.status, answer.text().into_owned()),
            // Evolution took the message; only its id is missing.
            Err(CallError::Unread { status: 200..=299, .. }) => return Ok(String::new()),
            Err(CallError::Unread { status, .. }) => (status, String::new()),
            Err(e @ CallError::Invalid(_)) => return Err(SendError::Refused(SERVICE, e.to_string())),
            Err(e) if e.never_sent() => return Err(SendError::NotSent(SERVICE, e.to_string())),
            Err(e) => return Err(SendError::Unknown(SERVICE, e.to_string())),
        };
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
        #[derive(Serialize)]
        struct Presence<'a> {
            number: &'a str,
            presence: &'a str,
            delay: u64,
        }
        let body =
            serde_json::to_vec(&Presence { number, presence: "composing", delay: for_ms }).expect("JSON serializes");
        let wait = Duration::from_millis(for_ms) + Duration::from_secs(5);
        let result = self
            .http
            .post_json(&endpoint(evolution, "chat/sendPresence"), &[(APIKEY, &evolution.key)], body.into(), wait)
            .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "typing presence not shown");
        }
    }
}
