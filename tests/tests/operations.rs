//! The operator's view through the real binaries, on SQLite and Postgres: trace list filters
//! and pages, the live tail, stats, purge, retention, user search, API-key scope over all of
//! them, and the metrics of both planes.

use omni_proto::v1::{TraceEvent, TraceHeader, TraceStatus};
use omni_tests::evolution::text;
use omni_tests::fakes::{FakeAgent, FakeEvolution};
use omni_tests::postgres::TestDatabase;
use omni_tests::process::{
    ControlPlane, ControlPlaneOptions, DataPlane, DataPlaneOptions, Outcome, http_get, http_post, omnictl,
    omnictl_stream,
};
use omni_tests::{free_port, instance_id, report_traces, wait_for};
use serde_json::{Value, json};
use std::time::Duration;
use tempfile::TempDir;

/// A fixed master key for Postgres runs (base64 of 32 bytes).
const MASTER_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
const ADMIN_KEY: &str = "omni_opsadmin_0123456789abcdef0123456789abcdef";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A control plane (with the given extra flags), one node, one agent and one Evolution server.
struct Hub {
    cp: ControlPlane,
    node: DataPlane,
    database_url: String,
    agent: FakeAgent,
    evolution: FakeEvolution,
    _db: Option<TestDatabase>,
    _dir: TempDir,
}

impl Hub {
    async fn start(backend: Backend, cp_flags: &[&str]) -> Option<Hub> {
        let dir = tempfile::tempdir().unwrap();
        let mut options = ControlPlaneOptions {
            bootstrap_api_key: Some(ADMIN_KEY.into()),
            extra_args: cp_flags.iter().map(|f| f.to_string()).collect(),
            ..Default::default()
        };
        let db = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => {
                let db = TestDatabase::create().await?;
                options.database_url = Some(db.url.clone());
                options.master_key = Some(MASTER_KEY.into());
                Some(db)
            }
        };
        let cp = ControlPlane::start(&dir.path().join("cp"), &options).await;
        let database_url = match &db {
            Some(db) => db.url.clone(),
            None => format!("sqlite://{}", cp.data_dir.join("omni.db").display()),
        };
        let node = DataPlane::start_for(&cp, &dir.path().join("node"), DataPlaneOptions::default()).await;
        let (agent, evolution) = (FakeAgent::start().await, FakeEvolution::start().await);
        Some(Hub { cp, node, database_url, agent, evolution, _db: db, _dir: dir })
    }

    async fn ctl(&self, args: &[&str]) -> Outcome {
        omnictl(&self.cp.url(), ADMIN_KEY, args).await
    }

    async fn ctl_as(&self, key: &str, args: &[&str]) -> Outcome {
        omnictl(&self.cp.url(), key, args).await
    }

    /// A WhatsApp instance on the hub's agent and Evolution server; returns its webhook token
    /// once the node has it.
    async fn instance(&self, name: &str, extra: &[&str]) -> String {
        self.evolution.instance(name, "evolution-key-of-all");
        let mut args = vec![
            "instance",
            "create",
            name,
            "--channel",
            "whatsapp",
            "--agent-url",
            &self.agent.url,
            "--evolution-url",
            &self.evolution.url,
            "--evolution-key",
            "evolution-key-of-all",
            "-o",
            "json",
        ];
        args.extend_from_slice(extra);
        let created = self.ctl(&args).await.json();
        self.node.wait_for_revision(created["instance"]["revision"].as_i64().unwrap()).await;
        created["webhook_token"].as_str().unwrap().to_owned()
    }

    /// A text from `phone` (named `name`) to `instance`, accepted by the node.
    async fn message(&self, instance: &str, token: &str, phone: &str, id: &str, name: &str, words: &str) {
        let mut body = text(phone, id, words);
        body["data"]["pushName"] = json!(name);
        let bytes = serde_json::to_vec(&body).unwrap();
        let path = format!("/webhook/evolution/{instance}");
        let (status, answer) =
            http_post(&self.node.addr, &path, &[("x-omni-webhook-token", token)], &bytes).await.unwrap();
        assert_eq!(status, 200, "{answer}");
    }

    async fn list(&self, args: &[&str]) -> Vec<Value> {
        let mut all = vec!["trace", "list", "-o", "json"];
        all.extend_from_slice(args);
        self.ctl(&all).await.json().as_array().unwrap().clone()
    }

    /// Waits until `count` traces of `instance` are completed.
    async fn completed(&self, instance: &str, count: usize) -> Vec<Value> {
        wait_for(&format!("{count} completed traces of {instance}"), Duration::from_secs(20), || async {
            let traces = self.list(&["--instance", instance, "--status", "completed"]).await;
            (traces.len() >= count).then_some(traces)
        })
        .await
    }

    async fn scoped_key(&self, pattern: &str) -> String {
        let created = self.ctl(&["apikey", "create", "--instances", pattern, "-o", "json"]).await.json();
        created["key"].as_str().unwrap().to_owned()
    }
}

