//! The node-facing config stream (`omni.v1.NodeSyncService`).
//!
//! One session per connected node. It catches the node up (changes since the revision it holds
//! when the log still has them, else a snapshot), then forwards each committed revision, whole
//! and in order, and sends Progress when idle. It never trusts a wake-up alone: every wake-up
//! re-reads the log. After a NACK the node keeps its previous config, and the next change is sent
//! as a snapshot rather than as a delta the node cannot stand on.

mod convert;
pub mod dispatch;

use crate::crypto::{Keyring, constant_time_eq};
use crate::metrics::Metrics;
use crate::shutdown::{self, Stopping};
use crate::store::{
    ChangeOp, ConfigChange, InstanceConfig, InstanceEventRecord, KIND_INSTANCE, NodeRecord, Store, now_millis,
};
use omni_proto::v1::{self as pb, node_sync_service_server::NodeSyncService, watch_request, watch_response};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub use convert::instance_config_to_pb;
use dispatch::Dispatcher;

pub const DEFAULT_GATEWAY_LEASE_TTL: Duration = Duration::from_secs(30);

/// Longest gateway report detail kept (a close reason).
const MAX_EVENT_DETAIL: usize = 1024;

#[derive(Debug, Clone, Copy)]
pub struct SyncSettings {
    /// How often an idle stream carries Progress (and the node a heartbeat).
    pub progress_interval: Duration,
    /// A node silent for this long is disconnected.
    pub node_timeout: Duration,
    /// Instances per snapshot chunk.
    pub snapshot_chunk: usize,
    /// At most this many revisions per Changes message.
    pub changes_window: i64,
    /// A node further behind than this gets a snapshot instead of the changes.
    pub max_catch_up: i64,
    /// How long a Discord gateway lease holds unless renewed: after losing the control plane
    /// this long, a node closes its gateways, and then another node may take them.
    pub gateway_lease_ttl: Duration,
}

impl Default for SyncSettings {
    fn default() -> Self {
        SyncSettings {
            progress_interval: Duration::from_secs(10),
            node_timeout: Duration::from_secs(35),
            snapshot_chunk: 500,
            changes_window: 500,
            max_catch_up: 5_000,
            gateway_lease_ttl: DEFAULT_GATEWAY_LEASE_TTL,
        }
    }
}

pub struct SyncApi {
    store: Arc<dyn Store>,
    keyring: Arc<Keyring>,
    node_token: Arc<str>,
    settings: SyncSettings,
    metrics: Arc<Metrics>,
    dispatcher: Arc<Dispatcher>,
    stopping: Stopping,
}

impl SyncApi {
    pub fn new(
        store: Arc<dyn Store>,
        keyring: Arc<Keyring>,
        node_token: Arc<str>,
        settings: SyncSettings,
        metrics: Arc<Metrics>,
        dispatcher: Arc<Dispatcher>,
        stopping: Stopping,
    ) -> SyncApi {
        SyncApi { store, keyring, node_token, settings, metrics, dispatcher, stopping }
    }

    fn check_node_token<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if constant_time_eq(presented.trim().as_bytes(), self.node_token.as_bytes()) {
            Ok(())
        } else {
            Err(Status::unauthenticated("the config stream needs the node token"))
        }
    }
}

/// The largest message a node may send on its streams (trace reports are cut at 8 MiB).
pub const MAX_NODE_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// The most trace events one report may carry.
const MAX_TRACE_EVENTS: usize = 5_000;

#[tonic::async_trait]
impl NodeSyncService for SyncApi {
    type WatchStream = ReceiverStream<Result<pb::WatchResponse, Status>>;

    async fn report_traces(
        &self,
        request: Request<pb::ReportTracesRequest>,
    ) -> Result<Response<pb::ReportTracesResponse>, Status> {
        self.check_node_token(&request)?;
        let report = request.into_inner();
        if report.events.len() > MAX_TRACE_EVENTS {
            return Err(Status::invalid_argument(format!("at most {MAX_TRACE_EVENTS} trace events per report")));
        }
        let accepted = report.events.len() as u32;
        // A stage this control plane cannot read (a newer node's, say) is dropped, not the
        // report: the node would resend the same batch forever.
        let mut unreadable = 0;
        let events: Vec<_> = report
            .events
            .into_iter()
            .filter_map(|e| crate::api::traces::event_from_pb(e).inspect_err(|_| unreadable += 1).ok())
            .collect();
        if unreadable > 0 {
            tracing::warn!(node_id = %report.node_id, unreadable, "dropped trace stages this control plane cannot read");
        }
        let started = Instant::now();
        let stored = self
            .store
            .ingest_trace_events(&report.node_id, &events)
            .await
            .map_err(crate::api::error::ApiError::from)?;
        self.metrics.trace_report_latency.observe(started.elapsed());
        self.metrics.trace_reports.fetch_add(1, Ordering::Relaxed);
        self.metrics.trace_events.fetch_add(stored as u64, Ordering::Relaxed);
        Ok(Response::new(pb::ReportTracesResponse { accepted }))
    }

