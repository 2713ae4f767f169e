//! The gRPC gateway of dspex_bridge: `snakepit.bridge.BridgeService` served
//! by tonic, every call forwarded to the BEAM over the port's pipes and
//! answered from there. The gateway holds no state and knows the messages'
//! shapes (from the compiled `.proto`), not their meaning.
//!
//! - `codec`: protobuf messages <-> MessagePack values.
//! - `etf`: Erlang's external term format, the frames' encoding.
//! - `link`: the frames exchanged with the BEAM.
//! - `server`: the tonic service, the frame loop, the process's options.

pub mod codec;
pub mod etf;
pub mod link;
pub mod server;

/// The compiled `bridge_service.proto` (a `FileDescriptorSet`, built by
/// `build.rs` with protox).
pub const DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/bridge_service.bin"));

/// The full name of the service.
pub const SERVICE: &str = "snakepit.bridge.BridgeService";

/// The descriptors of the service and its messages.
pub fn descriptor_pool() -> prost_reflect::DescriptorPool {
    prost_reflect::DescriptorPool::decode(DESCRIPTOR_SET).expect("the built-in descriptor set")
}
