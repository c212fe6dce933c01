"""Export a trained run for Triton: ONNX (dynamic batch/sequence/candidate axes, parity-checked against torch),
the lookup tables preprocess memory-maps, and a model repository rendered from the template in model_repository/.
TensorRT engines are built on the target GPU from the ONNX file (export/build_trt.py), never here.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import warnings
from typing import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .. import __version__
from ..config import RunConfig
from ..features import FIRST_ID, N_CONTEXT, Vocabulary
from ..models.inference import ranker_for_serving, user_tower_for_serving
from ..models.pinnerformer import N_TIME_FEATURES, PinnerFormer
from ..models.transact import INPUT_NAMES, OUTPUT_NAMES, TransActRanker
from ..serving.batching import SEQUENCE_INPUTS
from ..serving.cpu_graph import CPU_ONNX, write_cpu_graph
from ..serving.preprocess import CANDIDATE_BUCKETS, check_buckets
from . import triton_config
from .onnx_files import EXTERNAL_DATA_THRESHOLD, save_onnx
from .sizing import write_gpu_pod_configs

TEMPLATE = Path(__file__).resolve().parents[2] / "model_repository"
OPSET = 17
USER_TOWER_INPUTS = ["seq_item", "seq_action", "seq_time", "seq_mask"]
PARITY_TOLERANCE = 1e-4


def load_ranker(run: Path) -> tuple[TransActRanker, RunConfig, Vocabulary]:
    run = Path(run)
    cfg = RunConfig.load_saved(run)
    vocab = Vocabulary.load(run / "vocab", mmap=False)
    table = np.load(run / "item_table.npy")
    model = TransActRanker(cfg.transact, table, vocab.n_actions, cfg.pinnerformer.dim, N_CONTEXT, len(vocab.heads))
    model.load_state_dict(load_file(run / "ranker.safetensors"))
    return model.eval(), cfg, vocab


def load_user_tower(run: Path, cfg: RunConfig, vocab: Vocabulary) -> PinnerFormer:
    model = PinnerFormer(cfg.pinnerformer, vocab.n_items, vocab.n_actions)
    model.load_state_dict(load_file(Path(run) / "pinnerformer.safetensors"))
    return model.eval()


def example_inputs(model: TransActRanker, batch: int, seq_len: int, n_cand: int, valid: int | None = None,
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random, well-formed ranker inputs; `valid` = real actions per row (default: random lengths >= 1)."""
    g = torch.Generator().manual_seed(seed)
    n_items, n_actions = model.item_table.shape[0], model.action_emb.num_embeddings
    lengths = (torch.full((batch,), valid) if valid is not None
               else torch.randint(1, seq_len + 1, (batch,), generator=g))
    mask = torch.arange(seq_len)[None, :] < lengths[:, None]
    seq_item = torch.randint(FIRST_ID, n_items, (batch, seq_len), generator=g) * mask
    seq_action = torch.randint(FIRST_ID, n_actions, (batch, seq_len), generator=g) * mask
    user_emb = torch.nn.functional.normalize(torch.randn(batch, model.user_dim, generator=g), dim=-1)
    context = torch.randn(batch, model.n_context, generator=g)
    cand = torch.randint(FIRST_ID, n_items, (batch, n_cand), generator=g)
    return seq_item, seq_action, mask, user_emb, context, cand


