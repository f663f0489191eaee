//! Trace stages, recorded into the spool's outbox with the step they describe, and shipped to
//! the control plane in batches; a stage leaves the outbox only once the control plane stored
//! it, so a control-plane outage delays traces and loses none.

use crate::channels::{Inbound, RawJson};
use crate::spool::{Op, Spool};
use crate::sync::NodeToken;
use omni_proto::v1 as pb;
use prost::Message;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Stored payloads are cut here; media never reaches them (the parser strips it).
const MAX_PAYLOAD: usize = 64 * 1024;
/// Stage numbers of a resumed attempt start at attempt × this, above every earlier stage.
const SEQ_PER_ATTEMPT: u32 = 100;
const SHIP_BATCH: usize = 2000;
/// Bytes of stages per report at most (a single larger stage still goes, alone).
const SHIP_BYTES: usize = 8 * 1024 * 1024;
/// After shipping a partial batch, wait this long so the next report carries more stages
/// (fewer, larger writes on the control plane); traces lag by at most this much more. At 1,000
/// messages/s, 100 ms instead of 25 ms cut the control plane's CPU per message by a quarter.
const SHIP_LINGER: Duration = Duration::from_millis(100);

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Builds one message's trace stages, numbering them and scrubbing the instance's secrets from
/// anything that could carry them. Borrows the message and the secrets: nothing is copied until
/// a stage is encoded.
pub struct Recorder<'a> {
    inbound: &'a Inbound,
    /// Set for a message's arrival: its first stage carries the trace header.
    channel: Option<pb::Channel>,
    next: u32,
    secrets: &'a Secrets,
}

/// What a trace must never show: an instance's keys and tokens, each with its searcher (built
/// once per revision of the instance's config, see `Pipeline::secrets`).
#[derive(Default)]
pub struct Secrets(Vec<(String, memchr::memmem::Finder<'static>)>);

impl Secrets {
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Secrets {
        // Short values (an unset key, a test token) would redact ordinary words.
        let long = secrets.into_iter().filter(|s| s.len() >= 6);
        Secrets(long.map(|s| (s.clone(), memchr::memmem::Finder::new(s.as_bytes()).into_owned())).collect())
    }

    fn redact(&self, mut text: String) -> String {
        for (secret, finder) in &self.0 {
            if finder.find(text.as_bytes()).is_some() {
                text = text.replace(secret.as_str(), "[redacted]");
            }
        }
        text
    }
}

impl<'a> Recorder<'a> {
    /// The recorder of a message's processing; `attempt` 0 continues the stage written when it
    /// was accepted, later attempts (after a restart) number their stages above earlier ones.
    pub fn new(inbound: &'a Inbound, attempt: u32, secrets: &'a Secrets) -> Recorder<'a> {
        let next = if attempt == 0 { 1 } else { attempt * SEQ_PER_ATTEMPT };
        Recorder { inbound, channel: None, next, secrets }
    }

    /// The recorder of a message's arrival: its first stage carries the trace header.
    pub fn arrival(inbound: &'a Inbound, channel: pb::Channel, secrets: &'a Secrets) -> Recorder<'a> {
        Recorder { inbound, channel: Some(channel), next: 0, secrets }
    }

    /// The `TraceHeader` of the message (field 11 of its first stage), encoded from it.
    fn encode_header(&self, channel: pb::Channel, out: &mut Vec<u8>) {
        use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, int32, int64, string};
        let m = self.inbound;
        let strings = [
            (2, &m.external_id),
            (3, &m.conversation),
            (4, &m.sender),
            (5, &m.sender_name),
            (6, &m.message_type),
            (7, &m.text),
        ];
        let (channel, received) = (channel as i32, m.received_at);
        let length = int32::encoded_len(1, &channel)
            + strings.iter().map(|(tag, s)| string::encoded_len(*tag, s)).sum::<usize>()
            + int64::encoded_len(8, &received);
        out.reserve(prost::encoding::key_len(11) + encoded_len_varint(length as u64) + length);
        encode_key(11, WireType::LengthDelimited, out);
        encode_varint(length as u64, out);
        int32::encode(1, &channel, out);
        for (tag, s) in strings {
            string::encode(tag, s, out);
        }
        int64::encode(8, &received, out);
    }

    fn scrub(&self, text: String) -> String {
        let mut text = self.secrets.redact(text);
        if text.len() > MAX_PAYLOAD {
            let mut cut = MAX_PAYLOAD;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str("…[truncated]");
        }
        text
    }

    /// One stage, encoded for the outbox.
    pub fn stage(
        &mut self,
        stage: &str,
        status: pb::TraceStatus,
        at_ms: i64,
        detail: impl Into<String>,
    ) -> StageEvent<'_, 'a> {
        let seq = self.next;
        self.next += 1;
        StageEvent {
            recorder: self,
            event: pb::TraceEvent {
                seq,
                stage: stage.to_owned(),
                time_unix_ms: at_ms,
                status: status as i32,
                detail: detail.into(),
                ..Default::default()
            },
        }
    }
}

