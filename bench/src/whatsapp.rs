//! The WhatsApp pipeline under load: webhook ingest against a bare axum server, then messages
//! end to end at a fixed rate, with the hub's CPU and memory.

use crate::stats::{cpu_time, cpu_time_of_processes, mib, ms, percentile, rss_bytes};
use omni_tests::fakes::{FakeAgent, FakeEvolution};
use omni_tests::process::{ControlPlane, ControlPlaneOptions, DataPlane, DataPlaneOptions, omnictl};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};

const ADMIN_KEY: &str = "omni_bench_0123456789abcdef0123456789abcdef";
/// The fake Evolution server's key for the benchmark's instances.
pub const EVOLUTION_KEY: &str = "bench-evolution-key";
/// The master key of a Postgres-backed control plane (base64 of 32 bytes).
const BENCH_MASTER_KEY: &str = "YmVuY2gtbWFzdGVyLWtleS0wMTIzNDU2Nzg5YWJjZGU=";

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Webhooks posted in each full-speed measurement (end to end, ingest).
    #[arg(long, default_value_t = 20_000)]
    ingest_messages: usize,
    /// Concurrent HTTP connections of the load generator.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Messages per second in the end-to-end measurement.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds of the end-to-end measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Run the node under this command (words split at spaces), such as `valgrind
    /// --tool=callgrind` to count its instructions, which depend less on the machine's
    /// neighbours than its CPU time. The node is stopped with SIGTERM at the end, so that such
    /// a tool writes its results; the command must run the node in its own process, as valgrind
    /// does (the CPU figures are the command's process).
    #[arg(long)]
    node_wrapper: Option<String>,
    /// Run the control plane under this command, as `--node-wrapper` does the node.
    #[arg(long)]
    control_plane_wrapper: Option<String>,
    /// Keep the control plane's data (its SQLite database) in a new directory under this one
    /// instead of beside the node's, e.g. on another disk, as when the control plane runs on a
    /// machine of its own: its database's flushes then do not queue ahead of the node's.
    #[arg(long)]
    control_plane_dir: Option<std::path::PathBuf>,
    /// The control plane's database (an empty Postgres database, as for `omni-bench sync`)
    /// instead of SQLite in its data dir. The CPU of the Postgres server's processes on this
    /// machine is counted with the hub's.
    #[arg(long)]
    database_url: Option<String>,
}

/// CPU used so far by the hub: the control plane, the node, and the database server's processes
/// when traces go to Postgres (SQLite works inside the control plane's process).
struct HubCpu {
    pids: [u32; 2],
    postgres: bool,
}

#[derive(Clone, Copy)]
struct HubCpuSample {
    cp: Duration,
    node: Duration,
    database: Option<Duration>,
}

/// CPU per message in µs, by process.
struct CpuPerMessage {
    cp: f64,
    node: f64,
    database: Option<f64>,
}

impl HubCpu {
    fn now(&self) -> HubCpuSample {
        let [cp, node] = self.pids.map(|pid| cpu_time(pid).unwrap_or_default());
        HubCpuSample { cp, node, database: self.postgres.then(|| cpu_time_of_processes("postgres")) }
    }
}

impl HubCpuSample {
    fn per_message_since(&self, before: &HubCpuSample, messages: usize) -> CpuPerMessage {
        let per = |after: Duration, before: Duration| (after - before).as_secs_f64() * 1e6 / messages as f64;
        CpuPerMessage {
            cp: per(self.cp, before.cp),
            node: per(self.node, before.node),
            database: self.database.zip(before.database).map(|(after, before)| per(after, before)),
        }
    }
}

impl CpuPerMessage {
    fn total(&self) -> f64 {
        self.cp + self.node + self.database.unwrap_or(0.0)
    }
}

impl std::fmt::Display for CpuPerMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "control plane {:.0} µs + node {:.0} µs", self.cp, self.node)?;
        match self.database {
            Some(database) => write!(f, " + Postgres {database:.0} µs"),
            None => Ok(()),
        }
    }
}

/// A wrapper command given as one string, split into words.
fn words(command: Option<&str>) -> Vec<String> {
    command.unwrap_or_default().split_whitespace().map(str::to_owned).collect()
}

