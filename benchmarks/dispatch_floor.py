"""The floor under the dispatch latency target (enqueue -> first task start, idle worker).

Issue 10 asks for a p50 of at most 3 ms on SQLite over loopback WebSocket. On that path a
run needs two durable commits (the enqueue with its claim, then the first task's start,
fenced) and three one-way messages after the enqueue's own (the Assign to the worker, its
start to the server, the answer back): 1.5 WebSocket round trips. This measures what those
cost on this machine with no engine at all, in the conditions of the latency suite (each
sample after 20-60 ms idle, as the probe enqueues):

- a WebSocket round trip between two processes (trio-websocket, loopback, a 200-byte text
  message echoed by a second process);
- a single-row commit on a SQLite file opened as the store opens it (WAL,
  ``synchronous = FULL``), after the same idle, and one right after it.

``python -m benchmarks.dispatch_floor [N]`` prints the medians and p99s and the floor they add
up to: 2 round trips (the enqueue's message and the three after it) and 2 commits, the first
after idle, the second about a millisecond later, so between one right after the first and
one after idle: the floor is given as that range.

``--postgres`` measures the same for PostgreSQL (target: p50 5 ms): an embedded server with
the durable settings of ``make bench``, each single-row commit an autocommitted INSERT sent
by asyncpg on the store's own asyncio thread (:class:`aiki.asyncio_bridge.AsyncioThread`)
and awaited from Trio, as the store sends its one-statement writes, crossing included.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import trio

from aiki.store import sqlite as sqlite_store

PAYLOAD = '{"t":"ping","req":1,"payload":"' + "x" * 200 + '"}'


async def _echo(port: int) -> None:
    from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                await ws.send_message(await ws.get_message())
        except ConnectionClosed:
            return  # the measuring side is done

    await serve_websocket(handler, "127.0.0.1", port, ssl_context=None)


async def _round_trips(port: int, count: int, rng: random.Random) -> list[float]:
    from trio_websocket import open_websocket_url

    with trio.fail_after(30):
        while True:  # the echo process is starting
            try:
                await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                break
            except OSError:
                await trio.sleep(0.05)
    samples: list[float] = []
    async with open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
        for n in range(count + 10):
            await trio.sleep(rng.uniform(0.02, 0.06))
            start = time.perf_counter()
            await ws.send_message(PAYLOAD)
            await ws.get_message()
            if n >= 10:  # (warm-up)
                samples.append((time.perf_counter() - start) * 1000)
    return samples


def _commits(count: int, rng: random.Random) -> tuple[list[float], list[float]]:
    with tempfile.TemporaryDirectory(prefix="aiki-bench-floor-") as tmp:
        db = sqlite_store._connect(os.path.join(tmp, "floor.db"), "FULL", busy_timeout=5.0)
        try:
            db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
            idle: list[float] = []
            warm: list[float] = []
            for _ in range(count):
                time.sleep(rng.uniform(0.02, 0.06))
                for into in (idle, warm):
                    start = time.perf_counter()
                    db.execute("INSERT INTO t (v) VALUES (?)", (PAYLOAD,))
                    into.append((time.perf_counter() - start) * 1000)
        finally:
            db.close()
    return idle, warm


def _postgres_commits(count: int, rng: random.Random) -> tuple[list[float], list[float]]:
    import asyncpg

    from aiki.asyncio_bridge import AsyncioThread
    from benchmarks.postgres import started

    async def measure(url: str) -> tuple[list[float], list[float]]:
        async with AsyncioThread.open() as loop:
            conn = await loop.run(asyncpg.connect, url)
            try:
                await loop.run(conn.execute,
                               "CREATE TABLE t (id bigserial PRIMARY KEY, v text NOT NULL)")
                idle: list[float] = []
                warm: list[float] = []
                for _ in range(count):
                    await trio.sleep(rng.uniform(0.02, 0.06))
                    for into in (idle, warm):
                        start = time.perf_counter()
                        await loop.run(conn.execute, "INSERT INTO t (v) VALUES ($1)", PAYLOAD)
                        into.append((time.perf_counter() - start) * 1000)
                return idle, warm
            finally:
                await loop.run(conn.close)

    with started() as pg:
        return trio.run(measure, pg.fresh_database("floor"))


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[max(0, int(len(ordered) * 0.99) - 1)]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    postgres = "--postgres" in args
    args = [a for a in args if a != "--postgres"]
    count = int(args[0]) if args else 300
    port = 18765 + os.getpid() % 1000
    echo = subprocess.Popen([sys.executable, "-c",
                             f"import trio; from benchmarks.dispatch_floor import _echo; "
                             f"trio.run(_echo, {port})"])
    try:
        rtts = trio.run(_round_trips, port, count, random.Random(6))
    finally:
        echo.terminate()
        echo.wait(10)
    idle, warm = (_postgres_commits if postgres else _commits)(count, random.Random(7))
    rtt, commit, after = statistics.median(rtts), statistics.median(idle), statistics.median(warm)
    store, target = ("PostgreSQL", 5) if postgres else ("SQLite", 3)
    print(f"WebSocket round trip after idle: p50 {rtt:.3f} ms, p99 {_p99(rtts):.3f} ms")
    print(f"{store} commit after idle: p50 {commit:.3f} ms, p99 {_p99(idle):.3f} ms; "
          f"right after: p50 {after:.3f} ms")
    print(f"floor of enqueue -> first task start (2 round trips, a commit after idle and one "
          f"soon after): p50 {commit + after + 2 * rtt:.2f} to {2 * commit + 2 * rtt:.2f} ms "
          f"(target: {target} ms)")


if __name__ == "__main__":
    main()
