//! Loopback fakes of the services Omni talks to, speaking their real wire protocols and
//! recording what they received.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{delete, get, post};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Serves `router` on a free loopback port; returns its base URL (`http://127.0.0.1:PORT`).
pub(crate) async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

/// A request as a fake received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// When it arrived.
    pub at: std::time::Instant,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Value,
}

fn received(path: String, headers: &HeaderMap, body: &Bytes) -> Received {
    Received {
        at: std::time::Instant::now(),
        path,
        headers: headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or_default().to_owned()))
            .collect(),
        body: serde_json::from_slice(body).unwrap_or(Value::Null),
    }
}

/// What the fake agent answers: status and JSON body, after an optional delay.
pub type Script = Arc<dyn Fn(&Value) -> (u16, Value, Duration) + Send + Sync>;

/// An agent: answers `POST /api/agent/chat` (omni), `/api/v1/agent/{id}/run` (automagik) and
/// `/v1/chat/completions` (openai) as scripted; by default, with "echo: <message>".
#[derive(Clone)]
pub struct FakeAgent {
    pub url: String,
    requests: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<Script>>,
}

impl FakeAgent {
    pub async fn start() -> FakeAgent {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let echo: Script = Arc::new(|body: &Value| {
            let text = body["message"].as_str().or(body["message_content"].as_str()).unwrap_or_default();
            (200, json!({ "message": format!("echo: {text}") }), Duration::ZERO)
        });
        let script = Arc::new(Mutex::new(echo));
        let state = (requests.clone(), script.clone());
        let router = Router::new().fallback(post(agent_handler)).with_state(state);
        FakeAgent { url: serve(router).await, requests, script }
    }

    pub fn script(&self, script: impl Fn(&Value) -> (u16, Value, Duration) + Send + Sync + 'static) {
        *self.script.lock().unwrap() = Arc::new(script);
    }

    pub fn requests(&self) -> Vec<Received> {
        self.requests.lock().unwrap().clone()
    }
}

type AgentState = (Arc<Mutex<Vec<Received>>>, Arc<Mutex<Script>>);

async fn agent_handler(
    State((requests, script)): State<AgentState>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = received(uri.path().to_owned(), &headers, &body);
    let script = script.lock().unwrap().clone();
    let (status, answer, delay) = script(&request.body);
    requests.lock().unwrap().push(request);
    // Not even a zero sleep for an instant answer: tokio's timer would round it up to its next
    // millisecond tick, and the benchmark would count that as the hub's.
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    (StatusCode::from_u16(status).unwrap(), Json(answer)).into_response()
}

/// An instance on the fake Evolution server, as provisioning left it.
#[derive(Debug, Clone, Default)]
pub struct EvolutionInstance {
    /// The instance's own token (its `apikey`).
    pub token: String,
    /// The nested `webhook` object last set.
    pub webhook: Value,
    /// What connectionState reports: `connecting` until told otherwise.
    pub state: String,
    /// When set, `GET /instance/connect` answers `{"error": true, "message": ...}`.
    pub connect_error: Option<String>,
}

#[derive(Default)]
struct Evolution {
    /// Instance name → the key it accepts (besides the global key).
    keys: HashMap<String, String>,
    global_key: Option<String>,
    instances: HashMap<String, EvolutionInstance>,
    sent: Vec<Received>,
    /// Every lifecycle request (create, fetch, webhook/set, delete, state, connect), accepted or not.
    lifecycle: Vec<Received>,
    /// sendText answers this much later (it is recorded when answered).
    send_delay: Duration,
    /// sendText requests that arrived, answered or not yet.
    sends_arrived: usize,
}

impl Evolution {
    fn authorized(&self, instance: Option<&str>, headers: &HeaderMap) -> bool {
        let given = headers.get("apikey").and_then(|v| v.to_str().ok());
        let global = self.global_key.is_some() && given == self.global_key.as_deref();
        let own = instance.and_then(|i| self.keys.get(i)).is_some_and(|k| given == Some(k.as_str()));
        global || own
    }
}

fn evolution_error(status: StatusCode, message: Value) -> Response {
    let error = status.canonical_reason().unwrap_or("Error");
    (status, Json(json!({"status": status.as_u16(), "error": error, "response": {"message": message}}))).into_response()
}

