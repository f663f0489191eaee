//! Loopback fakes of the services Omni talks to, speaking their real wire protocols and
//! recording what they received.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::post;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

async fn serve(router: Router) -> String {
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
    tokio::time::sleep(delay).await;
    (StatusCode::from_u16(status).unwrap(), Json(answer)).into_response()
}

/// An Evolution API server: `POST /message/sendText/{instance}` and
/// `POST /chat/sendPresence/{instance}`, each checking the instance's `apikey`.
#[derive(Clone)]
pub struct FakeEvolution {
    pub url: String,
    keys: Arc<Mutex<HashMap<String, String>>>,
    sent: Arc<Mutex<Vec<Received>>>,
}

impl FakeEvolution {
    pub async fn start() -> FakeEvolution {
        let keys = Arc::new(Mutex::new(HashMap::new()));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let router = Router::new()
            .route("/message/sendText/{instance}", post(send_text))
            .route("/chat/sendPresence/{instance}", post(presence))
            .with_state((keys.clone(), sent.clone()));
        FakeEvolution { url: serve(router).await, keys, sent }
    }

    /// Accepts `key` for Evolution instance `instance`.
    pub fn instance(&self, instance: &str, key: &str) {
        self.keys.lock().unwrap().insert(instance.to_owned(), key.to_owned());
    }

    /// Every accepted sendText, in arrival order.
    pub fn texts(&self) -> Vec<Received> {
        self.sent.lock().unwrap().iter().filter(|r| r.path.starts_with("/message/sendText/")).cloned().collect()
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

    pub fn presences(&self) -> usize {
        self.sent.lock().unwrap().iter().filter(|r| r.path.starts_with("/chat/sendPresence/")).count()
    }
}

type EvolutionState = (Arc<Mutex<HashMap<String, String>>>, Arc<Mutex<Vec<Received>>>);

fn authorized(keys: &Mutex<HashMap<String, String>>, instance: &str, headers: &HeaderMap) -> bool {
    let expected = keys.lock().unwrap().get(instance).cloned();
    expected.is_some_and(|key| headers.get("apikey").and_then(|v| v.to_str().ok()) == Some(key.as_str()))
}

async fn send_text(
    State((keys, sent)): State<EvolutionState>,
    Path(instance): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&keys, &instance, &headers) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"status": 401, "error": "Unauthorized", "response": {"message": "Unauthorized"}})),
        )
            .into_response();
    }
    let request = received(format!("/message/sendText/{instance}"), &headers, &body);
    if request.body["text"].as_str().is_none_or(|t| t.trim().is_empty()) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"status": 400, "error": "Bad Request", "response": {"message": ["Text is required"]}})),
        )
            .into_response();
    }
    let mut sent = sent.lock().unwrap();
    let id = format!("3EB0{:016X}", sent.len());
    let number = request.body["number"].clone();
    sent.push(request);
    (StatusCode::CREATED, Json(json!({"key": {"remoteJid": number, "fromMe": true, "id": id}, "status": "PENDING"})))
        .into_response()
}

async fn presence(
    State((keys, sent)): State<EvolutionState>,
    Path(instance): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&keys, &instance, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    sent.lock().unwrap().push(received(format!("/chat/sendPresence/{instance}"), &headers, &body));
    (StatusCode::CREATED, Json(json!({"presence": "composing"}))).into_response()
}
