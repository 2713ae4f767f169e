//! `Value`: the engine's dynamic term, a subset of Erlang terms that can be
//! stored, versioned, exported and sent over the port protocol.
//!
//! Strings and containers are boxed slices so a `Value` is 24 bytes: a float
//! variable with 50 history entries stays well under 4 KB.
//!
//! In MessagePack (snapshots and the port protocol) a value is written in the
//! natural way, except atoms (ext type 1, the name's UTF-8 bytes) and tuples
//! (ext type 2, a MessagePack array of the elements), so both round-trip.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// MessagePack extension type carrying an atom name.
pub const EXT_ATOM: i8 = 1;
/// MessagePack extension type carrying a tuple (an encoded array).
pub const EXT_TUPLE: i8 = 2;
/// Deepest nesting accepted anywhere a value is decoded; walks stay shallow.
pub const MAX_DEPTH: usize = 64;

#[derive(Clone, Debug, PartialEq, Default)]
pub enum Value {
    #[default]
    Nil,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// A UTF-8 binary.
    Str(Box<str>),
    /// A binary that is not valid UTF-8.
    Bytes(Box<[u8]>),
    Atom(Box<str>),
    List(Box<[Value]>),
    Tuple(Box<[Value]>),
    /// Key/value pairs in insertion order; keys are unique.
    Map(Box<[(Value, Value)]>),
}

impl Value {
    pub fn atom(name: &str) -> Self {
        Value::Atom(name.into())
    }

    pub fn str(s: &str) -> Self {
        Value::Str(s.into())
    }

    /// `{tag, detail}`, the shape of error details.
    pub fn tagged(tag: &str, detail: Value) -> Self {
        Value::Tuple(vec![Value::atom(tag), detail].into())
    }

    pub fn empty_map() -> Self {
        Value::Map(Box::new([]))
    }

    pub fn is_nil(&self) -> bool {
        matches!(self, Value::Nil)
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Float(f) => Some(f),
            Value::Int(i) => Some(i as f64),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::Int(i) => Some(i),
            _ => None,
        }
    }

    /// The text of a string or an atom.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Str(s) | Value::Atom(s) => Some(s),
            _ => None,
        }
    }

    /// Looks `key` up in a map, where the key may be an atom or a string.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(pairs) => pairs
                .iter()
                .find(|(k, _)| k.as_text() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// Returns a map with `key` (as an atom) set to `value`.
    pub fn with(&self, key: &str, value: Value) -> Value {
        let mut pairs: Vec<(Value, Value)> = match self {
            Value::Map(pairs) => pairs
                .iter()
                .filter(|(k, _)| k.as_text() != Some(key))
                .cloned()
                .collect(),
            _ => Vec::new(),
        };
        pairs.push((Value::atom(key), value));
        Value::Map(pairs.into())
    }

    /// Heap bytes owned by this value (not counting the 24 bytes of `self`).
    /// Iterative, so arbitrarily deep values cannot overflow the stack.
    pub fn heap_size(&self) -> usize {
        match self {
            Value::Nil | Value::Bool(_) | Value::Int(_) | Value::Float(_) => return 0,
            Value::Str(s) | Value::Atom(s) => return s.len(),
            Value::Map(pairs) if pairs.is_empty() => return 0,
            _ => {}
        }
        let mut total = 0;
        let mut stack = vec![self];
        while let Some(v) = stack.pop() {
            match v {
                Value::Str(s) | Value::Atom(s) => total += s.len(),
                Value::Bytes(b) => total += b.len(),
                Value::List(xs) | Value::Tuple(xs) => {
                    total += xs.len() * std::mem::size_of::<Value>();
                    stack.extend(xs.iter());
                }
                Value::Map(pairs) => {
                    total += pairs.len() * 2 * std::mem::size_of::<Value>();
                    for (k, v) in pairs.iter() {
                        stack.push(k);
                        stack.push(v);
                    }
                }
                _ => {}
            }
        }
        total
    }

    /// Nesting depth, computed iteratively.
    pub fn depth(&self) -> usize {
        match self {
            Value::List(xs) | Value::Tuple(xs) if !xs.is_empty() => {}
            Value::Map(pairs) if !pairs.is_empty() => {}
            _ => return 1,
        }
        let mut max = 0;
        let mut stack = vec![(self, 1usize)];
        while let Some((v, d)) = stack.pop() {
            max = max.max(d);
            match v {
                Value::List(xs) | Value::Tuple(xs) => stack.extend(xs.iter().map(|x| (x, d + 1))),
                Value::Map(pairs) => {
                    for (k, v) in pairs.iter() {
                        stack.push((k, d + 1));
                        stack.push((v, d + 1));
                    }
                }
                _ => {}
            }
        }
        max
    }

    /// True when every float inside is finite.
    pub fn all_finite(&self) -> bool {
        let mut stack = vec![self];
        while let Some(v) = stack.pop() {
            match v {
                Value::Float(f) if !f.is_finite() => return false,
                Value::List(xs) | Value::Tuple(xs) => stack.extend(xs.iter()),
                Value::Map(pairs) => {
                    for (k, v) in pairs.iter() {
                        stack.push(k);
                        stack.push(v);
                    }
                }
                _ => {}
            }
        }
        true
    }

    /// Converts to an `rmpv::Value`, the MessagePack model. Fails past
    /// [`MAX_DEPTH`].
    pub fn to_msgpack(&self) -> Result<rmpv::Value, String> {
        to_rmpv(self, 0)
    }

    /// Converts from an `rmpv::Value`. Fails on unknown ext types, non-string
    /// atoms, or nesting past [`MAX_DEPTH`].
    pub fn from_msgpack(v: &rmpv::Value) -> Result<Value, String> {
        from_rmpv(v, 0)
    }
}

