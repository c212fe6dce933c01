"""The ranker graph for ONNX Runtime's CPU provider: model.onnx with each residual Add + LayerNormalization pair
fused into ONNX Runtime's SkipLayerNormalization, and a second, unmasked copy of the ranker that runs when every
history position of the run is a real action.

ONNX Runtime fuses this pair itself only for 2-D/3-D activations; TransAct's are [B, N, S, d] (one sequence per
candidate), so its optimizer leaves four Adds and four LayerNorms that each stream the whole activation through
memory (about a third of the CPU kernel time at 1 x 100, docs/performance.md). Viewed as [-1, d] (a reshape, no
copy) both operands go through the contrib kernel, which adds and normalises in one pass; the bias of a Linear that
feeds the residual (feed-forward out, attention out) goes in as the kernel's bias input, saving its Add pass too.
The op is ONNX Runtime's own (domain com.microsoft), so the GPU paths (TensorRT, ONNX Runtime CUDA) keep the
portable model.onnx; `seqrank export` writes this file beside it and checks it against PyTorch like the portable
one.

The masks (padding never attended, pooled or output) cost ~12 % of the CPU time at 1 x 100: a Where over every
candidate's [S, S] scores, another before max-pooling, the multiplications by the row mask. After history trimming
(serving/batching.py) a single user's run has no padding left unless the history is empty, and on a mask of all
True those steps are identities, so an If node picks the ranker traced without them (models/inference.py, full_history):
bitwise the same scores, 1.09-1.11x faster (docs/performance.md).
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from ..exporting.onnx_files import EXTERNAL_DATA_THRESHOLD, save_onnx

CPU_ONNX = "model_cpu.onnx"  # beside model.onnx in the ranker's version directory
CONTRIB = "com.microsoft"
SHAPE_VALUE_ELEMENTS = 1024  # initializers this small keep their values for shape inference (shapes, axes)
# onnx is imported where it is used: the ranker stub only needs cpu_graph_path


def _without_weights(model):
    """A copy of ``model`` whose initializers above SHAPE_VALUE_ELEMENTS keep their type and dims but not their
    data: shape inference reads the values of shape and axes tensors only, and copying the item table would cost
    its size again (inference copies the model it is given)."""
    import onnx
    light = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, functions=model.functions)
    g, graph = model.graph, light.graph
    graph.name = g.name
    for field in ("node", "input", "output", "value_info"):
        getattr(graph, field).extend(getattr(g, field))
    for init in g.initializer:
        if math.prod(init.dims) <= SHAPE_VALUE_ELEMENTS:
            graph.initializer.add().CopyFrom(init)
        else:
            graph.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims)
    return light


def _shapes(model) -> dict[str, list]:
    """Every tensor's shape by ONNX Runtime's symbolic shape inference, without merging symbols (so two dims are
    the same only where the graph proves it: the export's dynamic axes propagate as `batch`, `candidates`, `seq`)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    try:
        inferred = SymbolicShapeInference.infer_shapes(_without_weights(model), auto_merge=False)
    except Exception:  # a graph it cannot follow: nothing is proven, so nothing is fused (export prints the count)
        return {}
    out = {i.name: list(i.dims) for i in inferred.graph.initializer}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if v.type.tensor_type.HasField("shape"):
            out[v.name] = [d.dim_param if d.HasField("dim_param") else d.dim_value if d.HasField("dim_value")
                           else None for d in v.type.tensor_type.shape.dim]
    return out


def _same_shape(a: list | None, b: list | None) -> bool:
    """Proven equal: the same rank and, dim by dim, the same size or the same symbol (a broadcast, or a dimension
    nothing names, is never fused)."""
    return a is not None and b is not None and len(a) == len(b) and all(x is not None and x == y for x, y in zip(a, b))


def fuse_skip_layernorm(model) -> int:
    """Rewrite `LayerNormalization(Add(a, b))` over the last axis, where the Add feeds nothing else and a and b have
    the same shape, as `Reshape(SkipLayerNormalization(a', b', gamma, beta[, bias]), shape(a))` with a', b' = [-1, d].
    Where b is itself `Add(m, bias)` with a [d] bias and feeds only this residual (a Linear's output: the feed-forward's
    second layer, attention's output projection), the bias goes to the kernel's bias input and m in place of b: one
    more pass over the activation saved. In place (an onnx.ModelProto); returns the number of pairs fused."""
    import onnx
    from onnx import helper
    g = model.graph
    nodes = list(g.node)
    consumers: dict[str, int] = defaultdict(int)
    for node in nodes:
        for name in node.input:
            consumers[name] += 1
    graph_outputs = {o.name for o in g.output}
    producer = {o: i for i, node in enumerate(nodes) for o in node.output}  # tensor -> index of its node
    shapes = _shapes(model)
    replace: dict[int, list] = {}  # node index -> the nodes that take its place
    drop: set[int] = set()
    for i, node in enumerate(nodes):
        if node.op_type != "LayerNormalization" or len(node.input) < 3 or not node.input[2]:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        j = producer.get(node.input[0])
        add = nodes[j] if j is not None else None
        gamma = shapes.get(node.input[1])
        d = gamma[0] if gamma is not None and len(gamma) == 1 and isinstance(gamma[0], int) else None
        if (add is None or add.op_type != "Add" or consumers[add.output[0]] != 1 or add.output[0] in graph_outputs
                or attrs.get("axis", -1) not in (-1, len(shapes.get(add.input[0]) or []) - 1)
                or not _same_shape(shapes.get(add.input[0]), shapes.get(add.input[1]))
                or d is None or shapes[add.input[0]][-1] != d):
            continue
        a, b, bias = add.input[0], add.input[1], []
        for first, second in ((a, b), (b, a)):
            folded = _linear_bias(nodes, producer, consumers, shapes, second, first, d, graph_outputs)
            if folded is not None:
                (m, bias_name), index = folded
                a, b, bias = first, m, [bias_name]
                drop.add(index)
                break
        k = node.output[0]
        rows = helper.make_tensor(f"{k}/rows_shape", onnx.TensorProto.INT64, [2], [-1, d])
        replace[i] = [
            helper.make_node("Constant", [], [f"{k}/rows"], value=rows),
            helper.make_node("Shape", [a], [f"{k}/shape"]),
            helper.make_node("Reshape", [a, f"{k}/rows"], [f"{k}/a"]),
            helper.make_node("Reshape", [b, f"{k}/rows"], [f"{k}/b"]),
            helper.make_node("SkipLayerNormalization", [f"{k}/a", f"{k}/b", node.input[1], node.input[2], *bias],
                             [f"{k}/y"], name=f"{node.name}/skip", domain=CONTRIB,
                             epsilon=float(attrs.get("epsilon", 1e-5))),
            helper.make_node("Reshape", [f"{k}/y", f"{k}/shape"], [k]),
        ]
        drop.add(j)
    if not replace:
        return 0
    rewritten = []
    for i, node in enumerate(nodes):
        if i in replace:
            rewritten.extend(replace[i])
        elif i not in drop:
            rewritten.append(node)
    del g.node[:]
    g.node.extend(rewritten)
    if not any(o.domain == CONTRIB for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB, 1))
    return len(replace)


