//! Every store operation as data: one serde [`Command`] per operation, run by
//! [`Store::execute`], answered by a [`Reply`].
//!
//! The port program decodes Commands from MessagePack and encodes Replies;
//! the NIF may call the typed methods directly, but whatever it returns for an
//! operation has the shape the functions here build ([`variable_value`],
//! [`history_value`], [`session_info`]). To add an operation to both backends:
//! add a variant here and one arm in [`Store::execute`].
//!
//! # Wire shapes
//!
//! A command is externally tagged, `{"var_get": {"session": s, "ident": i}}`;
//! its fields may be a map by name (missing optional fields take their
//! defaults) or an array in declaration order (trailing optional fields may be
//! left off). Identifiers and names accept an atom or a string. A reply is the
//! Elixir result term the public API returns: `:ok`, `{:ok, value}` or
//! `{:error, reason}` with `reason` from [`Error::to_value`].
//!
//! # Invariants
//! - `execute` never panics: every argument is checked, every failure is an
//!   [`Error`] that becomes `{:error, reason}`.
//! - A command and its serialization round-trip (named and positional forms).
//! - Arbitrary bytes fed to the `Command` deserializer fail cleanly, never
//!   panic and never recurse past the decoder's depth limit.

use serde::{Deserialize, Serialize};

use crate::acl;
use crate::audit::{self, AuditEntry};
use crate::caller::{Caller, Permission};
use crate::error::{Error, Result};
use crate::glob::Glob;
use crate::graph::{Direction, Format, DEFAULT_EDGE_TYPE};
use crate::ratelimit::RateLimit;
use crate::session::{access_rules_of, RegisterOpts, Session, SessionOpts, Update};
use crate::store::Store;
use crate::types::VarType;
use crate::value::Value;
use crate::variable::{HistoryEntry, Variable, WriteMeta};

/// One store operation and its arguments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// `:ok`; `ttl_ms` must be positive, `metadata` a map.
    SessionCreate {
        session: String,
        #[serde(default)]
        ttl_ms: Option<i64>,
        #[serde(default)]
        max_history: Option<i64>,
        #[serde(default)]
        metadata: Value,
        /// `nil` or `{ops_per_sec, burst}`.
        #[serde(default)]
        rate_limit: Value,
        #[serde(default)]
        audit_capacity: Option<i64>,
    },
    /// `{:ok, info}`, see [`session_info`].
    SessionInfo { session: String },
    /// Heap bytes held by the session's variables: `{:ok, bytes}`.
    SessionMemory { session: String },
    /// `:ok`
    SessionDelete { session: String },
    /// `{:ok, [session_id]}`, sorted.
    SessionList {},
    /// Removes expired sessions: `{:ok, [session_id]}`.
    SessionSweep {},
    /// `{:ok, snapshot_binary}`
    SessionExport { session: String },
    /// `{:ok, session_id}`; `session` renames the imported session.
    SessionImport {
        #[serde(with = "serde_bytes")]
        snapshot: Vec<u8>,
        #[serde(default)]
        session: Option<String>,
    },
    /// `{:ok, var_id}`; only the session itself may register.
    VarRegister {
        session: String,
        name: Value,
        var_type: Value,
        initial: Value,
        #[serde(default)]
        constraints: Value,
        #[serde(default)]
        metadata: Value,
        #[serde(default)]
        description: Option<String>,
        #[serde(default)]
        principal: Option<String>,
        /// A list of access rules (see `acl.rs`); nil for none.
        #[serde(default)]
        access_rules: Value,
    },
    /// `{:ok, variable}`, see [`variable_value`].
    VarGet {
        session: String,
        ident: Value,
        #[serde(default)]
        principal: Option<String>,
        #[serde(default)]
        context: Option<Value>,
    },
    /// `{:ok, value}`
    VarGetValue {
        session: String,
        ident: Value,
        #[serde(default)]
        principal: Option<String>,
        #[serde(default)]
        context: Option<Value>,
    },
    /// `{:ok, new_version}`
    VarSet {
        session: String,
        ident: Value,
        value: Value,
        #[serde(default)]
        metadata: Value,
        #[serde(default)]
        expected_version: Option<u64>,
        #[serde(default)]
        principal: Option<String>,
        #[serde(default)]
        context: Option<Value>,
    },
    /// Atomic: `{:ok, [new_version]}` in input order, or
    /// `{:error, {:validation_failed, %{ident => reason}}}` with nothing written.
    /// Not atomic: `{:ok, [{:ok, version} | {:error, reason}]}` in input order.
    VarSetMany {
        session: String,
        updates: Vec<UpdateSpec>,
        #[serde(default)]
        atomic: bool,
        #[serde(default)]
        principal: Option<String>,
        #[serde(default)]
        context: Option<Value>,
    },
    /// `{:ok, [entry]}`, newest first, see [`history_value`].
    VarHistory {
        session: String,
        ident: Value,
        #[serde(default)]
        limit: Option<u64>,
        #[serde(default)]
        principal: Option<String>,
        #[serde(default)]
        context: Option<Value>,
    },
    /// Writes the value `version` had as a new version: `{:ok, new_version}`.
    VarRollback {
        session: String,
        ident: Value,
        version: u64,
        #[serde(default)]
        metadata: Value,
        #[serde(default)]
        principal: Option<String>,
        #[serde(default)]
        context: Option<Value>,
    },
    /// `:ok`
    VarDelete {
        session: String,
        ident: Value,
        #[serde(default)]
        principal: Option<String>,
        #[serde(default)]
        context: Option<Value>,
    },
    /// `{:ok, [variable]}` sorted by name; `pattern` is an anchored glob on
    /// the name.
    VarList {
        session: String,
        #[serde(default)]
        pattern: Option<String>,
        #[serde(default)]
        principal: Option<String>,
        #[serde(default)]
        context: Option<Value>,
    },
    /// `{:ok, [name]}` sorted, names as registered; `pattern` as in `VarList`.
    VarNames {
        session: String,
        #[serde(default)]
        pattern: Option<String>,
        #[serde(default)]
        principal: Option<String>,
        #[serde(default)]
        context: Option<Value>,
    },
    /// Replaces a variable's access rules (owner only): `:ok`.
    AclSetRules {
        session: String,
        ident: Value,
        rules: Value,
        #[serde(default)]
        principal: Option<String>,
        #[serde(default)]
        context: Option<Value>,
    },
    /// May the principal do `permission`? `:ok` or `{:error, :access_denied}`;
    /// takes no rate-limit token and leaves no audit entry.
    AclCheck {
        session: String,
        ident: Value,
        permission: Value,
        #[serde(default)]
        principal: Option<String>,
        #[serde(default)]
        context: Option<Value>,
    },
    /// The guard of an operation made outside the store (locks, observers):
    /// rate limit, ACL, refusals audited. `:ok` or the refusal.
    AclAuthorize {
        session: String,
        ident: Value,
        permission: Value,
        #[serde(default)]
        principal: Option<String>,
        #[serde(default)]
        context: Option<Value>,
    },
    /// The guard of a session-level operation (information, diagnostics,
    /// export, audit log, deletion), see [`acl::authorize_session`]: `:ok`,
    /// or `{:error, :access_denied}` (audited) for anyone but the session.
    AclAuthorizeSession {
        session: String,
        permission: Value,
        #[serde(default)]
        principal: Option<String>,
    },
    /// `{:ok, [entry]}` newest first, see [`audit_entry_value`].
    AclAuditLog {
        session: String,
        #[serde(default)]
        limit: Option<u64>,
    },
    /// `from -> to` (`to` depends on `from`): `{:ok, new?}`, or
    /// `{:error, {:would_create_cycle, path}}`, `:self_dependency`,
    /// `{:not_found, ident}`. `edge_type` is an atom (default `:data`).
    GraphAddEdge {
        session: String,
        from: Value,
        to: Value,
        #[serde(default)]
        edge_type: Option<Value>,
        #[serde(default)]
        principal: Option<String>,
        #[serde(default)]
        context: Option<Value>,
    },
    /// `{:ok, removed?}`
    GraphRemoveEdge {
        session: String,
        from: Value,
        to: Value,
        #[serde(default)]
        principal: Option<String>,
        #[serde(default)]
        context: Option<Value>,
    },
    /// Removes every edge touching `ident`: `{:ok, count}`.
    GraphClear {
        session: String,
        ident: Value,
        #[serde(default)]
        principal: Option<String>,
        #[serde(default)]
        context: Option<Value>,
    },
    /// What `ident` depends on, in topological order: `{:ok, [name]}`.
    GraphDependencies {
        session: String,
        ident: Value,
        #[serde(default)]
        transitive: bool,
        #[serde(default)]
        principal: Option<String>,
        #[serde(default)]
        context: Option<Value>,
    },
    /// What depends on `ident`, in topological order: `{:ok, [name]}`.
    GraphDependents {
        session: String,
        ident: Value,
        #[serde(default)]
        transitive: bool,
        #[serde(default)]
        principal: Option<String>,
        #[serde(default)]
        context: Option<Value>,
    },
    /// `{:ok, [changed.., dependents..]}` in update order.
    GraphUpdateOrder {
        session: String,
        changed: Vec<Value>,
        #[serde(default)]
        principal: Option<String>,
        #[serde(default)]
        context: Option<Value>,
    },
    /// The graph as text, `format` `:dot` or `:mermaid`: `{:ok, binary}`.
    GraphRender {
        session: String,
        format: Value,
        #[serde(default)]
        principal: Option<String>,
        #[serde(default)]
        context: Option<Value>,
    },
    /// `{:ok, %{edges: n, vertices: n}}`
    GraphInfo {
        session: String,
        #[serde(default)]
        principal: Option<String>,
        #[serde(default)]
        context: Option<Value>,
    },
}

