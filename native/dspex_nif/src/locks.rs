//! The optimizer lock table resource and its NIFs (`lock_*`).
//!
//! Acquire and release are one NIF call from the caller's process. Every
//! process that ever held or waited for a lock is watched by one resource
//! monitor for the rest of its life (a set of pids, not a monitor per
//! acquire: creating and cancelling a monitor would cost more than the
//! whole uncontended cycle). When it dies, `down` passes its locks on at
//! once: the next waiter gets `{:dspex_lock_granted, waiter_id, token,
//! started, preempted}`, and the listener (the `OptimizerCoordinator` process) gets a
//! `{:dspex_lock_ended, ...}` event for telemetry. Grants made by a release
//! are announced the same way by the releasing NIF. Messages are sent only
//! after the table's lock is dropped.
//!
//! Keys are any term, stored in the external term format. Times are
//! milliseconds of a monotonic clock private to this library.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use dspex_core::locks::{
    Acquired, Cancelled, Conflict, EndReason, Fence, FenceChange, LockConfig, LockTable,
    OptimizerId, Request, Status,
};
use dspex_core::time::now_us;
use dspex_core::Permission;
use dspex_core::{Caller, Error, Value};
use rustler::{Atom, Binary, Encoder, Env, LocalPid, Monitor, ResourceArc, Term};

use crate::atoms;
use crate::error::error;
use crate::store::store;
use crate::term::{
    bytes as bytes_term, decode_principal, decode_sid, decode_value, encode_value, ident_text,
    is_nil,
};

/// A key in the external term format, or in a shorter form for the common
/// shapes, which skip encoding: `b"b" ++ bytes` for a binary, and
/// `b"p" ++ len(a) as u32 ++ a ++ b` for a pair of binaries. No external
/// term starts with `b` or `p`, so the forms never collide. (A session
/// variable's lock is `{:dspex_session, session_id, var_id}`, a form the
/// coordinator refuses as a raw key, so no raw key reaches it.)
type Key = Arc<[u8]>;
type Table = LockTable<Key, Owner>;
type Effects = dspex_core::locks::Effects<Key, Owner>;
type RandomState = foldhash::fast::RandomState;

/// Progress values and metrics larger than this are refused.
const MAX_PROGRESS_BYTES: usize = 1 << 20;

/// A local process, hashable: pids have no `Hash`, so the VM's hash of the
/// pid term goes beside it.
#[derive(Clone, Copy)]
pub struct Owner {
    pid: LocalPid,
    hash: u32,
}

impl Owner {
    fn new(env: Env, pid: LocalPid) -> Self {
        Owner {
            pid,
            hash: pid.encode(env).hash_internal(0),
        }
    }
}

impl PartialEq for Owner {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.pid == other.pid
    }
}

impl Eq for Owner {}

impl Hash for Owner {
    fn hash<S: Hasher>(&self, state: &mut S) {
        state.write_u32(self.hash);
    }
}

/// One fence move: to the port server, of its session's variable.
type FenceMove = (LocalPid, Arc<str>, Arc<str>, FenceChange);

/// Fence moves of variables held by an engine in another process, queued
/// inside the table's critical section (where no term can be sent) and sent
/// by [`LockTableRef::announce`] of the same call.
#[derive(Default)]
struct FenceQueue {
    moves: Mutex<Vec<FenceMove>>,
    /// Set with a push, under `moves`' lock: lets the lock NIFs of a VM
    /// without fenced `:port` variables skip the mutex.
    pending: AtomicBool,
}

/// The fence of a variable of a `:port` session: each grant and release is
/// sent to the port server as `{:dspex_fence, sid, var_id, change}`, which
/// applies it in the program with the `var_fence` command (the same
/// [`FenceChange`] the in-process fence applies).
struct RemoteFence {
    to: LocalPid,
    session: Arc<str>,
    ident: Arc<str>,
    queue: Arc<FenceQueue>,
}

impl RemoteFence {
    fn push(&self, change: FenceChange) {
        if let Ok(mut q) = self.queue.moves.lock() {
            q.push((self.to, self.session.clone(), self.ident.clone(), change));
            self.queue.pending.store(true, Ordering::Release);
        }
    }
}

