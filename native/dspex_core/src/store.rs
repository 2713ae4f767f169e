//! The `Store`: every session, in a concurrent map keyed by id.
//!
//! Every method that can see time takes it (`now`, microseconds since the
//! epoch, stamped by the caller's entry point): whether a session has
//! expired is decided by the stamp, never by reading the clock here.

use std::sync::Arc;

use papaya::{Compute, Operation};
use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::prometheus::names;
use crate::session::{Session, SessionOpts};
use crate::snapshot::{self, Snapshot};

/// The session map is read by every call and written only when a session
/// comes or goes, and every scheduler reads the same hot sessions: its reads
/// must not write shared memory. A lock-striped map (a read lock per shard)
/// made two writers of one session bounce the shard's lock word between
/// cores; `papaya`'s reads take no lock.
type Sessions = papaya::HashMap<Arc<str>, Arc<Session>, ahash::RandomState>;

pub struct Store {
    sessions: Sessions,
    limits: Limits,
    imports: ImportGate,
}

impl Default for Store {
    fn default() -> Self {
        Store::with_limits(Limits::default())
    }
}

fn sessions() -> Sessions {
    // Sessions come and go rarely: a resize may block the writer that
    // triggers it rather than make every read check for one in progress.
    papaya::HashMap::builder()
        .hasher(ahash::RandomState::default())
        .resize_mode(papaya::ResizeMode::Blocking)
        .build()
}

impl Store {
    pub fn new() -> Self {
        Store::default()
    }

