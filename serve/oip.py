"""Open Inference Protocol (KServe v2): the protocol-neutral request and response every door
translates to and from its wire format, and the tensor codec they share.

    wire --door--> InferRequest --InferenceService.infer--> InferResponse --door--> wire

The doors (http_app.py, grpc_server.py, torchserve_handler.py) only translate; the protocol's
names, the decoding of tensor contents, which outputs an answer holds and which parameters
and headers it carries all live here, and the evaluation client reads answers with the same
code. No torch here: the client imports this module.

How to add a field to every answer: a value per request (like ``defense``) is one
``ResponseParameter`` in ``RESPONSE_PARAMETERS``; a value per image (like
``suspected_trigger``) is one ``PerImageOutput`` in ``PER_IMAGE_OUTPUTS``. Each names the
Prediction attribute it reads; the doors, the metadata and the client pick it up from there.

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

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from bdserve.serve.errors import InvalidInput, shown

# ---------------------------------------------------------------- protocol names (the one place)
TENSOR_INPUT = "input"  # UINT8 (0..255) or FP32 ([0, 1]) [B, C, H, W]
IMAGE_INPUT = "image"  # BYTES [B, 1] (or [B]): encoded JPEG/PNG/WebP, one per row
OUTPUT_PROBS = "probabilities"
OUTPUT_LABEL = "label"
DEFENSE = "defense"  # request parameter (lab servers only) and response parameter
HEADER_LEN = "inference-header-content-length"  # HTTP binary tensor extension

NUMPY_DTYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
KNOWN_DATATYPES = set(NUMPY_DTYPES) | {"BYTES", "BF16"}
MAX_RANK = 8
MAX_DIM = 2 ** 31 - 1
MAX_ELEMENTS = 2 ** 32  # far past any body the server accepts; a bound so no count can overflow


def check_shape(shape) -> list[int]:
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f"shape must be a list of integers, got {shown(shape)}")
    if len(shape) == 0 or len(shape) > MAX_RANK:
        raise InvalidInput(f"shape must have rank 1..{MAX_RANK}, got {shown(list(shape))}")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"shape must not have negative dimensions, got {shown(list(shape))}")
    if any(d > MAX_DIM for d in shape) or _count(list(shape)) > MAX_ELEMENTS:
        raise InvalidInput(f"shape {shown(list(shape))} is too large: at most {MAX_DIM} per dimension and "
                           f"{MAX_ELEMENTS} elements")
    return [int(d) for d in shape]


def check_datatype(datatype) -> str:
    if not isinstance(datatype, str) or datatype not in KNOWN_DATATYPES:
        raise InvalidInput(f"unknown datatype {shown(datatype)}; the protocol's are {', '.join(sorted(KNOWN_DATATYPES))}")
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
        # No dtype given: strings, booleans in a number tensor and integers past 64 bits then
        # show up as the array's kind instead of being converted (or overflowing).
        arr = np.asarray(data)
    except (ValueError, TypeError, RecursionError):
        raise InvalidInput("input 'data' is not a rectangular list of numbers") from None
    allowed = "b" if datatype == "BOOL" else "iuf"
    if arr.size and arr.dtype.kind not in allowed:
        raise InvalidInput(f"input 'data' must hold {'booleans' if datatype == 'BOOL' else 'numbers'} only "
                           f"(JSON numbers within 64 bits for {datatype}, not strings or booleans)")
    if datatype.startswith("FP"):
        arr = arr.astype(np.float64)
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


# ---------------------------------------------------------------- typed contents (gRPC)
# datatype -> the InferTensorContents field that carries it
TYPED_CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "UINT8": "uint_contents",
                  "UINT16": "uint_contents", "UINT32": "uint_contents", "INT8": "int_contents",
                  "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
                  "UINT64": "uint64_contents", "BOOL": "bool_contents", "BYTES": "bytes_contents"}


def from_typed(datatype: str, shape: list[int], contents_field: Callable[[str], Sequence]) -> np.ndarray | list[bytes]:
    """Typed contents -> numpy array of ``shape`` (or list of bytes); ``contents_field(name)`` reads one field."""
    field_name = TYPED_CONTENTS.get(datatype)
    if field_name is None:
        raise InvalidInput(f"datatype {datatype} cannot be sent as typed contents; use raw_input_contents")
    values = contents_field(field_name)
    n = _count(shape)
    if len(values) != n:
        raise InvalidInput(f"shape {shape} needs {n} elements, contents.{field_name} holds {len(values)}")
    if datatype == "BYTES":
        return list(values)
    dtype = NUMPY_DTYPES[datatype]
    arr = np.asarray(values, dtype=np.float64 if datatype.startswith("FP") else np.int64)
    if np.issubdtype(dtype, np.integer) and arr.size:
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise InvalidInput(f"values out of range for {datatype} ({info.min}..{info.max})")
    return arr.astype(dtype).reshape(shape)


# ---------------------------------------------------------------- request and response


@dataclass
class Tensor:
    """One named tensor; ``binary`` is the HTTP door's choice of encoding (gRPC answers raw)."""

    name: str
    datatype: str
    shape: list[int]
    value: Any  # numpy array, or a list of bytes for BYTES
    binary: bool = False


