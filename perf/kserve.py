"""The server side of the KServe v2 HTTP/REST inference protocol, as perf_analyzer speaks it (``-i http``).

Only what a benchmarked service needs: decode an inference request body -- JSON tensors, or Triton's binary tensor
data extension (a JSON header of ``Inference-Header-Content-Length`` bytes, then each input's raw bytes in order;
BYTES elements as a 4-byte little-endian length + the bytes, what perf_analyzer sends by default) -- and encode a
response the same way the request asked for it (``binary_data`` on a requested output). The tensor byte layout is
tritonclient's own (``tritonclient.utils``), so the bytes are exactly what Triton would receive and send.
"""
from __future__ import annotations

import json

import numpy as np
from tritonclient.utils import deserialize_bytes_tensor, np_to_triton_dtype, serialize_byte_tensor, triton_to_np_dtype

HEADER_LENGTH = "inference-header-content-length"


class ProtocolError(ValueError):
    """A request that does not follow the protocol; the message names the tensor or field."""


def _tensor(spec: dict, raw: bytes | None) -> np.ndarray:
    name = spec.get("name", "?")
    try:
        shape = [int(d) for d in spec["shape"]]
        datatype = str(spec["datatype"])
    except (KeyError, TypeError, ValueError) as err:
        raise ProtocolError(f"input {name!r}: needs 'shape' (ints) and 'datatype'") from err
    if raw is not None:
        if datatype == "BYTES":
            array = deserialize_bytes_tensor(raw)
        else:
            dtype = triton_to_np_dtype(datatype)
            if dtype is None:
                raise ProtocolError(f"input {name!r}: unknown datatype {datatype!r}")
            array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
    else:
        if "data" not in spec:
            raise ProtocolError(f"input {name!r}: neither 'data' nor 'parameters.binary_data_size'")
        flat = np.asarray(spec["data"]).reshape(-1)
        if datatype == "BYTES":
            array = np.array([x.encode() if isinstance(x, str) else bytes(x) for x in flat], dtype=object)
        else:
            array = flat.astype(triton_to_np_dtype(datatype))
    if array.size != int(np.prod(shape)):
        raise ProtocolError(f"input {name!r}: {array.size} elements for shape {shape}")
    return array.reshape(shape)


def decode_request(body: bytes, header_length: str | None) -> tuple[dict[str, np.ndarray], dict[str, bool]]:
    """The request's input tensors by name and the requested outputs (name -> binary?). No ``outputs`` in the
    request means every output, in binary when the request's ``binary_data_output`` parameter says so."""
    split = int(header_length) if header_length else len(body)
    try:
        header = json.loads(body[:split])
    except (ValueError, UnicodeDecodeError) as err:
        raise ProtocolError(f"request header is not JSON: {err}") from err
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise ProtocolError("request has no 'inputs' list")
    offset, inputs = split, {}
    for spec in header["inputs"]:
        size = (spec.get("parameters") or {}).get("binary_data_size")
        raw = None
        if size is not None:
            raw = body[offset: offset + int(size)]
            if len(raw) != int(size):
                raise ProtocolError(f"input {spec.get('name')!r}: body ends before its {size} binary bytes")
            offset += int(size)
        inputs[str(spec.get("name"))] = _tensor(spec, raw)
    binary_default = bool((header.get("parameters") or {}).get("binary_data_output", False))
    outputs = {str(o["name"]): bool((o.get("parameters") or {}).get("binary_data", binary_default))
               for o in header.get("outputs") or []}
    return inputs, outputs


def encode_response(model: str, version: str, tensors: dict[str, np.ndarray],
                    binary: dict[str, bool]) -> tuple[bytes, dict[str, str]]:
    """Response body and extra headers: the outputs named in ``binary`` (all of ``tensors`` if it is empty), each in
    binary where asked, else as JSON data."""
    names = list(binary) or list(tensors)
    outputs, chunks = [], []
    for name in names:
        value = tensors[name]
        spec = {"name": name, "datatype": np_to_triton_dtype(value.dtype) if value.dtype != object else "BYTES",
                "shape": list(value.shape)}
        if binary.get(name, False):
            if value.dtype == object:
                serialized = serialize_byte_tensor(value)  # a 0-d object array holding the bytes (tritonclient's)
                raw = serialized.item() if serialized.size else b""
            else:
                raw = np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<")).tobytes()
            spec["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            flat = value.reshape(-1)
            spec["data"] = [x.decode() if isinstance(x, bytes) else x for x in flat.tolist()]
        outputs.append(spec)
    header = json.dumps({"model_name": model, "model_version": version, "outputs": outputs}).encode()
    if not chunks:
        return header, {"content-type": "application/json"}
    return header + b"".join(chunks), {HEADER_LENGTH: str(len(header)), "content-type": "application/octet-stream"}
