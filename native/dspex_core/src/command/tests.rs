use super::*;
use crate::command::args::Actor;
use crate::error::Error;

use proptest::prelude::*;

const T0: i64 = 1_700_000_000_000_000;

fn exec(store: &Store, cmd: Command) -> Result<Answer> {
    store.execute(cmd.stamped(T0))
}

fn run(store: &Store, cmd: Command) -> Value {
    let reply = Reply {
        id: Some(1),
        result: exec(store, cmd),
    };
    reply.term()
}

fn ok(v: Value) -> Value {
    Value::tagged("ok", v)
}

fn err(reason: Value) -> Value {
    Value::tagged("error", reason)
}

fn create(session: &str) -> Command {
    Command::SessionCreate(SessionCreate {
        session: session.into(),
        ttl_ms: Value::Nil,
        max_history: Value::Nil,
        metadata: Value::Nil,
        rate_limit: Value::Nil,
        audit_capacity: Value::Nil,
    })
}

fn register(session: &str, name: &str, ty: &str, initial: Value) -> Command {
    Command::VarRegister(VarRegister {
        session: session.into(),
        name: Value::atom(name),
        var_type: Value::atom(ty),
        initial,
        constraints: Value::Nil,
        metadata: Value::Nil,
        description: None,
        access_rules: Value::Nil,
        actor: Actor::default(),
    })
}

fn set(session: &str, ident: &str, value: Value) -> Command {
    Command::VarSet(VarSet {
        session: session.into(),
        ident: Value::atom(ident),
        value,
        metadata: Value::Nil,
        expected_version: None,
        actor: Actor::default(),
    })
}

fn get_value(session: &str, ident: &str) -> Command {
    Command::VarGetValue(VarGetValue {
        session: session.into(),
        ident: Value::atom(ident),
        actor: Actor::default(),
    })
}

#[test]
fn session_operations_are_reserved_to_the_session() {
    let store = Store::new();
    run(&store, create("s"));
    let guard = |principal: Option<&str>| {
        Command::AclAuthorizeSession(AclAuthorizeSession {
            session: "s".into(),
            permission: Value::atom("read"),
            principal: principal.map(Into::into),
        })
    };
    assert_eq!(run(&store, guard(None)), Value::atom("ok"));
    assert_eq!(run(&store, guard(Some("s"))), Value::atom("ok"));
    assert_eq!(
        run(&store, guard(Some("other"))),
        err(Value::atom("access_denied"))
    );
    let log = run(
        &store,
        Command::AclAuditLog(AclAuditLog {
            session: "s".into(),
            limit: None,
        }),
    );
    let Value::Tuple(parts) = log else {
        panic!("not a tuple")
    };
    let Value::List(entries) = &parts[1] else {
        panic!("not a list")
    };
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].get("principal"), Some(&Value::str("other")));
    assert_eq!(entries[0].get("variable"), Some(&Value::Nil));
    let missing = Command::AclAuthorizeSession(AclAuthorizeSession {
        session: "nope".into(),
        permission: Value::atom("read"),
        principal: Some("other".into()),
    });
    assert_eq!(run(&store, missing), err(Value::atom("session_not_found")));
}

#[test]
fn session_lifecycle() {
    let store = Store::new();
    assert_eq!(run(&store, create("s")), Value::atom("ok"));
    assert_eq!(run(&store, create("s")), err(Value::atom("already_exists")));
    assert_eq!(
        run(&store, Command::SessionList(SessionList {})),
        ok(Value::List(vec![Value::str("s")].into()))
    );
    let info = run(
        &store,
        Command::SessionInfo(SessionInfo {
            session: "s".into(),
        }),
    );
    let Value::Tuple(parts) = info else {
        panic!("not a tuple")
    };
    assert_eq!(parts[1].get("variable_count"), Some(&Value::Int(0)));
    assert_eq!(parts[1].get("max_history"), Some(&Value::Int(50)));
    assert_eq!(
        run(
            &store,
            Command::SessionDelete(SessionDelete {
                session: "s".into()
            })
        ),
        Value::atom("ok")
    );
    assert_eq!(
        run(
            &store,
            Command::SessionDelete(SessionDelete {
                session: "s".into()
            })
        ),
        err(Value::atom("session_not_found"))
    );
    assert_eq!(
        run(&store, Command::SessionSweep(SessionSweep {})),
        ok(Value::List(Box::new([])))
    );
}

