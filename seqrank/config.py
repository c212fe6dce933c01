"""One config per model, as dataclasses; a run's full config is saved as config.json next to its weights."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class DataConfig:
    negative_actions: list[str] | None = None  # None: the loader's default for the format (e.g. KuaiRand: hate)
    test_fraction: float = 0.2        # the last 20% of the time span is the test period
    session_gap_s: float = 1800.0     # a gap > 30 min starts a new session; one session = one ranking request
    pinnerformer_test_users: float = 0.2  # fraction of users held out from PinnerFormer training (disjoint eval users)
    sampled_negatives_per_positive: float = 1.0  # only for data without negatives or exposures (OTTO, clicks-only)
    embedding_period: float = 1.0     # the share of the training period that PinnerFormer and the vocabulary learn
                                      # from; the ranker trains on the impressions after it, so no training example
                                      # sees an item embedding learned from its own outcome (dataset.prepare).
                                      # 1.0 = one period for both: embeddings in-sample for the ranker
    ranker_users: str = "all"         # "all": the ranker trains on every user's impressions. "held_out": only on the
                                      # users PinnerFormer did not learn from (pinnerformer_test_users), and the
                                      # vocabulary holds only items PinnerFormer learned, so no training example's
                                      # embeddings saw its own outcome while the whole period is kept (dataset.prepare)


@dataclass
class PinnerFormerConfig:
    max_len: int = 128          # M: last actions fed to the user tower (paper: 256)
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    d_ff: int = 128
    dim: int = 64               # D: user/item embedding size (paper: 256)
    dropout: float = 0.1
    objective: str = "dense_all_action"   # or "next_action" (SASRec-style), for comparison
    future_window_days: float | None = None  # None: the log's test horizon, at most the paper's 28 days (dataset.py)
    positions_per_user: int = 32          # random positions per sequence that each predict one future positive
    random_negatives: int = 512
    batch_users: int = 32
    epochs: int = 40            # 20 before session 10, when the towers learned next to nothing in 20 (README)
    lr: float = 3e-3
    item_lr: float = 0.3        # the item embedding table's own learning rate (train.py: why it is 100x lr)
    temperature_init: float = 0.2   # the learned softmax temperature starts here (0.07 before session 10)
    positions: str = "from_oldest"  # learned positions counted from the oldest action, so a position's output does
                                # not depend on how many actions came after it; "from_newest" = runs before session 10
    weight_decay: float = 1e-4


@dataclass
class TransActConfig:
    seq_len: int = 100          # S: last 100 actions, newest first
    action_dim: int = 32        # action-type embedding
    item_dim: int = 32          # item embedding (projected from the PinnerFormer item table)
    n_layers: int = 2
    n_heads: int = 1
    d_ff: int = 32
    dropout: float = 0.1
    top_k_rows: int = 3         # K newest rows of the encoder output, + a max-pool row (10 before session 11; README)
    mean_pool_row: bool = False # beyond the paper: + a mean-pool row (rates such as the user's hide rate)
    sequence_mean: bool = True  # beyond the paper: also feed the mean of the raw action rows (what avg_pool sees):
                                # on in sessions 5-9 (with the gate below), off in 10, on since 11 (README: why)
    output_dim: int = 0         # beyond the paper: project the flattened TransAct output to this size (+ LayerNorm)
                                # before DCN v2; 0 = the paper (the (K+1) x d features go in as they are)
    output_gate_init: float | None = None  # beyond the paper: TransAct's output times a learned scalar started here
                                # (0: the ranker starts as the avg-pool model and lets TransAct in as it helps;
                                # None = off, the paper; evaluate reports a trained gate and what closing it changes)
    sequence_encoder: str = "transact"    # "transact" | "no_sequence" | "avg_pool" (baselines from the same code)
    time_window_max_h: float = 1.0        # training-only random time-window mask, T ~ U[0, 1h] (paper: 24h; README)
    cross_layers: int = 2       # DCN v2
    cross_rank: int = 64        # low-rank cross matrices
    mlp: list[int] = field(default_factory=lambda: [256, 128])
    negative_label_weight: float = 3.0    # weight on positive heads for an impression that carries a negative action
    candidate_oov_rate: float | None = None  # training only: this share of candidates is shown as the out-of-vocabulary
                                          # item, as items never seen in training are at serving time; None = the
                                          # log's own share of them (dataset.unseen_item_share); 0 = off (session 10)
    batch_size: int = 256
    epochs: int = 3
    lr: float = 2e-3
    weight_decay: float = 1e-5
    warmup_fraction: float = 0.0          # linear LR warm-up over this fraction of the steps (post-norm transformers)
    lr_decay: str = "constant"            # "constant" | "cosine" (to 0 at the last step)
    grad_clip: float = 0.0                # max global gradient norm; 0 = no clipping


# Fields added after runs were first saved whose default is not "off", with the value that reproduces a run trained
# before them (sequence_mean was added off and turned on by default in session 5, with output_gate_init, and both went
# back off in session 10; PinnerFormer's positions, item learning rate and initial temperature changed in session 10;
# candidate_oov_rate was added off in session 10 and follows the log since session 11).
FIELDS_ADDED_SINCE = {"transact": {"sequence_mean": False, "output_gate_init": None, "candidate_oov_rate": 0.0},
                      "pinnerformer": {"positions": "from_newest", "item_lr": 3e-3, "temperature_init": 0.07}}


@dataclass
class RunConfig:
    seed: int = 0
    threads: int = 2
    data: DataConfig = field(default_factory=DataConfig)
    pinnerformer: PinnerFormerConfig = field(default_factory=PinnerFormerConfig)
    transact: TransActConfig = field(default_factory=TransActConfig)
    utility_weights: dict[str, float] = field(default_factory=dict)  # head -> weight; default 1 (negatives subtract)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict) -> "RunConfig":
        def build(kind, values):
            known = {f.name for f in fields(kind)}
            unknown = set(values) - known
            if unknown:
                raise ValueError(f"unknown {kind.__name__} keys: {sorted(unknown)}")
            return kind(**values)

        raw = dict(raw)
        sub = {"data": DataConfig, "pinnerformer": PinnerFormerConfig, "transact": TransActConfig}
        parts = {k: build(v, raw.pop(k, {})) for k, v in sub.items()}
        return build(cls, {**raw, **parts})

    @classmethod
    def load_saved(cls, run: str | Path) -> "RunConfig":
        """A trained run's config.json. It is a full snapshot, so a field it lacks was added to the code after the
        run was trained: that field takes the value that reproduces the run (FIELDS_ADDED_SINCE), not today's
        default, and the run's weights still load."""
        raw = json.loads((Path(run) / "config.json").read_text())
        for section, added in FIELDS_ADDED_SINCE.items():
            raw.setdefault(section, {})
            for key, before in added.items():
                raw[section].setdefault(key, before)
        return cls.from_dict(raw)

    @classmethod
    def load(cls, path: str | Path | None) -> "RunConfig":
        if path is None:
            return cls()
        return cls.from_dict(json.loads(Path(path).read_text()))