CLASSIFICATION = "classification"  # Triton's classification extension: an output parameter


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None  # HTTP: parameters.binary_data; None: the request's default
    class_count: int = 0  # parameters.classification: top-k "score:index:label" instead of the tensor

    @classmethod
    def with_parameters(cls, name, binary, parameters: dict) -> "RequestedOutput":
        k = parameters.get(CLASSIFICATION, 0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InvalidInput(f"output {shown(name)}: parameters.{CLASSIFICATION} must be a non-negative integer, "
                               f"got {shown(k)}")
        return cls(name, binary, k)


@dataclass
class InferRequest:
    """What every door makes of a request (KServe's InferRequest, for one input tensor)."""

    model: str
    input: Tensor
    version: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[RequestedOutput] | None = None  # None: every output the model produces
    id: str | None = None
    binary_output: bool = False  # HTTP: parameters.binary_data_output

    @property
    def defense(self) -> str | None:
        spec = self.parameters.get(DEFENSE)
        if spec is not None and not isinstance(spec, str):
            raise InvalidInput(f"parameter {DEFENSE!r} must be a string, e.g. \"flip\"")
        return spec


def read_infer_request(model: str, version: str | None, doc, binary: bytes | memoryview = b"") -> InferRequest:
    """A decoded JSON request (+ the binary tensor extension's bytes after it) -> InferRequest.
    The one reader of OIP JSON requests: bdserve's HTTP door and the TorchServe handler's
    KServe v2 envelope both call it. The body is validated against serve/schemas.py first, so
    a wrong type anywhere is one InvalidInput naming the field."""
    from bdserve.serve import schemas  # pydantic: only where JSON bodies are read

    binary = memoryview(binary)
    req = schemas.parse_infer_request(doc)
    params = req.parameters.model_dump(exclude_none=True) if req.parameters else {}

    spec = req.inputs[0]
    datatype, shape = spec.datatype, check_shape(spec.shape)
    size = spec.parameters.binary_data_size if spec.parameters else None
    if size is not None:
        if size > len(binary):
            raise InvalidInput(f"malformed binary header: binary_data_size {size} but {len(binary)} binary bytes follow the JSON")
        value = from_raw(datatype, shape, binary[:size])
        binary = binary[size:]
    elif spec.data is not None:
        value = from_json(datatype, shape, spec.data)
    else:
        raise InvalidInput(f"input {shown(spec.name)} has neither 'data' nor parameters.binary_data_size")
    if len(binary):
        raise InvalidInput(f"malformed binary request: {len(binary)} bytes after the last binary input")

    outputs = None
    if req.outputs is not None:
        outputs = [RequestedOutput.with_parameters(o.name, o.parameters.binary_data if o.parameters else None,
                                                   o.parameters.model_dump(exclude_none=True) if o.parameters else {})
                   for o in req.outputs]
    return InferRequest(model=model, version=version, input=Tensor(spec.name, datatype, shape, value),
                        parameters=params, outputs=outputs, id=req.id,
                        binary_output=bool(params.get("binary_data_output", False)))


@dataclass
class InferResponse:
    """What every door renders (KServe's InferResponse); ``prediction`` stays for doors with their
    own body format (TorchServe-style /predictions)."""

    model_name: str
    model_version: str
    outputs: list[Tensor]
    parameters: dict[str, Any]
    id: str | None = None
    prediction: Any = None


@dataclass(frozen=True)
class ResponseParameter:
    """A value per request: OIP ``parameters[name]``, and header ``header`` on /predictions answers."""

    name: str
    header: str
    attribute: str  # of the Prediction; None there means "not in this answer"


@dataclass(frozen=True)
class PerImageOutput:
    """A value per image: the OIP output ``name``, a response parameter summarising the request
    (``summary``, or none), and header ``header`` on the single-image /predictions answers."""

    name: str
    datatype: str  # BOOL, FP32, INT64 or BYTES
    header: str
    attribute: str  # of the Prediction: an array (B,), or None when the model does not produce it
    produced_by: Callable[[Any], bool]  # model -> whether its metadata lists this output
    summary: Callable[[np.ndarray], Any] | None = None


RESPONSE_PARAMETERS: tuple[ResponseParameter, ...] = (
    ResponseParameter(DEFENSE, "X-Bdserve-Defense", "defense"),
    ResponseParameter("fit", "X-Bdserve-Fit", "fit"),  # encoded images only: the server's fit, or its fallback
)
# The trigger detectors a server may run (bdserve.transforms.detectors.DETECTORS; a test keeps them equal).
TRIGGER_DETECTORS = ("consistency", "strip", "scaleup")

PER_IMAGE_OUTPUTS: tuple[PerImageOutput, ...] = (
    PerImageOutput("suspected_trigger", "BOOL", "X-Bdserve-Suspected-Trigger", "suspected",
                   produced_by=lambda model: model.detect, summary=lambda v: bool(np.any(v))),
    # The margin over the calibrated threshold (> 0: suspected), the largest of the detectors'.
    PerImageOutput("trigger_score", "FP32", "X-Bdserve-Trigger-Score", "trigger_score",
                   produced_by=lambda model: model.detect, summary=lambda v: float(np.max(v))),
    *(PerImageOutput(f"trigger_score_{m}", "FP32", f"X-Bdserve-Trigger-Score-{m.capitalize()}", f"trigger_score_{m}",
                     produced_by=lambda model, m=m: m in model.detect_methods) for m in TRIGGER_DETECTORS),
)
_PER_IMAGE = {o.name: o for o in PER_IMAGE_OUTPUTS}


def model_outputs(model) -> list[dict]:
    """The outputs a model's metadata advertises."""
    outs = [{"name": OUTPUT_PROBS, "datatype": "FP32", "shape": [-1, len(model.classes)]},
            {"name": OUTPUT_LABEL, "datatype": "BYTES", "shape": [-1]}]
    return outs + [{"name": o.name, "datatype": o.datatype, "shape": [-1]} for o in PER_IMAGE_OUTPUTS
                   if o.produced_by(model)]


def model_inputs(model) -> list[dict]:
    c, (h, w) = model.channels, model.input_size
    # Send exactly one of these per request; "input" also accepts UINT8 (0..255).
    return [{"name": TENSOR_INPUT, "datatype": "FP32", "shape": [-1, c, h, w]},
            # [-1, 1], as Triton writes a batched input of dims [1]: perf_analyzer and tritonclient
            # build requests from this shape; [B] is accepted as well.
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1, 1]}]


