"""``aiki server`` with counters on its store, for the idle benchmark.

``python -m benchmarks.counting_server <aiki server options>`` is ``aiki server`` itself
(``aiki.cli.main(["server", ...])``, so ``run_server`` and the whole tree are the real ones)
with one change: the store ``run_server`` opens is wrapped to count what the server asks of
it, and the driver below it counts the SQL it sends:

- ``store calls``: every ``apply`` (one transaction; its ops are counted by type) and every
  read (``get_run``, ``next_due``, ...); ``watch`` (PostgreSQL's LISTEN) passes through.
- ``sql``: statements executed. SQLite: ``sqlite3``'s trace callback on the store's
  connection (every statement, ``BEGIN``/``COMMIT`` included). PostgreSQL: asyncpg's query
  logger on every connection the store opens (every statement sent, ``BEGIN``/``COMMIT``
  included; the LISTEN connection's notifications are not queries).

The counters cost a dict increment per call. ``kill -USR1 <pid>`` writes them as JSON to the
file ``$AIKI_BENCH_COUNTS`` names (with a ``dumps`` sequence number, so a reader can tell a
fresh dump from an old one).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sqlite3
import sys
from collections.abc import Sequence
from typing import Any

COUNTS: collections.Counter[str] = collections.Counter()


class CountingStore:
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if name in ("get_run", "get_steps", "get_history", "list_runs", "next_due",
                    "get_waits", "get_events"):
            async def read(*args: Any, **kwargs: Any) -> Any:
                COUNTS["store_calls"] += 1
                COUNTS[f"read:{name}"] += 1
                return await value(*args, **kwargs)

            return read
        return value

    async def apply(self, ops: Sequence[Any]) -> list[Any]:
        COUNTS["store_calls"] += 1
        COUNTS["apply"] += 1
        for op in ops:
            COUNTS[f"op:{type(op).__name__}"] += 1
        return await self._inner.apply(ops)  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        await self._inner.aclose()


def _count_sql(_statement: Any = None) -> None:
    COUNTS["sql"] += 1


def install() -> None:
    import aiki.server

    open_store = getattr(aiki.server, "open_store")  # noqa: B009 (not re-exported)

    async def counting_open_store(url: str) -> Any:
        store = await open_store(url)
        db = getattr(store, "_db", None)
        if isinstance(db, sqlite3.Connection):
            db.set_trace_callback(_count_sql)
        return CountingStore(store)

    setattr(aiki.server, "open_store", counting_open_store)  # noqa: B010
    try:
        import asyncpg
    except ImportError:
        pass
    else:
        connect = asyncpg.connect

        async def counting_connect(*args: Any, **kwargs: Any) -> Any:
            conn = await connect(*args, **kwargs)
            conn.add_query_logger(lambda _query: _count_sql())
            COUNTS["pg_connections_opened"] += 1
            return conn

        asyncpg.connect = counting_connect

    path = os.environ.get("AIKI_BENCH_COUNTS")

    def dump(signum: int, frame: Any) -> None:
        COUNTS["dumps"] += 1
        if path:
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                json.dump(dict(COUNTS), f)
            os.replace(tmp, path)

    signal.signal(signal.SIGUSR1, dump)


def main(argv: list[str]) -> int:
    install()
    from aiki import cli

    return cli.main(["server", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
