//! The admin gRPC API: one tonic service per resource, all behind API-key authentication.

pub mod access;
pub mod api_keys;
pub mod error;
pub mod instances;
pub mod messages;
pub mod nodes;
pub mod spec;
pub mod traces;

use crate::auth::Authenticator;
use crate::crypto::Keyring;
use crate::store::Store;
use std::sync::Arc;

/// What every service needs: the store, the master keys, the authenticator, and an HTTP
/// client for the channels' admin APIs (Evolution).
#[derive(Clone)]
pub struct ApiContext {
    pub store: Arc<dyn Store>,
    pub keyring: Arc<Keyring>,
    pub auth: Arc<Authenticator>,
    pub http: reqwest::Client,
    /// Long-lived streams (trace tails) end on it.
    pub stopping: crate::shutdown::Stopping,
}
