//! Compiles the service's `.proto` (pure Rust, no `protoc`) into a file
//! descriptor set the gateway loads at start.
use prost::Message;

fn main() {
    println!("cargo:rerun-if-changed=proto/bridge_service.proto");
    let fds = protox::compile(["bridge_service.proto"], ["proto"]).expect("compile proto");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap());
    std::fs::write(out.join("bridge_service.bin"), fds.encode_to_vec()).unwrap();
}
