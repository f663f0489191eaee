//! The node's end of the config stream: connect, say hello with the revision held, apply what
//! arrives (a whole revision or nothing), ACK or NACK, heartbeat, and reconnect with jittered
//! exponential backoff when the stream breaks or goes silent.

use crate::channels::discord::gateway::Leases;
use crate::config::{ApplyError, Config, ConfigHandle, Limits};
use omni_proto::v1::{self as pb, node_sync_service_client::NodeSyncServiceClient, watch_request, watch_response};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Endpoint;

#[derive(Debug, Clone)]
pub struct SyncSettings {
    pub heartbeat_interval: Duration,
    /// The stream is considered dead when the control plane is silent this long.
    pub silence_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Default for SyncSettings {
    fn default() -> Self {
        SyncSettings {
            heartbeat_interval: Duration::from_secs(10),
            silence_timeout: Duration::from_secs(35),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(15),
        }
    }
}

/// What the node's endpoints report about the stream.
#[derive(Debug, Default)]
pub struct SyncStatus {
    pub connected: AtomicBool,
    pub acks: AtomicU64,
    pub nacks: AtomicU64,
    /// Snapshots received (full resyncs); a resume by changes does not count.
    pub snapshots: AtomicU64,
    pub reconnects: AtomicU64,
    /// Gateway lease sets received (each renews the node's leases).
    pub lease_answers: AtomicU64,
}

#[derive(Debug, Error)]
enum SessionError {
    #[error("connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("{}", .0.message())]
    Status(#[from] tonic::Status),
    #[error("the control plane was silent for {0:?}")]
    Silent(Duration),
    #[error("{0}")]
    Protocol(String),
    #[error("resync needed: {0}")]
    Gap(String),
}

/// Adds the node token to every call to the control plane.
#[derive(Clone)]
pub struct NodeToken(pub MetadataValue<Ascii>);

impl tonic::service::Interceptor for NodeToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

pub struct SyncClient {
    pub endpoint: Endpoint,
    pub token: NodeToken,
    pub node_id: String,
    pub address: String,
    pub config: Arc<ConfigHandle>,
    pub limits: Limits,
    pub status: Arc<SyncStatus>,
    pub settings: SyncSettings,
    /// Messages to send (MessageService) go to `commands`, and their results come back on
    /// `results`, to be reported on whichever stream is open by then. `None` refuses them.
    pub sends: Option<Sends>,
    /// Where the Discord gateway leases the control plane grants go.
    pub leases: Option<watch::Sender<Leases>>,
    /// Asked at shutdown to hand the leases back.
    pub release: Option<Arc<LeaseRelease>>,
    /// Heartbeats sent, across sessions.
    pub beats: AtomicU64,
}

pub struct Sends {
    pub commands: mpsc::Sender<pb::SendCommand>,
    pub results: tokio::sync::Mutex<mpsc::Receiver<pb::SendResult>>,
}

/// A node's request, at shutdown and with its gateways closed, to hand its Discord leases back
/// so that other nodes take the bots at once.
pub struct LeaseRelease {
    requested: watch::Sender<bool>,
    /// `Some(true)` once the control plane took the leases back; `Some(false)` once there is no
    /// control plane to ask (connecting failed while the release waited).
    outcome: watch::Sender<Option<bool>>,
}

impl Default for LeaseRelease {
    fn default() -> Self {
        LeaseRelease { requested: watch::channel(false).0, outcome: watch::channel(None).0 }
    }
}

impl LeaseRelease {
    /// Whether the control plane took the leases back. Waits for a config stream (a node whose
    /// control plane stopped reconnects, perhaps to another replica), but not for one that
    /// cannot be opened.
    pub async fn release(&self) -> bool {
        let mut outcome = self.outcome.subscribe();
        self.requested.send_replace(true);
        outcome.wait_for(Option::is_some).await.is_ok_and(|taken| *taken == Some(true))
    }
}

/// Send commands carry media of up to 12 MiB.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// A delay drawn uniformly from [d/2, d], so restarted nodes do not reconnect in lockstep.
fn jittered(d: Duration) -> Duration {
    let random = u64::from_le_bytes(omni_core::crypto::random_bytes::<8>());
    let fraction = 0.5 + (random as f64 / u64::MAX as f64) / 2.0;
    d.mul_f64(fraction)
}

impl SyncClient {
    /// Runs until the task is dropped.
    pub async fn run(self) {
        let mut backoff = self.settings.backoff_initial;
        loop {
            match self.session().await {
                Ok(()) => {
                    tracing::info!("control plane closed the config stream");
                    backoff = self.settings.backoff_initial;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "config stream down");
                    if let (SessionError::Connect(_), Some(release)) = (&e, &self.release)
                        && *release.requested.borrow()
                    {
                        // Leaving, and no control plane to hand the leases to: they expire.
                        release.outcome.send_replace(Some(false));
                    }
                }
            }
            self.status.connected.store(false, Ordering::Relaxed);
            self.status.reconnects.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(jittered(backoff)).await;
            backoff = (backoff * 2).min(self.settings.backoff_max);
        }
    }

