//! A loopback Slack Web API (`chat.postMessage`) that records posts, plus signed Events API
//! bodies for driving the hub's Slack webhook.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::post;
use serde_json::{Map, Value, json};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The workspace and app every built event claims to come from.
pub const TEAM_ID: &str = "T0OMNI";
pub const API_APP_ID: &str = "A0OMNI";

/// One accepted `chat.postMessage`.
#[derive(Debug, Clone)]
pub struct SlackPost {
    /// When it arrived.
    pub at: Instant,
    /// The bearer token it was sent with.
    pub token: String,
    pub channel: String,
    pub text: String,
    pub thread_ts: Option<String>,
    /// The `ts` the fake gave the new message.
    pub ts: String,
    /// The whole request body (form bodies as an object of strings).
    pub body: Value,
}

#[derive(Default)]
struct Slack {
    tokens: HashSet<String>,
    /// Channel → the error every post to it gets.
    failing: HashMap<String, String>,
    /// (posts still to refuse with 429, their Retry-After seconds).
    rate_limit: (usize, u64),
    posts: Vec<SlackPost>,
    rate_limited: Vec<Instant>,
    /// Files announced by `files.getUploadURLExternal`: id → (name, announced length, bytes).
    files: HashMap<String, (String, usize, Option<Vec<u8>>)>,
    /// `files.completeUploadExternal` calls, as received.
    shared: Vec<Value>,
    base: String,
}

type SlackState = Arc<Mutex<Slack>>;

/// Slack's Web API: `POST /api/chat.postMessage`, JSON or form body, bearer-token auth, with
/// Slack's error conventions (HTTP 200 `ok:false`, HTTP 429 + `Retry-After`).
#[derive(Clone)]
pub struct FakeSlack {
    /// The API base the hub is configured with (`http://127.0.0.1:PORT/api`).
    pub api_url: String,
    state: SlackState,
}

impl FakeSlack {
    /// Starts the fake on a free loopback port.
    pub async fn start() -> FakeSlack {
        let state = SlackState::default();
        let router = Router::new()
            .route("/api/chat.postMessage", post(post_message))
            .route("/api/files.getUploadURLExternal", post(upload_url))
            .route("/upload/{id}", post(upload))
            .route("/api/files.completeUploadExternal", post(complete_upload))
            .with_state(state.clone());
        let base = crate::fakes::serve(router).await;
        state.lock().unwrap().base = base.clone();
        FakeSlack { api_url: format!("{base}/api"), state }
    }

    /// Accepts `token` (an `xoxb-…` bot token) as a bearer token.
    pub fn bot_token(&self, token: &str) {
        self.state.lock().unwrap().tokens.insert(token.to_owned());
    }

    /// Every post to `channel` fails with `{"ok":false,"error":error}`.
    pub fn fail_channel(&self, channel: &str, error: &str) {
        self.state.lock().unwrap().failing.insert(channel.to_owned(), error.to_owned());
    }

    /// The next `n` authorized posts get HTTP 429 with `Retry-After: retry_after_secs`.
    pub fn rate_limit_next(&self, n: usize, retry_after_secs: u64) {
        self.state.lock().unwrap().rate_limit = (n, retry_after_secs);
    }

    /// Accepted posts, in arrival order.
    pub fn posts(&self) -> Vec<SlackPost> {
        self.state.lock().unwrap().posts.clone()
    }

    /// Files shared with `files.completeUploadExternal`: (name, bytes uploaded, the call's body).
    pub fn shared_files(&self) -> Vec<(String, Vec<u8>, Value)> {
        let state = self.state.lock().unwrap();
        state
            .shared
            .iter()
            .filter_map(|call| {
                let id = call.pointer("/files/0/id")?.as_str()?;
                let (name, _, bytes) = state.files.get(id)?;
                Some((name.clone(), bytes.clone().unwrap_or_default(), call.clone()))
            })
            .collect()
    }

    /// Arrival times of the posts refused with 429.
    pub fn rate_limited(&self) -> Vec<Instant> {
        self.state.lock().unwrap().rate_limited.clone()
    }
}

fn slack_error(error: &str) -> Response {
    Json(json!({"ok": false, "error": error})).into_response()
}

/// The body's fields as JSON: Slack takes both JSON and form-encoded bodies.
fn fields(headers: &HeaderMap, body: &[u8]) -> Value {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if content_type.starts_with("application/x-www-form-urlencoded") {
        let form: Map<String, Value> =
            form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), Value::String(v.into_owned()))).collect();
        Value::Object(form)
    } else {
        serde_json::from_slice(body).unwrap_or(Value::Null)
    }
}

fn bearer(headers: &HeaderMap) -> String {
    let value = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or_default();
    value.strip_prefix("Bearer ").unwrap_or_default().to_owned()
}

