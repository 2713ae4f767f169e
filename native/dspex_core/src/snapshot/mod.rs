//! MessagePack snapshots of a whole session: export, import, and the unit
//! that migration moves between nodes.
//!
//! Fields are written by name (`to_vec_named`) so later releases can add
//! fields and still read old snapshots; import skips fields it does not know.
//!
//! Import trusts nothing and decodes in one pass, straight into the
//! session's own types (never a generic tree of the whole snapshot): every
//! length is checked before anything is allocated for it, every limit while
//! decoding (snapshot bytes, value bytes and depth, name bytes, variable
//! count, history length), and every field gets the checks a write of it
//! would get: values against their type and constraints, rules through the
//! same compiler as `set_access_rules`, timestamps within what the engine's
//! clock and Elixir's `DateTime` can represent, versions increasing, ttl,
//! rate limit and audit capacity as `create_session` accepts them. Peak
//! memory is the snapshot, the session being built, and one value at a time.
//!
//! Invariants (tests in `tests.rs` and in `tests/import_memory.rs`):
//! - A snapshot is imported whole or not at all, and whatever it holds, the
//!   reads of the imported session succeed.
//! - An import allocates a small multiple of the snapshot's size, the
//!   session it builds included; a rejected one stops at the first field
//!   over a limit.

use std::collections::{HashMap, VecDeque};

use serde::Serialize;

use crate::acl::{Acl, MAX_RULES_BYTES};
use crate::audit;
use crate::caller::Caller;
use crate::decode::{Budget, Reader};
use crate::error::{Error, Result};
use crate::graph::{DependencyGraph, MAX_EDGES};
use crate::limits::Limits;
use crate::ratelimit::RateLimit;
use crate::session::{access_rules_of, Session, SessionOpts};
use crate::types::{validate, Constraints, VarType};
use crate::value::Value;
use crate::variable::{HistoryEntry, Variable};

pub const FORMAT: u32 = 1;

/// Latest timestamp accepted, in microseconds since the epoch: the end of
/// year 9999, the last instant Elixir's `DateTime` represents. The engine's
/// clock never goes below 0 (the epoch).
pub const MAX_TIMESTAMP_US: i64 = 253_402_300_799_999_999;
/// Highest version accepted: writes count up by one from it without
/// overflowing, and it stays an Elixir integer the port can carry.
pub const MAX_VERSION: u64 = i64::MAX as u64 - 1;
/// Longest ttl accepted, as `create_session` accepts it (an Elixir integer).
const MAX_TTL_MS: u64 = i64::MAX as u64;

/// A session as export writes it.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub format: u32,
    pub session_id: String,
    pub created_at: i64,
    pub ttl_ms: Option<u64>,
    pub max_history: u64,
    pub metadata: Value,
    pub variables: Vec<VarSnapshot>,
    /// `{ops_per_sec, burst}`; absent in snapshots that predate it.
    pub rate_limit: Option<RateLimit>,
    /// Absent in snapshots that predate it: the default capacity.
    pub audit_capacity: u64,
    /// Dependency edges between the variables, by name (absent before the
    /// graph existed: none).
    pub edges: Vec<EdgeSnapshot>,
}

#[derive(Debug, Serialize)]
pub struct EdgeSnapshot {
    pub from: String,
    pub to: String,
    pub edge_type: String,
}

#[derive(Debug, Serialize)]
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
    pub access_rules: Value,
}

#[derive(Debug, Serialize)]
pub struct HistorySnapshot {
    pub version: u64,
    pub value: Value,
    pub updated_at: i64,
    pub metadata: Value,
}

impl Snapshot {
    pub fn of(session: &Session) -> Snapshot {
        let variables: Vec<VarSnapshot> = session
            .sorted_variables(&Caller::owner(0))
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
}

/// A decoded, fully validated snapshot: what import publishes.
pub struct Imported<'a> {
    pub session_id: &'a str,
    /// Validated, not restored: an imported session starts its own clock.
    pub created_at: i64,
    pub opts: SessionOpts,
    /// Each variable with its index key.
    pub variables: Vec<(Box<str>, Variable)>,
    pub graph: DependencyGraph,
}

/// Any error inside a snapshot, as `{:invalid_snapshot, text}`.
fn bad(e: Error) -> Error {
    match e {
        Error::InvalidSnapshot(_) => e,
        other => Error::InvalidSnapshot(other.to_string()),
    }
}

fn invalid(what: impl Into<String>) -> Error {
    Error::InvalidSnapshot(what.into())
}

