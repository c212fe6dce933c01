"""The CPU ranker's graph (seqrank/serving/cpu_graph.py): residual Add + LayerNorm fused into ONNX Runtime's
SkipLayerNormalization, the same scores as PyTorch, and nothing fused where the rewrite would not be exact; the
unmasked branch runs exactly when every history position is a real action."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from seqrank.models.transact import INPUT_NAMES
from seqrank.serving.batching import trim_history_padding
from seqrank.serving.cpu_graph import CPU_ONNX, add_full_history_branch, cpu_graph_path, fuse_skip_layernorm
from test_models import make_ranker, ranker_inputs


def _nodes(graph):
    """Every node, inside If branches too."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)


def _ops(path):
    return [n.op_type for n in _nodes(onnx.load(str(path)).graph)]


def _cpu_graph(model, tmp_path) -> tuple[Path, int]:
    """As `seqrank export` writes it: the fused graph with the full-history branch."""
    from seqrank.exporting import export_cpu_graph, export_ranker_onnx
    portable = export_ranker_onnx(model, tmp_path / "model.onnx")
    fused, branch = export_cpu_graph(model, portable, tmp_path / CPU_ONNX)
    assert branch
    return tmp_path / CPU_ONNX, fused


@pytest.mark.parametrize("extra", [{"n_heads": 1, "sequence_mean": True},
                                   {"n_heads": 2}], ids=["shipped-form-1-head", "paper-2-heads"])
def test_fused_cpu_graph_scores_what_pytorch_scores(tmp_path, extra):
    from seqrank.exporting import check_parity
    model = make_ranker("transact", seed=3, top_k_rows=4, **extra)
    _, fused = _cpu_graph(model, tmp_path)
    assert fused == 2 * model.cfg.n_layers  # post-norm: two residual + LayerNorm pairs per layer
    ops = _ops(tmp_path / CPU_ONNX)
    # in both branches (masked, full history)
    assert ops.count("SkipLayerNormalization") == 2 * fused and "LayerNormalization" not in ops
    # the Linear biases before a residual (feed-forward out in every layer, attention out where layer 0 is not
    # factorized and in every later layer) are the kernel's bias input, not an Add pass
    biased = [len(n.input) == 5 for n in _nodes(onnx.load(str(tmp_path / CPU_ONNX)).graph)
              if n.op_type == "SkipLayerNormalization"]
    assert sum(biased) == 2 * (2 * model.cfg.n_layers - (model.cfg.n_heads == 1))
    assert ops.count("If") == 1
    # q, k and v projected separately when exported (a Split copies in ONNX Runtime); with several heads layer 0
    # is not factorized and splits its precomputed projection
    assert ("Split" in ops) == (model.cfg.n_heads > 1)
    portable = _ops(tmp_path / "model.onnx")  # the portable file (TensorRT, CUDA) is untouched
    assert "SkipLayerNormalization" not in portable and "If" not in portable
    report = check_parity(model, tmp_path / CPU_ONNX, 9)  # raises past the export tolerance
    assert max(r["max_abs_diff"] for r in report) <= 1e-5
    # as the stub runs it: mixed history lengths (a cold start too), trimmed to the longest
    sess = ort.InferenceSession(str(tmp_path / CPU_ONNX), providers=["CPUExecutionProvider"])
    feeds = {n: t.numpy() for n, t in zip(INPUT_NAMES, ranker_inputs([0, 2, 5], 9, 6, seed=7))}
    with torch.no_grad():
        want = model(*(torch.from_numpy(feeds[n]) for n in INPUT_NAMES)).numpy()
    trimmed = trim_history_padding(feeds)
    assert trimmed["seq_mask"].shape[1] == 5
    np.testing.assert_allclose(sess.run(None, trimmed)[0], want, rtol=0, atol=1e-5)


