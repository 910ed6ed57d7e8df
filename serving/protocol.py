"""The KServe v2 / Triton HTTP inference protocol: tensors as JSON, and the binary-tensor extension.

Shared by the server (decode requests, encode responses) and the load generator (the other way
round). The binary-tensor extension is what ``tritonclient.http`` sends for NumPy inputs by default:
the body is a JSON header of ``Inference-Header-Content-Length`` bytes followed by each tensor's raw
little-endian bytes, in order, each announced by ``parameters.binary_data_size``.

Requests are hostile until decoded: element counts are Python integers checked against the body before
NumPy sees a shape (a shape whose count overflows int64 is a 400, not a wrapped count), JSON nested too
deep or with integers beyond 64 bits is a 400, and user-given values are quoted shortened. JSON tensors
must be finite: JSON has no inf/NaN, so a float beyond the datatype's range (``1e400``, or ``1e39`` for
FP32) or Python's ``NaN``/``Infinity`` extension is refused rather than run as inf; binary tensors carry
any IEEE value and are passed through as sent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.errors import InputError
from core.iospec import BATCH, IOSpec, TensorSpec, input_semantics

HEADER_LENGTH = "Inference-Header-Content-Length"
#: Response header with the request's queue and model time (``queue;dur=MS, infer;dur=MS``), set by our server.
SERVER_TIMING = "Server-Timing"

#: KServe v2 datatype <-> NumPy dtype name. Triton's model config spells them ``TYPE_<datatype>``.
DATATYPES: dict[str, str] = {
    "BOOL": "bool", "UINT8": "uint8", "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64", "FP16": "float16", "FP32": "float32",
    "FP64": "float64",
}
_BY_NUMPY = {v: k for k, v in DATATYPES.items()}


class RequestError(Exception):
    """A request the server refuses: the HTTP status and one clear message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


#: Called with (name, datatype, shape) of each input before its data is decoded: the server refuses what its
#: model cannot take (unknown name, wrong datatype, batch over the maximum) before any work is done.
InputCheck = Callable[[str, str, tuple[int, ...]], None]

_INT64_MAX = 2**63 - 1


def brief(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: a client's value quoted in an error message stays short."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # ValueError: an int with more digits than repr allows
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def datatype_of(dtype: str | np.dtype[Any]) -> str:
    """The protocol datatype of a NumPy dtype (``float32`` -> ``FP32``)."""
    name = np.dtype(dtype).name
    if name not in _BY_NUMPY:
        raise ValueError(f"dtype {name} has no KServe v2 datatype; supported: {sorted(_BY_NUMPY)}")
    return _BY_NUMPY[name]


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    if datatype not in DATATYPES:
        raise RequestError(400, f"unsupported datatype {datatype!r}; supported: {', '.join(DATATYPES)}")
    return np.dtype(DATATYPES[datatype]).newbyteorder("<")


@dataclass
class InferRequest:
    """A decoded inference request."""

    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    #: Output names asked for (empty: all of them).
    outputs: list[str] = field(default_factory=list)
    #: Output names to send as binary tensors.
    binary_outputs: set[str] = field(default_factory=set)
    #: ``parameters.binary_data_output``: every output binary unless asked otherwise.
    binary_default: bool = False
    id: str | None = None


def _split_body(body: bytes | bytearray, header_length: str | None) -> tuple[bytes | bytearray, memoryview]:
    """The JSON header and a view (no copy) of the binary tensors after it."""
    if header_length is None:
        return body, memoryview(b"")
    text = header_length.strip()
    if not text.isdigit() or len(text) > 19:  # isdigit also refuses "-1", "+5", "1_000"
        raise RequestError(400, f"{HEADER_LENGTH} must be a non-negative integer, got {brief(header_length)}")
    n = int(text)
    if not 0 < n <= len(body):
        raise RequestError(400, f"{HEADER_LENGTH} {n} does not fit a body of {len(body)} bytes")
    view = memoryview(body)
    return bytes(view[:n]), view[n:]


def _load_json(raw: bytes | bytearray) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise RequestError(400, f"malformed JSON in the request: {str(exc)[:200]}") from None
    except RecursionError:
        raise RequestError(400, "malformed JSON in the request: nested too deeply") from None


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in value):
        raise RequestError(400, f"{where}: 'shape' must be a list of non-negative integers, got {brief(value)}")
    return tuple(value)