/// A stage being described; `encode` finishes it.
pub struct StageEvent<'r, 'a> {
    recorder: &'r Recorder<'a>,
    event: pb::TraceEvent,
}

impl StageEvent<'_, '_> {
    pub fn payload(mut self, payload: &impl serde::Serialize) -> Self {
        self.event.payload = self.recorder.scrub(serde_json::to_string(payload).unwrap_or_default());
        self
    }

    /// A payload that is JSON text already.
    pub fn raw_payload(mut self, payload: &RawJson) -> Self {
        self.event.payload = self.recorder.scrub(payload.get().to_owned());
        self
    }

    pub fn error(mut self, error: impl std::fmt::Display) -> Self {
        self.event.error = self.recorder.scrub(error.to_string());
        self
    }

    pub fn duration(mut self, ms: i64) -> Self {
        self.event.duration_ms = ms;
        self
    }

    pub fn agent_ms(mut self, ms: i64) -> Self {
        self.event.agent_ms = ms;
        self
    }

    /// The stage as a `TraceEvent`. What comes from the message (its ids, and the header on
    /// the first stage) is encoded from it after the stage's own fields, rather than copied
    /// into the event first: protobuf fields may come in any order.
    pub fn encode(self) -> Vec<u8> {
        let recorder = self.recorder;
        let mut event = self.event;
        event.detail = recorder.scrub(event.detail);
        use prost::encoding::string;
        let (id, instance_id) = (&recorder.inbound.id, &recorder.inbound.instance_id);
        let mut out =
            Vec::with_capacity(event.encoded_len() + string::encoded_len(1, id) + string::encoded_len(3, instance_id));
        event.encode_raw(&mut out);
        string::encode(1, id, &mut out);
        string::encode(3, instance_id, &mut out);
        if let (0, Some(channel)) = (event.seq, recorder.channel) {
            recorder.encode_header(channel, &mut out);
        }
        out
    }
}

/// A `ReportTracesRequest` as it goes on the wire, its events as the outbox holds them: an
/// embedded message and a bytes field are encoded alike, so stages are sent without being
/// decoded and encoded again (which took a twentieth of the node's instructions per message).
#[derive(Clone, PartialEq, prost::Message)]
struct EncodedReport {
    #[prost(string, tag = "1")]
    node_id: String,
    #[prost(bytes = "bytes", repeated, tag = "2")]
    events: Vec<bytes::Bytes>,
}

type NodeChannel = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, NodeToken>;

/// `NodeSyncService/ReportTraces`, with [`EncodedReport`] for the request.
async fn report(grpc: &mut tonic::client::Grpc<NodeChannel>, report: EncodedReport) -> Result<(), tonic::Status> {
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(format!("control plane not ready: {e}")))?;
    let path = http::uri::PathAndQuery::from_static("/omni.v1.NodeSyncService/ReportTraces");
    let codec = tonic_prost::ProstCodec::<EncodedReport, pb::ReportTracesResponse>::default();
    grpc.unary(tonic::Request::new(report), path, codec).await.map(drop)
}

/// The stages of `batch` that decode; the others are logged and left out.
fn readable(batch: &[(u64, bytes::Bytes)]) -> Vec<bytes::Bytes> {
    let mut kept = Vec::with_capacity(batch.len());
    for (seq, event) in batch {
        match pb::TraceEvent::decode(event.as_ref()) {
            Ok(_) => kept.push(event.clone()),
            Err(e) => tracing::error!(seq, error = %e, "dropping an unreadable trace stage"),
        }
    }
    kept
}