def test_no_copy_only_pass_over_the_per_candidate_sequence(tmp_path):
    """Layer 0 never forms the early-fusion input [s_j | c] per candidate, its attention output needs no transpose,
    and the K newest rows are sliced before their zero padding: no Concat, Expand or Transpose writes a
    [batch, candidates, seq, ...] tensor (each would stream the largest activation through memory for nothing)."""
    import sympy  # ONNX Runtime's symbolic shape inference writes dims as sympy expressions

    from seqrank.exporting import export_ranker_onnx
    from seqrank.serving.cpu_graph import _shapes
    model = make_ranker("transact", seed=3, top_k_rows=4, n_heads=1, sequence_mean=True)
    for full_history in (False, True):
        graph = onnx.load(str(export_ranker_onnx(model, tmp_path / "m.onnx", full_history=full_history)))
        shapes = _shapes(graph)
        assert shapes, "symbolic shape inference followed nothing"
        copies = [(n.op_type, shapes.get(n.output[0])) for n in graph.graph.node
                  if n.op_type in ("Concat", "Expand", "Transpose")]
        # a dim that grows with the sequence (seq, seq + K; not Min(K, seq) + K): evaluated at seq = 1000
        per_candidate_sequence = [(op, shape) for op, shape in copies if shape and len(shape) == 4
                                  and shape[1] == "candidates" and "seq" in str(shape[2])
                                  and sympy.sympify(str(shape[2])).subs(sympy.Symbol("seq"), 1000) >= 1000]
        assert not per_candidate_sequence, per_candidate_sequence


def _linear_residual_graph(bias_also_output: bool):
    """LayerNorm(x + (h W + b)): a Linear's output added to a residual, its bias Add optionally a graph output too."""
    from onnx import TensorProto, helper
    rng = np.random.default_rng(2)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "s", 4])
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["n", "s", 3])
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "s", 4])]
    if bias_also_output:
        outs.append(helper.make_tensor_value_info("lin", TensorProto.FLOAT, ["n", "s", 4]))
    inits = [helper.make_tensor(name, TensorProto.FLOAT, dims, rng.normal(size=dims).ravel().tolist())
             for name, dims in (("w", [3, 4]), ("b", [4]), ("gamma", [4]), ("beta", [4]))]
    nodes = [helper.make_node("MatMul", ["h", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["lin"]),
             helper.make_node("Add", ["x", "lin"], ["sum"]),
             helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5)]
    return helper.make_model(helper.make_graph(nodes, "linear_residual", [x, h], outs, inits),
                             opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("bias_also_output", [False, True])
def test_a_linear_bias_before_the_residual_goes_into_the_kernel(bias_also_output):
    rng = np.random.default_rng(3)
    feeds = {"x": rng.normal(size=(2, 5, 4)).astype(np.float32), "h": rng.normal(size=(2, 5, 3)).astype(np.float32)}
    model = _linear_residual_graph(bias_also_output)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert fuse_skip_layernorm(model) == 1
    skip = [n for n in model.graph.node if n.op_type == "SkipLayerNormalization"]
    # folded only where the bias Add feeds nothing else (here it is also a graph output)
    assert (len(skip[0].input) == 5) == (not bias_also_output)
    assert [n.op_type for n in model.graph.node].count("Add") == int(bias_also_output)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)


