//! Size limits checked at the engine's boundary. Defaults are documented in
//! the README ("Limits"); `Store::with_limits` overrides them.

use crate::error::{Error, Result};
use crate::value::{Value, MAX_DEPTH};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Heap bytes of one value or one metadata map.
    pub max_value_bytes: usize,
    /// Bytes of a variable name or a session id.
    pub max_name_bytes: usize,
    /// Variables in one session.
    pub max_variables: usize,
    /// Largest `max_history` a session may ask for.
    pub max_history: usize,
    /// Bytes of a snapshot handed to import.
    pub max_snapshot_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_value_bytes: 1 << 20,
            max_name_bytes: 255,
            max_variables: 100_000,
            max_history: 10_000,
            max_snapshot_bytes: 256 << 20,
        }
    }
}

impl Limits {
    /// A variable name: a non-empty atom or string of at most
    /// `max_name_bytes`. Returns its text, the key it is indexed under.
    pub fn check_name<'a>(&self, name: &'a Value) -> Result<&'a str> {
        match name {
            Value::Atom(s) | Value::Str(s) if !s.is_empty() && s.len() <= self.max_name_bytes => {
                Ok(s)
            }
            Value::Atom(_) | Value::Str(_) => Err(Error::invalid_arg("bad_name_length")),
            _ => Err(Error::invalid_arg("name_must_be_atom_or_string")),
        }
    }

    pub fn check_session_id(&self, id: &str) -> Result<()> {
        if id.is_empty() || id.len() > self.max_name_bytes {
            return Err(Error::invalid_arg("bad_session_id"));
        }
        Ok(())
    }

    pub fn check_value(&self, v: &Value) -> Result<()> {
        if v.heap_size() > self.max_value_bytes {
            return Err(Error::TooLarge(self.max_value_bytes));
        }
        if v.depth() > MAX_DEPTH {
            return Err(Error::invalid_arg("nested_too_deeply"));
        }
        Ok(())
    }

    pub fn check_history(&self, n: i64) -> Result<usize> {
        if n < 0 || n as u64 > self.max_history as u64 {
            return Err(Error::InvalidArgument(Value::tagged(
                "max_history",
                Value::Int(n),
            )));
        }
        Ok(n as usize)
    }
}
