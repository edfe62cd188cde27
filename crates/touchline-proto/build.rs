//! Compiles `proto/touchline/v1/*.proto` with protox (a pure-Rust protobuf compiler), so a fresh
//! machine needs no `protoc`, and generates the prost messages and tonic services from it. The
//! encoded descriptor set is kept in `OUT_DIR` for gRPC server reflection.

use std::path::PathBuf;

use prost::Message as _;

const PROTO_FILES: &[&str] = &[
    "touchline/v1/touchpoint.proto",
    "touchline/v1/ingest.proto",
    "touchline/v1/timeline.proto",
    "touchline/v1/envelope.proto",
    "touchline/v1/admin.proto",
    "touchline/v1/backup.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read when the script runs, not baked in when it is compiled: cargo reuses a compiled build
    // script for another checkout of the same sources sharing the target directory.
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", proto_root.display());

    let descriptor_set = protox::compile(PROTO_FILES, [&proto_root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("touchline_descriptor.bin"),
        descriptor_set.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Prost's codec with the top-level field count checked before decoding (src/codec.rs).
        .codec_path("crate::codec::BoundedCodec")
        // Maps (a touchpoint's attributes) as BTreeMap: a few entries each, built and read in key
        // order (the domain's order) without hashing.
        .btree_map(".")
        .compile_fds(descriptor_set.clone())?;

    // `TimelineService`'s server once more, its `GetTimeline` answering a page of entries already
    // encoded (`crate::encoded`, the same bytes on the wire); every other type is the one
    // generated above.
    let encoded_dir = out_dir.join("encoded");
    std::fs::create_dir_all(&encoded_dir)?;
    let mut timeline_service = descriptor_set;
    for file in &mut timeline_service.file {
        let timeline_file = file.name() == "touchline/v1/timeline.proto";
        file.service
            .retain(|service| timeline_file && service.name() == "TimelineService");
    }
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .out_dir(&encoded_dir)
        .codec_path("crate::codec::BoundedCodec")
        .extern_path(
            ".touchline.v1.GetTimelineResponse",
            "crate::encoded::TimelinePage",
        )
        .extern_path(".touchline.v1", "crate::v1")
        .compile_fds(timeline_service)?;
    Ok(())
}