def _layernorm_graph(skip_shape):
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "s", 4])
    skip = helper.make_tensor_value_info("skip", TensorProto.FLOAT, skip_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "s", 4])
    rng = np.random.default_rng(0)
    inits = [helper.make_tensor("gamma", TensorProto.FLOAT, [4], rng.normal(size=4).tolist()),
             helper.make_tensor("beta", TensorProto.FLOAT, [4], rng.normal(size=4).tolist())]
    nodes = [helper.make_node("Add", ["x", "skip"], ["sum"]),
             helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5)]
    graph = helper.make_graph(nodes, "ln", [x, skip], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_only_same_shape_residuals_are_fused():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 5, 4)).astype(np.float32)
    for skip_shape, skip, fusable in ((["n", "s", 4], rng.normal(size=(3, 5, 4)), True),
                                      ([4], rng.normal(size=4), False),            # a broadcast bias
                                      ([1, "s", 4], rng.normal(size=(1, 5, 4)), False)):
        model = _layernorm_graph(skip_shape)
        plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        want = plain.run(None, {"x": x, "skip": skip.astype(np.float32)})[0]
        assert fuse_skip_layernorm(model) == int(fusable)
        assert ("SkipLayerNormalization" in [n.op_type for n in model.graph.node]) == fusable
        got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x, "skip": skip.astype(np.float32)})[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_the_stub_loads_the_fused_graph_where_export_wrote_one(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"portable")
    assert cpu_graph_path(tmp_path) == tmp_path / "model.onnx"  # a repository exported before the CPU graph
    (tmp_path / CPU_ONNX).write_bytes(b"fused")
    assert cpu_graph_path(tmp_path) == tmp_path / CPU_ONNX


def _branch_run(sess, feeds) -> tuple[np.ndarray, set[str]]:
    """Scores, and which If branch's nodes ONNX Runtime's profiler saw run."""
    probs = sess.run(None, feeds)[0]
    events = json.loads(Path(sess.end_profiling()).read_text())
    return probs, {e["name"].split("/")[0] for e in events if e.get("cat") == "Node" and "/" in e["name"]}


@pytest.mark.parametrize("lengths, width, branch", [([6, 6], 6, "full"), ([6, 2], 6, "masked"),
                                                    ([3], 6, "full"), ([0], 6, "masked"), ([0, 4], 6, "masked")],
                         ids=["full-histories", "one-short", "one-user-trimmed", "cold-start", "cold-and-short"])
def test_the_unmasked_branch_runs_exactly_when_every_position_is_real(tmp_path, lengths, width, branch):
    model = make_ranker("transact", seed=6, top_k_rows=3)
    path, _ = _cpu_graph(model, tmp_path)
    feeds = trim_history_padding({n: t.numpy() for n, t in zip(INPUT_NAMES, ranker_inputs(lengths, width, 5, seed=1))})
    with torch.no_grad():
        want = model(*(torch.from_numpy(feeds[n]) for n in INPUT_NAMES)).numpy()
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    got, ran = _branch_run(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), feeds)
    assert {"full", "masked"} & ran == {branch}
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_the_branches_share_their_weights(tmp_path):
    """The item table and every other weight are stored once, in the outer graph, not once per branch."""
    model = make_ranker("transact", seed=6)
    path, _ = _cpu_graph(model, tmp_path)
    graph = onnx.load(str(path)).graph
    table = list(model.item_table.shape)
    outer = [list(i.dims) for i in graph.initializer]
    inner = [list(i.dims) for n in _nodes(graph) for a in n.attribute if a.type == onnx.AttributeProto.GRAPH
             for i in a.g.initializer]
    assert outer.count(table) == 1 and not inner  # both branches read every weight from the outer graph


def test_a_ranker_without_a_sequence_gets_no_branch(tmp_path):
    from seqrank.exporting import export_ranker_onnx
    model = make_ranker("no_sequence", seed=6)
    portable = export_ranker_onnx(model, tmp_path / "model.onnx")
    full = export_ranker_onnx(model, tmp_path / "full.onnx", full_history=True)
    loaded = onnx.load(str(portable))
    assert "seq_mask" not in {i.name for i in loaded.graph.input}  # unused, so the exporter dropped it
    assert add_full_history_branch(loaded, onnx.load(str(full))) is False
    assert "If" not in [n.op_type for n in loaded.graph.node]
    from seqrank.exporting import export_cpu_graph
    assert export_cpu_graph(model, portable, tmp_path / CPU_ONNX)[1] is False  # what export records
