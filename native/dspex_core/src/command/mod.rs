//! Every store operation as data: one serde [`Command`] per operation, each
//! defined once, in the module of its concern, with its typed arguments,
//! their validation and the shape of its reply.
//!
//! - [`session`], [`variable`], [`acl`], [`graph`]: one argument struct per
//!   operation, implementing [`Operation`] (its wire name, whether it writes,
//!   whether it is heavy, and `apply`).
//! - [`reply`]: the shapes of the maps replies carry (a variable, a history
//!   entry, a session's info, an audit entry), as keys and fields that each
//!   transport encodes in its own way.
//! - [`args`]: argument checks several operations share.
//!
//! The port program decodes Commands from MessagePack; the NIF builds the
//! same argument structs from terms and calls [`Operation::apply`], or calls
//! the typed functions `apply` calls. To add an operation, see
//! `docs/adding-an-operation.md`.
//!
//! # Determinism
//!
//! A command is applied with a time stamp ([`Stamped`]), filled in by the
//! entry point before it is applied (the NIF, the port's frame loop, later a
//! replicated log entry): applying reads no clock. Generated ids are made
//! from the session's own state (`var_<name>_<n>`), and lock tokens travel in
//! the commands that carry them ([`variable::VarFence`]). Applying the same
//! stamped commands to two fresh stores gives the same replies and
//! byte-identical exports (`tests/determinism.rs`).
//!
//! # Wire shapes
//!
//! A command is externally tagged, `{"var_get": {"session": s, "ident": i}}`,
//! its arguments a map by name (missing optional ones take their defaults;
//! an unknown name is an error). Identifiers and names accept an atom or a
//! string. A reply is the Elixir result term the public API returns: `:ok`,
//! `{:ok, value}` or `{:error, reason}` with `reason` from
//! [`crate::Error::to_value`].
//!
//! # Invariants
//! - `apply` never panics: every argument is checked, every failure is an
//!   [`crate::Error`] that becomes `{:error, reason}`.
//! - A command and its named serialization round-trip.
//! - [`Operation::NAME`] is the command's wire tag (tested).
//! - Arbitrary bytes fed to the `Command` deserializer fail cleanly, never
//!   panic and never recurse past the decoder's depth limit.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::store::Store;
use crate::value::Value;

pub mod acl;
pub mod args;
pub mod graph;
pub mod reply;
pub mod session;
pub mod variable;

#[cfg(test)]
mod tests;

pub use acl::*;
pub use graph::*;
pub use session::*;
pub use variable::*;

/// One operation: its arguments, and how it is applied.
pub trait Operation: Sized {
    /// The wire name (the command's tag), also the NIF's and the Elixir
    /// backend callback's name.
    const NAME: &'static str;
    /// True for operations that change state (what a replicated log must
    /// carry; past a timeout their outcome is unknown).
    const WRITES: bool;
    /// True when the cost grows with the session (or the store): a NIF runs
    /// it on a dirty scheduler, the port off its frame loop.
    fn is_heavy(&self) -> bool {
        false
    }
    /// Applies the operation at `now_us` (microseconds since the epoch).
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer>;
}

macro_rules! commands {
    ($($(#[$doc:meta])* $variant:ident,)*) => {
        /// One store operation and its arguments.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum Command {
            $($(#[$doc])* $variant($variant),)*
        }

        impl Command {
            /// Every command's wire name, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$(<$variant as Operation>::NAME,)*];

            /// The wire name of the command, for logs and telemetry.
            pub fn name(&self) -> &'static str {
                match self {
                    $(Command::$variant(_) => <$variant as Operation>::NAME,)*
                }
            }

            /// See [`Operation::WRITES`].
            pub fn writes(&self) -> bool {
                match self {
                    $(Command::$variant(_) => <$variant as Operation>::WRITES,)*
                }
            }

            /// See [`Operation::is_heavy`].
            pub fn is_heavy(&self) -> bool {
                match self {
                    $(Command::$variant(c) => c.is_heavy(),)*
                }
            }

            /// Applies the command at `now_us`: the single dispatch point
            /// shared by every transport.
            pub fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
                match self {
                    $(Command::$variant(c) => c.apply(store, now_us),)*
                }
            }
        }

        $(impl From<$variant> for Command {
            fn from(c: $variant) -> Command {
                Command::$variant(c)
            }
        })*
    };
}

commands! {
    SessionCreate,
    SessionInfo,
    SessionMemory,
    SessionDelete,
    SessionList,
    SessionSweep,
    SessionExport,
    SessionImport,
    VarRegister,
    VarGet,
    VarGetValue,
    VarExists,
    VarSet,
    VarSetMany,
    VarHistory,
    VarRollback,
    VarDelete,
    VarList,
    VarNames,
    VarFence,
    AclSetRules,
    AclCheck,
    AclAuthorize,
    AclAuthorizeSession,
    AclAuditLog,
    GraphAddEdge,
    GraphRemoveEdge,
    GraphClear,
    GraphDependencies,
    GraphDependents,
    GraphUpdateOrder,
    GraphRender,
    GraphInfo,
}

/// A command with the time it is applied at, filled in by the entry point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stamped {
    /// Microseconds since the epoch.
    pub now_us: i64,
    pub command: Command,
}

impl Command {
    /// This command, to be applied at `now_us`.
    pub fn stamped(self, now_us: i64) -> Stamped {
        Stamped {
            now_us,
            command: self,
        }
    }
}

impl Store {
    /// Applies one stamped command: a pure function of the store's state
    /// and the command.
    pub fn execute(&self, stamped: Stamped) -> Result<Answer> {
        stamped.command.apply(self, stamped.now_us)
    }
}

/// A successful outcome: `:ok`, or `{:ok, value}`.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    Done,
    Value(Value),
}

impl Answer {
    /// The Elixir term: `:ok` or `{:ok, value}`.
    pub fn into_term(self) -> Value {
        match self {
            Answer::Done => Value::atom("ok"),
            Answer::Value(v) => Value::tagged("ok", v),
        }
    }
}

/// The answer to one request, correlated by the request's `id`. `id` is
/// `None` only when a frame was too broken to read one from.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    pub id: Option<u64>,
    pub result: Result<Answer>,
}

impl Reply {
    /// The Elixir result term: `:ok`, `{:ok, value}` or `{:error, reason}`.
    pub fn term(&self) -> Value {
        match &self.result {
            Ok(answer) => answer.clone().into_term(),
            Err(e) => Value::tagged("error", e.to_value()),
        }
    }
}

/// On the wire a reply is `[id, term]`.
impl Serialize for Reply {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        (self.id, self.term()).serialize(s)
    }
}

/// `Ok(Answer::Value(v))`.
pub(crate) fn value(v: Value) -> Result<Answer> {
    Ok(Answer::Value(v))
}
