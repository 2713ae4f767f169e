//! Protobuf messages <-> MessagePack values, driven by the service's
//! descriptors: the gateway knows the shape of every message and nothing of
//! what it means.
//!
//! Rules (the BEAM side relies on them):
//! - A message is a map from field name (as in the `.proto`) to value. A
//!   decoded request carries every field, defaults included; a response may
//!   leave fields out (they take their defaults). An unknown field name in a
//!   response is an error, never ignored silently.
//! - Scalars map to MessagePack scalars; `bytes` to `bin` (a `str` is also
//!   accepted on the way in); enums to their number; repeated fields to
//!   arrays; map fields to maps.
//! - `google.protobuf.Any` is `{"type_url": s, "json": v}` when its bytes
//!   are JSON (values travel as JSON on this wire), else
//!   `{"type_url": s, "value": bin}`. On the way out, `json` is serialized
//!   (non-finite floats as the strings `"NaN"`, `"Infinity"`, `"-Infinity"`).
//! - A `string` field whose name ends in `_json` (constraints, access rules)
//!   carries JSON text: it is decoded to its value (`""` to nil; text that is
//!   not JSON to `{"invalid_json": text}`); on the way out a non-string value
//!   is serialized.
//! - Depth is bounded (`MAX_DEPTH`) both ways: JSON and MessagePack nesting
//!   past it is refused, so no input recurses without bound.

use prost_reflect::{
    DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor, ReflectMessage, Value,
};
use rmpv::Value as Mp;

/// The deepest nesting accepted in either direction.
pub const MAX_DEPTH: usize = 64;

const ANY: &str = "google.protobuf.Any";

/// A conversion that could not be done: the message says which field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError(pub String);

impl std::fmt::Display for CodecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CodecError {}

fn err<T>(msg: impl Into<String>) -> Result<T, CodecError> {
    Err(CodecError(msg.into()))
}

// ---------------------------------------------------------------- to MessagePack

/// A decoded message as a MessagePack map of every field.
pub fn message_to_mp(msg: &DynamicMessage) -> Result<Mp, CodecError> {
    message_to_mp_at(msg, 0)
}

fn message_to_mp_at(msg: &DynamicMessage, depth: usize) -> Result<Mp, CodecError> {
    if depth > MAX_DEPTH {
        return err("message nested too deeply");
    }
    let desc = msg.descriptor();
    if desc.full_name() == ANY {
        return any_to_mp(msg);
    }
    let mut out = Vec::with_capacity(desc.fields().len());
    for field in desc.fields() {
        let value = msg.get_field(&field);
        out.push((Mp::from(field.name()), field_to_mp(&field, &value, depth)?));
    }
    Ok(Mp::Map(out))
}

fn field_to_mp(field: &FieldDescriptor, value: &Value, depth: usize) -> Result<Mp, CodecError> {
    if field.kind() == Kind::String && field.name().ends_with("_json") && !field.is_list() {
        if let Value::String(s) = value {
            return Ok(json_text_to_mp(s));
        }
    }
    value_to_mp(value, depth)
}

