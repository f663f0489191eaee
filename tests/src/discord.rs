//! A loopback Discord: the gateway (WebSocket with plain JSON text frames, as twilight 0.18 speaks
//! it without compression) and the REST API, each on its own port, sharing one set of bot tokens.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_websockets::{CloseCode, Message, ServerBuilder, WebSocketStream};

/// One accepted create-message request.
#[derive(Debug, Clone)]
pub struct DiscordPost {
    /// When it arrived.
    pub at: Instant,
    /// The bot token it was sent with (without "Bot ").
    pub token: String,
    pub channel_id: String,
    pub content: String,
    /// The nonce, as a string whether it came as a number or a string.
    pub nonce: Option<String>,
    /// (file name, size in bytes) of each attached file.
    pub files: Vec<(String, usize)>,
    /// The JSON body (for multipart requests, the `payload_json` part).
    pub body: Value,
}

struct Bot {
    user_id: String,
    username: String,
}

#[derive(Default)]
struct TokenStats {
    live: usize,
    max_live: usize,
    identifies: usize,
    intents: Vec<u64>,
}

enum Command {
    Send(String),
    /// Drop the socket without a close frame.
    Drop,
}

struct Conn {
    /// Set once the connection identified or resumed: it is then a live session of this token.
    token: Option<String>,
    session: Option<String>,
    tx: mpsc::UnboundedSender<Command>,
}

#[derive(Default)]
struct Discord {
    gateway_url: String,
    heartbeat_ms: u64,
    bots: HashMap<String, Bot>,
    rejects: HashMap<String, u16>,
    stats: HashMap<String, TokenStats>,
    /// Session id → (token, last sequence number sent).
    sessions: HashMap<String, (String, u64)>,
    conns: HashMap<u64, Conn>,
    /// Token → the last dispatch frame sent to it.
    last_dispatch: HashMap<String, String>,
    next_id: u64,
    posts: Vec<DiscordPost>,
    typing: HashMap<String, usize>,
    /// (REST requests still to refuse with 429, their reset-after seconds).
    rate_limit: (usize, f64),
}

type Shared = Arc<Mutex<Discord>>;

/// What the gateway answers a client frame with.
enum Reply {
    Text(String),
    Close(u16, &'static str),
}

fn bare(token: &str) -> String {
    token.strip_prefix("Bot ").unwrap_or(token).to_owned()
}

fn close_reason(code: u16) -> &'static str {
    match code {
        4004 => "Authentication failed.",
        4005 => "Already authenticated.",
        4013 => "Invalid intent(s).",
        4014 => "Disallowed intent(s).",
        _ => "Rejected.",
    }
}

impl Discord {
    fn identify(&mut self, conn: u64, d: &Value) -> Result<String, (u16, &'static str)> {
        let token = bare(d["token"].as_str().unwrap_or_default());
        let stats = self.stats.entry(token.clone()).or_default();
        stats.identifies += 1;
        stats.intents.push(d["intents"].as_u64().unwrap_or_default());
        if self.conns.get(&conn).is_some_and(|c| c.token.is_some()) {
            return Err((4005, close_reason(4005)));
        }
        if let Some(&code) = self.rejects.get(&token) {
            return Err((code, close_reason(code)));
        }
        let Some(bot) = self.bots.get(&token) else { return Err((4004, close_reason(4004))) };
        self.next_id += 1;
        let session = format!("fake-session-{}", self.next_id);
        let ready = json!({
            "v": 10,
            "user": {"id": bot.user_id, "username": bot.username, "discriminator": "0", "avatar": null, "bot": true, "mfa_enabled": false},
            "guilds": [],
            "session_id": session,
            // twilight reconnects and resumes here, so it must be the fake, never the real Discord.
            "resume_gateway_url": self.gateway_url,
            "shard": d.get("shard").cloned().unwrap_or(json!([0, 1])),
            "application": {"id": bot.user_id, "flags": 0},
        });
        self.sessions.insert(session.clone(), (token.clone(), 1));
        self.go_live(conn, &token, session);
        Ok(json!({"op": 0, "s": 1, "t": "READY", "d": ready}).to_string())
    }

