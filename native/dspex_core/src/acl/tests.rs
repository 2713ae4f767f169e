use super::*;
use proptest::prelude::*;
use Permission::*;

fn map(pairs: Vec<(&str, Value)>) -> Value {
    Value::Map(
        pairs
            .into_iter()
            .map(|(k, v)| (Value::atom(k), v))
            .collect(),
    )
}

fn perms(ps: &[Permission]) -> Value {
    Value::List(ps.iter().map(|p| Value::atom(p.name())).collect())
}

fn rule(pattern: Value, ps: &[Permission]) -> Value {
    map(vec![
        ("session_pattern", pattern),
        ("permissions", perms(ps)),
    ])
}

fn rule_if(pattern: Value, ps: &[Permission], conditions: Vec<(&str, Value)>) -> Value {
    map(vec![
        ("session_pattern", pattern),
        ("permissions", perms(ps)),
        ("conditions", map(conditions)),
    ])
}

/// The seed's variable: owned by "owner_session", readable by anyone,
/// writable and optimizable by "admin_*".
fn seed_acl() -> Acl {
    let rules = Value::List(
        vec![
            rule(Value::atom("any"), &[Read]),
            rule(Value::str("admin_*"), &[Read, Write, Optimize]),
        ]
        .into(),
    );
    let metadata = map(vec![("owner_session", Value::str("owner_session"))]);
    Acl::build(&rules, &metadata).unwrap().unwrap()
}

fn check(acl: &Acl, who: &str, perm: Permission) -> Result<()> {
    authorize(Some(who), "host", Some(acl), perm, None)
}

#[test]
fn seed_cases() {
    let acl = seed_acl();
    for p in Permission::ALL {
        assert_eq!(check(&acl, "owner_session", p), Ok(()));
        assert_eq!(authorize(None, "host", Some(&acl), p, None), Ok(()));
        assert_eq!(authorize(Some("host"), "host", None, p, None), Ok(()));
    }
    assert_eq!(check(&acl, "other_session", Read), Ok(()));
    assert_eq!(
        check(&acl, "other_session", Write),
        Err(Error::AccessDenied)
    );
    assert_eq!(check(&acl, "admin_user", Write), Ok(()));
    assert_eq!(check(&acl, "admin_user", Optimize), Ok(()));
    assert_eq!(check(&acl, "admin_user", Observe), Err(Error::AccessDenied));
    assert_eq!(check(&acl, "not_admin_1", Write), Err(Error::AccessDenied));
}

#[test]
fn default_deny() {
    assert_eq!(
        authorize(Some("x"), "host", None, Read, None),
        Err(Error::AccessDenied)
    );
    let acl = Acl::build(&Value::List(Box::new([])), &map(vec![])).unwrap();
    assert!(acl.is_none());
}

#[test]
fn owner_falls_back_to_created_by() {
    let meta = map(vec![("created_by", Value::str("maker"))]);
    let acl = Acl::build(&Value::Nil, &meta).unwrap().unwrap();
    assert_eq!(check(&acl, "maker", Write), Ok(()));
    assert_eq!(check(&acl, "other", Read), Err(Error::AccessDenied));
    assert!(is_owner(Some("maker"), "host", Some(&acl)));
    assert!(is_owner(Some("host"), "host", Some(&acl)));
    assert!(!is_owner(Some("other"), "host", Some(&acl)));
}

#[test]
fn wildcards_are_anchored_and_literal_otherwise() {
    let rules = Value::List(
        vec![
            rule(Value::str("a.b*"), &[Read]),
            rule(Value::str("x+y"), &[Write]),
            rule(Value::str("u?"), &[Observe]),
        ]
        .into(),
    );
    let acl = Acl::build(&rules, &Value::Nil).unwrap().unwrap();
    assert_eq!(check(&acl, "a.bc", Read), Ok(()));
    assert_eq!(check(&acl, "axbc", Read), Err(Error::AccessDenied));
    assert_eq!(check(&acl, "x+y", Write), Ok(()));
    assert_eq!(check(&acl, "xxy", Write), Err(Error::AccessDenied));
    assert_eq!(check(&acl, "u1", Observe), Ok(()));
    assert_eq!(check(&acl, "u", Observe), Err(Error::AccessDenied));
    assert_eq!(check(&acl, "u12", Observe), Err(Error::AccessDenied));
}

#[test]
fn conditions_must_all_equal_the_context() {
    let rules = Value::List(
        vec![rule_if(
            Value::atom("any"),
            &[Write],
            vec![("role", Value::str("editor")), ("level", Value::Int(2))],
        )]
        .into(),
    );
    let acl = Acl::build(&rules, &Value::Nil).unwrap().unwrap();
    let ok = map(vec![
        ("role", Value::str("editor")),
        ("level", Value::Float(2.0)),
    ]);
    let wrong = map(vec![
        ("role", Value::str("editor")),
        ("level", Value::Int(3)),
    ]);
    let partial = map(vec![("role", Value::str("editor"))]);
    let at = |ctx: Option<&Value>| authorize(Some("s"), "host", Some(&acl), Write, ctx);
    assert_eq!(at(Some(&ok)), Ok(()));
    assert_eq!(at(Some(&wrong)), Err(Error::AccessDenied));
    assert_eq!(at(Some(&partial)), Err(Error::AccessDenied));
    assert_eq!(at(None), Err(Error::AccessDenied));
}

