//! A session: a table of variables plus its settings (TTL, history bound),
//! its rate limiter and its audit ring.
//!
//! Each variable sits behind its own mutex, so writers of different variables
//! never wait on each other; the name and id indexes are sharded maps.
//!
//! Every operation on variables is guarded the same way, in this order: the
//! session's token bucket ([`crate::ratelimit`]), then the variable's access
//! rules for the caller ([`crate::acl`]), both refusals recorded in the
//! audit ring ([`crate::audit`]). Code outside this file that acts on a
//! variable (locks, observers) asks [`Session::authorize`] first; an
//! operation on the session itself asks [`Session::authorize_session`]
//! (`access.rs`).
//!
//! Dependencies point one way: a session uses [`crate::acl`],
//! [`crate::caller`], [`crate::variable`], [`crate::permission`] and
//! [`crate::graph`]; none of them uses a session.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use crate::ConcurrentMap;
use dashmap::mapref::entry::Entry;
use parking_lot::Mutex;

use crate::acl::Acl;
use crate::audit::{AuditEntry, AuditEvent, AuditRing, DEFAULT_CAPACITY};
use crate::caller::Caller;
use crate::error::{Error, Result};
use crate::graph::SessionGraph;
use crate::limits::Limits;
use crate::permission::Permission;
use crate::ratelimit::{RateLimit, TokenBucket};
use crate::time::resolve;
use crate::types::{Constraints, VarType};
use crate::value::Value;
use crate::variable::{HistoryEntry, Variable, WriteMeta};

mod access;
mod dependencies;

pub type VarCell = Arc<Mutex<Variable>>;

/// Options of a new session.
#[derive(Clone, Debug)]
pub struct SessionOpts {
    /// Idle time after which the session expires; `None` never.
    pub ttl_ms: Option<u64>,
    pub max_history: usize,
    pub metadata: Value,
    /// Token bucket over every variable operation; `None`: unlimited.
    pub rate_limit: Option<RateLimit>,
    /// Audit entries kept (see [`crate::audit`]).
    pub audit_capacity: usize,
}

impl Default for SessionOpts {
    fn default() -> Self {
        SessionOpts {
            ttl_ms: None,
            max_history: 50,
            metadata: Value::empty_map(),
            rate_limit: None,
            audit_capacity: DEFAULT_CAPACITY,
        }
    }
}

/// What `register` needs beyond name, type and initial value.
#[derive(Clone, Debug, Default)]
pub struct RegisterOpts {
    pub constraints: Value,
    pub metadata: Value,
    pub description: Option<Box<str>>,
    /// A list of access rules (see [`crate::acl`]); nil for none.
    pub access_rules: Value,
}

/// One write of a batch.
#[derive(Clone, Debug)]
pub struct Update {
    pub ident: Box<str>,
    pub value: Value,
    pub meta: WriteMeta,
}

/// Results of a non-atomic batch, in input order.
pub type BatchResults = Vec<(Box<str>, Result<u64>)>;

pub struct Session {
    pub id: Arc<str>,
    pub created_at: i64,
    pub opts: SessionOpts,
    limits: Limits,
    last_access: AtomicI64,
    next_var: AtomicU64,
    by_name: ConcurrentMap<Box<str>, VarCell>,
    by_id: ConcurrentMap<Box<str>, VarCell>,
    limiter: Option<TokenBucket>,
    audit: AuditRing,
    dependencies: SessionGraph,
}

/// Touches to `last_access` closer together than this are skipped, so the
/// hot path does not write a shared cache line on every call.
const TOUCH_GRANULARITY_US: i64 = 100_000;

impl Session {
    /// A new session, created at `now` (microseconds since the epoch).
    pub fn new(id: Arc<str>, opts: SessionOpts, limits: Limits, now: i64) -> Self {
        Session {
            id,
            created_at: now,
            limits,
            last_access: AtomicI64::new(now),
            next_var: AtomicU64::new(1),
            by_name: ConcurrentMap::default(),
            by_id: ConcurrentMap::default(),
            limiter: opts.rate_limit.map(TokenBucket::new),
            audit: AuditRing::new(opts.audit_capacity),
            opts,
            dependencies: SessionGraph::default(),
        }
    }

