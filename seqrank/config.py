"""One config per model, as dataclasses; a run's full config is saved as config.json next to its weights.

They are pydantic dataclasses: every field is checked for its type and range when a config is built or a field is
set (a bad `--set` or config.json fails naming the field), and they stay plain dataclasses for the code that uses
them (dataclasses.replace, asdict)."""
from __future__ import annotations

import json
from dataclasses import asdict, field, fields
from pathlib import Path
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

Positive = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]          # strictly inside (0, 1)
Rate = Annotated[float, Field(ge=0, lt=1)]              # 0 allowed (off)
STRICT = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(config=STRICT)
class DataConfig:
    negative_actions: list[str] | None = None  # None: the loader's default for the format (e.g. KuaiRand: hate)
    test_fraction: Fraction = 0.2        # the test period holds the last 20% of the events (a quantile of their times)
    split: Literal["test", "validation"] = "test"               # "validation": drop the test period and split what precedes it the same way,
                                      # so every choice is made on a later slice of the training period
    selection_fraction: Rate = 0.1   # the ranker's newest 10% of training impressions choose its best epoch
    request_gap_s: Annotated[float, Field(ge=0)] = 60.0       # a request: a user's impressions up to 60 s after its first (dataset.py)
    pinnerformer_test_users: Rate = 0.2  # fraction of users held out from PinnerFormer training (disjoint eval users)
    sampled_negatives_per_positive: Annotated[float, Field(ge=0)] = 1.0  # only for data without negatives or exposures (OTTO, clicks-only)


@dataclass(config=STRICT)
class PinnerFormerConfig:
    max_len: Positive = 128          # M: last actions fed to the user tower (paper: 256)
    d_model: Positive = 64
    n_layers: Positive = 2
    n_heads: Positive = 2
    d_ff: Positive = 128
    dim: Positive = 64               # D: user/item embedding size (paper: 256)
    dropout: Rate = 0.1
    objective: Literal["dense_all_action", "next_action"] = "dense_all_action"   # or "next_action" (SASRec-style), for comparison
    future_window_days: PositiveFloat | None = None  # None: the log's test horizon, at most the paper's 28 days (dataset.py)
    positions_per_user: Positive = 32          # random positions per sequence that each predict one future positive
    random_negatives: Positive = 512
    batch_users: Positive = 32
    epochs: Positive = 40
    lr: PositiveFloat = 3e-3
    item_lr: PositiveFloat = 0.3        # the item embedding table's own learning rate (training.py: why it is 100x lr)
    temperature_init: PositiveFloat = 0.2   # the learned softmax temperature starts here
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4


@dataclass(config=STRICT)
class TransActConfig:
    seq_len: Positive = 100          # S: last 100 actions, newest first
    action_dim: Positive = 32        # action-type embedding
    item_dim: Positive = 32          # item embedding (projected from the PinnerFormer item table)
    n_layers: Positive = 2
    n_heads: Positive = 1
    d_ff: Positive = 32
    dropout: Rate = 0.1
    top_k_rows: Positive = 3         # K newest rows of the encoder output, + a max-pool row (paper: 10; docs/results.md)
    sequence_mean: bool = True  # beyond the paper: also feed the mean of the raw action rows (what avg_pool sees)
    sequence_encoder: Literal["transact", "no_sequence", "avg_pool"] = "transact"    # "transact" | "no_sequence" | "avg_pool" (baselines from the same code)
    time_window_max_h: Annotated[float, Field(ge=0)] = 0.1667     # training-only random time-window mask, T ~ U[0, W], W = 10 min (paper:
                                          # 24 h), chosen on the validation split over 0 / 10 min / 1 h / 24 h
                                          # (docs/results.md)
    history_outage_share: Rate = 0.05  # training only: this share of rows is served as in a store outage (empty
                                       # sequence, context flag "unavailable"), so an outage ranks like a model
                                       # without the sequence, not like a brand-new user; chosen on the
                                       # validation split over 0 / 0.05 / 0.2 (docs/results.md)
    cross_layers: Annotated[int, Field(ge=0)] = 2       # DCN v2
    cross_rank: Positive = 64        # low-rank cross matrices
    mlp: list[Positive] = field(default_factory=lambda: [256, 128])
    negative_label_weight: PositiveFloat = 3.0    # weight on positive heads for an impression that carries a negative action
    batch_size: Positive = 256
    epochs: Positive = 3
    lr: PositiveFloat = 2e-3
    weight_decay: Annotated[float, Field(ge=0)] = 1e-5


@dataclass(config=STRICT)
class RunConfig:
    seed: Annotated[int, Field(ge=0)] = 0
    threads: Positive = 2
    data: DataConfig = field(default_factory=DataConfig)
    pinnerformer: PinnerFormerConfig = field(default_factory=PinnerFormerConfig)
    transact: TransActConfig = field(default_factory=TransActConfig)
    utility_weights: dict[str, float] = field(default_factory=dict)  # head -> weight; default 1 (negatives subtract)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict) -> "RunConfig":
        """A config from its JSON form; a missing field takes its default. An unknown field or a value of the wrong
        type or range raises ValueError naming it as section.field."""
        def build(kind, values, section):
            known = {f.name for f in fields(kind)}
            unknown = set(values) - known
            if unknown:
                raise ValueError(f"unknown config fields: {sorted(f'{section}{k}' for k in unknown)}")
            try:
                return kind(**values)
            except ValidationError as e:
                raise ValueError("; ".join(f"{section}{'.'.join(map(str, err['loc']))}: {err['msg']} "
                                           f"(got {err['input']!r})" for err in e.errors())) from None

        raw = dict(raw)
        sub = {"data": DataConfig, "pinnerformer": PinnerFormerConfig, "transact": TransActConfig}
        parts = {k: build(v, raw.pop(k, {}), f"{k}.") for k, v in sub.items()}
        return build(cls, {**raw, **parts}, "")

    @classmethod
    def load_saved(cls, run: str | Path) -> "RunConfig":
        """A trained run's config.json (a full snapshot). A run written by another version of seqrank may not load
        into today's models: it fails here, naming both versions, instead of half-loading."""
        from . import __version__
        run = Path(run)
        info = run / "run.json"
        written_by = json.loads(info.read_text()).get("seqrank_version") if info.exists() else None
        if written_by != __version__:
            raise ValueError(f"run {run} was written by seqrank {written_by or 'before 0.2'}; this is seqrank "
                             f"{__version__}: retrain it (seqrank train) with this version")
        return cls.from_dict(json.loads((run / "config.json").read_text()))

    def with_overrides(self, assignments: list[str]) -> "RunConfig":
        """`section.field=value` (or `field=value` for a top-level field) applied to a copy; the value is read as JSON
        when it parses (numbers, true/false, null, lists) and as a string otherwise. An unknown name fails, naming it."""
        raw = json.loads(self.to_json())
        for item in assignments:
            name, sep, text = item.partition("=")
            if not sep or not name:
                raise ValueError(f"--set {item!r}: expected section.field=value")
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = text
            *path, leaf = name.split(".")
            node = raw
            for part in path:
                if not isinstance(node.get(part), dict):
                    raise ValueError(f"--set {item!r}: no config section {part!r}")
                node = node[part]
            if leaf not in node:
                raise ValueError(f"--set {item!r}: no config field {name!r}")
            node[leaf] = value
        return RunConfig.from_dict(raw)

    @classmethod
    def load(cls, path: str | Path | None) -> "RunConfig":
        if path is None:
            return cls()
        return cls.from_dict(json.loads(Path(path).read_text()))