/// Prefixes an error with where it happened.
fn at(place: impl std::fmt::Display, e: Error) -> Error {
    match bad(e) {
        Error::InvalidSnapshot(s) => Error::InvalidSnapshot(format!("{place}: {s}")),
        other => other,
    }
}

fn timestamp(t: i64) -> Result<i64> {
    if (0..=MAX_TIMESTAMP_US).contains(&t) {
        Ok(t)
    } else {
        Err(invalid(format!("timestamp {t} out of range")))
    }
}

fn version(v: u64) -> Result<u64> {
    if v <= MAX_VERSION {
        Ok(v)
    } else {
        Err(invalid(format!("version {v} out of range")))
    }
}

/// Field names seen in one map: each may appear once.
struct Seen(u32);

impl Seen {
    fn first(&mut self, index: usize, name: &str) -> Result<()> {
        let bit = 1u32 << index;
        if self.0 & bit != 0 {
            return Err(invalid(format!("duplicate field {name:?}")));
        }
        self.0 |= bit;
        Ok(())
    }

    fn require(&self, fields: &[&str], required: &[usize]) -> Result<()> {
        match required.iter().find(|&&i| self.0 & (1 << i) == 0) {
            Some(&i) => Err(invalid(format!("missing field {:?}", fields[i]))),
            None => Ok(()),
        }
    }
}

/// Reads a map with known field names, calling `field(index, reader)` for
/// each known one and skipping the others.
fn fields<'a>(
    r: &mut Reader<'a>,
    names: &[&str],
    required: &[usize],
    mut field: impl FnMut(usize, &mut Reader<'a>) -> Result<()>,
) -> Result<()> {
    let mut seen = Seen(0);
    for _ in 0..r.map_len()? {
        let key = r.str()?;
        match names.iter().position(|n| *n == key) {
            Some(i) => {
                seen.first(i, key)?;
                field(i, r).map_err(|e| at(key, e))?;
            }
            None => r.skip(1)?,
        }
    }
    seen.require(names, required)
}

fn metadata_map(v: Value, nil_ok: bool) -> Result<Value> {
    match v {
        Value::Map(_) => Ok(v),
        Value::Nil if nil_ok => Ok(Value::empty_map()),
        _ => Err(Error::invalid_arg("metadata_must_be_a_map")),
    }
}

/// Decodes and validates a whole snapshot.
pub fn decode<'a>(bytes: &'a [u8], limits: &Limits) -> Result<Imported<'a>> {
    if bytes.len() > limits.max_snapshot_bytes {
        return Err(Error::TooLarge(limits.max_snapshot_bytes));
    }
    let mut r = Reader::new(bytes);
    let imported = decode_session(&mut r, limits).map_err(bad)?;
    if !r.at_end() {
        return Err(invalid("trailing bytes after the snapshot"));
    }
    Ok(imported)
}

const SESSION_FIELDS: [&str; 10] = [
    "format",
    "session_id",
    "created_at",
    "ttl_ms",
    "max_history",
    "metadata",
    "variables",
    "rate_limit",
    "audit_capacity",
    "edges",
];

