"""Triton's BYTES tensors in the Python backend, without a struct format string per element.

The stub turns every BYTES input into a numpy object array with triton_python_backend_utils.deserialize_bytes_tensor,
a Python loop that builds and parses a format string per element: on the preprocess step's requests (100 actions in
two BYTES inputs and the candidates) it took about a quarter of the stub's samples under load (py-spy,
docs/performance.md). `deserialize_bytes_tensor` here returns the same array, about twice as fast; `install` puts it
in place of the stub's. The model module must call it at import: the stub looks the function up after importing
model.py and before creating the model.
"""
from __future__ import annotations

import numpy as np


def deserialize_bytes_tensor(encoded) -> np.ndarray:
    """The wire form (each element: its length as a little-endian uint32, then its bytes) -> a 1-D object array of
    bytes, exactly what triton_python_backend_utils.deserialize_bytes_tensor returns."""
    raw = encoded if isinstance(encoded, bytes) else memoryview(encoded).tobytes()  # the stub passes uint8 arrays
    out, offset, end = [], 0, len(raw)
    while offset < end:
        n = int.from_bytes(raw[offset:offset + 4], "little")
        offset += 4
        out.append(raw[offset:offset + n])
        offset += n
    arr = np.empty(len(out), dtype=object)
    arr[:] = out
    return arr


def install(pb_utils) -> None:
    """Make the stub deserialize BYTES inputs with `deserialize_bytes_tensor` (call at model.py import)."""
    pb_utils.deserialize_bytes_tensor = deserialize_bytes_tensor