    /// Which variables depend on which (see [`crate::graph`]; the session side is in `dependencies.rs`).
    pub fn dependencies(&self) -> &SessionGraph {
        &self.dependencies
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Records an access at `now` for TTL purposes; free for sessions
    /// without a TTL.
    pub fn touch(&self, now: i64) {
        if self.opts.ttl_ms.is_none() {
            return;
        }
        let now = resolve(now);
        if now - self.last_access.load(Ordering::Relaxed) > TOUCH_GRANULARITY_US {
            self.last_access.store(now, Ordering::Relaxed);
        }
    }

    pub fn last_access(&self) -> i64 {
        self.last_access.load(Ordering::Relaxed)
    }

    pub fn is_expired(&self, now: i64) -> bool {
        match self.opts.ttl_ms {
            Some(ttl) => resolve(now) - self.last_access() > (ttl as i64).saturating_mul(1000),
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Registers a variable; returns its generated id.
    pub fn register(
        &self,
        name: Value,
        var_type: VarType,
        initial: Value,
        opts: RegisterOpts,
        now: i64,
    ) -> Result<Box<str>> {
        let key: Box<str> = self.limits.check_name(&name)?.into();
        self.admit(1, &Caller::owner(now))?;
        self.limits.check_value(&initial)?;
        self.limits.check_value(&opts.metadata)?;
        if self.by_id.len() >= self.limits.max_variables {
            return Err(Error::TooLarge(self.limits.max_variables));
        }
        let constraints = Constraints::compile(var_type, &opts.constraints)?;
        // An imported variable may hold the id a counter would give next.
        let id: Box<str> = loop {
            let n = self.next_var.fetch_add(1, Ordering::Relaxed);
            let id = format!("var_{key}_{n}");
            if !self.by_id.contains_key(id.as_str()) {
                break id.into();
            }
        };
        let metadata = if opts.metadata.is_nil() {
            Value::empty_map()
        } else {
            opts.metadata
        };
        let acl = Acl::build(&opts.access_rules, &metadata)?.map(Arc::new);
        let mut var = Variable::new(
            id.clone(),
            name,
            var_type,
            constraints,
            initial,
            metadata,
            opts.description,
            self.opts.max_history,
            now,
        )?;
        var.acl = acl;
        self.insert(key, var)?;
        Ok(id)
    }

    /// Inserts a fully built variable (registration and import); its name
    /// and its id must both be free. (Lock order: the name's shard, then
    /// the id's.)
    pub(crate) fn insert(&self, key: Box<str>, var: Variable) -> Result<()> {
        let id = var.id.clone();
        match self.by_name.entry(key) {
            Entry::Occupied(_) => Err(Error::AlreadyExists),
            Entry::Vacant(name_slot) => match self.by_id.entry(id) {
                Entry::Occupied(_) => Err(Error::AlreadyExists),
                Entry::Vacant(id_slot) => {
                    let cell = Arc::new(Mutex::new(var));
                    id_slot.insert(cell.clone());
                    name_slot.insert(cell);
                    Ok(())
                }
            },
        }
    }

    /// Finds a variable by name (atom or string form) or by id.
    pub fn cell(&self, ident: &str) -> Result<VarCell> {
        self.with_cell(ident, Arc::clone)
    }

    /// Runs `f` on the variable's cell without cloning the `Arc`.
    pub fn with_cell<T>(&self, ident: &str, f: impl FnOnce(&VarCell) -> T) -> Result<T> {
        if let Some(cell) = self.by_name.get(ident) {
            return Ok(f(cell.value()));
        }
        match self.by_id.get(ident) {
            Some(cell) => Ok(f(cell.value())),
            None => Err(Error::NotFound),
        }
    }

    /// Runs `f` with the variable locked, once the rate limit admits the
    /// call and `caller` may do `perm` on it.
    pub fn with_var<T>(
        &self,
        ident: &str,
        caller: &Caller,
        perm: Permission,
        f: impl FnOnce(&mut Variable) -> Result<T>,
    ) -> Result<T> {
        self.admit(1, caller)?;
        self.with_cell(ident, |cell| {
            let mut var = cell.lock();
            self.check(caller, &var, perm)?;
            if perm == Permission::Write {
                var.lock.admit(&caller.lock)?;
            }
            f(&mut var)
        })?
    }

    /// Takes `cost` tokens from the session's bucket, or refuses the call.
    fn admit(&self, cost: u64, caller: &Caller) -> Result<()> {
        match &self.limiter {
            Some(bucket) if !bucket.try_acquire(cost, caller.now_us) => {
                self.audit.record(
                    caller.now_us,
                    AuditEvent::RateLimited,
                    caller.principal,
                    None,
                    None,
                );
                Err(Error::RateLimited)
            }
            _ => Ok(()),
        }
    }

    /// The ACL check, with denials audited.
    fn check(&self, caller: &Caller, var: &Variable, perm: Permission) -> Result<()> {
        caller.authorize(&self.id, var, perm).inspect_err(|_| {
            self.audit.record(
                caller.now_us,
                AuditEvent::Denied,
                caller.principal,
                Some(&var.id),
                Some(perm),
            )
        })
    }

    /// The guard of every operation (rate limit, then ACL, refusals
    /// audited), for operations on a variable made outside this type:
    /// optimizer locks (`Optimize`), observers (`Observe`).
    pub fn authorize(&self, ident: &str, caller: &Caller, perm: Permission) -> Result<()> {
        self.with_var(ident, caller, perm, |_| Ok(()))
    }

    /// Answers whether `caller` may do `perm`, without consuming a token or
    /// auditing: a question, not an operation.
    pub fn check_access(&self, ident: &str, caller: &Caller, perm: Permission) -> Result<()> {
        self.with_cell(ident, |cell| caller.authorize(&self.id, &cell.lock(), perm))?
    }

    /// Replaces a variable's access rules. Only its owner may: the session
    /// itself or the principal named in its metadata. The change is audited.
    pub fn set_access_rules(&self, ident: &str, rules: &Value, caller: &Caller) -> Result<()> {
        self.admit(1, caller)?;
        self.with_cell(ident, |cell| {
            let mut var = cell.lock();
            if !caller.is_owner(&self.id, &var) {
                self.audit.record(
                    caller.now_us,
                    AuditEvent::Denied,
                    caller.principal,
                    Some(&var.id),
                    Some(Permission::Write),
                );
                return Err(Error::AccessDenied);
            }
            var.acl = Acl::build(rules, &var.metadata)?.map(Arc::new);
            self.audit.record(
                caller.now_us,
                AuditEvent::RulesChanged,
                caller.principal,
                Some(&var.id),
                None,
            );
            Ok(())
        })?
    }

    /// Only the session itself registers variables in it; a refusal is audited.
    pub fn check_register(&self, caller: &Caller) -> Result<()> {
        match caller.principal {
            Some(p) if p != &*self.id => {
                self.audit.record(
                    caller.now_us,
                    AuditEvent::Denied,
                    Some(p),
                    None,
                    Some(Permission::Write),
                );
                Err(Error::AccessDenied)
            }
            _ => Ok(()),
        }
    }

    /// The variable's rules in canonical form (an empty list for none).
    pub fn access_rules(&self, ident: &str, caller: &Caller) -> Result<Value> {
        self.with_var(ident, caller, Permission::Read, |v| Ok(access_rules_of(v)))
    }

    /// At most `limit` audit entries, newest first.
    pub fn audit_log(&self, limit: usize) -> Vec<AuditEntry> {
        self.audit.recent(limit)
    }

    pub fn audit_ring(&self) -> &AuditRing {
        &self.audit
    }

    /// The session's rate limit, and the whole tokens left in its bucket
    /// at `now`.
    pub fn rate_limit(&self, now: i64) -> Option<(RateLimit, u64)> {
        self.limiter.as_ref().map(|b| (b.limit(), b.available(now)))
    }

    pub fn get_value(&self, ident: &str, caller: &Caller) -> Result<Value> {
        self.with_var(ident, caller, Permission::Read, |v| Ok(v.value.clone()))
    }

    /// Is there a variable `caller` may read under `ident`? Takes a token
    /// like any read; a variable it may not read is `AccessDenied`.
    pub fn exists(&self, ident: &str, caller: &Caller) -> Result<bool> {
        match self.with_var(ident, caller, Permission::Read, |_| Ok(())) {
            Ok(()) => Ok(true),
            Err(Error::NotFound) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn get(&self, ident: &str, caller: &Caller) -> Result<Variable> {
        self.with_var(ident, caller, Permission::Read, |v| Ok(v.clone()))
    }

    pub fn update(
        &self,
        ident: &str,
        value: Value,
        meta: WriteMeta,
        caller: &Caller,
    ) -> Result<u64> {
        self.limits.check_value(&value)?;
        self.limits.check_value(&meta.metadata)?;
        self.with_var(ident, caller, Permission::Write, |v| {
            v.set(value, meta, resolve(caller.now_us))
        })
    }

    /// Applies every update or none. Variables are locked in address order,
    /// so two batches over the same variables cannot deadlock.
    pub fn update_atomic(&self, updates: Vec<Update>, caller: &Caller) -> Result<Vec<u64>> {
        let mut cells = Vec::with_capacity(updates.len());
        let mut errors = Vec::new();
        for u in &updates {
            let found = self
                .limits
                .check_value(&u.value)
                .and_then(|_| self.limits.check_value(&u.meta.metadata))
                .and_then(|_| self.cell(&u.ident));
            match found {
                Ok(cell) => cells.push(cell),
                Err(e) => errors.push((Value::str(&u.ident), e.to_value())),
            }
        }
        if !errors.is_empty() {
            return Err(Error::ValidationFailed(Value::Map(errors.into())));
        }
        self.admit(cells.len() as u64, caller)?;
        let mut order: Vec<usize> = (0..cells.len()).collect();
        order.sort_by_key(|&i| Arc::as_ptr(&cells[i]) as usize);
        order.dedup_by_key(|i| Arc::as_ptr(&cells[*i]) as usize);
        if order.len() != cells.len() {
            return Err(Error::invalid_arg("duplicate_variable_in_batch"));
        }
        let mut guards: Vec<_> = order.iter().map(|&i| (i, cells[i].lock())).collect();
        guards.sort_by_key(|(i, _)| *i);
        let mut checked = Vec::with_capacity(updates.len());
        for ((_, guard), u) in guards.iter().zip(&updates) {
            let result = self
                .check(caller, guard, Permission::Write)
                .and_then(|_| guard.lock.admit(&caller.lock))
                .and_then(|_| guard.check(u.value.clone(), u.meta.expected_version));
            match result {
                Ok(v) => checked.push(v),
                Err(e) => errors.push((Value::str(&u.ident), e.to_value())),
            }
        }
        if !errors.is_empty() {
            return Err(Error::ValidationFailed(Value::Map(errors.into())));
        }
        let now = resolve(caller.now_us);
        Ok(guards
            .iter_mut()
            .zip(updates)
            .zip(checked)
            .map(|(((_, guard), u), value)| guard.apply(value, u.meta.metadata, now))
            .collect())
    }

    /// Applies each update on its own; one failing does not stop the others.
    pub fn update_each(&self, updates: Vec<Update>, caller: &Caller) -> BatchResults {
        updates
            .into_iter()
            .map(|u| {
                let r = self.update(&u.ident, u.value, u.meta, caller);
                (u.ident, r)
            })
            .collect()
    }

    /// Newest first.
    pub fn history(&self, ident: &str, limit: usize, caller: &Caller) -> Result<Vec<HistoryEntry>> {
        self.with_var(ident, caller, Permission::Read, |v| {
            Ok(v.history(limit).cloned().collect())
        })
    }

    /// Writes the value `version` had as a new version.
    pub fn rollback(
        &self,
        ident: &str,
        version: u64,
        metadata: Value,
        caller: &Caller,
    ) -> Result<u64> {
        let now = resolve(caller.now_us);
        self.with_var(ident, caller, Permission::Write, |v| {
            let old = v.value_at(version)?.clone();
            let meta = metadata.with("rollback_to", Value::Int(version as i64));
            Ok(v.apply(old, meta, now))
        })
    }

    pub fn delete(&self, ident: &str, caller: &Caller) -> Result<Variable> {
        let var = self.with_var(ident, caller, Permission::Write, |v| Ok(v.clone()))?;
        let key = var
            .name
            .as_text()
            .map(Box::<str>::from)
            .ok_or(Error::NotFound)?;
        self.by_name.remove(&key);
        self.by_id.remove(&var.id);
        // After the variable is gone, so an edge being added concurrently
        // either sees it missing or is removed here.
        self.dependencies.update(|g| g.remove_vertex(&key));
        Ok(var)
    }

    /// Visits each variable `caller` may read, locked, in no particular order.
    fn readable<T>(&self, caller: &Caller, f: impl Fn(&Variable) -> T) -> Vec<T> {
        self.by_id
            .iter()
            .filter_map(|c| {
                let v = c.value().lock();
                caller
                    .authorize(&self.id, &v, Permission::Read)
                    .ok()
                    .map(|_| f(&v))
            })
            .collect()
    }

    /// The variables `caller` may read, sorted by name. Variables it may
    /// not read are left out, not reported.
    pub fn variables(&self, caller: &Caller) -> Result<Vec<Variable>> {
        self.admit(1, caller)?;
        Ok(self.sorted_variables(caller))
    }

    /// Every variable, for snapshots: no token taken.
    pub(crate) fn sorted_variables(&self, caller: &Caller) -> Vec<Variable> {
        let mut vars = self.readable(caller, Variable::clone);
        vars.sort_by(|a, b| a.name.as_text().cmp(&b.name.as_text()));
        vars
    }

    /// Names and ids of what `caller` may read, sorted by name.
    pub fn names(&self, caller: &Caller) -> Result<Vec<(Value, Box<str>)>> {
        self.admit(1, caller)?;
        let mut names = self.readable(caller, |v| (v.name.clone(), v.id.clone()));
        names.sort_by(|a, b| a.0.as_text().cmp(&b.0.as_text()));
        Ok(names)
    }

    /// Approximate heap bytes held by the session's variables.
    pub fn heap_size(&self) -> usize {
        self.by_id
            .iter()
            .map(|c| std::mem::size_of::<Variable>() + c.value().lock().heap_size())
            .sum()
    }
}

/// A variable's rules in canonical form (an empty list for none).
pub fn access_rules_of(var: &Variable) -> Value {
    var.acl
        .as_deref()
        .map_or_else(|| Value::List(Box::new([])), |a| a.source().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_700_000_000_000_000;

    fn session() -> Session {
        Session::new("s".into(), SessionOpts::default(), Limits::default(), T0)
    }

    fn upd(ident: &str, value: Value) -> Update {
        Update {
            ident: ident.into(),
            value,
            meta: WriteMeta::default(),
        }
    }

    #[test]
    fn names_are_unique_across_atom_and_string_forms() {
        let s = session();
        s.register(
            Value::atom("t"),
            VarType::Float,
            Value::Float(0.0),
            Default::default(),
            0,
        )
        .unwrap();
        let again = s.register(
            Value::str("t"),
            VarType::Float,
            Value::Float(0.0),
            Default::default(),
            0,
        );
        assert_eq!(again, Err(Error::AlreadyExists));
    }

    #[test]
    fn lookup_by_name_or_id() {
        let s = session();
        let id = s
            .register(
                Value::atom("t"),
                VarType::Float,
                Value::Float(0.5),
                Default::default(),
                0,
            )
            .unwrap();
        assert_eq!(s.get_value("t", &Caller::owner(T0)), Ok(Value::Float(0.5)));
        assert_eq!(s.get_value(&id, &Caller::owner(T0)), Ok(Value::Float(0.5)));
        assert_eq!(
            s.get_value("nope", &Caller::owner(T0)),
            Err(Error::NotFound)
        );
    }

    #[test]
    fn atomic_batch_is_all_or_nothing() {
        let s = session();
        s.register(
            Value::atom("a"),
            VarType::Float,
            Value::Float(0.0),
            Default::default(),
            0,
        )
        .unwrap();
        s.register(
            Value::atom("b"),
            VarType::Integer,
            Value::Int(0),
            Default::default(),
            0,
        )
        .unwrap();
        let r = s.update_atomic(
            vec![upd("a", Value::Float(1.0)), upd("b", Value::str("x"))],
            &Caller::owner(T0),
        );
        assert!(matches!(r, Err(Error::ValidationFailed(_))));
        assert_eq!(s.get_value("a", &Caller::owner(T0)), Ok(Value::Float(0.0)));
        let r = s.update_atomic(
            vec![upd("b", Value::Int(2)), upd("a", Value::Float(1.0))],
            &Caller::owner(T0),
        );
        assert_eq!(r, Ok(vec![1, 1]));
        assert_eq!(s.get_value("a", &Caller::owner(T0)), Ok(Value::Float(1.0)));
        let dup = s.update_atomic(
            vec![upd("a", Value::Float(1.0)), upd("a", Value::Float(2.0))],
            &Caller::owner(T0),
        );
        assert!(dup.is_err());
    }

    #[test]
    fn rollback_writes_a_new_version() {
        let s = session();
        s.register(
            Value::atom("a"),
            VarType::Integer,
            Value::Int(0),
            Default::default(),
            0,
        )
        .unwrap();
        s.update(
            "a",
            Value::Int(100),
            WriteMeta::default(),
            &Caller::owner(T0),
        )
        .unwrap();
        s.update(
            "a",
            Value::Int(200),
            WriteMeta::default(),
            &Caller::owner(T0),
        )
        .unwrap();
        assert_eq!(s.rollback("a", 1, Value::Nil, &Caller::owner(T0)), Ok(3));
        assert_eq!(s.get_value("a", &Caller::owner(T0)), Ok(Value::Int(100)));
        assert_eq!(
            s.rollback("a", 99, Value::Nil, &Caller::owner(T0)),
            Err(Error::VersionNotFound)
        );
    }

    #[test]
    fn concurrent_writers_lose_no_update() {
        let s = Arc::new(session());
        s.register(
            Value::atom("n"),
            VarType::Integer,
            Value::Int(0),
            Default::default(),
            0,
        )
        .unwrap();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        loop {
                            let (v, n) = s
                                .with_var("n", &Caller::owner(T0), Permission::Read, |v| {
                                    Ok((v.version, v.value.clone()))
                                })
                                .unwrap();
                            let next = Value::Int(n.as_i64().unwrap() + 1);
                            let meta = WriteMeta {
                                expected_version: Some(v),
                                ..Default::default()
                            };
                            if s.update("n", next, meta, &Caller::owner(T0)).is_ok() {
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(s.get_value("n", &Caller::owner(T0)), Ok(Value::Int(8000)));
    }
}
