"""Rank over HTTP with the user's raw recent actions in the request (no feature store needed).

    .venv/bin/python clients/rank_http_with_actions.py
"""
import time

from seqrank.client import RankingClient

now = int(time.time() * 1000)
actions = [("3892024", "like", now - 60_000), ("3892024", "long_view", now - 60_000), ("2629583", "hate", now - 5_000)]
with RankingClient("127.0.0.1:8000", protocol="http", timeout_s=2.0) as client:
    result = client.rank("111", ["1135013", "2584398", "2629583"], actions=actions, request_time=now)
for item in result.items:
    print(item.item_id, f"{item.utility:.4f}", "(unknown item)" if item.oov else "")