/// `files.getUploadURLExternal` (form: filename, length): where to upload, and the file's id.
async fn upload_url(State(state): State<SlackState>, headers: HeaderMap, body: Bytes) -> Response {
    let body = fields(&headers, &body);
    let mut state = state.lock().unwrap();
    if !state.tokens.contains(&bearer(&headers)) {
        return slack_error("invalid_auth");
    }
    let (Some(name), Some(length)) =
        (body["filename"].as_str(), body["length"].as_str().and_then(|l| l.parse::<usize>().ok()))
    else {
        return slack_error("invalid_arguments");
    };
    let id = format!("F{:05}", state.files.len() + 1);
    state.files.insert(id.clone(), (name.to_owned(), length, None));
    let upload_url = format!("{}/upload/{id}", state.base);
    Json(json!({"ok": true, "upload_url": upload_url, "file_id": id})).into_response()
}

/// The upload itself: the bytes, which must be as long as announced.
async fn upload(State(state): State<SlackState>, Path(id): Path<String>, body: Bytes) -> Response {
    let mut state = state.lock().unwrap();
    match state.files.get_mut(&id) {
        Some((_, length, bytes)) if *length == body.len() => {
            *bytes = Some(body.to_vec());
            (StatusCode::OK, "OK - ").into_response()
        }
        _ => StatusCode::BAD_REQUEST.into_response(),
    }
}

/// `files.completeUploadExternal` (JSON: files[{id,title}], channel_id, initial_comment).
async fn complete_upload(State(state): State<SlackState>, headers: HeaderMap, body: Bytes) -> Response {
    let body = fields(&headers, &body);
    let mut state = state.lock().unwrap();
    if !state.tokens.contains(&bearer(&headers)) {
        return slack_error("invalid_auth");
    }
    let uploaded = body
        .pointer("/files/0/id")
        .and_then(Value::as_str)
        .and_then(|id| state.files.get(id))
        .is_some_and(|(_, _, bytes)| bytes.is_some());
    if !uploaded {
        return slack_error("file_not_found");
    }
    state.shared.push(body);
    Json(json!({"ok": true, "files": [{"id": "F", "title": "t"}]})).into_response()
}

async fn post_message(State(state): State<SlackState>, headers: HeaderMap, body: Bytes) -> Response {
    let token = bearer(&headers);
    let body = fields(&headers, &body);
    let mut state = state.lock().unwrap();
    if !state.tokens.contains(&token) {
        return slack_error("invalid_auth");
    }
    if state.rate_limit.0 > 0 {
        state.rate_limit.0 -= 1;
        state.rate_limited.push(Instant::now());
        let retry_after = state.rate_limit.1.to_string();
        let answer = Json(json!({"ok": false, "error": "ratelimited"}));
        return (StatusCode::TOO_MANY_REQUESTS, [(header::RETRY_AFTER, retry_after)], answer).into_response();
    }
    let channel = body["channel"].as_str().unwrap_or_default().to_owned();
    if channel.is_empty() {
        return slack_error("channel_not_found");
    }
    if let Some(error) = state.failing.get(&channel) {
        return slack_error(error);
    }
    let text = body["text"].as_str().unwrap_or_default().to_owned();
    if text.is_empty() && body.get("blocks").is_none() {
        return slack_error("no_text");
    }
    // Unique within this fake even when many posts land in one second.
    let ts = format!("{}.{:06}", unix_secs(), state.posts.len() + 1);
    let thread_ts = body["thread_ts"].as_str().filter(|t| !t.is_empty()).map(str::to_owned);
    let mut message = json!({"type": "message", "text": text, "ts": ts, "bot_id": "B0OMNI", "team": TEAM_ID});
    if let Some(parent) = &thread_ts {
        message["thread_ts"] = json!(parent);
    }
    let post = SlackPost { at: Instant::now(), token, channel: channel.clone(), text, thread_ts, ts: ts.clone(), body };
    state.posts.push(post);
    Json(json!({"ok": true, "channel": channel, "ts": ts, "message": message})).into_response()
}

fn unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// `v0=<hex HMAC-SHA256(secret, "v0:{timestamp}:{body}")>`, Slack's `X-Slack-Signature`.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("v0:{timestamp}:").as_bytes());
    mac.update(body);
    let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("v0={hex}")
}

