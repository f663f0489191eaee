//! `omni.v1.InstanceService`.

use super::ApiContext;
use super::error::{ApiError, ApiResult};
use super::spec::{self, Secrets};
use crate::crypto::random_token;
use crate::evolution::{Connect, Evolution, EvolutionError, Webhook};
use crate::store::{InstanceRecord, ListInstances, Scope, StoreError, now_millis};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use omni_core::kinds::Channel;
use omni_core::names::validate_instance_name;
use omni_proto::v1::{self as pb, instance_service_server::InstanceService};
use tonic::{Request, Response, Status};

const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;
/// Optimistic-concurrency retries of one update before giving up with ABORTED.
const UPDATE_ATTEMPTS: usize = 5;

pub struct InstanceApi {
    ctx: ApiContext,
}

impl InstanceApi {
    pub fn new(ctx: ApiContext) -> InstanceApi {
        InstanceApi { ctx }
    }

    async fn create(&self, request: Request<pb::CreateInstanceRequest>) -> ApiResult<pb::CreateInstanceResponse> {
        let caller = self.ctx.auth.authenticate(&request).await?;
        let req = request.into_inner();
        let (provision, public_url) = (req.provision, req.public_url.trim().trim_end_matches('/').to_owned());
        let src = req.instance.ok_or_else(|| ApiError::invalid("instance is required"))?;
        validate_instance_name(&src.name).map_err(|e| ApiError::invalid(e.to_string()))?;
        // Checked before the database is touched, so the answer says nothing about other tenants.
        if !caller.scope.covers(&src.name) {
            return Err(ApiError::PermissionDenied(format!(
                "this API key may not create instance {:?} (outside its instance patterns)",
                src.name
            )));
        }
        let channel = spec::channel_from_pb(src.channel)?;
        let id = uuid::Uuid::new_v4().to_string();
        let secrets = Secrets { keyring: &self.ctx.keyring, instance_id: &id };
        let webhook_token = random_token();
        let sealed_token = secrets.seal("webhook_token", &webhook_token).expect("token is not empty");
        let mut spec = spec::default_spec(channel, sealed_token);
        let mut active = true;
        for path in spec::UPDATABLE_PATHS {
            spec::apply(path, &src, channel, &mut active, &mut spec, &secrets)?;
        }
        spec::normalize_and_validate(&src.name, channel, &mut spec)?;
        // One bot, one instance: the store refuses a token another instance has.
        let discord_token_sha256 = spec::discord_token_sha256(&src, &spec);
        if provision {
            if channel != Channel::Whatsapp {
                return Err(ApiError::invalid("--provision is for WhatsApp instances (Evolution)"));
            }
            spec::validate_http_url("public url", &public_url)?;
        }
        let now = now_millis();
        let record = InstanceRecord {
            id,
            name: src.name,
            channel,
            active,
            spec,
            created_at: now,
            updated_at: now,
            revision: 0,
            discord_token_sha256,
        };
        let created = if provision {
            self.create_provisioned(record, &public_url).await?
        } else {
            self.ctx.store.create_instance(&record).await?
        };
        tracing::info!(instance = %created.name, channel = %channel, revision = created.revision, provisioned = provision, key_id = %caller.key_id, "instance created");
        Ok(pb::CreateInstanceResponse {
            instance: Some(spec::instance_to_pb(&created, &self.ctx.keyring)),
            webhook_token,
        })
    }

    async fn get(&self, request: Request<pb::GetInstanceRequest>) -> ApiResult<pb::Instance> {
        let caller = self.ctx.auth.authenticate(&request).await?;
        let record = self.ctx.store.get_instance(&caller.scope, &request.get_ref().name).await?;
        Ok(spec::instance_to_pb(&record, &self.ctx.keyring))
    }

    async fn list(&self, request: Request<pb::ListInstancesRequest>) -> ApiResult<pb::ListInstancesResponse> {
        let caller = self.ctx.auth.authenticate(&request).await?;
        let req = request.into_inner();
        let limit = match req.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let after = if req.page_token.is_empty() { None } else { Some(decode_page_token(&req.page_token)?) };
        let channel = match req.channel {
            0 => None,
            other => Some(spec::channel_from_pb(other)?),
        };
        let records = self.ctx.store.list_instances(&caller.scope, &ListInstances { after, limit, channel }).await?;
        let next_page_token = match records.last() {
            Some(last) if records.len() as u32 == limit => URL_SAFE_NO_PAD.encode(&last.name),
            _ => String::new(),
        };
        Ok(pb::ListInstancesResponse {
            instances: records.iter().map(|r| spec::instance_to_pb(r, &self.ctx.keyring)).collect(),
            next_page_token,
        })
    }

