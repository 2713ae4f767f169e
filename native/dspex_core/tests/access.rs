//! Access control through the session API: isolation of every operation,
//! rules granting across sessions, audit, rate limits, snapshots.

use dspex_core::audit::AuditEvent;
use dspex_core::ratelimit::RateLimit;
use dspex_core::session::{RegisterOpts, SessionOpts, Update};
use dspex_core::{Caller, Error, Permission, Store, Value, VarType, WriteMeta};

fn map(pairs: Vec<(&str, Value)>) -> Value {
    Value::Map(
        pairs
            .into_iter()
            .map(|(k, v)| (Value::atom(k), v))
            .collect(),
    )
}

fn rule(pattern: Value, perms: &[&str]) -> Value {
    map(vec![
        ("session_pattern", pattern),
        (
            "permissions",
            Value::List(perms.iter().map(|p| Value::atom(p)).collect()),
        ),
    ])
}

/// The demo's shared variable: readable by anyone, writable by "admin_*".
fn shared_rules() -> Value {
    Value::List(
        vec![
            rule(Value::atom("any"), &["read"]),
            rule(Value::str("admin_*"), &["read", "write", "optimize"]),
        ]
        .into(),
    )
}

fn store_with(rules: Value) -> Store {
    let store = Store::new();
    let s = store
        .create_session("home", SessionOpts::default(), 0)
        .unwrap();
    for name in ["private", "shared"] {
        let opts = RegisterOpts {
            access_rules: if name == "shared" {
                rules.clone()
            } else {
                Value::Nil
            },
            ..Default::default()
        };
        s.register(Value::atom(name), VarType::Integer, Value::Int(0), opts, 0)
            .unwrap();
    }
    store
}

fn upd(ident: &str, v: i64) -> Update {
    Update {
        ident: ident.into(),
        value: Value::Int(v),
        meta: WriteMeta::default(),
    }
}

#[test]
fn another_session_is_refused_every_operation_on_a_private_variable() {
    let store = store_with(shared_rules());
    let s = store.session("home", 0).unwrap();
    let intruder = Caller::principal("intruder", 0);
    let denied = Err(Error::AccessDenied);
    assert_eq!(s.get_value("private", &intruder).map(drop), denied);
    assert_eq!(s.get("private", &intruder).map(drop), denied);
    assert_eq!(
        s.update("private", Value::Int(1), WriteMeta::default(), &intruder)
            .map(drop),
        denied
    );
    assert_eq!(
        s.history("private", 10, &intruder).map(drop),
        denied.clone()
    );
    assert_eq!(
        s.rollback("private", 0, Value::Nil, &intruder).map(drop),
        denied
    );
    assert_eq!(s.delete("private", &intruder).map(drop), denied);
    assert_eq!(
        s.authorize("private", &intruder, Permission::Observe),
        denied
    );
    assert_eq!(
        s.authorize("private", &intruder, Permission::Optimize),
        denied
    );
    assert_eq!(s.access_rules("private", &intruder).map(drop), denied);
    assert_eq!(
        s.set_access_rules("private", &shared_rules(), &intruder),
        denied
    );
    assert!(matches!(
        s.update_atomic(vec![upd("private", 1)], &intruder),
        Err(Error::ValidationFailed(_))
    ));
    let each = s.update_each(vec![upd("private", 1)], &intruder);
    assert_eq!(each[0].1, Err(Error::AccessDenied));
    // Listing leaves the private variable out instead of failing.
    let names: Vec<_> = s
        .names(&intruder)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, vec![Value::atom("shared")]);
    assert_eq!(s.variables(&intruder).unwrap().len(), 1);
    // Nothing changed, and the session itself still sees everything.
    assert_eq!(s.get_value("private", &Caller::owner(0)), Ok(Value::Int(0)));
    assert_eq!(s.names(&Caller::principal("home", 0)).unwrap().len(), 2);
}

#[test]
fn rules_grant_across_sessions() {
    let store = store_with(shared_rules());
    let s = store.session("home", 0).unwrap();
    let other = Caller::principal("other_session", 0);
    let admin = Caller::principal("admin_user", 0);
    let impostor = Caller::principal("not_admin_1", 0);
    assert_eq!(s.get_value("shared", &other), Ok(Value::Int(0)));
    assert_eq!(
        s.update("shared", Value::Int(1), WriteMeta::default(), &other),
        Err(Error::AccessDenied)
    );
    assert_eq!(
        s.update("shared", Value::Int(2), WriteMeta::default(), &admin),
        Ok(1)
    );
    assert_eq!(s.authorize("shared", &admin, Permission::Optimize), Ok(()));
    assert_eq!(
        s.authorize("shared", &admin, Permission::Observe),
        Err(Error::AccessDenied)
    );
    assert_eq!(
        s.update("shared", Value::Int(3), WriteMeta::default(), &impostor),
        Err(Error::AccessDenied)
    );
    // Owners only may change rules, even an admin may not.
    assert_eq!(
        s.set_access_rules("shared", &Value::Nil, &admin),
        Err(Error::AccessDenied)
    );
}

