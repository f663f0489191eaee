//! `omni.v1.TraceService`, and the conversions of trace records shared with trace ingest.

use super::ApiContext;
use super::error::{ApiError, ApiResult};
use super::spec::{self, timestamp};
use crate::store::{
    LatencyStats, Scope, TraceCursor, TraceEventRecord, TraceFilter, TraceHeaderRecord, TraceQuery, TraceRecord,
    TraceStageRecord, UserQuery, now_millis,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use omni_proto::v1::{self as pb, trace_service_server::TraceService};
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

const DEFAULT_LIMIT: u32 = 50;
const DEFAULT_USER_PAGE: u32 = 100;
const MAX_LIMIT: u32 = 1000;

/// `TRACE_STATUS_COMPLETED` → `completed`, as stored.
pub fn status_name(status: i32) -> Option<String> {
    pb::TraceStatus::try_from(status)
        .ok()
        .filter(|s| *s != pb::TraceStatus::Unspecified)
        .map(|s| s.as_str_name().trim_start_matches("TRACE_STATUS_").to_ascii_lowercase())
}

fn status_from_name(name: &str) -> pb::TraceStatus {
    pb::TraceStatus::from_str_name(&format!("TRACE_STATUS_{}", name.to_ascii_uppercase())).unwrap_or_default()
}

fn channel_from_name(name: &str) -> pb::Channel {
    pb::Channel::from_str_name(&format!("CHANNEL_{}", name.to_ascii_uppercase())).unwrap_or_default()
}

pub fn event_from_pb(event: pb::TraceEvent) -> ApiResult<TraceEventRecord> {
    if event.trace_id.is_empty() || event.instance_id.is_empty() || event.stage.is_empty() {
        return Err(ApiError::invalid("trace events need trace_id, instance_id and stage"));
    }
    let status = status_name(event.status).ok_or_else(|| ApiError::invalid("trace events need a status"))?;
    let header = event.header.map(|h| TraceHeaderRecord {
        channel: pb::Channel::try_from(h.channel)
            .map(|c| c.as_str_name().trim_start_matches("CHANNEL_").to_ascii_lowercase())
            .unwrap_or_default(),
        user_id: omni_core::names::user_id(&event.instance_id, &h.sender),
        external_id: h.external_id,
        conversation_id: h.conversation_id,
        sender: h.sender,
        sender_name: h.sender_name,
        message_type: h.message_type,
        text: h.text,
        received_at: h.received_unix_ms,
    });
    Ok(TraceEventRecord {
        trace_id: event.trace_id,
        seq: i64::from(event.seq),
        instance_id: event.instance_id,
        stage: event.stage,
        at: event.time_unix_ms,
        status,
        detail: event.detail,
        duration_ms: event.duration_ms,
        payload: event.payload,
        error: event.error,
        agent_ms: event.agent_ms,
        header,
    })
}

fn trace_to_pb(t: &TraceRecord, stages: &[TraceStageRecord], payloads: bool) -> pb::Trace {
    pb::Trace {
        id: t.id.clone(),
        instance: t.instance.clone(),
        channel: channel_from_name(&t.channel) as i32,
        external_id: t.external_id.clone(),
        conversation_id: t.conversation_id.clone(),
        sender: t.sender.clone(),
        sender_name: t.sender_name.clone(),
        user_id: t.user_id.clone(),
        message_type: t.message_type.clone(),
        text: t.text.clone(),
        status: status_from_name(&t.status) as i32,
        error_stage: t.error_stage.clone(),
        error: t.error.clone(),
        received_time: Some(timestamp(t.received_at)),
        updated_time: Some(timestamp(t.updated_at)),
        agent_ms: t.agent_ms,
        total_ms: (t.updated_at - t.received_at).max(0),
        node_id: t.node_id.clone(),
        stages: stages
            .iter()
            .map(|s| pb::TraceStage {
                seq: s.seq as u32,
                stage: s.stage.clone(),
                time: Some(timestamp(s.at)),
                duration_ms: s.duration_ms,
                detail: s.detail.clone(),
                payload: if payloads { s.payload.clone() } else { String::new() },
            })
            .collect(),
    }
}

pub struct TraceApi {
    ctx: ApiContext,
}

/// How many tails may fall behind the live feed before they skip ahead (and say so).
const TAIL_BUFFER: usize = 256;

fn page_size(requested: u32, default: u32) -> u32 {
    match requested {
        0 => default,
        n => n.min(MAX_LIMIT),
    }
}

fn millis(t: &omni_proto::Timestamp) -> i64 {
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

fn text_filter(value: &str) -> Option<String> {
    let value = value.trim();
    (!value.is_empty()).then(|| value.to_owned())
}

fn channel_filter(value: i32) -> ApiResult<Option<String>> {
    Ok(match value {
        0 => None,
        other => Some(spec::channel_from_pb(other)?.to_string()),
    })
}

/// The time range of a request: `since_seconds` back from now, and/or explicit bounds.
fn time_range(
    since_seconds: i64,
    start: Option<&omni_proto::Timestamp>,
    end: Option<&omni_proto::Timestamp>,
) -> ApiResult<(Option<i64>, Option<i64>)> {
    if since_seconds < 0 {
        return Err(ApiError::invalid("since must not be negative"));
    }
    let relative = match since_seconds {
        0 => None,
        s => Some(seconds_ago(s)?),
    };
    let since = match (relative, start.map(millis)) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let until = end.map(millis);
    if let (Some(since), Some(until)) = (since, until)
        && until <= since
    {
        return Err(ApiError::invalid("the end of the time range must be after its start"));
    }
    Ok((since, until))
}

/// Unix ms `seconds` ago; durations beyond any clock are refused rather than wrapped around.
fn seconds_ago(seconds: i64) -> ApiResult<i64> {
    seconds
        .checked_mul(1000)
        .and_then(|ms| now_millis().checked_sub(ms))
        .ok_or_else(|| ApiError::invalid(format!("{seconds} seconds is too long a duration")))
}

fn encode_cursor(received_at: i64, id: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{received_at}:{id}"))
}

fn decode_cursor(token: &str) -> ApiResult<(i64, String)> {
    URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| {
            let (at, id) = text.split_once(':')?;
            Some((at.parse().ok()?, id.to_owned()))
        })
        .ok_or_else(|| ApiError::invalid("page_token is not one this API issued"))
}

fn latency_to_pb(l: &LatencyStats) -> pb::LatencySummary {
    pb::LatencySummary {
        samples: l.samples,
        avg_ms: l.avg_ms,
        p50_ms: l.p50_ms,
        p95_ms: l.p95_ms,
        p99_ms: l.p99_ms,
        max_ms: l.max_ms,
    }
}

fn counts_to_pb(counts: Vec<(String, i64)>) -> Vec<pb::Count> {
    counts.into_iter().map(|(key, count)| pb::Count { key, count }).collect()
}

impl TraceApi {
    pub fn new(ctx: ApiContext) -> TraceApi {
        TraceApi { ctx }
    }

    /// NOT_FOUND for an instance the caller cannot see, rather than an empty answer.
    async fn check_instance(&self, scope: &Scope, instance: &Option<String>) -> ApiResult<()> {
        if let Some(name) = instance {
            self.ctx.store.get_instance(scope, name).await?;
        }
        Ok(())
    }

    async fn list(&self, request: Request<pb::ListTracesRequest>) -> ApiResult<pb::ListTracesResponse> {
        let caller = self.ctx.auth.authenticate(&request).await?;
        let req = request.into_inner();
        let (since, until) = time_range(req.since_seconds, req.start_time.as_ref(), req.end_time.as_ref())?;
        let filter = TraceFilter {
            instance: text_filter(&req.instance),
            status: status_name(req.status),
            channel: channel_filter(req.channel)?,
            sender: text_filter(&req.sender),
            since,
            until,
            text_contains: text_filter(&req.text_contains),
        };
        self.check_instance(&caller.scope, &filter.instance).await?;
        let after = if req.page_token.is_empty() {
            None
        } else {
            let (received_at, id) = decode_cursor(&req.page_token)?;
            Some(TraceCursor { received_at, id })
        };
        let limit = page_size(req.limit, DEFAULT_LIMIT);
        let traces = self.ctx.store.list_traces(&caller.scope, &TraceQuery { filter, after, limit }).await?;
        let next_page_token = match traces.last() {
            Some(last) if traces.len() as u32 == limit => encode_cursor(last.received_at, &last.id),
            _ => String::new(),
        };
        Ok(pb::ListTracesResponse {
            traces: traces.iter().map(|t| trace_to_pb(t, &[], false)).collect(),
            next_page_token,
        })
    }

    async fn get(&self, request: Request<pb::GetTraceRequest>) -> ApiResult<pb::Trace> {
        let caller = self.ctx.auth.authenticate(&request).await?;
        let req = request.get_ref();
        let (trace, stages) = self.ctx.store.get_trace(&caller.scope, &req.id, req.include_payloads).await?;
        Ok(trace_to_pb(&trace, &stages, req.include_payloads))
    }

    async fn tail(
        &self,
        request: Request<pb::TailTracesRequest>,
    ) -> ApiResult<ReceiverStream<Result<pb::Trace, Status>>> {
        let caller = self.ctx.auth.authenticate(&request).await?;
        let req = request.into_inner();
        let filter = TraceFilter {
            instance: text_filter(&req.instance),
            status: status_name(req.status),
            channel: channel_filter(req.channel)?,
            sender: text_filter(&req.sender),
            ..TraceFilter::default()
        };
        self.check_instance(&caller.scope, &filter.instance).await?;
        // Subscribe before answering, so nothing finishing after the call is missed.
        let mut finished = self.ctx.store.finished_traces();
        let (tx, rx) = tokio::sync::mpsc::channel(TAIL_BUFFER);
        let store = self.ctx.store.clone();
        let scope = caller.scope;
        let stopping = self.ctx.stopping.clone();
        tokio::spawn(async move {
            let stopped = stopping.wait();
            tokio::pin!(stopped);
            loop {
                let ids = tokio::select! {
                    _ = tx.closed() => return,
                    _ = &mut stopped => {
                        let _ = tx.send(Err(Status::unavailable("the control plane is stopping"))).await;
                        return;
                    }
                    next = finished.recv() => match next {
                        Ok(ids) => ids,
                        Err(RecvError::Lagged(missed)) => {
                            tracing::warn!(missed, "a trace tail fell behind; skipping ahead");
                            continue;
                        }
                        Err(RecvError::Closed) => return,
                    },
                };
                let item = match store.traces_by_ids(&scope, &ids, &filter).await {
                    Ok(traces) => traces,
                    Err(e) => {
                        let _ = tx.send(Err(ApiError::from(e).into())).await;
                        return;
                    }
                };
                for trace in &item {
                    if tx.send(Ok(trace_to_pb(trace, &[], false))).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }

    async fn stats(&self, request: Request<pb::GetTraceStatsRequest>) -> ApiResult<pb::TraceStats> {
        let caller = self.ctx.auth.authenticate(&request).await?;
        let req = request.into_inner();
        let (since, until) = time_range(req.since_seconds, req.start_time.as_ref(), req.end_time.as_ref())?;
        let filter = TraceFilter { instance: text_filter(&req.instance), since, until, ..TraceFilter::default() };
        self.check_instance(&caller.scope, &filter.instance).await?;
        let stats = self.ctx.store.trace_stats(&caller.scope, &filter).await?;
        let count_of = |status: &str| stats.by_status.iter().find(|(s, _)| s == status).map_or(0, |(_, n)| *n);
        let (completed, failed) = (count_of("completed"), count_of("failed"));
        let success_rate =
            if completed + failed == 0 { 0.0 } else { 100.0 * completed as f64 / (completed + failed) as f64 };
        Ok(pb::TraceStats {
            total: stats.total,
            success_rate,
            agent_latency: Some(latency_to_pb(&stats.agent_latency)),
            total_latency: Some(latency_to_pb(&stats.total_latency)),
            per_hour: stats
                .per_hour
                .iter()
                .map(|(hour, count)| pb::HourCount { hour: Some(timestamp(*hour)), count: *count })
                .collect(),
            by_status: counts_to_pb(stats.by_status),
            by_error_stage: counts_to_pb(stats.by_error_stage),
            by_message_type: counts_to_pb(stats.by_message_type),
            by_instance: counts_to_pb(stats.by_instance),
        })
    }

    async fn purge(&self, request: Request<pb::PurgeTracesRequest>) -> ApiResult<pb::PurgeTracesResponse> {
        let caller = self.ctx.auth.authenticate(&request).await?;
        let req = request.into_inner();
        if req.older_than_seconds <= 0 {
            return Err(ApiError::invalid("older_than is required: traces received longer ago than it are purged"));
        }
        let filter = TraceFilter {
            instance: text_filter(&req.instance),
            until: Some(seconds_ago(req.older_than_seconds)?),
            ..TraceFilter::default()
        };
        self.check_instance(&caller.scope, &filter.instance).await?;
        let traces = self.ctx.store.purge_traces(&caller.scope, &filter, req.dry_run).await?;
        if !req.dry_run {
            tracing::info!(key = caller.key_id.as_str(), traces, instance = req.instance, "traces purged");
        }
        Ok(pb::PurgeTracesResponse { traces, dry_run: req.dry_run })
    }

    async fn users(&self, request: Request<pb::ListUsersRequest>) -> ApiResult<pb::ListUsersResponse> {
        let caller = self.ctx.auth.authenticate(&request).await?;
        let req = request.into_inner();
        let limit = page_size(req.page_size, DEFAULT_USER_PAGE);
        let after = if req.page_token.is_empty() { None } else { Some(decode_cursor(&req.page_token)?) };
        let query = UserQuery { instance: req.instance, search: text_filter(&req.search), after, limit };
        let users = self.ctx.store.list_users(&caller.scope, &query).await?;
        let next_page_token = match users.last() {
            Some(last) if users.len() as u32 == limit => encode_cursor(last.last_seen_at, &last.identity),
            _ => String::new(),
        };
        Ok(pb::ListUsersResponse {
            users: users
                .into_iter()
                .map(|u| pb::User {
                    id: u.id,
                    instance: u.instance,
                    identity: u.identity,
                    display_name: u.display_name,
                    first_seen_time: Some(timestamp(u.first_seen_at)),
                    last_seen_time: Some(timestamp(u.last_seen_at)),
                    message_count: u.message_count,
                })
                .collect(),
            next_page_token,
        })
    }
}

#[tonic::async_trait]
impl TraceService for TraceApi {
    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        Ok(Response::new(self.users(request).await?))
    }

    async fn list_traces(
        &self,
        request: Request<pb::ListTracesRequest>,
    ) -> Result<Response<pb::ListTracesResponse>, Status> {
        Ok(Response::new(self.list(request).await?))
    }

    async fn get_trace(&self, request: Request<pb::GetTraceRequest>) -> Result<Response<pb::Trace>, Status> {
        Ok(Response::new(self.get(request).await?))
    }

    type TailTracesStream = ReceiverStream<Result<pb::Trace, Status>>;

    async fn tail_traces(
        &self,
        request: Request<pb::TailTracesRequest>,
    ) -> Result<Response<Self::TailTracesStream>, Status> {
        Ok(Response::new(self.tail(request).await?))
    }

    async fn get_trace_stats(
        &self,
        request: Request<pb::GetTraceStatsRequest>,
    ) -> Result<Response<pb::TraceStats>, Status> {
        Ok(Response::new(self.stats(request).await?))
    }

    async fn purge_traces(
        &self,
        request: Request<pb::PurgeTracesRequest>,
    ) -> Result<Response<pb::PurgeTracesResponse>, Status> {
        Ok(Response::new(self.purge(request).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip() {
        assert_eq!(status_name(pb::TraceStatus::Completed as i32).as_deref(), Some("completed"));
        assert_eq!(status_name(0), None);
        assert_eq!(status_from_name("ignored"), pb::TraceStatus::Ignored);
    }

    #[test]
    fn cursors_round_trip() {
        let token = encode_cursor(1_700_000_000_123, "0b7c-id:with-colon");
        assert_eq!(decode_cursor(&token).unwrap(), (1_700_000_000_123, "0b7c-id:with-colon".to_owned()));
        assert!(decode_cursor("not-a-token!").is_err());
        assert!(decode_cursor(&URL_SAFE_NO_PAD.encode("abc:x")).is_err());
    }

    #[test]
    fn time_ranges() {
        let start = omni_proto::Timestamp { seconds: 100, nanos: 0 };
        let end = omni_proto::Timestamp { seconds: 200, nanos: 0 };
        assert_eq!(time_range(0, Some(&start), Some(&end)).unwrap(), (Some(100_000), Some(200_000)));
        assert_eq!(time_range(0, None, None).unwrap(), (None, None));
        assert!(time_range(0, Some(&end), Some(&start)).is_err());
        assert!(time_range(-1, None, None).is_err());
        assert!(time_range(i64::MAX, None, None).is_err(), "refused, not wrapped into the future");
    }
}