def _check_size(shape: tuple[int, ...], dtype: np.dtype[Any], datatype: str, where: str) -> None:
    """Refuse a shape NumPy cannot represent: over 32 dims, or over 2**63 bytes (zero dims aside)."""
    if len(shape) > 32:
        raise RequestError(400, f"{where}: shape has {len(shape)} dims; at most 32 are supported")
    if math.prod(max(d, 1) for d in shape) * dtype.itemsize > _INT64_MAX:
        raise RequestError(400, f"{where}: shape {brief(list(shape))} is too large: its {datatype} tensor would "
                                "take more than 2**63 bytes")


def _has_bool(data: list[Any]) -> bool:
    """Whether a (nested) JSON list holds ``true`` or ``false`` anywhere (NumPy reads them as 1 and 0)."""
    stack = [data]
    while stack:
        for v in stack.pop():
            if v is True or v is False:
                return True
            if isinstance(v, list):
                stack.append(v)
    return False


def _json_data(data: Any, dtype: np.dtype[Any], datatype: str, where: str,
               may_have_bools: bool = True) -> np.ndarray:
    """JSON ``data`` as ``dtype``; a float for an integer datatype (e.g. 0.5 for INT64 token ids) is refused,
    never truncated, and so is an integer out of the datatype's range, a non-finite float, or ``true``/``false``
    for a datatype other than BOOL. ``may_have_bools=False`` (the JSON text has no ``true``/``false``) skips
    the walk over the values that looks for them."""
    bad = f"{where}: 'data' is not a list of {datatype} values"
    if not isinstance(data, list):
        raise RequestError(400, f"{bad}: got {type(data).__name__}")
    try:
        kind = np.asarray(data).dtype.kind
        if kind not in "biuf":  # object: integers beyond 64 bits or null; U: strings
            raise ValueError("values that are not numbers, or integers beyond 64 bits")
        if dtype.kind != "b" and (kind == "b" or (may_have_bools and _has_bool(data))):
            raise ValueError("true/false are BOOL values")  # NumPy would take them as 1 and 0
        if dtype.kind in "iub" and kind == "f":
            raise ValueError("non-integer values")
        with np.errstate(over="ignore", invalid="ignore"):
            arr = np.asarray(data, dtype=dtype)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise RequestError(400, f"{bad}: {str(exc)[:200]}") from None
    if dtype.kind == "f" and not np.isfinite(arr).all():
        raise RequestError(400, f"{where}: 'data' has values beyond the range of {datatype} (or inf/NaN); JSON "
                                "tensors must be finite (send non-finite values as binary data)")
    return arr


def open_tensor(name: str, datatype: str, shape: tuple[int, ...], where: str, check: InputCheck | None) -> np.dtype[Any]:
    """The NumPy dtype of an input about to be decoded, once its datatype, the server's ``check`` and its size
    pass: the checks every request goes through before its data is touched (HTTP and gRPC alike)."""
    dtype = numpy_dtype(datatype)
    if check is not None:
        check(name, datatype, shape)
    _check_size(shape, dtype, datatype, where)
    return dtype


