//! Compiles the protos with protox (pure Rust), so building Keel needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "keel/common/v1/common.proto",
        "keel/identity/v1/identity.proto",
        "keel/auth/v1/auth.proto",
        "keel/authz/v1/authz.proto",
        "keel/blog/v1/blog.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["."])?;
    // The same descriptors, encoded, for gRPC reflection.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("keel_descriptor.bin"), prost::Message::encode_to_vec(&descriptors))?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
