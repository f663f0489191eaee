//! `POST /webhook/evolution/{instance}`: authenticate, parse, decide, make durable, answer.
//!
//! Status codes follow what Evolution does with them: it does not retry 400, 401, 404 or 413,
//! and retries everything else, so a 503 (spool or config unavailable) is redelivered later.

use super::parse::{Event, ignore_reason, parse};
use crate::channels::Inbound;
use crate::connection_events;
use crate::http::NodeState;
use crate::pipeline::{Job, secrets_of};
use crate::spool::{Op, Outcome};
use crate::traces::{Recorder, now_ms};
use axum::http::StatusCode;
use omni_core::crypto::constant_time_eq;
use omni_proto::v1::{self as pb, TraceStatus};
use serde_json::{Value, json};
use std::sync::atomic::Ordering;

pub const TOKEN_HEADER: &str = "x-omni-webhook-token";

pub async fn ingest(state: &NodeState, instance: &str, token: Option<&[u8]>, body: &[u8]) -> (StatusCode, Value) {
    let Some(config) = state.config.load() else {
        return (StatusCode::SERVICE_UNAVAILABLE, json!({ "error": "this node has no configuration yet" }));
    };
    let Some(instance) = config.instances.get(instance).filter(|i| i.channel == pb::Channel::Whatsapp as i32).cloned()
    else {
        return (StatusCode::NOT_FOUND, json!({ "error": "unknown instance" }));
    };
    if instance.require_webhook_token && !token.is_some_and(|t| constant_time_eq(t, instance.webhook_token.as_bytes()))
    {
        return (StatusCode::UNAUTHORIZED, json!({ "error": format!("missing or wrong {TOKEN_HEADER} header") }));
    }
    let now = now_ms();
    let mut new_id = || uuid::Uuid::new_v4().to_string();
    let event = match parse(body, &instance.name, &instance.id, now, &mut new_id) {
        Ok(event) => event,
        Err(e) => return (StatusCode::BAD_REQUEST, json!({ "error": e.to_string() })),
    };
    let messages = match event {
        Event::Messages { messages, .. } => messages,
        Event::ConnectionUpdate(data) => {
            state.connection_events.report(connection_events::from_evolution(&instance.id, "connection", &data, now));
            return (StatusCode::OK, json!({ "status": "noted" }));
        }
        Event::QrCodeUpdated(data) => {
            state.connection_events.report(connection_events::from_evolution(&instance.id, "qrcode", &data, now));
            return (StatusCode::OK, json!({ "status": "noted" }));
        }
        Event::Other(name) => return (StatusCode::OK, json!({ "status": "ignored", "event": name })),
    };

    let behavior = instance.behavior.clone().unwrap_or_default();
    let secrets = secrets_of(&instance);
    let mut ops = Vec::with_capacity(messages.len());
    let mut answered = Vec::new();
    for message in messages {
        let mut trace = Recorder::arrival(&message.inbound, pb::Channel::Whatsapp, &secrets);
        let received = trace.stage("received", TraceStatus::Received, now, "").payload(&message.inbound.raw).encode();
        let verdict = if instance.active {
            ignore_reason(&message, behavior.reply_to_all_group_messages, behavior.max_message_age_seconds, now / 1000)
        } else {
            Some("the instance is inactive")
        };
        if let Some(reason) = verdict {
            ops.push(Op::Trace(vec![received, trace.stage("ignored", TraceStatus::Ignored, now, reason).encode()]));
            continue;
        }
        ops.push(Op::Accept {
            dedupe_key: format!(
                "{}\u{0}{}\u{0}{}",
                instance.id, message.inbound.conversation, message.inbound.external_id
            ),
            now_ms: now,
            message: serde_json::to_vec(&message.inbound).expect("messages serialize"),
            trace: vec![received],
        });
        answered.push((ops.len() - 1, message.inbound));
    }
    let total = ops.len();
    let outcomes = match state.spool.commit(ops).await {
        Ok(outcomes) => outcomes,
        Err(e) => {
            tracing::error!(error = %e, "webhook not accepted: spool unavailable");
            return (StatusCode::SERVICE_UNAVAILABLE, json!({ "error": "temporarily unable to accept messages" }));
        }
    };
    state.pipeline.trace_wake.notify_one();
    let (mut accepted, mut duplicates) = (0, 0);
    let mut duplicate_traces = Vec::new();
    for (index, inbound) in answered {
        match outcomes[index] {
            Outcome::Accepted { seq } => {
                accepted += 1;
                state.pipeline.submit(Job { seq, inbound, attempt: 0 });
            }
            _ => {
                duplicates += 1;
                // A redelivery gets a trace of its own, which says what it duplicates.
                let duplicate = Inbound { id: new_id(), ..inbound };
                let why = format!("duplicate delivery of {}", duplicate.external_id);
                let mut trace = Recorder::arrival(&duplicate, pb::Channel::Whatsapp, &secrets);
                duplicate_traces
                    .push(trace.stage("received", TraceStatus::Received, now, "").payload(&duplicate.raw).encode());
                duplicate_traces.push(trace.stage("ignored", TraceStatus::Ignored, now, why).encode());
            }
        }
    }
    if !duplicate_traces.is_empty()
        && let Err(e) = state.spool.commit(vec![Op::Trace(duplicate_traces)]).await
    {
        tracing::warn!(error = %e, "could not record duplicate deliveries");
    }
    let ignored = total - accepted - duplicates;
    state.ingest.accepted.fetch_add(accepted as u64, Ordering::Relaxed);
    state.ingest.duplicates.fetch_add(duplicates as u64, Ordering::Relaxed);
    state.ingest.ignored.fetch_add(ignored as u64, Ordering::Relaxed);
    (StatusCode::OK, json!({ "accepted": accepted, "duplicates": duplicates, "ignored": ignored }))
}