impl Fence for RemoteFence {
    fn granted(&self, optimizer: &OptimizerId, token: u64, preempted: Option<&OptimizerId>) {
        self.push(FenceChange::Granted {
            optimizer: optimizer.to_string(),
            token,
            preempted: preempted.map(|p| p.to_string()),
        });
    }

    fn released(&self, token: u64) {
        self.push(FenceChange::Released { token });
    }
}

pub struct LockTableRef {
    table: Table,
    fences: Arc<FenceQueue>,
    /// Told of holders that died or whose lease ran out.
    listener: Mutex<Option<LocalPid>>,
    /// Processes with a live monitor from this resource.
    watched: Mutex<HashSet<Owner, RandomState>>,
}

#[rustler::resource_impl]
impl rustler::Resource for LockTableRef {
    // Runs on the VM's own thread during the process's exit: must not panic
    // and may only send with `env`. Nothing here unwraps or indexes.
    fn down<'a>(&'a self, env: Env<'a>, pid: LocalPid, _monitor: Monitor) {
        let owner = Owner::new(env, pid);
        let fx = self.table.owner_down(&owner, now_ms());
        if let Ok(mut w) = self.watched.lock() {
            w.remove(&owner);
        }
        self.announce(env, &fx);
    }
}

impl LockTableRef {
    /// Makes sure `pid` is monitored; false when it is not alive.
    fn watch(res: &ResourceArc<Self>, env: Env, owner: Owner) -> bool {
        if res.watched.lock().is_ok_and(|w| w.contains(&owner)) {
            return true;
        }
        // Monitor outside the set's lock: `down` takes it.
        let Some(monitor) = env.monitor(res, &owner.pid) else {
            return false;
        };
        let fresh = res.watched.lock().map_or(true, |mut w| w.insert(owner));
        if !fresh {
            env.demonitor(res, &monitor);
        }
        true
    }

    /// Sends the grants of `fx` to their waiters and the holders that died or
    /// expired to the listener.
    fn announce(&self, env: Env, fx: &Effects) {
        // A push of this call happened before, on this thread; another
        // thread's pushes are announced by that thread's call.
        let moved = if self.fences.pending.load(Ordering::Acquire) {
            self.fences
                .moves
                .lock()
                .map(|mut q| {
                    self.fences.pending.store(false, Ordering::Release);
                    std::mem::take(&mut *q)
                })
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        for (to, session, ident, change) in moved {
            let change = match change {
                FenceChange::Granted {
                    optimizer,
                    token,
                    preempted,
                } => (atoms::granted(), optimizer, token, preempted).encode(env),
                FenceChange::Released { token } => (atoms::released(), token).encode(env),
            };
            let _ = env.send(&to, (atoms::dspex_fence(), &*session, &*ident, change));
        }
        for g in &fx.grants {
            // A waiter that preempted is told whom, to notify it.
            let previous = g.preempted.as_ref().and_then(|p| {
                fx.ended.iter().find(|e| {
                    e.reason == EndReason::Preempted && e.key == g.key && e.optimizer == *p
                })
            });
            let previous = match previous {
                Some(e) => (&*e.optimizer, e.owner.pid, e.token, e.finished).encode(env),
                None => atoms::nil().encode(env),
            };
            let grant = (
                atoms::dspex_lock_granted(),
                g.waiter,
                g.token,
                g.started,
                previous,
            );
            let _ = env.send(&g.notify.pid, grant);
        }
        if fx.ended.is_empty() {
            return;
        }
        let listener = self.listener.lock().ok().and_then(|l| *l);
        let Some(listener) = listener else {
            return;
        };
        for e in &fx.ended {
            let reason = match e.reason {
                EndReason::OwnerDown => atoms::owner_down(),
                EndReason::Expired => atoms::expired(),
                // The caller that released or preempted reports these.
                EndReason::Released | EndReason::Preempted => continue,
            };
            let event = (
                atoms::dspex_lock_ended(),
                reason,
                key_term(env, &e.key),
                &*e.optimizer,
                e.owner.pid,
                e.token,
                e.finished,
            );
            let _ = env.send(&listener, event);
        }
    }
}

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

fn key_of(term: Term) -> Key {
    if let Ok(bin) = Binary::from_term(term) {
        return joined(&[b"b", bin.as_slice()]);
    }
    if let Ok((a, b)) = term.decode::<(Binary, Binary)>() {
        if let Ok(len) = u32::try_from(a.len()) {
            return joined(&[b"p", &len.to_le_bytes(), a.as_slice(), b.as_slice()]);
        }
    }
    term.to_binary().as_slice().into()
}

/// The parts as one key, with one allocation when short (the hot path).
fn joined(parts: &[&[u8]]) -> Key {
    let mut buf = [0u8; 128];
    let mut len = 0;
    for part in parts {
        match buf.get_mut(len..len + part.len()) {
            Some(slot) => slot.copy_from_slice(part),
            None => return parts.concat().into(),
        }
        len += part.len();
    }
    Arc::from(&buf[..len])
}

fn key_term<'a>(env: Env<'a>, key: &[u8]) -> Term<'a> {
    match key.split_first() {
        Some((b'b', bytes)) => bytes_term(env, bytes),
        Some((b'p', rest)) if rest.len() >= 4 => {
            let (len, rest) = rest.split_at(4);
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            match (rest.get(..len), rest.get(len..)) {
                (Some(a), Some(b)) => (bytes_term(env, a), bytes_term(env, b)).encode(env),
                _ => atoms::nil().encode(env),
            }
        }
        _ => env
            .binary_to_term(key)
            .map(|(t, _)| t)
            .unwrap_or_else(|| atoms::nil().encode(env)),
    }
}

