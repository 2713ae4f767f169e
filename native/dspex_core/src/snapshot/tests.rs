//! Tests of snapshot export and import.

use crate::session::SessionOpts;
use crate::store::Store;
use crate::types::VarType;
use crate::value::Value;
use crate::variable::WriteMeta;
use crate::Error;

#[test]
fn export_import_round_trip() {
    let store = Store::new();
    let s = store
        .create_session("a", SessionOpts::default(), 0)
        .unwrap();
    s.register(
        Value::atom("t"),
        VarType::Float,
        Value::Float(0.1),
        Default::default(),
        0,
    )
    .unwrap();
    s.update(
        "t",
        Value::Float(0.2),
        WriteMeta::default(),
        &crate::Caller::owner(0),
    )
    .unwrap();
    let bytes = store.export_session("a", 0).unwrap();
    let id = store.import_session(&bytes, Some("b"), 0).unwrap();
    assert_eq!(&*id, "b");
    let b = store.session("b", 0).unwrap();
    let t = b.get("t", &crate::Caller::owner(0)).unwrap();
    assert_eq!(t.value, Value::Float(0.2));
    assert_eq!(t.version, 1);
    assert_eq!(t.history.len(), 1);
    assert_eq!(t.name, Value::atom("t"));
    assert_eq!(
        store.import_session(&bytes, None, 0),
        Err(Error::AlreadyExists)
    );
}

#[test]
fn dependencies_travel_with_the_snapshot() {
    let store = Store::new();
    let s = store
        .create_session("a", SessionOpts::default(), 0)
        .unwrap();
    for name in ["x", "y", "z"] {
        s.register(
            Value::atom(name),
            VarType::Float,
            Value::Float(0.0),
            Default::default(),
            0,
        )
        .unwrap();
    }
    let owner = &crate::Caller::owner(0);
    s.add_dependency(&Value::atom("x"), &Value::atom("y"), "data", owner)
        .unwrap();
    s.add_dependency(&Value::str("y"), &Value::atom("z"), "control", owner)
        .unwrap();
    let bytes = store.export_session("a", 0).unwrap();
    store.import_session(&bytes, Some("b"), 0).unwrap();
    let b = store.session("b", 0).unwrap();
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
    let s = store
        .create_session("a", SessionOpts::default(), 0)
        .unwrap();
    for name in ["x", "y"] {
        s.register(
            Value::atom(name),
            VarType::Float,
            Value::Float(0.0),
            Default::default(),
            0,
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
        store.import_session(&cyclic, Some("b"), 0),
        Err(Error::InvalidSnapshot(_))
    ));
    snapshot.edges.truncate(1);
    snapshot.edges[0].to = "nope".into();
    let dangling = snapshot.encode().unwrap();
    assert!(matches!(
        store.import_session(&dangling, Some("b"), 0),
        Err(Error::InvalidSnapshot(_))
    ));
    assert!(store.session("b", 0).is_err());
}

/// A session with one float variable `t` written twice, and its snapshot
/// as a struct to poison.
fn poisonable(store: &Store) -> super::Snapshot {
    let s = store
        .create_session("src", SessionOpts::default(), 0)
        .unwrap();
    s.register(
        Value::atom("t"),
        VarType::Float,
        Value::Float(0.1),
        Default::default(),
        0,
    )
    .unwrap();
    for f in [0.2, 0.3] {
        s.update(
            "t",
            Value::Float(f),
            WriteMeta::default(),
            &crate::Caller::owner(0),
        )
        .unwrap();
    }
    super::Snapshot::of(&s)
}

/// The reason an import of the poisoned snapshot is refused; asserts
/// that it created nothing.
fn rejected(poison: impl FnOnce(&mut super::Snapshot, &crate::Variable)) -> String {
    let store = Store::new();
    let mut snapshot = poisonable(&store);
    let t = store
        .session("src", 0)
        .unwrap()
        .get("t", &crate::Caller::owner(0))
        .unwrap();
    poison(&mut snapshot, &t);
    let bytes = snapshot.encode().unwrap();
    let r = store.import_session(&bytes, Some("poisoned"), 0);
    assert_eq!(store.len(), 1, "an import created a session: {r:?}");
    match r {
        Err(Error::InvalidSnapshot(why)) => why,
        other => panic!("expected invalid_snapshot, got {other:?}"),
    }
}

