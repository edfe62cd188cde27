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

    /// `TimelineService`'s server generated a second time (see [`crate::encoded`]).
    pub(crate) mod encoded_timeline_server {
        include!(concat!(env!("OUT_DIR"), "/encoded/touchline.v1.rs"));
    }
}

/// `TimelineService`'s server with `GetTimeline` answering [`encoded::TimelinePage`]: entries
/// already in their wire encoding, written from the stored entries without building messages
/// ([`convert::TimelineEntryEncoder`]). On the wire it is `v1::GetTimelineResponse`, byte for
/// byte; clients use [`v1::timeline_service_client`]. (`v1::timeline_service_server`, generated
/// with the rest of the package, is not the one a node serves.)
pub mod encoded {
    /// `touchline.v1.GetTimelineResponse` with its entries encoded: a repeated message field and
    /// a repeated bytes field of the same number are the same bytes on the wire (each entry
    /// length-delimited under tag 1).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TimelinePage {
        /// Each the encoding of a `touchline.v1.TimelineEntry`.
        #[prost(bytes = "bytes", repeated, tag = "1")]
        pub entries: Vec<prost::bytes::Bytes>,
        #[prost(string, tag = "2")]
        pub next_page_token: String,
    }

    pub use crate::v1::encoded_timeline_server::timeline_service_server;
}

/// The encoded `FileDescriptorSet` of the contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/touchline_descriptor.bin"));

pub use convert::{DecodeError, decode_envelope, encode_envelope};
