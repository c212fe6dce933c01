"""The planted-signal log (seqrank/data/planted.py) as a learning test: on a log whose every user likes one cluster
of items, PinnerFormer must learn the clusters (its item table needs its own, larger learning rate: at the dense
weights' rate from an N(0, 1) start every user embedding comes out alike, which is checked too); on a log where the
interest moves, TransAct, which reads the order of the latest actions, must beat averaging the sequence."""
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
    from seqrank.training import embed_users, item_table, seed_everything, train_pinnerformer
    seed_everything(cfg.seed, cfg.threads)
    model = train_pinnerformer(prep, cfg.pinnerformer, cfg.seed, tmp_path / "pf.pt")
    users = [u for u in prep.users if u in prep.pf_test_users]  # users PinnerFormer never trained on
    emb = embed_users(model, prep.histories, users, np.full(len(users), prep.split_time))
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


def test_pinnerformer_with_the_item_table_at_the_dense_learning_rate_does_not(planted, tmp_path):
    cfg, prep, item_cluster = planted
    slow = replace(cfg, pinnerformer=replace(cfg.pinnerformer, item_lr=cfg.pinnerformer.lr, temperature_init=0.07))
    auc = _in_cluster_auc(slow, prep, item_cluster, tmp_path)
    print(f"in-cluster AUC, item table at the dense rate {auc:.3f}")
    assert auc < 0.65


RANKER = {"seq_len": 16, "action_dim": 8, "item_dim": 8, "n_layers": 1, "n_heads": 1, "d_ff": 16, "top_k_rows": 3,
          "cross_layers": 1, "cross_rank": 8, "mlp": [32], "batch_size": 64, "epochs": 4}


def test_transact_reads_the_order_that_averaging_loses(tmp_path):
    """Interests move between sittings (keep 0.5) and a sitting shows an impression a minute, so with real-time
    requests the likes of the last minutes say which cluster the next candidate must be in. The mean of the
    sequence rows cannot say which of its items were liked and which hidden (it averages [action | item] rows
    apart), while TransAct's attention over the rows, with the candidate fused into each, can. The item table is the
    planted clusters themselves (what a good PinnerFormer learns, tested above), so this tests the ranker alone:
    TransAct must rank likes better than the same ranker with the sequence averaged, over 2 seeds."""
    from seqrank.examples import ranker_data
    from seqrank.training import predict, seed_everything, train_ranker
    log = planted_log(users=100, items=240, clusters=6, days=8, keep=0.5, noise=0.05, seed=1)
    ev = log.events.sort_values(["user_id", "timestamp"], kind="mergesort").reset_index(drop=True)
    event_log = EventLog(events=ev, source="planted", fmt="canonical", duplicates_dropped=0,
                         negative_actions=("hate",), exposure_action=None)
    cfg = RunConfig.from_dict({"seed": 0, "threads": 2, "pinnerformer": PF, "transact": RANKER})
    prep = prepare(event_log, cfg)
    table = np.zeros((prep.vocab.n_items, 6), dtype=np.float32)
    table[FIRST_ID + np.arange(len(prep.vocab.items)), clusters_of(prep.vocab.items, log.item_cluster)] = 1.0
    dim = cfg.pinnerformer.dim
    data = ranker_data(cfg, prep, lambda users, days: np.zeros((len(users), dim), np.float32))
    like = prep.vocab.heads.index("like")
    aucs = {}
    for encoder in ("transact", "avg_pool"):
        r_cfg = replace(cfg.transact, sequence_encoder=encoder)
        for seed in (0, 1):
            seed_everything(seed, cfg.threads)
            model = train_ranker(prep, r_cfg, table, dim, data.train, seed, tmp_path / f"{encoder}{seed}.pt",
                                 data.selection)
            probs = predict(model, data.test)
            aucs.setdefault(encoder, []).append(M.auc(data.test.labels[:, like], probs[:, like]))
    print({e: [round(a, 3) for a in v] for e, v in aucs.items()})
    assert np.mean(aucs["transact"]) > np.mean(aucs["avg_pool"]) + 0.05
