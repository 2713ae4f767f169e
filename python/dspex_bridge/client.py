"""SessionContext: a session of dspex_bridge seen from Python."""
from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import grpc

from . import values
from .errors import (BatchError, BridgeError, from_reason, from_rpc_error)
from ._proto import bridge_service_pb2 as pb
from ._proto import bridge_service_pb2_grpc as pb_grpc

__all__ = ["SessionContext", "VariableUpdate", "Optimization", "Watch", "connect"]

_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    # After the gateway restarts (kill -9: back in ~100 ms), reconnect as soon
    # as it listens: grpc's defaults wait 1 s after a drop, and up to 120 s
    # after a long outage; the gateway's own restart backoff stops at 5 s.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]


def connect(address: str, *, tls: bool = False, root_certificates: Optional[bytes] = None,
            server_name: Optional[str] = None) -> grpc.Channel:
    """A channel to a bridge at ``host:port``; ``tls=True`` (or root
    certificates) for a TLS server."""
    options = list(_OPTIONS)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    if tls or root_certificates:
        creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        return grpc.secure_channel(address, creds, options=options)
    return grpc.insecure_channel(address, options=options)


@dataclass
class VariableUpdate:
    """One update of a watched variable."""

    name: str
    id: str
    value: Any
    version: Optional[int]
    update_type: str
    metadata: Dict[str, str] = field(default_factory=dict)


@dataclass
class Optimization:
    """A running optimization: the lock's owner id and fencing token."""

    variable: str
    optimizer_id: str
    lock_token: int


class Watch:
    """An iterator of :class:`VariableUpdate`; ends when the server ends the
    stream (session deleted, variables deleted) or on :meth:`cancel`."""

    def __init__(self, ctx: "SessionContext", call):
        self._ctx = ctx
        self._call = call

    def __iter__(self) -> Iterator[VariableUpdate]:
        try:
            for msg in self._call:
                update = self._ctx._update_of(msg)
                yield update
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.CANCELLED:
                return
            raise from_rpc_error(err) from None
        finally:
            self._ctx._forget_watched()

    def cancel(self) -> None:
        """Ends the stream."""
        self._call.cancel()

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()


class _Attrs:
    """``ctx.v.name`` and ``ctx.v.name = value``."""

    def __init__(self, ctx: "SessionContext"):
        object.__setattr__(self, "_ctx", ctx)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._ctx.get_variable(name)
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self._ctx.update_variable(name, value)


class _Batch:
    def __init__(self):
        self.updates: Dict[str, Any] = {}

    def __setitem__(self, name: str, value: Any) -> None:
        self.updates[name] = value

    set = __setitem__


