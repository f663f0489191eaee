//! Test harness: isolated Postgres databases, the real Omni binaries as child processes, and
//! waiting for conditions with a deadline.

pub mod fakes;
pub mod postgres;
pub mod process;

use std::future::Future;

/// Agent and Evolution keys of the instances `create_whatsapp` makes.
pub const AGENT_KEY: &str = "agent-secret-0123456789";
pub const EVOLUTION_KEY: &str = "evolution-key-abcdefghij";

/// `omnictl instance create NAME` for a WhatsApp instance with `AGENT_KEY` and `EVOLUTION_KEY`;
/// returns the JSON answer (the instance and its webhook token).
pub async fn create_whatsapp(server: &str, api_key: &str, name: &str) -> serde_json::Value {
    #[rustfmt::skip]
    let args = [
        "instance", "create", name, "--channel", "whatsapp",
        "--agent-url", "http://127.0.0.1:9000", "--agent-key", AGENT_KEY,
        "--evolution-url", "http://127.0.0.1:8080", "--evolution-key", EVOLUTION_KEY,
        "--evolution-instance", "acme", "-o", "json",
    ];
    process::omnictl(server, api_key, &args).await.json()
}
use std::time::{Duration, Instant};

/// Polls `check` until it yields a value or `timeout` passes (then panics with `what`).
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
