//! Slack's Web API: `chat.postMessage` (in the thread), and files through the external upload
//! flow. API errors arrive as HTTP 200 with `ok:false` and are refusals; a 429 means nothing
//! was posted, so the post waits `Retry-After` and goes again (a few times at most).

use crate::channels::SendError;
use omni_core::errors::root_cause;
use omni_proto::v1 as pb;
use serde_json::{Value, json};
use std::time::Duration;

const SERVICE: &str = "Slack";
const TIMEOUT: Duration = Duration::from_secs(30);
/// Posts rate limited this many times in a row give up.
const MAX_RATE_LIMITED: u32 = 3;
/// A Retry-After longer than this is not waited for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct SlackClient {
    http: reqwest::Client,
    /// `https://slack.com/api` unless configured otherwise.
    base: String,
}

impl SlackClient {
    pub const DEFAULT_API_URL: &str = "https://slack.com/api";

    pub fn new(http: reqwest::Client, base: &str) -> SlackClient {
        SlackClient { http, base: base.trim_end_matches('/').to_owned() }
    }

    /// Posts `text` to `channel`, in `thread` when set. Returns the message's `ts`.
    pub async fn post_message(
        &self,
        token: &str,
        channel: &str,
        thread: &str,
        text: &str,
    ) -> Result<String, SendError> {
        let mut body = json!({ "channel": channel, "text": text });
        if !thread.is_empty() {
            body["thread_ts"] = json!(thread);
        }
        let answer = self.call(token, "chat.postMessage", &body).await?;
        Ok(answer["ts"].as_str().unwrap_or_default().to_owned())
    }

    /// A file: from a URL, posted as a link Slack unfurls; from bytes, uploaded
    /// (`files.getUploadURLExternal`, the upload, `files.completeUploadExternal`).
    pub async fn send_media(
        &self,
        token: &str,
        channel: &str,
        media: &pb::OutboundMedia,
        caption: &str,
    ) -> Result<String, SendError> {
        if !media.url.is_empty() {
            let text = if caption.is_empty() { media.url.clone() } else { format!("{caption}\n{}", media.url) };
            return self.post_message(token, channel, "", &text).await;
        }
        let name = if media.file_name.is_empty() { "file" } else { media.file_name.as_str() };
        let slot = self
            .form(token, "files.getUploadURLExternal", &[("filename", name), ("length", &media.data.len().to_string())])
            .await?;
        let (Some(upload_url), Some(file_id)) = (slot["upload_url"].as_str(), slot["file_id"].as_str()) else {
            return Err(SendError::Refused(SERVICE, "files.getUploadURLExternal gave no upload_url".into()));
        };
        let uploaded = self
            .http
            .post(upload_url)
            .timeout(TIMEOUT)
            .body(media.data.clone())
            .send()
            .await
            .map_err(|e| SendError::NotSent(SERVICE, root_cause(&e)))?;
        if !uploaded.status().is_success() {
            return Err(SendError::Refused(SERVICE, format!("file upload: HTTP {}", uploaded.status().as_u16())));
        }
        let mut complete = json!({ "files": [{ "id": file_id, "title": name }], "channel_id": channel });
        if !caption.is_empty() {
            complete["initial_comment"] = json!(caption);
        }
        self.call(token, "files.completeUploadExternal", &complete).await?;
        Ok(file_id.to_owned())
    }

    async fn form(&self, token: &str, method: &str, fields: &[(&str, &str)]) -> Result<Value, SendError> {
        let body = fields.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect::<Vec<_>>().join("&");
        self.send(token, method, "application/x-www-form-urlencoded", body.into_bytes()).await
    }

    async fn call(&self, token: &str, method: &str, body: &Value) -> Result<Value, SendError> {
        let bytes = serde_json::to_vec(body).expect("JSON values serialize");
        self.send(token, method, "application/json; charset=utf-8", bytes).await
    }

    async fn send(&self, token: &str, method: &str, content_type: &str, body: Vec<u8>) -> Result<Value, SendError> {
        // Shared, not copied, by each attempt.
        let body = axum::body::Bytes::from(body);
        let mut rate_limited = 0;
        loop {
            let response = self
                .http
                .post(format!("{}/{method}", self.base))
                .bearer_auth(token)
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .timeout(TIMEOUT)
                .body(body.clone())
                .send()
                .await
                .map_err(|e| SendError::without_answer(SERVICE, &e))?;
            let status = response.status().as_u16();
            if status == 429 {
                rate_limited += 1;
                let wait = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map_or(Duration::from_secs(1), Duration::from_secs);
                if rate_limited >= MAX_RATE_LIMITED || wait > MAX_RETRY_AFTER {
                    return Err(SendError::Refused(SERVICE, format!("{method}: rate limited (retry after {wait:?})")));
                }
                tracing::debug!(method, ?wait, "Slack rate limit: waiting as Retry-After says");
                tokio::time::sleep(wait).await;
                continue;
            }
            let text = response.text().await.unwrap_or_default();
            if status >= 500 {
                // Slack may have done it before failing.
                return Err(SendError::Unknown(SERVICE, format!("{method}: HTTP {status}")));
            }
            let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            if status != 200 {
                return Err(SendError::Refused(SERVICE, format!("{method}: HTTP {status}")));
            }
            if answer["ok"] != Value::Bool(true) {
                let error = answer["error"].as_str().unwrap_or("no ok:true in the answer");
                return Err(SendError::Refused(SERVICE, format!("{method}: {error}")));
            }
            return Ok(answer);
        }
    }
}

/// Percent-encodes a form value.
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(byte as char),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}
