//! The shapes of the maps replies carry, defined once: each shape is a list
//! of keys and a function giving the fields of one item in key order. A
//! transport encodes a [`Field`] its own way: [`Field::to_value`] for the
//! port (MessagePack), the NIF straight into terms with its atoms for the
//! keys made once, so both give the same map.

use crate::audit::AuditEntry;
use crate::session::{access_rules_of, Session};
use crate::value::Value;
use crate::variable::{HistoryEntry, Variable};

/// One field of a reply map, borrowed from the state where it can be.
#[derive(Debug)]
pub enum Field<'a> {
    Nil,
    Int(i64),
    /// A count or version: an integer, capped at `i64::MAX`.
    Count(u64),
    Atom(&'static str),
    Str(&'a str),
    Value(&'a Value),
    Owned(Value),
}

impl Field<'_> {
    pub fn to_value(&self) -> Value {
        match self {
            Field::Nil => Value::Nil,
            Field::Int(n) => Value::Int(*n),
            Field::Count(n) => count(*n),
            Field::Atom(a) => Value::atom(a),
            Field::Str(s) => Value::str(s),
            Field::Value(v) => (*v).clone(),
            Field::Owned(v) => v.clone(),
        }
    }
}

fn count(n: u64) -> Value {
    Value::Int(i64::try_from(n).unwrap_or(i64::MAX))
}

fn opt_str(s: Option<&str>) -> Field<'_> {
    s.map_or(Field::Nil, Field::Str)
}

/// The map of a shape, as a [`Value`] (atom keys).
pub fn to_map(keys: &[&'static str], fields: &[Field]) -> Value {
    Value::Map(
        keys.iter()
            .zip(fields)
            .map(|(k, f)| (Value::atom(k), f.to_value()))
            .collect(),
    )
}

/// A variable as the API returns it (times in microseconds since the epoch;
/// `name` in the form it was registered; `last_write` the metadata of the
/// current version's write; `access_rules` in canonical form).
pub const VARIABLE_KEYS: [&str; 12] = [
    "id",
    "name",
    "type",
    "value",
    "version",
    "constraints",
    "metadata",
    "description",
    "created_at",
    "updated_at",
    "last_write",
    "access_rules",
];

pub fn variable_fields(v: &Variable) -> [Field<'_>; 12] {
    [
        Field::Str(&v.id),
        Field::Value(&v.name),
        Field::Atom(v.var_type.name()),
        Field::Value(&v.value),
        Field::Count(v.version),
        Field::Value(&v.constraints.source),
        Field::Value(&v.metadata),
        opt_str(v.description.as_deref()),
        Field::Int(v.created_at),
        Field::Int(v.updated_at),
        Field::Owned(v.write_metadata()),
        Field::Owned(access_rules_of(v)),
    ]
}

pub fn variable_value(v: &Variable) -> Value {
    to_map(&VARIABLE_KEYS, &variable_fields(v))
}

/// A history entry.
pub const HISTORY_KEYS: [&str; 4] = ["version", "value", "updated_at", "metadata"];

pub fn history_fields(h: &HistoryEntry) -> [Field<'_>; 4] {
    [
        Field::Count(h.version),
        Field::Value(&h.value),
        Field::Int(h.updated_at),
        match h.metadata.as_deref() {
            Some(m) => Field::Value(m),
            None => Field::Owned(Value::empty_map()),
        },
    ]
}

pub fn history_value(h: &HistoryEntry) -> Value {
    to_map(&HISTORY_KEYS, &history_fields(h))
}

/// A session's settings and size at `now_us` (`rate_limit` is `nil` or
/// `%{ops_per_sec, burst, available}`).
pub const SESSION_KEYS: [&str; 9] = [
    "session_id",
    "created_at",
    "last_access",
    "ttl_ms",
    "max_history",
    "variable_count",
    "metadata",
    "rate_limit",
    "audit_capacity",
];

pub fn session_fields(s: &Session, now_us: i64) -> [Field<'_>; 9] {
    [
        Field::Str(&s.id),
        Field::Int(s.created_at),
        Field::Int(s.last_access()),
        s.opts.ttl_ms.map_or(Field::Nil, Field::Count),
        Field::Count(s.opts.max_history as u64),
        Field::Count(s.len() as u64),
        Field::Value(&s.opts.metadata),
        Field::Owned(rate_limit_value(s, now_us)),
        Field::Count(s.audit_ring().capacity() as u64),
    ]
}

pub fn session_info(s: &Session, now_us: i64) -> Value {
    to_map(&SESSION_KEYS, &session_fields(s, now_us))
}

/// `nil` or `%{ops_per_sec, burst, available}`.
pub fn rate_limit_value(s: &Session, now_us: i64) -> Value {
    match s.rate_limit(now_us) {
        None => Value::Nil,
        Some((limit, available)) => to_map(
            &["ops_per_sec", "burst", "available"],
            &[
                Field::Count(limit.ops_per_sec),
                Field::Count(limit.burst),
                Field::Count(available),
            ],
        ),
    }
}

/// An audit entry (`at` in microseconds since the epoch; `principal`,
/// `variable` and `permission` may be nil).
pub const AUDIT_KEYS: [&str; 6] = ["seq", "at", "event", "principal", "variable", "permission"];

pub fn audit_fields(e: &AuditEntry) -> [Field<'_>; 6] {
    [
        Field::Count(e.seq),
        Field::Int(e.at),
        Field::Atom(e.event.name()),
        opt_str(e.principal.as_deref()),
        opt_str(e.variable.as_deref()),
        e.permission.map_or(Field::Nil, |p| Field::Atom(p.name())),
    ]
}

pub fn audit_entry_value(e: &AuditEntry) -> Value {
    to_map(&AUDIT_KEYS, &audit_fields(e))
}

/// A list of counts or versions.
pub fn counts(ns: impl IntoIterator<Item = u64>) -> Value {
    Value::List(ns.into_iter().map(count).collect())
}

/// A count or version.
pub fn count_value(n: u64) -> Value {
    count(n)
}