fn optimizer_text<'a>(term: Term<'a>) -> Result<&'a str, Error> {
    crate::term::decode_optimizer(term)
}

fn decode_optimizer(term: Term) -> Result<OptimizerId, Error> {
    optimizer_text(term).map(Into::into)
}

/// `nil` or a non-negative integer of milliseconds; `:infinity` as `None`
/// where a bound is optional.
fn decode_ms(term: Term) -> Result<Option<u64>, Error> {
    if is_nil(term) || term.decode::<Atom>().is_ok_and(|a| a == atoms::infinity()) {
        return Ok(None);
    }
    term.decode::<u64>()
        .map(Some)
        .map_err(|_| Error::invalid_arg("bad_milliseconds"))
}

fn decode_conflict(term: Term) -> Result<Conflict, Error> {
    let a: Atom = term
        .decode()
        .map_err(|_| Error::invalid_arg("bad_conflict_resolution"))?;
    if a == atoms::wait() {
        Ok(Conflict::Wait)
    } else if a == atoms::abort() {
        Ok(Conflict::Abort)
    } else if a == atoms::preempt() {
        Ok(Conflict::Preempt)
    } else {
        Err(Error::invalid_arg("bad_conflict_resolution"))
    }
}

/// `nil`; `{session_id, var_id, principal}`: the variable (of a NIF
/// session) whose writes follow this lock (the caller needs `:optimize` on
/// it); or `{:port, server_pid, session_id, var_id}`: a port session's
/// variable, its fence moved by messages to the server (the caller checked
/// `:optimize` through the port).
fn decode_fence(term: Term) -> Result<Option<Arc<dyn Fence>>, Error> {
    if is_nil(term) {
        return Ok(None);
    }
    let bad = || Error::invalid_arg("bad_fence");
    if let Ok((tag, to, sid, ident)) = term.decode::<(Atom, LocalPid, Term, Term)>() {
        if tag != atoms::port() {
            return Err(bad());
        }
        return Ok(Some(Arc::new(RemoteFence {
            to,
            session: decode_sid(sid)?.into(),
            ident: (*ident_text(ident)?).into(),
            queue: locks().fences.clone(),
        })));
    }
    let (sid, ident, principal): (Term, Term, Term) = term.decode().map_err(|_| bad())?;
    let caller = Caller {
        principal: decode_principal(principal)?,
        ..Caller::owner(now_us())
    };
    let ident = ident_text(ident)?;
    let cell = store().with_session(decode_sid(sid)?, caller.now_us, |s| {
        s.with_var(&ident, &caller, Permission::Optimize, |_| Ok(()))?;
        s.cell(&ident)
    })??;
    Ok(Some(cell as Arc<dyn Fence>))
}

/// One lock table per VM, like the store: the lock NIFs reach it without a
/// handle. It is a resource all the same, because process monitors belong
/// to a resource (its `down` callback is how a holder's death is seen).
static LOCKS: OnceLock<ResourceArc<LockTableRef>> = OnceLock::new();