def binary_tensor(blob: memoryview, offset: int, size: Any, dtype: np.dtype[Any], shape: tuple[int, ...],
                  datatype: str, where: str) -> np.ndarray:
    """``size`` raw little-endian bytes at ``offset`` of ``blob`` as an array of ``shape`` (a view, no copy),
    refused unless they are exactly what the shape needs."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RequestError(400, f"{where}: binary_data_size must be a non-negative integer (a byte count), got "
                                f"{brief(size)}")
    if offset + size > len(blob):
        raise RequestError(400, f"{where}: binary_data_size {size} exceeds the {len(blob) - offset} "
                                "binary bytes left in the body")
    count = math.prod(shape)
    if size != count * dtype.itemsize:
        raise RequestError(400, f"{where}: {size} bytes of binary data != {count} elements x "
                                f"{dtype.itemsize} bytes for shape {list(shape)} {datatype}")
    return np.frombuffer(blob, dtype=dtype, count=count, offset=offset).reshape(shape)


def _input_array(item: dict[str, Any], where: str, blob: memoryview, offset: int, check: InputCheck | None,
                 head: bytes | bytearray) -> tuple[np.ndarray, int]:
    """One input's array and the number of binary bytes it took; counts are Python ints, checked against
    the body (``head``: its JSON part) before NumPy is asked for anything."""
    datatype = item.get("datatype")
    if not isinstance(datatype, str):
        raise RequestError(400, f"{where}: 'datatype' is missing")
    shape = _shape(item.get("shape"), where)
    dtype = open_tensor(item["name"], datatype, shape, where, check)
    count = math.prod(shape)
    iparams = item.get("parameters") or {}
    size = iparams.get("binary_data_size") if isinstance(iparams, dict) else None
    if size is not None and "data" in item:
        raise RequestError(400, f"{where}: both 'data' and parameters.binary_data_size are given; send the tensor "
                                "one way, as JSON data or as binary data")
    if size is not None:
        return binary_tensor(blob, offset, size, dtype, shape, datatype, where), size
    if "data" not in item:
        raise RequestError(400, f"{where}: neither 'data' nor parameters.binary_data_size is given")
    if count > len(head):  # every JSON value takes at least one byte: refuse before converting anything
        raise RequestError(400, f"{where}: shape {list(shape)} needs {count} values, more than a JSON body of "
                                f"{len(head)} bytes can hold")
    arr = _json_data(item["data"], dtype, datatype, where, may_have_bools=b"true" in head or b"false" in head)
    if arr.size != count:
        raise RequestError(400, f"{where}: 'data' has {arr.size} values but shape {list(shape)} needs {count}")
    return arr.reshape(shape), 0


def decode_request(body: bytes | bytearray, header_length: str | None,
                   check: InputCheck | None = None) -> InferRequest:
    """Parse a request body (JSON, or JSON header + binary tensors) into NumPy arrays. ``check`` sees each
    input's name, datatype and shape before its data is decoded. Binary inputs are views of ``body``."""
    head, blob = _split_body(body, header_length)
    doc = _load_json(head)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise RequestError(400, "the request must be a JSON object with a non-empty 'inputs' list")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError(400, "'parameters' must be a JSON object")
    req = InferRequest(inputs={}, datatypes={}, binary_default=bool(params.get("binary_data_output", False)),
                       id=_request_id(doc))
    offset = 0
    for i, item in enumerate(doc["inputs"]):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise RequestError(400, f"inputs[{i}] must be an object with a 'name'")
        where = f"input {brief(item['name'])}"
        if item["name"] in req.inputs:
            raise RequestError(400, f"{where} is given twice")
        req.inputs[item["name"]], used = _input_array(item, where, blob, offset, check, head)
        req.datatypes[item["name"]] = item["datatype"]
        offset += used
    if offset != len(blob):
        raise RequestError(400, f"{len(blob) - offset} binary bytes after the last input are not announced by "
                                "any binary_data_size")
    _requested_outputs(doc, req)
    return req


def _request_id(doc: dict[str, Any]) -> str | None:
    """The request's ``id`` to echo: a string as sent, anything else quoted shortened."""
    if "id" not in doc:
        return None
    return doc["id"] if isinstance(doc["id"], str) else brief(doc["id"], 200)


