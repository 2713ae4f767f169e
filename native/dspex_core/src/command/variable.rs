//! Variable operations: register, read, write, batch, history, rollback,
//! delete, list, and the optimizer-lock fence a variable's writes obey.

use serde::{Deserialize, Serialize};

use super::args::{ident_text, limit_of, metadata_map, name_matches, Actor};
use super::reply::{count_value, counts, history_value, variable_value};
use super::{value, Answer, Operation};
use crate::error::{Error, Result};
use crate::glob::Glob;
use crate::locks::{check_optimizer_id, FenceChange};
use crate::session::{RegisterOpts, Update};
use crate::store::Store;
use crate::types::VarType;
use crate::value::Value;
use crate::variable::WriteMeta;

/// `{:ok, var_id}`; only the session itself may register.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VarRegister {
    pub session: String,
    pub name: Value,
    /// An atom naming the type.
    pub var_type: Value,
    pub initial: Value,
    #[serde(default)]
    pub constraints: Value,
    #[serde(default)]
    pub metadata: Value,
    #[serde(default)]
    pub description: Option<String>,
    /// A list of access rules (see `acl.rs`); nil for none.
    #[serde(default)]
    pub access_rules: Value,
    #[serde(default)]
    pub actor: Actor,
}

impl VarRegister {
    /// The command from an options map with atom keys (the NIF's form):
    /// `constraints`, `metadata`, `description` (a string), `access_rules`.
    pub fn from_opts(
        session: &str,
        name: Value,
        var_type: Value,
        initial: Value,
        opts: &Value,
        actor: Actor,
    ) -> Result<VarRegister> {
        let get = |k: &str| opts.get(k).cloned().unwrap_or(Value::Nil);
        let description = match get("description") {
            Value::Nil => None,
            Value::Str(d) => Some(d.to_string()),
            _ => return Err(Error::invalid_arg("description_must_be_a_string")),
        };
        Ok(VarRegister {
            session: session.into(),
            name,
            var_type,
            initial,
            constraints: get("constraints"),
            metadata: get("metadata"),
            description,
            access_rules: get("access_rules"),
            actor,
        })
    }
}

impl Operation for VarRegister {
    const NAME: &'static str = "var_register";
    const WRITES: bool = true;
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let s = store.session(&self.session, now_us)?;
        s.check_register(&self.actor.caller(now_us))?;
        let var_type = match &self.var_type {
            Value::Atom(t) => VarType::parse(t)?,
            _ => return Err(Error::invalid_arg("type_must_be_an_atom")),
        };
        let opts = RegisterOpts {
            constraints: self.constraints,
            metadata: metadata_map(self.metadata)?,
            description: self.description.map(Into::into),
            access_rules: self.access_rules,
        };
        let id = s.register(self.name, var_type, self.initial, opts, now_us)?;
        value(Value::str(&id))
    }
}

/// `{:ok, variable}`, see [`super::reply::VARIABLE_KEYS`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VarGet {
    pub session: String,
    pub ident: Value,
    #[serde(default)]
    pub actor: Actor,
}

impl Operation for VarGet {
    const NAME: &'static str = "var_get";
    const WRITES: bool = false;
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let caller = self.actor.caller(now_us);
        let ident = ident_text(&self.ident)?;
        let var = store.with_session(&self.session, now_us, |s| s.get(ident, &caller))??;
        value(variable_value(&var))
    }
}

/// `{:ok, value}`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VarGetValue {
    pub session: String,
    pub ident: Value,
    #[serde(default)]
    pub actor: Actor,
}

impl Operation for VarGetValue {
    const NAME: &'static str = "var_get_value";
    const WRITES: bool = false;
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let caller = self.actor.caller(now_us);
        let ident = ident_text(&self.ident)?;
        value(store.with_session(&self.session, now_us, |s| s.get_value(ident, &caller))??)
    }
}

