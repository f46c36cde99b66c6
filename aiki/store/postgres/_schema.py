"""The PostgreSQL schema: numbered migrations, applied at start under an advisory lock.

Asyncio code (it runs on the bridge's loop). Each migration is a list of statements applied in
one transaction (PostgreSQL's DDL is transactional); never edit one that has shipped, append a
new one. Every table lives in the store's own schema (``search_path`` is set per connection).
"""

from __future__ import annotations

from typing import Any

from aiki.errors import StoreUnavailable

# ``runs.seq`` is the enqueue order (FIFO claims, newest-first listing); ``steps.seq`` keeps a
# run's steps in the order they were first recorded (an upsert keeps it); ``history.seq`` is
# the global order of events. Times are epoch seconds as float8, like the records.
#
# Indexes: claims, lease expiry and wake-ups read only rows in one live state,
# so their indexes are partial: they stay as small as the live work however many finished
# runs pile up. Listing by state or workflow, newest first, has its own two.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE runs (
            seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
            id TEXT PRIMARY KEY,
            workflow TEXT NOT NULL,
            version TEXT NOT NULL,
            payload TEXT NOT NULL,
            state TEXT NOT NULL,
            idempotency_key TEXT,
            attempts INTEGER NOT NULL,
            lease_epoch BIGINT NOT NULL,
            lease_owner TEXT,
            lease_expires_at DOUBLE PRECISION,
            wake_at DOUBLE PRECISION,
            result TEXT,
            error_type TEXT,
            error_message TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            finished_at DOUBLE PRECISION
        )""",
        """CREATE UNIQUE INDEX runs_idempotency ON runs (workflow, idempotency_key)
            WHERE idempotency_key IS NOT NULL""",
        "CREATE INDEX runs_claim ON runs (workflow, version, seq) WHERE state = 'queued'",
        "CREATE INDEX runs_lease ON runs (lease_expires_at) WHERE state = 'running'",
        "CREATE INDEX runs_wake ON runs (wake_at) WHERE state = 'sleeping'",
        "CREATE INDEX runs_by_state ON runs (state, seq)",
        "CREATE INDEX runs_by_workflow ON runs (workflow, seq)",
        """CREATE TABLE steps (
            run_id TEXT NOT NULL REFERENCES runs (id),
            position TEXT NOT NULL,
            seq BIGINT GENERATED ALWAYS AS IDENTITY,
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            input_hash TEXT NOT NULL,
            input TEXT NOT NULL,
            idempotency_key TEXT,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL,
            output TEXT,
            error_type TEXT,
            error_message TEXT,
            next_attempt_at DOUBLE PRECISION,
            PRIMARY KEY (run_id, position)
        )""",
        """CREATE UNIQUE INDEX steps_idempotency ON steps (run_id, name, idempotency_key)
            WHERE idempotency_key IS NOT NULL""",
        """CREATE TABLE history (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES runs (id),
            at DOUBLE PRECISION NOT NULL,
            event TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            worker_id TEXT,
            position TEXT,
            name TEXT,
            detail TEXT
        )""",
        "CREATE INDEX history_run ON history (run_id, seq)",
    ),
    # Wake-ups for other servers: a run becoming queued (enqueued, released, its lease
    # expired, woken) notifies channel 'aiki_work:<schema>' when its transaction commits.
    # PostgreSQL folds identical notifications of one transaction into one, and a trigger
    # costs no extra round trip.
    (
        """CREATE FUNCTION notify_work() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_notify('aiki_work:' || TG_TABLE_SCHEMA, '');
                RETURN NULL;
            END
        $$""",
        """CREATE TRIGGER runs_queued AFTER INSERT OR UPDATE OF state ON runs
            FOR EACH ROW WHEN (NEW.state = 'queued') EXECUTE FUNCTION notify_work()""",
    ),
    # Waiting is one state with its conditions in one table (``waits``); events sent to runs
    # live in ``events``. A ``sleeping`` run (a long retry delay) waits for its wake-up time.
    # The same channel also says when a run ended (payload 'ended:<id>', for the watchers of
    # every server) and when a wait with a due time began (payload 'due', for their timers).
    (
        """CREATE TABLE waits (
            run_id TEXT NOT NULL REFERENCES runs (id),
            position TEXT NOT NULL,
            kind TEXT NOT NULL,
            name TEXT,
            due_at DOUBLE PRECISION,
            since DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (run_id, position)
        )""",
        "CREATE INDEX waits_due ON waits (due_at) WHERE due_at IS NOT NULL",
        """CREATE TABLE events (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES runs (id),
            name TEXT NOT NULL,
            payload TEXT NOT NULL,
            idempotency_key TEXT,
            sent_at DOUBLE PRECISION NOT NULL,
            position TEXT
        )""",
        """CREATE UNIQUE INDEX events_idempotency ON events (run_id, name, idempotency_key)
            WHERE idempotency_key IS NOT NULL""",
        "CREATE INDEX events_of_run ON events (run_id, name, seq)",
        """INSERT INTO waits (run_id, position, kind, name, due_at, since)
            SELECT id, '', 'retry', NULL, coalesce(wake_at, updated_at), updated_at
            FROM runs WHERE state = 'sleeping'""",
        "UPDATE runs SET state = 'waiting' WHERE state = 'sleeping'",
        "ALTER TABLE runs DROP COLUMN wake_at",
        """CREATE FUNCTION notify_ended() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_notify('aiki_work:' || TG_TABLE_SCHEMA, 'ended:' || NEW.id);
                RETURN NULL;
            END
        $$""",
        """CREATE TRIGGER runs_ended AFTER UPDATE OF state ON runs FOR EACH ROW
            WHEN (NEW.state IN ('completed', 'failed', 'cancelled'))
            EXECUTE FUNCTION notify_ended()""",
        """CREATE FUNCTION notify_due() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_notify('aiki_work:' || TG_TABLE_SCHEMA, 'due');
                RETURN NULL;
            END
        $$""",
        """CREATE TRIGGER waits_due AFTER INSERT ON waits FOR EACH ROW
            WHEN (NEW.due_at IS NOT NULL) EXECUTE FUNCTION notify_due()""",
    ),
    # Failures carry the worker's Python traceback (at most 16 KiB, cut by the server).
    (
        "ALTER TABLE runs ADD COLUMN error_traceback TEXT",
        "ALTER TABLE steps ADD COLUMN error_traceback TEXT",
        # Retention deletes finished runs oldest first.
        "CREATE INDEX runs_finished ON runs (finished_at) WHERE finished_at IS NOT NULL",
    ),
    # Schedules (cron or interval) and what became of each occurrence (a firing's key is
    # unique per schedule: an occurrence is decided once). A schedule defined, resumed or
    # moved on notifies 'due', so every server's timer reads the next occurrence again.
    (
        """CREATE TABLE schedules (
            id TEXT PRIMARY KEY,
            workflow TEXT NOT NULL,
            version TEXT NOT NULL,
            payload TEXT NOT NULL,
            cron TEXT,
            timezone TEXT NOT NULL,
            every DOUBLE PRECISION,
            overlap TEXT NOT NULL,
            catchup_window DOUBLE PRECISION NOT NULL,
            paused BOOLEAN NOT NULL,
            next_fire_at DOUBLE PRECISION NOT NULL,
            last_run_id TEXT,
            buffered_at DOUBLE PRECISION,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            buffered_key TEXT
        )""",
        "CREATE INDEX schedules_due ON schedules (next_fire_at) WHERE NOT paused",
        "CREATE INDEX schedules_last_run ON schedules (last_run_id)",
        """CREATE TABLE schedule_firings (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            schedule_id TEXT NOT NULL,
            key TEXT NOT NULL,
            occurrence DOUBLE PRECISION NOT NULL,
            outcome TEXT NOT NULL,
            reason TEXT NOT NULL,
            run_id TEXT,
            at DOUBLE PRECISION NOT NULL,
            detail TEXT,
            last DOUBLE PRECISION,
            count INTEGER NOT NULL,
            UNIQUE (schedule_id, key)
        )""",
        "CREATE INDEX schedule_firings_at ON schedule_firings (schedule_id, at, seq)",
        """CREATE TRIGGER schedules_due AFTER INSERT OR UPDATE OF next_fire_at, paused
            ON schedules FOR EACH ROW WHEN (NOT NEW.paused) EXECUTE FUNCTION notify_due()""",
    ),
    # Run controls: a fork records the run it was copied from and how many steps it got, a
    # run the last control applied to it (a repeated request is answered as done). A
    # paused run that its worker has not given back yet still has a lease that may expire.
    (
        "ALTER TABLE runs ADD COLUMN forked_from TEXT",
        "ALTER TABLE runs ADD COLUMN forked_steps INTEGER",
        "ALTER TABLE runs ADD COLUMN control_id TEXT",
        """CREATE INDEX runs_paused_lease ON runs (lease_expires_at)
            WHERE state = 'paused' AND lease_owner IS NOT NULL""",
    ),
    # OpenTelemetry: the trace context of the span that enqueued the run (issue 17).
    (
        "ALTER TABLE runs ADD COLUMN trace_context TEXT",
    ),
    # Cancellation: a cancel asked for (when, why) and the end of its grace period, which
    # the timer enforces.
    (
        "ALTER TABLE runs ADD COLUMN cancel_requested_at DOUBLE PRECISION",
        "ALTER TABLE runs ADD COLUMN cancel_reason TEXT",
        "ALTER TABLE runs ADD COLUMN cancel_deadline DOUBLE PRECISION",
        """CREATE INDEX runs_cancel_deadline ON runs (cancel_deadline)
            WHERE cancel_deadline IS NOT NULL
            AND state NOT IN ('completed', 'failed', 'cancelled')""",
        # A cancel that revokes a held lease tells every server ('revoked:<epoch>:<id>',
        # the epoch revoked): the one its worker is connected to pushes it the news.
        """CREATE FUNCTION notify_revoked() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_notify('aiki_work:' || TG_TABLE_SCHEMA,
                                  'revoked:' || OLD.lease_epoch || ':' || NEW.id);
                RETURN NULL;
            END
        $$""",
        """CREATE TRIGGER runs_revoked AFTER UPDATE OF lease_epoch ON runs FOR EACH ROW
            WHEN (NEW.cancel_requested_at IS NOT NULL AND OLD.lease_owner IS NOT NULL
                  AND NEW.lease_epoch > OLD.lease_epoch)
            EXECUTE FUNCTION notify_revoked()""",
    ),
    # Child runs: each knows its parent (a run's children are found by it), and whether it
    # was detached.
    (
        "ALTER TABLE runs ADD COLUMN parent_id TEXT",
        "ALTER TABLE runs ADD COLUMN detached BOOLEAN NOT NULL DEFAULT false",
        "CREATE INDEX runs_parent ON runs (parent_id, seq) WHERE parent_id IS NOT NULL",
    ),
    # One-statement writes (``_fast``) rely on every transaction that writes a run's steps
    # writing the run's row too; a server from before them writes some steps alone. This
    # marks the schema, so such a server refuses to open it ("newer than this version").
    (
        "COMMENT ON TABLE steps IS 'Every transaction that writes a run''s steps writes"
        " the run''s row too: its version tells one-statement writes of any change.'",
    ),
)

# The oldest server this store is written for: pg_current_xact_id_if_assigned and
# pg_xact_status (13) resolve unknown commits; pg_terminate_backend's timeout (14) makes sure
# an orphaned transaction is over before its outcome is read.
MIN_SERVER_VERSION = 14


async def migrate(conn: Any, schema: str) -> int:
    """Bring ``schema`` up to date; the version it is at. Safe to run from several servers.

    Each migration runs in its own transaction holding a transaction-scoped advisory lock
    keyed by the schema name, so concurrent starts apply each migration exactly once and a
    crashed start leaves no lock behind.
    """
    version = conn.get_server_version()
    if version.major < MIN_SERVER_VERSION:
        raise StoreUnavailable(
            f"PostgreSQL {version.major}.{version.minor} is too old for the Aiki store; it "
            f"needs PostgreSQL {MIN_SERVER_VERSION} or newer"
        )
    for number, statements in enumerate(MIGRATIONS, start=1):
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('aiki.migrate.' || $1))",
                               schema)
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            current: int = await conn.fetchval(
                "SELECT coalesce(max(version), 0) FROM schema_migrations"
            )
            if current > len(MIGRATIONS):
                raise StoreUnavailable(
                    f"the PostgreSQL schema {schema!r} is at version {current}, newer than "
                    f"this version of aiki knows ({len(MIGRATIONS)}); upgrade aiki"
                )
            if current < number:
                for statement in statements:
                    await conn.execute(statement)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", number)
    return len(MIGRATIONS)
