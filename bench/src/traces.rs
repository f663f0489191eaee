//! Traces at scale on Postgres: how fast the control plane stores reported traces (batched, as
//! nodes ship them), then how long the operator's queries take with that many stored.

use crate::stats::{mib, ms, percentile, rss_bytes};
use omni_proto::v1::{self as pb, TraceEvent, TraceHeader, TraceStatus};
use omni_proto::v1::{node_sync_service_client::NodeSyncServiceClient, trace_service_client::TraceServiceClient};
use omni_tests::postgres::TestDatabase;
use omni_tests::process::{ControlPlane, ControlPlaneOptions};
use sqlx::Connection;
use std::future::Future;
use std::time::{Duration, Instant};
use tonic::metadata::MetadataValue;

const ADMIN_KEY: &str = "omni_bench_0123456789abcdef0123456789abcdef";
const NODE_TOKEN: &str = "bench-node-token-0123456789abcdef";
const MASTER_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
const DAY_MS: i64 = 86_400_000;

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Traces to store (three stages each).
    #[arg(long, default_value_t = 1_000_000)]
    traces: usize,
    /// Instances they are spread over.
    #[arg(long, default_value_t = 10)]
    instances: usize,
    /// Days back the traces' arrival times span.
    #[arg(long, default_value_t = 30)]
    days: i64,
    /// Stages per report (nodes send up to 2,000).
    #[arg(long, default_value_t = 2000)]
    batch: usize,
    /// Reports in flight at once (as from that many nodes).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Runs of each query.
    #[arg(long, default_value_t = 20)]
    runs: usize,
}

fn bearer(value: &str) -> MetadataValue<tonic::metadata::Ascii> {
    format!("Bearer {value}").parse().expect("ascii")
}

/// The three stages of trace `n`: received, agent response, completed or (one in ten) failed.
fn trace_events(n: usize, instance_id: &str, received: i64) -> [TraceEvent; 3] {
    let id = format!("bench-{n:08}");
    let agent_ms = 200 + (n as i64 * 7919) % 1800;
    let event = |seq: u32, stage: &str, status: TraceStatus, at: i64| TraceEvent {
        trace_id: id.clone(),
        seq,
        instance_id: instance_id.to_owned(),
        stage: stage.to_owned(),
        time_unix_ms: at,
        status: status as i32,
        ..Default::default()
    };
    let words = ["order", "invoice", "hello", "delivery", "refund", "schedule", "price", "thanks"];
    let received_event = TraceEvent {
        header: Some(TraceHeader {
            channel: pb::Channel::Whatsapp as i32,
            external_id: format!("3EB0{n:016X}"),
            conversation_id: format!("55119{:08}@s.whatsapp.net", n % 5000),
            sender: format!("55119{:08}", n % 5000),
            sender_name: format!("User {}", n % 5000),
            message_type: "conversation".into(),
            text: format!("{} about {} number {n}", words[n % 8], words[(n / 8) % 8]),
            received_unix_ms: received,
        }),
        payload: format!(
            r#"{{"event":"messages.upsert","data":{{"key":{{"id":"3EB0{n:016X}"}},"message":{{"conversation":"{}"}}}}}}"#,
            words[n % 8]
        ),
        ..event(0, "received", TraceStatus::Received, received)
    };
    let agent = TraceEvent {
        agent_ms,
        duration_ms: agent_ms,
        payload: r#"{"message":"Thanks, we are on it."}"#.into(),
        ..event(1, "agent_response", TraceStatus::Processing, received + agent_ms)
    };
    let last = if n.is_multiple_of(10) {
        TraceEvent {
            error: "the agent answered 502".into(),
            ..event(2, "agent_request", TraceStatus::Failed, received + agent_ms + 3)
        }
    } else {
        event(2, "completed", TraceStatus::Completed, received + agent_ms + 40)
    };
    [received_event, agent, last]
}

