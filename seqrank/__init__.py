"""seqrank: sequence-aware ranking served on NVIDIA Triton.

    from seqrank import train, evaluate, export, Client
    run = train("data/kuairand/events.tsv.gz", "runs/mine")        # PinnerFormer + the TransAct ranker
    metrics = evaluate(run, seeds=[0, 1, 2, 3, 4])                # against both baselines, with intervals
    repository = export(run)                                       # ONNX + parity check -> a Triton model repository
    with Client("127.0.0.1:8001") as client:                       # once `seqrank serve` runs it
        print(client.rank("111", ["3892024", "2629583"]).items)

The names are imported on first use, so `import seqrank` stays light (the Triton Python stubs import the package).
"""
__version__ = "0.2.0"  # recorded in every run.json; a run loads only into the version that wrote it

_API = {"train": ("pipeline", "train"), "evaluate": ("evaluation", "evaluate"), "export": ("exporting", "export_run"),
        "Client": ("client", "RankingClient")}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'seqrank' has no attribute {name!r}")
    from importlib import import_module
    module, attr = _API[name]
    return getattr(import_module(f".{module}", __name__), attr)
