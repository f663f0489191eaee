//! `POST /webhook/evolution/{instance}`: authenticate, parse, decide, make durable, answer.
//!
//! Status codes follow what Evolution does with them: it does not retry 400, 401, 404 or 413,
//! and retries everything else, so a 503 (spool or config unavailable) is redelivered later.

use super::parse::{Event, ignore_reason, parse};
use crate::channels::ingest::{Candidate, Counts};
use crate::connection_events;
use crate::http::NodeState;
use crate::traces::now_ms;
use axum::http::StatusCode;
use omni_core::crypto::constant_time_eq;
use omni_proto::v1 as pb;
use serde_json::{Value, json};

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
    let mut new_id = omni_core::names::new_trace_id;
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
    let candidates = messages
        .into_iter()
        .map(|message| {
            let ignore = ignore_reason(
                &message,
                behavior.reply_to_all_group_messages,
                behavior.max_message_age_seconds,
                now / 1000,
            );
            let inbound = message.inbound;
            let dedupe_key = format!("{}\u{0}{}", inbound.conversation, inbound.external_id);
            Candidate { inbound, ignore: ignore.map(str::to_owned), dedupe_key, trace_duplicate: true }
        })
        .collect();
    match state.intake.accept(instance, pb::Channel::Whatsapp, candidates).await {
        Ok(Counts { accepted, duplicates, ignored }) => {
            (StatusCode::OK, json!({ "accepted": accepted, "duplicates": duplicates, "ignored": ignored }))
        }
        Err(e) => {
            tracing::error!(error = %e, "webhook not accepted: spool unavailable");
            (StatusCode::SERVICE_UNAVAILABLE, json!({ "error": "temporarily unable to accept messages" }))
        }
    }
}