fn decode_session<'a>(r: &mut Reader<'a>, limits: &Limits) -> Result<Imported<'a>> {
    let mut session_id = "";
    let mut created_at = 0;
    let mut opts = SessionOpts::default();
    let mut variables = Vec::new();
    // Session-level max_history comes before the variables in what export
    // writes; until it is known, history is bounded by the store's limit.
    let mut max_history = None;
    let mut edges: Vec<(&'a str, &'a str, &'a str)> = Vec::new();
    fields(r, &SESSION_FIELDS, &[0, 1, 2, 4, 5, 6], |i, r| {
        match i {
            0 => {
                let format = r.u64()?;
                if format != FORMAT as u64 {
                    return Err(invalid(format!("unsupported format {format}")));
                }
            }
            1 => {
                session_id = r.str()?;
                limits.check_session_id(session_id)?;
            }
            2 => created_at = timestamp(r.i64()?)?,
            3 => {
                opts.ttl_ms = if r.nil()? {
                    None
                } else {
                    match r.u64()? {
                        ms @ 1..=MAX_TTL_MS => Some(ms),
                        _ => return Err(Error::invalid_arg("bad_ttl")),
                    }
                }
            }
            4 => {
                let n = limits.check_history(i64::try_from(r.u64()?).unwrap_or(-1))?;
                opts.max_history = n;
                max_history = Some(n);
            }
            5 => {
                let v = r.value(&mut Budget::new(limits.max_value_bytes), 1)?;
                opts.metadata = metadata_map(v, true)?;
            }
            6 => {
                let n = r.array_len()?;
                if n > limits.max_variables {
                    return Err(Error::TooLarge(limits.max_variables));
                }
                variables.reserve(r.capacity_for(n, 64));
                let bound = max_history.unwrap_or(limits.max_history);
                for index in 0..n {
                    let var = decode_variable(r, limits, bound)
                        .map_err(|e| at(format_args!("variable {index}"), e))?;
                    variables.push(var);
                }
            }
            7 => opts.rate_limit = decode_rate_limit(r)?,
            8 => match usize::try_from(r.u64()?) {
                Ok(n) if n <= audit::MAX_CAPACITY => opts.audit_capacity = n,
                _ => {
                    return Err(Error::InvalidArgument(Value::tagged(
                        "audit_capacity",
                        Value::Int(audit::MAX_CAPACITY as i64),
                    )))
                }
            },
            _ => {
                let n = r.array_len()?;
                if n > MAX_EDGES {
                    return Err(Error::InvalidArgument(Value::tagged(
                        "too_many_edges",
                        Value::Int(MAX_EDGES as i64),
                    )));
                }
                edges.reserve(r.capacity_for(n, 16));
                for _ in 0..n {
                    edges.push(decode_edge(r)?);
                }
            }
        }
        Ok(())
    })?;
    for (key, var) in &mut variables {
        if var.history.len() > opts.max_history {
            return Err(invalid(format!(
                "variable {key:?}: history longer than max_history"
            )));
        }
        var.max_history = opts.max_history;
    }
    let graph = graph(&variables, &edges)?;
    Ok(Imported {
        session_id,
        created_at,
        opts,
        variables,
        graph,
    })
}

/// `nil`, `%{ops_per_sec, burst}` (what export writes) or `[ops, burst]`,
/// checked as `create_session` checks it.
fn decode_rate_limit(r: &mut Reader) -> Result<Option<RateLimit>> {
    if r.nil()? {
        return Ok(None);
    }
    let (mut ops, mut burst) = (0, 0);
    if r.next_is_array()? {
        if r.array_len()? != 2 {
            return Err(invalid("rate_limit is {ops_per_sec, burst}"));
        }
        ops = r.u64()?;
        burst = r.u64()?;
    } else {
        fields(r, &["ops_per_sec", "burst"], &[0, 1], |i, r| {
            *[&mut ops, &mut burst][i] = r.u64()?;
            Ok(())
        })?;
    }
    RateLimit::new(ops, burst).map(Some)
}

fn decode_edge<'a>(r: &mut Reader<'a>) -> Result<(&'a str, &'a str, &'a str)> {
    let mut parts = ["", "", ""];
    fields(r, &["from", "to", "edge_type"], &[0, 1, 2], |i, r| {
        parts[i] = r.str()?;
        Ok(())
    })?;
    Ok((parts[0], parts[1], parts[2]))
}

/// The dependency graph; every edge must join two variables of the snapshot
/// and the whole must be acyclic.
fn graph(
    variables: &[(Box<str>, Variable)],
    edges: &[(&str, &str, &str)],
) -> Result<DependencyGraph> {
    if edges.is_empty() {
        return Ok(DependencyGraph::new());
    }
    let names: HashMap<&str, &Value> = variables.iter().map(|(k, v)| (&**k, &v.name)).collect();
    let name = |key: &str| {
        names
            .get(key)
            .copied()
            .ok_or_else(|| invalid(format!("edge to unknown variable {key:?}")))
    };
    let edges = edges
        .iter()
        .map(|&(from, to, ty)| Ok((name(from)?, name(to)?, ty)))
        .collect::<Result<Vec<_>>>()?;
    DependencyGraph::from_edges(edges).map_err(|e| at("edges", e))
}

const VAR_FIELDS: [&str; 13] = [
    "id",
    "name",
    "var_type",
    "constraints",
    "value",
    "version",
    "metadata",
    "description",
    "created_at",
    "updated_at",
    "last_write",
    "history",
    "access_rules",
];