def _config_tensor(t: dict, batched: bool) -> dict:
    dims = t["shape"][1:] if batched else t["shape"]
    return {"name": t["name"], "data_type": "TYPE_STRING" if t["datatype"] == "BYTES" else f"TYPE_{t['datatype']}",
            "dims": dims or [1]}


def model_config(model, max_batch_size: int) -> dict:
    """Triton's model configuration (``GET /v2/models/{m}/config``, gRPC ModelConfig), which
    perf_analyzer and tritonclient read: dims leave out the batch dimension."""
    inputs = [_config_tensor(t, True) for t in model_inputs(model)]
    inputs[0]["format"] = "FORMAT_NCHW"
    for t in inputs:
        t["optional"] = True  # send exactly one of the two
    return {"name": model.name, "platform": model.runtime.platform, "backend": model.backend,
            "max_batch_size": max_batch_size, "input": inputs,
            "output": [_config_tensor(t, True) for t in model_outputs(model)]}


def prediction_outputs(pred) -> dict[str, Tensor]:
    """Every output a prediction has, by name."""
    b, c = pred.probs.shape
    outs = [Tensor(OUTPUT_PROBS, "FP32", [b, c], pred.probs),
            Tensor(OUTPUT_LABEL, "BYTES", [b], [s.encode() for s in pred.labels])]
    for o in PER_IMAGE_OUTPUTS:
        v = getattr(pred, o.attribute)
        if v is not None:
            outs.append(Tensor(o.name, o.datatype, [b], np.asarray(v).astype(NUMPY_DTYPES.get(o.datatype, object))))
    return {t.name: t for t in outs}


