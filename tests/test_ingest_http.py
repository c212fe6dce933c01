"""The ingest HTTP API (FastAPI + uvicorn) against real stores: SQLite files and a real redis-server.

Auth (401), size caps (413), bad fields (400/422 naming the field), overload (429), store down (503), and good
requests whose actions are then read back from the store. The last test runs the real CLI (uvicorn) on a free port.
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from seqrank.ingest import main_ingest, make_ingest_app
from seqrank.store import Action, EmbeddedStore, RedisStore

try:
    from redis_server import free_port, redis_server  # noqa: F401 (a fixture)
except ImportError:  # tests/ imported as a package
    from tests.redis_server import free_port, redis_server  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000_000
TOKEN = "test-token-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(params=["embedded", "redis"])
def store(request, tmp_path):
    if request.param == "embedded":
        s = EmbeddedStore(str(tmp_path / "store.db"), timeout_s=2.0)
    else:
        s = RedisStore(request.getfixturevalue("redis_server").url, prefix=f"h{uuid.uuid4().hex[:10]}:",
                       timeout_s=2.0)
    yield s
    s.close()


def client_for(store, **kw):
    return TestClient(make_ingest_app(store, kw.pop("token", TOKEN), **kw))


def act(user="u", item="p1", action="click", ts=T0, **extra):
    return {"user_id": user, "item_id": item, "action": action, "timestamp": ts, **extra}


def test_good_request_lands_in_the_store(store):
    with client_for(store) as c:
        r = c.post("/v1/actions", headers=AUTH, json=[act(), act(item="p2", ts=T0 + 5), act()])
        assert r.status_code == 200, r.text
        assert r.json() == {"accepted": 2, "duplicates": 1, "too_late": 0, "invalid": 0}
        # the same canonical times as the training files: seconds, ISO-8601, and the {"actions": [...]} form
        r = c.post("/v1/actions", headers=AUTH, json={"actions": [act(user=7, item=9, ts=1_700_000_010),
                                                                  act(user="7", item="x", ts="2023-11-14T22:13:31Z")]})
        assert r.json() == {"accepted": 2, "duplicates": 0, "too_late": 0, "invalid": 0}
        assert c.post("/v1/actions", headers=AUTH, json=[]).json()["accepted"] == 0
        assert c.get("/healthz").json() == {"ok": True, "in_flight": 0}
    assert store.get_sequences(["u"])[0].as_tuples() == [("p1", "click", T0), ("p2", "click", T0 + 5)]
    assert store.get_sequences(["7"])[0].as_tuples() == [("9", "click", T0 + 10_000), ("x", "click", T0 + 11_000)]


def test_auth_missing_or_wrong_is_401_and_writes_nothing(store):
    with client_for(store) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"}):
            r = c.post("/v1/actions", headers=headers, json=[act()])
            assert r.status_code == 401, headers
            assert r.json()["field"] == "Authorization" and r.headers["www-authenticate"].startswith("Bearer")
        assert c.get("/healthz").status_code == 200               # the probe needs no token
    assert store.get_sequences(["u"])[0].item_ids == []
    with pytest.raises(ValueError, match="no ingest token"):
        make_ingest_app(store, None)                              # never open by accident
    with pytest.raises(ValueError, match="no ingest token"):
        make_ingest_app(store, "")
    with TestClient(make_ingest_app(store, None, insecure_no_auth=True)) as c:
        assert c.post("/v1/actions", json=[act()]).status_code == 200


def test_oversize_is_413(store):
    with client_for(store, max_body_bytes=2000, max_actions=5) as c:
        big = json.dumps([act(item="p" * 500, ts=T0 + k) for k in range(5)]).encode()
        assert len(big) > 2000
        r = c.post("/v1/actions", headers={**AUTH, "Content-Type": "application/json"}, content=big)
        assert r.status_code == 413 and r.json()["field"] == "body"
        # chunked (no Content-Length): the cap applies while reading
        r = c.post("/v1/actions", headers=AUTH, content=iter([big[:1000], big[1000:]]))
        assert r.status_code == 413 and r.json()["field"] == "body"
        r = c.post("/v1/actions", headers=AUTH, json=[act(ts=T0 + k) for k in range(6)])
        assert r.status_code == 413 and r.json()["field"] == "actions" and "6 actions" in r.json()["error"]
        assert c.post("/v1/actions", headers=AUTH, json=[act(ts=T0 + k) for k in range(5)]).status_code == 200
    assert len(store.get_sequences(["u"])[0]) == 5


@pytest.mark.parametrize("body,status,field,index", [
    (b"{nope", 400, "body", None),
    (b"\xff\xfe", 400, "body", None),
    ({"user_id": "u"}, 422, "actions", None),
    ([act(), 5], 422, "action", 1),
    ([act(), {k: v for k, v in act().items() if k != "item_id"}], 422, "item_id", 1),
    ([act(user="")], 422, "user_id", 0),
    ([act(user=True)], 422, "user_id", 0),
    ([act(item={"a": 1})], 422, "item_id", 0),
    ([act(action=3)], 422, "action", 0),
    ([act(), act(ts="soon")], 422, "timestamp", 1),
    ([act(), act(ts=-5)], 422, "timestamp", 1),
    ([act(), act(ts=[1])], 422, "timestamp", 1),
    ([act(), act(item="p\x1f1")], 422, "item_id", 1),
    ([act(item="x" * 2000)], 422, "item_id", 0),
    ([act(ts=2 ** 60)], 422, "timestamp", None),
    ([act(user=" ")], 422, "user_id", 0),
])
def test_bad_input_names_the_field_and_writes_nothing(store, body, status, field, index):
    with client_for(store) as c:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = c.post("/v1/actions", headers={**AUTH, "Content-Type": "application/json"}, content=data)
    assert r.status_code == status, r.text
    got = r.json()
    assert got["field"] == field and got.get("index") == index, got
    assert (f"actions[{index}].{field}:" if index is not None else f"{field}:") in got["error"]
    assert store.get_sequences(["u", " "])[0].item_ids == [] == store.get_sequences([" "])[0].item_ids


def test_overloaded_is_429_and_store_down_is_503(tmp_path):
    """A real overload: the SQLite file's write lock is held by another connection, so the one admitted request
    waits in the store; the next one gets 429 at once. Then a store that cannot write in time: 503."""
    path = str(tmp_path / "busy.db")
    store = EmbeddedStore(path, timeout_s=2.0, write_timeout_s=10.0)
    store.append([Action("w", "p", "click", T0)])           # the schema exists before the lock is taken
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    results = {}
    with client_for(store, max_in_flight=1) as c:
        first = threading.Thread(target=lambda: results.setdefault(
            "first", c.post("/v1/actions", headers=AUTH, json=[act(ts=T0 + 1)])))
        first.start()
        deadline = time.monotonic() + 10
        while c.get("/healthz").json()["in_flight"] != 1:
            assert time.monotonic() < deadline, "the first request never got in flight"
            time.sleep(0.01)
        t = time.perf_counter()
        r = c.post("/v1/actions", headers=AUTH, json=[act(ts=T0 + 2)])
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["field"] == "request"
        assert time.perf_counter() - t < 1.0
        holder.execute("ROLLBACK")
        first.join(15)
        assert results["first"].status_code == 200 and results["first"].json()["accepted"] == 1
        assert c.get("/healthz").json()["in_flight"] == 0
    assert store.get_sequences(["u"])[0].as_tuples() == [("p1", "click", T0 + 1)]   # the refused one: not written
    store.close()

    fast = EmbeddedStore(path, timeout_s=2.0, write_timeout_s=0.1)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with client_for(fast) as c:
            r = c.post("/v1/actions", headers=AUTH, json=[act(ts=T0 + 3)])
        assert r.status_code == 503 and r.json()["field"] == "store" and r.headers["retry-after"] == "1"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert T0 + 3 not in fast.get_sequences(["u"])[0].timestamps_ms.tolist()
    fast.close()


def test_cli_refuses_to_serve_without_a_token(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SEQRANK_TEST_NO_TOKEN", raising=False)
    with pytest.raises(SystemExit) as e:
        main_ingest(["--store", f"sqlite:///{tmp_path / 's.db'}", "--serve", "--token-env", "SEQRANK_TEST_NO_TOKEN"])
    assert e.value.code == 2
    assert "SEQRANK_TEST_NO_TOKEN is unset or empty" in capsys.readouterr().err


def _request(url, body=None, token=None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), headers=headers,
                                 method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_real_uvicorn_server_from_the_cli(tmp_path, redis_server):
    """``seqrank ingest --serve`` (uvicorn, 127.0.0.1 by default, token from --token-env) into the real Redis."""
    port = free_port()
    prefix = f"cli{uuid.uuid4().hex[:8]}:"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), MY_INGEST_TOKEN=TOKEN)
    proc = subprocess.Popen([sys.executable, "-m", "seqrank.ingest", "--store", f"{redis_server.url}?prefix={prefix}",
                             "--serve", "--port", str(port), "--token-env", "MY_INGEST_TOKEN",
                             "--log-level", "WARNING"],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if _request(base + "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "ingest server did not come up"
            time.sleep(0.05)
        assert _request(base + "/v1/actions", [act(user="cli")])[0] == 401
        assert _request(base + "/v1/actions", [act(user="cli", ts="later")], TOKEN) == (
            422, {"error": "actions[0].timestamp: cannot parse 'later' as a time", "field": "timestamp", "index": 0})
        code, body = _request(base + "/v1/actions", [act(user="cli"), act(user="cli", item="p2", ts=T0 + 1)], TOKEN)
        assert (code, body["accepted"]) == (200, 2)
    finally:
        proc.terminate()
        proc.wait(15)
    reader = RedisStore(redis_server.url, prefix=prefix, timeout_s=2.0)
    assert reader.get_sequences(["cli"])[0].item_ids == ["p1", "p2"]
    reader.close()