    async fn report_instance_events(
        &self,
        request: Request<pb::ReportInstanceEventsRequest>,
    ) -> Result<Response<pb::ReportInstanceEventsResponse>, Status> {
        self.check_node_token(&request)?;
        let report = request.into_inner();
        if report.events.len() > MAX_TRACE_EVENTS {
            return Err(Status::invalid_argument(format!("at most {MAX_TRACE_EVENTS} events per report")));
        }
        let now = now_millis();
        let events: Vec<InstanceEventRecord> = report
            .events
            .into_iter()
            .filter(|e| {
                !e.instance_id.is_empty()
                    && match e.kind.as_str() {
                        "connection" | "qrcode" => true,
                        "gateway" => matches!(e.state.as_str(), "connecting" | "ready" | "error" | "closed"),
                        _ => false,
                    }
            })
            .map(|e| InstanceEventRecord {
                // Time 0 is "never" to the store; an untimed event happened by now. Gateway
                // reports are ordered by this control plane's clock, not the nodes' (an error
                // is judged by `revision`, never by comparing times).
                at: if e.kind != "gateway" && e.time_unix_ms > 0 { e.time_unix_ms } else { now },
                instance_id: e.instance_id,
                kind: e.kind,
                state: e.state,
                status_reason: i64::from(e.status_reason),
                wuid: e.wuid,
                profile_name: e.profile_name,
                detail: e.detail.chars().take(MAX_EVENT_DETAIL).collect(),
                revision: e.revision.max(0),
                node_id: report.node_id.clone(),
            })
            .collect();
        self.store.record_instance_events(&events).await.map_err(crate::api::error::ApiError::from)?;
        Ok(Response::new(pb::ReportInstanceEventsResponse {}))
    }

    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.check_node_token(&request)?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10s"))??;
        let Some(pb::WatchRequest { kind: Some(watch_request::Kind::Hello(hello)) }) = first else {
            return Err(Status::invalid_argument("the first message must be a hello"));
        };
        if hello.protocol != pb::SyncProtocol::V1 as i32 {
            return Err(Status::failed_precondition(format!(
                "this control plane speaks sync protocol v1, the node speaks {}",
                hello.protocol
            )));
        }
        if hello.node_id.is_empty() || hello.node_id.len() > 128 {
            return Err(Status::invalid_argument("node_id must be 1-128 characters"));
        }
        let now = now_millis();
        let node = NodeRecord {
            id: hello.node_id.clone(),
            address: hello.address.chars().take(256).collect(),
            version: hello.version.chars().take(64).collect(),
            applied_revision: hello.resume_revision,
            first_seen_at: now,
            last_seen_at: now,
            connected: true,
            last_error: String::new(),
        };
        self.store.node_connected(&node).await.map_err(crate::api::error::ApiError::from)?;
        tracing::info!(node_id = %node.id, address = %node.address, resume_revision = hello.resume_revision, "node connected");

