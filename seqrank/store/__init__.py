"""Real-time feature store: per-user action sequences + long-term user embeddings.

``open_store("sqlite:///abs/path/store.db")`` -> ``EmbeddedStore`` (one SQLite file, no server);
``open_store("redis://host:port/db")`` -> ``RedisStore``; ``open_store()`` reads ``$SEQRANK_STORE``.
The Redis and SQLite backends are imported lazily, so reading the embedded store never needs redis-py.
"""
from .base import (DEFAULT_LATE_BOUND_MS, DEFAULT_MAX_LEN, DEFAULT_TIMEOUT_S, DEFAULT_WRITE_TIMEOUT_S,
                   STORE_ENV, Action, FeatureStore, IngestStats, StoreUnavailable, UserSequence, open_store,
                   sort_key, validate_action)

__all__ = ["Action", "UserSequence", "IngestStats", "StoreUnavailable", "FeatureStore", "open_store",
           "validate_action", "sort_key", "EmbeddedStore", "RedisStore", "STORE_ENV", "DEFAULT_MAX_LEN",
           "DEFAULT_LATE_BOUND_MS", "DEFAULT_TIMEOUT_S", "DEFAULT_WRITE_TIMEOUT_S"]


def __getattr__(name):
    if name == "EmbeddedStore":
        from .embedded import EmbeddedStore
        return EmbeddedStore
    if name == "RedisStore":
        from .redis_store import RedisStore
        return RedisStore
    raise AttributeError(name)
