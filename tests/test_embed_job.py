"""The daily embedding job on today's actions: `seqrank embed` embeds every user with actions in the feature store
(or in an events file), users first seen after training included, without reading the training log; on the
embedded store, a real redis-server and a real 3-master Redis Cluster."""
from __future__ import annotations

import uuid

import numpy as np
import pandas as pd
import pytest

from seqrank.config import RunConfig
from seqrank.exporting import load_user_tower
from seqrank.features import Vocabulary, index_history
from seqrank.embed_job import redact, write_embeddings
from seqrank.store import Action, open_store
from seqrank.training import embed_users

from run_fixture import DAY_MS as DAY

try:
    from redis_server import redis_cluster, redis_server  # noqa: F401 (fixtures)
except ImportError:  # tests/ imported as a package
    from tests.redis_server import redis_cluster, redis_server  # noqa: F401

def expected(run, actions, as_of):
    """The embedding computed by hand from the same raw actions through the model and vocabulary of the run."""
    vocab = Vocabulary.load(run / "vocab")
    model = load_user_tower(run, RunConfig.load_saved(run), vocab)
    item, action, ts = zip(*actions)
    return embed_users(model, {"x": index_history(vocab, item, action, ts)}, ["x"], [as_of])[0]


def test_embed_reads_todays_actions_from_the_store_new_users_included(tiny_run, tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    t = 20 * DAY
    newbie = [("i3", "like", t - 5000), ("i7", "click", t - 4000), ("never_seen", "like", t - 3000)]
    old_user = [("i1", "click", t - 2000)]
    with open_store(url) as store:
        store.append([Action("newbie", *a) for a in newbie] + [Action("u0", *a) for a in old_user]
                     + [Action("newbie", "i9", "like", t + 1)])        # after the as-of time: not counted
    assert write_embeddings(tiny_run, url, as_of_ms=t) == 2
    with open_store(url) as store:
        emb, found = store.get_embeddings(["newbie", "u0", "u1"])
    assert found.tolist() == [True, True, False]                       # u1 has no actions in the store
    np.testing.assert_allclose(emb[0], expected(tiny_run, newbie, t), atol=1e-6)
    np.testing.assert_allclose(emb[1], expected(tiny_run, old_user, t), atol=1e-6)
    assert np.linalg.norm(emb[0]) == pytest.approx(1.0, abs=1e-4)
    # the default as-of time is just after the newest stored action: the t + 1 like now counts
    write_embeddings(tiny_run, url)
    with open_store(url) as store:
        later, _ = store.get_embeddings(["newbie"])
    np.testing.assert_allclose(later[0], expected(tiny_run, newbie + [("i9", "like", t + 1)], t + 2), atol=1e-6)


def test_embed_from_an_events_file_without_the_training_log(tiny_run, tmp_path):
    events = tmp_path / "today.csv"
    t = 1_700_000_000_000 + 30 * DAY                                    # ms (a file's unit is read from its magnitude)
    pd.DataFrame([("fresh", "i2", "like", t), ("fresh", "i4", "click", t + 1000)],
                 columns=["user_id", "item_id", "action", "timestamp"]).to_csv(events, index=False)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    assert write_embeddings(tiny_run, url, events=str(events)) == 1
    with open_store(url) as store:
        emb, found = store.get_embeddings(["fresh"])
    assert found.all()
    np.testing.assert_allclose(emb[0], expected(tiny_run, [("i2", "like", t), ("i4", "click", t + 1000)], t + 1001),
                               atol=1e-6)


def test_user_ids_lists_every_user_with_a_sequence_on_every_store(redis_server, redis_cluster, tmp_path):  # noqa: F811
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    users = [f"user-{k}" for k in range(60)]                           # spread over many cluster slots
    for url in (f"sqlite:///{tmp_path / 's.db'}", f"{redis_server.url}?prefix={prefix}",
                f"{redis_cluster.url}&prefix={prefix}"):
        with open_store(url) as store:
            store.append([Action(u, "i1", "click", 1000 + k) for k, u in enumerate(users)])
            store.put_embeddings(["only-an-embedding"], np.ones((1, 4), np.float32), 5)
            assert store.user_ids() == sorted(users), url


def test_redact_hides_a_store_password():
    assert redact("redis://seqrank-writer:s3cret@redis:6379/0") == "redis://seqrank-writer:***@redis:6379/0"
    assert redact("sqlite:///tmp/store.db") == "sqlite:///tmp/store.db"