/// One write of [`Command::VarSetMany`]: `[ident, value]` or a map with
/// optional `metadata` and `expected_version`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpdateSpec {
    pub ident: Value,
    pub value: Value,
    #[serde(default)]
    pub metadata: Value,
    #[serde(default)]
    pub expected_version: Option<u64>,
}

impl Command {
    /// The wire name of the command, for logs and telemetry.
    pub fn name(&self) -> &'static str {
        match self {
            Command::SessionCreate { .. } => "session_create",
            Command::SessionInfo { .. } => "session_info",
            Command::SessionMemory { .. } => "session_memory",
            Command::SessionDelete { .. } => "session_delete",
            Command::SessionList {} => "session_list",
            Command::SessionSweep {} => "session_sweep",
            Command::SessionExport { .. } => "session_export",
            Command::SessionImport { .. } => "session_import",
            Command::VarRegister { .. } => "var_register",
            Command::VarGet { .. } => "var_get",
            Command::VarGetValue { .. } => "var_get_value",
            Command::VarSet { .. } => "var_set",
            Command::VarSetMany { .. } => "var_set_many",
            Command::VarHistory { .. } => "var_history",
            Command::VarRollback { .. } => "var_rollback",
            Command::VarDelete { .. } => "var_delete",
            Command::VarList { .. } => "var_list",
            Command::VarNames { .. } => "var_names",
            Command::GraphAddEdge { .. } => "graph_add_edge",
            Command::GraphRemoveEdge { .. } => "graph_remove_edge",
            Command::GraphClear { .. } => "graph_clear",
            Command::GraphDependencies { .. } => "graph_dependencies",
            Command::GraphDependents { .. } => "graph_dependents",
            Command::GraphUpdateOrder { .. } => "graph_update_order",
            Command::GraphRender { .. } => "graph_render",
            Command::GraphInfo { .. } => "graph_info",
            Command::AclSetRules { .. } => "acl_set_rules",
            Command::AclCheck { .. } => "acl_check",
            Command::AclAuthorize { .. } => "acl_authorize",
            Command::AclAuthorizeSession { .. } => "acl_authorize_session",
            Command::AclAuditLog { .. } => "acl_audit_log",
        }
    }

    /// True for operations whose cost grows with the session (or the store),
    /// which a NIF would run on a dirty scheduler; the port runs them off its
    /// frame loop so cheap requests behind them are not held up.
    pub fn is_heavy(&self) -> bool {
        match self {
            Command::SessionList {}
            | Command::SessionSweep {}
            | Command::SessionMemory { .. }
            | Command::SessionExport { .. }
            | Command::SessionImport { .. }
            | Command::VarList { .. }
            | Command::VarNames { .. }
            | Command::GraphAddEdge { .. }
            | Command::GraphDependencies { .. }
            | Command::GraphDependents { .. }
            | Command::GraphUpdateOrder { .. }
            | Command::GraphRender { .. } => true,
            Command::VarSetMany { updates, .. } => updates.len() > 64,
            _ => false,
        }
    }
}