fn texts(traces: &[Value]) -> Vec<&str> {
    traces.iter().map(|t| t["text"].as_str().unwrap()).collect()
}

async fn list_filters_pages_and_tail(backend: Backend) {
    let Some(hub) = Hub::start(backend, &[]).await else { return };
    let acme = hub.instance("acme-wa", &[]).await;
    let beta = hub.instance("beta-wa", &[]).await;

    // The tail is live before the messages arrive: its header shows the call was accepted.
    let mut tail = omnictl_stream(&hub.cp.url(), ADMIN_KEY, &["trace", "tail", "--instance", "acme-wa"]);
    let header = tail.next_line(Duration::from_secs(10)).await.unwrap();
    assert!(header.starts_with("ID") && header.contains("STATUS"), "{header}");

    hub.message("acme-wa", &acme, "5511000000001", "m1", "Maria", "hello there").await;
    hub.completed("acme-wa", 1).await;
    hub.message("acme-wa", &acme, "5511000000002", "m2", "Pedro", "where is my ORDER").await;
    hub.completed("acme-wa", 2).await;
    hub.message("acme-wa", &acme, "5511000000001", "m3", "Maria", "Maria again: order 42").await;
    hub.message("beta-wa", &beta, "5511000000009", "m4", "Zed", "beta says hi").await;
    let traces = hub.completed("acme-wa", 3).await;
    hub.completed("beta-wa", 1).await;

    // One tail line per finished acme message, none for beta's.
    let mut tailed = Vec::new();
    while tailed.len() < 3 {
        let line = tail.next_line(Duration::from_secs(10)).await.expect("the tail goes on");
        assert!(line.contains("acme-wa") && line.contains("completed"), "{line}");
        tailed.push(line.split("  ").next().unwrap().to_owned());
    }
    let mut listed: Vec<String> = traces.iter().map(|t| t["id"].as_str().unwrap().to_owned()).collect();
    listed.reverse();
    assert_eq!(tailed.iter().collect::<std::collections::HashSet<_>>(), listed.iter().collect());
    drop(tail);

    assert_eq!(
        texts(&hub.list(&["--instance", "acme-wa", "--sender", "5511000000001"]).await),
        ["Maria again: order 42", "hello there"]
    );
    assert_eq!(
        texts(&hub.list(&["--search", "order", "--channel", "whatsapp"]).await),
        ["Maria again: order 42", "where is my ORDER"]
    );
    assert_eq!(hub.list(&["--since", "1h"]).await.len(), 4);
    assert!(hub.list(&["--before", "1h"]).await.is_empty());
    assert!(hub.list(&["--status", "failed"]).await.is_empty());

    // Pages: a message arriving between pages does not shift the next one.
    let first = hub.ctl(&["trace", "list", "--instance", "acme-wa", "--limit", "2", "-o", "json"]).await;
    let token = first.stderr.trim().strip_prefix("more: add --page-token ").expect("a page token").to_owned();
    hub.message("acme-wa", &acme, "5511000000003", "m5", "Ana", "a newer message").await;
    hub.completed("acme-wa", 4).await;
    let second = hub.list(&["--instance", "acme-wa", "--limit", "2", "--page-token", &token]).await;
    assert_eq!(texts(&first.json().as_array().unwrap().clone()), ["Maria again: order 42", "where is my ORDER"]);
    assert_eq!(texts(&second), ["hello there"]);
    let bad = hub.ctl(&["trace", "list", "--page-token", "garbage!"]).await;
    assert!(bad.failed().contains("page_token"), "{bad:?}");

    // Users: searched by name or number.
    let users = hub.ctl(&["user", "list", "acme-wa", "--search", "MARIA", "-o", "json"]).await.json();
    assert_eq!(users.as_array().unwrap().len(), 1);
    assert_eq!((users[0]["identity"].as_str(), users[0]["message_count"].as_i64()), (Some("5511000000001"), Some(2)));
    let users = hub.ctl(&["user", "list", "acme-wa", "--search", "0000002", "-o", "json"]).await.json();
    assert_eq!(users[0]["display_name"], "Pedro");
    let table = hub.ctl(&["user", "list", "acme-wa"]).await;
    assert_eq!(table.ok().lines().count(), 4, "a header and three users: {table:?}");
}

