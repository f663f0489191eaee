//! Test harness: isolated Postgres databases, the real Omni binaries as child processes, and
//! waiting for conditions with a deadline.

pub mod discord;
pub mod evolution;
pub mod fakes;
pub mod postgres;
pub mod process;
pub mod proxy;
pub mod slack;

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

/// Reports trace stages to a control plane as a node does (`NodeSyncService.ReportTraces`), to
/// give it traces of any age and shape.
pub async fn report_traces(server: &str, node_token: &str, events: Vec<omni_proto::v1::TraceEvent>) {
    use omni_proto::v1::node_sync_service_client::NodeSyncServiceClient;
    let channel = tonic::transport::Endpoint::from_shared(server.to_owned()).unwrap().connect().await.unwrap();
    let token: tonic::metadata::MetadataValue<_> = format!("Bearer {node_token}").parse().unwrap();
    let mut client = NodeSyncServiceClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
        request.metadata_mut().insert("authorization", token.clone());
        Ok(request)
    });
    for batch in events.chunks(2000) {
        let request = omni_proto::v1::ReportTracesRequest { node_id: "test-node".into(), events: batch.to_vec() };
        client.report_traces(request).await.expect("ReportTraces");
    }
}

/// The internal id of an instance (what nodes report traces against), read from the database.
pub async fn instance_id(database_url: &str, name: &str) -> String {
    use sqlx::Connection;
    let sql = "SELECT id FROM instances WHERE name = $1";
    if database_url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(database_url).await.unwrap();
        sqlx::query_scalar(sql).bind(name).fetch_one(&mut conn).await.unwrap()
    } else {
        let mut conn = sqlx::PgConnection::connect(database_url).await.unwrap();
        sqlx::query_scalar(sql).bind(name).fetch_one(&mut conn).await.unwrap()
    }
}

/// Unix time in milliseconds.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Waits until `count` traces of `instance` reached a final status, and returns them all.
pub async fn finished_traces(server: &str, api_key: &str, instance: &str, count: usize) -> Vec<serde_json::Value> {
    wait_for(&format!("{count} finished traces of {instance}"), Duration::from_secs(20), || async {
        let listed = process::omnictl(server, api_key, &["trace", "list", "--instance", instance, "-o", "json"]).await;
        let traces = listed.json().as_array().cloned().unwrap_or_default();
        let done = traces.iter().filter(|t| !matches!(t["status"].as_str(), Some("received" | "processing"))).count();
        (done >= count).then_some(traces)
    })
    .await
}

/// A free loopback port (for listeners whose address must be known before they start).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

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
