//! The eight variable types, their constraints, and the validation and
//! coercion a value goes through before it is stored.
//!
//! Coercions: integer -> float for `:float`; a whole float -> integer for
//! `:integer`; `"true"`/`"false"` -> boolean. A value of the wrong type is
//! `InvalidValue`; a value of the right type that breaks a constraint is
//! `ConstraintViolation`.

use regex::Regex;

use crate::error::{Error, Result};
use crate::value::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VarType {
    Float,
    Integer,
    String,
    Boolean,
    Choice,
    Module,
    Embedding,
    Tensor,
}

impl VarType {
    pub const ALL: [VarType; 8] = [
        VarType::Float,
        VarType::Integer,
        VarType::String,
        VarType::Boolean,
        VarType::Choice,
        VarType::Module,
        VarType::Embedding,
        VarType::Tensor,
    ];

    pub fn name(self) -> &'static str {
        match self {
            VarType::Float => "float",
            VarType::Integer => "integer",
            VarType::String => "string",
            VarType::Boolean => "boolean",
            VarType::Choice => "choice",
            VarType::Module => "module",
            VarType::Embedding => "embedding",
            VarType::Tensor => "tensor",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| Error::InvalidArgument(Value::tagged("unknown_type", Value::str(name))))
    }
}

/// Constraints compiled once at registration. `source` keeps the map the
/// caller gave, to hand back and to export.
#[derive(Clone, Debug, Default)]
pub struct Constraints {
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub min_length: Option<usize>,
    pub max_length: Option<usize>,
    pub pattern: Option<Regex>,
    pub one_of: Option<Box<[Value]>>,
    pub allowed_modules: Option<Box<[Box<str>]>>,
    pub dimensions: Option<usize>,
    pub shape: Option<Box<[u64]>>,
    pub source: Value,
}

/// Longest pattern accepted, and the compiled-size cap handed to `regex`.
const MAX_PATTERN_LEN: usize = 1024;
const REGEX_SIZE_LIMIT: usize = 1 << 20;

impl Constraints {
    /// Compiles a constraint map (`nil` or `%{}` for none) for a type.
    pub fn compile(var_type: VarType, source: &Value) -> Result<Self> {
        let mut c = Constraints {
            source: if source.is_nil() {
                Value::empty_map()
            } else {
                source.clone()
            },
            ..Default::default()
        };
        let pairs: &[(Value, Value)] = match source {
            Value::Nil => &[],
            Value::Map(pairs) => pairs,
            _ => return Err(Error::invalid_arg("constraints_must_be_a_map")),
        };
        for (key, v) in pairs.iter() {
            let key = key
                .as_text()
                .ok_or_else(|| Error::invalid_arg("constraint_keys_must_be_atoms"))?;
            let bad = || Error::InvalidArgument(Value::tagged("bad_constraint", Value::atom(key)));
            match key {
                "min" => c.min = Some(v.as_f64().ok_or_else(bad)?),
                "max" => c.max = Some(v.as_f64().ok_or_else(bad)?),
                "min_length" => c.min_length = Some(non_negative(v).ok_or_else(bad)?),
                "max_length" => c.max_length = Some(non_negative(v).ok_or_else(bad)?),
                "pattern" => {
                    let p = match v {
                        Value::Str(p) if p.len() <= MAX_PATTERN_LEN => p,
                        _ => return Err(bad()),
                    };
                    let anchored = format!("^(?:{p})$");
                    let re = regex::RegexBuilder::new(&anchored)
                        .size_limit(REGEX_SIZE_LIMIT)
                        .build()
                        .map_err(|_| bad())?;
                    c.pattern = Some(re);
                }
                "enum" | "choices" => match v {
                    Value::List(xs) if !xs.is_empty() => c.one_of = Some(xs.clone()),
                    _ => return Err(bad()),
                },
                "allowed_modules" => match v {
                    Value::List(xs) => {
                        let names = xs
                            .iter()
                            .map(|m| m.as_text().map(module_name).ok_or_else(bad))
                            .collect::<Result<Vec<_>>>()?;
                        c.allowed_modules = Some(names.into_iter().map(Into::into).collect());
                    }
                    _ => return Err(bad()),
                },
                "dimensions" => c.dimensions = Some(non_negative(v).ok_or_else(bad)?),
                "shape" => match v {
                    Value::List(xs) => {
                        let dims = xs
                            .iter()
                            .map(|d| non_negative(d).map(|d| d as u64).ok_or_else(bad))
                            .collect::<Result<Vec<_>>>()?;
                        c.shape = Some(dims.into());
                    }
                    _ => return Err(bad()),
                },
                // Unknown keys are kept (for the caller) and not enforced.
                _ => {}
            }
        }
        if let (Some(lo), Some(hi)) = (c.min, c.max) {
            if lo > hi {
                return Err(Error::invalid_arg("min_greater_than_max"));
            }
        }
        if var_type == VarType::Choice && c.one_of.is_none() {
            return Err(Error::invalid_arg("choice_needs_choices"));
        }
        Ok(c)
    }
}