        let (tx, rx) = mpsc::channel(4);
        let registration = self.dispatcher.register(&node.id, hello.resume_revision);
        let session = Session {
            dispatcher: self.dispatcher.clone(),
            commands: registration.commands,
            applied: registration.applied,
            node_id: node.id,
            store: self.store.clone(),
            keyring: self.keyring.clone(),
            settings: self.settings,
            tx,
            sent: 0,
            needs_snapshot: false,
            freed: self.dispatcher.watch_freed(),
            last_heartbeat: 0,
            last_heartbeat_at: Instant::now(),
            released: false,
            stopping: self.stopping.clone(),
            sends_in_flight: HashSet::new(),
        };
        tokio::spawn(session.run(hello.resume_revision, inbound));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Why a session ended early.
enum End {
    /// The node went away or stopped reading: nothing to tell it.
    Gone,
    /// Tell the node, then close.
    Error(Status),
    /// The control plane is stopping: the node reconnects, to it once restarted or to another.
    Stopping,
}

impl From<crate::store::StoreError> for End {
    fn from(error: crate::store::StoreError) -> End {
        End::Error(crate::api::error::ApiError::from(error).into())
    }
}

impl From<crate::api::error::ApiError> for End {
    fn from(error: crate::api::error::ApiError) -> End {
        End::Error(error.into())
    }
}

struct Session {
    dispatcher: Arc<Dispatcher>,
    /// Messages to send that the dispatcher picked this node for.
    commands: mpsc::Receiver<pb::SendCommand>,
    /// The revision the node last reported applied.
    applied: Arc<AtomicI64>,
    node_id: String,
    store: Arc<dyn Store>,
    keyring: Arc<Keyring>,
    settings: SyncSettings,
    tx: mpsc::Sender<Result<pb::WatchResponse, Status>>,
    /// The revision the node has been sent (it may not have applied it yet).
    sent: i64,
    needs_snapshot: bool,
    /// Lease releases by other nodes.
    freed: tokio::sync::watch::Receiver<u64>,
    /// The node's latest heartbeat; leases offered between heartbeats answer it (the node
    /// counts them from when it sent it, earlier than now: safe).
    last_heartbeat: u64,
    last_heartbeat_at: Instant,
    /// The node handed its leases back (it is shutting down).
    released: bool,
    /// Ends the stream, so that a graceful stop is not held open by it.
    stopping: Stopping,
    /// Sends forwarded to the node whose results it has not reported yet.
    sends_in_flight: HashSet<String>,
}

impl Session {
    async fn run(mut self, resume: i64, mut inbound: Streaming<pb::WatchRequest>) {
        let end = self.serve(resume, &mut inbound).await;
        self.dispatcher.unregister(&self.node_id, &self.applied);
        // Recorded before the stream ends: the node may reconnect (here or to another control
        // plane) as soon as it does, and a stopping control plane exits once its streams end.
        if let Err(e) = self.store.node_disconnected(&self.node_id, now_millis()).await {
            tracing::warn!(node_id = %self.node_id, error = %e, "could not record node disconnect");
        }
        match end {
            Err(End::Error(status)) => {
                tracing::warn!(node_id = %self.node_id, error = %status.message(), "config stream failed");
                let _ = self.tx.send(Err(status)).await;
            }
            Err(End::Stopping) => {
                let _ = self.tx.send(Err(Status::unavailable("the control plane is stopping"))).await;
            }
            Ok(()) | Err(End::Gone) => {}
        }
        tracing::info!(node_id = %self.node_id, "node disconnected");
    }

    async fn serve(&mut self, resume: i64, inbound: &mut Streaming<pb::WatchRequest>) -> Result<(), End> {
        let mut revisions = self.store.watch_revision();
        revisions.mark_unchanged();
        self.catch_up(resume).await?;
        let mut progress = tokio::time::interval(self.settings.progress_interval);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        progress.tick().await;
        let mut last_heard = Instant::now();
        let stopped = self.stopping.clone().wait();
        tokio::pin!(stopped);
        // Once stopping: the node is given no more sends, and the stream ends when those under
        // way have reported (their callers are waiting for the outcome) or after a while.
        let mut draining = false;
        let drained = tokio::time::sleep(shutdown::DRAIN);
        tokio::pin!(drained);
        loop {
            if draining {
                self.forget_abandoned_sends();
                if self.sends_in_flight.is_empty() && self.commands.is_empty() {
                    return Err(End::Stopping);
                }
            }
            tokio::select! {
                _ = &mut stopped, if !draining => {
                    // No more sends: one that picks this node now fails (and says so) instead
                    // of waiting in a queue no one reads; those queued already are forwarded.
                    // The node stays registered, so that a release of its gateway leases (it
                    // may be stopping too) is still answered.
                    self.commands.close();
                    drained.as_mut().reset(tokio::time::Instant::now() + shutdown::DRAIN);
                    draining = true;
                }
                _ = &mut drained, if draining => {
                    tracing::warn!(node_id = %self.node_id, sends = self.sends_in_flight.len(), "stopping before the node reported every send");
                    for id in self.sends_in_flight.drain() {
                        self.dispatcher.complete(pb::SendResult {
                            id,
                            ok: false,
                            error: "the control plane stopped before the node reported the outcome; the message may have been sent".into(),
                            outcome_unknown: true,
                            message_ids: Vec::new(),
                        });
                    }
                    return Err(End::Stopping);
                }
                changed = revisions.changed() => {
                    if changed.is_err() {
                        return Err(End::Gone);
                    }
                    self.forward_new(false).await?;
                }
                _ = progress.tick() => {
                    self.forget_abandoned_sends();
                    if last_heard.elapsed() > self.settings.node_timeout {
                        return Err(End::Error(Status::deadline_exceeded("the node stopped sending heartbeats")));
                    }
                    self.forward_new(true).await?;
                }
                Some(command) = self.commands.recv() => {
                    self.sends_in_flight.insert(command.id.clone());
                    self.send(watch_response::Kind::Send(command)).await?;
                }
                Ok(()) = self.freed.changed(), if self.last_heartbeat > 0 => {
                    // Only to a node that is listening: one that has not heartbeated for a
                    // third of a lease is cut off, or about to be replaced by a newer session.
                    let listening = self.last_heartbeat_at.elapsed() < self.settings.gateway_lease_ttl / 3
                        && self.dispatcher.is_current(&self.node_id, &self.applied);
                    if listening {
                        self.answer_with_leases(self.last_heartbeat).await?;
                    }
                }
                message = inbound.message() => {
                    match message {
                        Ok(Some(message)) => {
                            last_heard = Instant::now();
                            self.handle(message).await?;
                        }
                        Ok(None) | Err(_) => return Err(End::Gone),
                    }
                }
            }
        }
    }

