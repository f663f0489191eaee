//! `POST /webhook/slack/{instance}`: verify the signature on the raw body, answer
//! url_verification, make messages durable, and answer 200 well inside Slack's 3 seconds (the
//! work continues from the spool). Slack's retries of an accepted event are answered 200 and
//! change nothing.

use super::parse::{Event, parse};
use crate::channels::ingest::{Candidate, Counts};
use crate::http::NodeState;
use crate::traces::now_ms;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use omni_core::crypto::{constant_time_eq, hex};
use omni_proto::v1 as pb;
use serde_json::{Value, json};
use sha2::Sha256;

pub const SIGNATURE_HEADER: &str = "x-slack-signature";
pub const TIMESTAMP_HEADER: &str = "x-slack-request-timestamp";
/// Requests signed longer ago than this (or this far ahead) are replays.
const MAX_AGE_SECS: i64 = 300;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SignatureError {
    #[error("missing {0} header")]
    Missing(&'static str),
    #[error("request timestamp outside the 5-minute window")]
    Expired,
    #[error("signature does not match")]
    Mismatch,
}

/// Checks Slack's `v0` signature: HMAC-SHA256 of `v0:{timestamp}:{body}` under the signing
/// secret, compared in constant time, within five minutes of `now_secs`.
pub fn verify(secret: &str, headers: &HeaderMap, body: &[u8], now_secs: i64) -> Result<(), SignatureError> {
    let header =
        |name: &'static str| headers.get(name).and_then(|v| v.to_str().ok()).ok_or(SignatureError::Missing(name));
    let (signature, timestamp) = (header(SIGNATURE_HEADER)?, header(TIMESTAMP_HEADER)?);
    let ts: i64 = timestamp.trim().parse().map_err(|_| SignatureError::Expired)?;
    if (now_secs - ts).abs() > MAX_AGE_SECS {
        return Err(SignatureError::Expired);
    }
    if secret.is_empty() {
        return Err(SignatureError::Mismatch);
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(b"v0:");
    mac.update(timestamp.trim().as_bytes());
    mac.update(b":");
    mac.update(body);
    let expected = format!("v0={}", hex(&mac.finalize().into_bytes()));
    if constant_time_eq(expected.as_bytes(), signature.trim().as_bytes()) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

pub async fn ingest(state: &NodeState, instance: &str, headers: &HeaderMap, body: &[u8]) -> (StatusCode, Value) {
    let Some(config) = state.config.load() else {
        return (StatusCode::SERVICE_UNAVAILABLE, json!({ "error": "this node has no configuration yet" }));
    };
    let Some(instance) = config.instances.get(instance).filter(|i| i.channel == pb::Channel::Slack as i32).cloned()
    else {
        return (StatusCode::NOT_FOUND, json!({ "error": "unknown instance" }));
    };
    let slack = instance.slack.clone().unwrap_or_default();
    let now = now_ms();
    if let Err(e) = verify(&slack.signing_secret, headers, body, now / 1000) {
        return (StatusCode::UNAUTHORIZED, json!({ "error": e.to_string() }));
    }
    let reply_to_all = instance.behavior.as_ref().is_some_and(|b| b.reply_to_all_group_messages);
    let id = omni_core::names::new_trace_id();
    let event = match parse(body, &instance.name, &instance.id, &slack.bot_user_id, reply_to_all, now, id) {
        Ok(event) => event,
        Err(e) => return (StatusCode::BAD_REQUEST, json!({ "error": e.to_string() })),
    };
    let (inbound, ignore) = match event {
        Event::UrlVerification(challenge) => return (StatusCode::OK, json!({ "challenge": challenge })),
        Event::RateLimited => {
            tracing::warn!(instance = %instance.name, "Slack is holding back this app's events (app_rate_limited)");
            return (StatusCode::OK, json!({ "status": "noted" }));
        }
        Event::Other(kind) => return (StatusCode::OK, json!({ "status": "ignored", "event": kind })),
        Event::Message(inbound, ignore) => (*inbound, ignore),
    };
    let dedupe_key = format!("{}\u{0}{}", inbound.conversation, inbound.external_id);
    // A mention comes as `message` and as `app_mention`, one of them a duplicate of the other
    // that nobody needs a trace of; Slack's own retries say so in a header, and are traced.
    let trace_duplicate = headers.contains_key("x-slack-retry-num");
    let candidate = Candidate { inbound, ignore, dedupe_key, trace_duplicate };
    match state.intake.accept(instance, pb::Channel::Slack, vec![candidate]).await {
        Ok(Counts { accepted, duplicates, ignored }) => {
            (StatusCode::OK, json!({ "accepted": accepted, "duplicates": duplicates, "ignored": ignored }))
        }
        Err(e) => {
            tracing::error!(error = %e, "Slack event not accepted: spool unavailable");
            // Slack retries a non-2xx answer; the event is not lost.
            (StatusCode::SERVICE_UNAVAILABLE, json!({ "error": "temporarily unable to accept messages" }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(signature: &str, timestamp: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(SIGNATURE_HEADER, signature.parse().unwrap());
        headers.insert(TIMESTAMP_HEADER, timestamp.parse().unwrap());
        headers
    }

    /// Slack's documented example (api.slack.com/authentication/verifying-requests-from-slack).
    #[test]
    fn slack_documented_vector() {
        let secret = "8f742231b10e8888abcd99yyyzzz85a5";
        let body = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
        let good = headers("v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503", "1531420618");
        assert_eq!(verify(secret, &good, body.as_bytes(), 1531420618 + 10), Ok(()));
        assert_eq!(verify(secret, &good, body.as_bytes(), 1531420618 + 301), Err(SignatureError::Expired));
        assert_eq!(verify(secret, &good, b"tampered", 1531420618), Err(SignatureError::Mismatch));
        assert_eq!(verify("other-secret", &good, body.as_bytes(), 1531420618), Err(SignatureError::Mismatch));
        assert_eq!(verify(secret, &HeaderMap::new(), b"", 0), Err(SignatureError::Missing(SIGNATURE_HEADER)));
    }
}