def _trace_onnx(module: torch.nn.Module, inputs: tuple, path: Path, external_data_threshold: int,
                **export_args) -> Path:
    """torch.onnx.export of ``module`` on ``inputs``, written by save_onnx (its large weights, the item table, in
    external data beside ``path``). Traced into a scratch directory first: past 2 GB torch writes every weight to a
    file of its own, named after the weight, next to the graph."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = Path(tmp) / "model.onnx"
        torch.onnx.export(module, inputs, str(traced), opset_version=OPSET, dynamo=False, **export_args)
        return save_onnx(onnx.load(str(traced)), path, external_data_threshold)


def export_ranker_onnx(model: TransActRanker, path: Path, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
                       **rewrites: bool) -> Path:
    """Trace the trained (paper-form) ``model`` as served: models/inference.py's ranker_for_serving, whose options
    ``rewrites`` switch each rewrite (all on by default); full_history=True traces the form without masking, valid
    only where every sequence position is a real action (the CPU graph runs it for such runs). Weights of at least
    ``external_data_threshold`` bytes go to external data beside ``path`` (seqrank/exporting/onnx_files.py)."""
    dyn = {"seq_item": {0: "batch", 1: "seq"}, "seq_action": {0: "batch", 1: "seq"}, "seq_mask": {0: "batch", 1: "seq"},
           "user_emb": {0: "batch"}, "context": {0: "batch"}, "cand_item": {0: "batch", 1: "candidates"},
           "probs": {0: "batch", 1: "candidates"}}
    return _trace_onnx(ranker_for_serving(model, **rewrites), example_inputs(model, 2, 12, 3), path,
                       external_data_threshold, input_names=INPUT_NAMES, output_names=OUTPUT_NAMES, dynamic_axes=dyn)


def export_cpu_graph(model: TransActRanker, portable: Path, dst: Path,
                     external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, **rewrites: bool) -> tuple[int, bool]:
    """The CPU ranker's graph from the portable export of ``model`` (with the same ``rewrites``): ONNX Runtime's
    fused residual + LayerNorm and, for TransAct, a branch traced without masking for runs where every history
    position is a real action (serving/cpu_graph.py). Returns (fused pairs, whether the branch was added)."""
    with tempfile.TemporaryDirectory() as tmp:
        full = (export_ranker_onnx(model, Path(tmp) / "model_full_history.onnx", external_data_threshold,
                                   **rewrites, full_history=True)
                if model.cfg.sequence_encoder == "transact" else None)
        return write_cpu_graph(portable, dst, full, external_data_threshold), full is not None


def export_user_tower_onnx(model: PinnerFormer, path: Path,
                           external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """PinnerFormer user tower for on-demand embeddings (inputs built by the same feature path), traced as served
    (models/inference.py's user_tower_for_serving); its item embedding table follows the ranker's external-data
    rule."""
    dyn = {n: {0: "batch", 1: "seq"} for n in USER_TOWER_INPUTS} | {"user_emb": {0: "batch"}}
    return _trace_onnx(user_tower_for_serving(model), user_tower_inputs(model, [12, 3]), path, external_data_threshold,
                       input_names=USER_TOWER_INPUTS, output_names=["user_emb"], dynamic_axes=dyn)


def user_tower_inputs(model: PinnerFormer, lengths: list[int], seq_len: int = 12, seed: int = 0) -> tuple:
    """Random, well-formed user-tower inputs with the given real lengths (padding after)."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    mask = torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]
    return (torch.randint(FIRST_ID, model.item_emb.num_embeddings, (B, seq_len), generator=g) * mask,
            torch.randint(FIRST_ID, model.action_emb.num_embeddings, (B, seq_len), generator=g) * mask,
            torch.randn(B, seq_len, N_TIME_FEATURES, generator=g), mask)


def check_user_tower_parity(model: PinnerFormer, onnx_path: Path, seq_len: int) -> float:
    """The exported user tower against PyTorch on full, short, one-action and empty histories; the max abs diff."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs = user_tower_inputs(model, [seq_len, seq_len // 2, 1, 0], seq_len, seed=1)
    with torch.no_grad():
        expected = model(*inputs).numpy()
    got = sess.run(None, {n: t.numpy() for n, t in zip(USER_TOWER_INPUTS, inputs)})[0]
    diff = float(np.abs(got - expected).max())
    if not diff <= PARITY_TOLERANCE:
        raise AssertionError(f"user tower ONNX parity failed: max abs diff {diff:.3g} > {PARITY_TOLERANCE}")
    return diff


def parity_shapes(seq_len: int) -> list[dict]:
    """The shapes the parity check covers: 1 candidate; a sequence of length 1; all padding but one position;
    a full batch at serving size; an empty history (cold start); full histories (the CPU graph's unmasked branch)."""
    return [dict(batch=1, seq_len=seq_len, n_cand=1), dict(batch=2, seq_len=1, n_cand=5),
            dict(batch=3, seq_len=seq_len, n_cand=7, valid=1), dict(batch=4, seq_len=seq_len, n_cand=100),
            dict(batch=2, seq_len=seq_len, n_cand=16, valid=0), dict(batch=2, seq_len=seq_len, n_cand=9, valid=seq_len)]


def check_parity(model: TransActRanker, onnx_path: Path, seq_len: int) -> list[dict]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    report = []
    for i, shape in enumerate(parity_shapes(seq_len)):
        inputs = example_inputs(model, seed=i, **shape)
        with torch.no_grad():
            expected = model(*inputs).numpy()
        got = sess.run(None, {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs)})[0]
        diff = float(np.abs(got - expected).max())
        report.append({**shape, "max_abs_diff": diff})
        if not diff <= PARITY_TOLERANCE:
            raise AssertionError(f"ONNX parity failed for {shape}: max abs diff {diff:.3g} > {PARITY_TOLERANCE}")
    return report


def write_ranker_version(model: TransActRanker, version_dir: Path, seq_len: int, check: bool = True,
                         external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> dict:
    """One ranker version directory: model.onnx (portable) and the CPU graph beside it (weights of at least
    ``external_data_threshold`` bytes as external data); with `check`, both are compared with PyTorch on the parity
    shapes (the export fails above the tolerance). Returns the paths, the parity reports and what the CPU graph
    rewrite did."""
    onnx_path = export_ranker_onnx(model, Path(version_dir) / "model.onnx", external_data_threshold)
    parity = check_parity(model, onnx_path, seq_len) if check else []
    cpu_path = onnx_path.parent / CPU_ONNX
    fused, branch = export_cpu_graph(model, onnx_path, cpu_path, external_data_threshold)
    cpu_parity = check_parity(model, cpu_path, seq_len) if check else []
    return {"onnx": onnx_path, "cpu_onnx": cpu_path, "parity": parity, "cpu_parity": cpu_parity,
            "fused_skip_layernorm": fused, "full_history_branch": branch}


# The run's numbers a template declares, by name (seqrank.exporting.triton_config.fill): tensor dims and parameters.
RUN_PARAMETERS = ("heads", "utility_weights", "candidate_buckets", "max_candidates", "seq_len", "n_items", "n_actions")


def render_config(text: str, values: dict[str, int | str], source: str | Path = "<config>") -> str:
    """A template config with a run's ``values`` filled in through Triton's ModelConfig protobuf, wherever the
    template declares them: the dims of seq_item/seq_action/seq_mask ([seq_len]), user_emb ([user_dim]), context
    ([n_context]) and probs/head_scores ([-1, n_heads]) as inputs, outputs or warmup inputs (a dim the template
    declares -1 stays -1), and the RUN_PARAMETERS by key. Returns the printed config; a template that does not
    parse raises triton_config.ConfigError naming ``source``."""
    dims = {name: [values["seq_len"]] for name in SEQUENCE_INPUTS}
    dims |= {"user_emb": [values["user_dim"]], "context": [values["n_context"]],
             "probs": [-1, values["n_heads"]], "head_scores": [-1, values["n_heads"]]}
    parameters = {key: values[key] for key in RUN_PARAMETERS}
    config = triton_config.parse(text, source)
    return triton_config.dump(triton_config.fill(config, dims, parameters, source))


def template_digest() -> str:
    """What an exported repository was made from: this version of seqrank and the bytes of every template file (the
    ensemble's inputs and outputs, the model.py files). A repository exported from another is stale."""
    h = hashlib.sha256(__version__.encode())
    for f in sorted(p for p in TEMPLATE.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(str(f.relative_to(TEMPLATE)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


EXPORTED_RUN_FILES = ("config.json", "ranker.safetensors", "pinnerformer.safetensors", "item_table.npy", "users.npy",
                      "user_emb.npy")


def run_digest(run: Path) -> str:
    """The bytes of the run files an export is made from (weights, daily batch, vocabulary, config): a run trained
    again differently since its export makes that export stale."""
    run = Path(run)
    h = hashlib.sha256()
    for f in [run / name for name in EXPORTED_RUN_FILES] + sorted((run / "vocab").rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(run)).encode() + b"\0")
            with open(f, "rb") as data:
                for block in iter(lambda: data.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def is_current_export(run: Path, repository: Path | None = None) -> bool:
    """Whether `repository` (default RUN/model_repository) holds an export of `run` as it is now (run_digest) made
    from today's template."""
    run = Path(run)
    repository = Path(repository) if repository else run / "model_repository"
    try:
        summary = json.loads((run / "export" / "export.json").read_text())
    except (OSError, ValueError):
        return False
    return (summary.get("template_digest") == template_digest() and summary.get("run_digest") == run_digest(run)
            and (repository / "ranker" / "1" / "model.onnx").exists())


def export_run(run: Path, repository: Path | None = None, check: bool = True,
               external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
               candidate_buckets: Sequence[int] | None = None) -> Path:
    """A trained run -> a Triton model repository (default RUN/model_repository): the ranker as ONNX (portable, and
    the CPU graph beside it), the lookup tables for preprocess, every config.pbtxt filled in; with `check`, the ONNX
    files are compared with PyTorch on several shapes and the export fails above the parity tolerance. Weights of at
    least ``external_data_threshold`` bytes (a large item table) go to ONNX external data beside each graph
    (seqrank/exporting/onnx_files.py). ``candidate_buckets``: the counts preprocess pads a request's candidates to
    (default CANDIDATE_BUCKETS; docs/deployment.md, "Candidate buckets")."""
    buckets = check_buckets(CANDIDATE_BUCKETS if candidate_buckets is None else candidate_buckets)
    run = Path(run)
    repository = Path(repository) if repository else run / "model_repository"
    model, cfg, vocab = load_ranker(run)
    if repository.exists():
        shutil.rmtree(repository)
    shutil.copytree(TEMPLATE, repository, ignore=shutil.ignore_patterns("__pycache__", "*.onnx", "tables"))
    ranker = write_ranker_version(model, repository / "ranker" / "1", cfg.transact.seq_len, check,
                                  external_data_threshold)
    onnx_path, cpu_path, parity, cpu_parity = ranker["onnx"], ranker["cpu_onnx"], ranker["parity"], ranker["cpu_parity"]
    fused, branch = ranker["fused_skip_layernorm"], ranker["full_history_branch"]
    tower = load_user_tower(run, cfg, vocab)
    tower_path = export_user_tower_onnx(tower, run / "export" / "user_tower.onnx", external_data_threshold)
    tower_parity = check_user_tower_parity(tower, tower_path, cfg.pinnerformer.max_len) if check else None

    tables = repository / "preprocess" / "1" / "tables"
    vocab.save(tables)
    users = np.load(run / "users.npy")
    order = np.argsort(users)  # sorted for a vectorised binary search, like the item vocabulary
    np.save(tables / "users.npy", users[order])
    np.save(tables / "user_emb.npy", np.load(run / "user_emb.npy")[order])
    negative = set(vocab.negative_actions)
    weights = [cfg.utility_weights.get(h, 1.0) * (-1.0 if h in negative else 1.0) for h in vocab.heads]
    values = {"user_dim": cfg.pinnerformer.dim, "n_context": N_CONTEXT, "n_heads": len(vocab.heads),
              "seq_len": cfg.transact.seq_len, "heads": ",".join(vocab.heads),
              "utility_weights": ",".join(f"{w:g}" for w in weights),
              "candidate_buckets": ",".join(map(str, buckets)), "max_candidates": buckets[-1],
              "n_items": int(model.item_table.shape[0]), "n_actions": int(model.action_emb.num_embeddings)}
    for config in repository.rglob("*.pbtxt"):
        config.write_text(render_config(config.read_text(), values, config))
    write_gpu_pod_configs(repository)
    summary = {"repository": str(repository), "template_digest": template_digest(), "run_digest": run_digest(run),
               "onnx": str(onnx_path),
               "parity": parity,
               "cpu_onnx": {"path": str(cpu_path), "fused_skip_layernorm": fused,
                            "full_history_branch": branch, "parity": cpu_parity},
               "user_tower": {"path": str(tower_path), "max_abs_diff": tower_parity}, **values}
    (run / "export").mkdir(exist_ok=True)
    (run / "export" / "export.json").write_text(json.dumps(summary, indent=2))
    worst = {name: max((p["max_abs_diff"] for p in report), default=float("nan"))
             for name, report in (("portable", parity), ("cpu", cpu_parity))}
    print(f"exported {run} -> {repository}; ONNX parity max abs diff {worst['portable']:.2e} (CPU graph, {fused} fused "
          f"residual+LayerNorm{', a full-history branch' if branch else ''}: {worst['cpu']:.2e})")
    return repository
