//! Domain rules that the control plane and the data plane must agree on.

pub mod access;
pub mod crypto;
pub mod duration;
pub mod errors;
pub mod kinds;
pub mod metrics;
pub mod names;
