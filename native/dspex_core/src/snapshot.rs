//! MessagePack snapshots of a whole session: export, import, and the unit
//! that migration moves between nodes.
//!
//! Fields are written by name (`to_vec_named`) so later releases can add
//! fields with `#[serde(default)]` and still read old snapshots. Import trusts
//! nothing: every value is re-validated against its type and constraints.

use serde::{Deserialize, Serialize};

use crate::acl::Acl;
use crate::audit::{self, DEFAULT_CAPACITY};
use crate::caller::Caller;
use crate::error::{Error, Result};
use crate::graph::DependencyGraph;
use crate::limits::Limits;
use crate::ratelimit::RateLimit;
use crate::session::{access_rules_of, Session, SessionOpts};
use crate::types::{validate, Constraints, VarType};
use crate::value::Value;
use crate::variable::{HistoryEntry, Variable};

pub const FORMAT: u32 = 1;
/// Deepest nesting the decoder follows (values themselves allow 64).
const MAX_DECODE_DEPTH: usize = 96;

#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub format: u32,
    pub session_id: String,
    pub created_at: i64,
    pub ttl_ms: Option<u64>,
    pub max_history: u64,
    pub metadata: Value,
    pub variables: Vec<VarSnapshot>,
    /// `{ops_per_sec, burst}`; absent in snapshots that predate it.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    #[serde(default = "default_audit_capacity")]
    pub audit_capacity: u64,
    /// Dependency edges between the variables, by name (absent before the
    /// graph existed, hence the default).
    #[serde(default)]
    pub edges: Vec<EdgeSnapshot>,
}

fn default_audit_capacity() -> u64 {
    DEFAULT_CAPACITY as u64
}

