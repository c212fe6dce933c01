"""The error contract on the real server: every malformed request gets INVALID_ARG (gRPC) / 400 (HTTP) with a
message naming the field, never INTERNAL; defined behaviours (OOV, cold start, truncation, future actions) hold;
the server keeps serving throughout. Contract: docs/serving-contract.md."""
from __future__ import annotations

import numpy as np
import pytest

from seqrank.client import RankingClient

T0 = 1_649_700_000_000  # a request time inside the sample's span (ms)


def _t(name, value, dtype):
    return (name, np.asarray(value, dtype=object if dtype == "BYTES" else None), dtype)


def _ids(*xs):
    return np.array([[x if isinstance(x, bytes) else x.encode() for x in xs]], dtype=object)


USER = _t("user_id", _ids("111"), "BYTES")
CANDS = _t("candidate_ids", _ids("3892024", "2629583"), "BYTES")


def _acts(n=2, items=None, kinds=None, times=None):
    items = items if items is not None else _ids(*["1135013"] * n)
    kinds = kinds if kinds is not None else _ids(*["like"] * n)
    times = times if times is not None else np.array([[T0 - 1000 * (i + 1) for i in range(n)]], dtype=np.int64)
    return [_t("action_item_ids", items, "BYTES"), _t("action_types", kinds, "BYTES"),
            _t("action_times_ms", times, "INT64")]


def _drop(inputs, name):
    return [x for x in inputs if x[0] != name]


BASE = [USER, CANDS, _t("request_time_ms", np.array([[T0]], dtype=np.int64), "INT64")]

# (case id, field the error must name, inputs)
CASES = [
    ("missing-user", "user_id", [CANDS]),
    ("missing-candidates", "candidate_ids", [USER]),
    ("user-int64", "user_id", [_t("user_id", np.array([[111]], dtype=np.int64), "INT64"), CANDS]),
    ("user-fp32", "user_id", [_t("user_id", np.array([[1.5]], dtype=np.float32), "FP32"), CANDS]),
    ("candidates-int64", "candidate_ids", [USER, _t("candidate_ids", np.array([[1, 2]], dtype=np.int64), "INT64")]),
    ("candidates-fp32", "candidate_ids", [USER, _t("candidate_ids", np.array([[1, 2]], dtype=np.float32), "FP32")]),
    ("time-fp64-nan", "request_time_ms", [USER, CANDS, _t("request_time_ms", np.array([[np.nan]]), "FP64")]),
    ("time-fp64-inf", "request_time_ms", [USER, CANDS, _t("request_time_ms", np.array([[np.inf]]), "FP64")]),
    ("time-int32", "request_time_ms", [USER, CANDS, _t("request_time_ms", np.array([[5]], dtype=np.int32), "INT32")]),
    ("time-bytes", "request_time_ms", [USER, CANDS, _t("request_time_ms", _ids("now"), "BYTES")]),
    ("action-times-fp32-nan", "action_times_ms",
     [*BASE, *_acts(1)[:2], _t("action_times_ms", np.array([[np.nan]], dtype=np.float32), "FP32")]),
    ("action-items-int64", "action_item_ids",
     [*BASE, _t("action_item_ids", np.array([[1]], dtype=np.int64), "INT64"), *_acts(1)[1:]]),
    ("action-types-int32", "action_types",
     [*BASE, _acts(1)[0], _t("action_types", np.array([[1]], dtype=np.int32), "INT32"), _acts(1)[2]]),
    ("topk-int64", "top_k", [*BASE, _t("top_k", np.array([[3]], dtype=np.int64), "INT64")]),
    ("topk-fp32", "top_k", [*BASE, _t("top_k", np.array([[3.0]], dtype=np.float32), "FP32")]),
    ("user-rank-3", "user_id", [_t("user_id", np.array([[[b"1"]]], dtype=object), "BYTES"), CANDS]),
    ("user-two-ids", "user_id", [_t("user_id", _ids("1", "2"), "BYTES"), CANDS]),
    ("candidates-rank-3", "candidate_ids", [USER, _t("candidate_ids", np.array([[[b"1"], [b"2"]]], dtype=object), "BYTES")]),
    ("time-two-values", "request_time_ms", [USER, CANDS, _t("request_time_ms", np.array([[T0, T0]], dtype=np.int64), "INT64")]),
    ("topk-two-values", "top_k", [*BASE, _t("top_k", np.array([[1, 2]], dtype=np.int32), "INT32")]),
    ("unknown-input", "colour", [*BASE, _t("colour", _ids("red"), "BYTES")]),
    ("zero-candidates", "candidate_ids", [USER, _t("candidate_ids", np.zeros((1, 0), dtype=object), "BYTES")]),
    ("1025-candidates", "candidate_ids", [USER, _t("candidate_ids", _ids(*[str(i) for i in range(1025)]), "BYTES")]),
    ("oversize-50k-candidates", "candidate_ids",
     [USER, _t("candidate_ids", _ids(*[f"{i:0>200}" for i in range(50_000)]), "BYTES")]),
    ("empty-candidate", "candidate_ids", [USER, _t("candidate_ids", _ids("1", ""), "BYTES")]),
    ("blank-candidate", "candidate_ids", [USER, _t("candidate_ids", _ids("1", "   "), "BYTES")]),
    ("huge-candidate-id", "candidate_ids", [USER, _t("candidate_ids", _ids("9" * 300), "BYTES")]),
    ("huge-user-id", "user_id", [_t("user_id", _ids("u" * 10_000), "BYTES"), CANDS]),
    ("empty-user-id", "user_id", [_t("user_id", _ids(""), "BYTES"), CANDS]),
    ("non-utf8-user-id", "user_id", [_t("user_id", _ids(b"\xff\xfe"), "BYTES"), CANDS]),
    ("actions-items-only", "action_types", [*BASE, _acts(1)[0]]),
    ("actions-types-only", "action_item_ids", [*BASE, _acts(1)[1]]),
    ("actions-times-only", "action_item_ids", [*BASE, _acts(1)[2]]),
    ("actions-types-short", "action_types", [*BASE, *_acts(3, kinds=_ids("like", "like"))]),
    ("actions-times-long", "action_times_ms",
     [*BASE, *_acts(2, times=np.array([[T0 - 3, T0 - 2, T0 - 1]], dtype=np.int64))]),
    ("unknown-action-type", "action_types", [*BASE, *_acts(2, kinds=_ids("like", "teleport"))]),
    ("negative-action-time", "action_times_ms", [*BASE, *_acts(2, times=np.array([[T0 - 5, -1]], dtype=np.int64))]),
    ("too-many-actions", "action_item_ids", [*BASE, *_acts(10_001)]),
    ("empty-action-item", "action_item_ids", [*BASE, *_acts(2, items=_ids("1", ""))]),
    ("request-time-negative", "request_time_ms", [USER, CANDS, _t("request_time_ms", np.array([[-5]], dtype=np.int64), "INT64")]),
    ("request-time-seconds", "request_time_ms",
     [USER, CANDS, _t("request_time_ms", np.array([[1_649_700_000]], dtype=np.int64), "INT64")]),
    ("request-time-future", "request_time_ms",
     [USER, CANDS, _t("request_time_ms", np.array([[4_102_444_800_000]], dtype=np.int64), "INT64")]),
    ("topk-zero", "top_k", [*BASE, _t("top_k", np.array([[0]], dtype=np.int32), "INT32")]),
    ("topk-negative", "top_k", [*BASE, _t("top_k", np.array([[-3]], dtype=np.int32), "INT32")]),
]