fn new_table(config: LockConfig) -> ResourceArc<LockTableRef> {
    ResourceArc::new(LockTableRef {
        table: LockTable::new(config),
        fences: Arc::default(),
        listener: Mutex::new(None),
        watched: Mutex::new(HashSet::default()),
    })
}

/// The lock table, created with the default configuration if
/// `lock_table_init/2` has not run yet.
fn locks() -> &'static ResourceArc<LockTableRef> {
    LOCKS.get_or_init(|| new_table(LockConfig::default()))
}

/// Creates the lock table: `:ok` when created, or when it exists with the
/// same configuration; `{:error, {:invalid_argument, {:lock_table_exists,
/// %{lease_ms: n, preempt_after: n}}}}` when it exists with another.
#[rustler::nif(name = "lock_table_init")]
fn table_init(env: Env, lease_ms: u64, preempt_after: u64) -> Term {
    let wanted = LockConfig {
        lease_ms,
        preempt_after,
    };
    if lease_ms == 0 {
        return error(env, &Error::invalid_arg("bad_lease"));
    }
    let table = LOCKS.get_or_init(|| new_table(wanted.clone()));
    let have = table.table.config();
    if *have == wanted {
        atoms::ok().encode(env)
    } else {
        let detail = Value::Map(
            [
                (Value::atom("lease_ms"), Value::Int(have.lease_ms as i64)),
                (
                    Value::atom("preempt_after"),
                    Value::Int(have.preempt_after.min(i64::MAX as u64) as i64),
                ),
            ]
            .into(),
        );
        error(
            env,
            &Error::InvalidArgument(Value::tagged("lock_table_exists", detail)),
        )
    }
}

/// The process told of holders that died or expired.
#[rustler::nif(name = "lock_listen")]
fn listen(pid: LocalPid) -> Atom {
    let res = locks();
    if let Ok(mut l) = res.listener.lock() {
        *l = Some(pid);
    }
    atoms::ok()
}

/// `{:ok, :granted, token, started}`, `{:ok, :already_held, token}`,
/// `{:ok, :preempted, token, started, {previous_optimizer, previous_pid,
/// previous_token, previous_finished}}`,
/// `{:wait, waiter_id}` (then wait for `{:dspex_lock_granted, waiter_id,
/// token, started, preempted}`, `preempted` being `nil` or the tuple above,
/// or call `lock_cancel`), or `{:error, reason}`.
#[rustler::nif(name = "lock_acquire")]
#[allow(clippy::too_many_arguments)]
fn acquire<'a>(
    env: Env<'a>,
    key: Term<'a>,
    optimizer: Term<'a>,
    pid: LocalPid,
    conflict: Term<'a>,
    wait_ms: Term<'a>,
    lease_ms: Term<'a>,
    fence: Term<'a>,
) -> Term<'a> {
    let res = locks();
    let decoded = (|| {
        Ok::<_, Error>((
            decode_optimizer(optimizer)?,
            decode_conflict(conflict)?,
            decode_ms(wait_ms)?.unwrap_or(u64::MAX),
            decode_ms(lease_ms)?,
            decode_fence(fence)?,
        ))
    })();
    let (optimizer, conflict, wait_ms, lease_ms, fence) = match decoded {
        Ok(d) => d,
        Err(e) => return error(env, &e),
    };
    let owner = Owner::new(env, pid);
    if !LockTableRef::watch(res, env, owner) {
        return error(env, &Error::invalid_arg("owner_not_alive"));
    }
    let caller = env.pid();
    let by_owner = caller == pid;
    let notify = if by_owner {
        owner
    } else {
        Owner::new(env, caller)
    };
    let req = Request {
        optimizer,
        owner,
        notify,
        conflict,
        wait_ms,
        lease_ms,
        fence,
    };
    let out = res.table.acquire(&key_of(key), req, now_ms());
    if !by_owner && !env.is_process_alive(pid) {
        // The owner may have died before its entry was in the table, so its
        // `down` found nothing: clean up for it. (The caller itself cannot
        // die while in this call.)
        let fx = res.table.owner_down(&owner, now_ms());
        res.announce(env, &fx);
    }
    let previous = out
        .effects
        .ended
        .iter()
        .find(|e| e.reason == EndReason::Preempted)
        .map(|e| (e.owner.pid, e.token, e.finished));
    res.announce(env, &out.effects);
    match out.result {
        Ok(Acquired::Granted { token, started }) => {
            (atoms::ok(), atoms::granted(), token, started).encode(env)
        }
        Ok(Acquired::AlreadyHeld { token }) => {
            (atoms::ok(), atoms::already_held(), token).encode(env)
        }
        Ok(Acquired::Preempted {
            token,
            previous: id,
            started,
        }) => {
            let previous = match previous {
                Some((pid, old_token, finished)) => (&*id, pid, old_token, finished).encode(env),
                None => (&*id, atoms::nil(), 0, false).encode(env),
            };
            (atoms::ok(), atoms::preempted(), token, started, previous).encode(env)
        }
        Ok(Acquired::Queued { waiter, .. }) => (atoms::wait(), waiter).encode(env),
        Err(e) => error(env, &e),
    }
}

