"""The bulk fill of ``benchmarks/fill.py`` writes rows the stores read back as the engine's own.

A filled store must look like one grown by real use, or the scale benchmark measures nothing:
records, steps and history read back through the store's API; idempotency keys are honoured
by the unique index; a fresh enqueue and claim work among the filled runs and never pick a
filled one.
"""

from __future__ import annotations

from pathlib import Path

from aiki.store.ops import Claim, Enqueue
from aiki.store.sqlite import SqliteStore
from benchmarks import fill

RUNS = 1000


async def test_a_filled_sqlite_store_reads_back_and_still_works(tmp_path: Path) -> None:
    path = tmp_path / "filled.db"
    fill.fill_sqlite(path, RUNS, chunk=300, base_time=0.0)  # several chunks
    runs, steps, history = fill.generate(0, RUNS, base_time=0.0)
    store = await SqliteStore.open(str(path), offload=False)
    try:
        listed = await store.list_runs(limit=RUNS + 10)
        assert len(listed) == RUNS
        assert {r.state for r in listed} == {"completed"}
        assert {r.workflow for r in listed} == set(fill.WORKFLOWS)
        assert listed[0].created_at > listed[-1].created_at  # newest first, by enqueue order
        for wf in fill.WORKFLOWS:
            assert len(await store.list_runs(workflow=wf, limit=RUNS)) == RUNS // 5
        assert await store.list_runs(state="queued") == ()

        first = listed[-1]  # run 0: an idempotency key, three steps, nine events
        assert first.id == runs[0][0]
        assert first.idempotency_key == "fill-0" and first.attempts == 1
        assert first.result == str(sum(int(fill._step_io(0, p)[2]) for p in range(3)))
        assert first.lease_owner is None and first.finished_at is not None
        got = await store.get_run(first.id)
        assert got == first
        recorded = await store.get_steps(first.id)
        assert [s.position for s in recorded] == ["0", "1", "2"]
        assert all(s.state == "completed" and s.kind == "task" for s in recorded)
        assert recorded[1].input_hash == fill._step_io(0, 1)[1]
        events = [e.event for e in await store.get_history(first.id)]
        assert events == ["run.queued", "run.running"] + ["task.running", "task.completed"] * 3 \
            + ["run.completed"]
        assert (await store.get_run(listed[-2].id)).idempotency_key is None  # type: ignore[union-attr]

        # The unique index knows the filled keys: the same key returns the filled run.
        [again] = await store.apply([Enqueue("new-id", first.workflow, "1", "{}", "fill-0", 1.0,
                                             "return_existing")])
        assert again.run_id == first.id and not again.created

        [made] = await store.apply([Enqueue("fresh", "orders", "1", "{}", "k-new", 1e10)])
        assert made.created
        pairs = tuple((w, "1") for w in fill.WORKFLOWS)
        [claimed] = await store.apply([Claim("w", pairs, 10, 1e10, 30.0)])
        assert [c.run.id for c in claimed] == ["fresh"]
        assert claimed[0].steps == () and claimed[0].run.lease_epoch == 1
        assert await store.next_due() == 1e10 + 30.0  # its lease's expiry: nothing waits
    finally:
        await store.aclose()


def test_the_cache_is_reused(tmp_path: Path) -> None:
    first = fill.cached_sqlite(50, cache_dir=tmp_path)
    mtime = first.stat().st_mtime_ns
    assert fill.cached_sqlite(50, cache_dir=tmp_path) == first
    assert first.stat().st_mtime_ns == mtime
    assert not list(tmp_path.glob("*partial*"))
