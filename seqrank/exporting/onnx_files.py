"""Where an exported ONNX graph keeps its weights: large tensors in ONNX external data beside the graph.

A protobuf message cannot pass 2 GB, and the item table is a weight of the ranker (and of the CPU graph and the user
tower), so inside the file a 64-d fp32 catalogue stops near 8.4M items. The rule: every weight of at least
EXTERNAL_DATA_THRESHOLD bytes is written to ``<file>.data`` beside the graph (``model.onnx`` -> ``model.onnx.data``),
the rest stays inside the protobuf. For this ranker that is the item table alone, from 65,536 items at 64-d,
so a small catalogue (the demo's) keeps one self-contained file. ONNX Runtime (and Triton's onnxruntime backend,
which loads the model by path) reads the data file from the graph's directory; on the CPU it memory-maps it, so every
session on a host shares one copy of the table in the page cache instead of holding its own (docs/deployment.md,
"Large catalogues").

onnx is imported where it is used: export/build_trt.py imports this module in the serving image, which has no onnx.
"""
from __future__ import annotations

from pathlib import Path

EXTERNAL_DATA_THRESHOLD = 16 << 20  # bytes; 16 MiB = 65,536 items x 64 dims x 4 bytes


def external_data_path(model_path: str | Path) -> Path:
    """The file save_onnx writes a graph's large weights to: ``model.onnx`` -> ``model.onnx.data``, same directory."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".data")


def save_onnx(model, path: str | Path, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Write ``model`` (an onnx.ModelProto) to ``path``: every initializer of at least ``external_data_threshold``
    bytes goes to external_data_path(path), the rest into the protobuf. Any earlier data file there is replaced
    (onnx appends to an existing one), and none is left where no weight is that large. The moved weights leave
    ``model`` too (it then refers to the file), as onnx.save_model does. Returns ``path``."""
    import onnx

    path = Path(path)
    data = external_data_path(path)
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=external_data_threshold)
    return path