/// Reported traces of any age: `count` traces received `age` ago, spaced 1 ms apart, with
/// agent latencies 1..=count ms; every tenth fails at the agent.
fn reported(instance_id: &str, prefix: &str, count: i64, age: Duration) -> Vec<TraceEvent> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let start = now - age.as_millis() as i64;
    let mut events = Vec::new();
    for i in 1..=count {
        let (id, at) = (format!("{prefix}-{i}"), start + i);
        let failed = i % 10 == 0;
        let event = |seq: u32, stage: &str, status: TraceStatus, time: i64| TraceEvent {
            trace_id: id.clone(),
            seq,
            instance_id: instance_id.to_owned(),
            stage: stage.to_owned(),
            time_unix_ms: time,
            status: status as i32,
            ..Default::default()
        };
        events.push(TraceEvent {
            header: Some(TraceHeader {
                channel: omni_proto::v1::Channel::Whatsapp as i32,
                sender: format!("55110000{:05}", i % 7),
                message_type: "conversation".into(),
                text: format!("{prefix} message {i}"),
                received_unix_ms: at,
                ..Default::default()
            }),
            payload: json!({ "apikey": "[redacted]", "n": i }).to_string(),
            ..event(0, "received", TraceStatus::Received, at)
        });
        events.push(TraceEvent { agent_ms: i, ..event(1, "agent_response", TraceStatus::Processing, at + i) });
        events.push(if failed {
            TraceEvent {
                error: "the agent answered 500".into(),
                ..event(2, "agent_request", TraceStatus::Failed, at + i)
            }
        } else {
            event(2, "completed", TraceStatus::Completed, at + i + 2)
        });
    }
    events
}