    async fn session(&self) -> Result<(), SessionError> {
        let channel = self.endpoint.connect().await?;
        let mut client = NodeSyncServiceClient::with_interceptor(channel, self.token.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let (outbound, rx) = mpsc::channel(16);
        let hello = pb::NodeHello {
            node_id: self.node_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol: pb::SyncProtocol::V1 as i32,
            resume_revision: self.config.revision(),
            address: self.address.clone(),
        };
        send(&outbound, watch_request::Kind::Hello(hello)).await;
        let mut inbound = client.watch(ReceiverStream::new(rx)).await?.into_inner();
        self.status.connected.store(true, Ordering::Relaxed);
        tracing::info!(resume_revision = self.config.revision(), "config stream open");

        let mut beats = Heartbeats::new(self.settings.heartbeat_interval);
        let mut release = self.release.as_ref().map(|r| r.requested.subscribe());
        let mut release_sequence = None;
        // A snapshot in chunks: its revision and the instances so far.
        let mut snapshot: Option<(i64, Vec<pb::InstanceConfig>)> = None;
        // One session at a time reports send results; the others have ended.
        let mut results = match &self.sends {
            Some(sends) => Some(sends.results.lock().await),
            None => None,
        };
        loop {
            tokio::select! {
                Some(result) = next_result(&mut results) => {
                    send(&outbound, watch_request::Kind::SendResult(result)).await;
                }
                message = tokio::time::timeout(self.settings.silence_timeout, inbound.message()) => {
                    let Some(message) = message.map_err(|_| SessionError::Silent(self.settings.silence_timeout))?? else {
                        return Ok(());
                    };
                    if let Some(watch_response::Kind::Leases(leases)) = &message.kind {
                        match release_sequence {
                            Some(sequence) => self.release_answered(leases, sequence),
                            None => self.leases_granted(leases, &mut beats),
                        }
                        continue;
                    }
                    let bots_changed = self.leases.is_some() && touches_bots(&message);
                    let applied = self.handle(message, &mut snapshot, &outbound).await?;
                    if bots_changed && applied {
                        // New or changed bots: ask for leases now, not a beat later.
                        beats.timer.reset_immediately();
                    }
                }
                _ = release_requested(&mut release), if release_sequence.is_none() => {
                    let sequence = self.beats.fetch_add(1, Ordering::Relaxed) + 1;
                    release_sequence = Some(sequence);
                    let applied_revision = self.config.revision();
                    let beat = pb::NodeHeartbeat { applied_revision, sequence, release_leases: true };
                    send(&outbound, watch_request::Kind::Heartbeat(beat)).await;
                }
                // Once leaving, no heartbeat may ask for bots again.
                _ = beats.timer.tick(), if !release_pending(&release) => {
                    let applied_revision = self.config.revision();
                    // 0 takes no leases: a node that runs no gateways must not be given bots.
                    let sequence = match self.leases {
                        Some(_) => beats.sent(self.beats.fetch_add(1, Ordering::Relaxed) + 1),
                        None => 0,
                    };
                    let beat = pb::NodeHeartbeat { applied_revision, sequence, release_leases: false };
                    send(&outbound, watch_request::Kind::Heartbeat(beat)).await;
                }
            }
        }
    }

    /// Hands the leases on, valid from when the heartbeat they answer was sent, and fits the
    /// heartbeat period to their TTL. An answer to a heartbeat this session did not send (or no
    /// longer remembers) is ignored: the next one renews.
    fn leases_granted(&self, leases: &pb::GatewayLeases, beats: &mut Heartbeats) {
        let Some(tx) = &self.leases else { return };
        let Some(sent) = beats.sent_at(leases.heartbeat_sequence) else { return };
        let ttl = Duration::from_millis(leases.ttl_ms.max(0) as u64);
        tx.send_replace(Leases::granted(leases.instance_ids.clone(), sent, ttl));
        self.status.lease_answers.fetch_add(1, Ordering::Relaxed);
        beats.fit_lease(ttl);
    }

    /// The release is confirmed by an empty set with no TTL for its heartbeat; a control plane
    /// that does not know releases answers as for any heartbeat, which is no confirmation.
    fn release_answered(&self, leases: &pb::GatewayLeases, sequence: u64) {
        let confirmed = leases.heartbeat_sequence == sequence && leases.ttl_ms == 0 && leases.instance_ids.is_empty();
        if let (true, Some(release)) = (confirmed, &self.release) {
            release.outcome.send_replace(Some(true));
        }
    }

    /// Applies what the control plane sent; true when a revision was applied.
    async fn handle(
        &self,
        message: pb::WatchResponse,
        snapshot: &mut Option<(i64, Vec<pb::InstanceConfig>)>,
        outbound: &mpsc::Sender<pb::WatchRequest>,
    ) -> Result<bool, SessionError> {
        let Some(kind) = message.kind else {
            return Err(SessionError::Protocol("empty message".into()));
        };
        let (revision, applied) = match kind {
            watch_response::Kind::Progress(_) | watch_response::Kind::Leases(_) => return Ok(false),
            watch_response::Kind::Send(command) => {
                let id = command.id.clone();
                let refusal = match &self.sends {
                    Some(sends) => sends.commands.try_send(command).err().map(|_| "this node is too busy to send"),
                    None => Some("this node does not send messages"),
                };
                if let Some(error) = refusal {
                    let result = pb::SendResult { id, error: error.to_owned(), ..Default::default() };
                    send(outbound, watch_request::Kind::SendResult(result)).await;
                }
                return Ok(false);
            }
            watch_response::Kind::Snapshot(chunk) => {
                let (revision, instances) = snapshot.get_or_insert_with(|| (chunk.revision, Vec::new()));
                if *revision != chunk.revision {
                    return Err(SessionError::Protocol("snapshot chunks of different revisions".into()));
                }
                instances.extend(chunk.instances);
                if !chunk.last {
                    return Ok(false);
                }
                let (revision, instances) = snapshot.take().expect("just filled");
                self.status.snapshots.fetch_add(1, Ordering::Relaxed);
                (revision, Config::from_snapshot(revision, instances, self.limits))
            }
            watch_response::Kind::Changes(changes) => {
                let Some(current) = self.config.load() else {
                    return Err(SessionError::Gap("changes arrived before any snapshot".into()));
                };
                let revision = changes.to_revision;
                (revision, current.apply_changes(changes, self.limits))
            }
        };
        match applied {
            Ok(config) => {
                let instances = config.instances.len();
                self.config.store(config);
                self.status.acks.fetch_add(1, Ordering::Relaxed);
                tracing::info!(revision, instances, "config applied");
                send(outbound, watch_request::Kind::Ack(pb::ConfigAck { revision })).await;
                return Ok(true);
            }
            Err(ApplyError::Gap { from, held }) => {
                return Err(SessionError::Gap(format!("changes from {from}, holding {held}")));
            }
            Err(ApplyError::Rejected(error)) => {
                self.status.nacks.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(revision, %error, kept_revision = self.config.revision(), "config rejected");
                send(outbound, watch_request::Kind::Nack(pb::ConfigNack { revision, error })).await;
            }
        }
        Ok(false)
    }
}

/// Heartbeats kept in memory: a lease answers one of the latest few.
const RECENT_BEATS: usize = 8;

/// A session's heartbeats: their timer (the first fires at once, its answer bringing the
/// node's gateway leases), their period, and when the recent ones were sent, since a lease
/// counts from the heartbeat it answers.
struct Heartbeats {
    timer: tokio::time::Interval,
    /// The period asked for; shortened to fit leases.
    longest: Duration,
    recent: VecDeque<(u64, Instant)>,
}

impl Heartbeats {
    fn new(every: Duration) -> Heartbeats {
        Heartbeats {
            timer: tokio::time::interval(every),
            longest: every,
            recent: VecDeque::with_capacity(RECENT_BEATS),
        }
    }