/// `{:ok, token, finished}` (`finished`: the optimizer holds no other lock)
/// or `{:error, :not_lock_owner}`.
#[rustler::nif(name = "lock_release")]
fn release<'a>(env: Env<'a>, key: Term<'a>, optimizer: Term<'a>) -> Term<'a> {
    let res = locks();
    let optimizer = match optimizer_text(optimizer) {
        Ok(o) => o,
        Err(e) => return error(env, &e),
    };
    let out = res.table.release(&key_of(key), optimizer, now_ms());
    res.announce(env, &out.effects);
    match out.result {
        Ok(r) => (atoms::ok(), r.token, r.finished).encode(env),
        Err(e) => error(env, &e),
    }
}

/// Releases whoever holds `key`: `{:ok, token, finished, optimizer_id}` or
/// `{:error, :not_optimizing}`.
#[rustler::nif(name = "lock_release_any")]
fn release_any<'a>(env: Env<'a>, key: Term<'a>) -> Term<'a> {
    let res = locks();
    let out = res.table.release_any(&key_of(key), now_ms());
    res.announce(env, &out.effects);
    match out.result {
        Ok(r) => (atoms::ok(), r.token, r.finished, &*r.optimizer).encode(env),
        Err(e) => error(env, &e),
    }
}

/// After a wait timed out: `:removed`, `{:granted, token}` (the grant
/// message is in flight: the caller holds the lock) or `:gone`.
#[rustler::nif(name = "lock_cancel")]
fn cancel<'a>(env: Env<'a>, key: Term<'a>, waiter: u64) -> Term<'a> {
    let res = locks();
    match res.table.cancel(&key_of(key), waiter) {
        Cancelled::Removed(_) => atoms::removed().encode(env),
        Cancelled::Granted { token } => (atoms::granted(), token).encode(env),
        Cancelled::Gone => atoms::gone().encode(env),
    }
}

/// `{:ok, token}` or `{:error, :not_lock_owner}`.
#[rustler::nif(name = "lock_renew")]
fn renew<'a>(env: Env<'a>, key: Term<'a>, optimizer: Term<'a>, lease_ms: Term<'a>) -> Term<'a> {
    let res = locks();
    let decoded = optimizer_text(optimizer).and_then(|o| Ok((o, decode_ms(lease_ms)?)));
    let (optimizer, lease_ms) = match decoded {
        Ok(d) => d,
        Err(e) => return error(env, &e),
    };
    let out = res.table.renew(&key_of(key), optimizer, lease_ms, now_ms());
    res.announce(env, &out.effects);
    match out.result {
        Ok(token) => (atoms::ok(), token).encode(env),
        Err(e) => error(env, &e),
    }
}

/// `{:ok, best?}` or `{:error, :not_optimizing}`.
#[rustler::nif(name = "lock_progress")]
fn progress<'a>(
    env: Env<'a>,
    optimizer: Term<'a>,
    iteration: Term<'a>,
    value: Term<'a>,
    metrics: Term<'a>,
) -> Term<'a> {
    let res = locks();
    let decoded = (|| {
        let iteration = iteration
            .decode::<u64>()
            .map_err(|_| Error::invalid_arg("bad_iteration"))?;
        Ok::<_, Error>((
            optimizer_text(optimizer)?,
            iteration,
            decode_value(value, MAX_PROGRESS_BYTES)?,
            decode_value(metrics, MAX_PROGRESS_BYTES)?,
        ))
    })();
    let (optimizer, iteration, value, metrics) = match decoded {
        Ok(d) => d,
        Err(e) => return error(env, &e),
    };
    let out = res
        .table
        .report_progress(optimizer, iteration, value, metrics, now_ms());
    res.announce(env, &out.effects);
    match out.result {
        Ok(best) => (atoms::ok(), best).encode(env),
        Err(e) => error(env, &e),
    }
}

