//! The `Store`: every session, in a sharded concurrent map keyed by id.

use std::sync::Arc;

use crate::ConcurrentMap;
use dashmap::mapref::entry::Entry;

use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::prometheus::names;
use crate::session::{Session, SessionOpts};
use crate::snapshot::Snapshot;
use crate::time::now_us;

#[derive(Default)]
pub struct Store {
    sessions: ConcurrentMap<Arc<str>, Arc<Session>>,
    limits: Limits,
}

impl Store {
    pub fn new() -> Self {
        Store::default()
    }

    pub fn with_limits(limits: Limits) -> Self {
        Store {
            sessions: ConcurrentMap::default(),
            limits,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn create_session(&self, id: &str, opts: SessionOpts) -> Result<Arc<Session>> {
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
        match self.sessions.entry(id.clone()) {
            Entry::Occupied(e) if !e.get().is_expired(now_us()) => Err(Error::AlreadyExists),
            entry => {
                let session = Arc::new(Session::new(id, opts, self.limits.clone()));
                entry.insert(session.clone());
                metrics::counter!(names::SESSIONS_CREATED).increment(1);
                Ok(session)
            }
        }
    }

    /// The live session with this id; an expired one counts as gone.
    pub fn session(&self, id: &str) -> Result<Arc<Session>> {
        self.with_session(id, Arc::clone)
    }

    /// Runs `f` on the session without cloning the `Arc` (the read path).
    pub fn with_session<T>(&self, id: &str, f: impl FnOnce(&Arc<Session>) -> T) -> Result<T> {
        match self.sessions.get(id) {
            Some(s) if s.opts.ttl_ms.is_none() || !s.is_expired(now_us()) => {
                s.touch();
                Ok(f(s.value()))
            }
            _ => Err(Error::SessionNotFound),
        }
    }

    pub fn delete_session(&self, id: &str) -> Result<()> {
        let _span = tracing::debug_span!("delete_session", session_id = id).entered();
        self.sessions.remove(id).ok_or(Error::SessionNotFound)?;
        metrics::counter!(names::SESSIONS_DELETED).increment(1);
        Ok(())
    }

    /// Live session ids, sorted.
    pub fn session_ids(&self) -> Vec<Arc<str>> {
        let now = now_us();
        let mut ids: Vec<Arc<str>> = self
            .sessions
            .iter()
            .filter(|s| !s.is_expired(now))
            .map(|s| s.key().clone())
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

    /// Removes expired sessions and returns their ids.
    pub fn sweep_expired(&self) -> Vec<Arc<str>> {
        let _span = tracing::debug_span!("sweep_expired").entered();
        let now = now_us();
        let candidates: Vec<Arc<str>> = self
            .sessions
            .iter()
            .filter(|s| s.is_expired(now))
            .map(|s| s.key().clone())
            .collect();
        let expired: Vec<Arc<str>> = candidates
            .into_iter()
            .filter(|id| {
                self.sessions
                    .remove_if(id, |_, s| s.is_expired(now))
                    .is_some()
            })
            .collect();
        metrics::counter!(names::SESSIONS_EXPIRED).increment(expired.len() as u64);
        expired
    }

    /// A MessagePack snapshot of the whole session.
    pub fn export_session(&self, id: &str) -> Result<Vec<u8>> {
        let _span = tracing::debug_span!("export_session", session_id = id).entered();
        let session = self.session(id)?;
        let bytes = Snapshot::of(&session).encode()?;
        metrics::counter!(names::SNAPSHOT_EXPORTS).increment(1);
        metrics::histogram!(names::SNAPSHOT_BYTES, "op" => "export").record(bytes.len() as f64);
        Ok(bytes)
    }

    /// Creates a session from a snapshot, under `new_id` if given. A rejected
    /// snapshot is logged at warn level (forwarded to Elixir's Logger).
    pub fn import_session(&self, bytes: &[u8], new_id: Option<&str>) -> Result<Arc<str>> {
        let _span = tracing::debug_span!("import_session", bytes = bytes.len()).entered();
        let result = self.import_unobserved(bytes, new_id);
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

    fn import_unobserved(&self, bytes: &[u8], new_id: Option<&str>) -> Result<Arc<str>> {
        if bytes.len() > self.limits.max_snapshot_bytes {
            return Err(Error::TooLarge(self.limits.max_snapshot_bytes));
        }
        let snapshot = Snapshot::decode(bytes)?;
        let id = new_id.unwrap_or(&snapshot.session_id).to_owned();
        let opts = snapshot.session_opts(&self.limits)?;
        let vars = snapshot.variables(&self.limits)?;
        let graph = snapshot.graph()?;
        self.limits.check_session_id(&id)?;
        // Build the whole session before publishing it: an import either
        // lands complete or not at all.
        let session = Session::new(id.as_str().into(), opts, self.limits.clone());
        for (key, var) in vars {
            session.insert(key, var).map_err(|_| {
                Error::InvalidSnapshot(format!("duplicate variable name {key:?}", key = "?"))
            })?;
        }
        session.dependencies().replace(graph);
        match self.sessions.entry(id.as_str().into()) {
            Entry::Occupied(e) if !e.get().is_expired(now_us()) => Err(Error::AlreadyExists),
            entry => {
                entry.insert(Arc::new(session));
                Ok(id.into())
            }
        }
    }
}
