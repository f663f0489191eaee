//! Discord bots on one node: N bots against the loopback fake of Discord's gateway, the time
//! until every one is ready, then the node's memory and the CPU both processes use at idle.
//!
//! `omni-bench discord [--bots 200] [--idle-secs 10] [--heartbeat-ms 41250]`
//!
//! A control plane on SQLite (gateway leases of 10 s, so the node renews them every 3.3 s,
//! three times the default's rate) and one data-plane node whose Discord
//! gateway and REST API are [`FakeDiscord`]. The bots are created through the gRPC API, 32
//! requests in flight; a bot is ready when the fake sees its session live (polled every 10 ms).
//! The fake announces `--heartbeat-ms` in its Hello (Discord's own interval by default), so the
//! idle figures include the gateways' heartbeats as they would be against Discord.

use crate::stats::{cpu_time, mib, ms, percentile, rss_bytes};
use omni_proto::v1::{self as pb, instance_service_client::InstanceServiceClient};
use omni_tests::discord::FakeDiscord;
use omni_tests::fakes::FakeAgent;
use omni_tests::process::{ControlPlane, ControlPlaneOptions, DataPlane, DataPlaneOptions};
use std::time::{Duration, Instant};
use tonic::metadata::MetadataValue;

/// Created at once, at most.
const IN_FLIGHT: usize = 32;
/// Every bot live within this long of the first creation, or the benchmark fails.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// Between all bots live and the idle window, for the connection burst's aftermath to settle.
const SETTLE: Duration = Duration::from_secs(1);

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Discord bots (instances), all on the one node.
    #[arg(long, default_value_t = 200)]
    bots: usize,
    /// Seconds of the idle measurement, once every bot is ready.
    #[arg(long, default_value_t = 10)]
    idle_secs: u64,
    /// Gateway heartbeat interval the fake announces, in milliseconds (Discord's is 41250).
    #[arg(long, default_value_t = 41_250)]
    heartbeat_ms: u64,
}

fn token(i: usize) -> String {
    format!("bench-discord-token-{i:05}")
}

fn bot(i: usize, agent_url: &str) -> pb::Instance {
    pb::Instance {
        name: format!("bench-discord-{i:05}"),
        channel: pb::Channel::Discord as i32,
        agent: Some(pb::AgentSettings {
            url: agent_url.to_owned(),
            key: "agent-key-0123456789".into(),
            ..Default::default()
        }),
        discord: Some(pb::DiscordSettings { token: token(i), ..Default::default() }),
        ..Default::default()
    }
}

