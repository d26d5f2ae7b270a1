"""The Open Inference Protocol (KServe "V2", also Triton's HTTP API): request and response
bodies, and the tensors in them.

An inference request names input tensors, each with a shape, a datatype and its elements as a
(flat or nested) JSON list, or, with the binary tensor data extension that Triton's clients use
by default, as raw little-endian bytes after the JSON header (the header's length in the
``Inference-Header-Content-Length`` HTTP header, each binary input's length in its
``binary_data_size`` parameter). The response holds output tensors the same two ways.

This model takes its features either as one tensor ``input`` of shape ``[N, F]`` (features in
the order ``GET /v2/models/<name>`` lists them) or as one tensor per feature, named as the
training column, each of shape ``[N]`` or ``[N, 1]`` (how a table is usually sent, e.g. by
KServe's pandas codec).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

# V2 datatypes and their NumPy types; BYTES are strings (class labels, in outputs only).
NUMERIC_DATATYPES: dict[str, np.dtype] = {
    name: np.dtype(kind)
    for name, kind in {
        "UINT8": "<u1",
        "UINT16": "<u2",
        "UINT32": "<u4",
        "UINT64": "<u8",
        "INT8": "<i1",
        "INT16": "<i2",
        "INT32": "<i4",
        "INT64": "<i8",
        "FP16": "<f2",
        "FP32": "<f4",
        "FP64": "<f8",
    }.items()
}
DATATYPES = (*NUMERIC_DATATYPES, "BOOL", "BYTES")
SINGLE_INPUT = "input"


class BadInput(ValueError):
    """A request the model cannot take; ``field`` names the part of the body at fault."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(message)
        self.field = field
        self.status = status


class _Body(BaseModel):
    # Unknown keys are refused, so a misspelt one ("input" for "inputs") is named, not ignored.
    model_config = ConfigDict(extra="forbid")


class RequestInput(_Body):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class RequestOutput(_Body):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(_Body):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


def field_of(err: ValidationError) -> tuple[str, str]:
    """(the dotted location of a pydantic error, its message) for the first error."""
    first = err.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "body"
    return where, str(first.get("msg", "invalid"))


def parse_request(body: bytes, header_length: str | None) -> tuple[InferenceRequest, bytes]:
    """The request's JSON part parsed, and the binary tail (empty without the extension)."""
    tail = b""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            length = -1
        if not 0 < length <= len(body):
            raise BadInput(
                "Inference-Header-Content-Length",
                f"the header says {header_length!r}, but the body has {len(body)} bytes; it "
                f"must be the length of the JSON part, which the binary tensors follow.",
            )
        body, tail = body[:length], body[length:]
    try:
        return InferenceRequest.model_validate_json(body), tail
    except ValidationError as err:
        where, message = field_of(err)
        raise BadInput(where, f"{where}: {message}") from None


def _tensor(item: RequestInput, where: str, tail: bytes, offset: int) -> tuple[np.ndarray, int]:
    """One input tensor as float64 of its declared shape, and the binary offset after it."""
    if item.datatype not in DATATYPES:
        raise BadInput(
            f"{where}.datatype",
            f"{where}.datatype: unknown datatype {item.datatype!r}; use one of "
            f"{', '.join(DATATYPES)}.",
        )
    if item.datatype not in NUMERIC_DATATYPES:
        raise BadInput(
            f"{where}.datatype",
            f"{where}.datatype: {item.datatype} cannot hold features; send numbers (FP32, FP64, "
            f"INT64, ...).",
        )
    if any(d < 0 for d in item.shape):
        raise BadInput(f"{where}.shape", f"{where}.shape: {item.shape} has a negative dimension.")
    count = math.prod(item.shape)
    size = (item.parameters or {}).get("binary_data_size")
    if size is not None:
        dtype = NUMERIC_DATATYPES[item.datatype]
        if not isinstance(size, int) or size != count * dtype.itemsize:
            raise BadInput(
                f"{where}.parameters.binary_data_size",
                f"{where}: binary_data_size {size!r} does not fit shape {item.shape} of "
                f"{item.datatype} ({count * dtype.itemsize} bytes).",
            )
        if offset + size > len(tail):
            raise BadInput(
                f"{where}.parameters.binary_data_size",
                f"{where}: the body ends before this tensor's {size} binary bytes.",
            )
        flat = np.frombuffer(tail, dtype=dtype, count=count, offset=offset).astype(np.float64)
        return flat.reshape(item.shape), offset + size
    if item.data is None:
        raise BadInput(f"{where}.data", f"{where}: the tensor has no data.")
    values = _numbers(item.data, f"{where}.data")
    if values.size != count:
        raise BadInput(
            f"{where}.shape",
            f"{where}: shape {item.shape} holds {count} elements, data has {values.size}.",
        )
    return values.reshape(item.shape), offset


def _numbers(data: list[Any], where: str) -> np.ndarray:
    """A JSON list (flat or nested, row-major) as float64; a non-number is named."""
    try:
        array = np.asarray(data)
    except ValueError:  # ragged nesting
        raise BadInput(where, f"{where}: the nested lists are ragged; send a flat list.") from None
    if array.dtype.kind not in "iuf":
        flat = array.reshape(-1).tolist() if array.dtype != object else list(_walk(data))
        bad = next((v for v in flat if isinstance(v, bool) or not isinstance(v, int | float)), None)
        raise BadInput(where, f"{where}: {bad!r} is not a number; features are numbers.")
    return array.astype(np.float64, copy=False).reshape(-1)


def _walk(data: Any):
    if isinstance(data, list):
        for item in data:
            yield from _walk(item)
    else:
        yield data


