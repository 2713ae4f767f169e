//! Access-control operations: rules, checks, the guards of operations made
//! outside the store, and the audit log.

use serde::{Deserialize, Serialize};

use super::args::{ident_text, limit_of, permission_of, Actor};
use super::reply::audit_entry_value;
use super::{value, Answer, Operation};
use crate::error::Result;
use crate::store::Store;
use crate::value::Value;

/// Replaces a variable's access rules (owner only): `:ok`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclSetRules {
    pub session: String,
    pub ident: Value,
    pub rules: Value,
    #[serde(default)]
    pub actor: Actor,
}

impl Operation for AclSetRules {
    const NAME: &'static str = "acl_set_rules";
    const WRITES: bool = true;
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let caller = self.actor.caller(now_us);
        let ident = ident_text(&self.ident)?;
        let rules = &self.rules;
        store.with_session(&self.session, now_us, |s| {
            s.set_access_rules(ident, rules, &caller)
        })??;
        Ok(Answer::Done)
    }
}

/// May the principal do `permission`? `:ok` or `{:error, :access_denied}`;
/// takes no rate-limit token and leaves no audit entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclCheck {
    pub session: String,
    pub ident: Value,
    pub permission: Value,
    #[serde(default)]
    pub actor: Actor,
}

impl Operation for AclCheck {
    const NAME: &'static str = "acl_check";
    const WRITES: bool = false;
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let caller = self.actor.caller(now_us);
        let (ident, perm) = (ident_text(&self.ident)?, permission_of(&self.permission)?);
        store.with_session(&self.session, now_us, |s| {
            s.check_access(ident, &caller, perm)
        })??;
        Ok(Answer::Done)
    }
}

/// The guard of an operation made outside the store (locks, observers):
/// rate limit, ACL, refusals audited. `:ok` or the refusal. It takes a
/// rate-limit token and may audit, so it counts as a write.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclAuthorize {
    pub session: String,
    pub ident: Value,
    pub permission: Value,
    #[serde(default)]
    pub actor: Actor,
}

impl Operation for AclAuthorize {
    const NAME: &'static str = "acl_authorize";
    const WRITES: bool = true;
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let caller = self.actor.caller(now_us);
        let (ident, perm) = (ident_text(&self.ident)?, permission_of(&self.permission)?);
        store.with_session(&self.session, now_us, |s| s.authorize(ident, &caller, perm))??;
        Ok(Answer::Done)
    }
}

/// The guard of a session-level operation (information, diagnostics,
/// export, audit log, deletion), see [`Session::authorize_session`](crate::session::Session::authorize_session): `:ok`,
/// or `{:error, :access_denied}` (audited) for anyone but the session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclAuthorizeSession {
    pub session: String,
    pub permission: Value,
    #[serde(default)]
    pub principal: Option<String>,
}

impl Operation for AclAuthorizeSession {
    const NAME: &'static str = "acl_authorize_session";
    const WRITES: bool = true;
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let perm = permission_of(&self.permission)?;
        let principal = self.principal.as_deref();
        store.with_session(&self.session, now_us, |s| {
            s.authorize_session(principal, perm, now_us)
        })??;
        Ok(Answer::Done)
    }
}

/// `{:ok, [entry]}` newest first, see [`super::reply::AUDIT_KEYS`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclAuditLog {
    pub session: String,
    #[serde(default)]
    pub limit: Option<u64>,
}

impl Operation for AclAuditLog {
    const NAME: &'static str = "acl_audit_log";
    const WRITES: bool = false;
    fn apply(self, store: &Store, now_us: i64) -> Result<Answer> {
        let limit = limit_of(self.limit);
        let entries = store.with_session(&self.session, now_us, |s| s.audit_log(limit))?;
        value(Value::List(entries.iter().map(audit_entry_value).collect()))
    }
}