async fn stats_and_purge(backend: Backend) {
    let Some(hub) = Hub::start(backend, &[]).await else { return };
    hub.instance("acme-wa", &[]).await;
    hub.instance("beta-wa", &[]).await;
    let acme = instance_id(&hub.database_url, "acme-wa").await;
    let beta = instance_id(&hub.database_url, "beta-wa").await;
    let mut events = reported(&acme, "recent", 100, Duration::from_secs(600));
    events.extend(reported(&acme, "old", 5, Duration::from_secs(40 * 86_400)));
    events.extend(reported(&beta, "beta-old", 3, Duration::from_secs(40 * 86_400)));
    report_traces(&hub.cp.url(), &hub.cp.node_token(), events).await;

    let stats = hub.ctl(&["trace", "stats", "acme-wa", "--since", "1d", "-o", "json"]).await.json();
    assert_eq!(stats["total"], 100);
    assert_eq!(stats["by_status"], json!({"completed": 90, "failed": 10}));
    assert_eq!(stats["by_error_stage"], json!({"agent_request": 10}));
    assert_eq!(stats["success_rate"], 90.0);
    let agent = &stats["agent_latency"];
    assert_eq!(
        (agent["p50_ms"].as_i64(), agent["p95_ms"].as_i64(), agent["p99_ms"].as_i64()),
        (Some(50), Some(95), Some(99))
    );
    let per_hour: i64 = stats["per_hour"].as_array().unwrap().iter().map(|h| h["count"].as_i64().unwrap()).sum();
    assert_eq!(per_hour, 100);
    let all_time = hub.ctl(&["trace", "stats", "acme-wa", "-o", "json"]).await.json();
    assert_eq!(all_time["total"], 105);
    let table = hub.ctl(&["trace", "stats", "acme-wa", "--since", "7d"]).await;
    let line = |label: &str| table.stdout.lines().find(|l| l.starts_with(label)).map(str::to_owned).unwrap_or_default();
    assert!(table.ok().contains("HOUR"), "{}", table.stdout);
    assert_eq!(line("messages:"), "messages:      100");
    assert!(line("success rate:").contains("90.0%"), "{}", table.stdout);
    assert!(line("agent latency:").contains("p99 99ms"), "{}", table.stdout);
    assert_eq!(line("failed at:"), "failed at:     agent_request 10");
    let unknown = hub.ctl(&["trace", "stats", "nope-wa"]).await;
    assert!(unknown.failed().contains("not found"), "{unknown:?}");

    // Payloads only on request, as reported (the node redacts them before they leave it).
    let with = hub.ctl(&["trace", "get", "recent-1", "--payloads", "-o", "json"]).await.json();
    assert_eq!(with["stages"][0]["payload"], json!({ "apikey": "[redacted]", "n": 1 }));
    let without = hub.ctl(&["trace", "get", "recent-1", "-o", "json"]).await.json();
    assert_eq!(without["stages"][0]["payload"], Value::Null);

    // Purge: a scoped key reaches only its instances; a dry run changes nothing.
    let beta_key = hub.scoped_key("beta-*").await;
    let dry = hub.ctl_as(&beta_key, &["trace", "purge", "--older-than", "30d", "--dry-run"]).await;
    assert_eq!(dry.ok().trim(), "3 trace(s) would be deleted");
    let dry = hub.ctl(&["trace", "purge", "--older-than", "30d", "--dry-run", "-o", "json"]).await.json();
    assert_eq!(dry, json!({"traces": 8, "dry_run": true}));
    assert_eq!(hub.list(&["--limit", "1000"]).await.len(), 108);
    let purged = hub.ctl_as(&beta_key, &["trace", "purge", "--older-than", "30d"]).await;
    assert_eq!(purged.ok().trim(), "deleted 3 trace(s)");
    let purged =
        hub.ctl(&["trace", "purge", "--older-than", "30d", "--instance", "acme-wa", "-o", "json"]).await.json();
    assert_eq!(purged["traces"], 5);
    assert_eq!(hub.list(&["--limit", "1000"]).await.len(), 100);
    let gone = hub.ctl(&["trace", "get", "old-1"]).await;
    assert!(gone.failed().contains("not found"), "{gone:?}");
    let refused = hub.ctl(&["trace", "purge", "--older-than", "0"]).await;
    assert_eq!(refused.code, 2, "a usage error: {refused:?}");
    assert!(refused.stderr.contains("--older-than") && refused.stderr.contains("more than 0"), "{refused:?}");
}

