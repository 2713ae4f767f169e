//! Session operations: create, info, memory, delete, list, sweep, export,
//! import.

use serde::{Deserialize, Serialize};

use super::reply::{count_value, session_info};
use super::{value, Answer, Operation};
use crate::audit;
use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::ratelimit::RateLimit;
use crate::session::SessionOpts;
use crate::store::Store;
use crate::value::Value;

/// `:ok`. Options as Elixir gives them (each `nil` for the default):
/// `ttl_ms` a positive integer, `max_history` within the store's limit,
/// `metadata` a map, `rate_limit` `{ops_per_sec, burst}`, `audit_capacity`
/// `0..=audit::MAX_CAPACITY`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionCreate {
    pub session: String,
    #[serde(default)]
    pub ttl_ms: Value,
    #[serde(default)]
    pub max_history: Value,
    #[serde(default)]
    pub metadata: Value,
    #[serde(default)]
    pub rate_limit: Value,
    #[serde(default)]
    pub audit_capacity: Value,
}

impl SessionCreate {
    /// The command from an options map with atom keys (the NIF's form);
    /// keys it does not know are ignored, as `Keyword` options would be.
    pub fn from_opts(session: &str, opts: &Value) -> Result<SessionCreate> {
        if !matches!(opts, Value::Map(_) | Value::Nil) {
            return Err(Error::invalid_arg("options_must_be_a_map"));
        }
        let get = |k: &str| opts.get(k).cloned().unwrap_or(Value::Nil);
        Ok(SessionCreate {
            session: session.into(),
            ttl_ms: get("ttl_ms"),
            max_history: get("max_history"),
            metadata: get("metadata"),
            rate_limit: get("rate_limit"),
            audit_capacity: get("audit_capacity"),
        })
    }

    /// The options, checked: the one place they are parsed.
    pub fn session_opts(&self, limits: &Limits) -> Result<SessionOpts> {
        let mut opts = SessionOpts {
            rate_limit: RateLimit::from_value(&self.rate_limit)?,
            ..SessionOpts::default()
        };
        match self.ttl_ms {
            Value::Nil => {}
            Value::Int(ms) if ms > 0 => opts.ttl_ms = Some(ms as u64),
            _ => return Err(Error::invalid_arg("bad_ttl")),
        }
        match self.max_history {
            Value::Nil => {}
            Value::Int(n) => opts.max_history = limits.check_history(n)?,
            _ => return Err(Error::invalid_arg("bad_max_history")),
        }
        match &self.metadata {
            Value::Nil => {}
            m @ Value::Map(_) => opts.metadata = m.clone(),
            _ => return Err(Error::invalid_arg("metadata_must_be_a_map")),
        }
        match &self.audit_capacity {
            Value::Nil => {}
            Value::Int(n) if (0..=audit::MAX_CAPACITY as i64).contains(n) => {
                opts.audit_capacity = *n as usize
            }
            v => {
                return Err(Error::InvalidArgument(Value::tagged(
                    "audit_capacity",
                    v.clone(),
                )))
            }
        }
        Ok(opts)
    }
}

impl Operation for SessionCreate {
    const NAME: &'static str = "session_create";
    const WRITES: bool = true;
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let opts = self.session_opts(store.limits())?;
        store.create_session(&self.session, opts, now_us)?;
        Ok(Answer::Done)
    }
}

/// `{:ok, info}`, see [`super::reply::SESSION_KEYS`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionInfo {
    pub session: String,
}

impl Operation for SessionInfo {
    const NAME: &'static str = "session_info";
    const WRITES: bool = false;
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        value(store.with_session(&self.session, now_us, |s| session_info(s, now_us))?)
    }
}

/// Heap bytes held by the session's variables: `{:ok, bytes}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionMemory {
    pub session: String,
}

impl Operation for SessionMemory {
    const NAME: &'static str = "session_memory";
    const WRITES: bool = false;
    fn is_heavy(&self) -> bool {
        true
    }
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let bytes = store.with_session(&self.session, now_us, |s| s.heap_size())?;
        value(count_value(bytes as u64))
    }
}

/// `:ok`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionDelete {
    pub session: String,
}

impl Operation for SessionDelete {
    const NAME: &'static str = "session_delete";
    const WRITES: bool = true;
    fn apply(self, store: &Store, _now_us: i64) -> Result<Answer> {
        store.delete_session(&self.session).map(|_| Answer::Done)
    }
}

/// `{:ok, [session_id]}`, sorted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionList {}

impl Operation for SessionList {
    const NAME: &'static str = "session_list";
    const WRITES: bool = false;
    fn is_heavy(&self) -> bool {
        true
    }
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        value(id_list(store.session_ids(now_us)))
    }
}

/// Removes the sessions expired at the stamp: `{:ok, [session_id]}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSweep {}

impl Operation for SessionSweep {
    const NAME: &'static str = "session_sweep";
    const WRITES: bool = true;
    fn is_heavy(&self) -> bool {
        true
    }
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        value(id_list(store.sweep_expired(now_us)))
    }
}

/// `{:ok, snapshot_binary}`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionExport {
    pub session: String,
}

impl Operation for SessionExport {
    const NAME: &'static str = "session_export";
    const WRITES: bool = false;
    fn is_heavy(&self) -> bool {
        true
    }
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let bytes = store.export_session(&self.session, now_us)?;
        value(Value::Bytes(bytes.into()))
    }
}

/// `{:ok, session_id}`; `session` renames the imported session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionImport {
    #[serde(with = "serde_bytes")]
    pub snapshot: Vec<u8>,
    #[serde(default)]
    pub session: Option<String>,
}

impl Operation for SessionImport {
    const NAME: &'static str = "session_import";
    const WRITES: bool = true;
    fn is_heavy(&self) -> bool {
        true
    }
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let id = store.import_session(&self.snapshot, self.session.as_deref(), now_us)?;
        value(Value::str(&id))
    }
}

fn id_list(ids: Vec<std::sync::Arc<str>>) -> Value {
    Value::List(ids.iter().map(|id| Value::str(id)).collect())
}
