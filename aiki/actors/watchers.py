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

    It also knows which runs have not ended, for the runs this server queued lately, so a
    watch of one of those needs no read (:meth:`vouch`): a run is known from the
    commit that queued it (:meth:`queued`) until an end of it is heard, of this server's
    commits (:meth:`ended`) or another server's notice (:meth:`heard_end`). What cannot be
    vouched for is forgotten (:meth:`forget`): notices lost, or a batch whose commit is
    unknown. A notice may overtake the commit that queued its run (another server ended the
    run before this one's writer was back from the commit): the ends heard while a batch is
    applied are kept until it is (:meth:`applying`), and its runs that ended are not marked.
    A run is known until its first watch (a client waiting for the run it queued), and at
    most ``limit`` runs are, the latest queued: memory stays bounded whatever the queue
    holds. A watch of a run not known reads it, as before.
    """

    _watchers: dict[str, dict[int, Notify]] = attrs.field(factory=dict)
    _next: int = 0
    limit: int = 1024
    _unfinished: dict[str, None] = attrs.field(factory=dict)  # (oldest first)
    # The ends heard while the writer applies a batch (None: it applies none); "all" when
    # everything was forgotten meanwhile.
    _heard: set[str] | str | None = None

    def applying(self) -> None:
        """The writer begins to apply a batch (before :meth:`queued` with what it queued)."""
        self._heard = set()

    def queued(self, run_ids: tuple[str, ...]) -> None:
        """The batch being applied committed; it queued ``run_ids`` (new runs)."""
        heard, self._heard = self._heard, None
        if heard == "all":
            return
        unfinished = self._unfinished
        for run_id in run_ids:
            if heard is None or run_id not in heard:
                unfinished[run_id] = None
        while len(unfinished) > self.limit:
            del unfinished[next(iter(unfinished))]

    def heard_end(self, run_id: str) -> None:
        """Another server ended ``run_id`` (its notice)."""
        self._unfinished.pop(run_id, None)
        if isinstance(self._heard, set):
            self._heard.add(run_id)

    def forget(self) -> None:
        """Ends may have gone unheard: no run is known unfinished any more."""
        self._unfinished.clear()
        if self._heard is not None:
            self._heard = "all"

    def known_unfinished(self, run_id: str) -> bool:
        """Whether ``run_id`` is known not to have ended (False: not known either way)."""
        return run_id in self._unfinished

    def vouch(self, run_id: str) -> bool:
        """For a watch of ``run_id`` registered now (its watcher hears the run's end from
        now on): whether the run is known not to have ended. Known once: a later watch
        reads the run."""
        return self._unfinished.pop(run_id, False) is None

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
        self._unfinished.pop(run.id, None)
        for notify in self._watchers.pop(run.id, {}).values():
            notify(run)