#[test]
fn variables_read_write_rollback() {
    let store = Store::new();
    run(&store, create("s"));
    let id = run(&store, register("s", "t", "float", Value::Float(0.5)));
    let Value::Tuple(parts) = &id else {
        panic!("{id}")
    };
    let var_id = parts[1].as_text().unwrap().to_string();
    assert_eq!(run(&store, get_value("s", "t")), ok(Value::Float(0.5)));
    assert_eq!(run(&store, set("s", "t", Value::Int(1))), ok(Value::Int(1)));
    assert!(matches!(
        exec(&store, set("s", "t", Value::str("x"))),
        Err(Error::InvalidValue(_))
    ));
    assert_eq!(
        run(
            &store,
            Command::VarSet(VarSet {
                session: "s".into(),
                ident: Value::str(&var_id),
                value: Value::Float(2.0),
                metadata: Value::Nil,
                expected_version: Some(0),
                actor: Actor::default(),
            })
        ),
        err(Value::tagged("version_mismatch", Value::Int(1)))
    );
    let history = run(
        &store,
        Command::VarHistory(VarHistory {
            session: "s".into(),
            ident: Value::atom("t"),
            limit: Some(10),
            actor: Actor::default(),
        }),
    );
    let Value::Tuple(parts) = history else {
        panic!()
    };
    let Value::List(entries) = &parts[1] else {
        panic!()
    };
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].get("value"), Some(&Value::Float(0.5)));
    assert_eq!(
        run(
            &store,
            Command::VarRollback(VarRollback {
                session: "s".into(),
                ident: Value::atom("t"),
                version: 0,
                metadata: Value::Nil,
                actor: Actor::default(),
            })
        ),
        ok(Value::Int(2))
    );
    assert_eq!(run(&store, get_value("s", "t")), ok(Value::Float(0.5)));
    let got = run(
        &store,
        Command::VarGet(VarGet {
            session: "s".into(),
            ident: Value::atom("t"),
            actor: Actor::default(),
        }),
    );
    let Value::Tuple(parts) = got else { panic!() };
    assert_eq!(parts[1].get("name"), Some(&Value::atom("t")));
    assert_eq!(parts[1].get("type"), Some(&Value::atom("float")));
    assert_eq!(parts[1].get("version"), Some(&Value::Int(2)));
    assert_eq!(
        run(
            &store,
            Command::VarGet(VarGet {
                session: "s".into(),
                ident: Value::atom("t"),
                actor: Actor {
                    principal: Some("intruder".into()),
                    ..Actor::default()
                },
            })
        ),
        err(Value::atom("access_denied"))
    );
    assert_eq!(
        run(
            &store,
            Command::VarDelete(VarDelete {
                session: "s".into(),
                ident: Value::atom("t"),
                actor: Actor::default(),
            })
        ),
        Value::atom("ok")
    );
    assert_eq!(
        run(&store, get_value("s", "t")),
        err(Value::atom("not_found"))
    );
    assert_eq!(
        run(&store, get_value("nope", "t")),
        err(Value::atom("session_not_found"))
    );
}

