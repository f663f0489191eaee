//! `omni.v1.MessageService`: messages the hub initiates. The control plane checks the request
//! and the caller's scope, then a connected node that has the instance's config sends it
//! (see `sync::dispatch`) and records its trace.

use super::ApiContext;
use super::error::{ApiError, ApiResult};
use super::spec::validate_http_url;
use crate::auth::Caller;
use crate::sync::dispatch::Dispatcher;
use omni_proto::v1::{self as pb, message_service_server::MessageService, send_media_request};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// How long a node may take to send (every chunk, with Evolution's own timeouts and retries).
const SEND_TIMEOUT: Duration = Duration::from_secs(120);
pub const MAX_MEDIA_BYTES: usize = 12 * 1024 * 1024;
const MAX_TEXT_CHARS: usize = 100_000;
const MEDIA_TYPES: [&str; 4] = ["image", "video", "audio", "document"];

pub struct MessageApi {
    ctx: ApiContext,
    dispatcher: Arc<Dispatcher>,
}

use omni_core::kinds::media_kind;

impl MessageApi {
    pub fn new(ctx: ApiContext, dispatcher: Arc<Dispatcher>) -> MessageApi {
        MessageApi { ctx, dispatcher }
    }

    async fn send(
        &self,
        caller: &Caller,
        instance: &str,
        to: &str,
        text: String,
        media: Option<pb::OutboundMedia>,
    ) -> ApiResult<pb::SendResponse> {
        let record = self.ctx.store.get_instance(&caller.scope, instance).await?;
        if !record.active {
            return Err(ApiError::FailedPrecondition(format!("instance {instance} is inactive")));
        }
        let to = to.trim();
        if to.is_empty() || to.len() > 256 {
            return Err(ApiError::invalid("to is required: a phone number, JID or channel id"));
        }
        if text.chars().count() > MAX_TEXT_CHARS {
            return Err(ApiError::invalid(format!("the text is longer than {MAX_TEXT_CHARS} characters")));
        }
        let trace_id = omni_core::names::new_trace_id();
        let command = pb::SendCommand {
            id: uuid::Uuid::new_v4().to_string(),
            instance_id: record.id.clone(),
            instance: record.name.clone(),
            to: to.to_owned(),
            text,
            media,
            trace_id: trace_id.clone(),
        };
        let (node_id, result) = self.dispatcher.send(command, record.revision, SEND_TIMEOUT).await?;
        if !result.ok {
            return Err(if result.outcome_unknown {
                ApiError::OutcomeUnknown(result.error)
            } else {
                ApiError::FailedPrecondition(result.error)
            });
        }
        tracing::info!(instance, trace_id = %trace_id, node_id = %node_id, chunks = result.message_ids.len(), key_id = %caller.key_id, "message sent");
        Ok(pb::SendResponse { trace_id, message_ids: result.message_ids, node_id })
    }

    async fn send_text(&self, request: Request<pb::SendTextRequest>) -> ApiResult<pb::SendResponse> {
        let caller = self.ctx.auth.authenticate(&request).await?;
        let req = request.into_inner();
        if req.text.trim().is_empty() {
            return Err(ApiError::invalid("text is required"));
        }
        self.send(&caller, &req.instance, &req.to, req.text, None).await
    }

    async fn send_media(&self, request: Request<pb::SendMediaRequest>) -> ApiResult<pb::SendResponse> {
        let caller = self.ctx.auth.authenticate(&request).await?;
        let req = request.into_inner();
        let (url, data) = match req.source {
            Some(send_media_request::Source::Url(url)) => {
                validate_http_url("media url", &url)?;
                (url, Vec::new())
            }
            Some(send_media_request::Source::Data(data)) if !data.is_empty() => {
                if data.len() > MAX_MEDIA_BYTES {
                    return Err(ApiError::invalid(format!("media is larger than {MAX_MEDIA_BYTES} bytes")));
                }
                (String::new(), data)
            }
            _ => return Err(ApiError::invalid("media needs a url or data")),
        };
        let media_type = match req.media_type.trim() {
            "" => media_kind(&req.mime_type).to_owned(),
            given if MEDIA_TYPES.contains(&given) => given.to_owned(),
            other => {
                return Err(ApiError::invalid(format!("media type {other:?}: use image, video, audio or document")));
            }
        };
        let media = pb::OutboundMedia {
            url,
            data,
            media_type,
            mime_type: req.mime_type.trim().to_owned(),
            file_name: req.file_name.trim().to_owned(),
        };
        self.send(&caller, &req.instance, &req.to, req.caption, Some(media)).await
    }
}

#[tonic::async_trait]
impl MessageService for MessageApi {
    async fn send_text(&self, request: Request<pb::SendTextRequest>) -> Result<Response<pb::SendResponse>, Status> {
        Ok(Response::new(MessageApi::send_text(self, request).await?))
    }

    async fn send_media(&self, request: Request<pb::SendMediaRequest>) -> Result<Response<pb::SendResponse>, Status> {
        Ok(Response::new(MessageApi::send_media(self, request).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_follow_mime_types() {
        assert_eq!(media_kind("image/png"), "image");
        assert_eq!(media_kind("application/pdf"), "document");
        assert_eq!(media_kind(""), "document");
    }
}
