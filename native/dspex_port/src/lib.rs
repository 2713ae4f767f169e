//! dspex_port: the dspex_core engine behind a MessagePack protocol on
//! stdin/stdout, for the BEAM's `{:packet, 4}` ports. The binary's frame loop
//! is `main.rs`; the codec it uses is [`protocol`].

pub mod protocol;
