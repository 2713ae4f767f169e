"""Typed exceptions of the bridge, mapped from the server's answers.

The server names the reason at the start of ``error_message`` (and in the
``x-dspex-error`` trailer of a failed call): ``version_mismatch: current_version=3``,
``access_denied``, ``locked_by: opt-1``... :func:`from_reason` turns a name into
the exception class."""
from __future__ import annotations

import re
from typing import Optional

import grpc


class BridgeError(Exception):
    """Base of every error raised by the client. ``reason`` is the server's
    reason name (``"not_found"``, ``"access_denied"``...); ``code`` the gRPC
    status code when the call itself failed."""

    def __init__(self, message: str, reason: str = "error", code: Optional[grpc.StatusCode] = None):
        super().__init__(message)
        self.reason = reason
        self.code = code


class VariableNotFoundError(BridgeError, KeyError):
    """No such variable (or one the principal may not see listed)."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return Exception.__str__(self)


class SessionNotFoundError(BridgeError):
    """No such session (never created, deleted or expired)."""


class VersionMismatchError(BridgeError):
    """A write with ``expected_version`` found another version;
    ``current_version`` is the variable's version now."""

    def __init__(self, message: str, current_version: Optional[int] = None, **kw):
        super().__init__(message, **kw)
        self.current_version = current_version


class AccessDeniedError(BridgeError, PermissionError):
    """The ACL refused the principal (or the token does not cover the session)."""


class CycleError(BridgeError):
    """The dependency would create a cycle (or is a self-dependency)."""


class LockedError(BridgeError):
    """The variable is being optimized by someone else (``locked_by``), the
    caller's lock token is stale, or an optimization is already running."""


class RateLimitedError(BridgeError):
    """The session's rate limit refused the operation; retry later."""


class InvalidValueError(BridgeError, ValueError):
    """A value of the wrong type, a constraint violated, or a bad argument."""


class AuthenticationError(BridgeError):
    """Missing, unknown, expired or revoked token (UNAUTHENTICATED)."""


class UnavailableError(BridgeError):
    """The bridge is not reachable or restarted during the call (retry)."""


_BY_REASON = {
    "not_found": VariableNotFoundError,
    "session_not_found": SessionNotFoundError,
    "version_mismatch": VersionMismatchError,
    "access_denied": AccessDeniedError,
    "would_create_cycle": CycleError,
    "self_dependency": CycleError,
    "locked_by": LockedError,
    "stale_lock_token": LockedError,
    "already_optimizing": LockedError,
    "rate_limited": RateLimitedError,
    "invalid_value": InvalidValueError,
    "constraint_violation": InvalidValueError,
    "invalid_argument": InvalidValueError,
    "invalid_rules": InvalidValueError,
    "too_large": InvalidValueError,
    "unauthenticated": AuthenticationError,
    "backend_unavailable": UnavailableError,
}

_BY_CODE = {
    grpc.StatusCode.NOT_FOUND: VariableNotFoundError,
    grpc.StatusCode.PERMISSION_DENIED: AccessDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitedError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidValueError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
}


def reason_of(message: str) -> str:
    m = re.match(r"\s*([a-z_]+)", message or "")
    return m.group(1) if m else "error"


def from_reason(message: str, reason: Optional[str] = None, code=None) -> BridgeError:
    """The exception for a server answer."""
    reason = reason or reason_of(message)
    cls = _BY_REASON.get(reason) or _BY_CODE.get(code) or BridgeError
    if cls is VersionMismatchError:
        m = re.search(r"current_version=(\d+)", message or "")
        return VersionMismatchError(message, current_version=int(m.group(1)) if m else None,
                                    reason=reason, code=code)
    return cls(message, reason=reason, code=code)


def from_rpc_error(err: grpc.RpcError) -> BridgeError:
    """The exception for a failed call."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    reason = None
    for key, value in (err.trailing_metadata() or ()) if hasattr(err, "trailing_metadata") else ():
        if key == "x-dspex-error":
            reason = value
    if reason is None and code == grpc.StatusCode.NOT_FOUND and "session" in (details or ""):
        reason = "session_not_found"
    if reason in (None, "", "error"):
        reason = {grpc.StatusCode.NOT_FOUND: "not_found",
                  grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
                  grpc.StatusCode.UNAVAILABLE: "backend_unavailable"}.get(code, reason)
    return from_reason(details or "", reason, code)


class BatchError(BridgeError):
    """Some writes of a batch failed. ``errors``: name -> exception;
    ``new_versions``: name -> version of what was written (nothing when
    ``atomic``)."""

    def __init__(self, errors, new_versions, atomic: bool):
        super().__init__(f"batch update failed for {sorted(errors)}", reason="batch_failed")
        self.errors = errors
        self.new_versions = new_versions
        self.atomic = atomic