async fn scoped_keys_see_only_their_tenant(backend: Backend) {
    let Some(hub) = Hub::start(backend, &[]).await else { return };
    let acme = hub.instance("acme-wa", &[]).await;
    let beta = hub.instance("beta-wa", &[]).await;
    let beta_key = hub.scoped_key("beta-*").await;

    let mut tail = omnictl_stream(&hub.cp.url(), &beta_key, &["trace", "tail", "-o", "table"]);
    tail.next_line(Duration::from_secs(10)).await.unwrap();
    hub.message("acme-wa", &acme, "5511000000001", "a1", "Maria", "acme secret plans").await;
    hub.completed("acme-wa", 1).await;
    hub.message("beta-wa", &beta, "5511000000002", "b1", "Bia", "beta hello").await;
    let line = tail.next_line(Duration::from_secs(10)).await.unwrap();
    assert!(line.contains("beta-wa") && !line.contains("acme"), "{line}");
    drop(tail);

    let seen = hub.ctl_as(&beta_key, &["trace", "list", "-o", "json"]).await.json();
    assert_eq!(texts(seen.as_array().unwrap()), ["beta hello"]);
    let acme_trace = hub.list(&["--instance", "acme-wa"]).await[0]["id"].as_str().unwrap().to_owned();
    for args in [
        vec!["trace", "list", "--instance", "acme-wa"],
        vec!["trace", "get", &acme_trace],
        vec!["trace", "stats", "acme-wa"],
        vec!["trace", "purge", "--older-than", "1s", "--instance", "acme-wa"],
        vec!["user", "list", "acme-wa"],
    ] {
        let refused = hub.ctl_as(&beta_key, &args).await;
        assert!(refused.failed().contains("not found"), "{args:?}: {refused:?}");
    }
    let tail = omnictl_stream(&hub.cp.url(), &beta_key, &["trace", "tail", "--instance", "acme-wa"]);
    let (code, stderr) = tail.exit().await;
    assert!(code != 0 && stderr.contains("not found"), "{code} {stderr}");
    let stats = hub.ctl_as(&beta_key, &["trace", "stats", "-o", "json"]).await.json();
    assert_eq!((stats["total"].as_i64(), stats["by_instance"].clone()), (Some(1), json!({"beta-wa": 1})));
}

/// Traces past their instance's retention go without anyone asking; others stay.
async fn retention_is_applied_automatically(backend: Backend) {
    let Some(hub) = Hub::start(backend, &["--retention-interval", "1s", "--trace-retention", "30d"]).await else {
        return;
    };
    hub.instance("short-wa", &[]).await;
    hub.instance("keep-wa", &[]).await;
    let updated = hub.ctl(&["instance", "update", "short-wa", "--trace-retention", "1h"]).await;
    assert!(updated.ok().contains("trace retention:") && updated.stdout.contains("1h"), "{updated:?}");
    let (short, keep) =
        (instance_id(&hub.database_url, "short-wa").await, instance_id(&hub.database_url, "keep-wa").await);
    let mut events = reported(&short, "short-old", 4, Duration::from_secs(7200));
    events.extend(reported(&short, "short-new", 2, Duration::from_secs(60)));
    events.extend(reported(&keep, "keep-old", 3, Duration::from_secs(7200)));
    events.extend(reported(&keep, "keep-ancient", 2, Duration::from_secs(40 * 86_400)));
    report_traces(&hub.cp.url(), &hub.cp.node_token(), events).await;

    let left = wait_for("retention to delete expired traces", Duration::from_secs(20), || async {
        let traces = hub.list(&["--limit", "1000"]).await;
        (traces.len() == 5).then_some(traces)
    })
    .await;
    let mut ids: Vec<&str> = left.iter().map(|t| t["id"].as_str().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, ["keep-old-1", "keep-old-2", "keep-old-3", "short-new-1", "short-new-2"]);
    let shown = hub.ctl(&["instance", "get", "short-wa", "-o", "json"]).await.json();
    assert_eq!(shown["trace_retention_seconds"], 3600);
}

macro_rules! on_both_backends {
    ($($test:ident),+ $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() { super::$test(super::Backend::Sqlite).await })+
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() { super::$test(super::Backend::Postgres).await })+
        }
    };
}

on_both_backends!(
    list_filters_pages_and_tail,
    stats_and_purge,
    scoped_keys_see_only_their_tenant,
    retention_is_applied_automatically
);