class SessionContext:
    """A session of typed, versioned variables shared with the Elixir side.

    >>> ctx = SessionContext("127.0.0.1:50051", "tuning-1", token=token)  # doctest: +SKIP
    >>> ctx.register_variable("temperature", "float", 0.7, constraints={"min": 0, "max": 2})
    >>> ctx["temperature"] = 0.9
    >>> ctx.v.temperature
    0.9

    ``channel_or_address`` is a ``grpc.Channel`` or ``"host:port"``; ``token``
    the bearer token from ``DSPex.Bridge.Gateway.issue_token``; ``traceparent``
    a W3C trace context sent with every call (see :meth:`with_traceparent`).
    ``create=True`` initializes the session (creating it if it does not
    exist). Errors raise the typed exceptions of :mod:`dspex_bridge.errors`.
    Thread-safe: share one context between threads.
    """

    def __init__(self, channel_or_address: Union[str, grpc.Channel], session_id: str,
                 token: Optional[str] = None, *, traceparent: Optional[str] = None,
                 tls: bool = False, root_certificates: Optional[bytes] = None,
                 server_name: Optional[str] = None, timeout: float = 30.0,
                 create: bool = True, numpy: bool = False, binary: bool = True):
        if isinstance(channel_or_address, str):
            self._channel = connect(channel_or_address, tls=tls,
                                    root_certificates=root_certificates, server_name=server_name)
            self._own_channel = True
        else:
            self._channel = channel_or_address
            self._own_channel = False
        self.session_id = session_id
        self._token = token
        self._traceparent = traceparent
        self._timeout = timeout
        self._numpy = numpy
        self._binary = binary
        self._stub = pb_grpc.BridgeServiceStub(self._channel)
        self._locks: Dict[str, Optimization] = {}
        self._lock = threading.Lock()
        self._types: Dict[str, str] = {}
        self._cache: Dict[str, Tuple[int, Any]] = {}
        self._watched: set = set()
        self.v = _Attrs(self)
        if create:
            self.initialize()

    # ------------------------------------------------------------ plumbing

    def _metadata(self, names: Iterable[str] = ()) -> List[Tuple[str, str]]:
        md = []
        if self._token:
            md.append(("authorization", f"Bearer {self._token}"))
        if self._binary:
            md.append(("x-dspex-binary", "raw-le"))
        if self._traceparent:
            md.append(("traceparent", self._traceparent))
        for name in names:
            opt = self._locks.get(name)
            if opt is not None:
                md.append(("x-dspex-lock-token", str(opt.lock_token)))
                md.append(("x-dspex-optimizer-id", opt.optimizer_id))
                break
        return md

    def _call(self, method: str, request, names: Iterable[str] = ()):
        try:
            return getattr(self._stub, method)(request, timeout=self._timeout,
                                               metadata=self._metadata(names))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    @staticmethod
    def _check(resp) -> None:
        if not resp.success:
            raise from_reason(resp.error_message or "error")

    def _value(self, var) -> Any:
        return values.decode(var.value, var.binary_value, numpy=self._numpy)

    def _info(self, var) -> Dict[str, Any]:
        return {
            "id": var.id, "name": var.name, "type": var.type, "value": self._value(var),
            "version": var.version,
            "constraints": json.loads(var.constraints_json) if var.constraints_json else {},
            "metadata": dict(var.metadata),
            "access_rules": json.loads(var.access_control_json) if var.access_control_json else [],
            "source": "python" if var.source == pb.Variable.PYTHON else "elixir",
            "updated_at": var.last_updated_at.ToDatetime() if var.HasField("last_updated_at") else None,
        }

    def _type_of(self, name: str) -> str:
        t = self._types.get(name)
        if t is None:
            t = self.get_variable_info(name)["type"]
        return t

    def with_traceparent(self, traceparent: Optional[str]) -> "SessionContext":
        """Sets the W3C ``traceparent`` sent with every following call; the
        server adds it to the telemetry of the operations the call causes."""
        self._traceparent = traceparent
        return self

    def close(self) -> None:
        """Closes the channel (if this context opened it)."""
        if self._own_channel:
            self._channel.close()

    def __enter__(self) -> "SessionContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ session

    def initialize(self, metadata: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
        """Creates the session if needed; returns its variables' values by name."""
        resp = self._call("InitializeSession", pb.InitializeSessionRequest(
            session_id=self.session_id, metadata=dict(metadata or {})))
        self._check(resp)
        out = {}
        for name, var in resp.initial_variables.items():
            self._types[name] = var.type
            out[name] = self._value(var)
        return out

    def cleanup(self, force: bool = False) -> int:
        """Deletes the session; returns how many variables it had."""
        resp = self._call("CleanupSession", pb.CleanupSessionRequest(session_id=self.session_id,
                                                                      force=force))
        if not resp.success:
            raise from_reason("session_not_found: cleanup refused")
        return resp.resources_cleaned

    def ping(self, message: str = "ping") -> str:
        """Round trip to the server."""
        return self._call("Ping", pb.PingRequest(message=message)).message

    def heartbeat(self) -> bool:
        """Is the session still alive?"""
        return self._call("Heartbeat", pb.HeartbeatRequest(session_id=self.session_id)).session_valid

    def get_session(self) -> Dict[str, Any]:
        """Session information: id, metadata, created_at, variable_count."""
        r = self._call("GetSession", pb.GetSessionRequest(session_id=self.session_id))
        return {"session_id": r.session_id, "metadata": dict(r.metadata),
                "created_at": r.created_at.ToDatetime(), "variable_count": r.variable_count}

    # ------------------------------------------------------------ variables

    def register_variable(self, name: str, type: Optional[str] = None, initial_value: Any = None,
                          constraints: Optional[Mapping[str, Any]] = None,
                          metadata: Optional[Mapping[str, str]] = None) -> str:
        """Registers a variable; returns its id. ``type`` is one of float,
        integer, string, boolean, choice, module, embedding, tensor (inferred
        from the value when omitted)."""
        type = type or values.infer_type(initial_value)
        any_value, binary = values.encode(type, initial_value, self._binary)
        resp = self._call("RegisterVariable", pb.RegisterVariableRequest(
            session_id=self.session_id, name=name, type=type, initial_value=any_value,
            initial_binary_value=binary, constraints_json=json.dumps(dict(constraints or {})),
            metadata={"source": "python", **dict(metadata or {})}))
        if not resp.success:
            raise from_reason(resp.error_message)
        self._types[name] = type
        return resp.variable_id

    def get_variable(self, name: str, default: Any = ..., *, bypass_cache: bool = False) -> Any:
        """The value of a variable (from the watch-fed cache when the variable
        is watched). Raises :class:`VariableNotFoundError` unless ``default``
        is given."""
        if not bypass_cache and name in self._watched:
            with self._lock:
                hit = self._cache.get(name)
            if hit is not None:
                return hit[1]
        try:
            return self.get_variable_info(name)["value"]
        except KeyError:
            if default is ...:
                raise
            return default

    def get_variable_info(self, name: str) -> Dict[str, Any]:
        """The whole variable: id, name, type, value, version, constraints,
        metadata, access_rules, source, updated_at."""
        resp = self._call("GetVariable", pb.GetVariableRequest(session_id=self.session_id,
                                                                variable_identifier=name))
        info = self._info(resp.variable)
        self._types[name] = info["type"]
        return info

    def update_variable(self, name: str, value: Any, metadata: Optional[Mapping[str, str]] = None,
                        expected_version: Optional[int] = None) -> int:
        """Writes a variable; returns the new version. With
        ``expected_version`` the write happens only if the variable is at
        that version, else :class:`VersionMismatchError` (with
        ``current_version``). Writes to a variable this context optimizes
        carry its lock token."""
        any_value, binary = values.encode(self._type_of(name), value, self._binary)
        req = pb.SetVariableRequest(session_id=self.session_id, variable_identifier=name,
                                    value=any_value, binary_value=binary,
                                    metadata={"source": "python", **dict(metadata or {})})
        if expected_version is not None:
            req.expected_version = expected_version
            req.has_expected_version = True
        resp = self._call("SetVariable", req, names=[name])
        self._check(resp)
        return resp.new_version

    set_variable = update_variable

    def list_variables(self, pattern: Optional[str] = None) -> List[Dict[str, Any]]:
        """Variables of the session (``pattern``: an anchored glob)."""
        resp = self._call("ListVariables", pb.ListVariablesRequest(session_id=self.session_id,
                                                                    pattern=pattern or ""))
        return [self._info(v) for v in resp.variables]

    def delete_variable(self, name: str) -> None:
        """Deletes a variable (and its dependency edges)."""
        resp = self._call("DeleteVariable", pb.DeleteVariableRequest(
            session_id=self.session_id, variable_identifier=name), names=[name])
        self._check(resp)
        self._types.pop(name, None)

    def get_variables(self, names: Sequence[str]) -> Dict[str, Any]:
        """Values of several variables; missing ones are left out."""
        resp = self._call("GetVariables", pb.BatchGetVariablesRequest(
            session_id=self.session_id, variable_identifiers=list(names)))
        return {k: self._value(v) for k, v in resp.variables.items()}

    def update_variables(self, updates: Mapping[str, Any], atomic: bool = False,
                         metadata: Optional[Mapping[str, str]] = None) -> Dict[str, int]:
        """Writes several variables; returns their new versions. With
        ``atomic=True`` all or none are written. Any failure raises
        :class:`BatchError` (``errors``: name -> exception; ``new_versions``:
        what was written)."""
        req = pb.BatchSetVariablesRequest(session_id=self.session_id, atomic=atomic,
                                          metadata={"source": "python", **dict(metadata or {})})
        for name, value in updates.items():
            any_value, binary = values.encode(self._type_of(name), value, self._binary)
            req.updates[name].CopyFrom(any_value)
            if binary:
                req.binary_updates[name] = binary
        resp = self._call("SetVariables", req, names=list(updates))
        if resp.errors or not resp.success:
            raise BatchError({k: from_reason(v) for k, v in resp.errors.items()},
                             dict(resp.new_versions), atomic)
        return dict(resp.new_versions)

    @contextmanager
    def batch(self, atomic: bool = True):
        """Collects writes and sends them at the end, as one atomic batch by
        default::

            with ctx.batch() as b:
                b["temperature"] = 0.8
                b["max_tokens"] = 512
        """
        b = _Batch()
        yield b
        if b.updates:
            self.update_variables(b.updates, atomic=atomic)

    def __getitem__(self, name: str) -> Any:
        return self.get_variable(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.update_variable(name, value)

    def __delitem__(self, name: str) -> None:
        self.delete_variable(name)

    def __contains__(self, name: str) -> bool:
        try:
            self.get_variable_info(name)
            return True
        except KeyError:
            return False

    # ------------------------------------------------------------ stage 4

    def add_dependency(self, from_variable: str, to_variable: str,
                       dependency_type: str = "data") -> None:
        """``to_variable`` depends on ``from_variable``; :class:`CycleError`
        if that would make a cycle."""
        resp = self._call("AddDependency", pb.AddDependencyRequest(
            session_id=self.session_id, from_variable=from_variable, to_variable=to_variable,
            dependency_type=dependency_type))
        self._check(resp)

    def get_dependencies(self, name: str, transitive: bool = False) -> List[str]:
        """What ``name`` depends on (topological order)."""
        resp = self._call("GetDependencies", pb.GetDependenciesRequest(
            session_id=self.session_id, variable_identifier=name, transitive=transitive))
        self._check(resp)
        return list(resp.variables)

    def get_dependents(self, name: str, transitive: bool = False) -> List[str]:
        """What depends on ``name`` (topological order)."""
        resp = self._call("GetDependents", pb.GetDependentsRequest(
            session_id=self.session_id, variable_identifier=name, transitive=transitive))
        self._check(resp)
        return list(resp.variables)

    def start_optimization(self, name: str, optimizer_id: Optional[str] = None,
                           conflict_resolution: str = "abort", *, lease_ms: Optional[int] = None,
                           timeout_ms: Optional[int] = None) -> Optimization:
        """Takes the variable's optimizer lock; until :meth:`stop_optimization`
        this context's writes to it carry the lock token and others' are
        refused (:class:`LockedError`)."""
        config = {"conflict_resolution": conflict_resolution}
        if lease_ms:
            config["lease_ms"] = str(lease_ms)
        if timeout_ms:
            config["timeout_ms"] = str(timeout_ms)
        resp = self._call("StartOptimization", pb.StartOptimizationRequest(
            session_id=self.session_id, variable_identifier=name,
            optimizer_id=optimizer_id or "", optimizer_config=config))
        self._check(resp)
        opt = Optimization(name, resp.optimization_id, resp.lock_token)
        self._locks[name] = opt
        return opt

    def stop_optimization(self, name: str, force: bool = False) -> Any:
        """Releases the lock; returns the variable's final value."""
        resp = self._call("StopOptimization", pb.StopOptimizationRequest(
            session_id=self.session_id, variable_identifier=name, force=force), names=[name])
        self._locks.pop(name, None)
        if not resp.success:
            raise from_reason("not_optimizing: no optimization to stop")
        return values.decode(resp.final_value, numpy=self._numpy) if resp.HasField("final_value") else None

    def get_optimization_status(self, name: str) -> Dict[str, Any]:
        """``{"optimizing": bool, "optimizer_id", "started_at", "lock_token"}``."""
        resp = self._call("GetOptimizationStatus", pb.GetOptimizationStatusRequest(
            session_id=self.session_id, variable_identifier=name))
        self._check(resp)
        s = resp.status
        return {"optimizing": s.optimizing, "optimizer_id": s.optimizer_id or None,
                "started_at": s.started_at.ToDatetime() if s.optimizing else None,
                "lock_token": resp.lock_token or None}

    def get_variable_history(self, name: str, limit: int = 50) -> List[Dict[str, Any]]:
        """Previous versions, newest first: version, value, timestamp,
        changed_by, metadata."""
        resp = self._call("GetVariableHistory", pb.GetVariableHistoryRequest(
            session_id=self.session_id, variable_identifier=name, limit=limit))
        return [{"version": e.version, "value": values.decode(e.value, numpy=self._numpy),
                 "timestamp": e.timestamp.ToDatetime(), "changed_by": e.changed_by,
                 "metadata": dict(e.metadata)} for e in resp.entries]

    def rollback_variable(self, name: str, version: int) -> int:
        """Writes the value ``version`` had as a new version; returns it."""
        resp = self._call("RollbackVariable", pb.RollbackVariableRequest(
            session_id=self.session_id, variable_identifier=name, target_version=version),
            names=[name])
        self._check(resp)
        return resp.variable.version

    def set_variable_permissions(self, name: str, rules: Sequence[Mapping[str, Any]]) -> None:
        """Replaces the access rules: each ``{"session_pattern": "glob" or
        "*", "permissions": ["read", "write", "observe", "optimize"],
        "conditions": {...}}``. Only the owner may."""
        req = pb.SetVariablePermissionsRequest(session_id=self.session_id, variable_identifier=name)
        for r in rules:
            req.rules.add(session_pattern=r.get("session_pattern", "*"),
                          permissions=list(r.get("permissions", [])),
                          conditions={str(k): str(v) for k, v in dict(r.get("conditions", {})).items()})
        self._check(self._call("SetVariablePermissions", req))

    def check_variable_access(self, name: str, permission: str,
                              principal: Optional[str] = None) -> bool:
        """May ``principal`` (default: this context's) do ``permission``?"""
        resp = self._call("CheckVariableAccess", pb.CheckVariableAccessRequest(
            session_id=self.session_id, variable_identifier=name, principal=principal or "",
            permission=permission))
        if resp.error_message and not resp.allowed and not resp.error_message.startswith("access_denied"):
            raise from_reason(resp.error_message)
        return resp.allowed

    # ------------------------------------------------------------ watching

    def watch_variables(self, names: Sequence[str], include_initial_values: bool = False) -> Watch:
        """A :class:`Watch`: iterate it for :class:`VariableUpdate` s, in
        version order per variable; a slow reader gets the latest value
        (intermediate ones coalesced). While watched, :meth:`get_variable`
        answers from a cache the stream keeps current."""
        call = self._stub.WatchVariables(
            pb.WatchVariablesRequest(session_id=self.session_id, variable_identifiers=list(names),
                                     include_initial_values=include_initial_values),
            metadata=self._metadata())
        with self._lock:
            self._watched.update(names)
        return Watch(self, call)

    def _update_of(self, msg) -> VariableUpdate:
        var = msg.variable
        deleted = msg.update_type == "deleted"
        value = None if deleted else self._value(var)
        update = VariableUpdate(name=var.name, id=msg.variable_id, value=value,
                                version=None if deleted else var.version,
                                update_type=msg.update_type, metadata=dict(msg.update_metadata))
        with self._lock:
            if deleted:
                self._cache.pop(var.name, None)
            else:
                self._cache[var.name] = (var.version, value)
                self._types[var.name] = var.type
        return update

    def _forget_watched(self) -> None:
        with self._lock:
            self._watched.clear()
            self._cache.clear()