/// CPU used by `pid` over `window`: (% of one core, ms per second).
fn cpu_share(used: Duration, window: Duration) -> (f64, f64) {
    let share = used.as_secs_f64() / window.as_secs_f64();
    (share * 100.0, share * 1000.0)
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    anyhow::ensure!(options.bots > 0, "--bots must be at least 1");
    let n = options.bots;
    let fake = FakeDiscord::start().await;
    fake.heartbeat_interval(options.heartbeat_ms);
    let tokens: Vec<String> = (0..n).map(token).collect();
    for (i, token) in tokens.iter().enumerate() {
        fake.bot(token, &(100_000_000_000_000_000 + i as u64).to_string(), &format!("benchbot{i}"));
    }
    let agent = FakeAgent::start().await;

    let dir = tempfile::tempdir()?;
    let cp_options =
        ControlPlaneOptions { extra_args: vec!["--gateway-lease-ttl".into(), "10s".into()], ..Default::default() };
    let cp = ControlPlane::start(&dir.path().join("cp"), &cp_options).await;
    let admin_key = std::fs::read_to_string(cp.data_dir.join("admin-api-key"))?.trim().to_owned();
    let node_options = DataPlaneOptions {
        control_plane: cp.url(),
        node_token: cp.node_token(),
        node_id: Some("bench-discord-node".into()),
        env: vec![
            ("OMNI_DISCORD_GATEWAY_URL".into(), fake.gateway_url.clone()),
            ("OMNI_DISCORD_API_URL".into(), fake.api_url.clone()),
        ],
        ..Default::default()
    };
    let node = DataPlane::start(&dir.path().join("node"), &node_options).await;
    node.wait_for_revision(0).await;
    let (cp_pid, node_pid) = (cp.pid().expect("control plane running"), node.pid().expect("node running"));
    println!(
        "discord benchmark: {n} bots on 1 node, control plane on sqlite, fake gateway heartbeat {} ms",
        options.heartbeat_ms
    );

    let authorization: MetadataValue<_> = format!("Bearer {admin_key}").parse()?;
    let channel = omni_proto::client::endpoint(&cp.url(), None)?.connect().await?;
    let api = InstanceServiceClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
        request.metadata_mut().insert("authorization", authorization.clone());
        Ok(request)
    });

    // Watch the fake from the first creation on: when each token first has a live session.
    let poller = {
        let (fake, tokens) = (fake.clone(), tokens.clone());
        tokio::spawn(async move {
            let mut live: Vec<Option<Instant>> = vec![None; tokens.len()];
            let mut left = tokens.len();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let deadline = Instant::now() + READY_TIMEOUT;
            while left > 0 && Instant::now() < deadline {
                tick.tick().await;
                let now = Instant::now();
                for (at, token) in live.iter_mut().zip(&tokens) {
                    if at.is_none() && fake.live(token) {
                        *at = Some(now);
                        left -= 1;
                    }
                }
            }
            live
        })
    };

    let started = Instant::now();
    let mut created: Vec<Option<Instant>> = vec![None; n];
    let mut pending = tokio::task::JoinSet::new();
    for i in 0..n {
        if pending.len() >= IN_FLIGHT {
            let (i, at) = pending.join_next().await.expect("pending")??;
            created[i] = Some(at);
        }
        let (mut api, instance) = (api.clone(), bot(i, &agent.url));
        pending.spawn(async move {
            api.create_instance(pb::CreateInstanceRequest { instance: Some(instance), ..Default::default() }).await?;
            anyhow::Ok((i, Instant::now()))
        });
    }
    while let Some(done) = pending.join_next().await {
        let (i, at) = done??;
        created[i] = Some(at);
    }
    let all_created = Instant::now();
    let live = poller.await?;
    let ready = live.iter().filter(|at| at.is_some()).count();
    anyhow::ensure!(
        ready == n,
        "only {ready} of {n} bots were live within {READY_TIMEOUT:?}; node log: {}",
        node.log_path.display()
    );
    let last_live = live.iter().flatten().max().copied().expect("n > 0");
    let mut per_bot: Vec<Duration> = live
        .iter()
        .zip(&created)
        .map(|(live, created)| live.unwrap().saturating_duration_since(created.unwrap()))
        .collect();

    let label = |text: String| format!("  {text:<44}");
    println!("{}{}", label(format!("created {n} instances (gRPC, {IN_FLIGHT} in flight):")), ms(all_created - started));
    println!(
        "{}{}",
        label(format!("last created -> all {n} live:")),
        ms(last_live.saturating_duration_since(all_created))
    );
    println!("{}{}", label(format!("first created -> all {n} live:")), ms(last_live - started));
    println!(
        "{}p50 {}  p99 {}  max {}",
        label("per bot, its creation -> live:".into()),
        ms(percentile(&mut per_bot, 50.0)),
        ms(percentile(&mut per_bot, 99.0)),
        ms(percentile(&mut per_bot, 100.0))
    );

    // Idle: every bot connected, nothing happening but heartbeats and lease renewals.
    tokio::time::sleep(SETTLE).await;
    let window = Duration::from_secs(options.idle_secs.max(1));
    let (cp_before, node_before) = (cpu_time(cp_pid).unwrap_or_default(), cpu_time(node_pid).unwrap_or_default());
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let (cp_after, node_after) = (cpu_time(cp_pid).unwrap_or_default(), cpu_time(node_pid).unwrap_or_default());
    let elapsed = t0.elapsed();
    let still_live = tokens.iter().filter(|t| fake.live(t)).count();
    let (node_pct, node_ms) = cpu_share(node_after.saturating_sub(node_before), elapsed);
    let (cp_pct, cp_ms) = cpu_share(cp_after.saturating_sub(cp_before), elapsed);
    println!(
        "{}RSS {}, CPU {node_pct:.2} % of a core ({node_ms:.2} ms/s)",
        label(format!("node, idle {:.1} s ({still_live}/{n} live):", elapsed.as_secs_f64())),
        mib(rss_bytes(node_pid).unwrap_or(0)),
    );
    println!(
        "{}RSS {}, CPU {cp_pct:.2} % of a core ({cp_ms:.2} ms/s)",
        label("control plane, same window:".into()),
        mib(rss_bytes(cp_pid).unwrap_or(0)),
    );

    let identifies: usize = tokens.iter().map(|t| fake.identifies(t)).sum();
    let concurrent = tokens.iter().map(|t| fake.max_concurrent(t)).max().unwrap_or(0);
    println!(
        "{}{identifies} identifies for {n} bots, at most {concurrent} session(s) per token (must be 1)",
        label("sanity:".into())
    );
    // Idle figures of fewer bots, or of bots reconnecting, would not be what they claim.
    anyhow::ensure!(
        still_live == n && identifies == n && concurrent == 1,
        "the idle window was not {n} steady bots: {still_live} live, {identifies} identifies, {concurrent} sessions per token"
    );
    node.terminate().await;
    cp.terminate().await;
    Ok(())
}
