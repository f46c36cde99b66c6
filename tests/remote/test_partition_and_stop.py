"""Real processes on 127.0.0.1: a worker behind a TCP proxy whose connection is frozen past
its lease and then thawed; a worker draining on SIGTERM; a server stopping on SIGTERM."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import attrs
import trio

import aiki
from tests.remote.processes import SIGTERM, Cluster, eventually, workers_connected


@attrs.define(eq=False)
class FreezableProxy:
    """Forwards TCP connections to ``target``; ``freeze`` stops all traffic both ways (what
    was read is held, nothing more is read), ``thaw`` lets it flow again."""

    target: int
    thawed: trio.Event = attrs.field(factory=trio.Event)
    port: int = 0

    def __attrs_post_init__(self) -> None:
        self.thawed.set()

    def freeze(self) -> None:
        self.thawed = trio.Event()

    def thaw(self) -> None:
        self.thawed.set()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(trio.serve_listeners, self._forward, listeners,
                                        handler_nursery=nursery))
            task_status.started(self.port)

    async def _forward(self, client: trio.SocketStream) -> None:
        await self.thawed.wait()
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target)
        except OSError:
            await client.aclose()
            return
        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
            nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream,
                    done: trio.CancelScope) -> None:
        try:
            while True:
                data = await source.receive_some(65536)
                await self.thawed.wait()
                if not data:
                    break
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()


async def test_a_partitioned_worker_cannot_overwrite_the_run_that_replaced_it(
    cluster: Cluster, tmp_path: Path,
) -> None:
    server, url = await cluster.server(tmp_path / "aiki.db")
    port = int(url.rsplit(":", 1)[1])
    async with trio.open_nursery() as nursery:
        proxy = FreezableProxy(port)
        proxy_port = await nursery.start(proxy.run)
        cut_off = await cluster.worker(f"ws://127.0.0.1:{proxy_port}", "cut-off",
                                       task_seconds=3, concurrency=1)
        async with aiki.connect(url) as client:
            await eventually(lambda: workers_connected(client, "cut-off"), 30,
                             "the worker to connect", cut_off, server)
            handle = await client.enqueue("remote-who", 1, version="1")

            async def executed(who: str, what: str) -> bool:
                return (who, what, "who.1") in cluster.executions()

            await eventually(lambda: executed("cut-off", "start"), 30, "the task to start",
                             cut_off)
            proxy.freeze()  # partition: the worker goes on, its writes go nowhere
            replacement = await cluster.worker(url, "replacement", task_seconds=0.05)
            assert await handle.wait_for_completion(timeout=30) == "replacement"
            # The cut-off worker finished its task during the partition, and wants to save it.
            await eventually(lambda: executed("cut-off", "end"), 30, "the late task to end",
                             cut_off)
            proxy.thaw()

            async def refused() -> bool:
                # Its first late write: the task's start record (held in the proxy when the
                # task outlived record_start_after), or its result, which rides with the
                # run's completion.
                return any(any(f"refused {tag}" in line
                               for tag in ("save_step", "start_step", "complete_run"))
                           and "'cut-off' is stale" in line
                           for line in server.log().splitlines())

            await eventually(refused, 30, "the late write to be refused", cut_off, server)
            # The worker learns it, from the refusal or from its heartbeat, and lets go.
            assert "abandoning" in cut_off.log() or "lost the lease" in cut_off.log()
            status = await handle.status()
            history = await handle.history()
        nursery.cancel_scope.cancel()
    assert status.state == "completed"
    assert [(t.name, t.state, t.attempts) for t in status.tasks] == [("who", "completed", 1)]
    writers = {e.worker_id for e in history if e.event in ("task.completed", "run.completed")}
    assert writers == {"replacement"}
    run_owners = [e.worker_id for e in history if e.event == "run.running"]
    assert run_owners == ["cut-off", "replacement"]
    assert cluster.starts()["who.1"] == 2
    assert replacement.alive and cut_off.alive


async def test_sigterm_drains_a_worker_and_no_finished_task_runs_again(
    cluster: Cluster, tmp_path: Path,
) -> None:
    server, url = await cluster.server(tmp_path / "aiki.db")
    a = await cluster.worker(url, "a", "--grace", "20", task_seconds=1.0)
    async with aiki.connect(url) as client:
        await eventually(lambda: workers_connected(client, "a"), 30, "a to connect", a)
        handle = await client.enqueue("remote-sum", 7, version="1")
        await eventually(lambda: _started(cluster, "a", "7.0"), 30, "the first task", a)
        a.signal(SIGTERM)
        assert await a.wait(15) == 0, a.log()
        assert ("a", "end", "7.0") in cluster.executions(), "the task in flight finished"
        run = (await client.list_runs(limit=1))[0]
        assert run.state == "queued", "given back at the step boundary"
        assert "draining" in a.log() and "drained; stopping" in a.log()
        b = await cluster.worker(url, "b", task_seconds=0.05)
        assert await handle.wait_for_completion(timeout=30) == 30 * 7 + 3
        history = [(e.event, e.worker_id) for e in await handle.history()]
    assert cluster.starts()["7.0"] == 1
    assert ("run.queued", "a") in history
    assert history[-1] == ("run.completed", "b")
    assert b.alive


async def _started(cluster: Cluster, worker: str, key: str) -> bool:
    return (worker, "start", key) in cluster.executions()


async def test_sigterm_stops_the_server_gracefully_and_workers_wait_for_it(
    cluster: Cluster, tmp_path: Path,
) -> None:
    db = tmp_path / "aiki.db"
    server, url = await cluster.server(db, "--shutdown-grace", "5")
    port = int(url.rsplit(":", 1)[1])
    a = await cluster.worker(url, "a")
    async with aiki.connect(url) as client:
        await eventually(lambda: workers_connected(client, "a"), 30, "a to connect", a)
        first = await client.enqueue("remote-sum", 1, version="1")
        assert await first.wait_for_completion(timeout=30) == 33
        server.signal(SIGTERM)
        assert await server.wait(10) == 0, server.log()
        assert "shutting down gracefully" in server.log() and "server stopped" in server.log()

        async def told() -> bool:
            return "the server is shutting down" in a.log()

        await eventually(told, 10, "the worker to be told", a)
        again, _ = await cluster.server(db, port=port)
        second = await client.enqueue("remote-sum", 2, version="1")  # the client reconnected
        assert await second.wait_for_completion(timeout=30) == 63  # and so did the worker
        assert [r.id for r in await client.list_runs()] == [second.id, first.id]
    assert a.alive and again.alive
