//! From an accepted message to the reply delivered: access check, agent call, answer
//! normalization, splitting and sending, each step recorded in the trace.
//!
//! Messages of one conversation are handled one at a time, in order; conversations and tenants
//! run in parallel, and each tenant has its own concurrency cap, so a tenant whose agent hangs
//! only ever holds its own permits. Every accepted message sits in the spool until finished; a
//! node that crashed resumes them at start. Before each reply chunk the intent to send it is made
//! durable, and the result after; a chunk with an intent but no result was perhaps delivered,
//! and is never sent again.

pub mod outbound;
pub mod split;

use crate::agent::{AgentClient, AgentError, Caller};
use crate::channels::{Channels, Inbound, channel_name, channel_of};
use crate::config::ConfigHandle;
use crate::spool::{Op, Outcome, SendState, Spool};
use crate::traces::{Recorder, Secrets, now_ms};
use omni_core::access::{Action, decide};
use omni_core::metrics::Histogram;
use omni_core::names::{session_name, user_id};
use omni_proto::v1::{self as pb, TraceStatus};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};

/// A reply chunk as its trace stage shows it.
#[derive(serde::Serialize)]
struct ChunkSent<'a> {
    to: &'a str,
    text: &'a str,
}

/// An accepted message and its place in the spool.
#[derive(Debug)]
pub struct Job {
    pub seq: u64,
    pub inbound: Inbound,
    /// 0 for a message just accepted; n > 0 for the n-th resumption after restarts.
    pub attempt: u32,
}

#[derive(Default)]
pub struct PipelineStats {
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub denied: AtomicU64,
    pub ignored: AtomicU64,
    /// Finished messages per instance: its channel and counts by [`OUTCOMES`].
    pub by_instance: Mutex<HashMap<String, (&'static str, [u64; 4])>>,
    /// Time waiting for agents, retries included.
    pub agent_latency: Histogram,
}

/// How a handled message ended, in the order of [`PipelineStats::by_instance`] counts.
pub const OUTCOMES: [&str; 4] = ["completed", "failed", "denied", "ignored"];

impl PipelineStats {
    fn finished(&self, instance: &str, channel: &'static str, status: TraceStatus) {
        let (counter, outcome) = match status {
            TraceStatus::Completed => (&self.completed, 0),
            TraceStatus::Denied => (&self.denied, 2),
            TraceStatus::Ignored => (&self.ignored, 3),
            _ => (&self.failed, 1),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut by_instance = self.by_instance.lock().expect("stats lock poisoned");
        match by_instance.get_mut(instance) {
            Some((_, counts)) => counts[outcome] += 1,
            None => {
                let mut counts = [0; 4];
                counts[outcome] = 1;
                by_instance.insert(instance.to_owned(), (channel, counts));
            }
        }
    }
}

pub struct Pipeline {
    spool: Spool,
    config: Arc<ConfigHandle>,
    agent: AgentClient,
    channels: Arc<Channels>,
    tenant_concurrency: usize,
    conversations: Mutex<HashMap<String, mpsc::UnboundedSender<Job>>>,
    tenants: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Each instance's secrets, with their searchers, by instance id: built once per revision of
    /// its config (building them took more than the searches themselves).
    secrets: Mutex<HashMap<String, (i64, Arc<Secrets>)>>,
    pub stats: PipelineStats,
}

/// Trace stages and spool writes waiting for the message's next commit. A message commits only
/// where durability matters: with the intent to send a chunk (which carries the agent's answer
/// and the previous chunk's result along); its end is deferred to join a later commit.
#[derive(Default)]
struct Pending {
    events: Vec<Vec<u8>>,
    ops: Vec<Op>,
}

impl Pending {
    fn add(&mut self, events: impl IntoIterator<Item = Vec<u8>>, ops: impl IntoIterator<Item = Op>) {
        self.events.extend(events);
        self.ops.extend(ops);
    }
}

/// How a message ended.
struct Ending {
    stage: &'static str,
    status: TraceStatus,
    detail: String,
    error: String,
}

impl Ending {
    fn completed(detail: String) -> Ending {
        Ending { stage: "completed", status: TraceStatus::Completed, detail, error: String::new() }
    }

