"""Many concurrent requests with the asyncio client (gRPC); Triton batches them.

    .venv/bin/python clients/rank_async.py --requests 64
"""
import argparse
import asyncio
import time

from seqrank.client import AsyncRankingClient


async def main(n: int, url: str) -> None:
    async with AsyncRankingClient(url, protocol="grpc") as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(client.rank("111", ["3892024", "2629583", "1135013"][: 1 + k % 3])
                                         for k in range(n)))
        took = time.perf_counter() - start
    print(f"{n} requests in {took * 1000:.0f} ms; first ranking: {results[0].item_ids}")


ap = argparse.ArgumentParser()
ap.add_argument("--requests", type=int, default=64)
ap.add_argument("--url", default="127.0.0.1:8001")
args = ap.parse_args()
asyncio.run(main(args.requests, args.url))
