"""perf/kserve.py, the naive service's side of the KServe v2 HTTP protocol, against tritonclient's own encoder and
decoder (what perf_analyzer and every Triton HTTP client send and read): binary and JSON tensors both ways, and a
malformed request named by its tensor."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as http

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))
import kserve  # noqa: E402

TENSORS = {"user_id": np.array([[b"u1"]], dtype=object),
           "candidate_ids": np.array([[b"a", b"bb", "\u00e9".encode()]], dtype=object),
           "request_time_ms": np.array([[1_700_000_000_000]], dtype=np.int64),
           "seq_mask": np.array([[True, False, True]])}


def _request(binary: bool):
    inputs = []
    for name, value in TENSORS.items():
        inp = http.InferInput(name, list(value.shape), http.np_to_triton_dtype(value.dtype)
                              if value.dtype != object else "BYTES")
        inp.set_data_from_numpy(value, binary_data=binary)
        inputs.append(inp)
    outputs = [http.InferRequestedOutput("utility", binary_data=binary),
               http.InferRequestedOutput("ranked_ids", binary_data=binary)]
    body, json_size = http.InferenceServerClient.generate_request_body(inputs, outputs)
    return body, json_size


@pytest.mark.parametrize("binary", [True, False])
def test_requests_from_tritonclient_decode_to_the_same_tensors(binary):
    body, json_size = _request(binary)
    inputs, outputs = kserve.decode_request(body, None if json_size is None else str(json_size))
    assert set(inputs) == set(TENSORS)
    for name, value in TENSORS.items():
        assert inputs[name].shape == value.shape and (inputs[name] == value).all(), name
    assert outputs == {"utility": binary, "ranked_ids": binary}


@pytest.mark.parametrize("binary", [True, False])
def test_responses_parse_in_tritonclient_as_the_tensors_sent(binary):
    tensors = {"ranked_ids": np.array([b"b", b"a"], dtype=object), "utility": np.array([0.5, 0.25], np.float32),
               "head_scores": np.arange(4, dtype=np.float32).reshape(2, 2), "oov": np.array([False, True])}
    body, headers = kserve.encode_response("seqrank", "1", tensors, {name: binary for name in tensors})
    length = headers.get(kserve.HEADER_LENGTH)
    assert (length is not None) == binary
    result = http.InferenceServerClient.parse_response_body(body, header_length=None if length is None else int(length))
    for name, value in tensors.items():
        got = result.as_numpy(name)
        if not binary and value.dtype == object:  # JSON carries BYTES as strings, as from Triton
            value = np.array([x.decode() for x in value], dtype=object)
        assert got.shape == value.shape and (got == value).all(), name
    assert result.get_response()["model_name"] == "seqrank"


def test_a_malformed_request_names_the_tensor():
    body, json_size = _request(True)
    with pytest.raises(kserve.ProtocolError, match="seq_mask.*binary bytes"):
        kserve.decode_request(body[:-1], str(json_size))
    with pytest.raises(kserve.ProtocolError, match="request_time_ms.*2 elements for shape \\[1\\]"):
        kserve.decode_request(b'{"inputs": [{"name": "request_time_ms", "shape": [1], "datatype": "INT64", '
                              b'"data": [1, 2]}]}', None)
    with pytest.raises(kserve.ProtocolError, match="no 'inputs'"):
        kserve.decode_request(b'{"outputs": []}', None)


def test_the_naive_service_answers_every_output_of_the_ensemble(small_run):
    """perf_analyzer asks the naive service for the ensemble's outputs (its config): a new ensemble output the
    service does not produce fails every search of the bench."""
    from naive_service import NaiveRanker  # perf/ is on sys.path (above)

    from seqrank.exporting import triton_config

    ranker = NaiveRanker(small_run["run"], small_run["repo"], small_run["store"])
    user = str(small_run["events"].user_id.iloc[0])
    items = [str(i) for i in small_run["events"].item_id.unique()[:5]]
    out = ranker.rank({"user_id": np.array([user.encode()], dtype=object),
                       "candidate_ids": np.array([i.encode() for i in items], dtype=object)})
    ensemble = triton_config.load(small_run["repo"] / "seqrank" / "config.pbtxt")
    assert set(out) == {o.name for o in ensemble.output}
