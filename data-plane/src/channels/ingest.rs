//! Accepting parsed messages, the same for every channel: each gets its `received` stage, then
//! is either recorded as ignored (with why) or made durable in the spool under its channel's
//! idempotency key and handed to the pipeline. A redelivery of an accepted message gets a trace
//! of its own saying what it duplicates, and nothing else.

use super::Inbound;
use crate::pipeline::{Job, Pipeline};
use crate::spool::{Op, Outcome, Spool, SpoolError};
use crate::traces::{Recorder, now_ms};
use omni_proto::v1::{self as pb, TraceStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// What channels brought in.
#[derive(Debug, Default)]
pub struct IngestStats {
    pub accepted: AtomicU64,
    pub duplicates: AtomicU64,
    pub ignored: AtomicU64,
}

/// A parsed message and what the channel's rules decided about it.
pub struct Candidate {
    pub inbound: Inbound,
    /// Why it is not to be answered; `None` to answer it.
    pub ignore: Option<String>,
    /// The channel's idempotency key; unique within the instance.
    pub dedupe_key: String,
    /// Whether a duplicate of an accepted message gets a trace of its own: a redelivery does,
    /// a second event the channel sends for the same message (Slack's `app_mention` beside
    /// `message`) is not news to anyone.
    pub trace_duplicate: bool,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub accepted: usize,
    pub duplicates: usize,
    pub ignored: usize,
}

/// A message as the spool keeps it, written into a buffer of about its size at once.
fn stored(inbound: &Inbound) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(inbound.raw.get().len() + inbound.text.len() + 512);
    serde_json::to_writer(&mut bytes, inbound).expect("messages serialize");
    bytes
}

/// Where accepted messages go.
#[derive(Clone)]
pub struct Intake {
    pub spool: Spool,
    pub pipeline: Arc<Pipeline>,
    pub stats: Arc<IngestStats>,
}

impl Intake {
    /// Makes `candidates` durable (one commit) and submits those to answer. Returns only once
    /// they are on disk: the caller may then acknowledge them to the channel.
    ///
    /// The work runs in a task of its own: a caller dropped mid-way (a webhook client that hung
    /// up, a gateway being closed) must not leave a message committed, its idempotency key
    /// taken, and nobody to hand it to the pipeline.
    pub async fn accept(
        &self,
        instance: Arc<pb::InstanceConfig>,
        channel: pb::Channel,
        candidates: Vec<Candidate>,
    ) -> Result<Counts, SpoolError> {
        let intake = self.clone();
        match tokio::spawn(async move { intake.accept_now(&instance, channel, candidates).await }).await {
            Ok(counted) => counted,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    async fn accept_now(
        &self,
        instance: &pb::InstanceConfig,
        channel: pb::Channel,
        candidates: Vec<Candidate>,
    ) -> Result<Counts, SpoolError> {
        let now = now_ms();
        let secrets = self.pipeline.secrets(instance);
        let mut ops = Vec::with_capacity(candidates.len());
        let mut answered = Vec::new();
        for candidate in candidates {
            let mut trace = Recorder::arrival(&candidate.inbound, channel, &secrets);
            let received =
                trace.stage("received", TraceStatus::Received, now, "").raw_payload(&candidate.inbound.raw).encode();
            let reason = if instance.active { candidate.ignore } else { Some("the instance is inactive".into()) };
            if let Some(reason) = reason {
                ops.push(Op::Trace(vec![received, trace.stage("ignored", TraceStatus::Ignored, now, reason).encode()]));
                continue;
            }
            ops.push(Op::Accept {
                dedupe_key: format!("{}\u{0}{}", instance.id, candidate.dedupe_key),
                now_ms: now,
                message: stored(&candidate.inbound),
                trace: vec![received],
            });
            answered.push((ops.len() - 1, candidate.inbound, candidate.trace_duplicate));
        }
        let total = ops.len();
        let outcomes = self.spool.commit(ops).await?;
        let mut counts = Counts::default();
        let mut duplicate_traces = Vec::new();
        for (index, inbound, trace_duplicate) in answered {
            match outcomes[index] {
                Outcome::Accepted { seq } => {
                    counts.accepted += 1;
                    self.pipeline.submit(Job { seq, inbound, attempt: 0 });
                }
                _ if !trace_duplicate => counts.duplicates += 1,
                _ => {
                    counts.duplicates += 1;
                    let duplicate = Inbound { id: omni_core::names::new_trace_id(), ..inbound };
                    let why = format!("duplicate delivery of {}", duplicate.external_id);
                    let mut trace = Recorder::arrival(&duplicate, channel, &secrets);
                    duplicate_traces.push(
                        trace.stage("received", TraceStatus::Received, now, "").raw_payload(&duplicate.raw).encode(),
                    );
                    duplicate_traces.push(trace.stage("ignored", TraceStatus::Ignored, now, why).encode());
                }
            }
        }
        if !duplicate_traces.is_empty()
            && let Err(e) = self.spool.defer(vec![Op::Trace(duplicate_traces)])
        {
            tracing::warn!(error = %e, "could not record duplicate deliveries");
        }
        counts.ignored = total - counts.accepted - counts.duplicates;
        self.stats.accepted.fetch_add(counts.accepted as u64, Ordering::Relaxed);
        self.stats.duplicates.fetch_add(counts.duplicates as u64, Ordering::Relaxed);
        self.stats.ignored.fetch_add(counts.ignored as u64, Ordering::Relaxed);
        Ok(counts)
    }
}
