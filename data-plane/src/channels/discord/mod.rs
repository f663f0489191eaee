//! Discord bots: a gateway connection per bot this node holds the lease of, messages in through
//! it, replies out through the REST API.

pub mod client;
pub mod gateway;
pub mod parse;