fn value_to_mp(value: &Value, depth: usize) -> Result<Mp, CodecError> {
    Ok(match value {
        Value::Bool(b) => Mp::Boolean(*b),
        Value::I32(n) => Mp::from(*n),
        Value::I64(n) => Mp::from(*n),
        Value::U32(n) => Mp::from(*n),
        Value::U64(n) => Mp::from(*n),
        Value::F32(x) => Mp::F64(f64::from(*x)),
        Value::F64(x) => Mp::F64(*x),
        Value::String(s) => Mp::from(s.as_str()),
        Value::Bytes(b) => Mp::Binary(b.to_vec()),
        Value::EnumNumber(n) => Mp::from(*n),
        Value::Message(m) => message_to_mp_at(m, depth + 1)?,
        Value::List(items) => Mp::Array(
            items
                .iter()
                .map(|v| value_to_mp(v, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        Value::Map(map) => {
            let mut entries = Vec::with_capacity(map.len());
            for (k, v) in map {
                entries.push((map_key_to_mp(k), value_to_mp(v, depth + 1)?));
            }
            Mp::Map(entries)
        }
    })
}

fn map_key_to_mp(key: &MapKey) -> Mp {
    match key {
        MapKey::Bool(b) => Mp::Boolean(*b),
        MapKey::I32(n) => Mp::from(*n),
        MapKey::I64(n) => Mp::from(*n),
        MapKey::U32(n) => Mp::from(*n),
        MapKey::U64(n) => Mp::from(*n),
        MapKey::String(s) => Mp::from(s.as_str()),
    }
}

fn any_to_mp(msg: &DynamicMessage) -> Result<Mp, CodecError> {
    let type_url = match msg.get_field_by_name("type_url").as_deref() {
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    };
    let bytes = match msg.get_field_by_name("value").as_deref() {
        Some(Value::Bytes(b)) => b.clone(),
        _ => Default::default(),
    };
    let body = match json_bytes_to_mp(&bytes) {
        Some(v) => (Mp::from("json"), v),
        None => (Mp::from("value"), Mp::Binary(bytes.to_vec())),
    };
    Ok(Mp::Map(vec![
        (Mp::from("type_url"), Mp::from(type_url)),
        body,
    ]))
}

fn json_text_to_mp(text: &str) -> Mp {
    if text.is_empty() {
        return Mp::Nil;
    }
    match json_bytes_to_mp(text.as_bytes()) {
        Some(v) => v,
        None => Mp::Map(vec![(Mp::from("invalid_json"), Mp::from(text))]),
    }
}

/// JSON bytes as a MessagePack value; `None` when they are not JSON (or nest
/// past `MAX_DEPTH`: serde_json stops at 128 on its own, we stop earlier).
pub fn json_bytes_to_mp(bytes: &[u8]) -> Option<Mp> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    json_to_mp(&v, 0)
}

fn json_to_mp(v: &serde_json::Value, depth: usize) -> Option<Mp> {
    if depth > MAX_DEPTH {
        return None;
    }
    Some(match v {
        serde_json::Value::Null => Mp::Nil,
        serde_json::Value::Bool(b) => Mp::Boolean(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Mp::from(i)
            } else if let Some(u) = n.as_u64() {
                Mp::from(u)
            } else {
                Mp::F64(n.as_f64()?)
            }
        }
        serde_json::Value::String(s) => Mp::from(s.as_str()),
        serde_json::Value::Array(items) => Mp::Array(
            items
                .iter()
                .map(|x| json_to_mp(x, depth + 1))
                .collect::<Option<_>>()?,
        ),
        serde_json::Value::Object(map) => Mp::Map(
            map.iter()
                .map(|(k, x)| Some((Mp::from(k.as_str()), json_to_mp(x, depth + 1)?)))
                .collect::<Option<_>>()?,
        ),
    })
}

// ---------------------------------------------------------------- from MessagePack

/// A MessagePack map as a message of type `desc`.
pub fn mp_to_message(desc: &MessageDescriptor, value: &Mp) -> Result<DynamicMessage, CodecError> {
    mp_to_message_at(desc, value, 0)
}

fn mp_to_message_at(
    desc: &MessageDescriptor,
    value: &Mp,
    depth: usize,
) -> Result<DynamicMessage, CodecError> {
    if depth > MAX_DEPTH {
        return err("message nested too deeply");
    }
    if desc.full_name() == ANY {
        return mp_to_any(desc, value);
    }
    let mut msg = DynamicMessage::new(desc.clone());
    let entries = match value {
        Mp::Map(entries) => entries,
        Mp::Nil => return Ok(msg),
        _ => return err(format!("{}: expected a map", desc.name())),
    };
    for (k, v) in entries {
        let name = k
            .as_str()
            .ok_or_else(|| CodecError(format!("{}: field names are strings", desc.name())))?;
        let field = desc
            .get_field_by_name(name)
            .ok_or_else(|| CodecError(format!("{}: no field {name}", desc.name())))?;
        if v.is_nil() {
            continue;
        }
        let value = mp_to_field(&field, v, depth)?;
        msg.set_field(&field, value);
    }
    Ok(msg)
}

fn mp_to_field(field: &FieldDescriptor, v: &Mp, depth: usize) -> Result<Value, CodecError> {
    let name = field.name();
    if field.is_map() {
        let Kind::Message(entry) = field.kind() else {
            return err(format!("{name}: bad map field"));
        };
        let key_field = entry.map_entry_key_field();
        let value_field = entry.map_entry_value_field();
        let Mp::Map(entries) = v else {
            return err(format!("{name}: expected a map"));
        };
        let mut map = std::collections::HashMap::with_capacity(entries.len());
        for (k, x) in entries {
            let key = mp_to_map_key(&key_field.kind(), k)
                .ok_or_else(|| CodecError(format!("{name}: bad map key")))?;
            map.insert(key, mp_to_single(&value_field, x, depth + 1)?);
        }
        return Ok(Value::Map(map));
    }
    if field.is_list() {
        let Mp::Array(items) = v else {
            return err(format!("{name}: expected an array"));
        };
        let values = items
            .iter()
            .map(|x| mp_to_single(field, x, depth + 1))
            .collect::<Result<_, _>>()?;
        return Ok(Value::List(values));
    }
    if field.kind() == Kind::String && name.ends_with("_json") && !v.is_str() {
        let json = mp_to_json(v, depth).ok_or_else(|| CodecError(format!("{name}: not JSON")))?;
        return Ok(Value::String(json.to_string()));
    }
    mp_to_single(field, v, depth)
}

fn mp_to_single(field: &FieldDescriptor, v: &Mp, depth: usize) -> Result<Value, CodecError> {
    let name = field.name();
    let bad = || CodecError(format!("{name}: wrong type"));
    Ok(match field.kind() {
        Kind::Bool => Value::Bool(v.as_bool().ok_or_else(bad)?),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(
            v.as_i64()
                .and_then(|n| i32::try_from(n).ok())
                .ok_or_else(bad)?,
        ),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(v.as_i64().ok_or_else(bad)?),
        Kind::Uint32 | Kind::Fixed32 => Value::U32(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(bad)?,
        ),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(v.as_u64().ok_or_else(bad)?),
        Kind::Float => Value::F32(number(v).ok_or_else(bad)? as f32),
        Kind::Double => Value::F64(number(v).ok_or_else(bad)?),
        Kind::String => Value::String(match v {
            Mp::String(s) => s.as_str().ok_or_else(bad)?.to_owned(),
            Mp::Binary(b) => String::from_utf8(b.clone()).map_err(|_| bad())?,
            _ => return Err(bad()),
        }),
        Kind::Bytes => Value::Bytes(match v {
            Mp::Binary(b) => b.clone().into(),
            Mp::String(s) => s.as_bytes().to_vec().into(),
            _ => return Err(bad()),
        }),
        Kind::Enum(_) => Value::EnumNumber(
            v.as_i64()
                .and_then(|n| i32::try_from(n).ok())
                .ok_or_else(bad)?,
        ),
        Kind::Message(desc) => Value::Message(mp_to_message_at(&desc, v, depth + 1)?),
    })
}

fn number(v: &Mp) -> Option<f64> {
    match v {
        Mp::F64(x) => Some(*x),
        Mp::F32(x) => Some(f64::from(*x)),
        Mp::Integer(n) => n.as_f64(),
        _ => None,
    }
}

fn mp_to_map_key(kind: &Kind, k: &Mp) -> Option<MapKey> {
    Some(match kind {
        Kind::String => MapKey::String(match k {
            Mp::String(s) => s.as_str()?.to_owned(),
            Mp::Binary(b) => String::from_utf8(b.clone()).ok()?,
            _ => return None,
        }),
        Kind::Bool => MapKey::Bool(k.as_bool()?),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            MapKey::I32(i32::try_from(k.as_i64()?).ok()?)
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => MapKey::I64(k.as_i64()?),
        Kind::Uint32 | Kind::Fixed32 => MapKey::U32(u32::try_from(k.as_u64()?).ok()?),
        Kind::Uint64 | Kind::Fixed64 => MapKey::U64(k.as_u64()?),
        _ => return None,
    })
}

fn mp_to_any(desc: &MessageDescriptor, v: &Mp) -> Result<DynamicMessage, CodecError> {
    let Mp::Map(entries) = v else {
        return err("Any: expected a map");
    };
    let mut type_url = String::new();
    let mut bytes: Vec<u8> = Vec::new();
    for (k, x) in entries {
        match k.as_str() {
            Some("type_url") => type_url = x.as_str().unwrap_or_default().to_owned(),
            Some("json") => {
                bytes = mp_to_json(x, 0)
                    .ok_or_else(|| CodecError("Any: json is not encodable".into()))?
                    .to_string()
                    .into_bytes()
            }
            Some("value") => {
                bytes = match x {
                    Mp::Binary(b) => b.clone(),
                    Mp::String(s) => s.as_bytes().to_vec(),
                    _ => return err("Any: value must be bytes"),
                }
            }
            _ => return err("Any: unknown key"),
        }
    }
    let mut msg = DynamicMessage::new(desc.clone());
    msg.set_field_by_name("type_url", Value::String(type_url));
    msg.set_field_by_name("value", Value::Bytes(bytes.into()));
    Ok(msg)
}

/// A MessagePack value as JSON; floats that JSON cannot hold become the
/// strings of the wire rules.
pub fn mp_to_json(v: &Mp, depth: usize) -> Option<serde_json::Value> {
    use serde_json::Value as J;
    if depth > MAX_DEPTH {
        return None;
    }
    Some(match v {
        Mp::Nil => J::Null,
        Mp::Boolean(b) => J::Bool(*b),
        Mp::Integer(n) => {
            if let Some(i) = n.as_i64() {
                J::from(i)
            } else {
                J::from(n.as_u64()?)
            }
        }
        Mp::F32(x) => float_json(f64::from(*x)),
        Mp::F64(x) => float_json(*x),
        Mp::String(s) => J::String(s.as_str()?.to_owned()),
        Mp::Binary(b) => J::String(String::from_utf8(b.clone()).ok()?),
        Mp::Array(items) => J::Array(
            items
                .iter()
                .map(|x| mp_to_json(x, depth + 1))
                .collect::<Option<_>>()?,
        ),
        Mp::Map(entries) => {
            let mut map = serde_json::Map::with_capacity(entries.len());
            for (k, x) in entries {
                let key = match k {
                    Mp::String(s) => s.as_str()?.to_owned(),
                    other => other.to_string(),
                };
                map.insert(key, mp_to_json(x, depth + 1)?);
            }
            J::Object(map)
        }
        Mp::Ext(_, _) => return None,
    })
}

fn float_json(x: f64) -> serde_json::Value {
    if x.is_nan() {
        "NaN".into()
    } else if x == f64::INFINITY {
        "Infinity".into()
    } else if x == f64::NEG_INFINITY {
        "-Infinity".into()
    } else {
        serde_json::Number::from_f64(x)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use prost_reflect::DescriptorPool;

    fn pool() -> DescriptorPool {
        crate::descriptor_pool()
    }

    fn msg(name: &str) -> MessageDescriptor {
        pool()
            .get_message_by_name(&format!("snakepit.bridge.{name}"))
            .unwrap()
    }

    fn get<'a>(m: &'a Mp, key: &str) -> &'a Mp {
        m.as_map()
            .unwrap()
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
            .unwrap()
    }

    #[test]
    fn request_carries_every_field_and_any_as_json() {
        let desc = msg("SetVariableRequest");
        let mut m = DynamicMessage::new(desc.clone());
        m.set_field_by_name("session_id", Value::String("s".into()));
        let mut any = DynamicMessage::new(pool().get_message_by_name(ANY).unwrap());
        any.set_field_by_name(
            "type_url",
            Value::String("type.googleapis.com/snakepit.float".into()),
        );
        any.set_field_by_name("value", Value::Bytes(b"0.5".to_vec().into()));
        m.set_field_by_name("value", Value::Message(any));
        let bytes = m.encode_to_vec();

        let decoded = DynamicMessage::decode(desc, bytes.as_slice()).unwrap();
        let mp = message_to_mp(&decoded).unwrap();
        assert_eq!(get(&mp, "session_id").as_str(), Some("s"));
        assert_eq!(get(&mp, "expected_version").as_i64(), Some(0));
        assert_eq!(get(get(&mp, "value"), "json").as_f64(), Some(0.5));
        assert!(get(&mp, "metadata").as_map().unwrap().is_empty());
    }

    #[test]
    fn any_that_is_not_json_stays_bytes() {
        let desc = pool().get_message_by_name(ANY).unwrap();
        let mut any = DynamicMessage::new(desc);
        any.set_field_by_name("value", Value::Bytes(vec![0x80, 0x04].into()));
        let mp = message_to_mp(&any).unwrap();
        assert_eq!(get(&mp, "value").as_slice(), Some(&[0x80u8, 0x04][..]));
    }

    #[test]
    fn response_round_trips_and_serializes_json() {
        let desc = msg("GetVariableResponse");
        let value = Mp::Map(vec![(
            Mp::from("variable"),
            Mp::Map(vec![
                (Mp::from("id"), Mp::from("var_x_1")),
                (Mp::from("version"), Mp::from(3)),
                (
                    Mp::from("value"),
                    Mp::Map(vec![
                        (Mp::from("type_url"), Mp::from("t/snakepit.float")),
                        (Mp::from("json"), Mp::F64(f64::NAN)),
                    ]),
                ),
                (
                    Mp::from("constraints_json"),
                    Mp::Map(vec![(Mp::from("min"), Mp::from(0))]),
                ),
                (
                    Mp::from("metadata"),
                    Mp::Map(vec![(Mp::from("k"), Mp::from("v"))]),
                ),
                (
                    Mp::from("last_updated_at"),
                    Mp::Map(vec![(Mp::from("seconds"), Mp::from(5))]),
                ),
            ]),
        )]);
        let m = mp_to_message(&desc, &value).unwrap();
        let back =
            message_to_mp(&DynamicMessage::decode(desc, m.encode_to_vec().as_slice()).unwrap())
                .unwrap();
        let var = get(&back, "variable");
        assert_eq!(get(var, "version").as_i64(), Some(3));
        assert_eq!(get(get(var, "value"), "json").as_str(), Some("NaN"));
        assert_eq!(get(get(var, "constraints_json"), "min").as_i64(), Some(0));
        assert_eq!(
            get(get(var, "last_updated_at"), "seconds").as_i64(),
            Some(5)
        );
    }

    #[test]
    fn wrong_shapes_are_errors_not_panics() {
        let desc = msg("SetVariableResponse");
        for bad in [
            Mp::from(1),
            Mp::Map(vec![(Mp::from("nope"), Mp::from(1))]),
            Mp::Map(vec![(Mp::from("new_version"), Mp::from("x"))]),
            Mp::Map(vec![(Mp::from("new_version"), Mp::from(1u64 << 40))]),
            Mp::Map(vec![(Mp::from(7), Mp::from(1))]),
        ] {
            assert!(mp_to_message(&desc, &bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn json_depth_is_bounded() {
        let deep = "[".repeat(100) + &"]".repeat(100);
        assert!(json_bytes_to_mp(deep.as_bytes()).is_none());
        let ok = "[".repeat(10) + &"]".repeat(10);
        assert!(json_bytes_to_mp(ok.as_bytes()).is_some());
        let mut v = Mp::Nil;
        for _ in 0..100 {
            v = Mp::Array(vec![v]);
        }
        assert!(mp_to_json(&v, 0).is_none());
    }

    #[test]
    fn json_text_fields() {
        assert_eq!(json_text_to_mp(""), Mp::Nil);
        assert_eq!(
            get(&json_text_to_mp("{oops"), "invalid_json").as_str(),
            Some("{oops")
        );
    }

    #[test]
    fn garbage_protobuf_is_a_decode_error() {
        let desc = msg("GetVariableRequest");
        for bytes in [
            &[0xff, 0xff, 0xff][..],
            &[0x12, 0x10, b'a'][..],
            &[0x0a][..],
        ] {
            assert!(DynamicMessage::decode(desc.clone(), bytes).is_err());
        }
    }
}