    async fn update(&self, request: Request<pb::UpdateInstanceRequest>) -> ApiResult<pb::Instance> {
        let caller = self.ctx.auth.authenticate(&request).await?;
        let req = request.into_inner();
        let src = req.instance.ok_or_else(|| ApiError::invalid("instance is required"))?;
        let mask = req.update_mask.unwrap_or_default();
        if mask.paths.is_empty() {
            return Err(ApiError::invalid("update_mask names no field to change"));
        }
        let mut paths = Vec::new();
        for path in &mask.paths {
            paths.extend(spec::expand_path(path)?);
        }
        for attempt in 1..=UPDATE_ATTEMPTS {
            let current = self.ctx.store.get_instance(&caller.scope, &src.name).await?;
            let secrets = Secrets { keyring: &self.ctx.keyring, instance_id: &current.id };
            let mut spec = current.spec.clone();
            let mut active = current.active;
            for path in &paths {
                spec::apply(path, &src, current.channel, &mut active, &mut spec, &secrets)?;
            }
            spec::normalize_and_validate(&current.name, current.channel, &mut spec)?;
            spec::check_keys_follow_targets(&current.spec, &spec, &paths)?;
            // A new token takes a new fingerprint, which the store refuses if another instance
            // has it; otherwise the instance keeps its own.
            let discord_token_sha256 = if paths.contains(&"discord.token") {
                spec::discord_token_sha256(&src, &spec)
            } else {
                current.discord_token_sha256.clone()
            };
            if spec.evolution.url != current.spec.evolution.url
                || spec.evolution.instance_name != current.spec.evolution.instance_name
            {
                // The token belongs to the instance it came from.
                spec.evolution.instance_token = None;
            }
            let update = self.ctx.store.update_instance(
                &caller.scope,
                &current.name,
                current.revision,
                active,
                &spec,
                discord_token_sha256.as_deref(),
            );
            match update.await {
                Ok(updated) => {
                    tracing::info!(instance = %updated.name, revision = updated.revision, fields = ?paths, key_id = %caller.key_id, "instance updated");
                    return Ok(spec::instance_to_pb(&updated, &self.ctx.keyring));
                }
                Err(StoreError::Conflict(_)) if attempt < UPDATE_ATTEMPTS => continue,
                Err(e) => return Err(e.into()),
            }
        }
        unreachable!("the last attempt returns")
    }