async fn timed<T, F, Fut>(runs: usize, mut query: F) -> anyhow::Result<(Duration, Duration, T)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut samples = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let started = Instant::now();
        last = Some(query().await?);
        samples.push(started.elapsed());
    }
    Ok((percentile(&mut samples, 50.0), percentile(&mut samples, 99.0), last.expect("at least one run")))
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let Some(db) = TestDatabase::create().await else {
        anyhow::bail!(
            "this benchmark needs Postgres (OMNI_TEST_POSTGRES_URL, default postgres://postgres@127.0.0.1:5432/test)"
        );
    };
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::start(
        &dir.path().join("cp"),
        &ControlPlaneOptions {
            database_url: Some(db.url.clone()),
            master_key: Some(MASTER_KEY.into()),
            bootstrap_api_key: Some(ADMIN_KEY.into()),
            node_token: Some(NODE_TOKEN.into()),
            // Retention would start deleting the older half of the data set.
            extra_args: vec!["--trace-retention".into(), "0".into()],
            ..Default::default()
        },
    )
    .await;
    let mut instance_ids = Vec::new();
    for i in 0..options.instances {
        let name = format!("bench-{i}");
        omni_tests::create_whatsapp(&cp.url(), ADMIN_KEY, &name).await;
        instance_ids.push(omni_tests::instance_id(&db.url, &name).await);
    }
    println!(
        "traces benchmark: {} traces ({} stages) over {} instances and {} days, reports of {} stages, {} in flight",
        options.traces,
        options.traces * 3,
        options.instances,
        options.days,
        options.batch,
        options.concurrency
    );

    // Ingest: reports as nodes send them, several at once.
    let channel = omni_proto::client::endpoint(&cp.url(), None)?.connect().await?;
    let node_token = bearer(NODE_TOKEN);
    let sync = NodeSyncServiceClient::with_interceptor(channel.clone(), move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", node_token.clone());
        Ok(r)
    });
    let now = omni_tests::now_millis();
    let span = options.days * DAY_MS;
    let traces_per_report = (options.batch / 3).max(1);
    let (reports_tx, reports_rx) = tokio::sync::mpsc::channel::<Vec<TraceEvent>>(options.concurrency * 2);
    let reports_rx = std::sync::Arc::new(tokio::sync::Mutex::new(reports_rx));
    let cpu_before = crate::stats::cpu_time(cp.pid().unwrap_or_default());
    let started = Instant::now();
    let mut senders = Vec::new();
    for _ in 0..options.concurrency {
        let (mut sync, reports) = (sync.clone(), reports_rx.clone());
        senders.push(tokio::spawn(async move {
            loop {
                let Some(events) = reports.lock().await.recv().await else { return Ok::<_, tonic::Status>(()) };
                sync.report_traces(pb::ReportTracesRequest { node_id: "bench".into(), events }).await?;
            }
        }));
    }
    let (traces, instances) = (options.traces, instance_ids.clone());
    let producer = tokio::spawn(async move {
        let mut n = 0;
        while n < traces {
            let end = (n + traces_per_report).min(traces);
            let mut events = Vec::with_capacity((end - n) * 3);
            for i in n..end {
                // Spread evenly over the span, oldest first, as they would have arrived.
                let received = now - span + (i as i64 * span / traces as i64);
                events.extend(trace_events(i, &instances[(i / 3) % instances.len()], received));
            }
            if reports_tx.send(events).await.is_err() {
                return;
            }
            n = end;
        }
    });
    producer.await?;
    for sender in senders {
        sender.await??;
    }
    let elapsed = started.elapsed();
    let cpu = crate::stats::cpu_time(cp.pid().unwrap_or_default()).zip(cpu_before).map(|(a, b)| a - b);
    println!(
        "ingest: {:.0} traces/s ({:.0} stages/s) into Postgres, {} in {:.1} s; control plane CPU {}",
        options.traces as f64 / elapsed.as_secs_f64(),
        (options.traces * 3) as f64 / elapsed.as_secs_f64(),
        options.traces,
        elapsed.as_secs_f64(),
        cpu.map_or("n/a".to_owned(), |c| format!("{:.1} µs per trace", c.as_micros() as f64 / options.traces as f64)),
    );
    let mut conn = sqlx::PgConnection::connect(&db.url).await?;
    let size: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())").fetch_one(&mut conn).await?;
    // Autovacuum would analyze the tables soon after such a load; do it now.
    sqlx::query("ANALYZE").execute(&mut conn).await?;
    println!(
        "database size: {}; control plane RSS {}",
        mib(size as u64),
        mib(rss_bytes(cp.pid().unwrap_or_default()).unwrap_or(0))
    );

    let admin = bearer(ADMIN_KEY);
    let api = TraceServiceClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", admin.clone());
        Ok(r)
    });
    let list = |request: pb::ListTracesRequest| {
        let mut api = api.clone();
        async move { Ok(api.list_traces(request).await?.into_inner()) }
    };
    let stats = |request: pb::GetTraceStatsRequest| {
        let mut api = api.clone();
        async move { Ok(api.get_trace_stats(request).await?.into_inner()) }
    };
    let instance = "bench-3".to_owned();
    println!("{:<58} {:>10} {:>10}  result", "query", "p50", "p99");
    let report = |what: &str, (p50, p99, result): (Duration, Duration, String)| {
        println!("{what:<58} {:>10} {:>10}  {result}", ms(p50), ms(p99));
    };
    let runs = options.runs;
    let by_instance = |since_seconds| pb::ListTracesRequest {
        instance: instance.clone(),
        since_seconds,
        limit: 50,
        ..Default::default()
    };
    let (p50, p99, page) = timed(runs, || list(by_instance(3600))).await?;
    report("trace list --instance X --since 1h", (p50, p99, format!("{} traces", page.traces.len())));
    let (p50, p99, first) = timed(runs, || list(by_instance(0))).await?;
    report("trace list --instance X (first page)", (p50, p99, format!("{} traces", first.traces.len())));
    let next = pb::ListTracesRequest { page_token: first.next_page_token.clone(), ..by_instance(0) };
    let (p50, p99, page) = timed(runs, || list(next.clone())).await?;
    report("trace list --instance X (next page, by cursor)", (p50, p99, format!("{} traces", page.traces.len())));
    let failed = pb::ListTracesRequest { status: TraceStatus::Failed as i32, ..by_instance(86_400) };
    let (p50, p99, page) = timed(runs, || list(failed.clone())).await?;
    report("trace list --instance X --status failed --since 24h", (p50, p99, format!("{} traces", page.traces.len())));
    let sender = pb::ListTracesRequest { sender: "5511900000009".into(), ..by_instance(0) };
    let (p50, p99, page) = timed(runs, || list(sender.clone())).await?;
    report("trace list --instance X --sender S", (p50, p99, format!("{} traces", page.traces.len())));
    let search = pb::ListTracesRequest { text_contains: "refund about delivery".into(), ..by_instance(86_400) };
    let (p50, p99, page) = timed(runs, || list(search.clone())).await?;
    report("trace list --instance X --since 24h --search TEXT", (p50, p99, format!("{} traces", page.traces.len())));
    let everyone = pb::ListTracesRequest { since_seconds: 3600, limit: 50, ..Default::default() };
    let (p50, p99, page) = timed(runs, || list(everyone.clone())).await?;
    report("trace list --since 1h (all instances)", (p50, p99, format!("{} traces", page.traces.len())));
    for (label, since_seconds) in [("1h", 3600), ("24h", 86_400), ("7d", 7 * 86_400)] {
        let request = pb::GetTraceStatsRequest { instance: instance.clone(), since_seconds, ..Default::default() };
        let (p50, p99, s) = timed(runs, || stats(request.clone())).await?;
        let agent = s.agent_latency.unwrap_or_default();
        report(
            &format!("trace stats X --since {label}"),
            (p50, p99, format!("{} traces, agent p99 {} ms", s.total, agent.p99_ms)),
        );
    }
    let all = pb::GetTraceStatsRequest { since_seconds: 86_400, ..Default::default() };
    let (p50, p99, s) = timed(runs, || stats(all.clone())).await?;
    report("trace stats --since 24h (all instances)", (p50, p99, format!("{} traces", s.total)));
    let id = first.traces.first().map(|t| t.id.clone()).unwrap_or_default();
    let (p50, p99, _) = timed(runs, || {
        let (mut api, id) = (api.clone(), id.clone());
        async move { Ok(api.get_trace(pb::GetTraceRequest { id, include_payloads: true }).await?.into_inner()) }
    })
    .await?;
    report("trace get ID --payloads", (p50, p99, "3 stages".into()));
    let (p50, p99, purge) = timed(runs.min(5), || {
        let mut api = api.clone();
        async move {
            let request =
                pb::PurgeTracesRequest { older_than_seconds: 25 * 86_400, dry_run: true, ..Default::default() };
            Ok(api.purge_traces(request).await?.into_inner())
        }
    })
    .await?;
    report("trace purge --older-than 25d --dry-run", (p50, p99, format!("{} traces", purge.traces)));
    Ok(())
}