    /// Notes that heartbeat `sequence` goes out now; returns it.
    fn sent(&mut self, sequence: u64) -> u64 {
        if self.recent.len() == RECENT_BEATS {
            self.recent.pop_front();
        }
        self.recent.push_back((sequence, Instant::now()));
        sequence
    }

    fn sent_at(&self, sequence: u64) -> Option<Instant> {
        self.recent.iter().find(|(seq, _)| *seq == sequence).map(|(_, at)| *at)
    }

    /// Renews well within a lease: three heartbeats per TTL at least.
    fn fit_lease(&mut self, ttl: Duration) {
        let wanted = self.longest.min(ttl / 3).max(Duration::from_millis(50));
        if wanted != self.timer.period() {
            self.timer = tokio::time::interval_at(Instant::now() + wanted, wanted);
        }
    }
}

fn release_pending(release: &Option<watch::Receiver<bool>>) -> bool {
    release.as_ref().is_some_and(|r| *r.borrow())
}

async fn release_requested(release: &mut Option<watch::Receiver<bool>>) {
    match release {
        Some(requested) => {
            if requested.wait_for(|r| *r).await.is_err() {
                std::future::pending::<()>().await
            }
        }
        None => std::future::pending().await,
    }
}

/// Whether applying `message` may change which Discord bots this node should run.
fn touches_bots(message: &pb::WatchResponse) -> bool {
    match &message.kind {
        Some(watch_response::Kind::Snapshot(chunk)) => chunk.last,
        Some(watch_response::Kind::Changes(changes)) => changes.events.iter().any(|event| {
            matches!(&event.kind, Some(pb::config_event::Kind::Upsert(i)) if i.channel == pb::Channel::Discord as i32)
        }),
        _ => false,
    }
}

async fn next_result(
    results: &mut Option<tokio::sync::MutexGuard<'_, mpsc::Receiver<pb::SendResult>>>,
) -> Option<pb::SendResult> {
    match results {
        Some(results) => results.recv().await,
        None => std::future::pending().await,
    }
}

async fn send(outbound: &mpsc::Sender<pb::WatchRequest>, kind: watch_request::Kind) {
    // A closed channel means the stream is gone; the session notices on its next read.
    let _ = outbound.send(pb::WatchRequest { kind: Some(kind) }).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stopping node whose control plane is gone (a standalone hub's own, say) learns at once
    /// that its leases cannot be handed back, instead of waiting out the hand-back's time limit.
    #[tokio::test]
    async fn a_release_with_no_control_plane_to_reach_gives_up() {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let release = Arc::new(LeaseRelease::default());
        let client = SyncClient {
            endpoint: omni_proto::client::endpoint(&format!("http://{closed}"), None).unwrap(),
            token: NodeToken("Bearer node-token".parse().unwrap()),
            node_id: "node-a".into(),
            address: "test".into(),
            config: Arc::new(ConfigHandle::new()),
            limits: Limits::default(),
            status: Arc::new(SyncStatus::default()),
            settings: SyncSettings::default(),
            sends: None,
            leases: None,
            release: Some(release.clone()),
            beats: Default::default(),
        };
        let running = tokio::spawn(client.run());
        // The guard only keeps a regression from hanging the suite: the answer comes with the
        // next failed connection, well within a second.
        let taken = tokio::time::timeout(Duration::from_secs(60), release.release()).await;
        assert_eq!(taken.ok(), Some(false), "no control plane took the leases, and the release said so");
        running.abort();
    }

    #[test]
    fn jitter_stays_within_half_to_full() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_millis(1000));
            assert!(d >= Duration::from_millis(500) && d <= Duration::from_millis(1000), "{d:?}");
        }
    }
}