def response_parameters(pred) -> dict[str, Any]:
    params = {}
    for p in RESPONSE_PARAMETERS:
        v = getattr(pred, p.attribute)
        if v is not None:
            params[p.name] = v
    for o in PER_IMAGE_OUTPUTS:
        v = getattr(pred, o.attribute)
        if v is not None and o.summary is not None:
            params[o.name] = o.summary(v)
    return params


def check_outputs(request: InferRequest, model) -> None:
    """Unknown requested outputs are refused before any work is done."""
    if request.outputs is None:
        return
    known = {o["name"]: o["datatype"] for o in model_outputs(model)}
    for o in request.outputs:
        if o.name not in known:
            raise InvalidInput(f"unknown output {shown(o.name)}; this model produces {', '.join(known)}")
        if o.class_count and known[o.name] != "FP32":
            raise InvalidInput(f"output {o.name!r} is {known[o.name]}: {CLASSIFICATION} applies to the FP32 "
                               f"output {OUTPUT_PROBS!r}")


def infer_response(request: InferRequest, model, pred) -> InferResponse:
    """The answer to ``request``: the outputs it asked for (all by default), in its order."""
    produced = prediction_outputs(pred)
    if request.outputs is None:
        outputs = [_with_binary(t, request.binary_output) for t in produced.values()]
    else:
        outputs = []
        for o in request.outputs:
            if o.name not in produced:
                raise InvalidInput(f"unknown output {shown(o.name)}; this model produces {', '.join(produced)}")
            t = produced[o.name] if not o.class_count else classification(produced[o.name], o.class_count, model.classes)
            outputs.append(_with_binary(t, request.binary_output if o.binary is None else o.binary))
    return InferResponse(model.name, model.version, outputs, response_parameters(pred), request.id, pred)


def classification(t: Tensor, k: int, classes: list[str]) -> Tensor:
    """Triton's classification extension: the top ``k`` of each row as BYTES "score:index:label"."""
    scores = np.asarray(t.value, dtype=np.float32).reshape(t.shape[0], -1)
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    rows = [[f"{scores[b, i]:f}:{i}:{classes[i] if i < len(classes) else ''}".encode() for i in top[b]]
            for b in range(scores.shape[0])]
    return Tensor(t.name, "BYTES", [scores.shape[0], k], [v for row in rows for v in row])


def read_classification(values: list[bytes], shape: list[int]) -> list[list[tuple[float, int, str]]]:
    """The client's side of ``classification``: per image, its top k as (score, index, label)."""
    k = shape[-1] if len(shape) > 1 else len(values)
    rows = []
    for entry in values:
        score, index, label = (entry.decode() if isinstance(entry, bytes) else str(entry)).split(":", 2)
        rows.append((float(score), int(index), label))
    return [rows[i:i + k] for i in range(0, len(rows), max(1, k))]


def _with_binary(t: Tensor, binary: bool) -> Tensor:
    return Tensor(t.name, t.datatype, t.shape, t.value, bool(binary))


# ---------------------------------------------------------------- headers (/predictions, TorchServe)