    fn resume(&mut self, conn: u64, d: &Value) -> String {
        let token = bare(d["token"].as_str().unwrap_or_default());
        let session = d["session_id"].as_str().unwrap_or_default();
        let fresh = self.conns.get(&conn).is_some_and(|c| c.token.is_none());
        let seq = match self.sessions.get_mut(session) {
            Some((owner, seq)) if *owner == token && fresh => {
                *seq += 1;
                *seq
            }
            // What Discord answers for a session it does not know: identify anew.
            _ => return json!({"op": 9, "d": false, "s": null, "t": null}).to_string(),
        };
        self.go_live(conn, &token, session.to_owned());
        json!({"op": 0, "t": "RESUMED", "s": seq, "d": {}}).to_string()
    }

    fn go_live(&mut self, conn: u64, token: &str, session: String) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.token = Some(token.to_owned());
            c.session = Some(session);
        }
        let stats = self.stats.entry(token.to_owned()).or_default();
        stats.live += 1;
        stats.max_live = stats.max_live.max(stats.live);
    }

    /// Ends a connection's session (if it had one) for the live count.
    fn end_session(&mut self, conn: u64) {
        if let Some(token) = self.conns.get_mut(&conn).and_then(|c| c.token.take()) {
            self.stats.get_mut(&token).unwrap().live -= 1;
        }
    }

    fn live_conns<'a>(&'a self, token: &'a str) -> impl Iterator<Item = (&'a u64, &'a Conn)> {
        self.conns.iter().filter(move |(_, c)| c.token.as_deref() == Some(token))
    }

    fn dispatch(&mut self, token: &str, event: &str, d: &Value) -> bool {
        let mut sent = false;
        for conn in self.conns.values().filter(|c| c.token.as_deref() == Some(token)) {
            let Some((_, seq)) = conn.session.as_ref().and_then(|s| self.sessions.get_mut(s)) else { continue };
            *seq += 1;
            let frame = json!({"op": 0, "s": *seq, "t": event, "d": d}).to_string();
            sent |= conn.tx.send(Command::Send(frame.clone())).is_ok();
            self.last_dispatch.insert(token.to_owned(), frame);
        }
        sent
    }

    /// The registered token of an `authorization: Bot <token>` header.
    fn authorized(&self, headers: &HeaderMap) -> Option<String> {
        let given = headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bot ")?;
        self.bots.contains_key(given).then(|| given.to_owned())
    }
}

/// Discord's gateway and REST API on loopback. Tokens registered with [`FakeDiscord::bot`] are
/// accepted by both; a session is live from a successful Identify or Resume until its socket
/// closes.
#[derive(Clone)]
pub struct FakeDiscord {
    /// The gateway, for twilight's `proxy_url` (`ws://127.0.0.1:PORT`).
    pub gateway_url: String,
    /// The REST host for twilight-http's `proxy(host, true)` (`127.0.0.1:PORT`).
    pub api_host: String,
    /// The REST base (`http://127.0.0.1:PORT`); routes live under `/api/v10`.
    pub api_url: String,
    state: Shared,
}