def _client(server, protocol):
    import tritonclient.grpc as g
    import tritonclient.http as h
    m = g if protocol == "grpc" else h
    return m, m.InferenceServerClient(server.grpc_url if protocol == "grpc" else server.http_url)


def _infer(m, client, spec, model="seqrank"):
    inputs = []
    for name, value, dtype in spec:
        x = m.InferInput(name, list(value.shape), dtype)
        x.set_data_from_numpy(value)
        inputs.append(x)
    return client.infer(model, inputs)


def test_at_least_40_distinct_cases():
    assert len({c[0] for c in CASES}) == len(CASES) >= 40


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("case,field,spec", CASES, ids=[c[0] for c in CASES])
def test_malformed_request(server, protocol, case, field, spec):
    from tritonclient.utils import InferenceServerException
    m, client = _client(server, protocol)
    with pytest.raises(InferenceServerException) as err:
        _infer(m, client, spec)
    message, status = str(err.value), str(err.value.status())
    assert field in message, f"{case}: error does not name {field!r}: {message}"
    assert "INTERNAL" not in status.upper() and status != "500", f"{case}: {status} {message}"
    assert ("INVALID_ARG" in status) if protocol == "grpc" else (status == "400"), f"{case}: {status} {message}"
    # the server keeps serving
    assert _infer(m, client, BASE).as_numpy("ranked_ids").shape == (1, 2)