/// A WhatsApp text webhook with message id `id`, from one of 50 senders.
fn webhook(i: usize, prefix: &str) -> Vec<u8> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    serde_json::to_vec(&json!({
        "event": "messages.upsert",
        "instance": "bench",
        "data": {
            "key": { "remoteJid": format!("55119{:07}@s.whatsapp.net", i % 50), "fromMe": false, "id": format!("{prefix}{i}") },
            "pushName": "Bench",
            "message": { "conversation": format!("{prefix}{i}") },
            "messageType": "conversation",
            "messageTimestamp": now,
        },
        "sender": "5511888888888@s.whatsapp.net",
        "apikey": "not-used",
    }))
    .unwrap()
}

/// A histogram of the node's so far: (count, sum of seconds).
async fn histogram(node: &DataPlane, name: &str) -> (f64, f64) {
    (node.metric(&format!("{name}_count")).await, node.metric(&format!("{name}_sum")).await)
}

const SPOOL_COMMITS: &str = "omni_node_spool_commit_seconds";
const SPOOL_CHECKPOINTS: &str = "omni_node_spool_checkpoint_seconds";

/// Waits (a minute at most) until the node's traces reached the control plane, so that their
/// cost is counted too.
async fn drain_traces(node: &DataPlane) {
    let drained = Instant::now() + Duration::from_secs(60);
    while node.metric("omni_node_trace_outbox_depth").await > 0.0 && Instant::now() < drained {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Posts every body once over `connections` keep-alive connections; returns the rate of 2xx.
async fn load(url: String, token: &str, bodies: Arc<Vec<Vec<u8>>>, connections: usize) -> anyhow::Result<f64> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(connections).build()?;
    let next = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (client, url, bodies, next, ok, token) =
            (client.clone(), url.clone(), bodies.clone(), next.clone(), ok.clone(), token.to_owned());
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { break };
                let sent = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("x-omni-webhook-token", &token)
                    .body(body.clone())
                    .send()
                    .await;
                if sent.is_ok_and(|r| r.status().is_success()) {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while workers.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    let ok = ok.load(Ordering::Relaxed);
    anyhow::ensure!(ok == bodies.len(), "only {ok} of {} requests succeeded", bodies.len());
    Ok(ok as f64 / elapsed.as_secs_f64())
}

/// `omni-bench baseline-server`: a bare axum server answering 200 OK to every POST.
pub async fn baseline_server() -> anyhow::Result<()> {
    let router = axum::Router::new().fallback(axum::routing::post(|| async { "OK" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("baseline listening on {}", listener.local_addr()?);
    axum::serve(listener, router).await?;
    Ok(())
}

async fn start_helper(args: &[&str], announces: &str) -> anyhow::Result<(tokio::process::Child, String)> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    while let Some(line) = lines.next_line().await? {
        if let Some(addr) = line.strip_prefix(announces) {
            return Ok((child, addr.to_owned()));
        }
    }
    anyhow::bail!("{} did not start", args[0])
}

async fn start_baseline() -> anyhow::Result<(tokio::process::Child, String)> {
    start_helper(&["baseline-server"], "baseline listening on ").await
}

/// Posts each body at its turn, `rate` per second (without waiting for earlier answers), and
/// returns when each was posted.
async fn post_at_rate(url: &str, token: &str, bodies: Vec<Vec<u8>>, rate: u64) -> anyhow::Result<Vec<Instant>> {
    let client = reqwest::Client::new();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    let mut posted = Vec::with_capacity(bodies.len());
    let mut posts = tokio::task::JoinSet::new();
    for (i, body) in bodies.into_iter().enumerate() {
        tokio::time::sleep_until((started + interval * i as u32).into()).await;
        posted.push(Instant::now());
        let request = client
            .post(url)
            .header("content-type", "application/json")
            .header("x-omni-webhook-token", token)
            .body(body);
        posts.spawn(request.send());
    }
    while let Some(done) = posts.join_next().await {
        anyhow::ensure!(done?.is_ok_and(|r| r.status().is_success()), "a webhook was refused");
    }
    Ok(posted)
}

/// Waits (up to `within`) until Evolution has received `count` texts starting with `prefix`.
async fn replies(evolution: &FakeEvolution, prefix: &str, count: usize, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while evolution.count_texts(prefix) < count {
        anyhow::ensure!(Instant::now() < deadline, "not every message was answered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// When each reply's webhook was posted, by the reply's text (`echo: <prefix><i>`).
fn sent_at(prefix: &str, posted: Vec<Instant>) -> HashMap<String, Instant> {
    posted.into_iter().enumerate().map(|(i, at)| (format!("echo: {prefix}{i}"), at)).collect()
}

/// Webhook posted → reply at Evolution, for the replies `sent_at` knows.
fn latencies(evolution: &FakeEvolution, sent_at: &HashMap<String, Instant>) -> Vec<Duration> {
    evolution
        .texts()
        .iter()
        .filter_map(|r| sent_at.get(r.body["text"].as_str()?).map(|sent| r.at.saturating_duration_since(*sent)))
        .collect()
}

/// The floor (see `floor.rs`): the minimal relay's CPU per message, driven like the hub.
async fn floor(options: &Options, agent: &FakeAgent, evolution: &FakeEvolution, dir: &Path) -> anyhow::Result<()> {
    let agent_url = format!("{}/api/agent/chat", agent.url);
    let send_url = format!("{}/message/sendText/bench-wa", evolution.url);
    let dir = dir.display().to_string();
    let (relay, addr) = start_helper(&["floor-relay", &agent_url, &send_url, &dir], "floor listening on ").await?;
    let (pid, url) = (relay.id().unwrap_or(0), format!("http://{addr}/"));
    let cpu = || cpu_time(pid).unwrap_or_default();
    let total = (options.rate * options.seconds) as usize;
    let before = cpu();
    let posted = post_at_rate(&url, "", (0..total).map(|i| webhook(i, "f")).collect(), options.rate).await?;
    replies(evolution, "echo: f", total, Duration::from_secs(60)).await?;
    let at_rate = (cpu() - before).as_secs_f64() * 1e6 / total as f64;
    let mut latencies = latencies(evolution, &sent_at("f", posted));
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new((0..options.ingest_messages).map(|i| webhook(i, "g")).collect());
    let (before, started) = (cpu(), Instant::now());
    load(url, "", bodies, options.connections).await?;
    replies(evolution, "echo: g", options.ingest_messages, Duration::from_secs(300)).await?;
    let rate = options.ingest_messages as f64 / started.elapsed().as_secs_f64();
    let full_speed = (cpu() - before).as_secs_f64() * 1e6 / options.ingest_messages as f64;
    println!(
        "  floor: a bare relay on the same stack (webhook served and flushed, agent called, answer flushed, sent)"
    );
    println!(
        "    CPU per message: {at_rate:.0} µs at {} messages/s, {full_speed:.0} µs at full speed ({rate:.0} messages/s)",
        options.rate
    );
    println!(
        "    webhook -> reply at Evolution at {} messages/s: p50 {}  p99 {}",
        options.rate,
        ms(percentile(&mut latencies, 50.0)),
        ms(percentile(&mut latencies, 99.0))
    );
    Ok(())
}

async fn instance(
    cp: &ControlPlane,
    name: &str,
    agent: &FakeAgent,
    evolution: &FakeEvolution,
) -> anyhow::Result<(String, i64)> {
    evolution.instance(name, EVOLUTION_KEY);
    let created = omnictl(
        &cp.url(),
        ADMIN_KEY,
        &[
            "instance",
            "create",
            name,
            "--channel",
            "whatsapp",
            "--agent-url",
            &agent.url,
            "--agent-key",
            "bench-agent-key",
            "--evolution-url",
            &evolution.url,
            "--evolution-key",
            EVOLUTION_KEY,
            "--evolution-instance",
            name,
            "--typing-indicator",
            "false",
            "--agent-timeout",
            "600",
            "-o",
            "json",
        ],
    )
    .await
    .json();
    Ok((
        created["webhook_token"].as_str().unwrap_or_default().to_owned(),
        created["instance"]["revision"].as_i64().unwrap_or(0),
    ))
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir()?;
    let cp_dir = match &options.control_plane_dir {
        Some(parent) => tempfile::tempdir_in(parent)?,
        None => tempfile::tempdir_in(dir.path())?,
    };
    let cp = ControlPlane::start(
        &cp_dir.path().join("cp"),
        &ControlPlaneOptions {
            bootstrap_api_key: Some(ADMIN_KEY.into()),
            wrapper: words(options.control_plane_wrapper.as_deref()),
            database_url: options.database_url.clone(),
            // A Postgres-backed control plane is given its key; on SQLite it makes its own.
            master_key: options.database_url.as_ref().map(|_| BENCH_MASTER_KEY.into()),
            ..Default::default()
        },
    )
    .await;
    let node_options = DataPlaneOptions {
        tenant_concurrency: Some(64),
        wrapper: words(options.node_wrapper.as_deref()),
        ..Default::default()
    };
    let node = DataPlane::start_for(&cp, &dir.path().join("node"), node_options).await;
    let evolution = FakeEvolution::start().await;
    let instant = FakeAgent::start().await;
    let holding = FakeAgent::start().await;
    holding.script(|_| (200, json!({ "message": "late" }), Duration::from_secs(3600)));
    let (token, _) = instance(&cp, "bench-wa", &instant, &evolution).await?;
    let (hold_token, revision) = instance(&cp, "hold-wa", &holding, &evolution).await?;
    node.wait_for_revision(revision).await;
    println!("whatsapp benchmark: 1 node, {} connections", options.connections);
    if let Some(parent) = &options.control_plane_dir {
        println!(
            "  control plane's database under {}, the node's spool under {}",
            parent.display(),
            dir.path().display()
        );
    }
    let postgres = options.database_url.is_some();
    if postgres {
        println!("  traces stored in Postgres; the CPU of this machine's postgres processes counts as the hub's");
    }
    let hub = HubCpu { pids: [cp.pid().unwrap_or(0), node.pid().unwrap_or(0)], postgres };

    // End to end at a fixed rate: webhook in → reply at Evolution, the agent answering at once.
    let total = (options.rate * options.seconds) as usize;
    let bodies: Vec<Vec<u8>> = (0..total).map(|i| webhook(i, "e")).collect();
    let url = format!("http://{}/webhook/evolution/bench-wa", node.addr);
    let cpu_before = hub.now();
    let commits_before = histogram(&node, SPOOL_COMMITS).await;
    let checkpoints_before = histogram(&node, SPOOL_CHECKPOINTS).await;
    let started = Instant::now();
    let posted = post_at_rate(&url, &token, bodies, options.rate).await?;
    let sent_at = sent_at("e", posted);
    replies(&evolution, "echo: e", total, Duration::from_secs(120)).await?;
    let elapsed = started.elapsed();
    drain_traces(&node).await;
    let cpu = hub.now().per_message_since(&cpu_before, total);
    let mut latencies = latencies(&evolution, &sent_at);
    let agent_calls: Vec<_> = instant.requests();
    // Where the time goes: up to the agent (ingest, spool, queue), then after it (the send
    // intent's commit, the send).
    let asked_at: HashMap<&str, Instant> =
        agent_calls.iter().filter_map(|r| Some((r.body["message"].as_str()?, r.at))).collect();
    let (mut to_agent, mut after_agent): (Vec<Duration>, Vec<Duration>) = evolution
        .texts()
        .iter()
        .filter_map(|r| {
            let text = r.body["text"].as_str()?;
            let (sent, asked) = (sent_at.get(text)?, asked_at.get(text.strip_prefix("echo: ")?)?);
            Some((asked.saturating_duration_since(*sent), r.at.saturating_duration_since(*asked)))
        })
        .unzip();
    println!(
        "  end to end at {} messages/s for {}s: {} answered in {:.2} s ({} agent calls)",
        options.rate,
        options.seconds,
        latencies.len(),
        elapsed.as_secs_f64(),
        agent_calls.len()
    );
    println!(
        "  webhook -> reply at Evolution (instant agent): p50 {}  p99 {}  max {}",
        ms(percentile(&mut latencies, 50.0)),
        ms(percentile(&mut latencies, 99.0)),
        ms(percentile(&mut latencies, 100.0))
    );
    println!(
        "    webhook -> agent request: p50 {}  p99 {};  agent request -> reply: p50 {}  p99 {}",
        ms(percentile(&mut to_agent, 50.0)),
        ms(percentile(&mut to_agent, 99.0)),
        ms(percentile(&mut after_agent, 50.0)),
        ms(percentile(&mut after_agent, 99.0))
    );
    println!("  CPU per message, the whole hub (traces stored): {:.0} µs = {cpu}", cpu.total());
    let (commits, commit_seconds) = histogram(&node, SPOOL_COMMITS).await;
    let (commits, commit_seconds) = (commits - commits_before.0, commit_seconds - commits_before.1);
    println!(
        "  spool: {:.2} transactions per message, {:.2} ms each on average (flush included)",
        commits / total as f64,
        commit_seconds * 1e3 / commits.max(1.0)
    );
    let (checkpoints, checkpoint_seconds) = histogram(&node, SPOOL_CHECKPOINTS).await;
    let (checkpoints, checkpoint_seconds) =
        (checkpoints - checkpoints_before.0, checkpoint_seconds - checkpoints_before.1);
    println!(
        "    and {checkpoints:.0} checkpoints beside them, {:.2} ms each on average",
        checkpoint_seconds * 1e3 / checkpoints.max(1.0)
    );
    println!(
        "  RSS: node {}, control plane {}",
        mib(node.pid().and_then(rss_bytes).unwrap_or(0)),
        mib(cp.pid().and_then(rss_bytes).unwrap_or(0))
    );
    // End to end as fast as the hub goes: every webhook posted at once over the connections,
    // timed until the last reply reached Evolution; the CPU counted until its traces are stored.
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new((0..options.ingest_messages).map(|i| webhook(i, "t")).collect());
    let cpu_before = hub.now();
    let commits_before = histogram(&node, SPOOL_COMMITS).await;
    let started = Instant::now();
    load(url.clone(), &token, bodies, options.connections).await?;
    replies(&evolution, "echo: t", options.ingest_messages, Duration::from_secs(300)).await?;
    let elapsed = started.elapsed();
    drain_traces(&node).await;
    let cpu = hub.now().per_message_since(&cpu_before, options.ingest_messages);
    let (commits, _) = histogram(&node, SPOOL_COMMITS).await;
    println!(
        "  end to end at full speed: {} answered in {:.2} s = {:.0} messages/s",
        options.ingest_messages,
        elapsed.as_secs_f64(),
        options.ingest_messages as f64 / elapsed.as_secs_f64()
    );
    println!(
        "    CPU per message (traces stored): {:.0} µs = {}; {:.2} spool transactions per message",
        cpu.total(),
        cpu,
        (commits - commits_before.0) / options.ingest_messages as f64
    );
    floor(&options, &instant, &evolution, dir.path()).await?;
    // Ingest: accepted and durable. The holding tenant's agent never answers, so its messages
    // stop after the spool and the pipeline does not compete with ingest.
    let (_baseline, baseline_addr) = start_baseline().await?;
    let plain: Arc<Vec<Vec<u8>>> = Arc::new((0..options.ingest_messages).map(|i| webhook(i, "b")).collect());
    let bare = load(format!("http://{baseline_addr}/"), "", plain, options.connections).await?;
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new((0..options.ingest_messages).map(|i| webhook(i, "h")).collect());
    let url = format!("http://{}/webhook/evolution/hold-wa", node.addr);
    let cpu_before = hub.now();
    let ingest = load(url, &hold_token, bodies, options.connections).await?;
    let cpu = hub.now().per_message_since(&cpu_before, options.ingest_messages);
    println!("  bare axum 200 OK:                    {bare:>8.0} requests/s");
    println!(
        "  webhook accepted (durable, deduped): {ingest:>8.0} messages/s  ({:.0}% of bare axum)",
        100.0 * ingest / bare
    );
    let database = cpu.database.map(|database| format!(", Postgres {database:.0} µs")).unwrap_or_default();
    println!(
        "    CPU per accepted webhook: node {:.0} µs, control plane {:.0} µs{database} (storing its trace meanwhile)",
        cpu.node, cpu.cp
    );
    if let Some(wrapper) = &options.node_wrapper {
        let status = node.terminate().await;
        println!("  node run under `{wrapper}`, stopped: {status}");
    }
    if let Some(wrapper) = &options.control_plane_wrapper {
        let status = cp.terminate().await;
        println!("  control plane run under `{wrapper}`, stopped: {status}");
    }
    Ok(())
}