/// Is there a variable the caller may read under this name or id?
/// `{:ok, true}`, or `{:ok, false}` when there is none; a variable the
/// caller may not read is `{:error, :access_denied}`, as a read of it is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VarExists {
    pub session: String,
    pub ident: Value,
    #[serde(default)]
    pub actor: Actor,
}

impl Operation for VarExists {
    const NAME: &'static str = "var_exists";
    const WRITES: bool = false;
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let caller = self.actor.caller(now_us);
        let ident = match ident_text(&self.ident) {
            Err(Error::NotFound) => return value(Value::Bool(false)),
            other => other?,
        };
        let found = store.with_session(&self.session, now_us, |s| s.exists(ident, &caller))??;
        value(Value::Bool(found))
    }
}

/// `{:ok, new_version}`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VarSet {
    pub session: String,
    pub ident: Value,
    pub value: Value,
    #[serde(default)]
    pub metadata: Value,
    #[serde(default)]
    pub expected_version: Option<u64>,
    #[serde(default)]
    pub actor: Actor,
}

impl Operation for VarSet {
    const NAME: &'static str = "var_set";
    const WRITES: bool = true;
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let caller = self.actor.caller(now_us);
        let ident = ident_text(&self.ident)?;
        let meta = WriteMeta {
            metadata: metadata_map(self.metadata)?,
            expected_version: self.expected_version,
        };
        let v = self.value;
        let version =
            store.with_session(&self.session, now_us, |s| s.update(ident, v, meta, &caller))??;
        value(count_value(version))
    }
}

/// One write of [`VarSetMany`]: a map with optional `metadata` and
/// `expected_version`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateSpec {
    pub ident: Value,
    pub value: Value,
    #[serde(default)]
    pub metadata: Value,
    #[serde(default)]
    pub expected_version: Option<u64>,
}

impl UpdateSpec {
    pub fn into_update(self) -> Result<Update> {
        Ok(Update {
            ident: ident_text(&self.ident)?.into(),
            value: self.value,
            meta: WriteMeta {
                metadata: metadata_map(self.metadata)?,
                expected_version: self.expected_version,
            },
        })
    }
}

/// Atomic: `{:ok, [new_version]}` in input order, or
/// `{:error, {:validation_failed, %{ident => reason}}}` with nothing written.
/// Not atomic: `{:ok, [{:ok, version} | {:error, reason}]}` in input order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VarSetMany {
    pub session: String,
    pub updates: Vec<UpdateSpec>,
    #[serde(default)]
    pub atomic: bool,
    #[serde(default)]
    pub actor: Actor,
}

impl Operation for VarSetMany {
    const NAME: &'static str = "var_set_many";
    const WRITES: bool = true;
    fn is_heavy(&self) -> bool {
        self.updates.len() > 64
    }
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let caller = self.actor.caller(now_us);
        let updates = self
            .updates
            .into_iter()
            .map(UpdateSpec::into_update)
            .collect::<Result<Vec<_>>>()?;
        let s = store.session(&self.session, now_us)?;
        if self.atomic {
            return value(counts(s.update_atomic(updates, &caller)?));
        }
        value(batch_results(s.update_each(updates, &caller)))
    }
}

/// The results of a non-atomic batch: `[{:ok, version} | {:error, reason}]`.
pub fn batch_results(results: crate::session::BatchResults) -> Value {
    Value::List(
        results
            .into_iter()
            .map(|(_, r)| match r {
                Ok(v) => Value::tagged("ok", count_value(v)),
                Err(e) => Value::tagged("error", e.to_value()),
            })
            .collect(),
    )
}

/// `{:ok, [entry]}`, newest first, see [`super::reply::HISTORY_KEYS`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VarHistory {
    pub session: String,
    pub ident: Value,
    #[serde(default)]
    pub limit: Option<u64>,
    #[serde(default)]
    pub actor: Actor,
}