def features_of(
    request: InferenceRequest, tail: bytes, feature_names: list[str], max_rows: int
) -> np.ndarray:
    """The request's rows as a raw [N, F] float64 matrix in the model's feature order."""
    inputs = request.inputs
    if len(inputs) == 1 and inputs[0].name == SINGLE_INPUT:
        x, _ = _tensor(inputs[0], "inputs.0", tail, 0)
        if x.ndim != 2 or x.shape[1] != len(feature_names):
            raise BadInput(
                "inputs.0.shape",
                f"inputs.0 ({SINGLE_INPUT}): shape {list(x.shape)}; this model takes "
                f"[N, {len(feature_names)}] (rows by features).",
            )
    else:
        x = _by_feature(inputs, tail, feature_names)
    check_rows(x, feature_names, max_rows, "inputs")
    return x


def _by_feature(inputs: list[RequestInput], tail: bytes, names: list[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(names)}
    given: dict[str, np.ndarray] = {}
    offset = 0
    for i, item in enumerate(inputs):
        where = f"inputs.{i}"
        if item.name not in index:
            hint = (
                f" (one tensor of all features is named {SINGLE_INPUT!r})"
                if len(inputs) == 1
                else ""
            )
            raise BadInput(
                f"{where}.name",
                f"{where}: {item.name!r} is not a feature of this model{hint}; its features are "
                f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''}.",
            )
        if item.name in given:
            raise BadInput(f"{where}.name", f"{where}: feature {item.name!r} is given twice.")
        column, offset = _tensor(item, where, tail, offset)
        if column.ndim == 2 and column.shape[1] == 1:
            column = column[:, 0]
        if column.ndim != 1:
            raise BadInput(
                f"{where}.shape",
                f"{where} ({item.name}): shape {item.shape}; a feature's tensor is [N] or [N, 1].",
            )
        given[item.name] = column
    missing = [n for n in names if n not in given]
    if missing:
        raise BadInput(
            "inputs",
            f"inputs: {len(missing)} feature(s) missing: {', '.join(missing[:8])}"
            f"{' ...' if len(missing) > 8 else ''}.",
        )
    lengths = {len(c) for c in given.values()}
    if len(lengths) > 1:
        raise BadInput("inputs", f"inputs: the features have different numbers of rows {lengths}.")
    return np.stack([given[n] for n in names], axis=1)


def check_rows(x: np.ndarray, names: list[str], max_rows: int, where: str, cell=None) -> None:
    """Refuse an empty batch, one over ``max_rows`` (413), a NaN or an infinity; ``cell(row,
    name)`` is the field named for a bad value (default ``<where>.<feature>``)."""
    if x.shape[0] == 0:
        raise BadInput(where, f"{where}: the batch is empty; send at least one row.")
    if x.shape[0] > max_rows:
        raise BadInput(
            where,
            f"{where}: {x.shape[0]} rows is over serve.max_rows={max_rows}; split the batch.",
            status=413,
        )
    finite = np.isfinite(x)
    if not finite.all():
        row, col = (int(v) for v in np.argwhere(~finite)[0])
        raise BadInput(
            cell(row, names[col]) if cell else f"{where}.{names[col]}",
            f"{where}: feature {names[col]!r} of row {row} is {x[row, col]}; features must be "
            f"finite numbers.",
        )


def output_tensors(
    task: str,
    num_classes: int,
    wanted: list[RequestOutput] | None,
) -> list[str]:
    """The names of the output tensors to answer with, in order; an unknown one is named."""
    available = [t.name for t in outputs_metadata(task, num_classes)]
    if not wanted:
        return available
    names = []
    for i, item in enumerate(wanted):
        if item.name not in available:
            raise BadInput(
                f"outputs.{i}.name",
                f"outputs.{i}: this model has no output {item.name!r}; it has "
                f"{', '.join(available)}.",
            )
        names.append(item.name)
    return names


def outputs_metadata(task: str, num_classes: int) -> list[TensorMetadata]:
    if task == "regression":
        return [TensorMetadata(name="value", datatype="FP32", shape=[-1])]
    return [
        TensorMetadata(name="label", datatype="BYTES", shape=[-1]),
        TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, num_classes]),
        TensorMetadata(name="confidence", datatype="FP32", shape=[-1]),
    ]


def wants_binary(request: InferenceRequest, output: RequestOutput | None) -> bool:
    """Whether an output goes as binary data (the extension), as the request asks."""
    if output is not None and output.parameters and "binary_data" in output.parameters:
        return bool(output.parameters["binary_data"])
    return bool((request.parameters or {}).get("binary_data_output", False))


def encode_output(
    name: str, array: np.ndarray | list[str], datatype: str, binary: bool
) -> tuple[dict[str, Any], bytes]:
    """One response tensor (JSON part) and its binary bytes (empty when sent as JSON)."""
    if datatype == "BYTES":
        strings = [s.encode() for s in array]
        shape = [len(strings)]
        if not binary:
            return {"name": name, "datatype": datatype, "shape": shape, "data": list(array)}, b""
        raw = b"".join(len(s).to_bytes(4, "little") + s for s in strings)
    else:
        values = np.ascontiguousarray(array, dtype=NUMERIC_DATATYPES[datatype])
        shape = list(values.shape)
        if not binary:
            return {
                "name": name,
                "datatype": datatype,
                "shape": shape,
                "data": values.reshape(-1).tolist(),
            }, b""
        raw = values.tobytes()
    return {
        "name": name,
        "datatype": datatype,
        "shape": shape,
        "parameters": {"binary_data_size": len(raw)},
    }, raw
