//! `omni.v1.ApiKeyService`. Admin keys only.

use super::ApiContext;
use super::error::{ApiError, ApiResult};
use super::spec::timestamp;
use crate::auth::generate_api_key;
use crate::crypto::sha256_hex;
use crate::store::{ApiKeyRecord, Scope, now_millis};
use omni_core::names::validate_instance_pattern;
use omni_proto::v1::{self as pb, api_key_service_server::ApiKeyService};
use tonic::{Request, Response, Status};

const MAX_DESCRIPTION: usize = 256;
const MAX_PATTERNS: usize = 64;

pub struct ApiKeyApi {
    ctx: ApiContext,
}

fn key_to_pb(key: &ApiKeyRecord) -> pb::ApiKey {
    let (admin, instance_patterns) = match &key.scope {
        Scope::Admin => (true, Vec::new()),
        Scope::Instances(patterns) => (false, patterns.clone()),
    };
    pb::ApiKey {
        id: key.id.clone(),
        admin,
        instance_patterns,
        description: key.description.clone(),
        create_time: Some(timestamp(key.created_at)),
        last_used_time: key.last_used_at.map(timestamp),
        revoke_time: key.revoked_at.map(timestamp),
    }
}

impl ApiKeyApi {
    pub fn new(ctx: ApiContext) -> ApiKeyApi {
        ApiKeyApi { ctx }
    }

    async fn create(&self, request: Request<pb::CreateApiKeyRequest>) -> ApiResult<pb::CreateApiKeyResponse> {
        let caller = self.ctx.auth.authenticate(&request).await?;
        caller.require_admin("creating API keys")?;
        let req = request.into_inner();
        let scope = match (req.admin, req.instance_patterns.is_empty()) {
            (true, true) => Scope::Admin,
            (false, false) => {
                if req.instance_patterns.len() > MAX_PATTERNS {
                    return Err(ApiError::invalid(format!("at most {MAX_PATTERNS} instance patterns")));
                }
                for pattern in &req.instance_patterns {
                    validate_instance_pattern(pattern).map_err(|e| ApiError::invalid(e.to_string()))?;
                }
                Scope::Instances(req.instance_patterns)
            }
            _ => {
                return Err(ApiError::invalid("give exactly one of: admin, or a list of instance patterns"));
            }
        };
        if req.description.chars().count() > MAX_DESCRIPTION {
            return Err(ApiError::invalid(format!("description is longer than {MAX_DESCRIPTION} characters")));
        }
        let (id, key) = generate_api_key();
        let record = ApiKeyRecord {
            id,
            key_hash: sha256_hex(&key),
            scope,
            description: req.description,
            created_at: now_millis(),
            last_used_at: None,
            revoked_at: None,
        };
        self.ctx.store.create_api_key(&record).await?;
        tracing::info!(new_key_id = %record.id, admin = record.scope.is_admin(), key_id = %caller.key_id, "API key created");
        Ok(pb::CreateApiKeyResponse { api_key: Some(key_to_pb(&record)), key })
    }

    async fn list(&self, request: Request<pb::ListApiKeysRequest>) -> ApiResult<pb::ListApiKeysResponse> {
        let caller = self.ctx.auth.authenticate(&request).await?;
        caller.require_admin("listing API keys")?;
        let keys = self.ctx.store.list_api_keys().await?;
        Ok(pb::ListApiKeysResponse { api_keys: keys.iter().map(key_to_pb).collect() })
    }

    async fn revoke(&self, request: Request<pb::RevokeApiKeyRequest>) -> ApiResult<pb::ApiKey> {
        let caller = self.ctx.auth.authenticate(&request).await?;
        caller.require_admin("revoking API keys")?;
        let id = &request.get_ref().id;
        let record = self.ctx.store.revoke_api_key(id, now_millis()).await?;
        tracing::info!(revoked_key_id = %id, key_id = %caller.key_id, "API key revoked");
        Ok(key_to_pb(&record))
    }
}

#[tonic::async_trait]
impl ApiKeyService for ApiKeyApi {
    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        Ok(Response::new(self.create(request).await?))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        Ok(Response::new(self.list(request).await?))
    }

    async fn revoke_api_key(&self, request: Request<pb::RevokeApiKeyRequest>) -> Result<Response<pb::ApiKey>, Status> {
        Ok(Response::new(self.revoke(request).await?))
    }
}
