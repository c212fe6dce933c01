"""Serving: run the real Triton Inference Server (see seqrank.serving.triton)."""

from seqrank.serving.triton import (
    RESTRICTED_APIS,
    RESTRICTED_KEY_HEADER,
    RESTRICTED_KEY_HEADER_GRPC,
    ServerOptions,
    ServerStartError,
    TritonServer,
    backend_directory,
    free_port,
    perf_analyzer_binary,
    perf_analyzer_env,
    serve_forever,
    server_env,
    tritonserver_binary,
)

__all__ = [
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
]