    /// Sends whose callers stopped waiting (they timed out) are no longer waited for here.
    fn forget_abandoned_sends(&mut self) {
        self.sends_in_flight.retain(|id| self.dispatcher.is_pending(id));
    }

    async fn handle(&mut self, message: pb::WatchRequest) -> Result<(), End> {
        let now = now_millis();
        match message.kind {
            Some(watch_request::Kind::Ack(ack)) => {
                self.applied.store(ack.revision, Ordering::Relaxed);
                self.store.node_acked(&self.node_id, ack.revision, now).await?
            }
            Some(watch_request::Kind::SendResult(result)) => {
                self.sends_in_flight.remove(&result.id);
                self.dispatcher.complete(result)
            }
            Some(watch_request::Kind::Nack(nack)) => {
                tracing::warn!(node_id = %self.node_id, revision = nack.revision, error = %nack.error, "node rejected config");
                self.store.node_nacked(&self.node_id, &nack.error, now).await?;
                self.needs_snapshot = true;
            }
            // After a release the node is leaving: it is neither seen again nor given bots.
            Some(watch_request::Kind::Heartbeat(_)) if self.released => {}
            Some(watch_request::Kind::Heartbeat(beat)) => {
                self.applied.store(beat.applied_revision, Ordering::Relaxed);
                self.store.node_seen(&self.node_id, now).await?;
                if beat.release_leases {
                    // Shutting down with its gateways closed: nothing is renewed or granted;
                    // the empty answer tells the node its bots were handed over. A session
                    // replaced by a newer one of the same node (a restart) releases nothing:
                    // the leases are the new process's now.
                    self.last_heartbeat = 0;
                    self.released = true;
                    if self.dispatcher.is_current(&self.node_id, &self.applied) && self.release_leases(now).await {
                        self.dispatcher.leases_freed();
                        let leases = pb::GatewayLeases { heartbeat_sequence: beat.sequence, ..Default::default() };
                        self.send(watch_response::Kind::Leases(leases)).await?;
                    }
                } else if beat.sequence > 0 {
                    self.last_heartbeat = beat.sequence;
                    self.last_heartbeat_at = Instant::now();
                    // Nodes number heartbeats from 1. One that does not predates leases: it
                    // would read the answer as an empty message and drop the stream.
                    self.answer_with_leases(beat.sequence).await?;
                    // Bots freed before this answer were offered in it.
                    self.freed.mark_unchanged();
                }
            }
            Some(watch_request::Kind::Hello(_)) | None => {
                return Err(End::Error(Status::invalid_argument("unexpected message on an open config stream")));
            }
        }
        Ok(())
    }

