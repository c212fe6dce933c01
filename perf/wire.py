"""Request-level de-duplication measured on the wire: the bytes a server receives for the ranker's input when the
user-side tensors travel once per request (as served) and when they are repeated for every candidate (one row per
candidate, the layout without de-duplication), counted by a TCP proxy in front of Triton's HTTP port."""
from __future__ import annotations

import asyncio
import threading

import numpy as np

from analysis import USER_SIDE
from seqrank.models.transact import INPUT_NAMES
from seqrank.server.triton import free_port


class CountingProxy:
    """A TCP proxy on 127.0.0.1 (its own event loop in a thread) that forwards to ``upstream`` ("host:port") and
    counts the bytes each way; ``received`` = what the upstream server was sent."""

    def __init__(self, upstream: str):
        self.upstream_host, port = upstream.rsplit(":", 1)
        self.upstream_port = int(port)
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.received = self.sent = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    async def _pipe(self, reader, writer, upstream: bool) -> None:
        try:
            while chunk := await reader.read(65536):
                if upstream:
                    self.received += len(chunk)
                else:
                    self.sent += len(chunk)
                writer.write(chunk)
                await writer.drain()
        finally:
            writer.close()  # one side's end ends the other's

    async def _handle(self, client_reader, client_writer) -> None:
        server_reader, server_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        await asyncio.gather(self._pipe(client_reader, server_writer, True),
                             self._pipe(server_reader, client_writer, False), return_exceptions=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()

    def reset(self) -> None:
        self.received = self.sent = 0

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def _infer(client, rows: dict[str, np.ndarray]) -> np.ndarray:
    import tritonclient.http as http
    inputs = []
    for name in INPUT_NAMES:
        value = np.ascontiguousarray(rows[name])
        inp = http.InferInput(name, list(value.shape), http.np_to_triton_dtype(value.dtype))
        inp.set_data_from_numpy(value, binary_data=True)
        inputs.append(inp)
    out = [http.InferRequestedOutput("probs", binary_data=True)]
    return client.infer("ranker", inputs, outputs=out).as_numpy("probs")


def wire_bytes(http_url: str, tensors: dict, n_real: int, max_batch: int) -> dict:
    """Bytes Triton's HTTP port receives (binary tensor data, headers included) to score the request's ``n_real``
    candidates with the ranker: de-duplicated (one request: user-side tensors once, [1, N] candidates) vs
    repeated (user-side tensors once per candidate row, [rows, 1] candidates, in requests of at most ``max_batch``
    rows, the model's max_batch_size). Both must return the same probabilities."""
    import tritonclient.http as http
    proxy = CountingProxy(http_url)
    try:
        with http.InferenceServerClient(proxy.url) as client:
            _infer(client, {n: tensors[n] for n in INPUT_NAMES})  # warm the connection; not counted
            proxy.reset()
            dedup = _infer(client, {**{n: tensors[n] for n in USER_SIDE},
                                    "cand_item": tensors["cand_item"][:, :n_real]})[0, :n_real]
            dedup_bytes, dedup_reply = proxy.received, proxy.sent
            proxy.reset()
            parts = []
            for start in range(0, n_real, max_batch):
                rows = min(max_batch, n_real - start)
                batch = {n: np.repeat(tensors[n], rows, axis=0) for n in USER_SIDE}
                batch["cand_item"] = tensors["cand_item"][0, start:start + rows].reshape(rows, 1)
                parts.append(_infer(client, batch)[:, 0])
            repeated = np.concatenate(parts)
            repeated_bytes, repeated_reply = proxy.received, proxy.sent
    finally:
        proxy.close()
    return {"candidates": n_real, "bytes_dedup": dedup_bytes, "requests_dedup": 1,
            "bytes_repeated": repeated_bytes, "requests_repeated": len(parts), "ratio": repeated_bytes / dedup_bytes,
            "reply_bytes": {"dedup": dedup_reply, "repeated": repeated_reply},
            "max_abs_prob_diff": float(np.abs(dedup - repeated).max()),
            "method": "TCP proxy in front of Triton's HTTP port counting the bytes the server receives (HTTP headers, "
                      "JSON header, binary tensors) for the ranker model alone"}
