//! Channel connection events (Evolution's `connection.update` and `qrcode.updated`) on their
//! way to the control plane, which shows them in `instance status`. They describe a state, not
//! work to do: only the latest of each kind per instance is kept while the control plane is
//! unreachable, and a node restart in that window loses them (Evolution is asked directly for
//! the live state anyway).

use crate::sync::NodeToken;
use omni_proto::v1::{self as pb, node_sync_service_client::NodeSyncServiceClient};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;

/// Events waiting for the reporter task at most; beyond, new ones are dropped (and logged).
const QUEUE: usize = 1024;

#[derive(Clone)]
pub struct ConnectionEvents {
    tx: mpsc::Sender<pb::InstanceEvent>,
}

impl ConnectionEvents {
    pub fn new() -> (ConnectionEvents, mpsc::Receiver<pb::InstanceEvent>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (ConnectionEvents { tx }, rx)
    }

    pub fn report(&self, event: pb::InstanceEvent) {
        if self.tx.try_send(event).is_err() {
            tracing::warn!("connection event dropped: the report queue is full");
        }
    }
}

/// The event an Evolution `connection.update` or `qrcode.updated` body's `data` describes.
pub fn from_evolution(instance_id: &str, kind: &str, data: &serde_json::Value, now_ms: i64) -> pb::InstanceEvent {
    let text = |key: &str| data[key].as_str().unwrap_or_default().to_owned();
    pb::InstanceEvent {
        instance_id: instance_id.to_owned(),
        kind: kind.to_owned(),
        state: text("state"),
        status_reason: data["statusReason"].as_i64().unwrap_or(0) as i32,
        wuid: text("wuid"),
        profile_name: text("profileName"),
        time_unix_ms: now_ms,
    }
}

/// Sends queued events to the control plane until the queue closes, retrying with backoff.
pub async fn report(
    mut rx: mpsc::Receiver<pb::InstanceEvent>,
    channel: tonic::transport::Channel,
    token: NodeToken,
    node_id: String,
) {
    let mut client = NodeSyncServiceClient::with_interceptor(channel, token);
    let mut pending: HashMap<(String, String), pb::InstanceEvent> = HashMap::new();
    let mut backoff = Duration::from_millis(500);
    loop {
        if pending.is_empty() {
            let Some(event) = rx.recv().await else { return };
            pending.insert((event.instance_id.clone(), event.kind.clone()), event);
        }
        while let Ok(event) = rx.try_recv() {
            pending.insert((event.instance_id.clone(), event.kind.clone()), event);
        }
        let events: Vec<pb::InstanceEvent> = pending.values().cloned().collect();
        match client.report_instance_events(pb::ReportInstanceEventsRequest { node_id: node_id.clone(), events }).await
        {
            Ok(_) => {
                pending.clear();
                backoff = Duration::from_millis(500);
            }
            Err(status) => {
                tracing::warn!(error = %status.message(), retry_in = ?backoff, "connection events not reported; kept for later");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn evolution_events() {
        let data = json!({"instance": "acme", "wuid": "5511@s.whatsapp.net", "profileName": "Acme", "state": "open", "statusReason": 200});
        let event = from_evolution("id-1", "connection", &data, 42);
        assert_eq!(
            (event.state.as_str(), event.status_reason, event.wuid.as_str(), event.profile_name.as_str()),
            ("open", 200, "5511@s.whatsapp.net", "Acme")
        );
        let qr = from_evolution("id-1", "qrcode", &json!({"qrcode": {"code": "2@x"}}), 43);
        assert_eq!((qr.kind.as_str(), qr.state.as_str(), qr.time_unix_ms), ("qrcode", "", 43));
    }
}