/// `nil` or `%{optimizer_id, pid, token, acquired_at, lease_left_ms,
/// iteration, waiters}`.
#[rustler::nif(name = "lock_info")]
fn info<'a>(env: Env<'a>, key: Term<'a>) -> Term<'a> {
    let res = locks();
    let Some(i) = res.table.info(&key_of(key), now_ms()) else {
        return atoms::nil().encode(env);
    };
    let pairs = [
        (atoms::optimizer_id().encode(env), i.optimizer.encode(env)),
        (atoms::pid().encode(env), i.owner.pid.encode(env)),
        (atoms::token().encode(env), i.token.encode(env)),
        (atoms::acquired_at().encode(env), i.acquired_at.encode(env)),
        (
            atoms::lease_left_ms().encode(env),
            i.lease_left_ms.encode(env),
        ),
        (atoms::iteration().encode(env), i.iteration.encode(env)),
        (atoms::waiters().encode(env), i.waiters.encode(env)),
    ];
    Term::map_from_term_arrays(env, &pairs.map(|p| p.0), &pairs.map(|p| p.1))
        .unwrap_or_else(|_| atoms::nil().encode(env))
}

fn encode_status<'a>(env: Env<'a>, s: &Status<Key, Owner>) -> Term<'a> {
    let keys: Vec<Term> = s.keys.iter().map(|k| key_term(env, k)).collect();
    let nil = || atoms::nil().encode(env);
    let best = s.best.as_ref();
    let pairs = [
        (atoms::optimizer_id(), s.optimizer.encode(env)),
        (atoms::pid(), s.owner.pid.encode(env)),
        (atoms::keys(), keys.encode(env)),
        (atoms::iteration(), s.iteration.encode(env)),
        (atoms::reports(), s.reports.encode(env)),
        (
            atoms::best_value(),
            best.map_or_else(nil, |b| encode_value(env, &b.value)),
        ),
        (
            atoms::best_metrics(),
            best.map_or_else(nil, |b| encode_value(env, &b.metrics)),
        ),
        (
            atoms::best_iteration(),
            best.map_or_else(nil, |b| b.iteration.encode(env)),
        ),
        (atoms::started_at(), s.started_at.encode(env)),
        (atoms::last_update(), s.last_update.encode(env)),
    ];
    let keys = pairs.map(|p| p.0.encode(env));
    let values = pairs.map(|p| p.1);
    Term::map_from_term_arrays(env, &keys, &values).unwrap_or_else(|_| nil())
}

/// `nil` or the optimization's status map.
#[rustler::nif(name = "lock_status")]
fn status<'a>(env: Env<'a>, optimizer: Term<'a>) -> Term<'a> {
    let res = locks();
    let found = optimizer_text(optimizer)
        .ok()
        .and_then(|o| res.table.status(o, now_ms()));
    match found {
        Some(s) => encode_status(env, &s),
        None => atoms::nil().encode(env),
    }
}

/// Every active optimization, sorted by optimizer id.
#[rustler::nif(name = "lock_active", schedule = "DirtyCpu")]
fn active(env: Env) -> Term {
    let res = locks();
    let all: Vec<Term> = res
        .table
        .active(now_ms())
        .iter()
        .map(|s| encode_status(env, s))
        .collect();
    all.encode(env)
}

/// Ends passed leases and drops waiters past their deadline, announcing the
/// changes; returns milliseconds until the next deadline, or `nil`.
#[rustler::nif(name = "lock_expire", schedule = "DirtyCpu")]
fn expire(env: Env) -> Term {
    let res = locks();
    let now = now_ms();
    let fx = res.table.expire(now);
    res.announce(env, &fx);
    match res.table.next_deadline() {
        Some(at) => at.saturating_sub(now).encode(env),
        None => atoms::nil().encode(env),
    }
}