fn to_rmpv(v: &Value, depth: usize) -> Result<rmpv::Value, String> {
    use rmpv::Value as M;
    if depth > MAX_DEPTH {
        return Err("nested too deeply".into());
    }
    Ok(match v {
        Value::Nil => M::Nil,
        Value::Bool(b) => M::Boolean(*b),
        Value::Int(i) => M::from(*i),
        Value::Float(f) => M::F64(*f),
        Value::Str(s) => M::from(&**s),
        Value::Bytes(b) => M::Binary(b.to_vec()),
        Value::Atom(a) => M::Ext(EXT_ATOM, a.as_bytes().to_vec()),
        Value::List(xs) => M::Array(
            xs.iter()
                .map(|x| to_rmpv(x, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        Value::Tuple(xs) => {
            let arr = M::Array(
                xs.iter()
                    .map(|x| to_rmpv(x, depth + 1))
                    .collect::<Result<_, _>>()?,
            );
            let mut buf = Vec::new();
            rmpv::encode::write_value(&mut buf, &arr).map_err(|e| e.to_string())?;
            M::Ext(EXT_TUPLE, buf)
        }
        Value::Map(pairs) => M::Map(
            pairs
                .iter()
                .map(|(k, v)| Ok((to_rmpv(k, depth + 1)?, to_rmpv(v, depth + 1)?)))
                .collect::<Result<_, String>>()?,
        ),
    })
}

fn from_rmpv(v: &rmpv::Value, depth: usize) -> Result<Value, String> {
    use rmpv::Value as M;
    if depth > MAX_DEPTH {
        return Err("nested too deeply".into());
    }
    Ok(match v {
        M::Nil => Value::Nil,
        M::Boolean(b) => Value::Bool(*b),
        M::Integer(i) => match i.as_i64() {
            Some(i) => Value::Int(i),
            None => return Err("integer out of range".into()),
        },
        M::F32(f) => Value::Float(f64::from(*f)),
        M::F64(f) => Value::Float(*f),
        M::String(s) => match s.as_str() {
            Some(s) => Value::Str(s.into()),
            None => Value::Bytes(s.as_bytes().into()),
        },
        M::Binary(b) => match std::str::from_utf8(b) {
            Ok(s) => Value::Str(s.into()),
            Err(_) => Value::Bytes(b.as_slice().into()),
        },
        M::Array(xs) => Value::List(
            xs.iter()
                .map(|x| from_rmpv(x, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        M::Map(pairs) => Value::Map(
            pairs
                .iter()
                .map(|(k, v)| Ok((from_rmpv(k, depth + 1)?, from_rmpv(v, depth + 1)?)))
                .collect::<Result<_, String>>()?,
        ),
        M::Ext(EXT_ATOM, bytes) => match std::str::from_utf8(bytes) {
            Ok(s) if s.len() <= 255 => Value::Atom(s.into()),
            _ => return Err("bad atom".into()),
        },
        M::Ext(EXT_TUPLE, bytes) => {
            let inner = rmpv::decode::read_value_with_max_depth(&mut &bytes[..], MAX_DEPTH)
                .map_err(|e| e.to_string())?;
            match from_rmpv(&inner, depth + 1)? {
                Value::List(xs) => Value::Tuple(xs),
                _ => return Err("bad tuple".into()),
            }
        }
        M::Ext(t, _) => return Err(format!("unknown ext type {t}")),
    })
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_msgpack()
            .map_err(serde::ser::Error::custom)?
            .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = rmpv::Value::deserialize(d)?;
        Value::from_msgpack(&raw).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn seq(f: &mut fmt::Formatter<'_>, xs: &[Value], open: &str, close: &str) -> fmt::Result {
            f.write_str(open)?;
            for (i, x) in xs.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{x}")?;
            }
            f.write_str(close)
        }
        match self {
            Value::Nil => f.write_str("nil"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x:?}"),
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Bytes(b) => write!(f, "<<{} bytes>>", b.len()),
            Value::Atom(a) => write!(f, ":{a}"),
            Value::List(xs) => seq(f, xs, "[", "]"),
            Value::Tuple(xs) => seq(f, xs, "{", "}"),
            Value::Map(pairs) => {
                f.write_str("%{")?;
                for (i, (k, v)) in pairs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k} => {v}")?;
                }
                f.write_str("}")
            }
        }
    }
}

/// Drops a value iteratively. The default recursive drop of a value nested
/// thousands deep could overflow a scheduler's stack; decoders refuse such
/// values, but anything built in Rust may use this.
pub fn drop_deep(v: Value) {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::List(xs) | Value::Tuple(xs) => stack.extend(xs.into_vec()),
            Value::Map(pairs) => {
                for (k, v) in pairs.into_vec() {
                    stack.push(k);
                    stack.push(v);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_is_small() {
        assert_eq!(std::mem::size_of::<Value>(), 24);
    }

    #[test]
    fn msgpack_round_trip_keeps_atoms_and_tuples() {
        let v = Value::Map(
            vec![
                (
                    Value::atom("a"),
                    Value::Tuple(vec![Value::Int(1), Value::str("x")].into()),
                ),
                (
                    Value::str("b"),
                    Value::List(vec![Value::Float(0.5), Value::Nil].into()),
                ),
            ]
            .into(),
        );
        let bytes = rmp_serde::to_vec(&v).unwrap();
        let back: Value = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(v, back);
    }

    #[test]
    fn depth_counts_containers_empty_or_not() {
        assert_eq!(Value::Float(0.5).depth(), 1);
        assert_eq!(Value::empty_map().depth(), 1);
        assert_eq!(Value::List(Box::new([])).depth(), 1);
        let nested = Value::List(vec![Value::Tuple(vec![Value::empty_map()].into())].into());
        assert_eq!(nested.depth(), 3);
        let map = Value::Map(vec![(Value::atom("k"), Value::List(Box::new([])))].into());
        assert_eq!(map.depth(), 2);
    }

    #[test]
    fn deep_values_are_rejected_not_overflowed() {
        let mut v = Value::Nil;
        for _ in 0..100_000 {
            v = Value::List(vec![v].into());
        }
        assert_eq!(v.depth(), 100_001);
        assert!(v.to_msgpack().is_err());
        // Dropping a deep value must not overflow either.
        crate::value::drop_deep(v);
    }
}