impl FakeDiscord {
    /// Starts the gateway and the REST API, each on a free loopback port.
    pub async fn start() -> FakeDiscord {
        let gateway = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway_url = format!("ws://{}", gateway.local_addr().unwrap());
        let discord = Discord { gateway_url: gateway_url.clone(), heartbeat_ms: 1000, ..Default::default() };
        let state = Arc::new(Mutex::new(discord));
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = gateway.accept().await {
                tokio::spawn(connection(shared.clone(), stream));
            }
        });

        let router = Router::new()
            .route("/api/v10/channels/{id}/messages", post(create_message))
            .route("/api/v10/channels/{id}/typing", post(typing))
            .route("/api/v10/gateway/bot", get(gateway_bot))
            .route("/api/v10/users/@me", get(current_user))
            .fallback(|| async { (StatusCode::NOT_FOUND, Json(json!({"message": "404: Not Found", "code": 0}))) })
            .with_state(state.clone());
        let api_url = crate::fakes::serve(router).await;
        let api_host = api_url.trim_start_matches("http://").to_owned();
        FakeDiscord { gateway_url, api_url, api_host, state }
    }

    /// Accepts `token` (without "Bot ") as the bot user `user_id` named `username`.
    pub fn bot(&self, token: &str, user_id: &str, username: &str) {
        let bot = Bot { user_id: user_id.to_owned(), username: username.to_owned() };
        self.state.lock().unwrap().bots.insert(token.to_owned(), bot);
    }

    /// Closes every Identify with `token` with `code` (4004 bad token, 4014 disallowed intents, …).
    pub fn reject_token(&self, token: &str, code: u16) {
        self.state.lock().unwrap().rejects.insert(token.to_owned(), code);
    }

    /// The heartbeat interval that later Hellos announce (default 1000 ms).
    pub fn heartbeat_interval(&self, millis: u64) {
        self.state.lock().unwrap().heartbeat_ms = millis;
    }

    /// The most sessions of `token` ever live at once.
    pub fn max_concurrent(&self, token: &str) -> usize {
        self.state.lock().unwrap().stats.get(token).map_or(0, |s| s.max_live)
    }

    /// Identify attempts with `token`, accepted or not.
    pub fn identifies(&self, token: &str) -> usize {
        self.state.lock().unwrap().stats.get(token).map_or(0, |s| s.identifies)
    }

    /// Whether `token` has a live session now.
    pub fn live(&self, token: &str) -> bool {
        self.state.lock().unwrap().stats.get(token).is_some_and(|s| s.live > 0)
    }

    /// The intents of each Identify with `token`, in order.
    pub fn intents(&self, token: &str) -> Vec<u64> {
        self.state.lock().unwrap().stats.get(token).map(|s| s.intents.clone()).unwrap_or_default()
    }

    /// Sends a `event` dispatch with the next sequence number to every live session of `token`
    /// (as Discord does); false if there is none.
    pub fn dispatch(&self, token: &str, event: &str, d: Value) -> bool {
        self.state.lock().unwrap().dispatch(token, event, &d)
    }

    /// Sends a MESSAGE_CREATE dispatch of `message` (see [`guild_message`], [`dm_message`]).
    pub fn dispatch_message(&self, token: &str, message: Value) -> bool {
        self.dispatch(token, "MESSAGE_CREATE", message)
    }

    /// Re-sends the last dispatch of `token`, sequence number included, as a resume would.
    pub fn replay_last(&self, token: &str) -> bool {
        let state = self.state.lock().unwrap();
        let Some(frame) = state.last_dispatch.get(token) else { return false };
        let mut sent = false;
        for (_, conn) in state.live_conns(token) {
            sent |= conn.tx.send(Command::Send(frame.clone())).is_ok();
        }
        sent
    }

    /// Drops every socket of `token` without a close frame; returns how many.
    pub fn disconnect_all(&self, token: &str) -> usize {
        let mut state = self.state.lock().unwrap();
        let conns: Vec<u64> = state.live_conns(token).map(|(id, _)| *id).collect();
        for id in &conns {
            let _ = state.conns[id].tx.send(Command::Drop);
            // Counted as gone now, so `live` is false as soon as this returns.
            state.end_session(*id);
        }
        conns.len()
    }

    /// The next `n` message posts or typing triggers get 429 with `reset_after_secs` in body
    /// and headers.
    pub fn rate_limit_next(&self, n: usize, reset_after_secs: f64) {
        self.state.lock().unwrap().rate_limit = (n, reset_after_secs);
    }

    /// Accepted create-message requests, in arrival order.
    pub fn messages(&self) -> Vec<DiscordPost> {
        self.state.lock().unwrap().posts.clone()
    }

    /// Typing indicators triggered in `channel_id`.
    pub fn typing(&self, channel_id: &str) -> usize {
        self.state.lock().unwrap().typing.get(channel_id).copied().unwrap_or_default()
    }
}

async fn connection(state: Shared, stream: TcpStream) {
    let Ok((_, mut ws)) = ServerBuilder::new().accept(stream).await else { return };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (id, hello) = {
        let mut s = state.lock().unwrap();
        s.next_id += 1;
        let id = s.next_id;
        s.conns.insert(id, Conn { token: None, session: None, tx });
        (id, json!({"op": 10, "d": {"heartbeat_interval": s.heartbeat_ms}, "s": null, "t": null}))
    };
    let _ = converse(&state, id, &mut ws, &mut rx, hello.to_string()).await;
    let mut s = state.lock().unwrap();
    s.end_session(id);
    s.conns.remove(&id);
}