/// An Evolution API server: `POST /message/sendText/{instance}`,
/// `POST /chat/sendPresence/{instance}` and the instance lifecycle (`/instance/create`,
/// `fetchInstances`, `/webhook/set`, `/instance/delete`, `connectionState`, `connect`), each
/// checking the `apikey` header (the instance's key or the global key) and, for webhooks, the
/// nested body shape of Evolution 2.2+.
#[derive(Clone)]
pub struct FakeEvolution {
    pub url: String,
    state: Arc<Mutex<Evolution>>,
}

impl FakeEvolution {
    pub async fn start() -> FakeEvolution {
        let state = Arc::new(Mutex::new(Evolution::default()));
        let router = Router::new()
            .route("/message/sendText/{instance}", post(send_text))
            .route("/chat/sendPresence/{instance}", post(presence))
            .route("/message/sendMedia/{instance}", post(send_media))
            .route("/instance/create", post(create_instance))
            .route("/instance/fetchInstances", get(fetch_instances))
            .route("/webhook/set/{instance}", post(set_webhook))
            .route("/instance/delete/{instance}", delete(delete_instance))
            .route("/instance/connectionState/{instance}", get(connection_state))
            .route("/instance/connect/{instance}", get(connect))
            .with_state(state.clone());
        FakeEvolution { url: serve(router).await, state }
    }

    /// Accepts `key` for Evolution instance `instance`.
    pub fn instance(&self, instance: &str, key: &str) {
        self.state.lock().unwrap().keys.insert(instance.to_owned(), key.to_owned());
    }

    /// Answers each sendText `delay` after it arrives, as a slow Evolution server would.
    pub fn delay_sends(&self, delay: Duration) {
        self.state.lock().unwrap().send_delay = delay;
    }

    /// sendText requests that arrived so far, including those not answered yet.
    pub fn sends_arrived(&self) -> usize {
        self.state.lock().unwrap().sends_arrived
    }

    /// The server's global key (`AUTHENTICATION_API_KEY`), good for every route.
    pub fn global_key(&self, key: &str) {
        self.state.lock().unwrap().global_key = Some(key.to_owned());
    }

    /// An instance that exists on the server already (as if created in its manager).
    pub fn existing(&self, name: &str, token: &str) {
        let mut state = self.state.lock().unwrap();
        state.keys.insert(name.to_owned(), token.to_owned());
        state.instances.insert(
            name.to_owned(),
            EvolutionInstance { token: token.to_owned(), state: "close".into(), ..Default::default() },
        );
    }

    pub fn provisioned(&self, name: &str) -> Option<EvolutionInstance> {
        self.state.lock().unwrap().instances.get(name).cloned()
    }

    pub fn set_state(&self, name: &str, connection: &str) {
        if let Some(i) = self.state.lock().unwrap().instances.get_mut(name) {
            i.state = connection.to_owned();
        }
    }

    pub fn fail_connect(&self, name: &str, message: &str) {
        if let Some(i) = self.state.lock().unwrap().instances.get_mut(name) {
            i.connect_error = Some(message.to_owned());
        }
    }

    /// Lifecycle requests received, accepted or not.
    pub fn lifecycle(&self) -> Vec<Received> {
        self.state.lock().unwrap().lifecycle.clone()
    }

    /// Every accepted sendText, in arrival order.
    pub fn texts(&self) -> Vec<Received> {
        let state = self.state.lock().unwrap();
        state.sent.iter().filter(|r| is_send_text(r)).cloned().collect()
    }

    /// How many accepted sendTexts have a text starting with `prefix`; counted in place, for
    /// callers that poll while thousands arrive (the benchmark).
    pub fn count_texts(&self, prefix: &str) -> usize {
        let state = self.state.lock().unwrap();
        let starts = |r: &&Received| r.body["text"].as_str().is_some_and(|t| t.starts_with(prefix));
        state.sent.iter().filter(|r| is_send_text(r)).filter(starts).count()
    }

