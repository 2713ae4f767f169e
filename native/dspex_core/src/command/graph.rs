//! Dependency-graph operations: edges, dependencies and dependents, update
//! order, rendering and size.

use serde::{Deserialize, Serialize};

use super::args::Actor;
use super::reply::count_value;
use super::{value, Answer, Operation};
use crate::error::{Error, Result};
use crate::graph::{Direction, Format, DEFAULT_EDGE_TYPE};
use crate::store::Store;
use crate::value::Value;

/// `from -> to` (`to` depends on `from`): `{:ok, new?}`, or
/// `{:error, {:would_create_cycle, path}}`, `:self_dependency`,
/// `{:not_found, ident}`. `edge_type` is an atom (default `:data`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphAddEdge {
    pub session: String,
    pub from: Value,
    pub to: Value,
    #[serde(default)]
    pub edge_type: Value,
    #[serde(default)]
    pub actor: Actor,
}

impl Operation for GraphAddEdge {
    const NAME: &'static str = "graph_add_edge";
    const WRITES: bool = true;
    fn is_heavy(&self) -> bool {
        true
    }
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let caller = self.actor.caller(now_us);
        let edge_type = edge_type(&self.edge_type)?;
        let added = store.with_session(&self.session, now_us, |s| {
            s.add_dependency(&self.from, &self.to, edge_type, &caller)
        })??;
        value(Value::Bool(added))
    }
}

/// An edge type: an atom, `nil` for the default.
pub fn edge_type(v: &Value) -> Result<&str> {
    match v {
        Value::Nil => Ok(DEFAULT_EDGE_TYPE),
        Value::Atom(t) => Ok(t),
        _ => Err(Error::InvalidArgument(Value::tagged(
            "edge_type",
            Value::atom("expected_atom"),
        ))),
    }
}

/// `{:ok, removed?}`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphRemoveEdge {
    pub session: String,
    pub from: Value,
    pub to: Value,
    #[serde(default)]
    pub actor: Actor,
}

impl Operation for GraphRemoveEdge {
    const NAME: &'static str = "graph_remove_edge";
    const WRITES: bool = true;
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let caller = self.actor.caller(now_us);
        let removed = store.with_session(&self.session, now_us, |s| {
            s.remove_dependency(&self.from, &self.to, &caller)
        })??;
        value(Value::Bool(removed))
    }
}

/// Removes every edge touching `ident`: `{:ok, count}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphClear {
    pub session: String,
    pub ident: Value,
    #[serde(default)]
    pub actor: Actor,
}

impl Operation for GraphClear {
    const NAME: &'static str = "graph_clear";
    const WRITES: bool = true;
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let caller = self.actor.caller(now_us);
        let n = store.with_session(&self.session, now_us, |s| {
            s.clear_dependencies(&self.ident, &caller)
        })??;
        value(count_value(n as u64))
    }
}

/// What `ident` depends on, in topological order: `{:ok, [name]}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphDependencies {
    pub session: String,
    pub ident: Value,
    #[serde(default)]
    pub transitive: bool,
    #[serde(default)]
    pub actor: Actor,
}

impl Operation for GraphDependencies {
    const NAME: &'static str = "graph_dependencies";
    const WRITES: bool = false;
    fn is_heavy(&self) -> bool {
        true
    }
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let caller = self.actor.caller(now_us);
        let names = store.with_session(&self.session, now_us, |s| {
            s.dependencies_of(
                &self.ident,
                Direction::Dependencies,
                self.transitive,
                &caller,
            )
        })??;
        value(Value::List(names.into()))
    }
}

/// What depends on `ident`, in topological order: `{:ok, [name]}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphDependents {
    pub session: String,
    pub ident: Value,
    #[serde(default)]
    pub transitive: bool,
    #[serde(default)]
    pub actor: Actor,
}

impl Operation for GraphDependents {
    const NAME: &'static str = "graph_dependents";
    const WRITES: bool = false;
    fn is_heavy(&self) -> bool {
        true
    }
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let caller = self.actor.caller(now_us);
        let names = store.with_session(&self.session, now_us, |s| {
            s.dependencies_of(&self.ident, Direction::Dependents, self.transitive, &caller)
        })??;
        value(Value::List(names.into()))
    }
}

/// `{:ok, [changed.., dependents..]}` in update order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphUpdateOrder {
    pub session: String,
    pub changed: Vec<Value>,
    #[serde(default)]
    pub actor: Actor,
}

impl Operation for GraphUpdateOrder {
    const NAME: &'static str = "graph_update_order";
    const WRITES: bool = false;
    fn is_heavy(&self) -> bool {
        true
    }
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let caller = self.actor.caller(now_us);
        let names = store.with_session(&self.session, now_us, |s| {
            s.update_order(&self.changed, &caller)
        })??;
        value(Value::List(names.into()))
    }
}

/// The graph as text, `format` `:dot` or `:mermaid`: `{:ok, binary}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphRender {
    pub session: String,
    pub format: Value,
    #[serde(default)]
    pub actor: Actor,
}

/// A render format: the atom `:dot` or `:mermaid`.
pub fn format_of(v: &Value) -> Result<Format> {
    match v {
        Value::Atom(f) => Format::parse(f),
        _ => Err(Error::InvalidArgument(Value::tagged(
            "format",
            Value::atom("expected_atom"),
        ))),
    }
}

impl Operation for GraphRender {
    const NAME: &'static str = "graph_render";
    const WRITES: bool = false;
    fn is_heavy(&self) -> bool {
        true
    }
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let caller = self.actor.caller(now_us);
        let format = format_of(&self.format)?;
        let text = store.with_session(&self.session, now_us, |s| {
            s.render_dependencies(format, &caller)
        })??;
        value(Value::Str(text.into()))
    }
}

/// `{:ok, %{edges: n, vertices: n}}`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphInfo {
    pub session: String,
    #[serde(default)]
    pub actor: Actor,
}

impl Operation for GraphInfo {
    const NAME: &'static str = "graph_info";
    const WRITES: bool = false;
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let caller = self.actor.caller(now_us);
        value(store.with_session(&self.session, now_us, |s| s.dependency_info(&caller))??)
    }
}