    async fn delete(&self, request: Request<pb::DeleteInstanceRequest>) -> ApiResult<pb::DeleteInstanceResponse> {
        let caller = self.ctx.auth.authenticate(&request).await?;
        let req = request.get_ref();
        if req.deprovision {
            // Evolution first: if it refuses, the instance stays here and can be retried.
            let record = self.ctx.store.get_instance(&caller.scope, &req.name).await?;
            let (evolution, name) = self.evolution_of(&record, false)?;
            match evolution.delete(&name).await {
                Ok(()) | Err(EvolutionError::Refused { status: 404, .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.ctx.store.delete_instance(&caller.scope, &req.name).await?;
        tracing::info!(instance = %req.name, deprovisioned = req.deprovision, key_id = %caller.key_id, "instance deleted");
        Ok(pb::DeleteInstanceResponse {})
    }

    /// Creates the instance on its Evolution server (or rewires an existing one there), then
    /// here. If the second step fails, an instance created by the first is deleted again.
    async fn create_provisioned(&self, mut record: InstanceRecord, public_url: &str) -> ApiResult<InstanceRecord> {
        // Taken names fail before Evolution is touched.
        match self.ctx.store.get_instance(&Scope::Admin, &record.name).await {
            Err(StoreError::NotFound(_)) => {}
            Ok(_) => return Err(ApiError::AlreadyExists(format!("instance {:?}", record.name))),
            Err(e) => return Err(e.into()),
        }
        let secrets = Secrets { keyring: &self.ctx.keyring, instance_id: &record.id };
        let token = secrets.open("webhook_token", &record.spec.webhook_token)?;
        let url = format!("{public_url}{}", spec::webhook_path(record.channel, &record.name));
        let webhook = Webhook { url: &url, token: &token };
        let (evolution, name) = self.evolution_of(&record, true)?;
        let created_there = if evolution.exists(&name).await? {
            evolution.set_webhook(&name, &webhook).await?;
            false
        } else {
            let instance_token = evolution.create(&name, &webhook).await?;
            record.spec.evolution.instance_token = secrets.seal("evolution.instance_token", &instance_token);
            true
        };
        match self.ctx.store.create_instance(&record).await {
            Ok(created) => Ok(created),
            Err(e) => {
                if created_there && let Err(undo) = evolution.delete(&name).await {
                    tracing::error!(instance = %record.name, error = %undo, "could not delete the Evolution instance created for a failed create");
                }
                Err(e.into())
            }
        }
    }

    /// A client of the instance's Evolution server, and the instance's name there. With `server`
    /// the configured key is used (the server's global key, to create instances); otherwise the
    /// instance's own token when the hub has one.
    fn evolution_of<'a>(&'a self, record: &InstanceRecord, server: bool) -> ApiResult<(Evolution<'a>, String)> {
        if record.channel != Channel::Whatsapp {
            return Err(ApiError::invalid(format!("{} is a {} instance, not WhatsApp", record.name, record.channel)));
        }
        let secrets = Secrets { keyring: &self.ctx.keyring, instance_id: &record.id };
        let key = match (server, &record.spec.evolution.key) {
            (true, Some(sealed)) => Some(secrets.open("evolution.key", sealed)?),
            (true, None) => None,
            (false, _) => spec::evolution_instance_key(&secrets, &record.spec.evolution)?,
        };
        let Some(key) = key else {
            return Err(ApiError::invalid("the instance has no Evolution key"));
        };
        let evolution = Evolution::new(&self.ctx.http, &record.spec.evolution.url, key);
        Ok((evolution, record.spec.evolution.instance_name.clone()))
    }

    async fn status(&self, request: Request<pb::GetInstanceStatusRequest>) -> ApiResult<pb::InstanceStatus> {
        let caller = self.ctx.auth.authenticate(&request).await?;
        let record = self.ctx.store.get_instance(&caller.scope, &request.get_ref().name).await?;
        let channel = spec::channel_to_pb(record.channel) as i32;
        let status = match record.channel {
            Channel::Whatsapp => self.whatsapp_status(record).await?,
            Channel::Discord => self.discord_status(record).await?,
            // Slack calls the hub's webhook; there is no connection to report on.
            Channel::Slack => pb::InstanceStatus { name: record.name, ..Default::default() },
        };
        Ok(pb::InstanceStatus { channel, ..status })
    }

    async fn whatsapp_status(&self, record: InstanceRecord) -> ApiResult<pb::InstanceStatus> {
        let (evolution, name) = self.evolution_of(&record, false)?;
        let (state, state_error) = match evolution.connection_state(&name).await {
            Ok(state) => (state, String::new()),
            Err(e) => (String::new(), e.to_string()),
        };
        let last = self.ctx.store.instance_connection(&record.id).await?.unwrap_or_default();
        Ok(pb::InstanceStatus {
            name: record.name,
            state,
            state_error,
            last_connection: (last.connection_at > 0).then(|| pb::ConnectionEvent {
                state: last.state,
                status_reason: last.status_reason as i32,
                wuid: last.wuid,
                profile_name: last.profile_name,
                time: Some(spec::timestamp(last.connection_at)),
            }),
            last_qr_time: (last.qr_at > 0).then(|| spec::timestamp(last.qr_at)),
            ..Default::default()
        })
    }

    async fn discord_status(&self, record: InstanceRecord) -> ApiResult<pb::InstanceStatus> {
        let gateway = self.ctx.store.gateway_status(&record.id).await?.unwrap_or_default();
        // An expired lease binds nobody: the bot is not running anywhere for sure.
        let leased = !gateway.lease_node_id.is_empty() && gateway.lease_expires_at > now_millis();
        // An error about an older config no longer keeps the bot down (nodes try the update).
        let stopped = gateway.state == "error" && gateway.revision >= record.revision;
        Ok(pb::InstanceStatus {
            name: record.name,
            node_id: if leased { gateway.lease_node_id } else { String::new() },
            lease_expire_time: leased.then(|| spec::timestamp(gateway.lease_expires_at)),
            gateway_error: if stopped { gateway.error } else { String::new() },
            gateway_state: gateway.state,
            gateway_node_id: gateway.node_id,
            gateway_time: (gateway.at > 0).then(|| spec::timestamp(gateway.at)),
            ..Default::default()
        })
    }

    async fn qr(&self, request: Request<pb::GetInstanceQrRequest>) -> ApiResult<pb::InstanceQr> {
        let caller = self.ctx.auth.authenticate(&request).await?;
        let record = self.ctx.store.get_instance(&caller.scope, &request.get_ref().name).await?;
        let (evolution, name) = self.evolution_of(&record, false)?;
        Ok(match evolution.connect(&name).await? {
            Connect::AlreadyConnected => pb::InstanceQr { already_connected: true, ..Default::default() },
            Connect::Qr { code, png_base64, pairing_code } => {
                pb::InstanceQr { already_connected: false, code, png_base64, pairing_code }
            }
        })
    }
}

fn decode_page_token(token: &str) -> ApiResult<String> {
    URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .filter(|name| validate_instance_name(name).is_ok())
        .ok_or_else(|| ApiError::invalid("page_token is not one this API issued"))
}

#[tonic::async_trait]
impl InstanceService for InstanceApi {
    async fn create_instance(
        &self,
        request: Request<pb::CreateInstanceRequest>,
    ) -> Result<Response<pb::CreateInstanceResponse>, Status> {
        Ok(Response::new(self.create(request).await?))
    }

    async fn get_instance(&self, request: Request<pb::GetInstanceRequest>) -> Result<Response<pb::Instance>, Status> {
        Ok(Response::new(self.get(request).await?))
    }

    async fn list_instances(
        &self,
        request: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
        Ok(Response::new(self.list(request).await?))
    }

    async fn update_instance(
        &self,
        request: Request<pb::UpdateInstanceRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        Ok(Response::new(self.update(request).await?))
    }

    async fn delete_instance(
        &self,
        request: Request<pb::DeleteInstanceRequest>,
    ) -> Result<Response<pb::DeleteInstanceResponse>, Status> {
        Ok(Response::new(self.delete(request).await?))
    }

    async fn get_instance_status(
        &self,
        request: Request<pb::GetInstanceStatusRequest>,
    ) -> Result<Response<pb::InstanceStatus>, Status> {
        Ok(Response::new(self.status(request).await?))
    }

    async fn get_instance_qr(
        &self,
        request: Request<pb::GetInstanceQrRequest>,
    ) -> Result<Response<pb::InstanceQr>, Status> {
        Ok(Response::new(self.qr(request).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Authenticator;
    use crate::crypto::{Keyring, sha256_hex};
    use crate::store::ApiKeyRecord;
    use omni_proto::FieldMask;
    use std::sync::Arc;

    const ADMIN_KEY: &str = "omni_admin_secret";
    const BETA_KEY: &str = "omni_beta_secret";
    const SHARED: &str = "shared-bot-token-0123456789";
    const TAKEN: &str = "this Discord bot token is already used by another instance";

    async fn api(dir: &std::path::Path) -> InstanceApi {
        let store = crate::store::connect(&format!("sqlite://{}", dir.join("omni.db").display())).await.unwrap();
        for (id, key, scope) in
            [("admin", ADMIN_KEY, Scope::Admin), ("beta", BETA_KEY, Scope::Instances(vec!["beta-*".into()]))]
        {
            let record = ApiKeyRecord {
                id: id.into(),
                key_hash: sha256_hex(key),
                scope,
                description: String::new(),
                created_at: now_millis(),
                last_used_at: None,
                revoked_at: None,
            };
            store.create_api_key(&record).await.unwrap();
        }
        InstanceApi::new(ApiContext {
            auth: Arc::new(Authenticator::new(store.clone())),
            store,
            keyring: Arc::new(Keyring::parse(&Keyring::generate_encoded()).unwrap()),
            stopping: crate::shutdown::Stopping::channel().1,
            // Never used here: nothing in these tests talks to Evolution.
            http: {
                let _ = rustls::crypto::ring::default_provider().install_default();
                reqwest::Client::new()
            },
        })
    }

    fn request<T>(key: &str, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
        request
    }

    fn bot(name: &str, token: &str) -> pb::Instance {
        pb::Instance {
            name: name.into(),
            channel: pb::Channel::Discord as i32,
            agent: Some(pb::AgentSettings { url: "http://agent:1".into(), ..Default::default() }),
            discord: Some(pb::DiscordSettings { token: token.into(), ..Default::default() }),
            ..Default::default()
        }
    }

    async fn create(api: &InstanceApi, key: &str, name: &str, token: &str) -> ApiResult<pb::CreateInstanceResponse> {
        api.create(request(key, pb::CreateInstanceRequest { instance: Some(bot(name, token)), ..Default::default() }))
            .await
    }

    async fn update(api: &InstanceApi, key: &str, instance: pb::Instance, paths: &[&str]) -> ApiResult<pb::Instance> {
        let paths = paths.iter().map(|p| p.to_string()).collect();
        api.update(request(
            key,
            pb::UpdateInstanceRequest { instance: Some(instance), update_mask: Some(FieldMask { paths }) },
        ))
        .await
    }

    /// Refused by the store's unique index, as INVALID_ARGUMENT that names no instance.
    fn refused(result: ApiResult<impl std::fmt::Debug>) {
        let error = result.unwrap_err();
        assert!(matches!(error, ApiError::InvalidArgument(_)), "{error:?}");
        let status = Status::from(error);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(TAKEN), "{status:?}");
        assert!(!status.message().contains("acme"), "names the other instance: {status:?}");
    }

    async fn fingerprint_of(api: &InstanceApi, name: &str) -> Option<String> {
        api.ctx.store.get_instance(&Scope::Admin, name).await.unwrap().discord_token_sha256
    }

    async fn token_of(api: &InstanceApi, name: &str) -> String {
        let record = api.ctx.store.get_instance(&Scope::Admin, name).await.unwrap();
        let secrets = Secrets { keyring: &api.ctx.keyring, instance_id: &record.id };
        secrets.open("discord.token", record.spec.discord.token.as_ref().unwrap()).unwrap()
    }

    #[tokio::test]
    async fn a_discord_token_serves_one_instance() {
        let dir = tempfile::tempdir().unwrap();
        let api = api(dir.path()).await;
        create(&api, ADMIN_KEY, "acme-bot", SHARED).await.unwrap();
        assert_eq!(fingerprint_of(&api, "acme-bot").await, Some(sha256_hex(SHARED)));

        // Another tenant's key, which cannot see acme-bot, is refused all the same, on create
        // and on update, and told nothing about which instance has the token.
        refused(create(&api, BETA_KEY, "beta-bot", SHARED).await);
        refused(create(&api, BETA_KEY, "beta-bot", &format!(" {SHARED}\n")).await);
        create(&api, BETA_KEY, "beta-bot", "beta-bot-token-0123456789").await.unwrap();
        refused(update(&api, BETA_KEY, bot("beta-bot", SHARED), &["discord.token"]).await);
        refused(update(&api, BETA_KEY, bot("beta-bot", SHARED), &["discord"]).await);
        assert_eq!(token_of(&api, "beta-bot").await, "beta-bot-token-0123456789", "unchanged");

        // Updates that leave the token alone keep its fingerprint; an instance may keep (or
        // set again, surrounding whitespace and all) its own token.
        update(&api, BETA_KEY, bot("beta-bot", SHARED), &["agent.url"]).await.unwrap();
        assert_eq!(fingerprint_of(&api, "beta-bot").await, Some(sha256_hex("beta-bot-token-0123456789")));
        update(&api, ADMIN_KEY, bot("acme-bot", &format!("{SHARED} ")), &["discord.token"]).await.unwrap();
        assert_eq!(fingerprint_of(&api, "acme-bot").await, Some(sha256_hex(SHARED)));

        // A stopped instance still holds its token (starting it again must not run it twice).
        let stopped = pb::Instance { active: Some(false), ..bot("acme-bot", SHARED) };
        update(&api, ADMIN_KEY, stopped, &["active"]).await.unwrap();
        refused(update(&api, ADMIN_KEY, bot("beta-bot", SHARED), &["discord.token"]).await);

        // Creating a name that is taken says so, rather than that the token is.
        let again = create(&api, ADMIN_KEY, "acme-bot", SHARED).await.unwrap_err();
        assert!(matches!(again, ApiError::AlreadyExists(_)), "{again:?}");

        // Once its instance is gone, the token is free; the token an instance changes from
        // is free at once.
        api.ctx.store.delete_instance(&Scope::Admin, "acme-bot").await.unwrap();
        update(&api, BETA_KEY, bot("beta-bot", SHARED), &["discord.token"]).await.unwrap();
        assert_eq!(token_of(&api, "beta-bot").await, SHARED);
        assert_eq!(fingerprint_of(&api, "beta-bot").await, Some(sha256_hex(SHARED)));
        refused(create(&api, ADMIN_KEY, "acme-bot", SHARED).await);
        create(&api, ADMIN_KEY, "acme-bot", "beta-bot-token-0123456789").await.unwrap();

        // Other channels have no fingerprint, so they never collide.
        for name in ["acme-slack", "acme-slack-2"] {
            let slack = pb::Instance {
                name: name.into(),
                channel: pb::Channel::Slack as i32,
                agent: Some(pb::AgentSettings { url: "http://agent:1".into(), ..Default::default() }),
                slack: Some(pb::SlackSettings {
                    bot_token: "xoxb-slack-token".into(),
                    signing_secret: "signing-secret".into(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            api.create(request(ADMIN_KEY, pb::CreateInstanceRequest { instance: Some(slack), ..Default::default() }))
                .await
                .unwrap();
            assert_eq!(fingerprint_of(&api, name).await, None);
        }
    }
}