fn non_negative(v: &Value) -> Option<usize> {
    match *v {
        Value::Int(i) if i >= 0 => usize::try_from(i).ok(),
        _ => None,
    }
}

/// `Elixir.Foo` and `Foo` name the same module.
fn module_name(s: &str) -> &str {
    s.strip_prefix("Elixir.").unwrap_or(s)
}

fn invalid(expected: &str) -> Error {
    Error::InvalidValue(Value::tagged("expected", Value::atom(expected)))
}

fn violation(tag: &str, detail: Value) -> Error {
    Error::ConstraintViolation(Value::tagged(tag, detail))
}

/// Validates `value` as `var_type` under `c`, returning the coerced value.
pub fn validate(var_type: VarType, c: &Constraints, value: Value) -> Result<Value> {
    match var_type {
        VarType::Float => {
            let f = match value {
                Value::Float(f) => f,
                Value::Int(i) => i as f64,
                _ => return Err(invalid("float")),
            };
            if !f.is_finite() {
                return Err(Error::InvalidValue(Value::atom("not_finite")));
            }
            check_range(c, f)?;
            Ok(Value::Float(f))
        }
        VarType::Integer => {
            let i = match value {
                Value::Int(i) => i,
                Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => f as i64,
                _ => return Err(invalid("integer")),
            };
            check_range(c, i as f64)?;
            Ok(Value::Int(i))
        }
        VarType::String => {
            let s = match &value {
                Value::Str(s) => s,
                Value::Bytes(_) => return Err(Error::InvalidValue(Value::atom("invalid_utf8"))),
                _ => return Err(invalid("string")),
            };
            let len = s.chars().count();
            if let Some(min) = c.min_length {
                if len < min {
                    return Err(violation("min_length", Value::Int(min as i64)));
                }
            }
            if let Some(max) = c.max_length {
                if len > max {
                    return Err(violation("max_length", Value::Int(max as i64)));
                }
            }
            if let Some(re) = &c.pattern {
                if !re.is_match(s) {
                    return Err(violation(
                        "pattern",
                        c.source.get("pattern").cloned().unwrap_or_default(),
                    ));
                }
            }
            check_one_of(c, &value)?;
            Ok(value)
        }
        VarType::Boolean => match value {
            Value::Bool(_) => Ok(value),
            Value::Str(ref s) if &**s == "true" => Ok(Value::Bool(true)),
            Value::Str(ref s) if &**s == "false" => Ok(Value::Bool(false)),
            _ => Err(invalid("boolean")),
        },
        VarType::Choice => {
            if !matches!(
                value,
                Value::Str(_) | Value::Atom(_) | Value::Int(_) | Value::Float(_) | Value::Bool(_)
            ) {
                return Err(invalid("choice"));
            }
            check_one_of(c, &value)?;
            Ok(value)
        }
        VarType::Module => {
            let name = match &value {
                Value::Atom(a) | Value::Str(a) if !a.is_empty() => module_name(a),
                _ => return Err(invalid("module")),
            };
            if let Some(allowed) = &c.allowed_modules {
                if !allowed.iter().any(|m| &**m == name) {
                    return Err(violation("allowed_modules", Value::str(name)));
                }
            }
            Ok(value)
        }
        VarType::Embedding => {
            let xs = match value {
                Value::List(xs) => xs,
                _ => return Err(invalid("embedding")),
            };
            let floats = numbers(&xs).ok_or_else(|| invalid("embedding"))?;
            if let Some(d) = c.dimensions {
                if floats.len() != d {
                    return Err(violation("dimensions", Value::Int(d as i64)));
                }
            }
            Ok(Value::List(floats))
        }
        VarType::Tensor => validate_tensor(c, value),
    }
}

fn check_range(c: &Constraints, x: f64) -> Result<()> {
    if let Some(min) = c.min {
        if x < min {
            return Err(violation("below_min", Value::Float(min)));
        }
    }
    if let Some(max) = c.max {
        if x > max {
            return Err(violation("above_max", Value::Float(max)));
        }
    }
    Ok(())
}

fn check_one_of(c: &Constraints, value: &Value) -> Result<()> {
    if let Some(options) = &c.one_of {
        let hit = options
            .iter()
            .any(|o| o == value || (o.as_text().is_some() && o.as_text() == value.as_text()));
        if !hit {
            return Err(violation("not_in_choices", Value::List(options.clone())));
        }
    }
    Ok(())
}

/// Every element as a finite float, or `None`.
fn numbers(xs: &[Value]) -> Option<Box<[Value]>> {
    xs.iter()
        .map(|x| match x.as_f64() {
            Some(f) if f.is_finite() => Some(Value::Float(f)),
            _ => None,
        })
        .collect()
}

