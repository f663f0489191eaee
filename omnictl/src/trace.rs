//! `omnictl trace ...` and `omnictl user ...`

use crate::client::Client;
use crate::output::{self, Format, enum_name, time, time_json};
use clap::{Subcommand, ValueEnum};
use omni_proto::v1 as pb;
use serde_json::{Value, json};

#[derive(Debug, Subcommand)]
pub enum TraceCommand {
    /// Traces, newest first, a page at a time.
    List {
        #[command(flatten)]
        filter: Filter,
        /// Only traces received within this long (e.g. 30m, 24h, 7d).
        #[arg(long, value_parser = parse_duration_secs)]
        since: Option<i64>,
        /// Only traces received longer ago than this.
        #[arg(long, value_parser = parse_duration_secs)]
        before: Option<i64>,
        /// Only messages whose text contains this (case-insensitive).
        #[arg(long)]
        search: Option<String>,
        /// Traces per page.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue a listing where its previous page ended.
        #[arg(long)]
        page_token: Option<String>,
    },
    /// One trace: its timeline of stages with durations.
    Get {
        id: String,
        /// Include each stage's payload (secrets redacted).
        #[arg(long)]
        payloads: bool,
    },
    /// Follow traces live: one line per message as it completes, until interrupted.
    Tail {
        #[command(flatten)]
        filter: Filter,
    },
    /// Totals by status, error stages, agent and total latency percentiles, messages per hour.
    Stats {
        /// The instance (default: every instance the key may see).
        instance: Option<String>,
        /// Only traces received within this long (e.g. 24h, 7d; default: all).
        #[arg(long, value_parser = parse_duration_secs)]
        since: Option<i64>,
    },
    /// Delete traces received longer ago than a duration.
    Purge {
        /// e.g. 30d.
        #[arg(long, value_parser = omni_core::duration::parse_positive_secs)]
        older_than: i64,
        /// Only this instance's traces.
        #[arg(long)]
        instance: Option<String>,
        /// Count what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct Filter {
    #[arg(long)]
    instance: Option<String>,
    #[arg(long, value_enum)]
    status: Option<StatusArg>,
    #[arg(long, value_enum)]
    channel: Option<ChannelArg>,
    /// The sender's identity (phone number or channel user id), exactly.
    #[arg(long)]
    sender: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// The people who wrote to an instance, most recently seen first.
    List {
        instance: String,
        /// Only users whose identity or name contains this (case-insensitive).
        #[arg(long)]
        search: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Continue a listing where its previous page ended.
        #[arg(long)]
        page_token: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StatusArg {
    Received,
    Processing,
    Completed,
    Failed,
    Denied,
    Ignored,
}

impl StatusArg {
    fn to_pb(self) -> pb::TraceStatus {
        match self {
            StatusArg::Received => pb::TraceStatus::Received,
            StatusArg::Processing => pb::TraceStatus::Processing,
            StatusArg::Completed => pb::TraceStatus::Completed,
            StatusArg::Failed => pb::TraceStatus::Failed,
            StatusArg::Denied => pb::TraceStatus::Denied,
            StatusArg::Ignored => pb::TraceStatus::Ignored,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ChannelArg {
    Whatsapp,
    Discord,
    Slack,
}

impl ChannelArg {
    pub fn to_pb(self) -> pb::Channel {
        match self {
            ChannelArg::Whatsapp => pb::Channel::Whatsapp,
            ChannelArg::Discord => pb::Channel::Discord,
            ChannelArg::Slack => pb::Channel::Slack,
        }
    }
}

pub use omni_core::duration::parse_secs as parse_duration_secs;

fn seconds_ago(secs: i64) -> omni_proto::Timestamp {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    omni_proto::Timestamp { seconds: now.as_secs() as i64 - secs, nanos: 0 }
}

fn status(value: i32) -> String {
    pb::TraceStatus::try_from(value).map_or_else(|_| value.to_string(), |s| enum_name(s.as_str_name(), "TRACE_STATUS_"))
}

fn trace_json(t: &pb::Trace) -> Value {
    json!({
        "id": t.id,
        "instance": t.instance,
        "channel": pb::Channel::try_from(t.channel).map(|c| enum_name(c.as_str_name(), "CHANNEL_")).unwrap_or_default(),
        "external_id": t.external_id,
        "conversation_id": t.conversation_id,
        "sender": t.sender,
        "sender_name": t.sender_name,
        "user_id": t.user_id,
        "message_type": t.message_type,
        "text": t.text,
        "status": status(t.status),
        "error_stage": t.error_stage,
        "error": t.error,
        "received_time": time_json(t.received_time.as_ref()),
        "updated_time": time_json(t.updated_time.as_ref()),
        "agent_ms": t.agent_ms,
        "total_ms": t.total_ms,
        "node_id": t.node_id,
        "stages": t.stages.iter().map(|s| json!({
            "seq": s.seq,
            "stage": s.stage,
            "time": time_json(s.time.as_ref()),
            "duration_ms": s.duration_ms,
            "detail": s.detail,
            "payload": if s.payload.is_empty() { Value::Null } else {
                serde_json::from_str(&s.payload).unwrap_or(Value::String(s.payload.clone()))
            },
        })).collect::<Vec<_>>(),
    })
}

fn preview(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    if line.chars().count() > 40 {
        format!("{}…", line.chars().take(39).collect::<String>())
    } else {
        line.to_owned()
    }
}

fn trace_row(t: &pb::Trace) -> Vec<String> {
    vec![
        t.id.clone(),
        t.instance.clone(),
        time(t.received_time.as_ref()),
        t.sender.clone(),
        status(t.status),
        format!("{}ms", t.total_ms),
        preview(&t.text),
    ]
}

const TRACE_HEADER: [&str; 7] = ["ID", "INSTANCE", "RECEIVED", "SENDER", "STATUS", "TOTAL", "TEXT"];

fn latency_line(l: Option<&pb::LatencySummary>) -> String {
    match l {
        Some(l) if l.samples > 0 => format!(
            "p50 {}ms  p95 {}ms  p99 {}ms  avg {}ms  max {}ms  ({} traces)",
            l.p50_ms, l.p95_ms, l.p99_ms, l.avg_ms, l.max_ms, l.samples
        ),
        _ => "-".to_owned(),
    }
}

fn counts_line(counts: &[pb::Count]) -> String {
    if counts.is_empty() {
        return "-".to_owned();
    }
    counts
        .iter()
        .map(|c| format!("{} {}", if c.key.is_empty() { "(none)" } else { &c.key }, c.count))
        .collect::<Vec<_>>()
        .join(", ")
}

fn counts_json(counts: &[pb::Count]) -> Value {
    Value::Object(counts.iter().map(|c| (c.key.clone(), json!(c.count))).collect())
}

fn latency_json(l: Option<&pb::LatencySummary>) -> Value {
    let l = l.cloned().unwrap_or_default();
    json!({"samples": l.samples, "avg_ms": l.avg_ms, "p50_ms": l.p50_ms, "p95_ms": l.p95_ms, "p99_ms": l.p99_ms, "max_ms": l.max_ms})
}

pub async fn run(command: TraceCommand, client: &Client, format: Format) -> anyhow::Result<()> {
    let mut api = client.traces();
    match command {
        TraceCommand::List { filter, since, before, search, limit, page_token } => {
            let page = api
                .list_traces(pb::ListTracesRequest {
                    instance: filter.instance.unwrap_or_default(),
                    status: filter.status.map_or(0, |s| s.to_pb() as i32),
                    channel: filter.channel.map_or(0, |c| c.to_pb() as i32),
                    sender: filter.sender.unwrap_or_default(),
                    since_seconds: since.unwrap_or(0),
                    end_time: before.map(seconds_ago),
                    text_contains: search.unwrap_or_default(),
                    limit,
                    page_token: page_token.unwrap_or_default(),
                    start_time: None,
                })
                .await
                .map_err(|s| client.error(s))?
                .into_inner();
            match format {
                Format::Json => output::json(&Value::Array(page.traces.iter().map(trace_json).collect())),
                Format::Table => output::table(&TRACE_HEADER, &page.traces.iter().map(trace_row).collect::<Vec<_>>()),
            }
            if !page.next_page_token.is_empty() {
                eprintln!("more: add --page-token {}", page.next_page_token);
            }
        }
        TraceCommand::Get { id, payloads } => {
            let trace = api
                .get_trace(pb::GetTraceRequest { id, include_payloads: payloads })
                .await
                .map_err(|s| client.error(s))?
                .into_inner();
            if format == Format::Json {
                output::json(&trace_json(&trace));
                return Ok(());
            }
            let mut rows = vec![
                ("trace", trace.id.clone()),
                ("instance", trace.instance.clone()),
                ("from", format!("{} ({})", trace.sender, trace.sender_name)),
                ("conversation", trace.conversation_id.clone()),
                ("message", format!("{} {}", trace.message_type, trace.external_id)),
                ("text", trace.text.clone()),
                ("status", status(trace.status)),
                ("received", time(trace.received_time.as_ref())),
                ("agent", format!("{}ms", trace.agent_ms)),
                ("total", format!("{}ms", trace.total_ms)),
            ];
            if !trace.error.is_empty() {
                rows.push(("error", format!("{}: {}", trace.error_stage, trace.error)));
            }
            output::fields(&rows);
            println!();
            output::table(
                &["#", "STAGE", "TIME", "DURATION", "DETAIL"],
                &trace
                    .stages
                    .iter()
                    .map(|s| {
                        vec![
                            s.seq.to_string(),
                            s.stage.clone(),
                            time(s.time.as_ref()),
                            format!("{}ms", s.duration_ms),
                            s.detail.clone(),
                        ]
                    })
                    .collect::<Vec<_>>(),
            );
            if payloads {
                for s in trace.stages.iter().filter(|s| !s.payload.is_empty()) {
                    println!("\n[{} {}]\n{}", s.seq, s.stage, s.payload);
                }
            }
        }
        TraceCommand::Tail { filter } => {
            let mut stream = api
                .tail_traces(pb::TailTracesRequest {
                    instance: filter.instance.unwrap_or_default(),
                    status: filter.status.map_or(0, |s| s.to_pb() as i32),
                    channel: filter.channel.map_or(0, |c| c.to_pb() as i32),
                    sender: filter.sender.unwrap_or_default(),
                })
                .await
                .map_err(|s| client.error(s))?
                .into_inner();
            if format == Format::Table {
                output::stream_line(&TRACE_HEADER.join("  "));
            }
            while let Some(trace) = stream.message().await.map_err(|s| client.error(s))? {
                match format {
                    Format::Json => output::stream_line(&serde_json::to_string(&trace_json(&trace))?),
                    Format::Table => output::stream_line(&trace_row(&trace).join("  ")),
                }
            }
        }
        TraceCommand::Stats { instance, since } => {
            let stats = api
                .get_trace_stats(pb::GetTraceStatsRequest {
                    instance: instance.clone().unwrap_or_default(),
                    since_seconds: since.unwrap_or(0),
                    ..Default::default()
                })
                .await
                .map_err(|s| client.error(s))?
                .into_inner();
            let per_hour = || stats.per_hour.iter().map(|h| (time(h.hour.as_ref()), h.count));
            if format == Format::Json {
                output::json(&json!({
                    "instance": instance,
                    "since_seconds": since,
                    "total": stats.total,
                    "success_rate": stats.success_rate,
                    "by_status": counts_json(&stats.by_status),
                    "by_error_stage": counts_json(&stats.by_error_stage),
                    "by_message_type": counts_json(&stats.by_message_type),
                    "by_instance": counts_json(&stats.by_instance),
                    "agent_latency": latency_json(stats.agent_latency.as_ref()),
                    "total_latency": latency_json(stats.total_latency.as_ref()),
                    "per_hour": per_hour().map(|(hour, count)| json!({"hour": hour, "count": count})).collect::<Vec<_>>(),
                }));
                return Ok(());
            }
            output::fields(&[
                ("instance", instance.unwrap_or_else(|| "(all)".to_owned())),
                (
                    "window",
                    since.map_or("all time".to_owned(), |s| format!("last {}", omni_core::duration::format_secs(s))),
                ),
                ("messages", stats.total.to_string()),
                ("success rate", format!("{:.1}% of completed + failed", stats.success_rate)),
                ("by status", counts_line(&stats.by_status)),
                ("failed at", counts_line(&stats.by_error_stage)),
                ("message types", counts_line(&stats.by_message_type)),
                ("agent latency", latency_line(stats.agent_latency.as_ref())),
                ("total latency", latency_line(stats.total_latency.as_ref())),
            ]);
            if stats.by_instance.len() > 1 {
                println!();
                output::table(
                    &["INSTANCE", "MESSAGES"],
                    &stats.by_instance.iter().map(|c| vec![c.key.clone(), c.count.to_string()]).collect::<Vec<_>>(),
                );
            }
            if !stats.per_hour.is_empty() {
                println!();
                output::table(
                    &["HOUR", "MESSAGES"],
                    &per_hour().map(|(hour, count)| vec![hour, count.to_string()]).collect::<Vec<_>>(),
                );
            }
        }
        TraceCommand::Purge { older_than, instance, dry_run } => {
            let purged = api
                .purge_traces(pb::PurgeTracesRequest {
                    older_than_seconds: older_than,
                    instance: instance.unwrap_or_default(),
                    dry_run,
                })
                .await
                .map_err(|s| client.error(s))?
                .into_inner();
            match format {
                Format::Json => output::json(&json!({"traces": purged.traces, "dry_run": purged.dry_run})),
                Format::Table if dry_run => println!("{} trace(s) would be deleted", purged.traces),
                Format::Table => println!("deleted {} trace(s)", purged.traces),
            }
        }
    }
    Ok(())
}

pub async fn run_users(command: UserCommand, client: &Client, format: Format) -> anyhow::Result<()> {
    let UserCommand::List { instance, search, limit, page_token } = command;
    let page = client
        .traces()
        .list_users(pb::ListUsersRequest {
            instance,
            search: search.unwrap_or_default(),
            page_size: limit,
            page_token: page_token.unwrap_or_default(),
        })
        .await
        .map_err(|s| client.error(s))?
        .into_inner();
    let users = &page.users;
    match format {
        Format::Json => output::json(&Value::Array(
            users
                .iter()
                .map(|u| {
                    json!({
                        "id": u.id, "instance": u.instance, "identity": u.identity, "display_name": u.display_name,
                        "first_seen_time": time_json(u.first_seen_time.as_ref()),
                        "last_seen_time": time_json(u.last_seen_time.as_ref()),
                        "message_count": u.message_count,
                    })
                })
                .collect(),
        )),
        Format::Table => output::table(
            &["IDENTITY", "NAME", "MESSAGES", "FIRST SEEN", "LAST SEEN", "USER ID"],
            &users
                .iter()
                .map(|u| {
                    vec![
                        u.identity.clone(),
                        u.display_name.clone(),
                        u.message_count.to_string(),
                        time(u.first_seen_time.as_ref()),
                        time(u.last_seen_time.as_ref()),
                        u.id.clone(),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    }
    if !page.next_page_token.is_empty() {
        eprintln!("more: add --page-token {}", page.next_page_token);
    }
    Ok(())
}