    /// (number, text) of every accepted sendText.
    pub fn replies(&self) -> Vec<(String, String)> {
        self.texts()
            .iter()
            .map(|r| {
                (
                    r.body["number"].as_str().unwrap_or_default().to_owned(),
                    r.body["text"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    /// Every accepted sendMedia, in arrival order.
    pub fn media(&self) -> Vec<Received> {
        let state = self.state.lock().unwrap();
        state.sent.iter().filter(|r| r.path.starts_with("/message/sendMedia/")).cloned().collect()
    }

    pub fn presences(&self) -> usize {
        self.state.lock().unwrap().sent.iter().filter(|r| r.path.starts_with("/chat/sendPresence/")).count()
    }
}

fn is_send_text(request: &Received) -> bool {
    request.path.starts_with("/message/sendText/")
}

type EvolutionState = Arc<Mutex<Evolution>>;

async fn send_text(
    State(state): State<EvolutionState>,
    Path(instance): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let delay = {
        let mut state = state.lock().unwrap();
        state.sends_arrived += 1;
        state.send_delay
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut state = state.lock().unwrap();
    if !state.authorized(Some(&instance), &headers) {
        return evolution_error(StatusCode::UNAUTHORIZED, json!("Unauthorized"));
    }
    let request = received(format!("/message/sendText/{instance}"), &headers, &body);
    if request.body["text"].as_str().is_none_or(|t| t.trim().is_empty()) {
        return evolution_error(StatusCode::BAD_REQUEST, json!(["Text is required"]));
    }
    if let Some(refused) = not_on_whatsapp(&request.body) {
        return refused;
    }
    let id = format!("3EB0{:016X}", state.sent.len());
    let number = request.body["number"].clone();
    state.sent.push(request);
    (StatusCode::CREATED, Json(json!({"key": {"remoteJid": number, "fromMe": true, "id": id}, "status": "PENDING"})))
        .into_response()
}

/// Numbers starting with 000 are not on WhatsApp, as Evolution answers for them.
fn not_on_whatsapp(body: &Value) -> Option<Response> {
    let number = body["number"].as_str().unwrap_or_default();
    number.starts_with("000").then(|| {
        evolution_error(
            StatusCode::BAD_REQUEST,
            json!([{"jid": format!("{number}@s.whatsapp.net"), "exists": false, "number": number}]),
        )
    })
}

async fn send_media(
    State(state): State<EvolutionState>,
    Path(instance): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut state = state.lock().unwrap();
    if !state.authorized(Some(&instance), &headers) {
        return evolution_error(StatusCode::UNAUTHORIZED, json!("Unauthorized"));
    }
    let request = received(format!("/message/sendMedia/{instance}"), &headers, &body);
    let b = &request.body;
    if b["number"].as_str().is_none()
        || b["mediatype"].as_str().is_none()
        || b["media"].as_str().is_none_or(str::is_empty)
    {
        return evolution_error(StatusCode::BAD_REQUEST, json!(["number, mediatype and media are required"]));
    }
    if let Some(refused) = not_on_whatsapp(b) {
        return refused;
    }
    let id = format!("3EB0{:016X}", state.sent.len());
    let number = b["number"].clone();
    state.sent.push(request);
    (StatusCode::CREATED, Json(json!({"key": {"remoteJid": number, "fromMe": true, "id": id}, "status": "PENDING"})))
        .into_response()
}

async fn presence(
    State(state): State<EvolutionState>,
    Path(instance): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut state = state.lock().unwrap();
    if !state.authorized(Some(&instance), &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    state.sent.push(received(format!("/chat/sendPresence/{instance}"), &headers, &body));
    (StatusCode::CREATED, Json(json!({"presence": "composing"}))).into_response()
}

/// The nested `webhook` object of Evolution 2.2+, or why the body is not one.
fn nested_webhook(body: &Value) -> Result<Value, String> {
    if body.get("webhookUrl").is_some() || body.get("webhook_by_events").is_some() {
        return Err("flat webhook fields are ignored by this Evolution version".into());
    }
    let webhook = body.get("webhook").filter(|w| w.is_object()).ok_or("webhook must be an object")?;
    if !webhook["url"].as_str().is_some_and(|u| u.starts_with("http")) {
        return Err("webhook.url is required".into());
    }
    if webhook["enabled"] != true || !webhook["events"].is_array() || !webhook["headers"].is_object() {
        return Err("webhook needs enabled, events and headers".into());
    }
    Ok(webhook.clone())
}

async fn create_instance(State(state): State<EvolutionState>, headers: HeaderMap, body: Bytes) -> Response {
    let mut state = state.lock().unwrap();
    let request = received("/instance/create".into(), &headers, &body);
    state.lifecycle.push(request.clone());
    if !state.authorized(None, &headers) {
        return evolution_error(StatusCode::UNAUTHORIZED, json!("Unauthorized"));
    }
    let name = request.body["instanceName"].as_str().unwrap_or_default().to_owned();
    if name.is_empty() || request.body["integration"] != "WHATSAPP-BAILEYS" {
        return evolution_error(StatusCode::BAD_REQUEST, json!(["instanceName and integration are required"]));
    }
    let webhook = match nested_webhook(&request.body) {
        Ok(webhook) => webhook,
        Err(e) => return evolution_error(StatusCode::BAD_REQUEST, json!([e])),
    };
    if state.instances.contains_key(&name) {
        return evolution_error(StatusCode::FORBIDDEN, json!([format!("This name \"{name}\" is already in use.")]));
    }
    let token = format!("token-of-{name}-0123456789");
    state.keys.insert(name.clone(), token.clone());
    state.instances.insert(
        name.clone(),
        EvolutionInstance { token: token.clone(), webhook, state: "connecting".into(), connect_error: None },
    );
    let answer = json!({
        "instance": {"instanceName": name, "instanceId": "f1e2", "integration": "WHATSAPP-BAILEYS", "status": "connecting"},
        "hash": token,
        "qrcode": {"code": "2@fake", "base64": "data:image/png;base64,iVBORw0KGgo=", "count": 1},
    });
    (StatusCode::CREATED, Json(answer)).into_response()
}

async fn fetch_instances(
    State(state): State<EvolutionState>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
    headers: HeaderMap,
) -> Response {
    let mut state = state.lock().unwrap();
    let query = query.unwrap_or_default();
    state.lifecycle.push(received(format!("/instance/fetchInstances?{query}"), &headers, &Bytes::new()));
    if !state.authorized(None, &headers) {
        return evolution_error(StatusCode::UNAUTHORIZED, json!("Unauthorized"));
    }
    let wanted = query.strip_prefix("instanceName=").map(str::to_owned);
    let found: Vec<Value> = state
        .instances
        .iter()
        .filter(|(name, _)| wanted.as_ref().is_none_or(|w| w == *name))
        .map(|(name, i)| json!({"name": name, "connectionStatus": i.state, "token": i.token}))
        .collect();
    Json(Value::Array(found)).into_response()
}

async fn set_webhook(
    State(state): State<EvolutionState>,
    Path(instance): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut state = state.lock().unwrap();
    let request = received(format!("/webhook/set/{instance}"), &headers, &body);
    state.lifecycle.push(request.clone());
    if !state.authorized(Some(&instance), &headers) {
        return evolution_error(StatusCode::UNAUTHORIZED, json!("Unauthorized"));
    }
    let webhook = match nested_webhook(&request.body) {
        Ok(webhook) => webhook,
        Err(e) => return evolution_error(StatusCode::BAD_REQUEST, json!([e])),
    };
    match state.instances.get_mut(&instance) {
        Some(i) => {
            i.webhook = webhook.clone();
            (StatusCode::CREATED, Json(json!({"id": "w1", "url": webhook["url"], "enabled": true}))).into_response()
        }
        None => evolution_error(StatusCode::NOT_FOUND, json!([format!("The \"{instance}\" instance does not exist")])),
    }
}

/// Answers for an instance that must exist, after checking the key.
fn with_instance(
    state: &EvolutionState,
    action: &str,
    instance: &str,
    headers: &HeaderMap,
    answer: impl FnOnce(&mut Evolution) -> Response,
) -> Response {
    let mut state = state.lock().unwrap();
    state.lifecycle.push(received(format!("/instance/{action}/{instance}"), headers, &Bytes::new()));
    if !state.authorized(Some(instance), headers) {
        return evolution_error(StatusCode::UNAUTHORIZED, json!("Unauthorized"));
    }
    if !state.instances.contains_key(instance) {
        return evolution_error(StatusCode::NOT_FOUND, json!([format!("The \"{instance}\" instance does not exist")]));
    }
    answer(&mut state)
}

async fn delete_instance(
    State(state): State<EvolutionState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    with_instance(&state, "delete", &name, &headers, |s| {
        s.instances.remove(&name);
        s.keys.remove(&name);
        Json(json!({"status": "SUCCESS", "error": false, "response": {"message": "Instance deleted"}})).into_response()
    })
}

async fn connection_state(
    State(state): State<EvolutionState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    with_instance(&state, "connectionState", &name, &headers, |s| {
        let current = s.instances[&name].state.clone();
        Json(json!({"instance": {"instanceName": name, "state": current}})).into_response()
    })
}

async fn connect(State(state): State<EvolutionState>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    with_instance(&state, "connect", &name, &headers, |s| {
        let instance = &s.instances[&name];
        if let Some(message) = &instance.connect_error {
            return Json(json!({"error": true, "message": message})).into_response();
        }
        if instance.state == "open" {
            return Json(json!({"instance": {"instanceName": name, "state": "open"}})).into_response();
        }
        Json(json!({
            "pairingCode": "WZYEH1YY",
            "code": format!("2@{name}-qr-payload,abc,def=="),
            "base64": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==",
            "count": 1,
        }))
        .into_response()
    })
}

/// An egress proxy for plain HTTP, as operators put between a node and the Internet: takes
/// requests in absolute form (`POST http://host:port/path`), passes each on to its server
/// without its `Proxy-Authorization`, and keeps what it was asked.
#[derive(Clone)]
pub struct FakeHttpProxy {
    pub url: String,
    asked: Arc<Mutex<Vec<ProxyRequest>>>,
}

/// A request as the proxy took it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyRequest {
    /// `METHOD absolute-target`.
    pub line: String,
    /// Its `Proxy-Authorization` header, or "".
    pub credentials: String,
}

impl FakeHttpProxy {
    pub async fn start() -> FakeHttpProxy {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let router = Router::new().fallback(forward).with_state(asked.clone());
        FakeHttpProxy { url: serve(router).await, asked }
    }

    /// Every request forwarded, in arrival order.
    pub fn requests(&self) -> Vec<ProxyRequest> {
        self.asked.lock().unwrap().clone()
    }
}

async fn forward(State(asked): State<Arc<Mutex<Vec<ProxyRequest>>>>, request: axum::extract::Request) -> Response {
    use axum::http::header;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (parts, body) = request.into_parts();
    let credentials = parts.headers.get(header::PROXY_AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
    let line = format!("{} {}", parts.method, parts.uri);
    asked.lock().unwrap().push(ProxyRequest { line, credentials: credentials.to_owned() });
    let (Some(authority), Some(path)) = (parts.uri.authority(), parts.uri.path_and_query()) else {
        return (StatusCode::BAD_REQUEST, "a proxy takes requests in absolute form").into_response();
    };
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    // One request per upstream connection, read to its end: no framing to follow.
    let mut head = format!("{} {path} HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n", parts.method);
    let hop_by_hop = [header::HOST, header::CONNECTION, header::PROXY_AUTHORIZATION, header::TRANSFER_ENCODING];
    for (name, value) in parts.headers.iter().filter(|(name, _)| !hop_by_hop.contains(name)) {
        head.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap_or_default()));
    }
    head.push_str("\r\n");
    let Ok(mut server) = tokio::net::TcpStream::connect(authority.as_str()).await else {
        return (StatusCode::BAD_GATEWAY, "the server is unreachable").into_response();
    };
    let mut answer = Vec::new();
    let relayed = async {
        server.write_all(head.as_bytes()).await?;
        server.write_all(&body).await?;
        server.read_to_end(&mut answer).await
    };
    if relayed.await.is_err() {
        return (StatusCode::BAD_GATEWAY, "the server did not answer").into_response();
    }
    let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (StatusCode::BAD_GATEWAY, "the server's answer is cut short").into_response();
    };
    let answer_head = String::from_utf8_lossy(&answer[..end]).into_owned();
    let mut lines = answer_head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).unwrap_or(502);
    let mut response = Response::builder().status(status);
    for (name, value) in lines.filter_map(|l| l.split_once(':')) {
        if !["connection", "content-length", "transfer-encoding"].contains(&name.to_ascii_lowercase().as_str()) {
            response = response.header(name, value.trim());
        }
    }
    response.body(axum::body::Body::from(answer[end + 4..].to_vec())).unwrap()
}