    fn ignored(detail: impl Into<String>) -> Ending {
        Ending { stage: "ignored", status: TraceStatus::Ignored, detail: detail.into(), error: String::new() }
    }

    fn failed(stage: &'static str, error: impl std::fmt::Display) -> Ending {
        Ending { stage: "failed", status: TraceStatus::Failed, detail: format!("at {stage}"), error: error.to_string() }
    }
}

fn action_of(value: i32) -> Action {
    if value == pb::AccessAction::Block as i32 { Action::Block } else { Action::Allow }
}

/// The instance's secrets, to be kept out of trace payloads whatever carries them.
fn secrets_of(instance: &pb::InstanceConfig) -> Secrets {
    let mut secrets = vec![instance.webhook_token.clone()];
    if let Some(a) = &instance.agent {
        secrets.push(a.key.clone());
    }
    if let Some(e) = &instance.evolution {
        secrets.push(e.key.clone());
    }
    if let Some(d) = &instance.discord {
        secrets.push(d.token.clone());
    }
    if let Some(s) = &instance.slack {
        secrets.extend([s.bot_token.clone(), s.signing_secret.clone()]);
    }
    Secrets::new(secrets)
}

impl Pipeline {
    pub fn new(
        spool: Spool,
        config: Arc<ConfigHandle>,
        agent: AgentClient,
        channels: Channels,
        tenant_concurrency: usize,
    ) -> Pipeline {
        Pipeline {
            spool,
            config,
            agent,
            channels: Arc::new(channels),
            tenant_concurrency: tenant_concurrency.max(1),
            conversations: Mutex::new(HashMap::new()),
            tenants: Mutex::new(HashMap::new()),
            secrets: Mutex::new(HashMap::new()),
            stats: PipelineStats::default(),
        }
    }

    /// What the traces of `instance`'s messages must not show.
    pub fn secrets(&self, instance: &pb::InstanceConfig) -> Arc<Secrets> {
        let mut cache = self.secrets.lock().expect("secrets cache poisoned");
        if let Some((revision, secrets)) = cache.get(&instance.id)
            && *revision == instance.revision
        {
            return secrets.clone();
        }
        // Deleted instances' entries go when there are too many.
        if cache.len() >= 100_000 {
            cache.clear();
        }
        let secrets = Arc::new(secrets_of(instance));
        cache.insert(instance.id.clone(), (instance.revision, secrets.clone()));
        secrets
    }

    /// Conversations with a queue (messages waiting or being handled).
    pub fn active_conversations(&self) -> usize {
        self.conversations.lock().expect("conversation map poisoned").len()
    }

    /// Queues a job behind earlier messages of its conversation.
    pub fn submit(self: &Arc<Self>, job: Job) {
        let key = job.inbound.conversation_key();
        let mut conversations = self.conversations.lock().expect("conversation map poisoned");
        let job = match conversations.get(&key) {
            Some(queue) => match queue.send(job) {
                Ok(()) => return,
                Err(returned) => returned.0,
            },
            None => job,
        };
        let (queue, jobs) = mpsc::unbounded_channel();
        let _ = queue.send(job);
        conversations.insert(key.clone(), queue);
        tokio::spawn(self.clone().drain(key, jobs));
    }

    /// Handles a conversation's jobs in order; leaves the map when its queue is empty (under
    /// the map's lock, so a job submitted meanwhile is never stranded).
    async fn drain(self: Arc<Self>, key: String, mut jobs: mpsc::UnboundedReceiver<Job>) {
        loop {
            let job = match jobs.try_recv() {
                Ok(job) => job,
                Err(_) => {
                    let mut conversations = self.conversations.lock().expect("conversation map poisoned");
                    match jobs.try_recv() {
                        Ok(job) => job,
                        Err(_) => {
                            conversations.remove(&key);
                            return;
                        }
                    }
                }
            };
            self.process(job).await;
        }
    }