def _requested_outputs(doc: dict[str, Any], req: InferRequest) -> None:
    outputs = doc.get("outputs") or []
    if not isinstance(outputs, list):
        raise RequestError(400, "'outputs' must be a list")
    for i, out in enumerate(outputs):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise RequestError(400, f"outputs[{i}] must be an object with a 'name'")
        req.outputs.append(out["name"])
        oparams = out.get("parameters") or {}
        if isinstance(oparams, dict) and oparams.get("binary_data", req.binary_default):
            req.binary_outputs.add(out["name"])


def _encode_tensors(arrays: dict[str, np.ndarray], binary: set[str]) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Protocol tensor entries, with the raw bytes of the ``binary`` ones kept apart, in order."""
    items: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, arr in arrays.items():
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(arr.dtype), "shape": list(arr.shape)}
        if name in binary:
            raw = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = arr.reshape(-1).tolist()
        items.append(entry)
    return items, blobs


def _join(doc: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, int | None]:
    """The body and, when binary tensors follow the JSON, the header length to announce."""
    head = json.dumps(doc, separators=(",", ":")).encode()
    return (b"".join([head, *blobs]), len(head)) if blobs else (head, None)


def encode_response(model: str, version: str, outputs: dict[str, np.ndarray], binary: set[str],
                    request_id: str | None = None) -> tuple[bytes, int | None]:
    """A response body (and header length): ``binary`` names go as binary tensors, others as JSON."""
    items, blobs = _encode_tensors(outputs, binary)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": items}
    if request_id is not None:
        doc["id"] = request_id
    return _join(doc, blobs)


def encode_request(feed: dict[str, np.ndarray], outputs: list[str], binary: bool = True) -> tuple[bytes, int | None]:
    """A request body (and header length) for ``feed``, asking for ``outputs``; binary tensors when ``binary``."""
    items, blobs = _encode_tensors(feed, set(feed) if binary else set())
    doc = {"inputs": items, "outputs": [{"name": n, "parameters": {"binary_data": binary}} for n in outputs]}
    return _join(doc, blobs)


def decode_response(body: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    """Output arrays of a response body (JSON or binary); a server error document raises RequestError."""
    head, blob = _split_body(body, header_length)
    doc = _load_json(head)
    if not isinstance(doc, dict) or "outputs" not in doc:
        raise RequestError(502, f"not an inference response: {str(doc)[:200]}")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for item in doc["outputs"]:
        dtype = numpy_dtype(item["datatype"])
        shape = tuple(item["shape"])
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            count = size // dtype.itemsize
            out[item["name"]] = np.frombuffer(blob, dtype=dtype, count=count, offset=offset).reshape(shape)
            offset += size
        else:
            out[item["name"]] = np.asarray(item["data"], dtype=dtype).reshape(shape)
    return out


def spec_from_metadata(meta: dict[str, Any]) -> IOSpec:
    """An IOSpec from KServe v2 model metadata (-1 in the first dim = the batch; another -1 at position i is
    the dim ``dim<i>``, shared by the inputs that have one there)."""
    def tensors(items: list[dict[str, Any]]) -> list[TensorSpec]:
        out = []
        for t in items:
            if t["datatype"] not in DATATYPES:
                raise InputError(f"tensor {t['name']!r} has datatype {t['datatype']}, which the load test cannot make")
            shape: list[int | str] = [BATCH if i == 0 and d == -1 else (d if d >= 0 else f"dim{i}")
                                      for i, d in enumerate(t["shape"])]
            out.append(TensorSpec(name=t["name"], shape=shape, dtype=DATATYPES[t["datatype"]],
                                  **input_semantics(t["name"], DATATYPES[t["datatype"]])))
        return out

    return IOSpec(inputs=tensors(meta["inputs"]), outputs=tensors(meta.get("outputs", [])))


def server_timing(header: str | None) -> dict[str, float]:
    """``queue;dur=0.1, infer;dur=41.9`` -> {"queue": 0.1, "infer": 41.9} (ms); empty when absent/malformed."""
    out: dict[str, float] = {}
    for part in (header or "").split(","):
        name, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            try:
                out[name] = float(rest[4:])
            except ValueError:
                continue
    return out
