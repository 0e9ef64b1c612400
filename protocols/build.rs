//! Generates the gRPC code for `proto/maeum/v1/*.proto` with the vendored `protoc`
//! (protoc-bin-vendored), so a fresh machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/maeum/v1/common.proto", "proto/maeum/v1/fleet.proto", "proto/maeum/v1/control.proto"];
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Model bytes decode as `Bytes` slices of the received buffer, not copies of it
    // (docs/benchmarks.md "Transfer throughput").
    tonic_prost_build::configure()
        .bytes(".maeum.v1.Chunk.data")
        .bytes(".maeum.v1.UploadChunk.data")
        .compile_with_config(config, &protos, &["proto"])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
