//! `omni.v1.TraceService`, and the conversions of trace records shared with trace ingest.

use super::ApiContext;
use super::error::{ApiError, ApiResult};
use super::spec::timestamp;
use crate::store::{TraceEventRecord, TraceHeaderRecord, TraceQuery, TraceRecord, TraceStageRecord, now_millis};
use omni_proto::v1::{self as pb, trace_service_server::TraceService};
use tonic::{Request, Response, Status};

const DEFAULT_LIMIT: u32 = 50;
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

impl TraceApi {
    pub fn new(ctx: ApiContext) -> TraceApi {
        TraceApi { ctx }
    }

    async fn list(&self, request: Request<pb::ListTracesRequest>) -> ApiResult<pb::ListTracesResponse> {
        let caller = self.ctx.auth.authenticate(&request).await?;
        let req = request.into_inner();
        let query = TraceQuery {
            instance: (!req.instance.is_empty()).then_some(req.instance),
            status: status_name(req.status),
            since: (req.since_seconds > 0).then(|| now_millis() - req.since_seconds * 1000),
            limit: match req.limit {
                0 => DEFAULT_LIMIT,
                n => n.min(MAX_LIMIT),
            },
        };
        let traces = self.ctx.store.list_traces(&caller.scope, &query).await?;
        Ok(pb::ListTracesResponse { traces: traces.iter().map(|t| trace_to_pb(t, &[], false)).collect() })
    }

    async fn get(&self, request: Request<pb::GetTraceRequest>) -> ApiResult<pb::Trace> {
        let caller = self.ctx.auth.authenticate(&request).await?;
        let req = request.get_ref();
        let (trace, stages) = self.ctx.store.get_trace(&caller.scope, &req.id).await?;
        Ok(trace_to_pb(&trace, &stages, req.include_payloads))
    }
}

impl TraceApi {
    async fn users(&self, request: Request<pb::ListUsersRequest>) -> ApiResult<pb::ListUsersResponse> {
        let caller = self.ctx.auth.authenticate(&request).await?;
        let users = self.ctx.store.list_users(&caller.scope, &request.get_ref().instance).await?;
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
}
