//! Omni's wire API: the `omni.v1` protobuf package and its tonic clients and servers.

/// Generated messages, clients (`*_client`) and servers (`*_server`) of package `omni.v1`.
#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("omni.v1");
}

/// Encoded `FileDescriptorSet` of every Omni proto, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/omni_descriptor.bin"));

pub mod client;

pub use prost_types::{FieldMask, Timestamp};
