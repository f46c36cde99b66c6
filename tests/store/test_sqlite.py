"""What only the SQLite store has: a file, migrations, pragmas, threads and failures of its own.

Its behaviour as a store is checked by the conformance suite.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import threading
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from aiki.errors import StoreUnavailable
from aiki.records import Lease, StepRecord
from aiki.store import MemoryStore, SqliteStore, execute, open_store
from aiki.store import ops as o
from aiki.store import sqlite as sqlite_store
from aiki.store.sqlite import MIGRATIONS, migrate


def enqueue(run_id: str, key: str | None = None, now: float = 1.0) -> o.Enqueue:
    return o.Enqueue(run_id, "wf", "1", "{}", key, now)


CLAIM = o.Claim("w1", (("wf", "1"),), 10, 10.0, 30.0)
STEP = StepRecord(position="0", kind="task", name="pay", input_hash="h", input="{}",
                  idempotency_key=None, state="completed", attempts=1, output='"ok"')


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        version: int = db.execute("PRAGMA user_version").fetchone()[0]
    return version


async def test_reopening_keeps_the_data_and_applies_migrations_once(tmp_path: Path) -> None:
    path = str(tmp_path / "aiki.db")
    store = await SqliteStore.open(path)
    await store.apply([enqueue("r1", key="k"), enqueue("r2")])
    [claimed, _] = await execute(store, CLAIM)
    await execute(store, o.SaveStep(claimed.lease, STEP, 11.0))
    before = [(await store.get_run(r), await store.get_steps(r), await store.get_history(r))
              for r in ("r1", "r2")]
    await store.aclose()
    assert user_version(tmp_path / "aiki.db") == len(MIGRATIONS)

    store = await SqliteStore.open(path)  # migrations would fail if they ran again
    try:
        after = [(await store.get_run(r), await store.get_steps(r), await store.get_history(r))
                 for r in ("r1", "r2")]
        assert after == before
        assert await execute(store, enqueue("r3", key="k")) == o.EnqueueOutcome("r1", False)
        assert (await execute(store, enqueue("r4"))).created
        last_seq = max(e.seq for _, _, history in before for e in history)
        assert [e.seq for e in await store.get_history("r4")][0] > last_seq
        assert [r.id for r in await store.list_runs()] == ["r4", "r2", "r1"]
    finally:
        await store.aclose()
    assert user_version(tmp_path / "aiki.db") == len(MIGRATIONS)


async def test_the_schema_and_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "aiki.db"
    store = await SqliteStore.open(str(path))
    await store.aclose()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        names = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        assert {"runs", "steps", "history", "runs_idempotency", "steps_idempotency",
                "runs_claim", "waits", "waits_due", "events"} <= names
        assert migrate(db) == len(MIGRATIONS)  # a no-op on an up-to-date database
        with pytest.raises(sqlite3.IntegrityError):  # the constraint is in the schema
            db.execute("INSERT INTO runs (id, workflow, version, payload, state,"
                       " idempotency_key, attempts, lease_epoch, created_at, updated_at)"
                       " VALUES ('x', 'wf', '1', '{}', 'queued', 'k', 0, 0, 0, 0),"
                       " ('y', 'wf', '1', '{}', 'queued', 'k', 0, 0, 0, 0)")


@pytest.mark.parametrize(("synchronous", "expected"), [("NORMAL", 1), ("FULL", 2)])
async def test_synchronous_option(tmp_path: Path, synchronous: str, expected: int) -> None:
    store = await SqliteStore.open(str(tmp_path / "a.db"), synchronous=synchronous)  # type: ignore[arg-type]
    try:
        db = store._db  # private, but pragmas are per connection
        assert db is not None
        assert db.execute("PRAGMA synchronous").fetchone()[0] == expected
        assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    finally:
        await store.aclose()
    with pytest.raises(ValueError, match="synchronous"):
        await SqliteStore.open(str(tmp_path / "b.db"), synchronous="OFF")  # type: ignore[arg-type]


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(StoreUnavailable, match="newer than this version of aiki"):
        await SqliteStore.open(str(path))


async def test_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(StoreUnavailable, match="does not exist") as info:
        await SqliteStore.open(str(missing / "aiki.db"))
    assert str(missing) in str(info.value)
    assert not missing.exists()


async def test_a_corrupted_file_is_store_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database, just garbage bytes\x00\xff" * 200)
    with pytest.raises(StoreUnavailable, match="file is not a database") as info:
        await SqliteStore.open(str(path))
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
    # The caller goes on: another store opens fine.
    store = await SqliteStore.open(str(tmp_path / "good.db"))
    assert (await execute(store, enqueue("r1"))).created
    await store.aclose()


async def test_a_file_corrupted_while_open_is_store_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "aiki.db"
    store = await SqliteStore.open(str(path), offload=False)
    await store.apply([enqueue(f"r{i}") for i in range(50)])
    await store.aclose()
    store = await SqliteStore.open(str(path), offload=False)
    try:
        with open(path, "r+b") as f:  # overwrite everything after the header
            f.seek(100)
            f.write(b"\xde\xad\xbe\xef" * (os.path.getsize(path) // 4))
        with pytest.raises(StoreUnavailable, match="malformed|not a database"):
            await store.list_runs()
            await store.apply([enqueue("late")])
    finally:
        await store.aclose()


async def test_a_path_that_cannot_be_opened_is_store_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="unable to open database file"):
        await SqliteStore.open(str(tmp_path))  # a directory


def protect(path: Path, on: bool) -> bool:
    """Make ``path`` read-only (or writable again); False if this system cannot."""
    if os.name != "posix":
        return False
    if os.geteuid() == 0:  # root ignores file modes, not the immutable attribute
        done = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True)
        return done.returncode == 0
    os.chmod(path, 0o444 if on else 0o644)
    return True


async def test_a_read_only_file_is_store_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "aiki.db"
    store = await SqliteStore.open(str(path))
    await execute(store, enqueue("r1"))
    await store.aclose()
    if not protect(path, True):
        pytest.skip("cannot make a file read-only here")
    try:
        with pytest.raises(StoreUnavailable, match="readonly") as info:
            await SqliteStore.open(str(path))
        assert str(path) in str(info.value)
    finally:
        protect(path, False)
    store = await SqliteStore.open(str(path))  # writable again: nothing was lost
    assert await store.get_run("r1") is not None
    await store.aclose()


async def test_a_locked_database_fails_the_whole_batch_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "aiki.db"
    store = await SqliteStore.open(str(path), busy_timeout=0.05)
    await execute(store, enqueue("r1"))
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with pytest.raises(StoreUnavailable, match="database is locked"):
            await store.apply([enqueue("r2"), CLAIM])
        assert [r.id for r in await store.list_runs()] == ["r1"]  # reads still work (WAL)
        other.execute("COMMIT")
        outcomes = await store.apply([enqueue("r2"), CLAIM])
        assert outcomes[0] == o.EnqueueOutcome("r2", True)
        assert [c.run.id for c in outcomes[1]] == ["r1", "r2"]
    finally:
        other.close()
        await store.aclose()


async def test_a_batch_runs_inline_only_when_nothing_else_could_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch skips the hop to the writer's thread when no other task is runnable; it
    takes the thread when one is, when another process holds the write lock (the inline
    try never waits for it), and for the next batches after an inline one that took long
    (a slow fsync must not stall the event loop)."""
    trio_thread = threading.get_ident()
    inline: list[bool] = []
    real = sqlite_store._apply_batch

    def spy(db: sqlite3.Connection, ops: list[o.Op[object]]) -> list[object]:
        inline.append(threading.get_ident() == trio_thread)
        return real(db, ops)

    monkeypatch.setattr(sqlite_store, "_apply_batch", spy)
    # No batch takes long until the test says so (a loaded machine's commit may take over
    # the 5 ms budget, and send the next batches to the thread).
    monkeypatch.setattr(sqlite_store, "INLINE_BUDGET", 60.0)
    path = tmp_path / "aiki.db"
    store = await SqliteStore.open(str(path), busy_timeout=0.05)
    try:
        await execute(store, enqueue("r1"))
        assert inline == [True]
        real_statistics = trio.lowlevel.current_statistics

        def busy() -> object:  # (Trio counts the tasks of its next round, not this one's)
            return attrs.evolve(real_statistics(), tasks_runnable=1)

        monkeypatch.setattr(trio.lowlevel, "current_statistics", busy)
        await execute(store, enqueue("r2"))
        monkeypatch.setattr(trio.lowlevel, "current_statistics", real_statistics)
        assert inline == [True, False]
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            with pytest.raises(StoreUnavailable, match="database is locked"):
                await store.apply([enqueue("r3")])
            assert inline == [True, False, True, False]  # tried, then waited in the thread
        finally:
            other.close()
        monkeypatch.setattr(sqlite_store, "INLINE_BUDGET", -1.0)  # every batch is "slow"
        await execute(store, enqueue("r3"))
        del inline[:]
        for n in range(4, 70):
            await execute(store, enqueue(f"r{n}"))
        assert inline == [False] * 64 + [True, False]
        assert len(await store.list_runs(limit=1000)) == 69  # nothing lost on the way
    finally:
        await store.aclose()


