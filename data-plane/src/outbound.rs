//! Messages the control plane asks this node to send (`MessageService`): split like replies,
//! sent through the instance's channel, and traced like any message (the trace's stages go to
//! the spool's outbox and on to the control plane). A send is at most once: a chunk whose
//! outcome is unknown is reported as such, never retried.

use crate::channels::Inbound;
use crate::channels::evolution::send::{EvolutionClient, SendError};
use crate::config::ConfigHandle;
use crate::pipeline::{secrets_of, split};
use crate::spool::{Op, Spool};
use crate::traces::{Recorder, now_ms};
use omni_proto::v1::{self as pb, TraceStatus, watch_request};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, mpsc};

/// A command from the control plane, and the stream its result goes back on.
pub struct Command {
    pub send: pb::SendCommand,
    pub reply: mpsc::Sender<pb::WatchRequest>,
}

pub struct Outbound {
    pub config: Arc<ConfigHandle>,
    pub evolution: EvolutionClient,
    pub spool: Spool,
    pub trace_wake: Arc<Notify>,
}

/// Runs commands as they arrive, each in its own task, until the channel closes.
pub async fn run(outbound: Arc<Outbound>, mut commands: mpsc::Receiver<Command>) {
    while let Some(Command { send, reply }) = commands.recv().await {
        let outbound = outbound.clone();
        tokio::spawn(async move {
            let result = outbound.execute(send).await;
            // A closed stream loses the result; the control plane reports the outcome unknown.
            let _ = reply.send(pb::WatchRequest { kind: Some(watch_request::Kind::SendResult(result)) }).await;
        });
    }
}

fn failure(id: &str, error: impl Into<String>, outcome_unknown: bool) -> pb::SendResult {
    pb::SendResult { id: id.to_owned(), ok: false, error: error.into(), outcome_unknown, message_ids: Vec::new() }
}

impl Outbound {
    async fn execute(&self, command: pb::SendCommand) -> pb::SendResult {
        let instance = self
            .config
            .load()
            .and_then(|c| c.instances.get(&command.instance).cloned())
            .filter(|i| i.id == command.instance_id);
        let Some(instance) = instance else {
            return failure(&command.id, "this node does not have the instance (deleted meanwhile?)", false);
        };
        let Some(evolution) = instance.evolution.clone() else {
            return failure(&command.id, "the instance has no Evolution settings", false);
        };
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
            sent_at: now / 1000,
            received_at: now,
            raw,
        };
        let secrets = secrets_of(&instance);
        let mut trace = Recorder::arrival(&message, pb::Channel::Whatsapp, &secrets);
        let mut stages = vec![
            trace.stage("send_request", TraceStatus::Processing, now, "from the API").payload(&message.raw).encode(),
        ];

        let mut message_ids = Vec::new();
        let mut problem: Option<(String, bool)> = None;
        let parts: Vec<String> = match media {
            Some(_) => vec![command.text.clone()],
            None => {
                let limit = instance.behavior.as_ref().map_or(4000, |b| b.split_limit).max(1) as usize;
                split::split(&command.text, limit)
            }
        };
        for (i, part) in parts.iter().enumerate() {
            let label = format!("chunk {}/{}", i + 1, parts.len());
            let started = now_ms();
            let mut attempt = 0;
            let sent = loop {
                attempt += 1;
                let sent = match media {
                    Some(m) => self.evolution.send_media(&evolution, &command.to, m, part).await,
                    None => self.evolution.send_text(&evolution, &command.to, part).await,
                };
                match sent {
                    Err(e) if e.retryable() && attempt < 3 => {
                        tokio::time::sleep(Duration::from_millis(300 * attempt)).await
                    }
                    other => break other,
                }
            };
            let stage = trace.stage("send_chunk", TraceStatus::Processing, now_ms(), label.clone());
            let stage = stage.payload(&json!({ "number": command.to, "text": part })).duration(now_ms() - started);
            match sent {
                Ok(id) => {
                    stages.push(stage.encode());
                    message_ids.push(id);
                }
                Err(e) => {
                    let unknown = matches!(e, SendError::Unknown(_));
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
        self.trace_wake.notify_one();
        match problem {
            None => pb::SendResult { id: command.id, ok: true, message_ids, ..Default::default() },
            Some((error, unknown)) => pb::SendResult { message_ids, ..failure(&command.id, error, unknown) },
        }
    }
}
