"""`make demo`: train on the embedded KuaiRand sample, export, load the feature store, start the real Triton
server, rank candidates for a few real users over gRPC and over HTTP, print them, stop the server.

Each step is skipped when its output already exists and is current (delete the run directory to start over).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from seqrank.client import RankingClient
from seqrank.data.loaders import load_events
from seqrank.exporting import export_run, is_current_export
from seqrank.ingest import replay_log
from seqrank.embed_job import write_embeddings
from seqrank.pipeline import train
from seqrank.server.triton import ServerOptions, TritonServer
from seqrank.store import open_store


def load_store(log, store_url: str) -> None:
    """The real-time side: replay the log's actions into the feature store (idempotent: a replay only finds
    duplicates)."""
    store = open_store(store_url, timeout_s=5.0)
    try:
        print("feature store:", replay_log(store, log.events, [log.exposure_action]).to_dict())
    finally:
        store.close()


def demo_requests(ev, split_time: int, n_users: int = 3):
    """Users of the test period: the user, their first test-period impression's time (the request time), and up to
    10 items they were shown in that period as the candidates."""
    test = ev[ev.timestamp >= split_time]
    shown = test.groupby("user_id").agg(start=("timestamp", "min"), items=("item_id", lambda s: list(dict.fromkeys(s))))
    shown = shown[shown["items"].map(len) >= 5].head(n_users)
    return [(u, int(r.start), r["items"][:10]) for u, r in shown.iterrows()]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", default="data/kuairand/events.tsv.gz")
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--metrics-port", type=int, default=8002)
    args = ap.parse_args()
    run = Path(args.run)
    train(args.events, run)  # reuses each model trained from this config, data and code (seqrank.pipeline)
    repo = run / "model_repository"
    if not is_current_export(run, repo):  # also when it was exported by an older seqrank or template
        export_run(run, repo)
    store_url = f"sqlite:///{(run / 'store.db').resolve()}"
    log = load_events(args.events)
    ev = log.events
    load_store(log, store_url)
    write_embeddings(run, store_url)

    split_time = json.loads((run / "run.json").read_text())["split_time_ms"]
    options = ServerOptions(repo, args.http_port, args.grpc_port, args.metrics_port,
                            env={"SEQRANK_STORE": store_url})
    with TritonServer(options, log_path=run / "tritonserver.log") as server:
        server.start(timeout_s=300)
        print(f"tritonserver ready: http {server.http_url}  grpc {server.grpc_url}  metrics {server.metrics_url}")
        with RankingClient(server.grpc_url, "grpc") as grpc_client, RankingClient(server.http_url, "http") as http_client:
            for user, start, items in demo_requests(ev, split_time):
                g = grpc_client.rank(user, items, request_time=start, top_k=5)
                h = http_client.rank(user, items, request_time=start, top_k=5)
                print(f"\nuser {user}: {len(items)} candidates at {start} (sequence from the {g.sequence_source})")
                for proto, res in (("grpc", g), ("http", h)):
                    top = ", ".join(f"{i.item_id} ({i.utility:+.3f})" for i in res.items)
                    print(f"  {proto:<4} top 5: {top}")
                if g.item_ids != h.item_ids or not np.allclose([i.utility for i in g.items],
                                                               [i.utility for i in h.items], atol=1e-6):
                    print("gRPC and HTTP disagree", file=sys.stderr)
                    return 1
    print("\ndemo done: the server is stopped. `make serve` keeps it running.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