def _linear_bias(nodes, producer, consumers, shapes, name, other, d, graph_outputs):
    """((m, bias), index of the Add) where tensor ``name`` is `Add(m, bias)` (either order) with bias of shape [d], m
    proven the same shape as ``other``, and the Add feeding nothing but the residual; else None."""
    j = producer.get(name)
    if j is None or nodes[j].op_type != "Add" or consumers[name] != 1 or name in graph_outputs:
        return None
    x, y = nodes[j].input
    for m, bias in ((x, y), (y, x)):
        if shapes.get(bias) == [d] and _same_shape(shapes.get(m), shapes.get(other)):
            return (m, bias), j
    return None


def _content_key(init) -> bytes:
    """An initializer's identity without its name: two exports of one model name equal weights differently. Field by
    field, the data as it is: serializing a copy of the whole tensor would cost an item table's size twice more."""
    import hashlib
    digest = hashlib.sha256()
    for field, value in init.ListFields():
        if field.name != "name":
            digest.update(field.name.encode())
            digest.update(value if field.name == "raw_data" else repr(value).encode())
    return digest.digest()


def _branch(graph, prefix: str, outer: set[str], shared: dict[str, str]):
    """``graph`` as an If branch: every tensor and node name it defines gets ``prefix`` (names must be unique
    across a model's scopes); the outer graph's inputs and ``shared`` initializers (name -> outer name) are read
    from the enclosing scope."""
    from onnx import helper

    def rename(name: str) -> str:
        if not name or name in outer:
            return name
        return shared.get(name, prefix + name)

    body = helper.make_graph([], prefix + graph.name, [], [])
    for i, node in enumerate(graph.node):
        copy = body.node.add()
        copy.CopyFrom(node)
        copy.name = prefix + (node.name or f"unnamed_{i}_{node.op_type}")
        copy.input[:] = [rename(n) for n in node.input]
        copy.output[:] = [rename(n) for n in node.output]
    for init in graph.initializer:
        if init.name not in shared:
            copy = body.initializer.add()
            copy.CopyFrom(init)
            copy.name = prefix + init.name
    for out in graph.output:
        copy = body.output.add()
        copy.CopyFrom(out)
        copy.name = rename(out.name)
    return body