#[test]
fn invalid_rules_say_why() {
    let reason = |rules: Value| match compile(&rules) {
        Err(Error::InvalidRules(d)) => d,
        other => panic!("expected invalid rules, got {other:?}"),
    };
    let at0 = |r: Value| Value::Tuple(vec![Value::Int(0), r].into());
    assert_eq!(reason(Value::Int(1)), Value::atom("not_a_list"));
    assert_eq!(
        reason(Value::List(vec![Value::Int(1)].into())),
        at0(Value::atom("not_a_map"))
    );
    assert_eq!(
        reason(Value::List(
            vec![rule(Value::atom("any"), &[]), map(vec![])].into()
        )),
        Value::Tuple(vec![Value::Int(1), Value::atom("missing_session_pattern")].into())
    );
    let bad_perm = map(vec![
        ("session_pattern", Value::atom("any")),
        (
            "permissions",
            Value::List(vec![Value::atom("invalid_perm")].into()),
        ),
    ]);
    assert_eq!(
        reason(Value::List(vec![bad_perm].into())),
        at0(Value::tagged(
            "invalid_permission",
            Value::atom("invalid_perm")
        ))
    );
    let typo = map(vec![
        ("session_pattern", Value::atom("any")),
        ("permission", perms(&[Read])),
    ]);
    assert_eq!(
        reason(Value::List(vec![typo].into())),
        at0(Value::tagged("unknown_key", Value::atom("permission")))
    );
    for pattern in [Value::str(""), Value::Int(3), Value::atom("all")] {
        let r = rule(pattern.clone(), &[Read]);
        assert_eq!(
            reason(Value::List(vec![r].into())),
            at0(Value::tagged("invalid_session_pattern", pattern))
        );
    }
    let many = Value::List(vec![rule(Value::atom("any"), &[Read]); MAX_RULES + 1].into());
    assert_eq!(
        reason(many),
        Value::tagged("too_many_rules", Value::Int(MAX_RULES as i64))
    );
    assert_eq!(validate(&Value::Nil), Ok(()));
}

#[test]
fn source_is_canonical() {
    let rules = Value::List(
        vec![map(vec![
            ("permissions", perms(&[Write, Read, Write])),
            ("session_pattern", Value::str("a*")),
        ])]
        .into(),
    );
    let acl = Acl::build(&rules, &Value::Nil).unwrap().unwrap();
    assert_eq!(
        acl.source(),
        &Value::List(vec![rule_if(Value::str("a*"), &[Read, Write], vec![])].into())
    );
    // The canonical form compiles to the same thing.
    let again = Acl::build(acl.source(), &Value::Nil).unwrap().unwrap();
    assert_eq!(again.source(), acl.source());
}

#[test]
fn decisions_are_cached_and_the_cache_is_bounded() {
    let rules = Value::List(vec![rule(Value::str("p*x?"), &[Read])].into());
    let acl = Acl::build(&rules, &Value::Nil).unwrap().unwrap();
    for i in 0..(3 * CACHE_CAPACITY) {
        assert!(acl.permits(&format!("p{i}xy"), Read, None));
        assert!(!acl.permits(&format!("p{i}"), Read, None));
        assert!((1..=CACHE_CAPACITY).contains(&acl.cached_decisions()));
    }
}

#[test]
fn one_entry_per_principal_covers_every_permission() {
    let rules = Value::List(
        vec![
            rule(Value::str("team_*"), &[Read]),
            rule(Value::str("*_bot"), &[Write]),
            rule(Value::str("alice"), &[Observe]),
        ]
        .into(),
    );
    let acl = Acl::build(&rules, &Value::Nil).unwrap().unwrap();
    assert!(acl.permits("team_1", Read, None));
    assert!(acl.permits("x_bot", Write, None));
    assert!(acl.permits("alice", Observe, None));
    assert!(!acl.permits("alice", Read, None));
    assert_eq!(acl.cached_decisions(), 3);
}

// ---- properties ------------------------------------------------------

/// Reference glob: a plain recursive matcher, fine for short inputs.
fn glob_ref(p: &[char], t: &[char]) -> bool {
    match p.split_first() {
        None => t.is_empty(),
        Some(('*', rest)) => (0..=t.len()).any(|i| glob_ref(rest, &t[i..])),
        Some(('?', rest)) => !t.is_empty() && glob_ref(rest, &t[1..]),
        Some((c, rest)) => t.first() == Some(c) && glob_ref(rest, &t[1..]),
    }
}