/// The value of a sample, found by its full name with labels, in a Prometheus page.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))?.trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_planes_export_metrics() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let hub = Hub::start(Backend::Sqlite, &["--metrics-listen", &listen]).await.unwrap();
    let token = hub.instance("acme-wa", &[]).await;
    hub.message("acme-wa", &token, "5511000000001", "x1", "Maria", "hi").await;
    hub.completed("acme-wa", 1).await;

    let (status, node) = http_get(&hub.node.addr, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    let completed = r#"omni_node_messages_total{instance="acme-wa",channel="whatsapp",outcome="completed"}"#;
    assert_eq!(sample(&node, completed), Some(1.0), "{node}");
    assert_eq!(sample(&node, "omni_node_agent_latency_seconds_count"), Some(1.0), "{node}");
    // At least the accept and the send intent were committed.
    assert!(sample(&node, "omni_node_spool_commit_seconds_count").is_some_and(|n| n >= 2.0), "{node}");
    assert!(
        sample(&node, "omni_node_spool_depth").is_some() && sample(&node, "omni_node_trace_outbox_depth").is_some()
    );
    // Those changes reach redb's durable state at the next checkpoint, within a second.
    wait_for("a spool checkpoint", Duration::from_secs(10), || async {
        let (_, node) = http_get(&hub.node.addr, "/metrics").await.ok()?;
        sample(&node, "omni_node_spool_checkpoint_seconds_count").filter(|n| *n >= 1.0)
    })
    .await;

    let page = wait_for("the control plane's metrics to count the trace", Duration::from_secs(10), || async {
        let (status, page) = http_get(&listen, "/metrics").await.ok()?;
        (status == 200 && sample(&page, "omni_cp_trace_events_total").is_some_and(|n| n >= 6.0)).then_some(page)
    })
    .await;
    let ready = hub.node.ready().await.1;
    let lag = format!("omni_cp_node_revision_lag{{node=\"{}\"}}", ready["node_id"].as_str().unwrap());
    assert_eq!(sample(&page, &lag), Some(0.0), "{page}");
    assert_eq!(sample(&page, "omni_cp_nodes_connected"), Some(1.0));
    assert!(sample(&page, "omni_cp_retention_runs_total").is_some_and(|n| n >= 1.0), "{page}");
    assert!(sample(&page, "omni_cp_trace_report_seconds_count").is_some_and(|n| n >= 1.0));
}

/// With two control planes on one database, one runs retention; when it stops, the other
/// takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_control_plane_runs_retention() {
    let Some(db) = TestDatabase::create().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port()];
    let mut planes = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let options = ControlPlaneOptions {
            database_url: Some(db.url.clone()),
            master_key: Some(MASTER_KEY.into()),
            bootstrap_api_key: Some(ADMIN_KEY.into()),
            node_token: Some("node_shared-token-0123456789".into()),
            extra_args: ["--retention-interval", "1s", "--metrics-listen", &format!("127.0.0.1:{port}")]
                .map(str::to_owned)
                .to_vec(),
            ..Default::default()
        };
        planes.push(ControlPlane::start(&dir.path().join(format!("cp{i}")), &options).await);
    }
    // None while a listener is not up yet.
    let runs = |port: u16| async move {
        let (_, page) = http_get(&format!("127.0.0.1:{port}"), "/metrics").await.ok()?;
        sample(&page, "omni_cp_retention_runs_total")
    };
    let counts = wait_for("several retention passes", Duration::from_secs(20), || async {
        let counts = [runs(ports[0]).await?, runs(ports[1]).await?];
        (counts[0] + counts[1] >= 4.0).then_some(counts)
    })
    .await;
    assert!(counts.contains(&0.0), "one control plane ran every pass: {counts:?}");
    let (holder, other) = if counts[0] > 0.0 { (0, 1) } else { (1, 0) };
    planes.remove(holder).kill().await;
    // The lease lasts three intervals; then the other control plane takes it.
    wait_for("the other control plane to take over retention", Duration::from_secs(20), || async {
        (runs(ports[other]).await? > 0.0).then_some(())
    })
    .await;
}
