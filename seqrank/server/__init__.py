"""The code that runs Triton: the real Triton Inference Server as a process (seqrank.server.triton) and its
supervisor (seqrank.server.supervise). What runs inside Triton is seqrank.serving.

Names are re-exported lazily, so ``python -m seqrank.server.triton`` does not import the module twice.
"""

from __future__ import annotations

import importlib

_TRITON_NAMES = (
    "RESTRICTED_APIS",
    "RESTRICTED_KEY_HEADER",
    "RESTRICTED_KEY_HEADER_GRPC",
    "ServerOptions",
    "ServerStartError",
    "TritonServer",
    "backend_directory",
    "free_port",
    "perf_analyzer_binary",
    "perf_analyzer_env",
    "serve_forever",
    "server_env",
    "tritonserver_binary",
)

__all__ = list(_TRITON_NAMES)


def __getattr__(name: str):
    if name in _TRITON_NAMES:
        return getattr(importlib.import_module("seqrank.server.triton"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