    /// Resubmits every message a previous run accepted but did not finish, oldest first.
    pub async fn resume(self: &Arc<Self>) -> usize {
        let unfinished = match self.spool.unfinished().await {
            Ok(unfinished) => unfinished,
            Err(e) => {
                tracing::error!(error = %e, "cannot read unfinished messages");
                return 0;
            }
        };
        let mut resumed = 0;
        for (seq, bytes) in unfinished {
            let inbound: Inbound = match serde_json::from_slice(&bytes) {
                Ok(inbound) => inbound,
                Err(e) => {
                    tracing::error!(seq, error = %e, "dropping an unreadable spooled message");
                    let _ = self.spool.commit(vec![Op::Finish { seq, id: String::new(), chunks: 0 }]).await;
                    continue;
                }
            };
            let attempt = match self.spool.commit(vec![Op::Resume { seq }]).await {
                Ok(outcomes) => match outcomes.first() {
                    Some(Outcome::Attempt(n)) => *n,
                    _ => 1,
                },
                Err(_) => 1,
            };
            self.submit(Job { seq, inbound, attempt });
            resumed += 1;
        }
        resumed
    }

    fn tenant_permits(&self, instance: &str) -> Arc<Semaphore> {
        let mut tenants = self.tenants.lock().expect("tenant map poisoned");
        if let Some(permits) = tenants.get(instance) {
            return permits.clone();
        }
        tenants.entry(instance.to_owned()).or_insert_with(|| Arc::new(Semaphore::new(self.tenant_concurrency))).clone()
    }

    /// What is pending plus `ops`, as one list of operations.
    fn take(pending: &mut Pending, ops: Vec<Op>) -> Vec<Op> {
        let mut all = std::mem::take(&mut pending.ops);
        all.extend(ops);
        all.push(Op::Trace(std::mem::take(&mut pending.events)));
        all
    }

    /// Commits what is pending plus `ops`.
    async fn commit(&self, pending: &mut Pending, ops: Vec<Op>) -> Result<(), crate::spool::SpoolError> {
        self.spool.commit(Self::take(pending, ops)).await.map(drop)
    }

    async fn process(&self, job: Job) {
        let permits = self.tenant_permits(&job.inbound.instance);
        let _permit = permits.acquire_owned().await.expect("tenant semaphores are never closed");
        let instance = self
            .config
            .load()
            .and_then(|c| c.instances.get(&job.inbound.instance).cloned())
            .filter(|i| i.id == job.inbound.instance_id);
        let secrets = instance.as_deref().map(|i| self.secrets(i)).unwrap_or_default();
        let channel = instance.as_deref().map_or("unknown", |i| channel_name(channel_of(i)));
        let mut trace = Recorder::new(&job.inbound, job.attempt, &secrets);
        let mut pending = Pending::default();
        let (ending, chunks) = match instance {
            None => (Ending::ignored("the instance was deleted before the message was handled"), 0),
            Some(instance) if !instance.active => (Ending::ignored("the instance is inactive"), 0),
            Some(instance) => self.handle(&job, &instance, &mut trace, &mut pending).await,
        };
        self.stats.finished(&job.inbound.instance, channel, ending.status);
        let total = now_ms() - job.inbound.received_at;
        let last = trace.stage(ending.stage, ending.status, now_ms(), ending.detail).duration(total);
        let last = if ending.error.is_empty() { last } else { last.error(ending.error) };
        pending.add([last.encode()], [Op::Finish { seq: job.seq, id: job.inbound.id.clone(), chunks }]);
        // Nothing leaves the node on the strength of this, so it joins the next commit. Lost in
        // a crash, the message is resumed: a chunk already sent is found with its intent only,
        // reported as of unknown outcome and not sent again; a message that sent nothing
        // (denied, agent failed, empty answer) is handled again from the start.
        if let Err(e) = self.spool.defer(Self::take(&mut pending, vec![])) {
            tracing::error!(error = %e, trace_id = %job.inbound.id, "could not record the end of a message");
        }
    }