def add_full_history_branch(model, full) -> bool:
    """Make ``model`` (the ranker graph) run ``full`` (the same ranker traced with ranker_for_serving's full_history:
    no masking) whenever every position of seq_mask is a real action, through one If node: after history trimming
    (serving/batching.py) that is every single-user run with a non-empty history, and multi-user runs whose users
    all have a full history. The two graphs' equal initializers (the item table above all) are stored once, in the
    outer graph. In place; False (nothing changed) for a graph without a seq_mask input."""
    import onnx
    from onnx import helper
    g = model.graph
    outer = {i.name for i in g.input}
    if "seq_mask" not in outer:
        return False
    keys = [{init.name: _content_key(init) for init in graph.initializer} for graph in (g, full.graph)]
    common = sorted(set(keys[0].values()) & set(keys[1].values()))
    outer_name = {key: f"shared/{i}" for i, key in enumerate(common)}
    shared = [{name: outer_name[key] for name, key in k.items() if key in outer_name} for k in keys]
    masked_branch = _branch(g, "masked/", outer, shared[0])
    full_branch = _branch(full.graph, "full/", outer, shared[1])
    outputs = [o.name for o in g.output]
    nodes = [
        helper.make_node("Cast", ["seq_mask"], ["full_history/mask_int"], to=onnx.TensorProto.INT32),
        helper.make_node("ReduceMin", ["full_history/mask_int"], ["full_history/min"], keepdims=0),
        helper.make_node("Cast", ["full_history/min"], ["full_history/all_real"], to=onnx.TensorProto.BOOL),
        helper.make_node("If", ["full_history/all_real"], outputs, name="full_history/if",
                         then_branch=full_branch, else_branch=masked_branch),
    ]
    del g.node[:]
    g.node.extend(nodes)
    kept = set()  # the outer graph keeps one of each shared initializer, renamed in place: no copy of the table
    for i in reversed(range(len(g.initializer))):
        name = shared[0].get(g.initializer[i].name)
        if name is None or name in kept:
            del g.initializer[i]
        else:
            g.initializer[i].name = name
            kept.add(name)
    del g.value_info[:]
    for op in full.opset_import:
        if all(o.domain != op.domain for o in model.opset_import):
            model.opset_import.append(op)
    return True


def write_cpu_graph(src: Path, dst: Path, full_history_src: Path | None = None,
                    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> int:
    """model.onnx -> the CPU graph; returns the number of fused pairs (0: dst is a plain copy of src).
    ``full_history_src``: the ranker exported without masking, run when seq_mask is all True
    (add_full_history_branch). Either source may keep weights in external data (onnx.load reads it from the
    source's directory); dst gets its own, under the same rule (seqrank/exporting/onnx_files.py)."""
    import onnx
    model = onnx.load(str(src))
    fused = fuse_skip_layernorm(model)
    if full_history_src is not None:
        full = onnx.load(str(full_history_src))
        fuse_skip_layernorm(full)
        add_full_history_branch(model, full)
        del full  # its copy of the item table, before save_onnx copies the kept one
    save_onnx(model, dst, external_data_threshold)
    return fused


def cpu_graph_path(version_dir: Path) -> Path:
    """What the CPU ranker loads: the fused graph where export wrote one (older repositories: model.onnx)."""
    fused = Path(version_dir) / CPU_ONNX
    return fused if fused.is_file() else Path(version_dir) / "model.onnx"
