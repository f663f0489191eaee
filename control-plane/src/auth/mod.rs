//! API keys: their format, how a request proves one, and the bootstrap admin key.
//!
//! A key looks like `omni_<id>_<secret>`: the id is public (listings, revocation), and only the
//! SHA-256 of the whole key is stored.

use crate::api::error::{ApiError, ApiResult};
use crate::crypto::{hex, random_bytes, random_token, sha256_hex};
use crate::store::{ApiKeyRecord, Scope, Store, StoreError, now_millis};
use std::sync::Arc;
use tonic::Request;

/// `last_used_at` is refreshed at most this often, so reads do not become writes.
const TOUCH_INTERVAL_MS: i64 = 60_000;

/// Who is calling, as proven by their API key.
#[derive(Debug, Clone)]
pub struct Caller {
    pub key_id: String,
    pub scope: Scope,
}

impl Caller {
    pub fn require_admin(&self, what: &str) -> ApiResult<()> {
        if self.scope.is_admin() {
            Ok(())
        } else {
            Err(ApiError::PermissionDenied(format!("{what} needs an admin API key")))
        }
    }
}

/// A new random key and its public id.
pub fn generate_api_key() -> (String, String) {
    let id = hex(&random_bytes::<6>());
    let key = format!("omni_{id}_{}", random_token());
    (id, key)
}

/// The public id of a key: the `<id>` of `omni_<id>_<secret>`, or a hash prefix for keys an
/// operator chose in another format.
pub fn key_id_of(key: &str) -> String {
    match key.strip_prefix("omni_").and_then(|rest| rest.split_once('_')) {
        Some((id, _)) if !id.is_empty() && id.len() <= 32 => id.to_owned(),
        _ => format!("ext-{}", &sha256_hex(key)[..12]),
    }
}

pub struct Authenticator {
    store: Arc<dyn Store>,
}

impl Authenticator {
    pub fn new(store: Arc<dyn Store>) -> Authenticator {
        Authenticator { store }
    }

    pub async fn authenticate<T>(&self, request: &Request<T>) -> ApiResult<Caller> {
        let header = request
            .metadata()
            .get("authorization")
            .ok_or_else(|| ApiError::Unauthenticated("missing API key: send `authorization: Bearer <key>`".into()))?;
        let key = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| ApiError::Unauthenticated("authorization header must be `Bearer <key>`".into()))?;
        let record = self
            .store
            .find_api_key_by_hash(&sha256_hex(key))
            .await?
            .filter(|r| r.revoked_at.is_none())
            .ok_or_else(|| ApiError::Unauthenticated("invalid or revoked API key".into()))?;
        let now = now_millis();
        if record.last_used_at.is_none_or(|t| now - t >= TOUCH_INTERVAL_MS) {
            let store = self.store.clone();
            let id = record.id.clone();
            tokio::spawn(async move {
                if let Err(e) = store.touch_api_key(&id, now).await {
                    tracing::warn!(key_id = %id, error = %e, "could not record API key use");
                }
            });
        }
        Ok(Caller { key_id: record.id, scope: record.scope })
    }
}

/// What `ensure_bootstrap_key` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// The operator's `OMNI_BOOTSTRAP_API_KEY` is registered (or already was).
    Configured,
    /// Keys exist already; nothing to do.
    Existing,
    /// No key existed: this one was created and must be shown once.
    Generated(String),
}

/// Makes sure an admin can get in: registers the operator-supplied key, or creates the first
/// admin key when there is none at all.
pub async fn ensure_bootstrap_key(store: &dyn Store, configured: Option<&str>) -> Result<Bootstrap, StoreError> {
    let new_record = |id: String, key: &str| ApiKeyRecord {
        id,
        key_hash: sha256_hex(key),
        scope: Scope::Admin,
        description: "bootstrap admin key".to_owned(),
        created_at: now_millis(),
        last_used_at: None,
        revoked_at: None,
    };
    if let Some(key) = configured {
        if store.find_api_key_by_hash(&sha256_hex(key)).await?.is_none() {
            match store.create_api_key(&new_record(key_id_of(key), key)).await {
                Ok(()) | Err(StoreError::AlreadyExists(_)) => {}
                Err(e) => return Err(e),
            }
        }
        return Ok(Bootstrap::Configured);
    }
    if store.count_api_keys().await? > 0 {
        return Ok(Bootstrap::Existing);
    }
    let (id, key) = generate_api_key();
    store.create_api_key(&new_record(id, &key)).await?;
    Ok(Bootstrap::Generated(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_format() {
        let (id, key) = generate_api_key();
        assert_eq!(id.len(), 12);
        assert!(key.starts_with(&format!("omni_{id}_")));
        assert_eq!(key_id_of(&key), id);
        assert!(key_id_of("something-else").starts_with("ext-"));
        assert_ne!(generate_api_key().1, key);
    }
}
