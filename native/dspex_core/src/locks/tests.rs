//! Tests of the lock table and fencing, with the property test of the
//! invariants in [the module docs](super).

use std::collections::HashMap;

use parking_lot::Mutex;

use super::*;
use crate::variable::Variable;
use proptest::prelude::*;

type Table = LockTable<u8, u32>;

fn table() -> Table {
    LockTable::new(LockConfig::default())
}

fn req(opt: &str, owner: u32, conflict: Conflict) -> Request<u32> {
    Request {
        optimizer: opt.into(),
        owner,
        notify: owner,
        conflict,
        wait_ms: 5_000,
        lease_ms: None,
        fence: None,
    }
}

fn token(a: &Outcome<Acquired, u8, u32>) -> u64 {
    match a.result {
        Ok(Acquired::Granted { token, .. })
        | Ok(Acquired::AlreadyHeld { token })
        | Ok(Acquired::Preempted { token, .. }) => token,
        ref other => panic!("not granted: {other:?}"),
    }
}

fn waiter(a: &Outcome<Acquired, u8, u32>) -> u64 {
    match a.result {
        Ok(Acquired::Queued { waiter, .. }) => waiter,
        ref other => panic!("not queued: {other:?}"),
    }
}

#[test]
fn abort_reports_the_holder_and_release_frees() {
    let t = table();
    token(&t.acquire(&1, req("opt1", 1, Conflict::Wait), 0));
    let r = t.acquire(&1, req("opt2", 2, Conflict::Abort), 0);
    assert_eq!(r.result, Err(Error::LockHeldBy("opt1".into())));
    assert_eq!(t.release(&1, "opt2", 0).result, Err(Error::NotLockOwner));
    assert!(t.release(&1, "opt1", 0).result.is_ok());
    assert!(t.is_empty());
    token(&t.acquire(&1, req("opt2", 2, Conflict::Abort), 0));
    t.check_invariants(0).unwrap();
}

#[test]
fn release_grants_waiters_in_fifo_order() {
    let t = table();
    let first = token(&t.acquire(&1, req("a", 1, Conflict::Wait), 0));
    let ws: Vec<u64> = ["b", "c", "d"]
        .iter()
        .zip(2..)
        .map(|(o, p)| waiter(&t.acquire(&1, req(o, p, Conflict::Wait), 0)))
        .collect();
    let mut last = first;
    for (i, opt) in ["a", "b", "c"].iter().enumerate() {
        let out = t.release(&1, opt, 1);
        assert_eq!(out.effects.grants.len(), 1);
        let g = &out.effects.grants[0];
        assert_eq!(g.waiter, ws[i]);
        assert!(g.token > last);
        last = g.token;
        t.check_invariants(1).unwrap();
    }
}

#[test]
fn an_expired_waiter_is_skipped() {
    let t = table();
    token(&t.acquire(&1, req("a", 1, Conflict::Wait), 0));
    let mut short = req("b", 2, Conflict::Wait);
    short.wait_ms = 10;
    waiter(&t.acquire(&1, short, 0));
    let w3 = waiter(&t.acquire(&1, req("c", 3, Conflict::Wait), 0));
    let out = t.release(&1, "a", 50);
    assert_eq!(out.effects.dropped, vec![2]);
    assert_eq!(out.effects.grants[0].waiter, w3);
    t.check_invariants(50).unwrap();
}

#[test]
fn cancel_tells_removed_from_granted() {
    let t = table();
    token(&t.acquire(&1, req("a", 1, Conflict::Wait), 0));
    let w2 = waiter(&t.acquire(&1, req("b", 2, Conflict::Wait), 0));
    let w3 = waiter(&t.acquire(&1, req("c", 3, Conflict::Wait), 0));
    assert_eq!(t.cancel(&1, w2), Cancelled::Removed(2));
    let out = t.release(&1, "a", 1);
    assert_eq!(out.effects.grants[0].waiter, w3);
    assert!(matches!(t.cancel(&1, w3), Cancelled::Granted { .. }));
    assert_eq!(t.cancel(&1, w2), Cancelled::Gone);
    t.check_invariants(1).unwrap();
}

