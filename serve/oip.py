"""Open Inference Protocol (KServe v2) tensor codec, shared by the HTTP and gRPC doors.

Wire formats handled here:
- raw bytes (HTTP binary tensor extension, gRPC ``raw_input_contents``): flattened
  row-major little-endian elements; BYTES elements are each a 4-byte little-endian
  length followed by that many bytes.
- JSON ``data`` (HTTP): a flat or nested list of numbers; for BYTES, a list of
  strings, each the **base64** of one encoded image (JSON has no bytes type; the
  binary extension is the efficient way).
"""

from __future__ import annotations

import base64
import binascii
import struct

import numpy as np

from bdserve.serve.errors import InvalidInput

NUMPY_DTYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
KNOWN_DATATYPES = set(NUMPY_DTYPES) | {"BYTES", "BF16"}
MAX_RANK = 8


def check_shape(shape) -> list[int]:
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f"shape must be a list of integers, got {shape!r}")
    if len(shape) == 0 or len(shape) > MAX_RANK:
        raise InvalidInput(f"shape must have rank 1..{MAX_RANK}, got {list(shape)}")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"shape must not have negative dimensions, got {list(shape)}")
    return [int(d) for d in shape]


def check_datatype(datatype) -> str:
    if datatype not in KNOWN_DATATYPES:
        raise InvalidInput(f"unknown datatype {datatype!r}; the protocol's are {', '.join(sorted(KNOWN_DATATYPES))}")
    return datatype


def _count(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def unpack_bytes(buf: bytes | memoryview, expected: int | None = None) -> list[bytes]:
    """Length-prefixed BYTES elements -> list of bytes; raises on a malformed buffer."""
    buf = memoryview(buf)
    out, pos = [], 0
    while pos < len(buf):
        if pos + 4 > len(buf):
            raise InvalidInput(f"malformed BYTES tensor: {len(buf) - pos} stray bytes where a 4-byte length was expected")
        (n,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if pos + n > len(buf):
            raise InvalidInput(f"malformed BYTES tensor: element {len(out)} declares {n} bytes, only {len(buf) - pos} left")
        out.append(bytes(buf[pos:pos + n]))
        pos += n
    if expected is not None and len(out) != expected:
        raise InvalidInput(f"shape says {expected} elements, the BYTES data holds {len(out)}")
    return out


def pack_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def from_raw(datatype: str, shape: list[int], raw: bytes | memoryview) -> np.ndarray | list[bytes]:
    """Raw tensor contents -> numpy array of ``shape`` (or a list of bytes for BYTES)."""
    n = _count(shape)
    if datatype == "BYTES":
        return unpack_bytes(raw, n)
    if datatype not in NUMPY_DTYPES:
        raise InvalidInput(f"datatype {datatype} is not supported here")
    dt = np.dtype(NUMPY_DTYPES[datatype]).newbyteorder("<")
    if len(raw) != n * dt.itemsize:
        raise InvalidInput(f"shape {shape} of {datatype} needs {n * dt.itemsize} bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype=dt).astype(dt.newbyteorder("="), copy=False).reshape(shape)


def from_json(datatype: str, shape: list[int], data) -> np.ndarray | list[bytes]:
    """JSON ``data`` (flat or nested) -> numpy array of ``shape`` (or list of bytes for BYTES)."""
    n = _count(shape)
    if not isinstance(data, list):
        raise InvalidInput("input 'data' must be a JSON list")
    if datatype == "BYTES":
        flat = _flatten(data)
        if len(flat) != n:
            raise InvalidInput(f"shape {shape} needs {n} elements, 'data' holds {len(flat)}")
        out = []
        for i, s in enumerate(flat):
            if not isinstance(s, str):
                raise InvalidInput(f"BYTES element {i} must be a base64 string in JSON")
            try:
                out.append(base64.b64decode(s, validate=True))
            except (binascii.Error, ValueError):
                raise InvalidInput(f"BYTES element {i} is not valid base64") from None
        return out
    if datatype not in NUMPY_DTYPES:
        raise InvalidInput(f"datatype {datatype} is not supported here")
    try:
        arr = np.asarray(data, dtype=np.float64 if datatype.startswith("FP") else None)
    except (ValueError, TypeError):
        raise InvalidInput("input 'data' is not a rectangular list of numbers") from None
    if arr.dtype == object or (arr.size and arr.dtype.kind not in "biuf"):
        raise InvalidInput("input 'data' must hold numbers only")
    if arr.size != n:
        raise InvalidInput(f"shape {shape} needs {n} elements, 'data' holds {arr.size}")
    target = NUMPY_DTYPES[datatype]
    if np.issubdtype(target, np.integer) and arr.size:
        info = np.iinfo(target)
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise InvalidInput("input contains NaN or Inf")
        if arr.min() < info.min or arr.max() > info.max:
            raise InvalidInput(f"values out of range for {datatype} ({info.min}..{info.max})")
        if arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)):
            raise InvalidInput(f"{datatype} input holds non-integer values (send FP32 for values in [0, 1])")
    return arr.astype(target).reshape(shape)


def _flatten(data) -> list:
    out = []
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            out.append(v)
        else:
            stack.pop()
    return out


def raw_of(datatype: str, value) -> bytes:
    """Output tensor -> raw bytes (the inverse of ``from_raw``)."""
    if datatype == "BYTES":
        return pack_bytes([v if isinstance(v, bytes) else str(v).encode() for v in value])
    return np.ascontiguousarray(value, dtype=np.dtype(NUMPY_DTYPES[datatype]).newbyteorder("<")).tobytes()


def json_of(datatype: str, value) -> list:
    if datatype == "BYTES":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in value]
    return np.asarray(value).reshape(-1).tolist()


def prediction_outputs(pred, detect: bool) -> list[tuple[str, str, list[int], object]]:
    """(name, datatype, shape, value) for every output a prediction has."""
    b, c = pred.probs.shape
    outs = [
        ("probabilities", "FP32", [b, c], pred.probs),
        ("label", "BYTES", [b], [s.encode() for s in pred.labels]),
    ]
    if detect and pred.suspected is not None:
        outs.append(("suspected_trigger", "BOOL", [b], pred.suspected.astype(np.bool_)))
    return outs
