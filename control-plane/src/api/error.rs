//! The one place where control-plane errors become gRPC status codes.

use crate::crypto::CryptoError;
use crate::evolution::EvolutionError;
use crate::store::StoreError;
use crate::sync::dispatch::DispatchError;
use thiserror::Error;
use tonic::Status;

#[derive(Debug, Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}; retry")]
    Aborted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// An action that may or may not have happened (a send whose result never came back).
    #[error("{0}")]
    OutcomeUnknown(String),
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error(transparent)]
    Evolution(#[from] EvolutionError),
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::InvalidArgument(message.into())
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        match error {
            StoreError::NotFound(what) => ApiError::NotFound(what),
            StoreError::AlreadyExists(what) => ApiError::AlreadyExists(what),
            StoreError::Conflict(what) => ApiError::Aborted(format!("{what} was changed concurrently")),
            // Whatever the caller's scope: the other instance is not named.
            StoreError::DiscordTokenInUse => ApiError::invalid(
                "this Discord bot token is already used by another instance (one bot can serve only one instance)",
            ),
            StoreError::Database(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)) => {
                ApiError::Unavailable("the database is unreachable".to_owned())
            }
            other => ApiError::Store(other),
        }
    }
}

impl From<DispatchError> for ApiError {
    fn from(error: DispatchError) -> ApiError {
        match error {
            DispatchError::NoNode => ApiError::Unavailable(error.to_string()),
            DispatchError::Timeout(..) => ApiError::OutcomeUnknown(error.to_string()),
        }
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Status {
        match error {
            ApiError::InvalidArgument(m) => Status::invalid_argument(m),
            ApiError::NotFound(what) => Status::not_found(format!("{what} not found")),
            ApiError::AlreadyExists(what) => Status::already_exists(format!("{what} already exists")),
            ApiError::Unauthenticated(m) => Status::unauthenticated(m),
            ApiError::PermissionDenied(m) => Status::permission_denied(m),
            ApiError::Aborted(m) => Status::aborted(format!("{m}; retry")),
            ApiError::Unavailable(m) => Status::unavailable(m),
            ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
            ApiError::OutcomeUnknown(m) => Status::deadline_exceeded(m),
            // Internal details go to the log, not to the caller.
            ApiError::Store(e) => {
                tracing::error!(error = %e, "store error");
                Status::internal("internal error (see the control plane's log)")
            }
            // Unreachable, overloaded or failing: worth retrying later.
            ApiError::Evolution(e @ EvolutionError::Unreachable { .. }) => Status::unavailable(e.to_string()),
            ApiError::Evolution(e @ EvolutionError::Refused { status: 429 | 500.., .. }) => {
                Status::unavailable(e.to_string())
            }
            ApiError::Evolution(e) => Status::failed_precondition(e.to_string()),
            ApiError::Crypto(e) => {
                tracing::error!(error = %e, "secret could not be opened");
                Status::internal("a stored secret could not be decrypted: is the right master key configured?")
            }
        }
    }
}