#[test]
fn owner_down_passes_the_lock_and_drops_its_waits() {
    let t = table();
    token(&t.acquire(&1, req("a", 1, Conflict::Wait), 0));
    token(&t.acquire(&2, req("b", 2, Conflict::Wait), 0));
    waiter(&t.acquire(&2, req("a2", 1, Conflict::Wait), 0));
    let w = waiter(&t.acquire(&1, req("c", 3, Conflict::Wait), 0));
    let fx = t.owner_down(&1, 1);
    assert_eq!(fx.grants.len(), 1);
    assert_eq!(fx.grants[0].waiter, w);
    assert_eq!(fx.ended[0].reason, EndReason::OwnerDown);
    assert!(fx.ended[0].finished);
    assert_eq!(fx.dropped, vec![1]);
    assert_eq!(t.release(&2, "b", 1).effects.grants, vec![]);
    t.check_invariants(1).unwrap();
}

#[test]
fn preemption_needs_ten_iterations() {
    let t = table();
    token(&t.acquire(&1, req("old", 1, Conflict::Wait), 0));
    t.report_progress("old", 9, Value::Nil, Value::Nil, 0)
        .result
        .unwrap();
    let early = t.acquire(&1, req("new", 2, Conflict::Preempt), 0);
    let w = waiter(&early);
    assert_eq!(t.cancel(&1, w), Cancelled::Removed(2));
    t.report_progress("old", 10, Value::Nil, Value::Nil, 0)
        .result
        .unwrap();
    let late = t.acquire(&1, req("new", 2, Conflict::Preempt), 0);
    assert!(matches!(
        late.result,
        Ok(Acquired::Preempted { ref previous, .. }) if &**previous == "old"
    ));
    assert_eq!(late.effects.ended[0].reason, EndReason::Preempted);
    assert_eq!(late.effects.ended[0].owner, 1);
    assert!(t.status("old", 0).is_none());
    assert_eq!(t.info(&1, 0).unwrap().optimizer.as_ref(), "new");
    t.check_invariants(0).unwrap();
}

#[test]
fn a_queued_preempter_takes_over_at_the_threshold() {
    let t = table();
    token(&t.acquire(&1, req("old", 1, Conflict::Wait), 0));
    let plain = waiter(&t.acquire(&1, req("plain", 2, Conflict::Wait), 0));
    let eager = waiter(&t.acquire(&1, req("eager", 3, Conflict::Preempt), 0));
    let p9 = t.report_progress("old", 9, Value::Nil, Value::Nil, 0);
    assert!(p9.effects.is_empty());
    let p10 = t.report_progress("old", 10, Value::Nil, Value::Nil, 0);
    assert_eq!(p10.effects.ended[0].reason, EndReason::Preempted);
    let g = &p10.effects.grants[0];
    assert_eq!((g.waiter, g.preempted.as_deref()), (eager, Some("old")));
    assert_eq!(t.info(&1, 0).unwrap().optimizer.as_ref(), "eager");
    let out = t.release(&1, "eager", 0);
    assert_eq!(out.effects.grants[0].waiter, plain);
    t.check_invariants(0).unwrap();
}

#[test]
fn leases_expire_unless_renewed() {
    let t = table();
    let mut r = req("a", 1, Conflict::Wait);
    r.lease_ms = Some(100);
    token(&t.acquire(&1, r, 0));
    let w = waiter(&t.acquire(&1, req("b", 2, Conflict::Wait), 0));
    assert_eq!(t.renew(&1, "a", Some(100), 90).result, Ok(1));
    assert!(t.expire(150).is_empty());
    assert_eq!(t.next_deadline(), Some(190));
    let fx = t.expire(190);
    assert_eq!(fx.ended[0].reason, EndReason::Expired);
    assert_eq!(fx.grants[0].waiter, w);
    assert_eq!(t.renew(&1, "a", None, 191).result, Err(Error::NotLockOwner));
    t.check_invariants(191).unwrap();
}

