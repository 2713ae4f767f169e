"""Values on the wire (shared/wire/bridge_service.md).

A value is a ``google.protobuf.Any`` with ``type_url``
``type.googleapis.com/snakepit.<type>`` and the UTF-8 JSON of the value
(non-finite floats as ``"NaN"``, ``"Infinity"``, ``"-Infinity"``).

Embeddings and tensors of at least :data:`BINARY_MIN` numbers travel in a
safe binary form: ``type_url`` ending in ``.binary``, the JSON holding only
``{"encoding": "raw-le", "dtype": ..., "shape": [...]}`` and the numbers as
raw little-endian bytes beside it. Never a pickle: a pickle is code."""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from google.protobuf import any_pb2

try:  # numpy is optional
    import numpy as _np
except ImportError:  # pragma: no cover - exercised where numpy is absent
    _np = None

PREFIX = "type.googleapis.com/snakepit."
BINARY_MIN = 16
_DTYPES = {"float64": "d", "float32": "f", "int64": "q", "int32": "i", "int16": "h",
           "int8": "b", "uint8": "B"}
_SIZES = {"float64": 8, "float32": 4, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1}


@dataclass
class Tensor:
    """A tensor value: ``shape`` and flat row-major ``data`` (or a numpy array
    via :meth:`to_numpy`)."""

    shape: List[int]
    data: Sequence[float]

    def to_numpy(self):
        if _np is None:
            raise ImportError("numpy is not installed")
        return _np.asarray(self.data, dtype=_np.float64).reshape(self.shape)


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    return x


def _plain(value):
    """numpy and Tensor values as JSON-able data."""
    if _np is not None and isinstance(value, _np.ndarray):
        if value.ndim == 1:
            return [float(x) for x in value.tolist()]
        return {"shape": list(value.shape), "data": [float(x) for x in value.ravel().tolist()]}
    if isinstance(value, Tensor):
        return {"shape": list(value.shape), "data": list(value.data)}
    if _np is not None and isinstance(value, _np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_finite(_plain(v)) for v in value]
    if isinstance(value, dict):
        return {str(k): _finite(_plain(v)) for k, v in value.items()}
    return _finite(value)


def _numbers_of(value) -> Optional[Tuple[List[int], Any, str]]:
    """(shape, flat data, dtype) of an embedding/tensor value, if numeric."""
    if _np is not None and isinstance(value, _np.ndarray):
        dtype = str(value.dtype)
        if dtype not in _DTYPES:
            value, dtype = value.astype(_np.float64), "float64"
        return list(value.shape), value, dtype
    plain = _plain(value)
    if isinstance(plain, dict) and "shape" in plain and "data" in plain:
        shape, data = plain["shape"], plain["data"]
    elif isinstance(plain, list):
        shape, data = [len(plain)], plain
    else:
        return None
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in data):
        return None
    return list(shape), data, "float64"


def encode(type_name: str, value: Any, binary: bool = True) -> Tuple[any_pb2.Any, bytes]:
    """A value as ``(Any, binary_value)``."""
    if binary and type_name in ("embedding", "tensor"):
        nums = _numbers_of(value)
        if nums is not None:
            shape, data, dtype = nums
            count = 1
            for d in shape:
                count *= d
            if count >= BINARY_MIN:
                if _np is not None and isinstance(data, _np.ndarray):
                    raw = data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes()
                else:
                    raw = struct.pack("<%d%s" % (count, _DTYPES[dtype]), *[float(x) for x in data])
                header = {"encoding": "raw-le", "dtype": dtype, "shape": shape}
                return (any_pb2.Any(type_url=f"{PREFIX}{type_name}.binary",
                                    value=json.dumps(header).encode()), raw)
    text = json.dumps(_plain(value), allow_nan=False)
    return any_pb2.Any(type_url=PREFIX + type_name, value=text.encode()), b""


def _unfinite(x):
    if x == "NaN":
        return math.nan
    if x == "Infinity":
        return math.inf
    if x == "-Infinity":
        return -math.inf
    return x


def decode(any_value: any_pb2.Any, binary_value: bytes = b"", numpy: bool = False) -> Any:
    """An ``Any`` (and binary bytes) as a Python value. Tensors come back as
    ``{"shape": [...], "data": [...]}`` (or numpy arrays with ``numpy=True``)."""
    url = any_value.type_url or ""
    kind = url.rsplit("/", 1)[-1]
    if not any_value.value and not url:
        return None
    header = json.loads(any_value.value.decode() or "null")
    if kind.endswith(".binary"):
        type_name = kind.split(".")[1]
        if not isinstance(header, dict) or header.get("encoding") != "raw-le":
            raise ValueError("refusing a binary value that is not raw-le (never unpickled)")
        dtype, shape = header["dtype"], list(header["shape"])
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}")
        count = len(binary_value) // _SIZES[dtype]
        if numpy and _np is not None:
            arr = _np.frombuffer(binary_value, dtype=_np.dtype(dtype).newbyteorder("<"))
            return arr.reshape(shape) if type_name == "tensor" else arr
        data = list(struct.unpack("<%d%s" % (count, _DTYPES[dtype]), binary_value))
        return data if type_name == "embedding" else {"shape": shape, "data": data}
    type_name = kind.split(".")[-1]
    if type_name in ("float", "embedding", "tensor"):
        if isinstance(header, list):
            header = [_unfinite(x) for x in header]
        elif isinstance(header, dict) and isinstance(header.get("data"), list):
            header = dict(header, data=[_unfinite(x) for x in header["data"]])
        else:
            header = _unfinite(header)
    if numpy and _np is not None and type_name in ("embedding", "tensor"):
        if isinstance(header, list):
            return _np.asarray(header, dtype=_np.float64)
        return _np.asarray(header["data"], dtype=_np.float64).reshape(header["shape"])
    return header


def infer_type(value: Any) -> str:
    """The wire type of a Python value, for ``register_variable`` without a type."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Tensor) or (isinstance(value, dict) and "shape" in value):
        return "tensor"
    if _np is not None and isinstance(value, _np.ndarray):
        return "embedding" if value.ndim == 1 else "tensor"
    if isinstance(value, (list, tuple)):
        return "embedding"
    raise TypeError(f"cannot infer a variable type for {type(value).__name__}; pass type=")