def _header_text(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    return str(v.item() if isinstance(v, np.generic) else v)


def prediction_headers(pred, index: int) -> dict[str, str]:
    """The headers of the single-image answer for image ``index`` of a prediction."""
    out = {}
    for p in RESPONSE_PARAMETERS:
        v = getattr(pred, p.attribute)
        if v is not None:
            out[p.header] = _header_text(v)
    for o in PER_IMAGE_OUTPUTS:
        v = getattr(pred, o.attribute)
        if v is not None:
            out[o.header] = _header_text(v[index])
    return out


def parameter_headers(parameters: dict[str, Any]) -> dict[str, str]:
    """A response's parameters as the headers /predictions answers use (for a door whose body
    has no room for them: TorchServe's KServe v2 envelope)."""
    out = {}
    for p in RESPONSE_PARAMETERS:
        if parameters.get(p.name) is not None:
            out[p.header] = _header_text(parameters[p.name])
    for o in PER_IMAGE_OUTPUTS:
        if o.summary is not None and parameters.get(o.name) is not None:
            out[o.header] = _header_text(parameters[o.name])
    return out


def read_headers(headers) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The client's side of ``prediction_headers``: (parameters, per-image outputs of one image)."""
    params, per_image = {}, {}
    for p in RESPONSE_PARAMETERS:
        if headers.get(p.header) is not None:
            params[p.name] = headers.get(p.header)
    for o in PER_IMAGE_OUTPUTS:
        text = headers.get(o.header)
        if text is not None:
            v = (text == "true") if o.datatype == "BOOL" else text.encode() if o.datatype == "BYTES" else float(text)
            per_image[o.name] = np.asarray([v], dtype=NUMPY_DTYPES.get(o.datatype, object))
    return params, per_image


def per_image_output_names(advertised: list[str]) -> list[str]:
    """Of the outputs a model's metadata lists, those that are per-image fields (for a client to ask for)."""
    return [n for n in advertised if n in _PER_IMAGE]


# ---------------------------------------------------------------- parameters as typed values


def read_parameter(p):
    """A gRPC InferParameter -> its Python value (None when unset)."""
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def parameter_value(v) -> tuple[str, Any]:
    """A Python parameter value -> (gRPC InferParameter field, value)."""
    if isinstance(v, (bool, np.bool_)):
        return "bool_param", bool(v)
    if isinstance(v, (int, np.integer)):
        return "int64_param", int(v)
    if isinstance(v, (float, np.floating)):
        # KServe's InferParameter has no double (Triton's has): a float travels as its shortest repr.
        return "string_param", repr(float(v))
    return "string_param", str(v)


# ---------------------------------------------------------------- reading answers (the client)


def read_output(datatype: str, shape: list[int], raw=None, data=None):
    """An answer's output tensor: raw bytes (binary / gRPC) or JSON ``data``."""
    if raw is not None:
        return from_raw(datatype, shape, raw)
    if datatype == "BYTES":
        return [s.encode() if isinstance(s, str) else s for s in data]
    return from_json(datatype, shape, data)


def read_http_response(body: bytes, header_len: str | None) -> InferResponse:
    """An OIP HTTP answer (JSON, or JSON + binary outputs) -> InferResponse."""
    import json

    n = int(header_len) if header_len is not None else len(body)
    head = json.loads(body[:n])
    rest = memoryview(body)[n:]
    outputs = []
    for o in head["outputs"]:
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            value, rest = read_output(o["datatype"], o["shape"], raw=rest[:size]), rest[size:]
        else:
            value = read_output(o["datatype"], o["shape"], data=o["data"])
        outputs.append(Tensor(o["name"], o["datatype"], list(o["shape"]), value, size is not None))
    return InferResponse(head.get("model_name", ""), head.get("model_version", ""), outputs,
                         head.get("parameters") or {}, head.get("id"))


def read_grpc_response(msg) -> InferResponse:
    """A gRPC ModelInferResponse (the server's ``_write_response``: raw_output_contents) -> InferResponse."""
    outputs = [Tensor(o.name, o.datatype, list(o.shape), read_output(o.datatype, list(o.shape), raw=raw))
               for o, raw in zip(msg.outputs, msg.raw_output_contents)]
    return InferResponse(msg.model_name, msg.model_version, outputs,
                         {k: read_parameter(v) for k, v in msg.parameters.items()}, msg.id or None)
