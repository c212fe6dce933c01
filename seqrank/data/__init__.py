"""Event data: raw log loaders and the canonical event table."""

from seqrank.data.loaders import (
    EVENT_COLUMNS,
    FORMATS,
    KUAIRAND_SAMPLE,
    DataError,
    EventLog,
    add_sampled_negatives,
    load_events,
)

__all__ = [
    "EVENT_COLUMNS",
    "FORMATS",
    "KUAIRAND_SAMPLE",
    "DataError",
    "EventLog",
    "add_sampled_negatives",
    "load_events",
]
