//! dspex_core: the engine behind dspex_bridge. Sessions of typed, versioned
//! variables, and the machinery around them, with no knowledge of Erlang.
//! The NIF crate (`dspex_nif`) and the port program (`dspex_port`) are thin
//! shells over this crate.

pub mod acl;
pub mod audit;
pub mod breaker;
pub mod caller;
pub mod command;
pub mod decode;
pub mod error;
pub mod glob;
pub mod graph;
pub mod histogram;
pub mod limits;
pub mod locks;
pub mod permission;
pub mod prometheus;
pub mod ratelimit;
pub mod session;
pub mod snapshot;
pub mod store;
pub mod time;
pub mod timeseries;
pub mod types;
pub mod value;
pub mod variable;
pub mod vocabulary;

/// The concurrent map of a session's variable indexes: sharded, with aHash (fast on
/// short keys, and keyed per process so hostile ids cannot flood a shard).
pub type ConcurrentMap<K, V> = dashmap::DashMap<K, V, ahash::RandomState>;

pub use acl::Acl;
pub use caller::Caller;
pub use command::{Answer, Command, Operation, Reply, Stamped, UpdateSpec};
pub use error::{Error, Result};
pub use graph::{DependencyGraph, SessionGraph};
pub use permission::{PermSet, Permission};
pub use session::{RegisterOpts, Session, SessionOpts, Update};
pub use store::Store;
pub use types::VarType;
pub use value::Value;
pub use variable::{HistoryEntry, Variable, WriteMeta};