#[test]
fn a_rule_change_takes_effect_at_once() {
    let store = store_with(shared_rules());
    let s = store.session("home", 0).unwrap();
    let other = Caller::principal("other_session", 0);
    // Warm the decision cache with both answers.
    for _ in 0..3 {
        assert_eq!(s.check_access("shared", &other, Permission::Read), Ok(()));
        assert_eq!(
            s.check_access("shared", &other, Permission::Write),
            Err(Error::AccessDenied)
        );
    }
    let writers = Value::List(vec![rule(Value::str("other_*"), &["write"])].into());
    s.set_access_rules("shared", &writers, &Caller::owner(0))
        .unwrap();
    assert_eq!(s.check_access("shared", &other, Permission::Write), Ok(()));
    assert_eq!(
        s.check_access("shared", &other, Permission::Read),
        Err(Error::AccessDenied)
    );
    assert_eq!(s.access_rules("shared", &Caller::owner(0)).unwrap(), {
        Value::List(
            vec![map(vec![
                ("session_pattern", Value::str("other_*")),
                (
                    "permissions",
                    Value::List(vec![Value::atom("write")].into()),
                ),
                ("conditions", Value::empty_map()),
            ])]
            .into(),
        )
    });
    // Bad rules are refused and leave the old ones in place.
    assert!(matches!(
        s.set_access_rules("shared", &Value::Int(1), &Caller::owner(0)),
        Err(Error::InvalidRules(_))
    ));
    assert_eq!(s.check_access("shared", &other, Permission::Write), Ok(()));
}

#[test]
fn the_owner_in_metadata_has_every_permission() {
    let store = Store::new();
    let s = store
        .create_session("host", SessionOpts::default(), 0)
        .unwrap();
    let opts = RegisterOpts {
        metadata: map(vec![("owner_session", Value::str("alice"))]),
        ..Default::default()
    };
    s.register(Value::atom("v"), VarType::Integer, Value::Int(0), opts, 0)
        .unwrap();
    let alice = Caller::principal("alice", 0);
    assert_eq!(
        s.update("v", Value::Int(5), WriteMeta::default(), &alice),
        Ok(1)
    );
    let rules = Value::List(vec![rule(Value::str("bob"), &["read"])].into());
    assert_eq!(s.set_access_rules("v", &rules, &alice), Ok(()));
    assert_eq!(
        s.get_value("v", &Caller::principal("bob", 0)),
        Ok(Value::Int(5))
    );
}

#[test]
fn denials_and_rule_changes_are_audited_in_a_bounded_ring() {
    let store = Store::new();
    let opts = SessionOpts {
        audit_capacity: 4,
        ..Default::default()
    };
    let s = store.create_session("home", opts, 0).unwrap();
    let id = s
        .register(
            Value::atom("v"),
            VarType::Integer,
            Value::Int(0),
            Default::default(),
            0,
        )
        .unwrap();
    s.set_access_rules("v", &shared_rules(), &Caller::owner(0))
        .unwrap();
    let log = s.audit_log(10);
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].event, AuditEvent::RulesChanged);
    for i in 0..10 {
        let who = format!("p{i}");
        let _ = s.update(
            "v",
            Value::Int(1),
            WriteMeta::default(),
            &Caller::principal(&who, 0),
        );
    }
    // Allowed operations are not audited.
    s.get_value("v", &Caller::principal("reader", 0)).unwrap();
    let log = s.audit_log(10);
    assert_eq!(log.len(), 4);
    assert_eq!(log[0].event, AuditEvent::Denied);
    assert_eq!(log[0].principal.as_deref(), Some("p9"));
    assert_eq!(log[0].variable.as_deref(), Some(&*id));
    assert_eq!(log[0].permission, Some(Permission::Write));
    assert_eq!(log[0].seq, 11);
    assert_eq!(s.audit_ring().dropped(), 7);
}

#[test]
fn rate_limit_refuses_past_the_burst_and_audits() {
    let store = Store::new();
    let opts = SessionOpts {
        rate_limit: Some(RateLimit::new(1, 3).unwrap()),
        ..Default::default()
    };
    let s = store.create_session("slow", opts, 0).unwrap();
    // Registration is an operation too.
    s.register(
        Value::atom("v"),
        VarType::Integer,
        Value::Int(0),
        Default::default(),
        0,
    )
    .unwrap();
    assert!(s.get_value("v", &Caller::owner(0)).is_ok());
    assert!(s.names(&Caller::owner(0)).is_ok());
    assert_eq!(s.get_value("v", &Caller::owner(0)), Err(Error::RateLimited));
    assert_eq!(
        s.names(&Caller::owner(0)).map(drop),
        Err(Error::RateLimited)
    );
    assert_eq!(s.audit_log(1)[0].event, AuditEvent::RateLimited);
    // Questions and snapshots take no token.
    assert_eq!(
        s.check_access("v", &Caller::owner(0), Permission::Read),
        Ok(())
    );
    assert!(store.export_session("slow", 0).is_ok());
}

#[test]
fn rules_and_limits_survive_export_and_import() {
    let store = store_with(shared_rules());
    let bytes = store.export_session("home", 0).unwrap();
    store.import_session(&bytes, Some("copy"), 0).unwrap();
    let copy = store.session("copy", 0).unwrap();
    // The copy's own id now hosts it; the rules moved with the variables.
    assert_eq!(
        copy.get_value("shared", &Caller::principal("anyone", 0)),
        Ok(Value::Int(0))
    );
    assert_eq!(
        copy.get_value("private", &Caller::principal("home", 0)),
        Err(Error::AccessDenied)
    );
    assert_eq!(
        copy.authorize(
            "shared",
            &Caller::principal("admin_x", 0),
            Permission::Write
        ),
        Ok(())
    );

    let limited = Store::new();
    let opts = SessionOpts {
        rate_limit: Some(RateLimit::new(7, 9).unwrap()),
        ..Default::default()
    };
    limited.create_session("l", opts, 0).unwrap();
    let bytes = limited.export_session("l", 0).unwrap();
    limited.import_session(&bytes, Some("l2"), 0).unwrap();
    let (limit, _) = limited.session("l2", 0).unwrap().rate_limit(0).unwrap();
    assert_eq!(limit, RateLimit::new(7, 9).unwrap());
}
