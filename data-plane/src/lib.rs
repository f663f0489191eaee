//! Omni's data-plane node. It holds no database: it streams its config from the control plane,
//! keeps the last good config in an encrypted cache so it can start and serve while the control
//! plane is down, and serves the node's HTTP endpoints.

pub mod agent;
pub mod cache;
pub mod channels;
pub mod config;
pub mod connection_events;
pub mod daemon;
pub mod http;
pub mod http_client;
pub mod node;
pub mod pipeline;
pub mod spool;
pub mod sync;
pub mod traces;