#[derive(Clone, Debug)]
struct RefRule {
    pattern: Option<String>,
    perms: Vec<Permission>,
    conditions: Vec<(String, i64)>,
}

/// Reference evaluator: the rules read literally, no cache, no split.
fn reference(
    rules: &[RefRule],
    owner: Option<&str>,
    who: &str,
    perm: Permission,
    ctx: &[(String, i64)],
) -> bool {
    owner == Some(who)
        || rules.iter().any(|r| {
            let who: Vec<char> = who.chars().collect();
            r.pattern
                .as_ref()
                .is_none_or(|p| glob_ref(&p.chars().collect::<Vec<_>>(), &who))
                && r.perms.contains(&perm)
                && r.conditions.iter().all(|(k, v)| {
                    ctx.iter().rev().find(|(ck, _)| ck == k).map(|(_, cv)| cv) == Some(v)
                })
        })
}

fn to_value(r: &RefRule) -> Value {
    let pattern = r
        .pattern
        .as_deref()
        .map_or_else(|| Value::atom("any"), Value::str);
    let conds = r
        .conditions
        .iter()
        .map(|(k, v)| (k.as_str(), Value::Int(*v)))
        .collect();
    rule_if(pattern, &r.perms, conds)
}

fn ctx_value(ctx: &[(String, i64)]) -> Value {
    // Later keys win, as in the reference; keep each key once.
    let mut pairs: Vec<(Value, Value)> = Vec::new();
    for (k, v) in ctx {
        pairs.retain(|(pk, _)| pk.as_text() != Some(k));
        pairs.push((Value::atom(k), Value::Int(*v)));
    }
    Value::Map(pairs.into())
}

fn perm_strategy() -> impl Strategy<Value = Permission> {
    prop::sample::select(Permission::ALL.to_vec())
}

fn rule_strategy() -> impl Strategy<Value = RefRule> {
    (
        prop::option::weighted(0.8, "[ab*?.+]{1,5}"),
        prop::collection::vec(perm_strategy(), 0..4),
        prop::collection::vec(("[kl]", 0..3i64), 0..2),
    )
        .prop_map(|(pattern, perms, mut conditions)| {
            conditions.dedup_by(|a, b| a.0 == b.0);
            RefRule {
                pattern,
                perms,
                conditions,
            }
        })
}

proptest! {
    #[test]
    fn decisions_agree_with_reference(
        rules in prop::collection::vec(rule_strategy(), 0..10),
        owner in prop::option::of("[ab]{1,2}"),
        asks in prop::collection::vec(
            ("[ab.+]{0,5}", perm_strategy(), prop::collection::vec(("[kl]", 0..3i64), 0..3)),
            1..20,
        ),
    ) {
        let mut conditions = rules.clone();
        for r in &mut conditions {
            let mut seen = std::collections::HashSet::new();
            r.conditions.retain(|(k, _)| seen.insert(k.clone()));
        }
        let source = Value::List(conditions.iter().map(to_value).collect());
        let metadata = owner
            .as_deref()
            .map_or(Value::Nil, |o| map(vec![("owner_session", Value::str(o))]));
        let acl = Acl::build(&source, &metadata).unwrap();
        let compiled = compile(&source).unwrap();
        // Ask each question twice: the second answer comes from the cache.
        for _ in 0..2 {
            for (who, perm, ctx) in &asks {
                let expected = reference(&conditions, owner.as_deref(), who, *perm, ctx);
                let ctx = ctx_value(ctx);
                let got = authorize(Some(who), "host!", acl.as_ref(), *perm, Some(&ctx));
                prop_assert_eq!(got.is_ok(), expected, "{} {:?}", who, perm);
                // The uncompiled path decides the same, by `grants`.
                let plain = grants(
                    owner.as_deref(),
                    who,
                    *perm,
                    compiled.iter(),
                    |k| lookup(Some(&ctx), k),
                );
                prop_assert_eq!(plain, expected, "grants: {} {:?}", who, perm);
            }
        }
    }

    #[test]
    fn compiling_never_panics(v in value_strategy()) {
        let _ = Acl::build(&Value::List(vec![v.clone()].into()), &v);
        let _ = validate(&v);
    }
}

fn value_strategy() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Nil),
        any::<i64>().prop_map(Value::Int),
        "[a-z_*?]{0,6}".prop_map(|s| Value::str(&s)),
        prop::sample::select(vec![
            "any",
            "read",
            "write",
            "observe",
            "optimize",
            "session_pattern",
            "permissions",
            "conditions",
            "bogus",
        ])
        .prop_map(Value::atom),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| Value::List(v.into())),
            prop::collection::vec((inner.clone(), inner), 0..4).prop_map(|v| Value::Map(v.into())),
        ]
    })
}
