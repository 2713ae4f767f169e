//! rustler bindings of dspex_core. One file per resource; atoms in
//! `atoms.rs`; term conversion in `term.rs`; the error mapping in `error.rs`.

mod acl;
mod alloc;
mod atoms;
mod breaker;
mod error;
mod graph;
mod locks;
mod log;
mod metrics;
mod replicated;
mod reply;
mod store;
mod term;
mod variable;

rustler::init!("Elixir.DSPex.Bridge.Native", load = atoms::load);
