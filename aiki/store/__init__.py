"""Stores: where runs, steps and history live. ``open_store(url)`` picks one by URL."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from aiki.records import ClaimedRun, HistoryEvent, Lease, RunRecord, StepRecord
from aiki.store.base import Store, execute
from aiki.store.memory import MemoryStore
from aiki.store.sqlite import SqliteStore

__all__ = [
    "ClaimedRun", "HistoryEvent", "Lease", "MemoryStore", "RunRecord", "SqliteStore",
    "StepRecord", "Store", "execute", "open_store", "redact_url",
]

ACCEPTED_URLS = (
    '"memory", "sqlite:///relative/path.db", "sqlite:////absolute/path.db", '
    '"sqlite://:memory:", "postgresql://user:password@host:port/database[?schema=name]" '
    '(or "postgres://...")'
)


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``: for logs and error messages."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


async def open_store(url: str) -> Store:
    """Open the store a URL names.

    - ``memory``: a :class:`MemoryStore` (lost when the process ends);
    - ``sqlite:///path.db``: SQLite at ``path.db``, relative to the working directory;
      ``sqlite:////abs/path.db``: at ``/abs/path.db``; ``sqlite://:memory:``: SQLite in memory;
    - ``postgresql://user:password@host:port/database`` (or ``postgres://``): PostgreSQL,
      with the tables in schema ``aiki`` unless ``?schema=name`` says otherwise (other query
      parameters go to asyncpg, e.g. ``?host=/run/postgresql`` for a Unix socket). Needs
      ``pip install 'aiki[postgres]'``; see :meth:`aiki.store.postgres.PostgresStore.open`.
    """
    if url == "memory":
        return MemoryStore()
    if url == "sqlite://:memory:":
        return await SqliteStore.open(":memory:")
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return await SqliteStore.open(url[len("sqlite:///"):])
    if url.startswith(("postgresql://", "postgres://")):
        return await _open_postgres(url)
    raise ValueError(f"unsupported store URL {url!r}; accepted forms: {ACCEPTED_URLS}")


async def _open_postgres(url: str) -> Store:
    try:
        from aiki.store.postgres import PostgresStore
    except ImportError as exc:
        raise ImportError(
            f"the PostgreSQL store needs asyncpg ({exc}); install them with "
            "pip install 'aiki[postgres]'"
        ) from exc
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for name, value in query if name == "schema"]
    dsn = urlunsplit(parts._replace(query=urlencode([(n, v) for n, v in query if n != "schema"])))
    if len(schemas) > 1:
        raise ValueError(f"store URL {url!r} names more than one schema")
    return await PostgresStore.open(dsn, schema=schemas[0] if schemas else "aiki")
