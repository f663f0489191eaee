//! Omni's control plane: owns tenant configuration, API keys and traces in Postgres or
//! SQLite, and serves them over gRPC to omnictl, other services and data-plane nodes.

pub mod api;
pub mod auth;
pub mod evolution;
pub use omni_core::crypto;
pub mod metrics;
pub mod retention;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod sync;