#[test]
fn bad_arguments_are_errors() {
    let store = Store::new();
    run(&store, create("s"));
    assert_eq!(
        run(&store, register("s", "t", "colour", Value::Nil)),
        err(Value::tagged(
            "invalid_argument",
            Value::tagged("unknown_type", Value::str("colour"))
        ))
    );
    let bad_ident = Command::VarGetValue(VarGetValue {
        session: "s".into(),
        ident: Value::Int(3),
        actor: Actor::default(),
    });
    assert_eq!(
        run(&store, bad_ident),
        err(Value::tagged(
            "invalid_argument",
            Value::atom("name_must_be_atom_or_string")
        ))
    );
    let mut bad_meta = set("s", "t", Value::Int(1));
    if let Command::VarSet(VarSet { metadata, .. }) = &mut bad_meta {
        *metadata = Value::Int(1);
    }
    assert_eq!(
        run(&store, bad_meta),
        err(Value::tagged(
            "invalid_argument",
            Value::atom("metadata_must_be_a_map")
        ))
    );
    let zero_ttl = Command::SessionCreate(SessionCreate {
        session: "z".into(),
        ttl_ms: Value::Int(0),
        max_history: Value::Nil,
        metadata: Value::Nil,
        rate_limit: Value::Nil,
        audit_capacity: Value::Nil,
    });
    assert_eq!(
        run(&store, zero_ttl),
        err(Value::tagged("invalid_argument", Value::atom("bad_ttl")))
    );
    let mut foreign = register("s", "u", "integer", Value::Int(0));
    if let Command::VarRegister(VarRegister { actor, .. }) = &mut foreign {
        actor.principal = Some("other".into());
    }
    assert_eq!(run(&store, foreign), err(Value::atom("access_denied")));
    let bad_history = Command::SessionCreate(SessionCreate {
        session: "h".into(),
        ttl_ms: Value::Nil,
        max_history: Value::Int(-1),
        metadata: Value::Nil,
        rate_limit: Value::Nil,
        audit_capacity: Value::Nil,
    });
    assert!(matches!(
        exec(&store, bad_history),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn set_many_atomic_and_not() {
    let store = Store::new();
    run(&store, create("s"));
    run(&store, register("s", "a", "integer", Value::Int(0)));
    run(&store, register("s", "b", "integer", Value::Int(0)));
    let spec = |ident: &str, value: Value| UpdateSpec {
        ident: Value::atom(ident),
        value,
        metadata: Value::Nil,
        expected_version: None,
    };
    let many = |atomic, updates| {
        Command::VarSetMany(VarSetMany {
            session: "s".into(),
            updates,
            atomic,
            actor: Actor::default(),
        })
    };
    let failed = run(
        &store,
        many(
            true,
            vec![spec("a", Value::Int(1)), spec("b", Value::str("x"))],
        ),
    );
    let Value::Tuple(parts) = &failed else {
        panic!()
    };
    assert_eq!(parts[0], Value::atom("error"));
    assert_eq!(run(&store, get_value("s", "a")), ok(Value::Int(0)));
    assert_eq!(
        run(
            &store,
            many(
                true,
                vec![spec("a", Value::Int(1)), spec("b", Value::Int(2))]
            )
        ),
        ok(Value::List(vec![Value::Int(1), Value::Int(1)].into()))
    );
    let each = run(
        &store,
        many(
            false,
            vec![spec("a", Value::Int(5)), spec("zz", Value::Int(2))],
        ),
    );
    assert_eq!(
        each,
        ok(Value::List(
            vec![
                Value::tagged("ok", Value::Int(2)),
                Value::tagged("error", Value::atom("not_found")),
            ]
            .into()
        ))
    );
}

#[test]
fn list_names_and_glob() {
    let store = Store::new();
    run(&store, create("s"));
    for name in ["temp_a", "temp_b", "other"] {
        run(&store, register("s", name, "integer", Value::Int(0)));
    }
    let listed = run(
        &store,
        Command::VarList(VarList {
            session: "s".into(),
            pattern: Some("temp_*".into()),
            actor: Actor::default(),
        }),
    );
    let Value::Tuple(parts) = listed else {
        panic!()
    };
    let Value::List(vars) = &parts[1] else {
        panic!()
    };
    let names: Vec<_> = vars.iter().map(|v| v.get("name").cloned()).collect();
    assert_eq!(
        names,
        vec![Some(Value::atom("temp_a")), Some(Value::atom("temp_b"))]
    );
    let names = run(
        &store,
        Command::VarNames(VarNames {
            session: "s".into(),
            pattern: Some("*_b".into()),
            actor: Actor::default(),
        }),
    );
    assert_eq!(names, ok(Value::List(vec![Value::atom("temp_b")].into())));
}

#[test]
fn export_import_through_commands() {
    let store = Store::new();
    run(&store, create("s"));
    run(&store, register("s", "a", "integer", Value::Int(7)));
    let exported = exec(
        &store,
        Command::SessionExport(SessionExport {
            session: "s".into(),
        }),
    )
    .unwrap();
    let Answer::Value(Value::Bytes(bytes)) = exported else {
        panic!("{exported:?}")
    };
    assert_eq!(
        run(
            &store,
            Command::SessionImport(SessionImport {
                snapshot: bytes.to_vec(),
                session: Some("copy".into()),
            })
        ),
        ok(Value::str("copy"))
    );
    assert_eq!(run(&store, get_value("copy", "a")), ok(Value::Int(7)));
    assert!(matches!(
        run(
            &store,
            Command::SessionImport(SessionImport {
                snapshot: b"nope".to_vec(),
                session: None,
            })
        ),
        Value::Tuple(_)
    ));
}

#[test]
fn graph_commands() {
    let store = Store::new();
    assert_eq!(run(&store, create("g")), Value::atom("ok"));
    for name in ["a", "b", "c"] {
        run(&store, register("g", name, "integer", Value::Int(0)));
    }
    let edge = |from: &str, to: &str| {
        Command::GraphAddEdge(GraphAddEdge {
            session: "g".into(),
            from: Value::atom(from),
            to: Value::atom(to),
            edge_type: Value::Nil,
            actor: Actor::default(),
        })
    };
    assert_eq!(run(&store, edge("a", "b")), ok(Value::Bool(true)));
    assert_eq!(run(&store, edge("a", "b")), ok(Value::Bool(false)));
    assert_eq!(run(&store, edge("b", "c")), ok(Value::Bool(true)));
    let path = ["c", "a", "b", "c"].map(Value::atom).to_vec();
    assert_eq!(
        run(&store, edge("c", "a")),
        err(Value::tagged(
            "would_create_cycle",
            Value::List(path.into())
        ))
    );
    assert_eq!(
        run(&store, edge("a", "a")),
        err(Value::atom("self_dependency"))
    );
    assert_eq!(
        run(&store, edge("a", "zz")),
        err(Value::tagged("not_found", Value::atom("zz")))
    );
    let order = Command::GraphUpdateOrder(GraphUpdateOrder {
        session: "g".into(),
        changed: vec![Value::atom("a")],
        actor: Actor::default(),
    });
    let abc = ["a", "b", "c"].map(Value::atom).to_vec();
    assert_eq!(run(&store, order), ok(Value::List(abc.into())));
    let deps = Command::GraphDependencies(GraphDependencies {
        session: "g".into(),
        ident: Value::atom("c"),
        transitive: true,
        actor: Actor::default(),
    });
    let ab = ["a", "b"].map(Value::atom).to_vec();
    assert_eq!(run(&store, deps), ok(Value::List(ab.into())));
    let render = Command::GraphRender(GraphRender {
        session: "g".into(),
        format: Value::atom("mermaid"),
        actor: Actor {
            principal: Some("intruder".into()),
            ..Actor::default()
        },
    });
    assert_eq!(run(&store, render), err(Value::atom("access_denied")));
    let clear = Command::GraphClear(GraphClear {
        session: "g".into(),
        ident: Value::atom("b"),
        actor: Actor::default(),
    });
    assert_eq!(run(&store, clear), ok(Value::Int(2)));
}

fn msgpack(m: &rmpv::Value) -> Vec<u8> {
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, m).unwrap();
    bytes
}

#[test]
fn commands_decode_by_name() {
    use rmpv::Value as M;
    let named = M::Map(vec![(
        M::from("var_set"),
        M::Map(vec![
            (M::from("session"), M::from("s")),
            (
                M::from("ident"),
                M::Ext(crate::value::EXT_ATOM, b"t".to_vec()),
            ),
            (M::from("value"), M::F64(0.5)),
        ]),
    )]);
    let mut cmd: Command = rmp_serde::from_slice(&msgpack(&named)).unwrap();
    if let Command::VarSet(VarSet { metadata, .. }) = &mut cmd {
        assert!(metadata.is_nil());
        *metadata = Value::Nil;
    }
    assert_eq!(cmd, set("s", "t", Value::Float(0.5)));
    let list: Command = rmp_serde::from_slice(&msgpack(&M::Map(vec![(
        M::from("session_list"),
        M::Map(vec![]),
    )])))
    .unwrap();
    assert_eq!(list, Command::SessionList(SessionList {}));
}

#[test]
fn a_misspelt_argument_is_an_error_not_a_default() {
    use rmpv::Value as M;
    let typo = M::Map(vec![(
        M::from("var_get"),
        M::Map(vec![
            (M::from("session"), M::from("s")),
            (M::from("ident"), M::from("t")),
            (M::from("principle"), M::from("p")),
        ]),
    )]);
    let e = rmp_serde::from_slice::<Command>(&msgpack(&typo)).unwrap_err();
    assert!(e.to_string().contains("principle"), "{e}");
}

#[test]
fn every_operation_name_is_its_wire_tag() {
    use rmpv::Value as M;
    for name in Command::NAMES {
        let bytes = msgpack(&M::Map(vec![(M::from(*name), M::Map(vec![]))]));
        match rmp_serde::from_slice::<Command>(&bytes) {
            Ok(cmd) => assert_eq!(cmd.name(), *name),
            Err(e) => assert!(!e.to_string().contains("unknown variant"), "{name}: {e}"),
        }
    }
    let mut names = Command::NAMES.to_vec();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), Command::NAMES.len());
}

