"""The planted-signal log (seqrank/data/planted.py) as a learning test: on a log whose every user likes one cluster
of items, PinnerFormer must learn the clusters. Before session 10 it did not (its item table moved at the dense
weights' learning rate from an N(0, 1) start and every user embedding came out alike: in-cluster AUC ~0.5), which
is why the old behaviour is checked too."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from seqrank import metrics as M
from seqrank.config import RunConfig
from seqrank.data.loaders import EventLog
from seqrank.data.planted import clusters_of, planted_log
from seqrank.dataset import prepare
from seqrank.features import FIRST_ID

PF = {"max_len": 32, "d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32, "dim": 16, "random_negatives": 64,
      "positions_per_user": 16, "batch_users": 4, "epochs": 15}


@pytest.fixture(scope="module")
def planted():
    log = planted_log(users=80, items=240, clusters=6, days=10, keep=1.0, noise=0.0, seed=0)
    ev = log.events.sort_values(["user_id", "timestamp"], kind="mergesort").reset_index(drop=True)
    event_log = EventLog(events=ev, source="planted", fmt="canonical", duplicates_dropped=0,
                         negative_actions=("hate",), exposure_action=None)
    cfg = RunConfig.from_dict({"seed": 0, "threads": 2, "pinnerformer": PF})
    return cfg, prepare(event_log, cfg), log.item_cluster


def test_planted_log_labels_follow_the_users_interest():
    log = planted_log(users=20, items=60, clusters=4, days=5, keep=1.0, noise=0.0, seed=3)
    ev = log.events
    cluster = clusters_of(ev.item_id, log.item_cluster)
    liked = ev.action == "like"
    # keep=1, no noise: each user likes exactly one cluster and hides only items of the others
    per_user = ev.assign(cluster=cluster)[liked].groupby("user_id").cluster.nunique()
    assert (per_user == 1).all()
    favourite = ev.assign(cluster=cluster)[liked].groupby("user_id").cluster.first()
    hidden = ev.assign(cluster=cluster)[~liked]
    assert (hidden.cluster.to_numpy() != favourite.loc[hidden.user_id].to_numpy()).all()
    assert 0.4 < liked.mean() < 0.6
    assert planted_log(users=20, items=60, clusters=4, days=5, seed=3).events.equals(
        planted_log(users=20, items=60, clusters=4, days=5, seed=3).events)


def _in_cluster_auc(cfg, prep, item_cluster, tmp_path) -> float:
    from seqrank.train import embed_users, item_table, seed_everything, train_pinnerformer
    seed_everything(cfg.seed, cfg.threads)
    model = train_pinnerformer(prep, cfg.pinnerformer, cfg.seed, tmp_path / "pf.pt")
    users = [u for u in prep.users if u in prep.pf_test_users]  # users PinnerFormer never trained on
    emb = embed_users(model, prep, users, np.full(len(users), prep.split_time))
    table = item_table(model)[FIRST_ID:]
    cluster = clusters_of(prep.vocab.items, item_cluster)
    like = prep.vocab.actions.index("like") + FIRST_ID
    favourite = np.array([np.bincount(cluster[prep.histories[u].item[prep.histories[u].action == like] - FIRST_ID])
                          .argmax() for u in users])
    return M.auc((favourite[:, None] == cluster[None, :]).ravel().astype(np.float32), (emb @ table.T).ravel())


def test_pinnerformer_learns_the_planted_clusters(planted, tmp_path):
    cfg, prep, item_cluster = planted
    auc = _in_cluster_auc(cfg, prep, item_cluster, tmp_path)
    print(f"in-cluster AUC {auc:.3f}")
    assert auc > 0.85


def test_pinnerformer_before_session_10_did_not(planted, tmp_path):
    cfg, prep, item_cluster = planted
    old = replace(cfg, pinnerformer=replace(cfg.pinnerformer, item_lr=cfg.pinnerformer.lr, positions="from_newest",
                                            temperature_init=0.07))
    auc = _in_cluster_auc(old, prep, item_cluster, tmp_path)
    print(f"in-cluster AUC before session 10 {auc:.3f}")
    assert auc < 0.65
