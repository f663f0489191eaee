//! Messages the control plane asks this node to send (`MessageService`): split like replies,
//! sent through the instance's channel under the tenant's concurrency cap, and traced like any
//! message (the trace's stages go to the spool's outbox and on to the control plane). A send is
//! at most once: a chunk whose outcome is unknown is reported as such, never retried.

use super::Pipeline;
use crate::channels::{Inbound, RawJson, channel_of};
use crate::spool::Op;
use crate::traces::{Recorder, now_ms};
use omni_proto::v1::{self as pb, TraceStatus};
use serde_json::json;
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc};

/// Sends under way at once, across tenants (each also holds one of its tenant's permits).
const MAX_IN_FLIGHT: usize = 64;

/// Runs commands as they arrive, each in its own task, until the channel closes. Results go to
/// `results`, which the config stream drains, whichever session is open when they are ready.
pub async fn run(
    pipeline: Arc<Pipeline>,
    mut commands: mpsc::Receiver<pb::SendCommand>,
    results: mpsc::Sender<pb::SendResult>,
) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    while let Some(command) = commands.recv().await {
        let slot = in_flight.clone().acquire_owned().await.expect("never closed");
        let (pipeline, results) = (pipeline.clone(), results.clone());
        tokio::spawn(async move {
            let permits = pipeline.tenant_permits(&command.instance);
            let _tenant = permits.acquire_owned().await.expect("tenant semaphores are never closed");
            let result = pipeline.send_on_request(command).await;
            drop(slot);
            let _ = results.send(result).await;
        });
    }
}

fn failure(id: &str, error: impl Into<String>, outcome_unknown: bool) -> pb::SendResult {
    pb::SendResult { id: id.to_owned(), ok: false, error: error.into(), outcome_unknown, message_ids: Vec::new() }
}

impl Pipeline {
    async fn send_on_request(&self, command: pb::SendCommand) -> pb::SendResult {
        let instance = self
            .config
            .load()
            .and_then(|c| c.instances.get(&command.instance).cloned())
            .filter(|i| i.id == command.instance_id);
        let Some(instance) = instance else {
            return failure(&command.id, "this node does not have the instance (deleted meanwhile?)", false);
        };
        if !instance.active {
            return failure(&command.id, "the instance is inactive", false);
        }
        let now = now_ms();
        let media = command.media.as_ref();
        let mut raw = json!({ "to": command.to, "text": command.text });
        if let Some(m) = media {
            // The file itself stays out of the trace.
            raw["media"] = json!({ "url": m.url, "bytes": m.data.len(), "media_type": m.media_type,
                                    "mime_type": m.mime_type, "file_name": m.file_name });
        }
        let message = Inbound {
            id: command.trace_id.clone(),
            instance: instance.name.clone(),
            instance_id: instance.id.clone(),
            external_id: String::new(),
            conversation: command.to.clone(),
            sender: command.to.split('@').next().unwrap_or_default().to_owned(),
            sender_name: String::new(),
            text: command.text.clone(),
            message_type: if media.is_some() { "outbound_media".into() } else { "outbound_text".into() },
            media: Vec::new(),
            is_group: command.to.ends_with("@g.us"),
            thread: String::new(),
            sent_at: now / 1000,
            received_at: now,
            raw: RawJson::new(&raw),
        };
        let secrets = self.secrets(&instance);
        let mut trace = Recorder::arrival(&message, channel_of(&instance), &secrets);
        let request = trace
            .stage("send_request", TraceStatus::Processing, now, "from the API")
            .raw_payload(&message.raw)
            .encode();
        // Durable before anything leaves: after a crash mid-send, the trace shows a send began.
        if let Err(e) = self.spool.commit(vec![Op::Trace(vec![request])]).await {
            return failure(&command.id, format!("could not record the send: {e}"), false);
        }
        let mut stages = Vec::with_capacity(3);

        let mut message_ids = Vec::with_capacity(1);
        let mut problem: Option<(String, bool)> = None;
        let parts: Vec<String> = match media {
            Some(_) => vec![command.text.clone()],
            None => self.channels.split(&instance, &command.text),
        };
        for (i, part) in parts.iter().enumerate() {
            let label = format!("chunk {}/{}", i + 1, parts.len());
            let started = now_ms();
            let sent = match media {
                Some(m) => self.channels.send_media(&instance, &command.to, m, part).await,
                None => self.channels.send_text(&instance, &command.to, "", part).await,
            };
            let stage = trace.stage("send_chunk", TraceStatus::Processing, now_ms(), label.clone());
            let stage = stage.payload(&json!({ "to": command.to, "text": part })).duration(now_ms() - started);
            match sent {
                Ok(id) => {
                    stages.push(stage.encode());
                    message_ids.push(id);
                }
                Err(e) => {
                    let unknown = e.outcome_unknown();
                    stages.push(stage.error(&e).encode());
                    problem = Some((format!("{label}: {e}"), unknown));
                    break;
                }
            }
        }
        let total = now_ms() - now;
        let end = match &problem {
            None => trace
                .stage(
                    "completed",
                    TraceStatus::Completed,
                    now_ms(),
                    format!("{} chunk(s) delivered", message_ids.len()),
                )
                .duration(total),
            Some((error, _)) => {
                trace.stage("failed", TraceStatus::Failed, now_ms(), "at send_chunk").duration(total).error(error)
            }
        };
        stages.push(end.encode());
        if let Err(e) = self.spool.commit(vec![Op::Trace(stages)]).await {
            tracing::error!(error = %e, trace_id = %command.trace_id, "could not record the trace of a send");
        }
        match problem {
            None => pb::SendResult { id: command.id, ok: true, message_ids, ..Default::default() },
            Some((error, unknown)) => pb::SendResult { message_ids, ..failure(&command.id, error, unknown) },
        }
    }
}
