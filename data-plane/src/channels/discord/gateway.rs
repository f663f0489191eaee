//! The gateways of the Discord bots this node holds leases for.
//!
//! The control plane leases each active bot to one node and renews the lease in answer to the
//! node's heartbeats (see [`Leases`]). This module keeps the running gateways equal to the
//! leased bots: it starts a gateway when a lease arrives, closes it when the lease goes away or
//! runs out (before the control plane could give it to another node), and restarts only a bot
//! whose token changed. A fatal close (bad token, disallowed intents) stops that bot and is
//! reported; it is not tried again until the instance's config changes (a new revision).

use super::parse::parse;
use crate::channels::ingest::{Candidate, Intake};
use crate::config::ConfigHandle;
use crate::connection_events::ConnectionEvents;
use crate::traces::now_ms;
use omni_proto::v1 as pb;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use twilight_gateway::{CloseFrame, Event, EventTypeFlags, Intents, Shard, ShardId, StreamExt as _};
use twilight_model::gateway::CloseCode;

/// The bots this node may run, and until when. Set by the config stream.
#[derive(Debug, Clone, Default)]
pub struct Leases {
    pub instance_ids: HashSet<String>,
    /// Gateways start closing then; `None` holds nothing.
    pub close_by: Option<Instant>,
    /// When the leases end at the latest, as the control plane counts: every gateway is gone
    /// by then, closed or dropped.
    pub expires: Option<Instant>,
}

impl Leases {
    /// A lease valid `ttl` from `sent` (when the node sent the heartbeat the control plane
    /// answered). Gateways close a fifth of the TTL early, so a close handshake in progress
    /// still ends before the control plane's own expiry.
    pub fn granted(instance_ids: Vec<String>, sent: Instant, ttl: Duration) -> Leases {
        Leases {
            instance_ids: instance_ids.into_iter().collect(),
            close_by: Some(sent + ttl - ttl / 5),
            expires: Some(sent + ttl),
        }
    }

    fn valid(&self, now: Instant) -> bool {
        self.close_by.is_some_and(|at| at > now)
    }
}

/// What `/metrics` shows of the gateways.
#[derive(Debug, Default)]
pub struct GatewayStats {
    /// Bots this node holds a valid lease for.
    pub leased: AtomicU64,
    /// Gateways running (connecting or ready).
    pub running: AtomicU64,
    /// Gateways that ended with a fatal close code.
    pub fatal_closes: AtomicU64,
}

/// Where gateways connect and what their messages go to.
#[derive(Clone)]
pub struct GatewaySettings {
    /// Discord's gateway unless pointed elsewhere (a `ws://` URL works).
    pub gateway_url: Option<String>,
}

/// How long closing gateways may take before their connections are dropped.
const CLOSE_BOUND: Duration = Duration::from_secs(1);

