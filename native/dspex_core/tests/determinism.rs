//! Applying is a pure function of (state, stamped command): the same random
//! sequence of stamped commands applied to two fresh stores gives the same
//! replies, byte-identical exported snapshots and the same audit logs.
//! Time travels in the stamps (TTL expiry, rate-limit refills, audit and
//! write timestamps), lock tokens in `var_fence` commands, and variable ids
//! are made from each session's own counter.

use dspex_core::command::args::Actor;
use dspex_core::command::*;
use dspex_core::locks::FenceChange;
use dspex_core::{Command, Store, Value};
use proptest::prelude::*;

const SESSIONS: [&str; 2] = ["s1", "s2"];
const NAMES: [&str; 3] = ["a", "b", "c"];

fn actor() -> impl Strategy<Value = Actor> {
    (
        prop::option::of(prop::sample::select(vec!["s1", "s2", "x"])),
        prop::option::of(1u64..6),
        prop::option::of(prop::sample::select(vec!["o1", "o2"])),
    )
        .prop_map(|(p, t, o)| Actor {
            principal: p.map(Into::into),
            context: None,
            lock_token: t,
            optimizer_id: o.map(Into::into),
        })
}

fn command() -> impl Strategy<Value = Command> {
    let sid = prop::sample::select(SESSIONS.to_vec()).prop_map(String::from);
    let name = prop::sample::select(NAMES.to_vec()).prop_map(Value::atom);
    prop_oneof![
        (
            sid.clone(),
            prop::option::of(1i64..50),
            prop::option::of(1i64..5)
        )
            .prop_map(|(s, ttl, rate)| SessionCreate {
                session: s,
                ttl_ms: ttl.map_or(Value::Nil, Value::Int),
                max_history: Value::Int(3),
                metadata: Value::Nil,
                rate_limit: rate.map_or(Value::Nil, |r| {
                    Value::Tuple(vec![Value::Int(r), Value::Int(3)].into())
                }),
                audit_capacity: Value::Int(8),
            }
            .into()),
        (sid.clone(), name.clone()).prop_map(|(s, n)| VarRegister {
            session: s,
            name: n,
            var_type: Value::atom("integer"),
            initial: Value::Int(0),
            constraints: Value::Nil,
            metadata: Value::Nil,
            description: None,
            access_rules: Value::Nil,
            actor: Actor::default(),
        }
        .into()),
        (sid.clone(), name.clone(), any::<i32>(), actor()).prop_map(|(s, n, v, a)| VarSet {
            session: s,
            ident: n,
            value: Value::Int(v.into()),
            metadata: Value::Nil,
            expected_version: None,
            actor: a,
        }
        .into()),
        (sid.clone(), name.clone(), 0u64..4).prop_map(|(s, n, v)| VarRollback {
            session: s,
            ident: n,
            version: v,
            metadata: Value::Nil,
            actor: Actor::default(),
        }
        .into()),
        (sid.clone(), name.clone(), actor()).prop_map(|(s, n, a)| VarGet {
            session: s,
            ident: n,
            actor: a,
        }
        .into()),
        (sid.clone(), name.clone(), 1u64..6, any::<bool>()).prop_map(|(s, n, t, grant)| {
            VarFence {
                session: s,
                ident: n,
                change: if grant {
                    FenceChange::Granted {
                        optimizer: format!("o{}", t % 2 + 1),
                        token: t,
                        preempted: None,
                    }
                } else {
                    FenceChange::Released { token: t }
                },
            }
            .into()
        }),
        (sid.clone(), name.clone(), name.clone()).prop_map(|(s, f, t)| GraphAddEdge {
            session: s,
            from: f,
            to: t,
            edge_type: Value::Nil,
            actor: Actor::default(),
        }
        .into()),
        (sid.clone(), name.clone()).prop_map(|(s, n)| VarDelete {
            session: s,
            ident: n,
            actor: Actor::default(),
        }
        .into()),
        (sid.clone(), name.clone()).prop_map(|(s, n)| AclSetRules {
            session: s,
            ident: n,
            rules: Value::List(
                vec![Value::Map(
                    vec![
                        (Value::atom("principal"), Value::str("x")),
                        (
                            Value::atom("permissions"),
                            Value::List(vec![Value::atom("read")].into()),
                        ),
                    ]
                    .into(),
                )]
                .into(),
            ),
            actor: Actor::default(),
        }
        .into()),
        Just(SessionSweep {}.into()),
        sid.prop_map(|s| SessionDelete { session: s }.into()),
    ]
}

fn run(store: &Store, steps: &[(u32, Command)]) -> Vec<Value> {
    let mut now = 1_700_000_000_000_000i64;
    steps
        .iter()
        .map(|(dt, cmd)| {
            now += i64::from(*dt);
            let result = store.execute(cmd.clone().stamped(now));
            Reply { id: None, result }.term()
        })
        .collect()
}

/// What a replica would compare: each session's export and audit log.
fn state(store: &Store, now: i64) -> Vec<(String, Vec<u8>, Value)> {
    store
        .session_ids(now)
        .iter()
        .map(|id| {
            let export = store.export_session(id, now).unwrap();
            let audit = store
                .execute(
                    AclAuditLog {
                        session: id.to_string(),
                        limit: None,
                    }
                    .into_stamped(now),
                )
                .map(|a| a.into_term())
                .unwrap();
            (id.to_string(), export, audit)
        })
        .collect()
}

trait IntoStamped {
    fn into_stamped(self, now: i64) -> dspex_core::Stamped;
}

impl<T: Into<Command>> IntoStamped for T {
    fn into_stamped(self, now: i64) -> dspex_core::Stamped {
        self.into().stamped(now)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn two_fresh_stores_end_identical(
        steps in prop::collection::vec((0u32..20_000, command()), 1..60)
    ) {
        let (a, b) = (Store::new(), Store::new());
        let replies_a = run(&a, &steps);
        let replies_b = run(&b, &steps);
        prop_assert_eq!(replies_a, replies_b);
        let end = 1_700_000_000_000_000i64 + steps.iter().map(|(dt, _)| i64::from(*dt)).sum::<i64>();
        prop_assert_eq!(state(&a, end), state(&b, end));
    }
}