async fn converse(
    state: &Shared,
    id: u64,
    ws: &mut WebSocketStream<TcpStream>,
    rx: &mut mpsc::UnboundedReceiver<Command>,
    hello: String,
) -> Result<(), tokio_websockets::Error> {
    ws.send(Message::text(hello)).await?;
    loop {
        tokio::select! {
            frame = ws.next() => {
                let Some(frame) = frame else { return Ok(()) };
                let Some(text) = frame?.as_text().map(str::to_owned) else { continue };
                match answer(state, id, &text) {
                    Some(Reply::Text(reply)) => ws.send(Message::text(reply)).await?,
                    Some(Reply::Close(code, reason)) => {
                        ws.send(Message::close(CloseCode::try_from(code).ok(), reason)).await?;
                        // Give the client the chance to answer the close before the socket goes.
                        let drain = async { while let Some(Ok(_)) = ws.next().await {} };
                        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
                        return Ok(());
                    }
                    None => {}
                }
            }
            command = rx.recv() => match command {
                Some(Command::Send(frame)) => ws.send(Message::text(frame)).await?,
                Some(Command::Drop) | None => return Ok(()),
            },
        }
    }
}

fn answer(state: &Shared, conn: u64, text: &str) -> Option<Reply> {
    let frame: Value = serde_json::from_str(text).ok()?;
    let mut state = state.lock().unwrap();
    match frame["op"].as_u64()? {
        1 => Some(Reply::Text(json!({"op": 11}).to_string())),
        2 => Some(match state.identify(conn, &frame["d"]) {
            Ok(ready) => Reply::Text(ready),
            Err((code, reason)) => Reply::Close(code, reason),
        }),
        6 => Some(Reply::Text(state.resume(conn, &frame["d"]))),
        _ => None,
    }
}