/// A successful outcome: `:ok`, or `{:ok, value}`.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    Done,
    Value(Value),
}

impl Answer {
    /// The Elixir term: `:ok` or `{:ok, value}`.
    pub fn into_term(self) -> Value {
        match self {
            Answer::Done => Value::atom("ok"),
            Answer::Value(v) => Value::tagged("ok", v),
        }
    }
}

/// The answer to one request, correlated by the request's `id`. `id` is
/// `None` only when a frame was too broken to read one from.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    pub id: Option<u64>,
    pub result: Result<Answer>,
}

impl Reply {
    /// The Elixir result term: `:ok`, `{:ok, value}` or `{:error, reason}`.
    pub fn term(&self) -> Value {
        match &self.result {
            Ok(answer) => answer.clone().into_term(),
            Err(e) => Value::tagged("error", e.to_value()),
        }
    }
}

/// On the wire a reply is `[id, term]`.
impl Serialize for Reply {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        (self.id, self.term()).serialize(s)
    }
}

impl Store {
    /// Runs one command. The single dispatch point shared by every
    /// transport: one arm per [`Command`] variant.
    pub fn execute(&self, command: Command) -> Result<Answer> {
        use Answer::{Done, Value as V};
        match command {
            Command::SessionCreate {
                session,
                ttl_ms,
                max_history,
                metadata,
                rate_limit,
                audit_capacity,
            } => {
                let mut opts = SessionOpts {
                    rate_limit: RateLimit::from_value(&rate_limit)?,
                    ..SessionOpts::default()
                };
                match audit_capacity {
                    None => {}
                    Some(n) if (0..=audit::MAX_CAPACITY as i64).contains(&n) => {
                        opts.audit_capacity = n as usize
                    }
                    Some(n) => {
                        return Err(Error::InvalidArgument(Value::tagged(
                            "audit_capacity",
                            Value::Int(n),
                        )))
                    }
                }
                match ttl_ms {
                    None => {}
                    Some(ms) if ms > 0 => opts.ttl_ms = Some(ms as u64),
                    Some(_) => return Err(Error::invalid_arg("bad_ttl")),
                }
                if let Some(n) = max_history {
                    opts.max_history = self.limits().check_history(n)?;
                }
                opts.metadata = metadata_map(metadata)?;
                self.create_session(&session, opts).map(|_| Done)
            }
            Command::SessionInfo { session } => self.with_session(&session, |s| V(session_info(s))),
            Command::SessionMemory { session } => {
                self.with_session(&session, |s| V(version_value(s.heap_size() as u64)))
            }
            Command::SessionDelete { session } => self.delete_session(&session).map(|_| Done),
            Command::SessionList {} => Ok(V(id_list(self.session_ids()))),
            Command::SessionSweep {} => Ok(V(id_list(self.sweep_expired()))),
            Command::SessionExport { session } => self
                .export_session(&session)
                .map(|b| V(Value::Bytes(b.into()))),
            Command::SessionImport { snapshot, session } => self
                .import_session(&snapshot, session.as_deref())
                .map(|id| V(Value::str(&id))),
            Command::VarRegister {
                session,
                name,
                var_type,
                initial,
                constraints,
                metadata,
                description,
                principal,
                access_rules,
            } => {
                let s = self.session(&session)?;
                s.check_register(&caller(&principal, &None))?;
                let var_type = match &var_type {
                    Value::Atom(t) => VarType::parse(t)?,
                    _ => return Err(Error::invalid_arg("type_must_be_an_atom")),
                };
                let opts = RegisterOpts {
                    constraints,
                    metadata: metadata_map(metadata)?,
                    description: description.map(Into::into),
                    access_rules,
                };
                let id = s.register(name, var_type, initial, opts)?;
                Ok(V(Value::str(&id)))
            }
            Command::VarGet {
                session,
                ident,
                principal,
                context,
            } => {
                let caller = caller(&principal, &context);
                let ident = ident_text(&ident)?;
                let var = self.with_session(&session, |s| s.get(ident, &caller))??;
                Ok(V(variable_value(&var)))
            }
            Command::VarGetValue {
                session,
                ident,
                principal,
                context,
            } => {
                let caller = caller(&principal, &context);
                let ident = ident_text(&ident)?;
                self.with_session(&session, |s| s.get_value(ident, &caller))?
                    .map(V)
            }
            Command::VarSet {
                session,
                ident,
                value,
                metadata,
                expected_version,
                principal,
                context,
            } => {
                let caller = caller(&principal, &context);
                let ident = ident_text(&ident)?;
                let meta = WriteMeta {
                    metadata: metadata_map(metadata)?,
                    expected_version,
                };
                let version =
                    self.with_session(&session, |s| s.update(ident, value, meta, &caller))??;
                Ok(V(version_value(version)))
            }
            Command::VarSetMany {
                session,
                updates,
                atomic,
                principal,
                context,
            } => {
                let caller = caller(&principal, &context);
                let updates = updates
                    .into_iter()
                    .map(UpdateSpec::into_update)
                    .collect::<Result<Vec<_>>>()?;
                let s = self.session(&session)?;
                if atomic {
                    let versions = s.update_atomic(updates, &caller)?;
                    return Ok(V(Value::List(
                        versions.into_iter().map(version_value).collect(),
                    )));
                }
                let results = s.update_each(updates, &caller);
                Ok(V(Value::List(
                    results
                        .into_iter()
                        .map(|(_, r)| match r {
                            Ok(v) => Value::tagged("ok", version_value(v)),
                            Err(e) => Value::tagged("error", e.to_value()),
                        })
                        .collect(),
                )))
            }
            Command::VarHistory {
                session,
                ident,
                limit,
                principal,
                context,
            } => {
                let caller = caller(&principal, &context);
                let limit = limit.map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
                let ident = ident_text(&ident)?;
                let entries =
                    self.with_session(&session, |s| s.history(ident, limit, &caller))??;
                Ok(V(Value::List(entries.iter().map(history_value).collect())))
            }
            Command::VarRollback {
                session,
                ident,
                version,
                metadata,
                principal,
                context,
            } => {
                let caller = caller(&principal, &context);
                let ident = ident_text(&ident)?;
                let metadata = metadata_map(metadata)?;
                let v = self
                    .with_session(&session, |s| s.rollback(ident, version, metadata, &caller))??;
                Ok(V(version_value(v)))
            }
            Command::VarDelete {
                session,
                ident,
                principal,
                context,
            } => {
                let caller = caller(&principal, &context);
                let ident = ident_text(&ident)?;
                self.with_session(&session, |s| s.delete(ident, &caller))?
                    .map(|_| Done)
            }
            Command::VarList {
                session,
                pattern,
                principal,
                context,
            } => {
                let caller = caller(&principal, &context);
                let glob = pattern.as_deref().map(Glob::new);
                let mut vars = self.session(&session)?.variables(&caller)?;
                vars.retain(|v| name_matches(&glob, &v.name));
                Ok(V(Value::List(vars.iter().map(variable_value).collect())))
            }
            Command::VarNames {
                session,
                pattern,
                principal,
                context,
            } => {
                let caller = caller(&principal, &context);
                let glob = pattern.as_deref().map(Glob::new);
                let names = self.session(&session)?.names(&caller)?;
                Ok(V(Value::List(
                    names
                        .into_iter()
                        .map(|(name, _)| name)
                        .filter(|name| name_matches(&glob, name))
                        .collect(),
                )))
            }
            Command::AclSetRules {
                session,
                ident,
                rules,
                principal,
                context,
            } => {
                let caller = caller(&principal, &context);
                let ident = ident_text(&ident)?;
                self.with_session(&session, |s| s.set_access_rules(ident, &rules, &caller))?
                    .map(|_| Done)
            }
            Command::AclCheck {
                session,
                ident,
                permission,
                principal,
                context,
            } => {
                let caller = caller(&principal, &context);
                let (ident, perm) = (ident_text(&ident)?, permission_of(&permission)?);
                self.with_session(&session, |s| s.check_access(ident, &caller, perm))?
                    .map(|_| Done)
            }
            Command::AclAuthorize {
                session,
                ident,
                permission,
                principal,
                context,
            } => {
                let caller = caller(&principal, &context);
                let (ident, perm) = (ident_text(&ident)?, permission_of(&permission)?);
                self.with_session(&session, |s| s.authorize(ident, &caller, perm))?
                    .map(|_| Done)
            }
            Command::AclAuthorizeSession {
                session,
                permission,
                principal,
            } => {
                let perm = permission_of(&permission)?;
                self.with_session(&session, |s| {
                    acl::authorize_session(s, principal.as_deref(), perm)
                })?
                .map(|_| Done)
            }
            Command::AclAuditLog { session, limit } => {
                let limit = limit.map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
                let entries = self.with_session(&session, |s| s.audit_log(limit))?;
                Ok(V(Value::List(
                    entries.iter().map(audit_entry_value).collect(),
                )))
            }
            Command::GraphAddEdge {
                session,
                from,
                to,
                edge_type,
                principal,
                context,
            } => {
                let caller = caller(&principal, &context);
                let edge_type = match &edge_type {
                    None | Some(Value::Nil) => DEFAULT_EDGE_TYPE,
                    Some(Value::Atom(t)) => t,
                    Some(_) => {
                        return Err(Error::InvalidArgument(Value::tagged(
                            "edge_type",
                            Value::atom("expected_atom"),
                        )))
                    }
                };
                let added = self.with_session(&session, |s| {
                    s.add_dependency(&from, &to, edge_type, &caller)
                })??;
                Ok(V(Value::Bool(added)))
            }
            Command::GraphRemoveEdge {
                session,
                from,
                to,
                principal,
                context,
            } => {
                let caller = caller(&principal, &context);
                let removed =
                    self.with_session(&session, |s| s.remove_dependency(&from, &to, &caller))??;
                Ok(V(Value::Bool(removed)))
            }
            Command::GraphClear {
                session,
                ident,
                principal,
                context,
            } => {
                let caller = caller(&principal, &context);
                let n =
                    self.with_session(&session, |s| s.clear_dependencies(&ident, &caller))??;
                Ok(V(version_value(n as u64)))
            }
            Command::GraphDependencies {
                session,
                ident,
                transitive,
                principal,
                context,
            } => {
                let caller = caller(&principal, &context);
                self.with_session(&session, |s| {
                    s.dependencies_of(&ident, Direction::Dependencies, transitive, &caller)
                })?
                .map(|names| V(Value::List(names.into())))
            }
            Command::GraphDependents {
                session,
                ident,
                transitive,
                principal,
                context,
            } => {
                let caller = caller(&principal, &context);
                self.with_session(&session, |s| {
                    s.dependencies_of(&ident, Direction::Dependents, transitive, &caller)
                })?
                .map(|names| V(Value::List(names.into())))
            }
            Command::GraphUpdateOrder {
                session,
                changed,
                principal,
                context,
            } => {
                let caller = caller(&principal, &context);
                self.with_session(&session, |s| s.update_order(&changed, &caller))?
                    .map(|names| V(Value::List(names.into())))
            }
            Command::GraphRender {
                session,
                format,
                principal,
                context,
            } => {
                let caller = caller(&principal, &context);
                let format = match &format {
                    Value::Atom(f) => Format::parse(f)?,
                    _ => {
                        return Err(Error::InvalidArgument(Value::tagged(
                            "format",
                            Value::atom("expected_atom"),
                        )))
                    }
                };
                let text =
                    self.with_session(&session, |s| s.render_dependencies(format, &caller))??;
                Ok(V(Value::Str(text.into())))
            }
            Command::GraphInfo {
                session,
                principal,
                context,
            } => {
                let caller = caller(&principal, &context);
                self.with_session(&session, |s| s.dependency_info(&caller))?
                    .map(V)
            }
        }
    }
}