#[test]
fn every_field_is_validated_as_a_write_would_be() {
    let far = 1i64 << 62;
    type Poison = Box<dyn FnOnce(&mut super::Snapshot, &crate::Variable)>;
    let cases: Vec<(&str, Poison)> = vec![
        (
            "session created_at",
            Box::new(move |s, _| s.created_at = far),
        ),
        ("negative created_at", Box::new(|s, _| s.created_at = -1)),
        (
            "created_at",
            Box::new(move |s, _| s.variables[0].created_at = far),
        ),
        (
            "updated_at",
            Box::new(move |s, _| s.variables[0].updated_at = far),
        ),
        (
            "history updated_at",
            Box::new(move |s, _| s.variables[0].history[1].updated_at = far),
        ),
        (
            "version",
            Box::new(|s, _| s.variables[0].version = u64::MAX),
        ),
        (
            "history order",
            Box::new(|s, _| s.variables[0].history.swap(0, 1)),
        ),
        (
            "history value type",
            Box::new(|s, _| s.variables[0].history[0].value = Value::str("x")),
        ),
        (
            "value type",
            Box::new(|s, _| s.variables[0].value = Value::str("x")),
        ),
        (
            "non-finite float",
            Box::new(|s, _| {
                s.variables[0].metadata =
                    Value::Map(vec![(Value::atom("m"), Value::Float(f64::NAN))].into())
            }),
        ),
        (
            "metadata not a map",
            Box::new(|s, _| s.variables[0].metadata = Value::Int(1)),
        ),
        (
            "constraints",
            Box::new(|s, _| {
                s.variables[0].constraints = Value::Map(
                    vec![
                        (Value::atom("min"), Value::Float(2.0)),
                        (Value::atom("max"), Value::Float(1.0)),
                    ]
                    .into(),
                )
            }),
        ),
        (
            "value against constraints",
            Box::new(|s, _| {
                s.variables[0].constraints =
                    Value::Map(vec![(Value::atom("max"), Value::Float(0.25))].into())
            }),
        ),
        (
            "rules",
            Box::new(|s, _| s.variables[0].access_rules = Value::List(vec![Value::Int(1)].into())),
        ),
        ("ttl", Box::new(|s, _| s.ttl_ms = Some(0))),
        ("max_history", Box::new(|s, _| s.max_history = 1)),
        (
            "audit capacity",
            Box::new(|s, _| s.audit_capacity = u64::MAX),
        ),
        (
            "rate limit",
            Box::new(|s, _| {
                s.rate_limit = Some(crate::ratelimit::RateLimit {
                    ops_per_sec: 0,
                    burst: 1,
                })
            }),
        ),
        ("session id", Box::new(|s, _| s.session_id = String::new())),
        (
            "variable id",
            Box::new(|s, _| s.variables[0].id = String::new()),
        ),
        (
            "name",
            Box::new(|s, _| s.variables[0].name = Value::str(&"n".repeat(256))),
        ),
        (
            "type",
            Box::new(|s, _| s.variables[0].var_type = "nope".into()),
        ),
        (
            "duplicate id",
            Box::new(|s, t| {
                let mut twin = super::VarSnapshot::of(t);
                twin.name = Value::atom("u");
                s.variables.push(twin);
            }),
        ),
    ];
    for (what, poison) in cases {
        let why = rejected(poison);
        assert!(!why.is_empty(), "{what}");
        if what == "duplicate id" {
            // The clashing id by its text, not the (free) name.
            assert!(why.contains("duplicate variable id \"var_t_1\""), "{why}");
        }
    }
}

#[test]
fn the_reads_of_an_imported_session_see_only_valid_fields() {
    let store = Store::new();
    let snapshot = poisonable(&store);
    let bytes = snapshot.encode().unwrap();
    store.import_session(&bytes, Some("copy"), 0).unwrap();
    let t = store
        .session("copy", 0)
        .unwrap()
        .get("t", &crate::Caller::owner(0))
        .unwrap();
    for at in std::iter::once(t.updated_at)
        .chain([t.created_at])
        .chain(t.history.iter().map(|h| h.updated_at))
    {
        assert!((0..=super::MAX_TIMESTAMP_US).contains(&at));
    }
    assert_eq!(t.version, 2);
    assert_eq!(t.history.len(), 2);
}

#[test]
fn unknown_fields_are_skipped_and_missing_ones_rejected() {
    let store = Store::new();
    let snapshot = poisonable(&store);
    let bytes = snapshot.encode().unwrap();
    // Re-encode the top-level map with one more field a later release
    // might add, and with one required field taken out.
    let top = rmpv::decode::read_value(&mut &bytes[..]).unwrap();
    let rmpv::Value::Map(pairs) = top else {
        panic!("a snapshot is a map")
    };
    let mut extra = pairs.clone();
    extra.push((
        rmpv::Value::from("from_the_future"),
        rmpv::Value::Array(vec![rmpv::Value::from(1), rmpv::Value::Nil]),
    ));
    let mut buf = Vec::new();
    rmpv::encode::write_value(&mut buf, &rmpv::Value::Map(extra)).unwrap();
    store.import_session(&buf, Some("future"), 0).unwrap();
    let missing: Vec<_> = pairs
        .into_iter()
        .filter(|(k, _)| k.as_str() != Some("variables"))
        .collect();
    let mut buf = Vec::new();
    rmpv::encode::write_value(&mut buf, &rmpv::Value::Map(missing)).unwrap();
    assert!(matches!(
        store.import_session(&buf, Some("partial"), 0),
        Err(Error::InvalidSnapshot(why)) if why.contains("variables")
    ));
}

#[test]
fn imports_take_turns_and_past_the_queue_are_busy() {
    let store = Store::new();
    let snapshot = poisonable(&store).encode().unwrap();
    // Many threads at once: every import either lands or is refused busy,
    // and none is lost or doubled.
    let results: Vec<_> = std::thread::scope(|scope| {
        let racers: Vec<_> = (0..16)
            .map(|i| {
                let (store, snapshot) = (&store, &snapshot);
                scope.spawn(move || store.import_session(snapshot, Some(&format!("c{i}")), 0))
            })
            .collect();
        racers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert!(results.iter().all(|r| r.is_ok() || *r == Err(Error::Busy)));
    assert_eq!(store.len(), 1 + ok);
    assert!(ok >= 1);
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
            store.import_session(bytes, None, 0),
            Err(Error::InvalidSnapshot(_))
        ));
    }
    assert!(store.is_empty());
}