/// Ships the outbox to the control plane until the task is dropped.
pub async fn ship(
    spool: Spool,
    channel: tonic::transport::Channel,
    token: NodeToken,
    node_id: String,
    wake: Arc<Notify>,
) {
    let mut grpc = tonic::client::Grpc::new(tonic::service::interceptor::InterceptedService::new(channel, token));
    let mut backoff = Duration::from_millis(500);
    // The last stage shipped: their deletion is deferred, so they may still be in the outbox.
    let mut shipped = 0;
    loop {
        let batch = match spool.outbox(shipped, SHIP_BATCH).await {
            Ok(batch) => batch,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the trace outbox");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if batch.is_empty() {
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        let mut batch = batch;
        // Reports stay well under the control plane's message limit; the rest goes next.
        let mut bytes = 0;
        let over = batch.iter().position(|(_, event)| {
            bytes += event.len();
            bytes > SHIP_BYTES
        });
        let fits = over.unwrap_or(batch.len()).max(1);
        let full = fits < batch.len() || batch.len() == SHIP_BATCH;
        batch.truncate(fits);
        let through = batch.last().map_or(shipped, |(seq, _)| *seq);
        let events = batch.iter().map(|(_, event)| event.clone()).collect();
        let mut reported = report(&mut grpc, EncodedReport { node_id: node_id.clone(), events }).await;
        if let Err(status) = &reported
            && !matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unauthenticated)
        {
            // Refused: an unreadable stage (never written so, but a report is not to be held
            // up for ever by one) would be why. Sent again without any.
            let kept = readable(&batch);
            if kept.len() < batch.len() {
                reported = report(&mut grpc, EncodedReport { node_id: node_id.clone(), events: kept }).await;
            }
        }
        match reported {
            Ok(()) => {
                shipped = through;
                // Lost in a crash, the deletion ships these stages again; the control plane keeps
                // one of each (trace, stage number).
                if let Err(e) = spool.defer(vec![Op::Shipped { through }]) {
                    tracing::error!(error = %e, "cannot clear shipped trace stages");
                }
                backoff = Duration::from_millis(500);
                if !full {
                    tokio::time::sleep(SHIP_LINGER).await;
                }
            }
            Err(status) => {
                tracing::warn!(error = %status.message(), retry_in = ?backoff, "traces not shipped; kept for later");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbound() -> Inbound {
        Inbound {
            id: "t1".into(),
            instance: "acme-wa".into(),
            instance_id: "i1".into(),
            external_id: "X".into(),
            conversation: "5511@s.whatsapp.net".into(),
            thread: String::new(),
            sender: "5511".into(),
            sender_name: "Maria".into(),
            text: "hi".into(),
            message_type: "conversation".into(),
            media: vec![],
            is_group: false,
            sent_at: 0,
            received_at: 1000,
            raw: RawJson::default(),
        }
    }

    #[test]
    fn stages_are_numbered_and_scrubbed() {
        let message = inbound();
        let secrets = Secrets::new(["super-secret-key".to_owned(), "short".to_owned()]);
        let mut arrival = Recorder::arrival(&message, pb::Channel::Whatsapp, &secrets);
        let first = pb::TraceEvent::decode(
            arrival
                .stage("received", pb::TraceStatus::Received, 1000, "")
                .payload(&serde_json::json!({"k": "super-secret-key", "w": "short"}))
                .encode()
                .as_slice(),
        )
        .unwrap();
        assert_eq!(first.seq, 0);
        assert_eq!(
            (first.trace_id.as_str(), first.instance_id.as_str(), first.stage.as_str()),
            ("t1", "i1", "received")
        );
        assert_eq!(
            first.header.unwrap(),
            pb::TraceHeader {
                channel: pb::Channel::Whatsapp as i32,
                external_id: "X".into(),
                conversation_id: "5511@s.whatsapp.net".into(),
                sender: "5511".into(),
                sender_name: "Maria".into(),
                message_type: "conversation".into(),
                text: "hi".into(),
                received_unix_ms: 1000,
            }
        );
        assert_eq!(first.payload, r#"{"k":"[redacted]","w":"short"}"#);

        let none = Secrets::default();
        let mut processing = Recorder::new(&message, 0, &none);
        let next = pb::TraceEvent::decode(
            processing.stage("access", pb::TraceStatus::Processing, 1001, "").encode().as_slice(),
        )
        .unwrap();
        assert_eq!((next.seq, next.header.is_none(), next.trace_id.as_str()), (1, true, "t1"));
        let mut resumed = Recorder::new(&message, 2, &none);
        let later =
            pb::TraceEvent::decode(resumed.stage("access", pb::TraceStatus::Processing, 1001, "").encode().as_slice())
                .unwrap();
        assert_eq!(later.seq, 200);
    }

    #[test]
    fn encoded_reports_are_read_as_report_requests() {
        let stage =
            |seq: u32| pb::TraceEvent { trace_id: "t1".into(), seq, stage: "received".into(), ..Default::default() };
        let events: Vec<bytes::Bytes> = [stage(0), stage(1)].iter().map(|e| e.encode_to_vec().into()).collect();
        let wire = EncodedReport { node_id: "n1".into(), events: events.clone() }.encode_to_vec();
        let read = pb::ReportTracesRequest::decode(wire.as_slice()).unwrap();
        assert_eq!((read.node_id.as_str(), read.events), ("n1", vec![stage(0), stage(1)]));

        let mut with_garbage: Vec<(u64, bytes::Bytes)> = (1..).zip(events).collect();
        with_garbage.insert(1, (9, bytes::Bytes::from_static(b"\xff\xff\xff")));
        assert_eq!(
            readable(&with_garbage),
            [with_garbage[0].1.clone(), with_garbage[2].1.clone()],
            "the unreadable stage is left out"
        );
    }
}
