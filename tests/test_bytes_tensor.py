"""seqrank.serving.bytes_tensor: the preprocess and postprocess stubs' BYTES deserializer returns exactly what the
Python backend's own triton_python_backend_utils.deserialize_bytes_tensor returns (the real file of the installed
backend), on the edge cases of the wire form."""
from __future__ import annotations

import importlib.util
import struct

import numpy as np
import pytest

from seqrank.serving.bytes_tensor import deserialize_bytes_tensor, install
from seqrank.server.triton import backend_directory

CASES = {
    "empty tensor": [],
    "one empty element": [b""],
    "ids": [b"3892024", b"2629583", b"7"],
    "not UTF-8, NUL bytes, trailing NUL": [b"\xff\xfe", b"a\x00b", b"abc\x00", b"\x00"],
    "element over 64 KiB": [b"x" * 70_000, b"y"],
    "a thousand short": [str(i).encode() for i in range(1000)],
}


def stock_utils():
    path = backend_directory() / "python" / "triton_python_backend_utils.py"
    spec = importlib.util.spec_from_file_location("stock_triton_python_backend_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wire(elements: list[bytes]) -> np.ndarray:
    """As the stub hands it over: a uint8 array of length-prefixed elements."""
    return np.frombuffer(b"".join(struct.pack("<I", len(e)) + e for e in elements), dtype=np.uint8)


@pytest.mark.parametrize("case", list(CASES))
def test_same_array_as_the_python_backend(case):
    stock = stock_utils().deserialize_bytes_tensor
    for encoded in (wire(CASES[case]), wire(CASES[case]).tobytes(), bytearray(wire(CASES[case]).tobytes())):
        want, got = stock(encoded), deserialize_bytes_tensor(encoded)
        assert got.dtype == want.dtype == np.object_ and got.shape == want.shape == (len(CASES[case]),)
        assert all(type(g) is bytes and g == w for g, w in zip(got, want))


def test_install_replaces_the_module_function():
    utils = stock_utils()
    install(utils)
    assert utils.deserialize_bytes_tensor is deserialize_bytes_tensor
