"""Rank candidates for a user over gRPC (the user's sequence comes from the feature store).

    .venv/bin/python clients/rank_grpc.py --user-id 111 --candidates 3892024,2629583,1135013
"""
import argparse

from seqrank.client import RankingClient

ap = argparse.ArgumentParser()
ap.add_argument("--url", default="127.0.0.1:8001")
ap.add_argument("--user-id", required=True)
ap.add_argument("--candidates", required=True)
ap.add_argument("--top-k", type=int, default=None)
args = ap.parse_args()

with RankingClient(args.url, protocol="grpc") as client:
    result = client.rank(args.user_id, args.candidates.split(","), top_k=args.top_k)
print(f"sequence from: {result.sequence_source}")
for item in result.items:
    print(item.item_id, f"{item.utility:.4f}", {h: round(p, 3) for h, p in item.scores.items()})