#[derive(Debug, Serialize, Deserialize)]
pub struct EdgeSnapshot {
    pub from: String,
    pub to: String,
    pub edge_type: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VarSnapshot {
    pub id: String,
    pub name: Value,
    pub var_type: String,
    pub constraints: Value,
    pub value: Value,
    pub version: u64,
    pub metadata: Value,
    pub description: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub last_write: Value,
    pub history: Vec<HistorySnapshot>,
    /// Access rules in canonical form; absent in snapshots that predate them.
    #[serde(default)]
    pub access_rules: Value,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct HistorySnapshot {
    pub version: u64,
    pub value: Value,
    pub updated_at: i64,
    pub metadata: Value,
}

impl Snapshot {
    pub fn of(session: &Session) -> Snapshot {
        let variables: Vec<VarSnapshot> = session
            .sorted_variables(&Caller::OWNER)
            .iter()
            .map(VarSnapshot::of)
            .collect();
        // Only edges between variables in this snapshot: a variable deleted
        // while it was taken must not leave an edge import would reject.
        let present: std::collections::HashSet<&str> =
            variables.iter().filter_map(|v| v.name.as_text()).collect();
        let edges = session
            .dependencies()
            .read()
            .edges()
            .iter()
            .filter_map(|e| {
                let (from, to) = (e.from.as_text()?, e.to.as_text()?);
                (present.contains(from) && present.contains(to)).then(|| EdgeSnapshot {
                    from: from.to_string(),
                    to: to.to_string(),
                    edge_type: e.edge_type.to_string(),
                })
            })
            .collect();
        Snapshot {
            format: FORMAT,
            session_id: session.id.to_string(),
            created_at: session.created_at,
            ttl_ms: session.opts.ttl_ms,
            max_history: session.opts.max_history as u64,
            metadata: session.opts.metadata.clone(),
            variables,
            rate_limit: session.opts.rate_limit,
            audit_capacity: session.opts.audit_capacity as u64,
            edges,
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        rmp_serde::to_vec_named(self).map_err(|e| Error::InvalidSnapshot(e.to_string()))
    }

    pub fn decode(bytes: &[u8]) -> Result<Snapshot> {
        let mut de = rmp_serde::Deserializer::new(bytes);
        de.set_max_depth(MAX_DECODE_DEPTH);
        let snapshot =
            Snapshot::deserialize(&mut de).map_err(|e| Error::InvalidSnapshot(e.to_string()))?;
        if snapshot.format != FORMAT {
            return Err(Error::InvalidSnapshot(format!(
                "unsupported format {}",
                snapshot.format
            )));
        }
        Ok(snapshot)
    }

    pub fn session_opts(&self, limits: &Limits) -> Result<SessionOpts> {
        limits.check_value(&self.metadata).map_err(bad)?;
        Ok(SessionOpts {
            ttl_ms: self.ttl_ms,
            max_history: limits
                .check_history(i64::try_from(self.max_history).unwrap_or(-1))
                .map_err(bad)?,
            metadata: self.metadata.clone(),
            rate_limit: self
                .rate_limit
                .map(|r| RateLimit::new(r.ops_per_sec, r.burst))
                .transpose()
                .map_err(bad)?,
            audit_capacity: usize::try_from(self.audit_capacity)
                .unwrap_or(usize::MAX)
                .min(audit::MAX_CAPACITY),
        })
    }

    /// Rebuilds and re-validates every variable, with its index key.
    pub fn variables(&self, limits: &Limits) -> Result<Vec<(Box<str>, Variable)>> {
        let max_history = self.max_history as usize;
        self.variables
            .iter()
            .map(|v| v.restore(limits, max_history).map_err(bad))
            .collect()
    }
}

impl Snapshot {
    /// Rebuilds the dependency graph; every edge must join two variables of
    /// the snapshot and the whole must be acyclic.
    pub fn graph(&self) -> Result<DependencyGraph> {
        let names: std::collections::HashMap<&str, &Value> = self
            .variables
            .iter()
            .filter_map(|v| Some((v.name.as_text()?, &v.name)))
            .collect();
        let name = |key: &str| {
            names
                .get(key)
                .copied()
                .ok_or_else(|| Error::InvalidSnapshot(format!("edge to unknown variable {key:?}")))
        };
        let edges = self
            .edges
            .iter()
            .map(|e| Ok((name(&e.from)?, name(&e.to)?, e.edge_type.as_str())))
            .collect::<Result<Vec<_>>>()?;
        DependencyGraph::from_edges(edges).map_err(bad)
    }
}

fn bad(e: Error) -> Error {
    match e {
        Error::InvalidSnapshot(_) => e,
        other => Error::InvalidSnapshot(other.to_string()),
    }
}

impl VarSnapshot {
    fn of(v: &Variable) -> VarSnapshot {
        VarSnapshot {
            id: v.id.to_string(),
            name: v.name.clone(),
            var_type: v.var_type.name().to_string(),
            constraints: v.constraints.source.clone(),
            value: v.value.clone(),
            version: v.version,
            metadata: v.metadata.clone(),
            description: v.description.as_deref().map(str::to_string),
            created_at: v.created_at,
            updated_at: v.updated_at,
            last_write: v.write_metadata(),
            history: v
                .history
                .iter()
                .map(|h| HistorySnapshot {
                    version: h.version,
                    value: h.value.clone(),
                    updated_at: h.updated_at,
                    metadata: h
                        .metadata
                        .as_deref()
                        .cloned()
                        .unwrap_or_else(Value::empty_map),
                })
                .collect(),
            access_rules: access_rules_of(v),
        }
    }

    fn restore(&self, limits: &Limits, max_history: usize) -> Result<(Box<str>, Variable)> {
        let key: Box<str> = limits.check_name(&self.name)?.into();
        if self.id.is_empty() || self.id.len() > 2 * limits.max_name_bytes {
            return Err(Error::invalid_arg("bad_variable_id"));
        }
        let var_type = VarType::parse(&self.var_type)?;
        let constraints = Constraints::compile(var_type, &self.constraints)?;
        for v in [&self.value, &self.metadata, &self.last_write] {
            limits.check_value(v)?;
        }
        let value = validate(var_type, &constraints, self.value.clone())?;
        if self.history.len() > max_history {
            return Err(Error::InvalidSnapshot(
                "history longer than max_history".into(),
            ));
        }
        let mut history = std::collections::VecDeque::with_capacity(self.history.len());
        let mut newer = self.version;
        for h in &self.history {
            if h.version >= newer {
                return Err(Error::InvalidSnapshot(
                    "history versions out of order".into(),
                ));
            }
            newer = h.version;
            limits.check_value(&h.value)?;
            limits.check_value(&h.metadata)?;
            if !h.value.all_finite() {
                return Err(Error::InvalidValue(Value::atom("not_finite")));
            }
            history.push_back(HistoryEntry {
                version: h.version,
                value: h.value.clone(),
                updated_at: h.updated_at,
                metadata: non_empty(&h.metadata),
            });
        }
        let var = Variable {
            id: self.id.as_str().into(),
            name: self.name.clone(),
            var_type,
            constraints: Box::new(constraints),
            value,
            version: self.version,
            metadata: self.metadata.clone(),
            description: self.description.as_deref().map(Into::into),
            created_at: self.created_at,
            updated_at: self.updated_at,
            last_write: non_empty(&self.last_write),
            history,
            max_history,
            lock: Default::default(),
            acl: Acl::build(&self.access_rules, &self.metadata)?.map(std::sync::Arc::new),
        };
        Ok((key, var))
    }
}

fn non_empty(v: &Value) -> Option<Box<Value>> {
    match v {
        Value::Nil => None,
        Value::Map(pairs) if pairs.is_empty() => None,
        v => Some(Box::new(v.clone())),
    }
}

#[cfg(test)]
mod tests {
    use crate::session::SessionOpts;
    use crate::store::Store;
    use crate::types::VarType;
    use crate::value::Value;
    use crate::variable::WriteMeta;
    use crate::Error;

    #[test]
    fn export_import_round_trip() {
        let store = Store::new();
        let s = store.create_session("a", SessionOpts::default()).unwrap();
        s.register(
            Value::atom("t"),
            VarType::Float,
            Value::Float(0.1),
            Default::default(),
        )
        .unwrap();
        s.update(
            "t",
            Value::Float(0.2),
            WriteMeta::default(),
            &crate::Caller::OWNER,
        )
        .unwrap();
        let bytes = store.export_session("a").unwrap();
        let id = store.import_session(&bytes, Some("b")).unwrap();
        assert_eq!(&*id, "b");
        let b = store.session("b").unwrap();
        let t = b.get("t", &crate::Caller::OWNER).unwrap();
        assert_eq!(t.value, Value::Float(0.2));
        assert_eq!(t.version, 1);
        assert_eq!(t.history.len(), 1);
        assert_eq!(t.name, Value::atom("t"));
        assert_eq!(
            store.import_session(&bytes, None),
            Err(Error::AlreadyExists)
        );
    }

    #[test]
    fn dependencies_travel_with_the_snapshot() {
        let store = Store::new();
        let s = store.create_session("a", SessionOpts::default()).unwrap();
        for name in ["x", "y", "z"] {
            s.register(
                Value::atom(name),
                VarType::Float,
                Value::Float(0.0),
                Default::default(),
            )
            .unwrap();
        }
        let owner = &crate::Caller::OWNER;
        s.add_dependency(&Value::atom("x"), &Value::atom("y"), "data", owner)
            .unwrap();
        s.add_dependency(&Value::str("y"), &Value::atom("z"), "control", owner)
            .unwrap();
        let bytes = store.export_session("a").unwrap();
        store.import_session(&bytes, Some("b")).unwrap();
        let b = store.session("b").unwrap();
        let graph = b.dependencies().read();
        assert_eq!(
            graph.update_order(&[Value::atom("x")]),
            [Value::atom("x"), Value::atom("y"), Value::atom("z")]
        );
        assert_eq!(graph.edge_type("y", "z"), Some("control"));
        drop(graph);
        assert_eq!(b.dependencies().edge_count(), 2);
    }

    #[test]
    fn a_cyclic_or_dangling_edge_list_is_rejected() {
        let store = Store::new();
        let s = store.create_session("a", SessionOpts::default()).unwrap();
        for name in ["x", "y"] {
            s.register(
                Value::atom(name),
                VarType::Float,
                Value::Float(0.0),
                Default::default(),
            )
            .unwrap();
        }
        let mut snapshot = super::Snapshot::of(&s);
        for (from, to) in [("x", "y"), ("y", "x")] {
            snapshot.edges.push(super::EdgeSnapshot {
                from: from.into(),
                to: to.into(),
                edge_type: "data".into(),
            });
        }
        let cyclic = snapshot.encode().unwrap();
        assert!(matches!(
            store.import_session(&cyclic, Some("b")),
            Err(Error::InvalidSnapshot(_))
        ));
        snapshot.edges.truncate(1);
        snapshot.edges[0].to = "nope".into();
        let dangling = snapshot.encode().unwrap();
        assert!(matches!(
            store.import_session(&dangling, Some("b")),
            Err(Error::InvalidSnapshot(_))
        ));
        assert!(store.session("b").is_err());
    }

    #[test]
    fn garbage_is_rejected() {
        let store = Store::new();
        for bytes in [
            &b""[..],
            b"\x00\x01garbage",
            b"\x81\xa1a\x01",
            &[0xdd, 0xff, 0xff, 0xff, 0xff],
        ] {
            assert!(matches!(
                store.import_session(bytes, None),
                Err(Error::InvalidSnapshot(_))
            ));
        }
        assert!(store.is_empty());
    }
}