def test_defined_behaviours(server):
    with RankingClient(server.grpc_url, "grpc", timeout_s=60) as c:
        # an unknown candidate is scored with the OOV row and flagged
        res = c.rank("111", ["3892024", "never-seen-item"], request_time=T0)
        flags = {i.item_id: i.oov for i in res.items}
        assert flags == {"3892024": False, "never-seen-item": True}
        # an unknown user with no actions is a valid cold start
        cold = c.rank("no-such-user", ["3892024", "2629583"], request_time=T0)
        assert cold.sequence_source == "empty" and len(cold.items) == 2
        # actions at or after the request time are ignored
        past = [("1135013", "like", T0 - 5000), ("2629583", "hate", T0 - 4000)]
        future = past + [("3892024", "hate", T0), ("2629583", "like", T0 + 10)]
        a = c.rank("111", ["3892024", "2629583"], actions=past, request_time=T0)
        b = c.rank("111", ["3892024", "2629583"], actions=future, request_time=T0)
        assert a.item_ids == b.item_ids
        np.testing.assert_allclose([i.utility for i in a.items], [i.utility for i in b.items], atol=1e-6)
        # a history longer than S keeps the newest S: what lies beyond them does not change the scores
        long = [("1135013", "like" if k % 3 else "hate", T0 - 1000 * (k + 1)) for k in range(300)]
        other_tail = long[:100] + [("2629583", "hate", t) for _, _, t in long[100:]]
        other_head = [("2629583", "hate", t) for _, _, t in long[:100]] + long[100:]
        full = c.rank("111", ["3892024", "2629583"], actions=long, request_time=T0)
        same = c.rank("111", ["3892024", "2629583"], actions=other_tail, request_time=T0)
        diff = c.rank("111", ["3892024", "2629583"], actions=other_head, request_time=T0)
        np.testing.assert_allclose([i.utility for i in full.items], [i.utility for i in same.items], atol=1e-6)
        assert not np.allclose(sorted(i.utility for i in full.items), sorted(i.utility for i in diff.items), atol=1e-6)


def _direct(client, model, tensors):
    """gRPC inference on one composing model; dtypes from the arrays."""
    import tritonclient.grpc as g
    from tritonclient.utils import np_to_triton_dtype
    spec = [(n, v, "BYTES" if v.dtype == object else np_to_triton_dtype(v.dtype)) for n, v in tensors.items()]
    return _infer(g, client, spec, model)


def test_direct_calls_to_the_ranker_and_postprocess_fail_alone(server):
    """Inference on the composing models is open, and a direct call batches with the ensemble's own traffic: a bad
    direct request gets INVALID_ARG naming its tensor, and the good requests batched with it are answered."""
    from concurrent.futures import ThreadPoolExecutor

    import tritonclient.grpc as g
    from tritonclient.utils import InferenceServerException

    with g.InferenceServerClient(server.grpc_url) as client:
        pre = _direct(client, "preprocess", {n: v for n, v, _ in BASE})
        feats = {n: pre.as_numpy(n) for n in ("seq_item", "seq_action", "seq_mask", "user_emb", "context",
                                               "cand_item")}
        probs = _direct(client, "ranker", feats).as_numpy("probs")
        n_items = int(feats["cand_item"].max()) + 10**9
        want = _infer(g, client, BASE).as_numpy("ranked_ids")
    post = {"probs": probs, "candidate_ids": CANDS[1], "cand_oov": np.zeros((1, probs.shape[1]), dtype=bool)}
    nan_probs = probs.copy()
    nan_probs[0, 0, 0] = np.nan
    bad = [  # (model, the tensor the error must name, inputs)
        ("ranker", "cand_item", {**feats, "cand_item": np.full_like(feats["cand_item"], n_items)}),
        ("ranker", "cand_item", {**feats, "cand_item": -feats["cand_item"] - 1}),
        ("ranker", "seq_action", {**feats, "seq_action": feats["seq_action"] + 1000}),
        ("ranker", "user_emb", {**feats, "user_emb": np.full_like(feats["user_emb"], np.nan)}),
        ("ranker", "context", {**feats, "context": np.full_like(feats["context"], np.inf)}),
        ("postprocess", "cand_oov", {**post, "cand_oov": np.zeros((1, 1), dtype=bool)}),
        ("postprocess", "probs", {**post, "candidate_ids": _ids(*[str(i) for i in range(probs.shape[1] + 4)])}),
        ("postprocess", "probs", {**post, "probs": nan_probs}),
        ("postprocess", "probs", {k: np.concatenate([v, v]) for k, v in post.items()}),  # two users in one request
    ]

    def call_bad(case):
        model, field, tensors = case
        with g.InferenceServerClient(server.grpc_url) as c:
            try:
                _direct(c, model, tensors)
            except InferenceServerException as e:
                return field, str(e.status()), str(e)
        return field, "OK", "no error"

    def call_good(_):
        with g.InferenceServerClient(server.grpc_url) as c:
            return (_infer(g, c, BASE).as_numpy("ranked_ids").tolist(),
                    _direct(c, "ranker", feats).as_numpy("probs"))

    with ThreadPoolExecutor(max_workers=12) as pool:
        goods = [pool.submit(call_good, k) for k in range(12)]
        bads = [pool.submit(call_bad, bad[k % len(bad)]) for k in range(3 * len(bad))]
        for f in goods:
            ranked, got = f.result()
            assert ranked == want.tolist()
            np.testing.assert_allclose(got, probs, atol=1e-6)
        for f in bads:
            field, status, message = f.result()
            assert "INVALID_ARG" in status and field in message, (field, status, message)
