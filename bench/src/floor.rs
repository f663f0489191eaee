//! The floor: the least any hub on this stack (tokio, axum, hyper's client, a flushed file) does per
//! message, as a process of its own. It serves the webhook, makes it durable, asks the agent,
//! makes the answer durable, sends it to Evolution. No dedupe, access rules, users or traces.
//! The whatsapp benchmark drives it like the hub and prints its CPU per message beside the hub's.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderName, StatusCode};
use omni_data_plane::http_client::HttpClient;
use serde_json::{Value, json};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, mpsc};
use std::time::Duration;
use tokio::sync::oneshot;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Size of the circular file records are written to.
const LOG_BYTES: u64 = 8 << 20;

/// A writer thread that makes records durable, one write and flush for all that wait together.
struct Flusher {
    requests: mpsc::Sender<(Vec<u8>, oneshot::Sender<()>)>,
}

impl Flusher {
    fn start(path: &std::path::Path) -> anyhow::Result<Flusher> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
        // Written through once, so that flushes never have to persist a new size.
        file.write_all_at(&vec![0; LOG_BYTES as usize], 0)?;
        file.sync_all()?;
        let (requests, rx) = mpsc::channel::<(Vec<u8>, oneshot::Sender<()>)>();
        std::thread::spawn(move || {
            let (mut offset, mut frame) = (0u64, Vec::new());
            while let Ok(first) = rx.recv() {
                let mut group = vec![first];
                group.extend(rx.try_iter());
                frame.clear();
                for (record, _) in &group {
                    frame.extend_from_slice(record);
                }
                if offset + frame.len() as u64 > LOG_BYTES {
                    offset = 0;
                }
                let written = file.write_all_at(&frame, offset).and_then(|()| file.sync_data());
                if written.is_err() {
                    return;
                }
                offset += frame.len() as u64;
                for (_, done) in group {
                    let _ = done.send(());
                }
            }
        });
        Ok(Flusher { requests })
    }

    async fn write(&self, record: Vec<u8>) -> anyhow::Result<()> {
        let (done, flushed) = oneshot::channel();
        self.requests.send((record, done))?;
        Ok(flushed.await?)
    }
}

struct Relay {
    flusher: Flusher,
    /// The client the hub calls agents and Evolution with.
    http: HttpClient,
    agent_url: String,
    send_url: String,
}

impl Relay {
    async fn answer(&self, text: String) -> anyhow::Result<()> {
        let ask = json!({ "message": text, "session_id": "floor", "user_id": "floor" });
        let answer = self.http.post_json(&self.agent_url, &[], serde_json::to_vec(&ask)?.into(), TIMEOUT).await?;
        let answer: Value = serde_json::from_slice(&answer.body)?;
        let text = answer["message"].as_str().unwrap_or_default().to_owned();
        self.flusher.write(text.clone().into_bytes()).await?;
        let send = json!({ "number": "5511999999999", "text": text });
        let key = [(HeaderName::from_static("apikey"), super::whatsapp::EVOLUTION_KEY)];
        self.http.post_json(&self.send_url, &key, serde_json::to_vec(&send)?.into(), TIMEOUT).await?;
        Ok(())
    }
}

async fn webhook(State(relay): State<Arc<Relay>>, body: Bytes) -> StatusCode {
    let Ok(webhook) = serde_json::from_slice::<Value>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    if relay.flusher.write(body.to_vec()).await.is_err() {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let text = webhook["data"]["message"]["conversation"].as_str().unwrap_or_default().to_owned();
    tokio::spawn(async move { relay.answer(text).await });
    StatusCode::OK
}

/// `omni-bench floor-relay AGENT_URL SEND_URL DIR`: serves the relay on a port it prints.
pub async fn serve(agent_url: String, send_url: String, dir: std::path::PathBuf) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let flusher = Flusher::start(&dir.join("floor.log"))?;
    let relay = Relay { flusher, http: HttpClient::new()?, agent_url, send_url };
    let router = axum::Router::new().fallback(axum::routing::post(webhook)).with_state(Arc::new(relay));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("floor listening on {}", listener.local_addr()?);
    axum::serve(listener, router).await?;
    Ok(())
}