async def test_an_error_in_the_middle_of_a_batch_rolls_it_all_back(tmp_path: Path) -> None:
    path = tmp_path / "aiki.db"
    store = await SqliteStore.open(str(path))
    await execute(store, enqueue("r1"))
    [claimed] = await execute(store, CLAIM)
    with sqlite3.connect(path) as db:  # a fault injected below the store
        db.execute("CREATE TRIGGER fault BEFORE INSERT ON history WHEN NEW.event = 'run.completed'"
                   " BEGIN SELECT RAISE(ABORT, 'disk on fire'); END")
    before = (await store.get_run("r1"), await store.get_history("r1"))
    with pytest.raises(StoreUnavailable, match="disk on fire"):
        await store.apply([enqueue("r2"), o.SaveStep(claimed.lease, STEP, 11.0),
                           o.CompleteRun(claimed.lease, "1", 12.0)])
    assert (await store.get_run("r1"), await store.get_history("r1")) == before
    assert await store.get_run("r2") is None
    assert await store.get_steps("r1") == ()
    # The store is still usable, and the same batch goes through once the fault is gone.
    with sqlite3.connect(path) as db:
        db.execute("DROP TRIGGER fault")
    assert await store.apply([enqueue("r2"), o.CompleteRun(claimed.lease, "1", 12.0)]) == [
        o.EnqueueOutcome("r2", True), await store.get_run("r1")]
    await store.aclose()


