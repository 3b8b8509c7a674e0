//! Compiles `proto/` without a system `protoc`: protox parses the files in pure Rust, its
//! descriptors feed tonic's code generator, and the encoded set is kept for server reflection.

use prost::Message;
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["cache.proto", "peer.proto"], ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("cache_descriptor.bin"), fds.encode_to_vec())?;
    // The node serves CacheService through its own per-core dispatcher (src/ingress); the
    // generated server trait is for the bench's baseline servers, which must speak the same API.
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