/// The two signing headers for `body`, timestamped now.
pub fn signed_headers(secret: &str, body: &[u8]) -> [(&'static str, String); 2] {
    let now = unix_secs() as i64;
    [("x-slack-request-timestamp", now.to_string()), ("x-slack-signature", sign(secret, now, body))]
}

/// A fresh, process-unique message `ts` ("secs.micros" of now).
pub fn now_ts() -> String {
    // The counter keeps two calls in the same microsecond apart.
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64;
    let last = LAST.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| Some(now.max(last + 1))).unwrap();
    let micros = now.max(last + 1);
    format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

/// An `event_callback` envelope carrying `event`, addressed to the bot user `bot_user_id`.
pub fn event(event_id: &str, bot_user_id: &str, event: Value) -> Value {
    json!({
        "token": "Jhj5dZrVaK7ZwHHjRyZWjbDl",
        "team_id": TEAM_ID,
        "api_app_id": API_APP_ID,
        "event": event,
        "type": "event_callback",
        "event_id": event_id,
        "event_time": unix_secs(),
        "event_context": format!("EC-{event_id}"),
        "authorizations": [{"enterprise_id": null, "team_id": TEAM_ID, "user_id": bot_user_id, "is_bot": true, "is_enterprise_install": false}],
        "is_ext_shared_channel": false,
        "context_team_id": TEAM_ID,
        "context_enterprise_id": null,
    })
}

/// A user's `message` event (`channel_type`: channel, group, im or mpim).
pub fn message_event(channel: &str, channel_type: &str, user: &str, text: &str, ts: &str) -> Value {
    json!({
        "type": "message", "channel": channel, "channel_type": channel_type, "user": user, "text": text,
        "ts": ts, "event_ts": ts, "client_msg_id": format!("cm-{ts}"), "team": TEAM_ID,
    })
}

/// An `app_mention` event (`text` should contain `<@BOT_USER_ID>`).
pub fn app_mention(channel: &str, user: &str, text: &str, ts: &str) -> Value {
    json!({"type": "app_mention", "channel": channel, "user": user, "text": text, "ts": ts, "event_ts": ts, "team": TEAM_ID})
}

/// The `url_verification` body Slack sends when the Request URL is set.
pub fn url_verification(challenge: &str) -> Value {
    json!({"token": "Jhj5dZrVaK7ZwHHjRyZWjbDl", "challenge": challenge, "type": "url_verification"})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::http_post;

    #[test]
    fn sign_matches_slacks_documented_vector() {
        let body = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
        assert_eq!(
            sign("8f742231b10e8888abcd99yyyzzz85a5", 1531420618, body.as_bytes()),
            "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
        );
    }

    #[test]
    fn now_ts_is_unique_and_increasing() {
        let all: Vec<String> = (0..1000).map(|_| now_ts()).collect();
        let parsed: Vec<f64> = all.iter().map(|t| t.parse().unwrap()).collect();
        assert!(parsed.windows(2).all(|w| w[0] < w[1]), "{all:?}");
    }

    #[test]
    fn form_bodies_are_read_like_json_ones() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, "application/x-www-form-urlencoded".parse().unwrap());
        let body = fields(&headers, b"channel=C1&text=hi%20there&thread_ts=1.2");
        assert_eq!(body, json!({"channel": "C1", "text": "hi there", "thread_ts": "1.2"}));
    }

    #[tokio::test]
    async fn post_message_answers_as_slack_does() {
        let slack = FakeSlack::start().await;
        slack.bot_token("xoxb-good");
        slack.fail_channel("C_BAD", "channel_not_found");
        let addr = slack.api_url.trim_start_matches("http://").trim_end_matches("/api").to_owned();
        let post = |token: &'static str, body: Value| {
            let addr = addr.clone();
            async move {
                let auth = format!("Bearer {token}");
                let (status, answer) =
                    http_post(&addr, "/api/chat.postMessage", &[("authorization", &auth)], body.to_string().as_bytes())
                        .await
                        .unwrap();
                (status, serde_json::from_str::<Value>(&answer).unwrap())
            }
        };

        let (status, answer) = post("xoxb-bad", json!({"channel": "C1", "text": "hi"})).await;
        assert_eq!((status, answer["error"].as_str()), (200, Some("invalid_auth")));
        let (status, answer) = post("xoxb-good", json!({"channel": "C_BAD", "text": "hi"})).await;
        assert_eq!((status, answer["error"].as_str()), (200, Some("channel_not_found")));

        slack.rate_limit_next(1, 2);
        let (status, answer) = post("xoxb-good", json!({"channel": "C1", "text": "hi", "thread_ts": "1.2"})).await;
        assert_eq!((status, answer["error"].as_str()), (429, Some("ratelimited")));
        let (status, answer) = post("xoxb-good", json!({"channel": "C1", "text": "hi", "thread_ts": "1.2"})).await;
        assert_eq!((status, answer["ok"].as_bool(), answer["channel"].as_str()), (200, Some(true), Some("C1")));

        let posts = slack.posts();
        assert_eq!(posts.len(), 1);
        assert_eq!(slack.rate_limited().len(), 1);
        assert_eq!((posts[0].token.as_str(), posts[0].thread_ts.as_deref()), ("xoxb-good", Some("1.2")));
        assert_eq!(answer["ts"].as_str(), Some(posts[0].ts.as_str()));
    }
}