#[test]
fn replies_serialize_as_id_and_term() {
    let reply = Reply {
        id: Some(9),
        result: Err(Error::VersionMismatch(3)),
    };
    let bytes = rmp_serde::to_vec(&reply).unwrap();
    let (id, term): (Option<u64>, Value) = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(id, Some(9));
    assert_eq!(term, err(Value::tagged("version_mismatch", Value::Int(3))));
}

fn arb_command() -> impl Strategy<Value = Command> {
    let text = "[a-z_]{1,12}";
    prop_oneof![
        (text, proptest::option::of(-10i64..1_000_000)).prop_map(|(s, ttl)| {
            Command::SessionCreate(SessionCreate {
                session: s,
                ttl_ms: ttl.map_or(Value::Nil, Value::Int),
                max_history: Value::Int(5),
                metadata: Value::empty_map(),
                rate_limit: Value::Nil,
                audit_capacity: Value::Nil,
            })
        }),
        (text, text, any::<i64>()).prop_map(|(s, i, n)| Command::VarSet(VarSet {
            session: s,
            ident: Value::str(&i),
            value: Value::Tuple(vec![Value::Int(n), Value::atom("x")].into()),
            metadata: Value::empty_map(),
            expected_version: Some(n.unsigned_abs()),
            actor: Actor {
                principal: Some("p".into()),
                context: Some(Value::empty_map()),
                lock_token: Some(n.unsigned_abs()),
                optimizer_id: Some("o".into()),
            },
        })),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| {
            Command::SessionImport(SessionImport {
                snapshot: b,
                session: None,
            })
        }),
    ]
}

proptest! {
    #[test]
    fn commands_round_trip(cmd in arb_command()) {
        let named = rmp_serde::to_vec_named(&cmd).unwrap();
        prop_assert_eq!(&rmp_serde::from_slice::<Command>(&named).unwrap(), &cmd);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = rmp_serde::from_slice::<Command>(&bytes);
    }

    #[test]
    fn executing_random_commands_never_panics(cmd in arb_command()) {
        let store = Store::new();
        let _ = exec(&store, cmd);
    }
}