impl Operation for VarHistory {
    const NAME: &'static str = "var_history";
    const WRITES: bool = false;
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let caller = self.actor.caller(now_us);
        let ident = ident_text(&self.ident)?;
        let limit = limit_of(self.limit);
        let entries =
            store.with_session(&self.session, now_us, |s| s.history(ident, limit, &caller))??;
        value(Value::List(entries.iter().map(history_value).collect()))
    }
}

/// Writes the value `version` had as a new version: `{:ok, new_version}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VarRollback {
    pub session: String,
    pub ident: Value,
    pub version: u64,
    #[serde(default)]
    pub metadata: Value,
    #[serde(default)]
    pub actor: Actor,
}

impl Operation for VarRollback {
    const NAME: &'static str = "var_rollback";
    const WRITES: bool = true;
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let caller = self.actor.caller(now_us);
        let ident = ident_text(&self.ident)?;
        let metadata = metadata_map(self.metadata)?;
        let version = self.version;
        let v = store.with_session(&self.session, now_us, |s| {
            s.rollback(ident, version, metadata, &caller)
        })??;
        value(count_value(v))
    }
}

/// `:ok`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VarDelete {
    pub session: String,
    pub ident: Value,
    #[serde(default)]
    pub actor: Actor,
}

impl Operation for VarDelete {
    const NAME: &'static str = "var_delete";
    const WRITES: bool = true;
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let caller = self.actor.caller(now_us);
        let ident = ident_text(&self.ident)?;
        store.with_session(&self.session, now_us, |s| s.delete(ident, &caller))??;
        Ok(Answer::Done)
    }
}

/// `{:ok, [variable]}` sorted by name; `pattern` is an anchored glob on
/// the name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VarList {
    pub session: String,
    #[serde(default)]
    pub pattern: Option<String>,
    #[serde(default)]
    pub actor: Actor,
}

impl Operation for VarList {
    const NAME: &'static str = "var_list";
    const WRITES: bool = false;
    fn is_heavy(&self) -> bool {
        true
    }
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let caller = self.actor.caller(now_us);
        let glob = self.pattern.as_deref().map(Glob::new);
        let mut vars = store.session(&self.session, now_us)?.variables(&caller)?;
        vars.retain(|v| name_matches(&glob, &v.name));
        value(Value::List(vars.iter().map(variable_value).collect()))
    }
}

/// `{:ok, [name]}` sorted, names as registered; `pattern` as in `VarList`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VarNames {
    pub session: String,
    #[serde(default)]
    pub pattern: Option<String>,
    #[serde(default)]
    pub actor: Actor,
}

impl Operation for VarNames {
    const NAME: &'static str = "var_names";
    const WRITES: bool = false;
    fn is_heavy(&self) -> bool {
        true
    }
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let caller = self.actor.caller(now_us);
        let glob = self.pattern.as_deref().map(Glob::new);
        let names = store.session(&self.session, now_us)?.names(&caller)?;
        value(Value::List(
            names
                .into_iter()
                .map(|(name, _)| name)
                .filter(|name| name_matches(&glob, name))
                .collect(),
        ))
    }
}

/// Moves a variable's write fence (see [`crate::locks::VarLock`]): the lock
/// table, which lives beside the VM's processes, pushes each grant and
/// release of a variable's optimizer lock into the session with this
/// command, so the engine that holds the variable fences its writes
/// whichever process it runs in. `:ok`; a stale change (an older token) is
/// ignored. Only the session itself may move a fence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VarFence {
    pub session: String,
    pub ident: Value,
    pub change: FenceChange,
}

impl Operation for VarFence {
    const NAME: &'static str = "var_fence";
    const WRITES: bool = true;
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        if let FenceChange::Granted {
            optimizer,
            preempted,
            ..
        } = &self.change
        {
            check_optimizer_id(optimizer)?;
            if let Some(p) = preempted {
                check_optimizer_id(p)?;
            }
        }
        let ident = ident_text(&self.ident)?;
        store.with_session(&self.session, now_us, |s| {
            s.with_cell(ident, |cell| cell.lock().lock.apply(&self.change))
        })??;
        Ok(Answer::Done)
    }
}
