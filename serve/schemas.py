"""Typed schemas of the Open Inference Protocol's HTTP bodies (pydantic).

Every JSON request body is validated here before anything else looks at it, so a wrong
type anywhere (a ``{}`` as datatype, ``binary_data_size: true``, a 5,000-level nested
array, a shape whose product overflows) is one 400 with a message naming the field, not
an exception deeper down. The same models describe the bodies in the served OpenAPI
document (``/openapi.json``), which is what fuzzers such as schemathesis read.

Tensor ``data`` stays ``Any`` here: its elements are checked, with numpy, against the
declared datatype and shape in ``oip.from_json`` (iterating a million numbers in pydantic
would cost more than the inference).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bdserve.serve.errors import InvalidInput, shown

Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                   "FP16", "FP32", "FP64", "BYTES", "BF16"]
MAX_RANK = 8
MAX_DIM = 2 ** 31 - 1
MAX_NAME = 256
Dim = Annotated[int, Field(ge=0, le=MAX_DIM)]


class _Open(BaseModel):
    # Fields the protocol may grow are ignored, not refused; types of known fields are strict.
    model_config = ConfigDict(extra="ignore", strict=True)


class InputParameters(_Open):
    model_config = ConfigDict(extra="allow", strict=True)
    binary_data_size: Optional[int] = Field(None, ge=0, le=2 ** 40,
                                            description="binary tensor extension: bytes of this input after the JSON")


class RequestInput(_Open):
    name: str = Field(..., max_length=MAX_NAME)
    datatype: Datatype
    shape: list[Dim] = Field(..., min_length=1, max_length=MAX_RANK)
    parameters: Optional[InputParameters] = None
    data: Any = Field(None, description="flat or nested list; BYTES elements are base64 strings")


class OutputParameters(_Open):
    model_config = ConfigDict(extra="allow", strict=True)
    binary_data: Optional[bool] = None
    classification: Optional[int] = Field(None, ge=0, le=MAX_DIM,
                                          description="Triton's classification extension: the top k as 'score:index:label'")


class RequestOutput(_Open):
    name: str = Field(..., max_length=MAX_NAME)
    parameters: Optional[OutputParameters] = None


class RequestParameters(_Open):
    model_config = ConfigDict(extra="allow", strict=True)
    defense: Optional[str] = Field(None, max_length=MAX_NAME, description="lab servers only")
    binary_data_output: Optional[bool] = None


class InferRequestBody(_Open):
    """POST /v2/models/{m}/infer (the JSON part, before any binary tensor data)."""

    id: Optional[str] = Field(None, max_length=MAX_NAME)
    parameters: Optional[RequestParameters] = None
    inputs: list[RequestInput] = Field(..., min_length=1, max_length=1,
                                       description="exactly one input: 'input' (UINT8/FP32) or 'image' (BYTES)")
    outputs: Optional[list[RequestOutput]] = Field(None, max_length=16)


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: Optional[dict[str, Any]] = None
    data: Optional[list[Any]] = None


class InferResponseBody(BaseModel):
    model_name: str
    model_version: str
    id: Optional[str] = None
    parameters: dict[str, Any] = {}
    outputs: list[ResponseOutput]


class ErrorBody(BaseModel):
    error: str


def _extra_scalars(params: BaseModel | None, where: str) -> None:
    """Parameters the protocol does not name must still be plain scalars."""
    for k, v in (params.model_extra or {}).items() if params is not None else ():
        if not isinstance(v, (bool, int, float, str)):
            raise InvalidInput(f"request field {where}.{shown(k, 40)}: parameters are strings, numbers or booleans, "
                               f"got {type(v).__name__}")


def parse_infer_request(obj: Any) -> InferRequestBody:
    """A decoded JSON body -> InferRequestBody; InvalidInput naming the first bad field."""
    try:
        body = InferRequestBody.model_validate(obj)
    except ValidationError as e:
        raise InvalidInput(describe(e)) from None
    _extra_scalars(body.parameters, "parameters")
    _extra_scalars(body.inputs[0].parameters, "inputs.0.parameters")
    for i, o in enumerate(body.outputs or []):
        _extra_scalars(o.parameters, f"outputs.{i}.parameters")
    return body


def describe(e: ValidationError, limit: int = 3) -> str:
    """pydantic's errors as one line: "request field inputs.0.datatype: Input should be ... (got {})"."""
    parts = []
    for err in e.errors()[:limit]:
        where = ".".join(str(p) for p in err["loc"]) or "(body)"
        msg = re.sub(r" or instance of \w+", "", err["msg"])  # pydantic's class names mean nothing to a client
        if err["type"] == "missing":
            parts.append(f"request field {shown(where, 80, quoted=False)}: required")
        else:
            parts.append(f"request field {shown(where, 80, quoted=False)}: {msg} (got {shown(err.get('input'))})")
    more = len(e.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
