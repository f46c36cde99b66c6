"""Real ``aiki server`` and ``aiki worker`` processes on 127.0.0.1 for tests.

Ports are chosen by the kernel (``--listen 127.0.0.1:0``; the server prints the URL it got).
Every process a test starts is killed and reaped by the ``cluster`` fixture, whatever
happens. Waits are on conditions with deadlines, never fixed sleeps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

REPO = Path(__file__).resolve().parents[2]
APP = "tests.remote.app:workflows"


@attrs.define(eq=False)
class Proc:
    name: str
    process: trio.Process
    stderr: Path

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    def kill(self) -> None:
        if self.alive:
            self.process.kill()

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def wait(self, timeout: float) -> int:
        with trio.fail_after(timeout):
            return await self.process.wait()


@attrs.define(eq=False)
class Cluster:
    tmp: Path
    procs: list[Proc] = attrs.field(factory=list)

    @property
    def executions_log(self) -> Path:
        return self.tmp / "executions.log"

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env["AIKI_TEST_LOG"] = str(self.executions_log)
        env.pop("AIKI_TOKEN", None)
        env["AIKI_LOG_FORMAT"] = "text"  # these tests read the logs as a person would
        env.update(extra)
        return env

    async def spawn(self, name: str, *args: str, stdout: Any = subprocess.DEVNULL,
                    env: dict[str, str] | None = None) -> Proc:
        stderr = self.tmp / f"{name}.{len(self.procs)}.log"
        with open(stderr, "wb") as err:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "aiki", *args], stdout=stdout, stderr=err,
                stdin=subprocess.DEVNULL, cwd=str(REPO), env=env or self.env(),
            )
        proc = Proc(name, process, stderr)
        self.procs.append(proc)
        return proc

    async def server(self, db: Path, *extra: str, port: int = 0) -> tuple[Proc, str]:
        """An ``aiki server`` on ``db``; returns it with the URL it listens on."""
        proc = await self.spawn(
            "server", "server", "--listen", f"127.0.0.1:{port}", "--store", f"sqlite:///{db}",
            "--lease-ttl", "2", "--poll-interval", "0.2", *extra, stdout=subprocess.PIPE,
        )
        assert proc.process.stdout is not None
        line = b""
        try:
            with trio.fail_after(30):
                while not line.endswith(b"\n"):
                    chunk = await proc.process.stdout.receive_some(1)
                    if not chunk:
                        break
                    line += chunk
        except trio.TooSlowError:
            pytest.fail(f"the server did not say where it listens within 30 s:\n{proc.log()}")
        text = line.decode().strip()
        if not text.startswith("aiki server listening on "):
            pytest.fail(f"the server did not start ({text!r}):\n{proc.log()}")
        return proc, text.rsplit(" ", 1)[1]

    async def worker(self, url: str, worker_id: str, *extra: str, task_seconds: float = 0.05,
                     concurrency: int = 8) -> Proc:
        return await self.spawn(
            f"worker-{worker_id}", "worker", "--server", url, "--app", APP, "--id", worker_id,
            "--concurrency", str(concurrency), "--log-level", "info", *extra,
            env=self.env(AIKI_TEST_WORKER=worker_id, AIKI_TEST_TASK_SECONDS=str(task_seconds)),
        )

    def executions(self) -> list[tuple[str, str, str]]:
        """(worker, start|end, key) for every task execution recorded so far."""
        if not self.executions_log.exists():
            return []
        out = []
        for line in self.executions_log.read_text().splitlines():
            worker, event, key = line.split(" ", 2)
            out.append((worker, event, key))
        return out

    def starts(self) -> Counter[str]:
        return Counter(key for _, event, key in self.executions() if event == "start")

    async def stop_all(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            with trio.move_on_after(10):
                await proc.process.wait()
            if proc.process.stdout is not None:
                await proc.process.stdout.aclose()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str,
                     *logs: Proc) -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds saying ``what``."""
    with trio.move_on_after(timeout):
        while True:
            if await check():
                return
            await trio.sleep(0.05)
    shown = "\n".join(f"--- {p.name} ---\n{p.log()[-3000:]}" for p in logs)
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{shown}")


async def workers_connected(client: Any, *ids: str) -> bool:
    try:
        connected = {w.id for w in await client.list_workers()}
    except (TimeoutError, OSError):
        return False
    return set(ids) <= connected


SIGKILL = signal.SIGKILL
SIGTERM = signal.SIGTERM