/// The rate-limit headers twilight-http needs to schedule (and, on 429, to wait) instead of
/// retrying in a hot loop.
fn ratelimit_headers(remaining: u32, reset_after: f64) -> [(&'static str, String); 6] {
    let reset = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64() + reset_after;
    [
        ("x-ratelimit-bucket", "fakebucket0001".into()),
        ("x-ratelimit-limit", "5".into()),
        ("x-ratelimit-remaining", remaining.to_string()),
        ("x-ratelimit-reset", format!("{reset:.3}")),
        ("x-ratelimit-reset-after", format!("{reset_after:.3}")),
        ("x-ratelimit-scope", "user".into()),
    ]
}

fn unauthorized() -> Response {
    (StatusCode::UNAUTHORIZED, Json(json!({"message": "401: Unauthorized", "code": 0}))).into_response()
}

/// The token of an authorized request, or the response refusing it (401, or a scripted 429).
fn admit(state: &mut Discord, headers: &HeaderMap) -> Result<String, Box<Response>> {
    let token = state.authorized(headers).ok_or_else(|| Box::new(unauthorized()))?;
    if state.rate_limit.0 > 0 {
        state.rate_limit.0 -= 1;
        let reset_after = state.rate_limit.1;
        let body = json!({"message": "You are being rate limited.", "retry_after": reset_after, "global": false});
        let retry_after = [(header::RETRY_AFTER, reset_after.ceil().to_string())];
        let headers = ratelimit_headers(0, reset_after);
        return Err(Box::new((StatusCode::TOO_MANY_REQUESTS, headers, retry_after, Json(body)).into_response()));
    }
    Ok(token)
}

async fn create_message(
    State(state): State<Shared>,
    Path(channel_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut state = state.lock().unwrap();
    let token = match admit(&mut state, &headers) {
        Ok(token) => token,
        Err(refused) => return *refused,
    };
    let (body, files) = message_body(&headers, &body);
    let content = body["content"].as_str().unwrap_or_default().to_owned();
    if content.is_empty() && files.is_empty() && body.get("embeds").is_none() {
        let error = json!({"message": "Cannot send an empty message", "code": 50006});
        return (StatusCode::BAD_REQUEST, Json(error)).into_response();
    }
    if content.chars().count() > 2000 {
        let error = json!({"message": "Invalid Form Body", "code": 50035, "errors": {"content": {"_errors": [{"code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 2000 or fewer in length."}]}}});
        return (StatusCode::BAD_REQUEST, Json(error)).into_response();
    }
    let nonce = match &body["nonce"] {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let bot = &state.bots[&token];
    let mut answer = json!({
        "id": snowflake(), "channel_id": channel_id,
        "author": {"id": bot.user_id, "username": bot.username, "discriminator": "0", "avatar": null, "bot": true},
        "content": content, "timestamp": timestamp(), "edited_timestamp": null, "tts": false,
        "mention_everyone": false, "mentions": [], "mention_roles": [], "attachments": [], "embeds": [],
        "pinned": false, "type": 0,
    });
    if let Some(nonce) = &nonce {
        answer["nonce"] = json!(nonce);
    }
    let post = DiscordPost { at: Instant::now(), token, channel_id, content, nonce, files, body };
    state.posts.push(post);
    (ratelimit_headers(4, 1.0), Json(answer)).into_response()
}

async fn typing(State(state): State<Shared>, Path(channel_id): Path<String>, headers: HeaderMap) -> Response {
    let mut state = state.lock().unwrap();
    if let Err(refused) = admit(&mut state, &headers) {
        return *refused;
    }
    *state.typing.entry(channel_id).or_default() += 1;
    (StatusCode::NO_CONTENT, ratelimit_headers(4, 1.0)).into_response()
}

async fn gateway_bot(State(state): State<Shared>, headers: HeaderMap) -> Response {
    let state = state.lock().unwrap();
    if state.authorized(&headers).is_none() {
        return unauthorized();
    }
    let limit = json!({"total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1});
    Json(json!({"url": state.gateway_url, "shards": 1, "session_start_limit": limit})).into_response()
}

async fn current_user(State(state): State<Shared>, headers: HeaderMap) -> Response {
    let state = state.lock().unwrap();
    let Some(token) = state.authorized(&headers) else { return unauthorized() };
    let bot = &state.bots[&token];
    Json(json!({
        "id": bot.user_id, "username": bot.username, "discriminator": "0", "avatar": null,
        "bot": true, "mfa_enabled": false, "accent_color": null, "banner": null,
    }))
    .into_response()
}

/// The create-message JSON and the attached files (name, size), from a JSON or multipart body.
fn message_body(headers: &HeaderMap, body: &[u8]) -> (Value, Vec<(String, usize)>) {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let boundary = content_type
        .strip_prefix("multipart/form-data")
        .and_then(|rest| rest.split_once("boundary="))
        .map(|(_, b)| b.split(';').next().unwrap_or_default().trim_matches('"'));
    let Some(boundary) = boundary else { return (serde_json::from_slice(body).unwrap_or(Value::Null), Vec::new()) };
    let (mut fields, mut files) = (Map::new(), Vec::new());
    for part in split(body, format!("--{boundary}").as_bytes()).into_iter().skip(1) {
        if part.starts_with(b"--") {
            break; // the closing delimiter
        }
        let part = part.strip_prefix(b"\r\n").unwrap_or(part);
        let part = part.strip_suffix(b"\r\n").unwrap_or(part);
        let Some(at) = find(part, b"\r\n\r\n") else { continue };
        let (head, data) = (String::from_utf8_lossy(&part[..at]), &part[at + 4..]);
        match (disposition(&head, "name"), disposition(&head, "filename")) {
            (_, Some(filename)) => files.push((filename, data.len())),
            (Some(name), None) if name == "payload_json" => {
                if let Ok(Value::Object(payload)) = serde_json::from_slice(data) {
                    fields.extend(payload);
                }
            }
            (Some(name), None) => {
                fields.insert(name, Value::String(String::from_utf8_lossy(data).into_owned()));
            }
            (None, None) => {}
        }
    }
    (Value::Object(fields), files)
}

/// A `Content-Disposition` parameter (`; name="…"`) of a part's headers.
fn disposition(head: &str, key: &str) -> Option<String> {
    let start = head.find(&format!("; {key}=\""))? + key.len() + 4;
    head[start..].split('"').next().map(str::to_owned)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn split<'a>(mut bytes: &'a [u8], delimiter: &[u8]) -> Vec<&'a [u8]> {
    let mut parts = Vec::new();
    while let Some(at) = find(bytes, delimiter) {
        parts.push(&bytes[..at]);
        bytes = &bytes[at + delimiter.len()..];
    }
    parts.push(bytes);
    parts
}

/// A fresh, process-unique snowflake dated now (Discord ids encode their creation time).
pub fn snowflake() -> String {
    const DISCORD_EPOCH_MS: u64 = 1_420_070_400_000;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64 - DISCORD_EPOCH_MS;
    ((ms << 22) | (COUNTER.fetch_add(1, Ordering::Relaxed) & 0x3F_FFFF)).to_string()
}

/// Now, as Discord writes timestamps (`2025-01-01T00:00:01.000000+00:00`).
pub fn timestamp() -> String {
    rfc3339(SystemTime::now().duration_since(UNIX_EPOCH).unwrap())
}

fn rfc3339(since_epoch: Duration) -> String {
    let (days, secs) = ((since_epoch.as_secs() / 86_400) as i64, since_epoch.as_secs() % 86_400);
    // Howard Hinnant's days-to-civil-date algorithm (proleptic Gregorian calendar).
    let z = days + 719_468;
    let (era, doe) = (z.div_euclid(146_097), z.rem_euclid(146_097));
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s, micros) = (secs / 3600, secs % 3600 / 60, secs % 60, since_epoch.subsec_micros());
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{micros:06}+00:00")
}

fn message(id: &str, channel_id: &str, author: Value, content: &str, mentions: &[(&str, &str)]) -> Value {
    let mentions: Vec<Value> = mentions
        .iter()
        .map(|(id, name)| json!({"id": id, "username": name, "discriminator": "0", "avatar": null, "public_flags": 0}))
        .collect();
    json!({
        "id": id, "channel_id": channel_id, "author": author, "content": content,
        "timestamp": timestamp(), "edited_timestamp": null, "tts": false, "mention_everyone": false,
        "mentions": mentions, "mention_roles": [], "attachments": [], "embeds": [], "pinned": false, "type": 0,
    })
}

fn author(id: &str, name: &str, bot: bool) -> Value {
    json!({"id": id, "username": name, "discriminator": "0", "avatar": null, "global_name": name, "bot": bot})
}

/// A MESSAGE_CREATE payload in a guild channel, timestamped now; `mentions` are (id, username).
#[expect(clippy::too_many_arguments, reason = "mirrors the fields a test varies")]
pub fn guild_message(
    id: &str,
    channel_id: &str,
    guild_id: &str,
    author_id: &str,
    author_name: &str,
    content: &str,
    mentions: &[(&str, &str)],
    bot: bool,
) -> Value {
    let mut message = message(id, channel_id, author(author_id, author_name, bot), content, mentions);
    message["guild_id"] = json!(guild_id);
    message["member"] =
        json!({"roles": [], "joined_at": "2024-01-01T00:00:00.000000+00:00", "deaf": false, "mute": false, "flags": 0});
    message
}

/// A MESSAGE_CREATE payload in a DM (no guild_id, no member), timestamped now.
pub fn dm_message(id: &str, channel_id: &str, author_id: &str, author_name: &str, content: &str) -> Value {
    message(id, channel_id, author(author_id, author_name, false), content, &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_websockets::MaybeTlsStream;

    type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

    async fn connect(fake: &FakeDiscord) -> Client {
        // The URL twilight dials without compression features.
        let url = format!("{}/?v=10&encoding=json", fake.gateway_url);
        tokio_websockets::ClientBuilder::new().uri(&url).unwrap().connect().await.unwrap().0
    }

    async fn recv(ws: &mut Client) -> Option<Message> {
        tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("a frame in time").and_then(Result::ok)
    }

    async fn recv_json(ws: &mut Client) -> Value {
        serde_json::from_str(recv(ws).await.unwrap().as_text().unwrap()).unwrap()
    }

    async fn send_json(ws: &mut Client, frame: Value) {
        ws.send(Message::text(frame.to_string())).await.unwrap();
    }

    /// Identify exactly as twilight 0.18 sends it.
    fn identify(token: &str) -> Value {
        json!({"op": 2, "d": {"capabilities": 0, "compress": false, "intents": 37376, "large_threshold": 50,
            "presence": null, "properties": {"browser": "twilight.rs", "device": "twilight.rs", "os": "linux"},
            "shard": [0, 1], "token": format!("Bot {token}")}})
    }

    /// Connects, checks Hello, identifies; returns the socket and the READY frame.
    async fn session(fake: &FakeDiscord, token: &str) -> (Client, Value) {
        let mut ws = connect(fake).await;
        let hello = recv_json(&mut ws).await;
        assert_eq!(hello, json!({"op": 10, "d": {"heartbeat_interval": 1000}, "s": null, "t": null}));
        send_json(&mut ws, identify(token)).await;
        let ready = recv_json(&mut ws).await;
        (ws, ready)
    }

    async fn wait_until(what: &str, check: impl Fn() -> bool) {
        crate::wait_for(what, Duration::from_secs(5), || std::future::ready(check().then_some(()))).await
    }

    #[tokio::test]
    async fn handshake_heartbeat_dispatch_and_resume() {
        let fake = FakeDiscord::start().await;
        fake.bot("tok", "999", "hubbot");
        let (mut ws, ready) = session(&fake, "tok").await;
        assert_eq!((ready["op"].as_u64(), ready["s"].as_u64(), ready["t"].as_str()), (Some(0), Some(1), Some("READY")));
        let parsed: twilight_model::gateway::payload::incoming::Ready =
            serde_json::from_value(ready["d"].clone()).unwrap();
        assert_eq!((parsed.user.id.get(), parsed.resume_gateway_url.as_str()), (999, fake.gateway_url.as_str()));
        assert!(fake.live("tok"));
        assert_eq!((fake.identifies("tok"), fake.intents("tok")), (1, vec![37376]));

        send_json(&mut ws, json!({"op": 1, "d": 1})).await;
        assert_eq!(recv_json(&mut ws).await, json!({"op": 11}));

        let message = guild_message("1100", "123", "456", "42", "alice", "<@999> hi", &[("999", "hubbot")], false);
        assert!(fake.dispatch_message("tok", message));
        let dispatch = recv_json(&mut ws).await;
        assert_eq!((dispatch["s"].as_u64(), dispatch["t"].as_str()), (Some(2), Some("MESSAGE_CREATE")));
        let parsed: twilight_model::channel::Message = serde_json::from_value(dispatch["d"].clone()).unwrap();
        assert_eq!((parsed.guild_id.map(|g| g.get()), parsed.mentions[0].id.get()), (Some(456), 999));
        assert!(fake.replay_last("tok"));
        assert_eq!(recv_json(&mut ws).await, dispatch);

        assert_eq!(fake.disconnect_all("tok"), 1);
        assert!(!fake.live("tok"));
        assert!(recv(&mut ws).await.is_none_or(|m| !m.is_close()), "dropped without a close frame");

        let mut ws = connect(&fake).await;
        recv_json(&mut ws).await;
        let session_id = parsed_session(&ready);
        send_json(&mut ws, json!({"op": 6, "d": {"token": "Bot tok", "session_id": session_id, "seq": 2}})).await;
        assert_eq!(recv_json(&mut ws).await, json!({"op": 0, "t": "RESUMED", "s": 3, "d": {}}));
        assert!(fake.live("tok"));
        assert_eq!((fake.identifies("tok"), fake.max_concurrent("tok")), (1, 1));
        drop(ws);
        wait_until("the closed socket to end the session", || !fake.live("tok")).await;
    }

    fn parsed_session(ready: &Value) -> String {
        ready["d"]["session_id"].as_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn bad_tokens_are_closed_with_their_code() {
        let fake = FakeDiscord::start().await;
        fake.bot("no-intents", "999", "hubbot");
        fake.reject_token("no-intents", 4014);
        for (token, code, reason) in
            [("unknown", 4004, "Authentication failed."), ("no-intents", 4014, "Disallowed intent(s).")]
        {
            let mut ws = connect(&fake).await;
            recv_json(&mut ws).await;
            send_json(&mut ws, identify(token)).await;
            let close = recv(&mut ws).await.expect("a close frame");
            let (got, why) = close.as_close().expect("a close frame");
            assert_eq!((u16::from(got), why), (code, reason));
            assert!(!fake.live(token));
            assert_eq!(fake.identifies(token), 1);
        }
    }

    #[tokio::test]
    async fn concurrent_sessions_of_one_token_are_counted() {
        let fake = FakeDiscord::start().await;
        fake.bot("tok", "999", "hubbot");
        let ((mut a, ready_a), (mut b, ready_b)) = tokio::join!(session(&fake, "tok"), session(&fake, "tok"));
        assert_ne!(parsed_session(&ready_a), parsed_session(&ready_b));
        assert_eq!(fake.max_concurrent("tok"), 2);

        // Discord sends guild events to every session of the bot: a duplicate shard sees them twice.
        assert!(fake.dispatch_message("tok", dm_message("1", "2", "42", "alice", "hi")));
        for ws in [&mut a, &mut b] {
            let dispatch = recv_json(ws).await;
            assert_eq!(dispatch["s"], 2);
            let parsed: twilight_model::channel::Message = serde_json::from_value(dispatch["d"].clone()).unwrap();
            assert!(parsed.guild_id.is_none() && parsed.member.is_none());
        }
        drop((a, b));
        wait_until("both sessions to end", || !fake.live("tok")).await;
        assert_eq!(fake.max_concurrent("tok"), 2);
    }

    #[tokio::test]
    async fn rest_records_messages_and_refuses_as_discord_does() {
        let fake = FakeDiscord::start().await;
        fake.bot("tok", "999", "hubbot");
        let post = |token: &'static str, body: Value| {
            let host = fake.api_host.clone();
            async move {
                let auth = format!("Bot {token}");
                let path = "/api/v10/channels/123/messages";
                let body = body.to_string();
                let (status, answer) =
                    crate::process::http_post(&host, path, &[("authorization", &auth)], body.as_bytes()).await.unwrap();
                (status, serde_json::from_str::<Value>(&answer).unwrap_or_default())
            }
        };
        assert_eq!(post("nope", json!({"content": "hi"})).await.0, 401);
        fake.rate_limit_next(1, 0.5);
        let (status, answer) = post("tok", json!({"content": "hi"})).await;
        assert_eq!((status, answer["retry_after"].as_f64()), (429, Some(0.5)));
        let (status, answer) = post("tok", json!({"content": "hi", "nonce": 7})).await;
        assert_eq!(status, 200);
        let parsed: twilight_model::channel::Message = serde_json::from_value(answer).unwrap();
        assert_eq!((parsed.author.id.get(), parsed.content.as_str()), (999, "hi"));
        let posts = fake.messages();
        assert_eq!(posts.len(), 1);
        assert_eq!((posts[0].token.as_str(), posts[0].channel_id.as_str()), ("tok", "123"));
        assert_eq!(posts[0].nonce.as_deref(), Some("7"));

        let typing = crate::process::http_post(
            &fake.api_host,
            "/api/v10/channels/123/typing",
            &[("authorization", "Bot tok")],
            b"",
        );
        assert_eq!(typing.await.unwrap().0, 204);
        assert_eq!(fake.typing("123"), 1);
    }

    #[test]
    fn multipart_bodies_yield_payload_json_and_files() {
        // The exact layout of twilight-http's `Form`.
        let body = b"--B0UNDARY\r\nContent-Disposition: form-data; name=\"payload_json\"\r\nContent-Type: application/json\r\n\r\n{\"content\":\"see file\",\"attachments\":[{\"id\":0,\"filename\":\"a.png\"}]}\r\n--B0UNDARY\r\nContent-Disposition: form-data; name=\"files[0]\"; filename=\"a.png\"\r\n\r\n\x89PNG\r\n\x00\x01\r\n--B0UNDARY--";
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, "multipart/form-data; boundary=B0UNDARY".parse().unwrap());
        let (json, files) = message_body(&headers, body);
        assert_eq!(json["content"], "see file");
        assert_eq!(files, vec![("a.png".to_owned(), 8)]);
    }

    #[test]
    fn timestamps_are_rfc3339_as_discord_writes_them() {
        assert_eq!(rfc3339(Duration::from_secs(1_735_689_601)), "2025-01-01T00:00:01.000000+00:00");
        assert_eq!(rfc3339(Duration::from_millis(951_782_400_250)), "2000-02-29T00:00:00.250000+00:00");
        let parsed: twilight_model::util::Timestamp = serde_json::from_value(json!(timestamp())).unwrap();
        assert!(parsed.as_secs() > 1_735_689_601);
    }
}
