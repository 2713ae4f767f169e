"""dspex_bridge: Python client of the dspex_bridge gRPC BridgeService.

>>> from dspex_bridge import SessionContext            # doctest: +SKIP
>>> ctx = SessionContext("127.0.0.1:50051", "s1", token=token)
"""
from .errors import (AccessDeniedError, AuthenticationError, BatchError, BridgeError, CycleError,
                     InvalidValueError, LockedError, RateLimitedError, SessionNotFoundError,
                     UnavailableError, VariableNotFoundError, VersionMismatchError)
from .values import Tensor

try:
    from .client import SessionContext, VariableUpdate, Optimization, Watch, connect
except ImportError as exc:  # stubs not generated yet
    if "_proto" not in str(exc):
        raise
    from ._generate import generate as _generate

    _generate()
    from .client import SessionContext, VariableUpdate, Optimization, Watch, connect

__all__ = ["SessionContext", "VariableUpdate", "Optimization", "Watch", "connect", "Tensor",
           "BridgeError", "VariableNotFoundError", "SessionNotFoundError", "VersionMismatchError",
           "AccessDeniedError", "CycleError", "LockedError", "RateLimitedError",
           "InvalidValueError", "AuthenticationError", "UnavailableError", "BatchError"]
