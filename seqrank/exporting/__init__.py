"""Export: a trained run -> a Triton model repository, in one package.

  repository.py     the run -> ONNX (parity-checked against PyTorch), the CPU graph beside it, the lookup tables,
                    every config.pbtxt rendered from model_repository/ (`seqrank export`, export_run)
  onnx_files.py     one save rule for every graph: weights of at least 16 MiB go to ONNX external data
  triton_config.py  every config edit through Triton's model_config protobuf and text_format (the one renderer; also
                    the container entrypoint's, `python -m seqrank.exporting.triton_config`)
  sizing.py         the GPU pod's CPU-step instance counts from their measured cost (configs/h200.pbtxt)
The CPU graph rewrite itself is seqrank/serving/cpu_graph.py (the CPU ranker reads it inside Triton); TensorRT
engines are built on the target GPU by export/build_trt.py, from these ONNX files and constants.

The names of repository.py are importable from here (`from seqrank.exporting import export_run`), loaded on first
use: the serving container imports triton_config without torch, so this file imports nothing heavy.
"""
_REPOSITORY = ("TEMPLATE", "OPSET", "USER_TOWER_INPUTS", "PARITY_TOLERANCE", "RUN_PARAMETERS", "load_ranker",
               "load_user_tower", "example_inputs", "export_ranker_onnx", "export_cpu_graph", "export_user_tower_onnx",
               "user_tower_inputs", "check_user_tower_parity", "parity_shapes", "check_parity",
               "write_ranker_version", "render_config", "template_digest", "is_current_export", "export_run")


def __getattr__(name: str):
    if name not in _REPOSITORY:
        raise AttributeError(f"module 'seqrank.exporting' has no attribute {name!r}")
    from . import repository
    return getattr(repository, name)