    pub fn with_limits(limits: Limits) -> Self {
        Store {
            sessions: sessions(),
            limits,
            imports: ImportGate::default(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn create_session(&self, id: &str, opts: SessionOpts, now: i64) -> Result<Arc<Session>> {
        let _span = tracing::debug_span!("create_session", session_id = id).entered();
        self.limits.check_session_id(id)?;
        if opts.max_history > self.limits.max_history {
            return Err(self
                .limits
                .check_history(opts.max_history as i64)
                .unwrap_err());
        }
        self.limits.check_value(&opts.metadata)?;
        let id: Arc<str> = id.into();
        let session = Arc::new(Session::new(id.clone(), opts, self.limits.clone(), now));
        self.publish(id, session.clone(), now)?;
        metrics::counter!(names::SESSIONS_CREATED).increment(1);
        Ok(session)
    }

    /// Inserts `session` under `id` unless a live session holds the id (an
    /// expired one is replaced), in one atomic step.
    fn publish(&self, id: Arc<str>, session: Arc<Session>, now: i64) -> Result<()> {
        let sessions = self.sessions.pin();
        // The closure may run again if the entry changes under it.
        let outcome = sessions.compute(id, |entry| match entry {
            Some((_, live)) if !live.is_expired(now) => Operation::Abort(()),
            _ => Operation::Insert(session.clone()),
        });
        match outcome {
            Compute::Inserted(..) | Compute::Updated { .. } => Ok(()),
            Compute::Removed(..) | Compute::Aborted(()) => Err(Error::AlreadyExists),
        }
    }

    /// The live session with this id; an expired one counts as gone.
    pub fn session(&self, id: &str, now: i64) -> Result<Arc<Session>> {
        self.with_session(id, now, Arc::clone)
    }

    /// Runs `f` on the session without cloning the `Arc` (the read path).
    pub fn with_session<T>(
        &self,
        id: &str,
        now: i64,
        f: impl FnOnce(&Arc<Session>) -> T,
    ) -> Result<T> {
        match self.sessions.pin().get(id) {
            Some(s) if s.opts.ttl_ms.is_none() || !s.is_expired(now) => {
                s.touch(now);
                Ok(f(s))
            }
            _ => Err(Error::SessionNotFound),
        }
    }

    pub fn delete_session(&self, id: &str) -> Result<()> {
        let _span = tracing::debug_span!("delete_session", session_id = id).entered();
        self.sessions
            .pin()
            .remove(id)
            .ok_or(Error::SessionNotFound)?;
        metrics::counter!(names::SESSIONS_DELETED).increment(1);
        Ok(())
    }

    /// Live session ids, sorted.
    pub fn session_ids(&self, now: i64) -> Vec<Arc<str>> {
        let mut ids: Vec<Arc<str>> = self
            .sessions
            .pin()
            .iter()
            .filter(|(_, s)| !s.is_expired(now))
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Removes the sessions expired at `now` and returns their ids, sorted
    /// (the map's order depends on its per-process hash seed).
    pub fn sweep_expired(&self, now: i64) -> Vec<Arc<str>> {
        let _span = tracing::debug_span!("sweep_expired").entered();
        let sessions = self.sessions.pin();
        let candidates: Vec<Arc<str>> = sessions
            .iter()
            .filter(|(_, s)| s.is_expired(now))
            .map(|(id, _)| id.clone())
            .collect();
        let expired: Vec<Arc<str>> = candidates
            .into_iter()
            .filter(|id| {
                // A session recreated under the id since is not expired.
                matches!(
                    sessions.remove_if(id, |_, s| s.is_expired(now)),
                    Ok(Some(_))
                )
            })
            .collect();
        metrics::counter!(names::SESSIONS_EXPIRED).increment(expired.len() as u64);
        let mut expired = expired;
        expired.sort();
        expired
    }

    /// A MessagePack snapshot of the whole session.
    pub fn export_session(&self, id: &str, now: i64) -> Result<Vec<u8>> {
        let _span = tracing::debug_span!("export_session", session_id = id).entered();
        let session = self.session(id, now)?;
        let bytes = Snapshot::of(&session).encode()?;
        metrics::counter!(names::SNAPSHOT_EXPORTS).increment(1);
        metrics::histogram!(names::SNAPSHOT_BYTES, "op" => "export").record(bytes.len() as f64);
        Ok(bytes)
    }

    /// Creates a session from a snapshot, under `new_id` if given. A rejected
    /// snapshot is logged at warn level (forwarded to Elixir's Logger).
    pub fn import_session(&self, bytes: &[u8], new_id: Option<&str>, now: i64) -> Result<Arc<str>> {
        let _span = tracing::debug_span!("import_session", bytes = bytes.len()).entered();
        let result = self.import_unobserved(bytes, new_id, now);
        let outcome = match &result {
            Ok(_) => {
                metrics::counter!(names::SESSIONS_CREATED).increment(1);
                metrics::histogram!(names::SNAPSHOT_BYTES, "op" => "import")
                    .record(bytes.len() as f64);
                "ok"
            }
            Err(e) => {
                tracing::warn!(reason = %e, bytes = bytes.len(), "snapshot import rejected");
                e.kind()
            }
        };
        metrics::counter!(names::SNAPSHOT_IMPORTS, "result" => outcome).increment(1);
        result
    }

    fn import_unobserved(&self, bytes: &[u8], new_id: Option<&str>, now: i64) -> Result<Arc<str>> {
        if bytes.len() > self.limits.max_snapshot_bytes {
            return Err(Error::TooLarge(self.limits.max_snapshot_bytes));
        }
        let _slot = self.imports.enter()?;
        let snapshot = snapshot::decode(bytes, &self.limits)?;
        let id = new_id.unwrap_or(snapshot.session_id);
        self.limits.check_session_id(id)?;
        // Build the whole session before publishing it: an import either
        // lands complete or not at all.
        let session = Session::new(id.into(), snapshot.opts, self.limits.clone(), now);
        for (key, var) in snapshot.variables {
            let id = var.id.clone();
            if session.insert(key.clone(), var).is_err() {
                // Say which of the two was taken, with its own text.
                let name_taken = session.with_cell(&key, |_| ()).is_ok();
                return Err(Error::InvalidSnapshot(if name_taken {
                    format!("duplicate variable name {key:?}")
                } else {
                    format!("duplicate variable id {id:?}")
                }));
            }
        }
        session.dependencies().replace(snapshot.graph);
        self.publish(id.into(), Arc::new(session), now)?;
        Ok(id.into())
    }
}

/// Imports running at once, and waiting for their turn. An import holds a
/// (dirty) scheduler thread for as long as it decodes; bounding them keeps
/// big imports from taking every thread and starving other work. Past the
/// waiting bound an import is refused with `:busy` rather than queued.
pub const IMPORTS_AT_ONCE: usize = 1;
pub const IMPORTS_WAITING: usize = 8;

#[derive(Default)]
struct ImportGate {
    /// (running, waiting)
    state: Mutex<(usize, usize)>,
    turn: Condvar,
}

struct ImportSlot<'a>(&'a ImportGate);

impl ImportGate {
    fn enter(&self) -> Result<ImportSlot<'_>> {
        let mut state = self.state.lock();
        if state.0 >= IMPORTS_AT_ONCE {
            if state.1 >= IMPORTS_WAITING {
                return Err(Error::Busy);
            }
            state.1 += 1;
            while state.0 >= IMPORTS_AT_ONCE {
                self.turn.wait(&mut state);
            }
            state.1 -= 1;
        }
        state.0 += 1;
        Ok(ImportSlot(self))
    }
}

impl Drop for ImportSlot<'_> {
    fn drop(&mut self) {
        self.0.state.lock().0 -= 1;
        self.0.turn.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ttl(ms: u64) -> SessionOpts {
        SessionOpts {
            ttl_ms: Some(ms),
            ..SessionOpts::default()
        }
    }

    #[test]
    fn an_id_is_taken_once() {
        let store = Store::new();
        store
            .create_session("s", SessionOpts::default(), 0)
            .unwrap();
        assert!(matches!(
            store.create_session("s", SessionOpts::default(), 0),
            Err(Error::AlreadyExists)
        ));
        store.delete_session("s").unwrap();
        assert!(matches!(
            store.delete_session("s"),
            Err(Error::SessionNotFound)
        ));
        store
            .create_session("s", SessionOpts::default(), 0)
            .unwrap();
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn an_expired_session_is_gone_and_its_id_free() {
        let store = Store::new();
        store.create_session("old", ttl(1), 0).unwrap();
        // 1 ms is still within the ttl; 5 ms later it is gone.
        assert!(store.session("old", 1_000).is_ok());
        let later = 1_000 + 5_000;
        assert!(matches!(
            store.session("old", later),
            Err(Error::SessionNotFound)
        ));
        assert!(store.session_ids(later).is_empty());
        // Taking the id replaces the expired session; the sweep then keeps it.
        store
            .create_session("old", SessionOpts::default(), later)
            .unwrap();
        assert!(store.sweep_expired(later).is_empty());
        assert!(store.session("old", later).is_ok());
    }

    #[test]
    fn the_sweep_removes_only_expired_sessions() {
        let store = Store::new();
        store.create_session("short", ttl(1), 0).unwrap();
        store
            .create_session("long", SessionOpts::default(), 0)
            .unwrap();
        assert!(store.sweep_expired(1_000).is_empty());
        let swept: Vec<String> = store
            .sweep_expired(5_000)
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(swept, ["short"]);
        assert_eq!(store.session_ids(5_000).len(), 1);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn racing_creates_of_one_id_have_one_winner() {
        let store = Store::new();
        for round in 0..50 {
            let id = format!("race-{round}");
            let wins = std::thread::scope(|scope| {
                let racers: Vec<_> = (0..4)
                    .map(|_| scope.spawn(|| store.create_session(&id, SessionOpts::default(), 0)))
                    .collect();
                racers
                    .into_iter()
                    .map(|r| r.join().unwrap())
                    .filter(Result::is_ok)
                    .count()
            });
            assert_eq!(wins, 1, "round {round}");
        }
    }

    #[test]
    fn an_import_does_not_replace_a_live_session() {
        let store = Store::new();
        store
            .create_session("s", SessionOpts::default(), 0)
            .unwrap();
        let snapshot = store.export_session("s", 0).unwrap();
        assert!(matches!(
            store.import_session(&snapshot, None, 0),
            Err(Error::AlreadyExists)
        ));
        assert_eq!(
            &*store.import_session(&snapshot, Some("copy"), 0).unwrap(),
            "copy"
        );
        assert_eq!(store.len(), 2);
    }
}
