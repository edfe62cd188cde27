//! Touchline's gRPC contract, generated from `proto/touchline/v1` by protox + tonic-prost-build,
//! and the only place where wire messages and domain types are converted into each other.

pub mod backup;
pub mod codec;
pub mod convert;

/// The generated `touchline.v1` package.
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations,
    missing_docs,
    unreachable_pub
)]
pub mod v1 {
    tonic::include_proto!("touchline.v1");
}

/// The encoded `FileDescriptorSet` of the contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/touchline_descriptor.bin"));

pub use convert::{DecodeError, decode_envelope, encode_envelope};
