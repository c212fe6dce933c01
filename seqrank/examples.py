"""Ranker examples: a run's impressions turned into the ranker's inputs through the one feature path (the one the
preprocess model serves with): each impression's action sequence strictly before its request, its user's daily-batch
PinnerFormer embedding as of the request's day, the candidate and the labels.

data (seqrank.dataset: Prepared) -> PinnerFormer (seqrank.training) -> examples (here) -> the ranker
(seqrank.training) -> evaluation (seqrank.evaluation); seqrank.pipeline runs the steps into a run directory.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import RunConfig
from .dataset import DAY_MS, Prepared, day_start, sequences_for
from .models.pinnerformer import PinnerFormer
from .training import embed_users


class EmbeddingCache:
    """Daily-batch user embeddings, computed once per (user, day) the examples need."""

    def __init__(self, model: PinnerFormer, prep: Prepared):
        self.model, self.prep, self.cache = model, prep, {}

    def __call__(self, users, as_of) -> np.ndarray:
        keys = list(zip(users, np.asarray(as_of).tolist()))
        missing = sorted(set(keys) - self.cache.keys())
        if missing:
            emb = embed_users(self.model, self.prep.histories, [u for u, _ in missing], [t for _, t in missing])
            self.cache.update(zip(missing, emb))
        return np.stack([self.cache[k] for k in keys]) if keys else np.zeros((0, self.model.cfg.dim), np.float32)


class RankerExamples:
    """Ranker inputs for a set of impressions (one candidate each), through the shared feature path."""

    def __init__(self, prep: Prepared, rows: np.ndarray, user_emb_lookup, seq_len: int):
        imp = prep.impressions.iloc[rows]
        self.seq = sequences_for(prep, imp.user_id.to_numpy(), imp.request_time.to_numpy(), seq_len)
        self.request_time = imp.request_time.to_numpy()
        self.user_emb = user_emb_lookup(imp.user_id.to_numpy(), day_start(self.request_time))
        self.cand_item = prep.vocab.item_index(imp.item_id.to_numpy())
        self.labels = prep.labels[rows]
        self.request = imp.request.to_numpy()
        self.user = imp.user_id.to_numpy()  # the unit of the evaluation's bootstrap (metrics.user_bootstrap_weights)
        # HIT@3 groups: a user's impressions of one day, each scored with the features of its own request
        # (a sitting of this log is mostly all-like or all-hate, which no ranking can reorder)
        self.user_day = imp.groupby(["user_id", imp.timestamp // DAY_MS]).ngroup().to_numpy()

    def __len__(self):
        return len(self.labels)

    def tensors(self, idx, trim: bool = True):
        L = max(1, int(self.seq.seq_mask[idx].sum(1).max())) if trim else self.seq.seq_mask.shape[1]
        return (torch.as_tensor(self.seq.seq_item[idx, :L]), torch.as_tensor(self.seq.seq_action[idx, :L]),
                torch.as_tensor(self.seq.seq_mask[idx, :L]), torch.as_tensor(self.user_emb[idx]),
                torch.as_tensor(self.seq.context[idx]), torch.as_tensor(self.cand_item[idx, None]))


@dataclass
class RankerData:
    """A run's ranker examples: what it learns from, the slice that picks its epoch, and the test (or, with
    data.split validation, the validation) period it is scored on."""
    train: RankerExamples
    selection: RankerExamples
    test: RankerExamples


def ranker_data(cfg: RunConfig, prep: Prepared, embeddings, test: bool = True) -> RankerData:
    n = cfg.transact.seq_len
    return RankerData(RankerExamples(prep, prep.ranker_train_rows(), embeddings, n),
                      RankerExamples(prep, prep.selection_rows(), embeddings, n),
                      RankerExamples(prep, prep.test_rows() if test else prep.test_rows()[:0], embeddings, n))
