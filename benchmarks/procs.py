"""Real ``aiki server`` / ``aiki worker`` processes on 127.0.0.1 for the benchmarks.

Like ``tests/remote/processes.py``, but synchronous (``subprocess``) so a suite can start its
processes before its own ``trio.run``. The server listens on a port the kernel picks and
prints the URL it got; every process is killed and reaped when its block ends.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs

REPO = Path(__file__).resolve().parents[1]
PROBE_APP = "benchmarks.probe_app:workflows"


@attrs.define(eq=False)
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self, tail: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (graceful), then SIGKILL if it lingers; always reaped."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), e.get("PYTHONPATH")]))
    e.pop("AIKI_TOKEN", None)
    return e


def spawn(name: str, argv: Sequence[str], logdir: Path, *, stdout: int | None = None) -> Proc:
    log_path = logdir / f"{name}.log"
    with open(log_path, "wb") as err:
        popen = subprocess.Popen(
            [sys.executable, *argv], stdout=stdout if stdout is not None else subprocess.DEVNULL,
            stderr=err, stdin=subprocess.DEVNULL, cwd=str(REPO), env=env(),
        )
    return Proc(name, popen, log_path)


def read_listen_line(proc: Proc, timeout: float = 60.0) -> str:
    """The URL from the server's ``... listening on URL`` line."""
    assert proc.popen.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.popen.stdout, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise RuntimeError(f"{proc.name} did not say where it listens:\n{proc.log()}")
            chunk = os.read(proc.popen.stdout.fileno(), 1)
            if not chunk:
                raise RuntimeError(f"{proc.name} exited before listening:\n{proc.log()}")
            line += chunk
    text = line.decode().strip()
    if " listening on " not in text:
        raise RuntimeError(f"{proc.name} did not start ({text!r}):\n{proc.log()}")
    return text.rsplit(" ", 1)[1]


@contextlib.contextmanager
def server(store_url: str, logdir: Path, *extra: str,
           module: Sequence[str] = ("-m", "aiki", "server"), name: str = "server",
           ) -> Iterator[tuple[Proc, str]]:
    """An ``aiki server`` (or ``module``, which must take the same options) on ``store_url``."""
    proc = spawn(name, [*module, "--listen", "127.0.0.1:0", "--store", store_url,
                        "--log-level", "warning", *extra], logdir, stdout=subprocess.PIPE)
    try:
        yield proc, read_listen_line(proc)
    finally:
        proc.stop()


@contextlib.contextmanager
def worker(url: str, logdir: Path, worker_id: str, *extra: str, app: str = PROBE_APP,
           concurrency: int = 8) -> Iterator[Proc]:
    proc = spawn(f"worker-{worker_id}",
                 ["-m", "aiki", "worker", "--server", url, "--app", app, "--id", worker_id,
                  "--concurrency", str(concurrency), "--log-level", "warning", *extra], logdir)
    try:
        yield proc
    finally:
        proc.stop()


async def wait_for_workers(client: object, *ids: str, timeout: float = 60.0) -> None:
    """Poll ``client.list_workers()`` until every id in ``ids`` is connected."""
    import trio

    with trio.move_on_after(timeout):
        while True:
            try:
                connected = {w.id for w in await client.list_workers()}  # type: ignore[attr-defined]
            except (TimeoutError, OSError):
                connected = set()
            if set(ids) <= connected:
                return
            await trio.sleep(0.05)
    raise RuntimeError(f"workers {ids} did not connect within {timeout} s")
