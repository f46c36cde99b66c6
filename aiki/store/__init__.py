"""Stores: where runs, steps and history live. ``open_store(url)`` picks one by URL."""

from __future__ import annotations

from aiki.store.base import Store, execute
from aiki.store.memory import MemoryStore
from aiki.store.records import ClaimedRun, HistoryEvent, Lease, RunRecord, StepRecord

__all__ = [
    "ClaimedRun", "HistoryEvent", "Lease", "MemoryStore", "RunRecord", "StepRecord", "Store",
    "execute",
]