    /// Everything between the access check and the last chunk; returns how it ended and how
    /// many chunk states to forget.
    async fn handle(
        &self,
        job: &Job,
        instance: &Arc<pb::InstanceConfig>,
        trace: &mut Recorder<'_>,
        pending: &mut Pending,
    ) -> (Ending, u32) {
        let inbound = &job.inbound;
        let rules = instance.rules.iter().map(|r| (r.pattern.as_str(), action_of(r.action)));
        let (rule, action) = decide(rules, action_of(instance.default_access), &inbound.sender);
        let why = match rule {
            Some(i) => format!("rule {} ({} {})", instance.rules[i].id, action.as_str(), instance.rules[i].pattern),
            None => format!("instance default ({})", action.as_str()),
        };
        if action == Action::Block {
            let detail = format!("blocked by {why}");
            return (Ending { stage: "denied", status: TraceStatus::Denied, detail, error: String::new() }, 0);
        }
        pending
            .add([trace.stage("access", TraceStatus::Processing, now_ms(), format!("allowed by {why}")).encode()], []);

        // Only a resumed message can have an answer from before; a fresh one skips the read.
        let kept = if job.attempt > 0 { self.spool.answer(&inbound.id).await.ok().flatten() } else { None };
        let answer = match kept {
            Some(kept) => {
                let note = "answer kept from before a restart";
                pending.add([trace.stage("agent_response", TraceStatus::Processing, now_ms(), note).encode()], []);
                kept
            }
            None => match self.ask_agent(inbound, instance, trace, pending).await {
                Ok(text) => text,
                Err(error) => return self.fall_back(job, instance, error, trace, pending).await,
            },
        };
        let text = answer.trim();
        if text.is_empty() {
            return (Ending::ignored("the agent's answer is empty"), 0);
        }
        if text.starts_with("AUTOMAGIK:") {
            return (Ending::ignored("the agent suppressed the answer (AUTOMAGIK: prefix)"), 0);
        }
        self.deliver(job, instance, text, trace, pending).await
    }

    /// Calls the agent (with a typing indicator meanwhile) and records the exchange; the answer
    /// is kept with the next commit so a restart does not ask again.
    async fn ask_agent(
        &self,
        inbound: &Inbound,
        instance: &Arc<pb::InstanceConfig>,
        trace: &mut Recorder<'_>,
        pending: &mut Pending,
    ) -> Result<String, AgentError> {
        let typing = instance.behavior.as_ref().and_then(|b| b.typing_indicator).unwrap_or(true).then(|| {
            let (channels, instance, to) = (self.channels.clone(), instance.clone(), inbound.conversation.clone());
            tokio::spawn(async move { channels.typing(&instance, &to).await })
        });
        let agent = instance.agent.clone().unwrap_or_default();
        let channel = channel_name(channel_of(instance));
        let user = user_id(&inbound.instance_id, &inbound.sender);
        let session = session_name(&inbound.instance, &inbound.sender);
        let started = now_ms();
        let called =
            self.agent.call(&agent, inbound, &Caller { user_id: &user, session_name: &session }, channel).await;
        let agent_ms = now_ms() - started;
        self.stats.agent_latency.observe(Duration::from_millis(agent_ms.max(0) as u64));
        if let Some(typing) = typing {
            typing.abort();
        }
        let answer = match called {
            Ok(answer) => answer,
            Err(error) => {
                let failed = trace.stage("agent_request", TraceStatus::Processing, started, "").duration(agent_ms);
                pending.add([failed.error(&error).encode()], []);
                return Err(error);
            }
        };
        // The webhook is in the received stage already; the request is the rest.
        let attempts = format!("{} attempt(s)", answer.attempts);
        let request =
            trace.stage("agent_request", TraceStatus::Processing, started, attempts).raw_payload(&answer.request);
        let request = request.encode();
        let length = format!("{} characters", answer.text.chars().count());
        let response = trace
            .stage("agent_response", TraceStatus::Processing, now_ms(), length)
            .payload(&answer.response)
            .duration(agent_ms)
            .agent_ms(agent_ms)
            .encode();
        pending.add([request, response], [Op::Answer { id: inbound.id.clone(), text: answer.text.clone() }]);
        Ok(answer.text)
    }