@pytest.mark.parametrize("offload", [True, False])
async def test_offload_on_and_off(tmp_path: Path, offload: bool) -> None:
    store = await SqliteStore.open(str(tmp_path / "aiki.db"), offload=offload)
    try:
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(execute, store, enqueue(f"r{i}", key=f"k{i % 5}"))
        assert len(await store.list_runs()) == 5
        claimed = await execute(store, CLAIM)
        assert len(claimed) == 5
        lease = claimed[0].lease
        assert await execute(store, o.Renew((lease, Lease("x", 1, "w1")), 11.0, 5.0)) == ("x",)
    finally:
        await store.aclose()


async def test_inline_store_under_a_mock_clock(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    store = await SqliteStore.open(str(tmp_path / "aiki.db"), offload=False)
    await execute(store, enqueue("r1"))
    await trio.sleep(3600)
    assert trio.current_time() >= 3600
    assert [c.run.id for c in await execute(store, CLAIM)] == ["r1"]
    await store.aclose()


async def test_two_stores_on_one_file_keep_one_run_per_key(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.db")
    stores = [await SqliteStore.open(path), await SqliteStore.open(path)]
    outcomes: list[o.EnqueueOutcome] = []

    async def one(i: int) -> None:
        outcomes.append(await execute(stores[i % 2], enqueue(f"r{i}", key="same")))

    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(one, i)
    assert sum(out.created for out in outcomes) == 1
    assert len({out.run_id for out in outcomes}) == 1
    assert len(await stores[0].list_runs()) == 1
    for store in stores:
        await store.aclose()


async def test_a_closed_store_is_unavailable(tmp_path: Path) -> None:
    store = await SqliteStore.open(str(tmp_path / "aiki.db"))
    await store.aclose()
    await store.aclose()  # twice is fine
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.get_run("r1")


async def test_open_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(await open_store("memory"), MemoryStore)
    in_memory = await open_store("sqlite://:memory:")
    assert isinstance(in_memory, SqliteStore)
    assert (await execute(in_memory, enqueue("r1"))).created
    await in_memory.aclose()

    monkeypatch.chdir(tmp_path)
    relative = await open_store("sqlite:///relative.db")
    await relative.aclose()
    assert (tmp_path / "relative.db").exists()
    absolute = await open_store(f"sqlite:///{tmp_path / 'absolute.db'}")  # four slashes
    await absolute.aclose()
    assert (tmp_path / "absolute.db").exists()

    for bad in ["sqlite://", "sqlite:///", "sqlite:relative.db", "mysql://x", "memory://", ""]:
        with pytest.raises(ValueError, match="unsupported store URL") as info:
            await open_store(bad)
        assert repr(bad) in str(info.value)
        assert "sqlite:///" in str(info.value) and "postgresql://" in str(info.value)


async def test_the_default_syncs_every_commit(tmp_path: Path) -> None:
    # Durability rule 1: an acknowledged enqueue survives power loss, not only a crash.
    store = await SqliteStore.open(str(tmp_path / "d.db"))
    try:
        assert store._db is not None
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        await store.aclose()


async def test_a_database_of_the_first_schema_is_migrated_and_its_runs_finish(
    tmp_path: Path,
) -> None:
    """A file written by the release before waits (schema 1, a run ``sleeping`` until its
    retry) opens, is migrated, and its runs go on: the sleeper waits, wakes, completes."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path, isolation_level=None) as db:
        for statement in MIGRATIONS[0]:
            db.execute(statement)
        db.execute("PRAGMA user_version = 1")
        for run_id, state, wake_at in (("sleeper", "sleeping", 50.0), ("queued", "queued", None)):
            db.execute(
                "INSERT INTO runs (id, workflow, version, payload, state, attempts, lease_epoch,"
                " wake_at, created_at, updated_at) VALUES (?, 'wf', '1', 'null', ?, ?, ?, ?, 1.0,"
                " 2.0)", (run_id, state, int(state == "sleeping"), int(state == "sleeping"),
                          wake_at))
    store = await SqliteStore.open(str(path), offload=False)
    try:
        sleeper = await store.get_run("sleeper")
        assert sleeper is not None and sleeper.state == "waiting"
        [wait] = await store.get_waits("sleeper")
        assert (wait.kind, wait.due_at) == ("retry", 50.0)
        assert await store.next_due() == 50.0
        assert await execute(store, o.WakeDue(50.0)) == ("sleeper",)
        claimed = await execute(store, o.Claim("w", (("wf", "1"),), 10, 51.0, 30.0))
        assert sorted(c.run.id for c in claimed) == ["queued", "sleeper"]
        for c in claimed:
            await execute(store, o.CompleteRun(c.lease, '"done"', 52.0))
        assert {r.state for r in await store.list_runs()} == {"completed"}
    finally:
        await store.aclose()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


async def test_a_database_of_the_schema_before_cancellation_opens_and_its_runs_cancel(
    tmp_path: Path,
) -> None:
    """A file written before cancellation (every migration before the one adding the cancel
    columns, wherever it stands) opens, and a run of it in flight can be cancelled."""
    before = next(i for i, m in enumerate(MIGRATIONS) if "cancel_requested_at" in m[0])
    path = tmp_path / "old.db"
    with sqlite3.connect(path, isolation_level=None) as db:
        for statements in MIGRATIONS[:before]:
            for statement in statements:
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {before}")
        db.execute(
            "INSERT INTO runs (id, workflow, version, payload, state, attempts, lease_epoch,"
            " lease_owner, lease_expires_at, created_at, updated_at) VALUES"
            " ('r1', 'wf', '1', 'null', 'running', 1, 1, 'w', 99.0, 1.0, 2.0)")
    store = await SqliteStore.open(str(path), offload=False)
    try:
        run = await store.get_run("r1")
        assert run is not None and (run.state, run.cancel_requested_at) == ("running", None)
        out = await execute(store, o.CancelRun("r1", "old", 10.0, "c", 5.0))
        assert (out.cancelled, out.holder) == (True, "w")
        assert await store.next_due() == 15.0
        [ended] = await execute(store, o.EndCancels(15.0))
        assert ended is not None and (ended.state, ended.error_message) == ("cancelled", "old")
    finally:
        await store.aclose()


async def test_a_database_of_the_schema_before_children_opens_and_starts_children(
    tmp_path: Path,
) -> None:
    """A file written before child runs (every migration before the one adding
    ``parent_id``, wherever it stands) opens; its runs have no parent and start children."""
    before = next(i for i, m in enumerate(MIGRATIONS) if "parent_id" in m[0])
    path = tmp_path / "old.db"
    with sqlite3.connect(path, isolation_level=None) as db:
        for statements in MIGRATIONS[:before]:
            for statement in statements:
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {before}")
        db.execute(
            "INSERT INTO runs (id, workflow, version, payload, state, attempts, lease_epoch,"
            " lease_owner, lease_expires_at, created_at, updated_at) VALUES"
            " ('r1', 'wf', '1', 'null', 'running', 1, 1, 'w', 99.0, 1.0, 2.0)")
    store = await SqliteStore.open(str(path), offload=False)
    try:
        run = await store.get_run("r1")
        assert run is not None and (run.parent_id, run.detached) == (None, False)
        step = StepRecord("0", "child", "wf@1", "h", "{}", None, "running", 1)
        await execute(store, o.StartChild(Lease("r1", 1, "w"), step, "r1/0", "wf", "1", "{}",
                                          False, 5.0))
        [child] = await store.get_children("r1")
        assert (child.id, child.parent_id, child.detached) == ("r1/0", "r1", False)
    finally:
        await store.aclose()


async def test_a_database_of_the_schema_before_run_controls_opens_and_its_runs_take_them(
    tmp_path: Path,
) -> None:
    """A file of the release before run controls (every migration before the one adding
    ``forked_from``, wherever it stands) opens, is migrated, and its runs can be paused,
    resumed and forked."""
    before = next(i for i, m in enumerate(MIGRATIONS) if "forked_from" in m[0])
    path = tmp_path / "before-controls.db"
    with sqlite3.connect(path, isolation_level=None) as db:
        for statements in MIGRATIONS[:before]:
            for statement in statements:
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {before}")
        db.execute("INSERT INTO runs (id, workflow, version, payload, state, attempts,"
                   " lease_epoch, created_at, updated_at, finished_at) VALUES ('old', 'wf',"
                   " '1', 'null', 'completed', 1, 1, 1.0, 2.0, 2.0)")
        db.execute("INSERT INTO steps (run_id, position, seq, kind, name, input_hash, input,"
                   " state, attempts, output) VALUES ('old', '0', 1, 'task', 't', 'h', '1',"
                   " 'completed', 1, '2')")
        db.execute("INSERT INTO runs (id, workflow, version, payload, state, attempts,"
                   " lease_epoch, created_at, updated_at) VALUES ('queued', 'wf', '1', 'null',"
                   " 'queued', 0, 0, 1.0, 1.0)")
    store = await SqliteStore.open(str(path), offload=False)
    try:
        old = await store.get_run("old")
        assert old is not None and (old.forked_from, old.control_id) == (None, None)
        fork = (await execute(store, o.ForkRun("old", "new", 1, None, "c", 3.0))).run
        assert (fork.forked_from, fork.forked_steps) == ("old", 1)
        assert [s.output for s in await store.get_steps("new")] == ["2"]
        assert (await execute(store, o.PauseRun("queued", "c", 4.0))).run.state == "paused"
        assert (await execute(store, o.ResumeRun("queued", "c", 5.0))).run.state == "queued"
    finally:
        await store.aclose()


# -- point reads inline, on a query-only connection ------------------------------------------
async def test_a_point_read_does_not_wait_behind_a_write_in_progress(tmp_path: Path) -> None:
    path = tmp_path / "aiki.db"
    store = await SqliteStore.open(str(path))
    try:
        await execute(store, enqueue("r1"))
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock...
        other.execute("UPDATE runs SET payload = 'uncommitted' WHERE id = 'r1'")
        async with trio.open_nursery() as nursery:
            # ... so the store's own batch waits for it in the writer's thread (its
            # busy_timeout is 5 s), and reads through that thread would queue behind it.
            nursery.start_soon(store.apply, [enqueue("r2")])
            await trio.sleep(0.2)
            with trio.fail_after(2):
                run = await store.get_run("r1")
                steps = await store.get_steps("r1")
                waits = await store.get_waits("r1")
            assert run is not None and run.payload == "{}" and run.state == "queued"
            assert (steps, waits) == ((), ())
            other.execute("COMMIT")
        other.close()
        run = await store.get_run("r1")  # the other's commit is seen at once
        assert run is not None and run.payload == "uncommitted"
        assert await store.get_run("r2") is not None  # and so is the store's own
    finally:
        await store.aclose()


async def test_a_point_read_the_query_only_connection_refuses_takes_the_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import aiki.store.sqlite as sqlite_store

    class Refusing:
        def execute(self, *args: object) -> None:
            raise sqlite3.OperationalError("database is locked")

        def close(self) -> None:
            pass

    monkeypatch.setattr(sqlite_store, "_connect_reader", lambda path: Refusing())
    store = await SqliteStore.open(str(tmp_path / "aiki.db"))
    try:
        await execute(store, enqueue("r1"))
        run = await store.get_run("r1")
        assert run is not None and run.id == "r1"
    finally:
        await store.aclose()
    with pytest.raises(StoreUnavailable, match="closed"):  # not answered by the reader
        await store.get_run("r1")