    /// Renews the node's Discord gateway leases and sends it the whole set it now holds (empty:
    /// close them all). When the store fails the heartbeat goes unanswered: the node's leases
    /// then run out on their own, which is safe, where ending the stream would gain nothing.
    async fn answer_with_leases(&self, sequence: u64) -> Result<(), End> {
        let ttl_ms = i64::try_from(self.settings.gateway_lease_ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let now = now_millis();
        // Nodes heartbeat at least three times a lease: one silent for a whole lease (cut off,
        // say, with its stream not yet timed out) holds no bots, so it takes no share of them.
        let renewed = match self.store.count_live_nodes(now - ttl_ms).await {
            Ok(live) => self.store.renew_gateway_leases(&self.node_id, now, ttl_ms, live).await,
            Err(e) => Err(e),
        };
        match renewed {
            Ok(instance_ids) => {
                self.send(watch_response::Kind::Leases(pb::GatewayLeases {
                    heartbeat_sequence: sequence,
                    ttl_ms,
                    instance_ids,
                }))
                .await
            }
            Err(e) => {
                tracing::warn!(node_id = %self.node_id, error = %e, "could not renew gateway leases; heartbeat unanswered");
                Ok(())
            }
        }
    }

    /// Frees the leases of a node that has closed every gateway, so other nodes take its bots
    /// at their next heartbeat rather than when the leases expire. When the store fails, the
    /// leases run out on their own, which is safe. Whether they were released.
    async fn release_leases(&self, now: i64) -> bool {
        match self.store.release_gateway_leases(&self.node_id, now).await {
            Ok(released) => {
                tracing::info!(node_id = %self.node_id, released, "node handed its gateway leases back");
                true
            }
            Err(e) => {
                tracing::warn!(node_id = %self.node_id, error = %e, "could not release gateway leases; they will expire");
                false
            }
        }
    }

    async fn send(&self, kind: watch_response::Kind) -> Result<(), End> {
        self.tx.send(Ok(pb::WatchResponse { kind: Some(kind) })).await.map_err(|_| End::Gone)
    }

    /// Brings a node holding `resume` up to the head of the log.
    async fn catch_up(&mut self, resume: i64) -> Result<(), End> {
        let bounds = self.store.config_log_bounds().await?;
        if resume == bounds.head && resume > 0 {
            self.sent = resume;
            return self.send(watch_response::Kind::Progress(pb::ConfigProgress { revision: resume })).await;
        }
        let resumable =
            resume > bounds.compacted && resume < bounds.head && bounds.head - resume <= self.settings.max_catch_up;
        if resumable {
            self.sent = resume;
            self.forward_new(false).await
        } else {
            self.send_snapshot().await
        }
    }

    /// Sends whatever committed after `sent`; when there is nothing and `idle` is set, Progress.
    async fn forward_new(&mut self, idle: bool) -> Result<(), End> {
        let bounds = self.store.config_log_bounds().await?;
        if bounds.head <= self.sent {
            if idle {
                self.send(watch_response::Kind::Progress(pb::ConfigProgress { revision: self.sent })).await?;
            }
            return Ok(());
        }
        if self.needs_snapshot || self.sent < bounds.compacted {
            return self.send_snapshot().await;
        }
        while self.sent < bounds.head {
            let through = bounds.head.min(self.sent + self.settings.changes_window);
            let changes = self.store.config_changes(self.sent, through).await?;
            // Every revision in the window must be there; a hole means the log was compacted
            // under us, and only a snapshot is safe.
            let mut distinct = changes.iter().map(|c| c.revision).collect::<Vec<_>>();
            distinct.dedup();
            if distinct.len() as i64 != through - self.sent {
                return self.send_snapshot().await;
            }
            let events = self.events(&changes)?;
            self.send(watch_response::Kind::Changes(pb::ConfigChanges {
                from_revision: self.sent,
                to_revision: through,
                events,
            }))
            .await?;
            self.sent = through;
        }
        Ok(())
    }

    fn events(&self, changes: &[ConfigChange]) -> Result<Vec<pb::ConfigEvent>, End> {
        changes
            .iter()
            .filter(|c| c.kind == KIND_INSTANCE)
            .map(|change| {
                let kind = match change.op {
                    ChangeOp::Delete => pb::config_event::Kind::Delete(change.key.clone()),
                    ChangeOp::Upsert => {
                        let payload = change.payload.as_deref().unwrap_or_default();
                        let config: InstanceConfig = serde_json::from_str(payload).map_err(|e| {
                            End::from(crate::store::StoreError::Corrupt(format!("change {}: {e}", change.revision)))
                        })?;
                        pb::config_event::Kind::Upsert(instance_config_to_pb(&config, &self.keyring)?)
                    }
                };
                Ok(pb::ConfigEvent { revision: change.revision, kind: Some(kind) })
            })
            .collect()
    }

    async fn send_snapshot(&mut self) -> Result<(), End> {
        let (revision, configs) = self.store.config_snapshot().await?;
        let mut instances = configs
            .iter()
            .map(|c| instance_config_to_pb(c, &self.keyring))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .peekable();
        loop {
            let chunk: Vec<_> = instances.by_ref().take(self.settings.snapshot_chunk).collect();
            let last = instances.peek().is_none();
            self.send(watch_response::Kind::Snapshot(pb::SnapshotChunk { revision, instances: chunk, last })).await?;
            if last {
                break;
            }
        }
        tracing::debug!(node_id = %self.node_id, revision, instances = configs.len(), "snapshot sent");
        self.sent = revision;
        self.needs_snapshot = false;
        Ok(())
    }
}