    /// The agent failed: send the instance's fallback text, if it has one. Either way the
    /// message failed at the agent.
    async fn fall_back(
        &self,
        job: &Job,
        instance: &pb::InstanceConfig,
        error: AgentError,
        trace: &mut Recorder<'_>,
        pending: &mut Pending,
    ) -> (Ending, u32) {
        let fallback = instance.behavior.as_ref().map(|b| b.fallback_text.as_str()).unwrap_or_default();
        if fallback.trim().is_empty() {
            return (Ending::failed("agent_request", error), 0);
        }
        pending.add([], [Op::Answer { id: job.inbound.id.clone(), text: fallback.to_owned() }]);
        let (ending, chunks) = self.deliver(job, instance, fallback, trace, pending).await;
        match ending.status {
            TraceStatus::Completed => (Ending::failed("agent_request", format!("{error}; fallback text sent")), chunks),
            _ => (ending, chunks),
        }
    }

    /// Sends `text` in chunks, never sending a chunk twice.
    async fn deliver(
        &self,
        job: &Job,
        instance: &pb::InstanceConfig,
        text: &str,
        trace: &mut Recorder<'_>,
        pending: &mut Pending,
    ) -> (Ending, u32) {
        let (inbound, resumed) = (&job.inbound, job.attempt > 0);
        let chunks = self.channels.split(instance, text);
        let count = chunks.len() as u32;
        let mut problem: Option<Ending> = None;
        for (i, chunk) in chunks.iter().enumerate() {
            let index = i as u32;
            let label = format!("chunk {}/{}", i + 1, chunks.len());
            let state = if resumed { self.spool.send_state(&inbound.id, index).await.ok().flatten() } else { None };
            match state {
                Some(SendState::Sent) => continue,
                Some(SendState::Intent) => {
                    let event = trace
                        .stage("send_chunk", TraceStatus::Processing, now_ms(), label)
                        .error("outcome unknown: the node stopped during the send; not sent again")
                        .encode();
                    pending.add([event], []);
                    problem.get_or_insert(Ending::failed("send_chunk", "a chunk's outcome is unknown after a restart"));
                    continue;
                }
                Some(SendState::Failed) => {
                    problem.get_or_insert(Ending::failed("send_chunk", "a chunk failed before a restart"));
                    break;
                }
                None => {}
            }
            // The intent is durable before the send; it carries the answer and the previous
            // chunk's result along.
            let intent = Op::Send { id: inbound.id.clone(), chunk: index, state: SendState::Intent };
            if self.commit(pending, vec![intent]).await.is_err() {
                return (Ending::failed("send_chunk", "could not record the send intent"), count);
            }
            let started = now_ms();
            let sent = self.channels.send_text(instance, &inbound.conversation, &inbound.thread, chunk).await;
            let payload = ChunkSent { to: &inbound.conversation, text: chunk };
            let (state, event) = match &sent {
                Ok(message_id) => (
                    SendState::Sent,
                    trace
                        .stage("send_chunk", TraceStatus::Processing, now_ms(), format!("{label} sent as {message_id}"))
                        .payload(&payload)
                        .duration(now_ms() - started)
                        .encode(),
                ),
                Err(e) => (
                    SendState::Failed,
                    trace
                        .stage("send_chunk", TraceStatus::Processing, now_ms(), label)
                        .payload(&payload)
                        .duration(now_ms() - started)
                        .error(e)
                        .encode(),
                ),
            };
            pending.add([event], [Op::Send { id: inbound.id.clone(), chunk: index, state }]);
            if let Err(e) = sent {
                // Later chunks would arrive without this one: stop here.
                return (Ending::failed("send_chunk", e), count);
            }
        }
        (problem.unwrap_or_else(|| Ending::completed(format!("{count} chunk(s) delivered"))), count)
    }
}
