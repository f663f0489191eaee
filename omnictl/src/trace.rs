//! `omnictl trace ...` and `omnictl user ...`

use crate::client::Client;
use crate::output::{self, Format, enum_name, time, time_json};
use clap::{Subcommand, ValueEnum};
use omni_proto::v1 as pb;
use serde_json::{Value, json};

#[derive(Debug, Subcommand)]
pub enum TraceCommand {
    /// Recent traces, newest first.
    List {
        #[arg(long)]
        instance: Option<String>,
        #[arg(long, value_enum)]
        status: Option<StatusArg>,
        /// Only traces received within this long (e.g. 30m, 24h, 7d).
        #[arg(long, value_parser = parse_duration_secs)]
        since: Option<i64>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// One trace with its stages.
    Get {
        id: String,
        /// Include each stage's payload (secrets redacted).
        #[arg(long)]
        payloads: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// The people who wrote to an instance.
    List { instance: String },
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

/// `90s`, `30m`, `24h`, `7d` → seconds.
pub fn parse_duration_secs(text: &str) -> Result<i64, String> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: i64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 30m, 24h or 7d"))?;
    let factor = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    Ok(n * factor)
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

pub async fn run(command: TraceCommand, client: &Client, format: Format) -> anyhow::Result<()> {
    let mut api = client.traces();
    match command {
        TraceCommand::List { instance, status: wanted, since, limit } => {
            let traces = api
                .list_traces(pb::ListTracesRequest {
                    instance: instance.unwrap_or_default(),
                    status: wanted.map_or(0, |s| {
                        (match s {
                            StatusArg::Received => pb::TraceStatus::Received,
                            StatusArg::Processing => pb::TraceStatus::Processing,
                            StatusArg::Completed => pb::TraceStatus::Completed,
                            StatusArg::Failed => pb::TraceStatus::Failed,
                            StatusArg::Denied => pb::TraceStatus::Denied,
                            StatusArg::Ignored => pb::TraceStatus::Ignored,
                        }) as i32
                    }),
                    since_seconds: since.unwrap_or(0),
                    limit,
                })
                .await
                .map_err(|s| client.error(s))?
                .into_inner()
                .traces;
            match format {
                Format::Json => output::json(&Value::Array(traces.iter().map(trace_json).collect())),
                Format::Table => output::table(
                    &["ID", "INSTANCE", "RECEIVED", "SENDER", "STATUS", "TOTAL", "TEXT"],
                    &traces
                        .iter()
                        .map(|t| {
                            vec![
                                t.id.clone(),
                                t.instance.clone(),
                                time(t.received_time.as_ref()),
                                t.sender.clone(),
                                status(t.status),
                                format!("{}ms", t.total_ms),
                                preview(&t.text),
                            ]
                        })
                        .collect::<Vec<_>>(),
                ),
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
    }
    Ok(())
}

pub async fn run_users(command: UserCommand, client: &Client, format: Format) -> anyhow::Result<()> {
    let UserCommand::List { instance } = command;
    let users = client
        .traces()
        .list_users(pb::ListUsersRequest { instance })
        .await
        .map_err(|s| client.error(s))?
        .into_inner()
        .users;
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_secs("90"), Ok(90));
        assert_eq!(parse_duration_secs("30m"), Ok(1800));
        assert_eq!(parse_duration_secs("24h"), Ok(86_400));
        assert_eq!(parse_duration_secs("7d"), Ok(604_800));
        assert!(parse_duration_secs("1w").is_err());
        assert!(parse_duration_secs("h").is_err());
    }
}
