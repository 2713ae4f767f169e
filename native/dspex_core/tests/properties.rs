//! Property tests of the engine's invariants:
//! - any `Value` round-trips through MessagePack unchanged;
//! - decoding random bytes as a snapshot never panics and never creates a session;
//! - under any sequence of writes, versions rise by one per accepted write,
//!   history stays within `max_history`, newest first, and a rejected write
//!   changes nothing;
//! - export then import reproduces every variable exactly.

use dspex_core::{Caller, Error, RegisterOpts, SessionOpts, Store, Value, VarType, WriteMeta};
use proptest::prelude::*;

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Nil),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        (-1.0e12f64..1.0e12).prop_map(Value::Float),
        "[a-z ]{0,12}".prop_map(|s| Value::Str(s.into())),
        "[a-z_]{1,8}".prop_map(|s| Value::Atom(s.into())),
        proptest::collection::vec(any::<u8>(), 0..8).prop_map(|b| {
            match String::from_utf8(b.clone()) {
                Ok(s) => Value::Str(s.into()),
                Err(_) => Value::Bytes(b.into()),
            }
        }),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(|v| Value::List(v.into())),
            proptest::collection::vec(inner.clone(), 0..4).prop_map(|v| Value::Tuple(v.into())),
            proptest::collection::btree_map("[a-z]{1,4}", inner, 0..4).prop_map(|m| {
                Value::Map(
                    m.into_iter()
                        .map(|(k, v)| (Value::Atom(k.into()), v))
                        .collect(),
                )
            }),
        ]
    })
}

fn map1(key: &str, v: Value) -> Value {
    Value::Map(vec![(Value::atom(key), v)].into())
}

proptest! {
    #[test]
    fn values_round_trip_through_msgpack(v in value()) {
        let bytes = rmp_serde::to_vec(&v).unwrap();
        let back: Value = rmp_serde::from_slice(&bytes).unwrap();
        prop_assert_eq!(v, back);
    }

    #[test]
    fn random_bytes_never_import(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let store = Store::new();
        prop_assert!(store.import_session(&bytes, None, 0).is_err());
        prop_assert!(store.is_empty());
    }

    #[test]
    fn versions_and_history_hold_under_any_writes(
        max_history in 0usize..8,
        writes in proptest::collection::vec((any::<i64>(), proptest::option::of(0u64..20)), 0..60),
    ) {
        let store = Store::new();
        let opts = SessionOpts { max_history, ..Default::default() };
        let s = store.create_session("p", opts, 0).unwrap();
        let reg = RegisterOpts { constraints: map1("min", Value::Int(0)), ..Default::default() };
        s.register(Value::atom("x"), VarType::Integer, Value::Int(0), reg, 0).unwrap();
        let mut version = 0u64;
        let mut last = 0i64;
        for (n, expected) in writes {
            let meta = WriteMeta { expected_version: expected, ..Default::default() };
            let before = s.get("x", &Caller::owner(0)).unwrap();
            match s.update("x", Value::Int(n), meta, &Caller::owner(0)) {
                Ok(v) => {
                    version += 1;
                    prop_assert_eq!(v, version);
                    last = n;
                }
                Err(Error::VersionMismatch(cur)) => {
                    prop_assert_eq!(cur, version);
                    prop_assert_ne!(expected, Some(version));
                }
                Err(Error::ConstraintViolation(_)) => prop_assert!(n < 0),
                Err(e) => prop_assert!(false, "unexpected {:?}", e),
            }
            let after = s.get("x", &Caller::owner(0)).unwrap();
            if after.version == before.version {
                prop_assert_eq!(after.value, before.value);
                prop_assert_eq!(after.history.len(), before.history.len());
            }
        }
        let var = s.get("x", &Caller::owner(0)).unwrap();
        prop_assert_eq!(var.version, version);
        prop_assert_eq!(&var.value, &Value::Int(last));
        let hist: Vec<u64> = var.history.iter().map(|h| h.version).collect();
        let want: Vec<u64> = (0..version).rev().take(max_history).collect();
        prop_assert_eq!(hist, want);
    }

    #[test]
    fn export_import_reproduces_variables(values in proptest::collection::vec(value(), 1..6)) {
        let store = Store::new();
        let s = store.create_session("a", SessionOpts::default(), 0).unwrap();
        for (i, v) in values.iter().enumerate() {
            let name = format!("v{i}");
            let reg = RegisterOpts { metadata: map1("m", v.clone()), ..Default::default() };
            s.register(Value::str(&name), VarType::Float, Value::Float(i as f64), reg, 0).unwrap();
            let meta = WriteMeta { metadata: map1("w", v.clone()), expected_version: None };
            s.update(&name, Value::Float(0.5), meta, &Caller::owner(0)).unwrap();
        }
        let bytes = store.export_session("a", 0).unwrap();
        store.import_session(&bytes, Some("b"), 0).unwrap();
        let a = store.session("a", 0).unwrap().variables(&Caller::owner(0)).unwrap();
        let b = store.session("b", 0).unwrap().variables(&Caller::owner(0)).unwrap();
        prop_assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            prop_assert_eq!(&x.name, &y.name);
            prop_assert_eq!(&x.value, &y.value);
            prop_assert_eq!(x.version, y.version);
            prop_assert_eq!(&x.metadata, &y.metadata);
            prop_assert_eq!(&x.history, &y.history);
            prop_assert_eq!(x.write_metadata(), y.write_metadata());
        }
    }
}