struct Running {
    token: String,
    /// Tells this run apart from an earlier one of the same bot.
    generation: u64,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Drop for Running {
    /// A bot forgotten is a bot stopped, also when the whole manager goes away.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a bot task says when it ends.
struct Ended {
    instance_id: String,
    generation: u64,
    /// A fatal close: the config revision it happened with.
    fatal_revision: Option<i64>,
}

struct Bot {
    /// The config the gateway started with (its token); messages are judged by the current one.
    instance: Arc<pb::InstanceConfig>,
    config: Arc<ConfigHandle>,
    token: String,
    generation: u64,
    intake: Intake,
    events: ConnectionEvents,
    settings: GatewaySettings,
}

pub const INTENTS: Intents = Intents::GUILD_MESSAGES.union(Intents::DIRECT_MESSAGES).union(Intents::MESSAGE_CONTENT);

/// Keeps the gateways equal to the leased bots until `shutdown` turns true (then closes them
/// all and returns) or the task is dropped (which drops every gateway with it).
pub async fn run(
    mut leases: watch::Receiver<Leases>,
    config: Arc<ConfigHandle>,
    intake: Intake,
    events: ConnectionEvents,
    settings: GatewaySettings,
    stats: Arc<GatewayStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut applied = config.subscribe();
    let mut running: HashMap<String, Running> = HashMap::new();
    // Bots that closed fatally, with the config revision they failed on: not started again
    // until the instance changes (the control plane applies the same rule to leases).
    let mut failed: HashMap<String, i64> = HashMap::new();
    let mut generations = 0u64;
    let (ended_tx, mut ended) = mpsc::unbounded_channel::<Ended>();
    loop {
        let current = leases.borrow().clone();
        let now = Instant::now();
        let wanted: HashMap<String, Arc<pb::InstanceConfig>> = match (current.valid(now), config.load()) {
            (true, Some(config)) => config
                .instances
                .values()
                .filter(|i| {
                    current.instance_ids.contains(&i.id) && i.active && i.channel == pb::Channel::Discord as i32
                })
                .filter(|i| i.discord.as_ref().is_some_and(|d| !d.token.is_empty()))
                .map(|i| (i.id.clone(), i.clone()))
                .collect(),
            _ => HashMap::new(),
        };
        // Close what is no longer ours, or runs with an old token.
        let stale: Vec<String> = running
            .iter()
            .filter(|(id, bot)| wanted.get(*id).and_then(|i| i.discord.as_ref()).is_none_or(|d| d.token != bot.token))
            .map(|(id, _)| id.clone())
            .collect();
        // All close at once (a lease running out may take every bot), within a bound: the next
        // bot of an instance must not overlap it, and a lease's margin is short. Past the bound
        // the task is aborted, which drops the connection.
        let closing: Vec<Running> = stale.iter().filter_map(|id| running.remove(id)).collect();
        let mut bound = Instant::now() + CLOSE_BOUND;
        if let Some(expires) = current.expires {
            bound = bound.min(expires.checked_sub(Duration::from_millis(50)).unwrap_or(expires));
        }
        close_all(closing, bound).await;
        for (id, instance) in wanted {
            let token = instance.discord.as_ref().map(|d| d.token.clone()).unwrap_or_default();
            if running.contains_key(&id) || failed.get(&id).is_some_and(|r| *r >= instance.revision) {
                continue;
            }
            failed.remove(&id);
            generations += 1;
            let generation = generations;
            let (stop, stopped) = watch::channel(false);
            let bot = Bot {
                instance,
                config: config.clone(),
                token: token.clone(),
                generation,
                intake: intake.clone(),
                events: events.clone(),
                settings: settings.clone(),
            };
            let task = tokio::spawn(bot.run(stopped, ended_tx.clone()));
            running.insert(id, Running { token, generation, stop, task });
        }
        let leased = if current.valid(Instant::now()) { current.instance_ids.len() } else { 0 };
        stats.leased.store(leased as u64, Ordering::Relaxed);
        stats.running.store(running.len() as u64, Ordering::Relaxed);
        let deadline = current.close_by.filter(|_| !running.is_empty());
        tokio::select! {
            _ = async { shutdown.wait_for(|stop| *stop).await.map(|_| ()) } => {
                let closing: Vec<Running> = running.drain().map(|(_, bot)| bot).collect();
                close_all(closing, Instant::now() + CLOSE_BOUND).await;
                return;
            }
            changed = leases.changed() => if changed.is_err() { return },
            _ = applied.changed() => {
                if let Some(config) = config.load() {
                    failed.retain(|id, _| config.instances.values().any(|i| &i.id == id));
                }
            }
            Some(end) = ended.recv() => {
                if running.get(&end.instance_id).is_some_and(|r| r.generation == end.generation) {
                    running.remove(&end.instance_id);
                }
                if let Some(revision) = end.fatal_revision {
                    stats.fatal_closes.fetch_add(1, Ordering::Relaxed);
                    failed.insert(end.instance_id, revision);
                }
            }
            _ = sleep_until(deadline) => {
                tracing::warn!(bots = running.len(), "gateway leases ran out without renewal: closing gateways");
            }
        }
    }
}

/// Closes `bots` at once; any still closing at `bound` is dropped (its connection with it).
async fn close_all(bots: Vec<Running>, bound: Instant) {
    for bot in &bots {
        let _ = bot.stop.send(true);
    }
    for mut bot in bots {
        let _ = tokio::time::timeout_at(bound, &mut bot.task).await;
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Bot {
    fn report(&self, state: &str, detail: String) {
        self.events.report(pb::InstanceEvent {
            instance_id: self.instance.id.clone(),
            kind: "gateway".into(),
            state: state.into(),
            detail,
            revision: self.instance.revision,
            time_unix_ms: now_ms(),
            ..Default::default()
        });
    }

    async fn run(self, mut stop: watch::Receiver<bool>, ended: mpsc::UnboundedSender<Ended>) {
        let name = self.instance.name.clone();
        let mut builder = twilight_gateway::ConfigBuilder::new(self.token.clone(), INTENTS);
        if let Some(url) = &self.settings.gateway_url {
            builder = builder.proxy_url(url.trim_end_matches('/').to_owned());
        }
        let mut shard = Shard::with_config(ShardId::ONE, builder.build());
        tracing::info!(instance = %name, "Discord gateway connecting");
        self.report("connecting", String::new());
        let wanted = EventTypeFlags::READY | EventTypeFlags::MESSAGE_CREATE;
        let mut bot_user_id = 0;
        let fatal = loop {
            let item = tokio::select! {
                _ = stop.changed() => {
                    shard.close(CloseFrame::NORMAL);
                    // Let the close frame go out; the socket closes when the shard drops.
                    let _ = tokio::time::timeout(CLOSE_BOUND, async {
                        while let Some(item) = shard.next_event(EventTypeFlags::empty()).await {
                            if matches!(item, Ok(Event::GatewayClose(_))) { break }
                        }
                    }).await;
                    tracing::info!(instance = %name, "Discord gateway closed");
                    self.report("closed", String::new());
                    break false;
                }
                item = shard.next_event(wanted) => item,
            };
            match item {
                None => {
                    let why = "the gateway connection ended and cannot be resumed".to_owned();
                    tracing::error!(instance = %name, "{why}");
                    self.report("error", why);
                    break true;
                }
                Some(Ok(Event::Ready(ready))) => {
                    bot_user_id = ready.user.id.get();
                    tracing::info!(instance = %name, bot_user = %ready.user.name, "Discord gateway ready");
                    self.report("ready", String::new());
                }
                Some(Ok(Event::MessageCreate(message))) => self.accept(&message, bot_user_id).await,
                Some(Ok(Event::GatewayClose(frame))) => {
                    let code = frame.as_ref().map(|f| f.code);
                    let fatal = code.and_then(|c| CloseCode::try_from(c).ok()).is_some_and(|c| !c.can_reconnect());
                    if fatal {
                        let reason = frame.as_ref().map(|f| f.reason.to_string()).unwrap_or_default();
                        let why = format!(
                            "Discord closed the gateway with {} ({reason}); not reconnecting",
                            code.unwrap_or(0)
                        );
                        tracing::error!(instance = %name, "{why}");
                        self.report("error", why);
                        break true;
                    }
                    tracing::info!(instance = %name, code, "Discord gateway closed; reconnecting");
                    self.report("connecting", String::new());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => tracing::warn!(instance = %name, error = %e, "Discord gateway error"),
            }
        };
        let fatal_revision = fatal.then_some(self.instance.revision);
        let _ =
            ended.send(Ended { instance_id: self.instance.id.clone(), generation: self.generation, fatal_revision });
    }

    /// Makes a message durable (deduplicated on its id: a resumed session replays events) and
    /// hands it to the pipeline.
    async fn accept(&self, message: &twilight_model::channel::Message, bot_user_id: u64) {
        // A bot's own replies come back on its gateway; they need no trace, nor parsing.
        if bot_user_id != 0 && message.author.id.get() == bot_user_id {
            return;
        }
        // Guild filters and reply rules as configured now, not when the gateway started.
        let current = self.config.load().and_then(|c| c.instances.get(&self.instance.name).cloned());
        let instance = current.filter(|i| i.id == self.instance.id).unwrap_or_else(|| self.instance.clone());
        let id = omni_core::names::new_trace_id();
        let (inbound, ignore) = parse(message, &instance, bot_user_id, now_ms(), id);
        let dedupe_key = inbound.external_id.clone();
        let candidate = Candidate { inbound, ignore, dedupe_key, trace_duplicate: true };
        if let Err(e) = self.intake.accept(instance.clone(), pb::Channel::Discord, vec![candidate]).await {
            // The gateway has no redelivery: this message is lost, and says so loudly.
            tracing::error!(instance = %instance.name, error = %e, message_id = %message.id, "Discord message dropped: spool unavailable");
        }
    }
}