/// One variable, checked as register and the writes that led to it would
/// have checked it. Fields may come in any order, so the ones that depend on
/// others (value on type and constraints, rules on metadata) are checked
/// once the map is read.
fn decode_variable(
    r: &mut Reader,
    limits: &Limits,
    max_history: usize,
) -> Result<(Box<str>, Variable)> {
    let value_budget = || Budget::new(limits.max_value_bytes);
    let mut id = "";
    let mut name = Value::Nil;
    let mut var_type = "";
    let mut constraints = Value::Nil;
    let mut value = Value::Nil;
    let mut version = 0;
    let mut metadata = Value::Nil;
    let mut description = None;
    let (mut created_at, mut updated_at) = (0, 0);
    let mut last_write = Value::Nil;
    let mut history = VecDeque::new();
    let mut rules = Value::Nil;
    fields(
        r,
        &VAR_FIELDS,
        &[0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11],
        |i, r| {
            match i {
                0 => {
                    id = r.str()?;
                    if id.is_empty() || id.len() > 2 * limits.max_name_bytes {
                        return Err(Error::invalid_arg("bad_variable_id"));
                    }
                }
                1 => {
                    name = r
                        .value(&mut Budget::new(limits.max_name_bytes), 1)
                        .map_err(|e| match e {
                            Error::TooLarge(_) => Error::invalid_arg("bad_name_length"),
                            e => e,
                        })?;
                    limits.check_name(&name)?;
                }
                2 => var_type = r.str()?,
                3 => constraints = r.value(&mut value_budget(), 1)?,
                4 => value = r.value(&mut value_budget(), 1)?,
                5 => version = self::version(r.u64()?)?,
                6 => metadata = metadata_map(r.value(&mut value_budget(), 1)?, false)?,
                7 => {
                    description = if r.nil()? {
                        None
                    } else {
                        let d = r.str()?;
                        if d.len() > limits.max_value_bytes {
                            return Err(Error::TooLarge(limits.max_value_bytes));
                        }
                        Some(d.into())
                    }
                }
                8 => created_at = timestamp(r.i64()?)?,
                9 => updated_at = timestamp(r.i64()?)?,
                10 => last_write = metadata_map(r.value(&mut value_budget(), 1)?, true)?,
                11 => {
                    let n = r.array_len()?;
                    if n > max_history {
                        return Err(invalid("history longer than max_history"));
                    }
                    history.reserve(r.capacity_for(n, 16));
                    for _ in 0..n {
                        history.push_back(decode_entry(r, limits)?);
                    }
                }
                _ => rules = r.value(&mut Budget::new(MAX_RULES_BYTES), 1)?,
            }
            Ok(())
        },
    )?;
    let key: Box<str> = limits.check_name(&name)?.into();
    let var_type = VarType::parse(var_type)?;
    let constraints = Constraints::compile(var_type, &constraints)?;
    let value = validate(var_type, &constraints, value).map_err(|e| at("value", e))?;
    let mut newer = version;
    for (n, entry) in history.iter_mut().enumerate() {
        if entry.version >= newer {
            return Err(invalid("history versions out of order"));
        }
        newer = entry.version;
        let v = std::mem::take(&mut entry.value);
        entry.value =
            validate(var_type, &constraints, v).map_err(|e| at(format_args!("history {n}"), e))?;
    }
    let acl = Acl::build(&rules, &metadata).map_err(|e| at("access_rules", e))?;
    let var = Variable {
        id: id.into(),
        name,
        var_type,
        constraints: Box::new(constraints),
        value,
        version,
        metadata,
        description,
        created_at,
        updated_at,
        last_write: non_empty(last_write),
        history,
        max_history,
        lock: Default::default(),
        acl: acl.map(std::sync::Arc::new),
    };
    Ok((key, var))
}

fn decode_entry(r: &mut Reader, limits: &Limits) -> Result<HistoryEntry> {
    let mut entry = HistoryEntry {
        version: 0,
        value: Value::Nil,
        updated_at: 0,
        metadata: None,
    };
    fields(
        r,
        &["version", "value", "updated_at", "metadata"],
        &[0, 1, 2, 3],
        |i, r| {
            match i {
                0 => entry.version = version(r.u64()?)?,
                1 => entry.value = r.value(&mut Budget::new(limits.max_value_bytes), 1)?,
                2 => entry.updated_at = timestamp(r.i64()?)?,
                _ => {
                    let m = r.value(&mut Budget::new(limits.max_value_bytes), 1)?;
                    entry.metadata = non_empty(metadata_map(m, true)?);
                }
            }
            Ok(())
        },
    )?;
    Ok(entry)
}

fn non_empty(v: Value) -> Option<Box<Value>> {
    match v {
        Value::Nil => None,
        Value::Map(ref pairs) if pairs.is_empty() => None,
        v => Some(Box::new(v)),
    }
}

#[cfg(test)]
mod tests;