#[test]
fn progress_keeps_the_lowest_score_and_renews() {
    let t = table();
    let mut r = req("a", 1, Conflict::Wait);
    r.lease_ms = Some(100);
    token(&t.acquire(&1, r, 0));
    let m = |k: &str, x: f64| Value::Map(vec![(Value::atom(k), Value::Float(x))].into());
    let p = |i, v: i64, metrics| t.report_progress("a", i, Value::Int(v), metrics, 50).result;
    assert_eq!(p(1, 10, m("loss", 0.5)), Ok(true));
    assert_eq!(p(2, 20, m("loss", 0.7)), Ok(false));
    assert_eq!(p(3, 30, m("primary_metric", 0.1)), Ok(true));
    assert_eq!(p(4, 40, Value::Nil), Ok(false));
    assert_eq!(p(5, 50, m("loss", f64::NAN)), Ok(false));
    let s = t.status("a", 50).unwrap();
    assert_eq!(s.iteration, 5);
    assert_eq!(s.best.unwrap().value, Value::Int(30));
    assert!(t.expire(120).is_empty(), "progress renewed the lease");
    assert_eq!(
        t.report_progress("zz", 1, Value::Nil, Value::Nil, 0).result,
        Err(Error::NotOptimizing)
    );
}

#[test]
fn reacquire_by_the_holder_keeps_its_token() {
    let t = table();
    let a = token(&t.acquire(&1, req("a", 1, Conflict::Wait), 0));
    let b = t.acquire(&1, req("a", 1, Conflict::Abort), 0);
    assert_eq!(b.result, Ok(Acquired::AlreadyHeld { token: a }));
    t.check_invariants(0).unwrap();
}

fn var() -> Arc<Mutex<Variable>> {
    use crate::types::{Constraints, VarType};
    let v = Variable::new(
        "var_x_1".into(),
        Value::atom("x"),
        VarType::Integer,
        Constraints::default(),
        Value::Int(0),
        Value::empty_map(),
        None,
        10,
        0,
    )
    .unwrap();
    Arc::new(Mutex::new(v))
}

fn claim(token: Option<u64>, optimizer: Option<&str>) -> LockClaim<'_> {
    LockClaim { token, optimizer }
}

#[test]
fn fencing_follows_grants_and_preemption() {
    let t = table();
    let cell = var();
    let fenced = |opt: &str, owner, c| {
        let mut r = req(opt, owner, c);
        r.fence = Some(cell.clone() as Arc<dyn Fence>);
        r
    };
    let t1 = token(&t.acquire(&1, fenced("old", 1, Conflict::Wait), 0));
    let admit = |c: LockClaim| cell.lock().lock.admit(&c);
    assert_eq!(admit(claim(None, None)), Err(Error::LockedBy("old".into())));
    assert_eq!(admit(claim(Some(t1), None)), Ok(()));
    assert_eq!(admit(claim(None, Some("old"))), Ok(()));
    assert_eq!(
        admit(claim(None, Some("other"))),
        Err(Error::LockedBy("old".into()))
    );
    t.report_progress("old", 10, Value::Nil, Value::Nil, 0)
        .result
        .unwrap();
    let t2 = token(&t.acquire(&1, fenced("new", 2, Conflict::Preempt), 0));
    assert!(t2 > t1);
    assert_eq!(admit(claim(Some(t1), None)), Err(Error::StaleLockToken));
    assert_eq!(admit(claim(None, Some("old"))), Err(Error::StaleLockToken));
    assert_eq!(admit(claim(Some(t2), None)), Ok(()));
    t.release(&1, "new", 0).result.unwrap();
    assert_eq!(admit(claim(None, None)), Ok(()));
    assert_eq!(admit(claim(Some(t1), None)), Err(Error::StaleLockToken));
    assert_eq!(admit(claim(Some(t2), None)), Ok(()));
}

#[test]
fn session_writes_respect_the_lock() {
    use crate::caller::Caller;
    use crate::session::{Session, SessionOpts};
    use crate::types::VarType;
    use crate::variable::WriteMeta;

    let s = Session::new("s".into(), SessionOpts::default(), Default::default(), 0);
    s.register(
        Value::atom("x"),
        VarType::Integer,
        Value::Int(0),
        Default::default(),
        0,
    )
    .unwrap();
    let t = table();
    let mut r = req("opt1", 1, Conflict::Wait);
    r.fence = Some(s.cell("x").unwrap() as Arc<dyn Fence>);
    let tok = token(&t.acquire(&1, r, 0));
    let write = |c: LockClaim| {
        let caller = Caller {
            lock: c,
            ..Caller::owner(0)
        };
        s.update("x", Value::Int(1), WriteMeta::default(), &caller)
    };
    assert_eq!(
        write(claim(None, None)),
        Err(Error::LockedBy("opt1".into()))
    );
    assert_eq!(write(claim(Some(tok), None)), Ok(1));
    assert_eq!(write(claim(None, Some("opt1"))), Ok(2));
    let batch = s.update_atomic(
        vec![crate::session::Update {
            ident: "x".into(),
            value: Value::Int(3),
            meta: WriteMeta::default(),
        }],
        &Caller::owner(0),
    );
    assert!(matches!(batch, Err(Error::ValidationFailed(_))));
    t.release(&1, "opt1", 0).result.unwrap();
    assert_eq!(write(claim(None, None)), Ok(3));
}