/// A permission named by an atom or a string.
fn permission_of(v: &Value) -> Result<Permission> {
    v.as_text()
        .and_then(|name| Permission::parse(name).ok())
        .ok_or_else(|| Error::invalid_arg("unknown_permission"))
}

/// An audit entry: `%{seq, at, event, principal, variable, permission}`
/// (`at` in microseconds since the epoch; `principal`, `variable` and
/// `permission` may be nil).
pub fn audit_entry_value(e: &AuditEntry) -> Value {
    let text = |s: &Option<Box<str>>| s.as_deref().map_or(Value::Nil, Value::str);
    map(vec![
        ("seq", version_value(e.seq)),
        ("at", Value::Int(e.at)),
        ("event", Value::atom(e.event.name())),
        ("principal", text(&e.principal)),
        ("variable", text(&e.variable)),
        (
            "permission",
            e.permission.map_or(Value::Nil, |p| Value::atom(p.name())),
        ),
    ])
}

/// `nil` or `%{ops_per_sec, burst, available}`.
pub fn rate_limit_value(s: &Session) -> Value {
    match s.rate_limit() {
        None => Value::Nil,
        Some((limit, available)) => map(vec![
            ("ops_per_sec", version_value(limit.ops_per_sec)),
            ("burst", version_value(limit.burst)),
            ("available", version_value(available)),
        ]),
    }
}

