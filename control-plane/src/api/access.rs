//! `omni.v1.AccessService`.

use super::ApiContext;
use super::error::{ApiError, ApiResult};
use super::spec::{action_from_pb, action_to_pb, timestamp};
use crate::store::AccessRuleRecord;
use omni_core::access::{decide, validate_pattern};
use omni_proto::v1::{self as pb, access_service_server::AccessService};
use tonic::{Request, Response, Status};

pub struct AccessApi {
    ctx: ApiContext,
}

fn rule_to_pb(rule: &AccessRuleRecord) -> pb::AccessRule {
    pb::AccessRule {
        id: rule.id,
        instance: rule.instance.clone(),
        pattern: rule.pattern.clone(),
        action: action_to_pb(rule.action) as i32,
        create_time: Some(timestamp(rule.created_at)),
    }
}

impl AccessApi {
    pub fn new(ctx: ApiContext) -> AccessApi {
        AccessApi { ctx }
    }

    async fn add(&self, request: Request<pb::AddAccessRuleRequest>) -> ApiResult<pb::AccessRule> {
        let caller = self.ctx.auth.authenticate(&request).await?;
        let req = request.into_inner();
        validate_pattern(&req.pattern).map_err(|e| ApiError::invalid(e.to_string()))?;
        let action = action_from_pb(req.action)?.ok_or_else(|| ApiError::invalid("action must be allow or block"))?;
        let rule = self.ctx.store.put_access_rule(&caller.scope, &req.instance, &req.pattern, action).await?;
        tracing::info!(instance = %req.instance, rule_id = rule.id, action = action.as_str(), key_id = %caller.key_id, "access rule set");
        Ok(rule_to_pb(&rule))
    }

    async fn list(&self, request: Request<pb::ListAccessRulesRequest>) -> ApiResult<pb::ListAccessRulesResponse> {
        let caller = self.ctx.auth.authenticate(&request).await?;
        let name = &request.get_ref().instance;
        let instance = self.ctx.store.get_instance(&caller.scope, name).await?;
        let rules = self.ctx.store.list_access_rules(&caller.scope, name).await?;
        Ok(pb::ListAccessRulesResponse {
            rules: rules.iter().map(rule_to_pb).collect(),
            default_access: action_to_pb(instance.spec.default_access) as i32,
        })
    }

    async fn remove(&self, request: Request<pb::RemoveAccessRuleRequest>) -> ApiResult<pb::RemoveAccessRuleResponse> {
        let caller = self.ctx.auth.authenticate(&request).await?;
        let req = request.get_ref();
        self.ctx.store.remove_access_rule(&caller.scope, &req.instance, req.id).await?;
        tracing::info!(instance = %req.instance, rule_id = req.id, key_id = %caller.key_id, "access rule removed");
        Ok(pb::RemoveAccessRuleResponse {})
    }

    async fn check(&self, request: Request<pb::CheckAccessRequest>) -> ApiResult<pb::CheckAccessResponse> {
        let caller = self.ctx.auth.authenticate(&request).await?;
        let req = request.get_ref();
        if req.identity.trim().is_empty() {
            return Err(ApiError::invalid("identity is required"));
        }
        let instance = self.ctx.store.get_instance(&caller.scope, &req.instance).await?;
        let rules = self.ctx.store.list_access_rules(&caller.scope, &req.instance).await?;
        let (index, action) = decide(
            rules.iter().map(|r| (r.pattern.as_str(), r.action)),
            instance.spec.default_access,
            req.identity.trim(),
        );
        Ok(pb::CheckAccessResponse {
            action: action_to_pb(action) as i32,
            matched_rule: index.map(|i| rule_to_pb(&rules[i])),
        })
    }
}

#[tonic::async_trait]
impl AccessService for AccessApi {
    async fn add_access_rule(
        &self,
        request: Request<pb::AddAccessRuleRequest>,
    ) -> Result<Response<pb::AccessRule>, Status> {
        Ok(Response::new(self.add(request).await?))
    }

    async fn list_access_rules(
        &self,
        request: Request<pb::ListAccessRulesRequest>,
    ) -> Result<Response<pb::ListAccessRulesResponse>, Status> {
        Ok(Response::new(self.list(request).await?))
    }

    async fn remove_access_rule(
        &self,
        request: Request<pb::RemoveAccessRuleRequest>,
    ) -> Result<Response<pb::RemoveAccessRuleResponse>, Status> {
        Ok(Response::new(self.remove(request).await?))
    }

    async fn check_access(
        &self,
        request: Request<pb::CheckAccessRequest>,
    ) -> Result<Response<pb::CheckAccessResponse>, Status> {
        Ok(Response::new(self.check(request).await?))
    }
}