fn validate_tensor(c: &Constraints, value: Value) -> Result<Value> {
    let (shape, data) = match (value.get("shape"), value.get("data")) {
        (Some(Value::List(shape)), Some(Value::List(data))) => (shape, data),
        _ => return Err(invalid("tensor")),
    };
    let dims: Vec<u64> = shape
        .iter()
        .map(|d| match *d {
            Value::Int(i) if i >= 0 => Some(i as u64),
            _ => None,
        })
        .collect::<Option<_>>()
        .ok_or_else(|| invalid("tensor"))?;
    let expected = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| invalid("tensor"))?;
    if expected != data.len() as u64 {
        return Err(Error::InvalidValue(Value::atom("shape_data_mismatch")));
    }
    if let Some(want) = &c.shape {
        if **want != *dims {
            let want = want.iter().map(|&d| Value::Int(d as i64)).collect();
            return Err(violation("shape", Value::List(want)));
        }
    }
    let data = numbers(data).ok_or_else(|| invalid("tensor"))?;
    Ok(Value::Map(
        vec![
            (Value::str("shape"), Value::List(shape.clone())),
            (Value::str("data"), Value::List(data)),
        ]
        .into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, Value)]) -> Value {
        Value::Map(
            pairs
                .iter()
                .map(|(k, v)| (Value::atom(k), v.clone()))
                .collect(),
        )
    }

    fn check(t: VarType, c: &Value, v: Value) -> Result<Value> {
        validate(t, &Constraints::compile(t, c)?, v)
    }

    #[test]
    fn float_coerces_integers_and_checks_range() {
        let c = map(&[("min", Value::Float(0.0)), ("max", Value::Int(2))]);
        assert_eq!(
            check(VarType::Float, &c, Value::Int(1)),
            Ok(Value::Float(1.0))
        );
        assert!(matches!(
            check(VarType::Float, &c, Value::Float(2.5)),
            Err(Error::ConstraintViolation(_))
        ));
        assert!(matches!(
            check(VarType::Float, &c, Value::str("1")),
            Err(Error::InvalidValue(_))
        ));
        assert!(check(VarType::Float, &Value::Nil, Value::Float(f64::NAN)).is_err());
    }

    #[test]
    fn integer_takes_whole_floats_only() {
        assert_eq!(
            check(VarType::Integer, &Value::Nil, Value::Float(3.0)),
            Ok(Value::Int(3))
        );
        assert!(check(VarType::Integer, &Value::Nil, Value::Float(3.5)).is_err());
    }

    #[test]
    fn string_constraints() {
        let c = map(&[
            ("min_length", Value::Int(2)),
            ("max_length", Value::Int(4)),
            ("pattern", Value::str("[a-z]+")),
        ]);
        assert!(check(VarType::String, &c, Value::str("abc")).is_ok());
        assert!(check(VarType::String, &c, Value::str("a")).is_err());
        assert!(check(VarType::String, &c, Value::str("abcde")).is_err());
        // The pattern is anchored: "ab1" does not match [a-z]+.
        assert!(check(VarType::String, &c, Value::str("ab1")).is_err());
        assert!(check(
            VarType::String,
            &Value::Nil,
            Value::Bytes(vec![0xff].into())
        )
        .is_err());
    }

    #[test]
    fn boolean_choice_module() {
        assert_eq!(
            check(VarType::Boolean, &Value::Nil, Value::str("true")),
            Ok(Value::Bool(true))
        );
        let c = map(&[(
            "choices",
            Value::List(vec![Value::str("a"), Value::str("b")].into()),
        )]);
        assert!(check(VarType::Choice, &c, Value::str("a")).is_ok());
        assert!(check(VarType::Choice, &c, Value::atom("b")).is_ok());
        assert!(check(VarType::Choice, &c, Value::str("c")).is_err());
        assert!(Constraints::compile(VarType::Choice, &Value::Nil).is_err());
        let c = map(&[(
            "allowed_modules",
            Value::List(vec![Value::atom("Elixir.A")].into()),
        )]);
        assert!(check(VarType::Module, &c, Value::atom("Elixir.A")).is_ok());
        assert!(check(VarType::Module, &c, Value::atom("Elixir.B")).is_err());
    }

    #[test]
    fn embedding_and_tensor() {
        let c = map(&[("dimensions", Value::Int(2))]);
        let e = Value::List(vec![Value::Int(1), Value::Float(0.5)].into());
        assert!(check(VarType::Embedding, &c, e).is_ok());
        assert!(check(
            VarType::Embedding,
            &c,
            Value::List(vec![Value::Int(1)].into())
        )
        .is_err());
        let t = Value::Map(
            vec![
                (Value::str("shape"), Value::List(vec![Value::Int(2)].into())),
                (
                    Value::str("data"),
                    Value::List(vec![Value::Int(1), Value::Int(2)].into()),
                ),
            ]
            .into(),
        );
        assert!(check(VarType::Tensor, &Value::Nil, t).is_ok());
    }
}
