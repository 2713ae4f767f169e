//! The one error type of the engine. Each variant maps to a matchable Elixir
//! reason: [`Error::kind`] is the atom, [`Error::detail`] the optional detail,
//! so the NIF and the port encode `{:error, kind}` or `{:error, {kind, detail}}`.

use thiserror::Error;

use crate::value::Value;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum Error {
    /// No session has this id (or it expired). `:session_not_found`
    #[error("session not found")]
    SessionNotFound,
    /// A session with this id, or a variable with this name, exists. `:already_exists`
    #[error("already exists")]
    AlreadyExists,
    /// No variable has this name or id. `:not_found`
    #[error("variable not found")]
    NotFound,
    /// The value does not have the variable's type and cannot be coerced.
    /// `{:invalid_value, detail}`
    #[error("invalid value: {0}")]
    InvalidValue(Value),
    /// The value has the right type but breaks a constraint.
    /// `{:constraint_violation, detail}`
    #[error("constraint violation: {0}")]
    ConstraintViolation(Value),
    /// `expected_version` did not match; carries the current version.
    /// `{:version_mismatch, current}`
    #[error("version mismatch, current version is {0}")]
    VersionMismatch(u64),
    /// Rollback to a version no longer (or never) in history. `:version_not_found`
    #[error("version not found")]
    VersionNotFound,
    /// An argument has the wrong shape or range. `{:invalid_argument, detail}`
    #[error("invalid argument: {0}")]
    InvalidArgument(Value),
    /// A value, name or snapshot is larger than the configured limit.
    /// `{:too_large, limit_in_bytes}`
    #[error("too large, the limit is {0} bytes")]
    TooLarge(usize),
    /// An import was handed bytes that are not a snapshot. `{:invalid_snapshot, reason}`
    #[error("invalid snapshot: {0}")]
    InvalidSnapshot(String),
    /// An atomic batch failed; carries `%{ident => reason}`. `{:validation_failed, errors}`
    #[error("batch failed: {0}")]
    ValidationFailed(Value),
    /// The principal may not do this. `:access_denied`
    #[error("access denied")]
    AccessDenied,
    /// Access rules that do not compile. `{:invalid_rules, detail}`, where
    /// detail is `:not_a_list`, `{:too_many_rules, max}`, `{:too_large, max}`
    /// or `{index, reason}` for the first bad rule (see `acl.rs`).
    #[error("invalid access rules: {0}")]
    InvalidRules(Value),
    /// Too many snapshot imports are running and waiting; try again later.
    /// `:busy`
    #[error("too many imports at once")]
    Busy,
    /// The session's token bucket is empty. `:rate_limited`
    #[error("rate limited")]
    RateLimited,
    /// The variable is locked by another optimizer. `{:locked_by, optimizer_id}`
    #[error("locked by optimizer {0}")]
    LockedBy(String),
    /// A write carried a fencing token older than the current lock's. `:stale_lock_token`
    #[error("stale lock token")]
    StaleLockToken,
    /// A variable named in an operation on other variables does not exist.
    /// `{:not_found, name}`
    #[error("variable {0} not found")]
    MissingVariable(Value),
    /// The edge would close a cycle; carries the offending path.
    /// `{:would_create_cycle, path}`
    #[error("would create a cycle: {0}")]
    WouldCreateCycle(Value),
    /// A variable cannot depend on itself. `:self_dependency`
    #[error("a variable cannot depend on itself")]
    SelfDependency,
    /// The lock is held by another optimizer. `{:lock_held_by, optimizer_id}`
    #[error("lock held by {0}")]
    LockHeldBy(String),
    /// Release or renew by someone who does not hold the lock. `:not_lock_owner`
    #[error("not the lock owner")]
    NotLockOwner,
    /// `stop_optimization` on a variable nobody optimizes. `:not_optimizing`
    #[error("not optimizing")]
    NotOptimizing,
    /// The variable is already being optimized; carries the status.
    /// `{:already_optimizing, status}`
    #[error("already optimizing: {0}")]
    AlreadyOptimizing(Value),
    /// A wait ran out of time. `:timeout`
    #[error("timed out")]
    Timeout,
    /// A request the protocol cannot decode or does not know.
    /// `{:bad_request, reason}`
    #[error("bad request: {0}")]
    BadRequest(String),
    /// An operation failed unexpectedly inside the engine (a bug); the
    /// request is answered and the engine carries on. `{:internal_error, detail}`
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The reason atom, as Elixir matches on it.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::SessionNotFound => "session_not_found",
            Error::AlreadyExists => "already_exists",
            Error::NotFound => "not_found",
            Error::InvalidValue(_) => "invalid_value",
            Error::ConstraintViolation(_) => "constraint_violation",
            Error::VersionMismatch(_) => "version_mismatch",
            Error::VersionNotFound => "version_not_found",
            Error::InvalidArgument(_) => "invalid_argument",
            Error::TooLarge(_) => "too_large",
            Error::InvalidSnapshot(_) => "invalid_snapshot",
            Error::ValidationFailed(_) => "validation_failed",
            Error::AccessDenied => "access_denied",
            Error::InvalidRules(_) => "invalid_rules",
            Error::RateLimited => "rate_limited",
            Error::Busy => "busy",
            Error::LockedBy(_) => "locked_by",
            Error::StaleLockToken => "stale_lock_token",
            Error::MissingVariable(_) => "not_found",
            Error::WouldCreateCycle(_) => "would_create_cycle",
            Error::SelfDependency => "self_dependency",
            Error::LockHeldBy(_) => "lock_held_by",
            Error::NotLockOwner => "not_lock_owner",
            Error::NotOptimizing => "not_optimizing",
            Error::AlreadyOptimizing(_) => "already_optimizing",
            Error::Timeout => "timeout",
            Error::BadRequest(_) => "bad_request",
            Error::Internal(_) => "internal_error",
        }
    }

    /// The detail that goes beside the kind, if any.
    pub fn detail(&self) -> Option<Value> {
        match self {
            Error::InvalidValue(d)
            | Error::ConstraintViolation(d)
            | Error::InvalidArgument(d)
            | Error::ValidationFailed(d)
            | Error::MissingVariable(d)
            | Error::WouldCreateCycle(d)
            | Error::AlreadyOptimizing(d)
            | Error::InvalidRules(d) => Some(d.clone()),
            Error::VersionMismatch(v) => Some(Value::Int(*v as i64)),
            Error::TooLarge(n) => Some(Value::Int(*n as i64)),
            Error::InvalidSnapshot(s)
            | Error::LockedBy(s)
            | Error::LockHeldBy(s)
            | Error::BadRequest(s)
            | Error::Internal(s) => Some(Value::str(s)),
            _ => None,
        }
    }

    /// The reason as a value: `kind` or `{kind, detail}`.
    pub fn to_value(&self) -> Value {
        match self.detail() {
            Some(d) => Value::tagged(self.kind(), d),
            None => Value::atom(self.kind()),
        }
    }

    /// `{:invalid_argument, what}`.
    pub fn invalid_arg(what: &str) -> Self {
        Error::InvalidArgument(Value::atom(what))
    }
}
