"""Run watchers: who is waiting to hear that a run ended (``wait_for_completion``)."""

from __future__ import annotations

from collections.abc import Callable

import attrs

from aiki.records import TERMINAL_RUN_STATES, RunRecord

Notify = Callable[[RunRecord], None]


@attrs.define(eq=False)
class RunWatchers:
    """In-memory registry; a watcher is called once, then forgotten.

    Callers register before reading the store, then check the stored state themselves, so a
    run that ends between the two is reported by one path or the other (callbacks must be
    idempotent for that race: ``watch`` returns an unregister function).
    """

    _watchers: dict[str, dict[int, Notify]] = attrs.field(factory=dict)
    _next: int = 0

    def watch(self, run_id: str, notify: Notify) -> Callable[[], None]:
        self._next += 1
        key = self._next
        self._watchers.setdefault(run_id, {})[key] = notify

        def unwatch() -> None:
            waiting = self._watchers.get(run_id)
            if waiting is not None:
                waiting.pop(key, None)
                if not waiting:
                    del self._watchers[run_id]

        return unwatch

    def watched(self, run_id: str) -> bool:
        return run_id in self._watchers

    def watched_runs(self) -> list[str]:
        return list(self._watchers)

    def ended(self, run: RunRecord) -> None:
        if run.state not in TERMINAL_RUN_STATES:
            return
        for notify in self._watchers.pop(run.id, {}).values():
            notify(run)
