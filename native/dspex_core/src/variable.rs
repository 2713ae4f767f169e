//! One variable: its type and constraints, current value and version, and a
//! bounded history of the versions before it.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::acl::Acl;
use crate::error::{Error, Result};
use crate::locks::{Fence, OptimizerId, VarLock};
use crate::types::{validate, Constraints, VarType};
use crate::value::Value;

/// A previous version of a variable, as `get_variable_history` returns it.
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryEntry {
    pub version: u64,
    pub value: Value,
    /// Microseconds since the Unix epoch.
    pub updated_at: i64,
    /// The metadata of the write that produced this version (`None` for `%{}`).
    pub metadata: Option<Box<Value>>,
}

#[derive(Clone, Debug)]
pub struct Variable {
    pub id: Box<str>,
    /// The name as registered: an atom or a string.
    pub name: Value,
    pub var_type: VarType,
    pub constraints: Box<Constraints>,
    pub value: Value,
    pub version: u64,
    pub metadata: Value,
    pub description: Option<Box<str>>,
    pub created_at: i64,
    pub updated_at: i64,
    /// Metadata of the write that produced the current version.
    pub last_write: Option<Box<Value>>,
    pub history: VecDeque<HistoryEntry>,
    pub max_history: usize,
    /// The optimizer lock on this variable, kept by the lock table.
    pub lock: VarLock,
    /// Compiled access rules and owner; `None`: only the hosting session.
    /// Shared by clones; replaced whole when the rules change.
    pub acl: Option<Arc<Acl>>,
}

/// What a write needs beyond the value.
#[derive(Clone, Debug, Default)]
pub struct WriteMeta {
    pub metadata: Value,
    pub expected_version: Option<u64>,
}

impl Variable {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: Box<str>,
        name: Value,
        var_type: VarType,
        constraints: Constraints,
        initial: Value,
        metadata: Value,
        description: Option<Box<str>>,
        max_history: usize,
        now: i64,
    ) -> Result<Self> {
        let value = validate(var_type, &constraints, initial)?;
        Ok(Variable {
            id,
            name,
            var_type,
            constraints: Box::new(constraints),
            value,
            version: 0,
            metadata,
            description,
            created_at: now,
            updated_at: now,
            last_write: None,
            history: VecDeque::new(),
            max_history,
            lock: VarLock::default(),
            acl: None,
        })
    }

    /// Validates without writing; the coerced value on success.
    pub fn check(&self, value: Value, expected_version: Option<u64>) -> Result<Value> {
        if let Some(expected) = expected_version {
            if expected != self.version {
                return Err(Error::VersionMismatch(self.version));
            }
        }
        validate(self.var_type, &self.constraints, value)
    }

    /// Writes an already validated value: pushes the current version to
    /// history and bumps the version.
    pub fn apply(&mut self, value: Value, metadata: Value, now: i64) -> u64 {
        let previous = HistoryEntry {
            version: self.version,
            value: std::mem::replace(&mut self.value, value),
            updated_at: self.updated_at,
            metadata: self.last_write.take(),
        };
        if self.max_history > 0 {
            if self.history.len() >= self.max_history {
                self.history.pop_back();
            }
            self.history.push_front(previous);
        }
        self.last_write = non_empty(metadata);
        self.version += 1;
        self.updated_at = now;
        self.version
    }

    /// Validates and writes.
    pub fn set(&mut self, value: Value, meta: WriteMeta, now: i64) -> Result<u64> {
        let value = self.check(value, meta.expected_version)?;
        Ok(self.apply(value, meta.metadata, now))
    }

    /// The value `version` had, if still known.
    pub fn value_at(&self, version: u64) -> Result<&Value> {
        if version == self.version {
            return Ok(&self.value);
        }
        self.history
            .iter()
            .find(|e| e.version == version)
            .map(|e| &e.value)
            .ok_or(Error::VersionNotFound)
    }

    /// Newest first, at most `limit` entries.
    pub fn history(&self, limit: usize) -> impl Iterator<Item = &HistoryEntry> {
        self.history.iter().take(limit)
    }

    /// The metadata of the current version's write (`%{}` when none).
    pub fn write_metadata(&self) -> Value {
        self.last_write
            .as_deref()
            .cloned()
            .unwrap_or_else(Value::empty_map)
    }

    /// Approximate heap bytes held by this variable.
    pub fn heap_size(&self) -> usize {
        let entry = std::mem::size_of::<HistoryEntry>();
        self.history.capacity() * entry
            + self
                .history
                .iter()
                .map(|e| e.value.heap_size() + e.metadata.as_ref().map_or(0, |m| m.heap_size()))
                .sum::<usize>()
            + self.value.heap_size()
            + self.metadata.heap_size()
            + self.id.len()
            + self.name.heap_size()
    }
}

fn non_empty(metadata: Value) -> Option<Box<Value>> {
    match metadata {
        Value::Nil => None,
        Value::Map(ref pairs) if pairs.is_empty() => None,
        m => Some(Box::new(m)),
    }
}

/// The in-process fence: the lock table updates the variable inside its own
/// critical section.
impl Fence for Mutex<Variable> {
    fn granted(&self, optimizer: &OptimizerId, token: u64, preempted: Option<&OptimizerId>) {
        self.lock().lock.grant(optimizer, token, preempted);
    }

    fn released(&self, token: u64) {
        self.lock().lock.release(token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn float_var(max_history: usize) -> Variable {
        Variable::new(
            "var_t_1".into(),
            Value::atom("t"),
            VarType::Float,
            Constraints::default(),
            Value::Float(0.0),
            Value::empty_map(),
            None,
            max_history,
            0,
        )
        .unwrap()
    }

    #[test]
    fn writes_bump_version_and_keep_bounded_history() {
        let mut v = float_var(3);
        for i in 1..=5 {
            assert_eq!(
                v.set(Value::Int(i), WriteMeta::default(), i).unwrap(),
                i as u64
            );
        }
        assert_eq!(v.history.len(), 3);
        let versions: Vec<u64> = v.history(10).map(|e| e.version).collect();
        assert_eq!(versions, vec![4, 3, 2]);
        assert_eq!(v.value_at(3), Ok(&Value::Float(3.0)));
        assert_eq!(v.value_at(1), Err(Error::VersionNotFound));
    }

    #[test]
    fn expected_version_mismatch_changes_nothing() {
        let mut v = float_var(50);
        let meta = WriteMeta {
            expected_version: Some(7),
            ..Default::default()
        };
        assert_eq!(
            v.set(Value::Float(1.0), meta, 1),
            Err(Error::VersionMismatch(0))
        );
        assert_eq!(v.version, 0);
        assert!(v.history.is_empty());
    }

    #[test]
    fn a_float_with_full_history_stays_under_4kb() {
        let mut v = float_var(50);
        for i in 0..200 {
            v.set(Value::Float(i as f64), WriteMeta::default(), i)
                .unwrap();
        }
        let total = std::mem::size_of::<Variable>() + v.heap_size();
        assert!(total < 4096, "{total} bytes");
    }
}