#[test]
fn threads_never_hold_a_key_together() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let t = Arc::new(table());
    let inside = Arc::new(AtomicU32::new(0));
    let threads: Vec<_> = (0..4u32)
        .map(|n| {
            let (t, inside) = (t.clone(), inside.clone());
            std::thread::spawn(move || {
                let opt = format!("t{n}");
                for _ in 0..2_000 {
                    let out = t.acquire(&7, req(&opt, n, Conflict::Abort), 0);
                    if out.result.is_ok() {
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        inside.fetch_sub(1, Ordering::SeqCst);
                        t.release(&7, &opt, 0).result.unwrap();
                    }
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    assert!(t.is_empty());
    t.check_invariants(0).unwrap();
}

#[derive(Clone, Debug)]
enum Op {
    Acquire {
        key: u8,
        owner: u32,
        conflict: u8,
        wait: u8,
    },
    Release {
        key: u8,
        owner: u32,
    },
    Cancel {
        key: u8,
        nth: u8,
    },
    Down {
        owner: u32,
    },
    Progress {
        owner: u32,
        iteration: u8,
    },
    Tick {
        ms: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3u8, 0..6u32, 0..3u8, 0..40u8).prop_map(|(key, owner, conflict, wait)| {
            Op::Acquire { key, owner, conflict, wait }
        }),
        3 => (0..3u8, 0..6u32).prop_map(|(key, owner)| Op::Release { key, owner }),
        1 => (0..3u8, 0..8u8).prop_map(|(key, nth)| Op::Cancel { key, nth }),
        1 => (0..6u32).prop_map(|owner| Op::Down { owner }),
        1 => (0..6u32, 0..20u8).prop_map(|(owner, iteration)| Op::Progress { owner, iteration }),
        2 => (0..30u8).prop_map(|ms| Op::Tick { ms }),
    ]
}

/// One optimizer per owner keeps the model simple: optimizer `o{n}`.
fn opt(owner: u32) -> String {
    format!("o{owner}")
}

/// What the table should look like, from the outside.
#[derive(Default)]
struct Model {
    now: u64,
    last_token: HashMap<u8, u64>,
    /// Per key, queued (waiter id, owner, deadline) in queue order.
    queued: HashMap<u8, Vec<(u64, u32, u64, bool)>>,
    holders: HashMap<u8, u32>,
}

impl Model {
    fn granted(&mut self, key: u8, owner: u32, token: u64) -> Result<(), TestCaseError> {
        let last = self.last_token.entry(key).or_insert(0);
        prop_assert!(token > *last, "token {} after {}", token, last);
        *last = token;
        prop_assert!(self.holders.insert(key, owner).is_none(), "two holders");
        Ok(())
    }

    fn apply(&mut self, fx: &Effects<u8, u32>) -> Result<(), TestCaseError> {
        self.apply_ended(fx)?;
        self.apply_grants(fx)
    }

    fn apply_ended(&mut self, fx: &Effects<u8, u32>) -> Result<(), TestCaseError> {
        for e in &fx.ended {
            prop_assert_eq!(self.holders.remove(&e.key), Some(e.owner));
        }
        Ok(())
    }

    fn apply_grants(&mut self, fx: &Effects<u8, u32>) -> Result<(), TestCaseError> {
        for g in &fx.grants {
            let q = self.queued.entry(g.key).or_default();
            let pos = q.iter().position(|w| w.0 == g.waiter);
            prop_assert!(pos.is_some(), "granted a waiter that is not queued");
            let pos = pos.unwrap_or_default();
            if g.preempted.is_some() {
                // A preemption goes to the first live preempter.
                prop_assert!(q[pos].3);
                for w in &q[..pos] {
                    prop_assert!(!w.3 || w.2 <= self.now, "preempter {} skipped", w.0);
                }
                q.remove(pos);
            } else {
                // FIFO: a waiter ahead of the granted one may only have
                // been skipped because its deadline passed.
                for w in &q[..pos] {
                    prop_assert!(w.2 <= self.now, "live waiter {} skipped", w.0);
                }
                q.drain(..=pos);
            }
            self.granted(g.key, g.owner, g.token)?;
        }
        Ok(())
    }
}

proptest! {
    #[test]
    fn random_operations_keep_the_invariants(ops in proptest::collection::vec(op(), 1..150)) {
        let t = LockTable::<u8, u32>::new(LockConfig { lease_ms: 60, preempt_after: 10 });
        let mut m = Model::default();
        for op in ops {
            match op {
                Op::Acquire { key, owner, conflict, wait } => {
                    let conflict = [Conflict::Wait, Conflict::Abort, Conflict::Preempt][conflict as usize];
                    let mut r = req(&opt(owner), owner, conflict);
                    r.wait_ms = wait as u64;
                    let out = t.acquire(&key, r, m.now);
                    m.apply(&out.effects)?;
                    match out.result {
                        Ok(Acquired::Granted { token, .. }) | Ok(Acquired::Preempted { token, .. }) => {
                            m.granted(key, owner, token)?;
                        }
                        Ok(Acquired::AlreadyHeld { .. }) => {
                            prop_assert_eq!(m.holders.get(&key), Some(&owner));
                        }
                        Ok(Acquired::Queued { waiter, .. }) => {
                            let deadline = m.now + wait as u64;
                            let preempts = conflict == Conflict::Preempt;
                            m.queued.entry(key).or_default().push((waiter, owner, deadline, preempts));
                        }
                        Err(Error::LockHeldBy(h)) => {
                            prop_assert_eq!(Some(h), m.holders.get(&key).map(|o| opt(*o)));
                        }
                        Err(e) => prop_assert!(false, "unexpected {:?}", e),
                    }
                }
                Op::Release { key, owner } => {
                    let out = t.release(&key, &opt(owner), m.now);
                    // A lease that passed ends first, then the release.
                    m.apply_ended(&out.effects)?;
                    let held = m.holders.get(&key) == Some(&owner);
                    prop_assert_eq!(out.result.is_ok(), held);
                    if let Ok(r) = &out.result {
                        prop_assert_eq!(&*r.optimizer, opt(owner));
                        prop_assert_eq!(Some(r.token), m.last_token.get(&key).copied());
                        m.holders.remove(&key);
                    }
                    m.apply_grants(&out.effects)?;
                }
                Op::Cancel { key, nth } => {
                    let q = m.queued.entry(key).or_default();
                    if !q.is_empty() {
                        let (id, owner, deadline, _) = q[nth as usize % q.len()];
                        match t.cancel(&key, id) {
                            Cancelled::Removed(o) => {
                                prop_assert_eq!(o, owner);
                                q.retain(|w| w.0 != id);
                            }
                            Cancelled::Granted { .. } => prop_assert!(false, "granted but still queued"),
                            Cancelled::Gone => prop_assert!(deadline <= m.now),
                        }
                    }
                }
                Op::Down { owner } => {
                    let fx = t.owner_down(&owner, m.now);
                    for q in m.queued.values_mut() {
                        q.retain(|w| w.1 != owner);
                    }
                    m.apply(&fx)?;
                    prop_assert!(m.holders.values().all(|o| *o != owner));
                }
                Op::Progress { owner, iteration } => {
                    let out = t.report_progress(&opt(owner), iteration as u64, Value::Nil, Value::Nil, m.now);
                    prop_assert_eq!(out.result.is_ok(), m.holders.values().any(|o| *o == owner));
                    m.apply(&out.effects)?;
                }
                Op::Tick { ms } => {
                    m.now += ms as u64;
                    let fx = t.expire(m.now);
                    m.apply(&fx)?;
                    let now = m.now;
                    for q in m.queued.values_mut() {
                        q.retain(|w| w.2 > now);
                    }
                }
            }
            if let Err(e) = t.check_invariants(m.now) {
                prop_assert!(false, "{}", e);
            }
            for (key, owner) in &m.holders {
                prop_assert_eq!(t.info(key, m.now).map(|i| i.owner), Some(*owner));
            }
        }
    }
}
