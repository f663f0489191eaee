//! Channel connection events (Evolution's `connection.update` and `qrcode.updated`) on their
//! way to the control plane, which shows them in `instance status`. They describe a state, not
//! work to do: only the latest of each kind per instance is kept until reported, however many
//! arrive, and a node restart before then loses them (Evolution is asked directly for the live
//! state anyway).

use crate::sync::NodeToken;
use omni_proto::v1::{self as pb, node_sync_service_client::NodeSyncServiceClient};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

type Key = (String, String);

/// The latest event of each kind per instance, waiting to be reported.
#[derive(Clone, Default)]
pub struct ConnectionEvents {
    latest: Arc<Mutex<HashMap<Key, pb::InstanceEvent>>>,
    wake: Arc<Notify>,
}

impl ConnectionEvents {
    pub fn report(&self, event: pb::InstanceEvent) {
        let key = (event.instance_id.clone(), event.kind.clone());
        self.latest.lock().expect("connection events lock").insert(key, event);
        self.wake.notify_one();
    }

    fn take(&self) -> HashMap<Key, pb::InstanceEvent> {
        std::mem::take(&mut *self.latest.lock().expect("connection events lock"))
    }

    /// Puts back events that were not reported, unless newer ones arrived meanwhile.
    fn restore(&self, events: HashMap<Key, pb::InstanceEvent>) {
        let mut latest = self.latest.lock().expect("connection events lock");
        for (key, event) in events {
            latest.entry(key).or_insert(event);
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
        ..Default::default()
    }
}

/// Sends waiting events to the control plane as they come, retrying with backoff, until the
/// task is dropped.
pub async fn report(events: ConnectionEvents, channel: tonic::transport::Channel, token: NodeToken, node_id: String) {
    let mut client = NodeSyncServiceClient::with_interceptor(channel, token);
    let mut backoff = Duration::from_millis(500);
    loop {
        let pending = events.take();
        if pending.is_empty() {
            events.wake.notified().await;
            continue;
        }
        let request =
            pb::ReportInstanceEventsRequest { node_id: node_id.clone(), events: pending.values().cloned().collect() };
        match client.report_instance_events(request).await {
            Ok(_) => backoff = Duration::from_millis(500),
            Err(status) => {
                tracing::warn!(error = %status.message(), retry_in = ?backoff, "connection events not reported; kept for later");
                events.restore(pending);
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
    fn only_the_latest_of_each_kind_waits() {
        let events = ConnectionEvents::default();
        let event = |kind: &str, state: &str| pb::InstanceEvent {
            instance_id: "i1".into(),
            kind: kind.into(),
            state: state.into(),
            ..Default::default()
        };
        events.report(event("connection", "connecting"));
        events.report(event("connection", "open"));
        events.report(event("qrcode", ""));
        let taken = events.take();
        assert_eq!(taken.len(), 2);
        assert_eq!(taken[&("i1".to_owned(), "connection".to_owned())].state, "open");
        events.report(event("connection", "close"));
        events.restore(taken);
        let again = events.take();
        assert_eq!(again[&("i1".to_owned(), "connection".to_owned())].state, "close", "newer wins over restored");
        assert_eq!(again.len(), 2);
    }

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
