//! `omni.v1.NodeService`: the data-plane registry, for admins.

use super::ApiContext;
use super::error::ApiResult;
use super::spec::timestamp;
use crate::store::{NodeRecord, now_millis};
use omni_proto::v1::{self as pb, node_service_server::NodeService};
use tonic::{Request, Response, Status};

/// A connected node silent for longer than this is reported as gone (its control plane may
/// have died without recording the disconnect).
pub const NODE_GONE_AFTER_MS: i64 = 45_000;

pub struct NodeApi {
    ctx: ApiContext,
}

pub fn node_status(node: &NodeRecord, now: i64) -> &'static str {
    if !node.connected {
        "disconnected"
    } else if now - node.last_seen_at > NODE_GONE_AFTER_MS {
        "gone"
    } else {
        "connected"
    }
}

impl NodeApi {
    pub fn new(ctx: ApiContext) -> NodeApi {
        NodeApi { ctx }
    }

    async fn list(&self, request: Request<pb::ListNodesRequest>) -> ApiResult<pb::ListNodesResponse> {
        let caller = self.ctx.auth.authenticate(&request).await?;
        caller.require_admin("listing nodes")?;
        let nodes = self.ctx.store.list_nodes().await?;
        let head_revision = self.ctx.store.config_revision().await?;
        let now = now_millis();
        Ok(pb::ListNodesResponse {
            nodes: nodes
                .iter()
                .map(|n| pb::Node {
                    id: n.id.clone(),
                    address: n.address.clone(),
                    version: n.version.clone(),
                    applied_revision: n.applied_revision,
                    first_seen_time: Some(timestamp(n.first_seen_at)),
                    last_seen_time: Some(timestamp(n.last_seen_at)),
                    status: node_status(n, now).to_owned(),
                    last_error: n.last_error.clone(),
                })
                .collect(),
            head_revision,
        })
    }
}

#[tonic::async_trait]
impl NodeService for NodeApi {
    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        Ok(Response::new(self.list(request).await?))
    }
}