impl UpdateSpec {
    fn into_update(self) -> Result<Update> {
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

fn caller<'a>(principal: &'a Option<String>, context: &'a Option<Value>) -> Caller<'a> {
    Caller {
        principal: principal.as_deref(),
        context: context.as_ref(),
        ..Caller::OWNER
    }
}

/// The lookup text of a name or id. A binary that is not UTF-8 cannot name
/// anything; anything but an atom or a binary is a caller's mistake.
fn ident_text(v: &Value) -> Result<&str> {
    match v {
        Value::Atom(s) | Value::Str(s) => Ok(s),
        Value::Bytes(_) => Err(Error::NotFound),
        _ => Err(Error::invalid_arg("name_must_be_atom_or_string")),
    }
}

/// Metadata is a map; `nil` means none.
fn metadata_map(v: Value) -> Result<Value> {
    match v {
        Value::Nil => Ok(Value::empty_map()),
        m @ Value::Map(_) => Ok(m),
        _ => Err(Error::invalid_arg("metadata_must_be_a_map")),
    }
}

fn name_matches(glob: &Option<Glob>, name: &Value) -> bool {
    match (glob, name.as_text()) {
        (None, _) => true,
        (Some(g), Some(text)) => g.matches(text),
        (Some(_), None) => false,
    }
}

fn version_value(v: u64) -> Value {
    Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
}

fn id_list(ids: Vec<std::sync::Arc<str>>) -> Value {
    Value::List(ids.iter().map(|id| Value::str(id)).collect())
}

fn map(pairs: Vec<(&str, Value)>) -> Value {
    Value::Map(
        pairs
            .into_iter()
            .map(|(k, v)| (Value::atom(k), v))
            .collect(),
    )
}

/// A variable as the API returns it: a map with atom keys `id name type value
/// version constraints metadata description created_at updated_at
/// last_write access_rules` (times in microseconds since the epoch; `name`
/// in the form it was registered; `last_write` the metadata of the current
/// version's write; `access_rules` in canonical form).
pub fn variable_value(v: &Variable) -> Value {
    map(vec![
        ("id", Value::str(&v.id)),
        ("name", v.name.clone()),
        ("type", Value::atom(v.var_type.name())),
        ("value", v.value.clone()),
        ("version", version_value(v.version)),
        ("constraints", v.constraints.source.clone()),
        ("metadata", v.metadata.clone()),
        (
            "description",
            v.description.as_deref().map_or(Value::Nil, Value::str),
        ),
        ("created_at", Value::Int(v.created_at)),
        ("updated_at", Value::Int(v.updated_at)),
        ("last_write", v.write_metadata()),
        ("access_rules", access_rules_of(v)),
    ])
}

/// A history entry: `%{version, value, updated_at, metadata}`.
pub fn history_value(h: &HistoryEntry) -> Value {
    map(vec![
        ("version", version_value(h.version)),
        ("value", h.value.clone()),
        ("updated_at", Value::Int(h.updated_at)),
        (
            "metadata",
            h.metadata
                .as_deref()
                .cloned()
                .unwrap_or_else(Value::empty_map),
        ),
    ])
}

/// A session's settings and size: `%{session_id, created_at, last_access,
/// ttl_ms, max_history, variable_count, metadata, rate_limit,
/// audit_capacity}`.
pub fn session_info(s: &Session) -> Value {
    map(vec![
        ("session_id", Value::str(&s.id)),
        ("created_at", Value::Int(s.created_at)),
        ("last_access", Value::Int(s.last_access())),
        ("ttl_ms", s.opts.ttl_ms.map_or(Value::Nil, version_value)),
        ("max_history", version_value(s.opts.max_history as u64)),
        ("variable_count", version_value(s.len() as u64)),
        ("metadata", s.opts.metadata.clone()),
        ("rate_limit", rate_limit_value(s)),
        (
            "audit_capacity",
            version_value(s.audit_ring().capacity() as u64),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(store: &Store, cmd: Command) -> Value {
        let reply = Reply {
            id: Some(1),
            result: store.execute(cmd),
        };
        reply.term()
    }

    fn ok(v: Value) -> Value {
        Value::tagged("ok", v)
    }

    fn err(reason: Value) -> Value {
        Value::tagged("error", reason)
    }

    fn create(session: &str) -> Command {
        Command::SessionCreate {
            session: session.into(),
            ttl_ms: None,
            max_history: None,
            metadata: Value::Nil,
            rate_limit: Value::Nil,
            audit_capacity: None,
        }
    }

    fn register(session: &str, name: &str, ty: &str, initial: Value) -> Command {
        Command::VarRegister {
            session: session.into(),
            name: Value::atom(name),
            var_type: Value::atom(ty),
            initial,
            constraints: Value::Nil,
            metadata: Value::Nil,
            description: None,
            principal: None,
            access_rules: Value::Nil,
        }
    }

    fn set(session: &str, ident: &str, value: Value) -> Command {
        Command::VarSet {
            session: session.into(),
            ident: Value::atom(ident),
            value,
            metadata: Value::Nil,
            expected_version: None,
            principal: None,
            context: None,
        }
    }

    fn get_value(session: &str, ident: &str) -> Command {
        Command::VarGetValue {
            session: session.into(),
            ident: Value::atom(ident),
            principal: None,
            context: None,
        }
    }

    #[test]
    fn session_operations_are_reserved_to_the_session() {
        let store = Store::new();
        run(&store, create("s"));
        let guard = |principal: Option<&str>| Command::AclAuthorizeSession {
            session: "s".into(),
            permission: Value::atom("read"),
            principal: principal.map(Into::into),
        };
        assert_eq!(run(&store, guard(None)), Value::atom("ok"));
        assert_eq!(run(&store, guard(Some("s"))), Value::atom("ok"));
        assert_eq!(
            run(&store, guard(Some("other"))),
            err(Value::atom("access_denied"))
        );
        let log = run(
            &store,
            Command::AclAuditLog {
                session: "s".into(),
                limit: None,
            },
        );
        let Value::Tuple(parts) = log else {
            panic!("not a tuple")
        };
        let Value::List(entries) = &parts[1] else {
            panic!("not a list")
        };
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].get("principal"), Some(&Value::str("other")));
        assert_eq!(entries[0].get("variable"), Some(&Value::Nil));
        let missing = Command::AclAuthorizeSession {
            session: "nope".into(),
            permission: Value::atom("read"),
            principal: Some("other".into()),
        };
        assert_eq!(run(&store, missing), err(Value::atom("session_not_found")));
    }

    #[test]
    fn session_lifecycle() {
        let store = Store::new();
        assert_eq!(run(&store, create("s")), Value::atom("ok"));
        assert_eq!(run(&store, create("s")), err(Value::atom("already_exists")));
        assert_eq!(
            run(&store, Command::SessionList {}),
            ok(Value::List(vec![Value::str("s")].into()))
        );
        let info = run(
            &store,
            Command::SessionInfo {
                session: "s".into(),
            },
        );
        let Value::Tuple(parts) = info else {
            panic!("not a tuple")
        };
        assert_eq!(parts[1].get("variable_count"), Some(&Value::Int(0)));
        assert_eq!(parts[1].get("max_history"), Some(&Value::Int(50)));
        assert_eq!(
            run(
                &store,
                Command::SessionDelete {
                    session: "s".into()
                }
            ),
            Value::atom("ok")
        );
        assert_eq!(
            run(
                &store,
                Command::SessionDelete {
                    session: "s".into()
                }
            ),
            err(Value::atom("session_not_found"))
        );
        assert_eq!(
            run(&store, Command::SessionSweep {}),
            ok(Value::List(Box::new([])))
        );
    }

    #[test]
    fn variables_read_write_rollback() {
        let store = Store::new();
        run(&store, create("s"));
        let id = run(&store, register("s", "t", "float", Value::Float(0.5)));
        let Value::Tuple(parts) = &id else {
            panic!("{id}")
        };
        let var_id = parts[1].as_text().unwrap().to_string();
        assert_eq!(run(&store, get_value("s", "t")), ok(Value::Float(0.5)));
        assert_eq!(run(&store, set("s", "t", Value::Int(1))), ok(Value::Int(1)));
        assert!(matches!(
            store.execute(set("s", "t", Value::str("x"))),
            Err(Error::InvalidValue(_))
        ));
        assert_eq!(
            run(
                &store,
                Command::VarSet {
                    session: "s".into(),
                    ident: Value::str(&var_id),
                    value: Value::Float(2.0),
                    metadata: Value::Nil,
                    expected_version: Some(0),
                    principal: None,
                    context: None,
                }
            ),
            err(Value::tagged("version_mismatch", Value::Int(1)))
        );
        let history = run(
            &store,
            Command::VarHistory {
                session: "s".into(),
                ident: Value::atom("t"),
                limit: Some(10),
                principal: None,
                context: None,
            },
        );
        let Value::Tuple(parts) = history else {
            panic!()
        };
        let Value::List(entries) = &parts[1] else {
            panic!()
        };
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].get("value"), Some(&Value::Float(0.5)));
        assert_eq!(
            run(
                &store,
                Command::VarRollback {
                    session: "s".into(),
                    ident: Value::atom("t"),
                    version: 0,
                    metadata: Value::Nil,
                    principal: None,
                    context: None,
                }
            ),
            ok(Value::Int(2))
        );
        assert_eq!(run(&store, get_value("s", "t")), ok(Value::Float(0.5)));
        let got = run(
            &store,
            Command::VarGet {
                session: "s".into(),
                ident: Value::atom("t"),
                principal: None,
                context: None,
            },
        );
        let Value::Tuple(parts) = got else { panic!() };
        assert_eq!(parts[1].get("name"), Some(&Value::atom("t")));
        assert_eq!(parts[1].get("type"), Some(&Value::atom("float")));
        assert_eq!(parts[1].get("version"), Some(&Value::Int(2)));
        assert_eq!(
            run(
                &store,
                Command::VarGet {
                    session: "s".into(),
                    ident: Value::atom("t"),
                    principal: Some("intruder".into()),
                    context: None,
                }
            ),
            err(Value::atom("access_denied"))
        );
        assert_eq!(
            run(
                &store,
                Command::VarDelete {
                    session: "s".into(),
                    ident: Value::atom("t"),
                    principal: None,
                    context: None,
                }
            ),
            Value::atom("ok")
        );
        assert_eq!(
            run(&store, get_value("s", "t")),
            err(Value::atom("not_found"))
        );
        assert_eq!(
            run(&store, get_value("nope", "t")),
            err(Value::atom("session_not_found"))
        );
    }

    #[test]
    fn bad_arguments_are_errors() {
        let store = Store::new();
        run(&store, create("s"));
        assert_eq!(
            run(&store, register("s", "t", "colour", Value::Nil)),
            err(Value::tagged(
                "invalid_argument",
                Value::tagged("unknown_type", Value::str("colour"))
            ))
        );
        let bad_ident = Command::VarGetValue {
            session: "s".into(),
            ident: Value::Int(3),
            principal: None,
            context: None,
        };
        assert_eq!(
            run(&store, bad_ident),
            err(Value::tagged(
                "invalid_argument",
                Value::atom("name_must_be_atom_or_string")
            ))
        );
        let mut bad_meta = set("s", "t", Value::Int(1));
        if let Command::VarSet { metadata, .. } = &mut bad_meta {
            *metadata = Value::Int(1);
        }
        assert_eq!(
            run(&store, bad_meta),
            err(Value::tagged(
                "invalid_argument",
                Value::atom("metadata_must_be_a_map")
            ))
        );
        let zero_ttl = Command::SessionCreate {
            session: "z".into(),
            ttl_ms: Some(0),
            max_history: None,
            metadata: Value::Nil,
            rate_limit: Value::Nil,
            audit_capacity: None,
        };
        assert_eq!(
            run(&store, zero_ttl),
            err(Value::tagged("invalid_argument", Value::atom("bad_ttl")))
        );
        let mut foreign = register("s", "u", "integer", Value::Int(0));
        if let Command::VarRegister { principal, .. } = &mut foreign {
            *principal = Some("other".into());
        }
        assert_eq!(run(&store, foreign), err(Value::atom("access_denied")));
        let bad_history = Command::SessionCreate {
            session: "h".into(),
            ttl_ms: None,
            max_history: Some(-1),
            metadata: Value::Nil,
            rate_limit: Value::Nil,
            audit_capacity: None,
        };
        assert!(matches!(
            store.execute(bad_history),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn set_many_atomic_and_not() {
        let store = Store::new();
        run(&store, create("s"));
        run(&store, register("s", "a", "integer", Value::Int(0)));
        run(&store, register("s", "b", "integer", Value::Int(0)));
        let spec = |ident: &str, value: Value| UpdateSpec {
            ident: Value::atom(ident),
            value,
            metadata: Value::Nil,
            expected_version: None,
        };
        let many = |atomic, updates| Command::VarSetMany {
            session: "s".into(),
            updates,
            atomic,
            principal: None,
            context: None,
        };
        let failed = run(
            &store,
            many(
                true,
                vec![spec("a", Value::Int(1)), spec("b", Value::str("x"))],
            ),
        );
        let Value::Tuple(parts) = &failed else {
            panic!()
        };
        assert_eq!(parts[0], Value::atom("error"));
        assert_eq!(run(&store, get_value("s", "a")), ok(Value::Int(0)));
        assert_eq!(
            run(
                &store,
                many(
                    true,
                    vec![spec("a", Value::Int(1)), spec("b", Value::Int(2))]
                )
            ),
            ok(Value::List(vec![Value::Int(1), Value::Int(1)].into()))
        );
        let each = run(
            &store,
            many(
                false,
                vec![spec("a", Value::Int(5)), spec("zz", Value::Int(2))],
            ),
        );
        assert_eq!(
            each,
            ok(Value::List(
                vec![
                    Value::tagged("ok", Value::Int(2)),
                    Value::tagged("error", Value::atom("not_found")),
                ]
                .into()
            ))
        );
    }

    #[test]
    fn list_names_and_glob() {
        let store = Store::new();
        run(&store, create("s"));
        for name in ["temp_a", "temp_b", "other"] {
            run(&store, register("s", name, "integer", Value::Int(0)));
        }
        let listed = run(
            &store,
            Command::VarList {
                session: "s".into(),
                pattern: Some("temp_*".into()),
                principal: None,
                context: None,
            },
        );
        let Value::Tuple(parts) = listed else {
            panic!()
        };
        let Value::List(vars) = &parts[1] else {
            panic!()
        };
        let names: Vec<_> = vars.iter().map(|v| v.get("name").cloned()).collect();
        assert_eq!(
            names,
            vec![Some(Value::atom("temp_a")), Some(Value::atom("temp_b"))]
        );
        let names = run(
            &store,
            Command::VarNames {
                session: "s".into(),
                pattern: Some("*_b".into()),
                principal: None,
                context: None,
            },
        );
        assert_eq!(names, ok(Value::List(vec![Value::atom("temp_b")].into())));
    }

    #[test]
    fn export_import_through_commands() {
        let store = Store::new();
        run(&store, create("s"));
        run(&store, register("s", "a", "integer", Value::Int(7)));
        let exported = store
            .execute(Command::SessionExport {
                session: "s".into(),
            })
            .unwrap();
        let Answer::Value(Value::Bytes(bytes)) = exported else {
            panic!("{exported:?}")
        };
        assert_eq!(
            run(
                &store,
                Command::SessionImport {
                    snapshot: bytes.to_vec(),
                    session: Some("copy".into()),
                }
            ),
            ok(Value::str("copy"))
        );
        assert_eq!(run(&store, get_value("copy", "a")), ok(Value::Int(7)));
        assert!(matches!(
            run(
                &store,
                Command::SessionImport {
                    snapshot: b"nope".to_vec(),
                    session: None,
                }
            ),
            Value::Tuple(_)
        ));
    }

    #[test]
    fn graph_commands() {
        let store = Store::new();
        assert_eq!(run(&store, create("g")), Value::atom("ok"));
        for name in ["a", "b", "c"] {
            run(&store, register("g", name, "integer", Value::Int(0)));
        }
        let edge = |from: &str, to: &str| Command::GraphAddEdge {
            session: "g".into(),
            from: Value::atom(from),
            to: Value::atom(to),
            edge_type: None,
            principal: None,
            context: None,
        };
        assert_eq!(run(&store, edge("a", "b")), ok(Value::Bool(true)));
        assert_eq!(run(&store, edge("a", "b")), ok(Value::Bool(false)));
        assert_eq!(run(&store, edge("b", "c")), ok(Value::Bool(true)));
        let path = ["c", "a", "b", "c"].map(Value::atom).to_vec();
        assert_eq!(
            run(&store, edge("c", "a")),
            err(Value::tagged(
                "would_create_cycle",
                Value::List(path.into())
            ))
        );
        assert_eq!(
            run(&store, edge("a", "a")),
            err(Value::atom("self_dependency"))
        );
        assert_eq!(
            run(&store, edge("a", "zz")),
            err(Value::tagged("not_found", Value::atom("zz")))
        );
        let order = Command::GraphUpdateOrder {
            session: "g".into(),
            changed: vec![Value::atom("a")],
            principal: None,
            context: None,
        };
        let abc = ["a", "b", "c"].map(Value::atom).to_vec();
        assert_eq!(run(&store, order), ok(Value::List(abc.into())));
        let deps = Command::GraphDependencies {
            session: "g".into(),
            ident: Value::atom("c"),
            transitive: true,
            principal: None,
            context: None,
        };
        let ab = ["a", "b"].map(Value::atom).to_vec();
        assert_eq!(run(&store, deps), ok(Value::List(ab.into())));
        let render = Command::GraphRender {
            session: "g".into(),
            format: Value::atom("mermaid"),
            principal: Some("intruder".into()),
            context: None,
        };
        assert_eq!(run(&store, render), err(Value::atom("access_denied")));
        let clear = Command::GraphClear {
            session: "g".into(),
            ident: Value::atom("b"),
            principal: None,
            context: None,
        };
        assert_eq!(run(&store, clear), ok(Value::Int(2)));
    }

    #[test]
    fn commands_decode_by_name_and_by_position() {
        use rmpv::Value as M;
        let named = M::Map(vec![(
            M::from("var_set"),
            M::Map(vec![
                (M::from("session"), M::from("s")),
                (
                    M::from("ident"),
                    M::Ext(crate::value::EXT_ATOM, b"t".to_vec()),
                ),
                (M::from("value"), M::F64(0.5)),
            ]),
        )]);
        let positional = M::Map(vec![(
            M::Binary(b"var_set".to_vec()),
            M::Array(vec![
                M::Binary(b"s".to_vec()),
                M::Ext(crate::value::EXT_ATOM, b"t".to_vec()),
                M::F64(0.5),
            ]),
        )]);
        let expected = set("s", "t", Value::Float(0.5));
        for m in [named, positional] {
            let mut bytes = Vec::new();
            rmpv::encode::write_value(&mut bytes, &m).unwrap();
            let mut cmd: Command = rmp_serde::from_slice(&bytes).unwrap();
            if let Command::VarSet { metadata, .. } = &mut cmd {
                assert!(metadata.is_nil());
                *metadata = Value::Nil;
            }
            assert_eq!(cmd, expected);
        }
        let list: Command = rmp_serde::from_slice(&{
            let mut b = Vec::new();
            rmpv::encode::write_value(
                &mut b,
                &M::Map(vec![(M::from("session_list"), M::Map(vec![]))]),
            )
            .unwrap();
            b
        })
        .unwrap();
        assert_eq!(list, Command::SessionList {});
    }

    #[test]
    fn replies_serialize_as_id_and_term() {
        let reply = Reply {
            id: Some(9),
            result: Err(Error::VersionMismatch(3)),
        };
        let bytes = rmp_serde::to_vec(&reply).unwrap();
        let (id, term): (Option<u64>, Value) = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(id, Some(9));
        assert_eq!(term, err(Value::tagged("version_mismatch", Value::Int(3))));
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        let text = "[a-z_]{1,12}";
        prop_oneof![
            (text, proptest::option::of(-10i64..1_000_000)).prop_map(|(s, ttl)| {
                Command::SessionCreate {
                    session: s,
                    ttl_ms: ttl,
                    max_history: Some(5),
                    metadata: Value::empty_map(),
                    rate_limit: Value::Nil,
                    audit_capacity: None,
                }
            }),
            (text, text, any::<i64>()).prop_map(|(s, i, n)| Command::VarSet {
                session: s,
                ident: Value::str(&i),
                value: Value::Tuple(vec![Value::Int(n), Value::atom("x")].into()),
                metadata: Value::empty_map(),
                expected_version: Some(n.unsigned_abs()),
                principal: Some("p".into()),
                context: Some(Value::empty_map()),
            }),
            proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| {
                Command::SessionImport {
                    snapshot: b,
                    session: None,
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn commands_round_trip(cmd in arb_command()) {
            let named = rmp_serde::to_vec_named(&cmd).unwrap();
            prop_assert_eq!(&rmp_serde::from_slice::<Command>(&named).unwrap(), &cmd);
            let positional = rmp_serde::to_vec(&cmd).unwrap();
            prop_assert_eq!(&rmp_serde::from_slice::<Command>(&positional).unwrap(), &cmd);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = rmp_serde::from_slice::<Command>(&bytes);
        }

        #[test]
        fn executing_random_commands_never_panics(cmd in arb_command()) {
            let store = Store::new();
            let _ = store.execute(cmd);
        }
    }
}
