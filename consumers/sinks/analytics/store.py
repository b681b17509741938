"""The analytics tables, their migrations, and the one write algorithm both databases run.

The algorithm is written once against :class:`SqlPort`, a few async calls that PostgreSQL
(:mod:`.postgres`) and DuckDB (:mod:`.duckdb_store`) each implement; the SQL is the dialect the
two share (``$n`` parameters, ``unnest`` of array parameters, ``ON CONFLICT``, ``RETURNING``),
and each adapter loads a batch's rows its own fastest way (PostgreSQL: binary ``COPY`` for new
logins, binary arrays through ``unnest`` otherwise; DuckDB: column lists).

The sink writes one table, ``logins`` (one row per login, keyed by ``event_id``); ``visits``
and ``venue_daily`` are views over it. So they are exact at every moment and there is nothing
to keep in step: keeping them as tables costs a keyed write per login (at peak load nearly
every login continues a visit an earlier batch opened) and, for an exact unique-visitor
count, a row per visitor, venue and day; together more than the logins themselves.

One batch is one database transaction:

1. advance ``sink_offsets`` for every partition in the batch, *only where the epoch still
   matches* the one this instance got when it claimed the partition (else :class:`Fenced`,
   and the transaction rolls back: a zombie after a rebalance writes nothing);
2. insert the logins whose ``event_id`` is not stored yet, learning which those were
   (:meth:`SqlPort.insert_new`: ``ON CONFLICT DO NOTHING RETURNING``, or on PostgreSQL a
   plain ``COPY`` when no login of the batch is stored).

So the offsets and the rows commit together, and a replay (or a retried batch) inserts no
login twice and therefore counts nothing twice.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, Protocol

from bridge.errors import WifiBridgeError
from consumers.sinks.analytics.rows import LOGIN_COLUMNS, Login, dedupe

log = logging.getLogger(__name__)

__all__ = [
    "LOGINS_DDL",
    "MIGRATIONS",
    "AnalyticsStore",
    "Claim",
    "Fenced",
    "Position",
    "SqlPort",
    "StoreError",
    "StoreUnavailable",
    "WriteResult",
]


class StoreError(WifiBridgeError):
    """The analytics database did not take a batch."""

    code = "store_error"


class StoreUnavailable(StoreError):
    """The database is unreachable or refused the transaction; retry later, nothing was written."""

    code = "store_unavailable"
    retryable = True


class Fenced(StoreError):
    """Another instance claimed these partitions since this one did; nothing was written."""

    code = "fenced"

    def __init__(self, partitions: Sequence[tuple[str, int]]) -> None:
        super().__init__(f"partitions claimed by another instance: {sorted(partitions)}")
        self.partitions = tuple(partitions)


@dataclass(frozen=True, slots=True)
class Claim:
    """A partition this instance owns: its epoch, and where to resume (None: from the start)."""

    topic: str
    partition: int
    epoch: int
    next_offset: int | None


@dataclass(frozen=True, slots=True)
class Position:
    """After this batch, ``partition`` resumes at ``next_offset``; valid only under ``epoch``."""

    topic: str
    partition: int
    epoch: int
    next_offset: int


@dataclass(frozen=True, slots=True)
class WriteResult:
    logins_inserted: int
    duplicates: int


class SqlPort(Protocol):
    """What the write algorithm needs from a database connection."""

    #: ``postgresql`` or ``duckdb``: for logs and metric labels.
    name: str
    #: Errors after which the connection is dropped and the batch retried.
    transient_errors: tuple[type[BaseException], ...]

    async def connect(self) -> None:
        """Open the connection if it is not open (idempotent)."""

    async def reset(self) -> None:
        """Drop the connection after an error; the next :meth:`connect` opens a new one."""

    async def close(self) -> None: ...

    def transaction(self) -> AbstractAsyncContextManager[None]:
        """Commit on a normal exit, roll back on an exception."""

    async def fetch(self, query: str, *args: Any) -> list[tuple[Any, ...]]: ...

    async def execute(self, query: str, *args: Any) -> None: ...

    async def lock_migrations(self) -> None:
        """Serialise concurrent migrations (inside the migration transaction)."""

    async def insert_new(
        self, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        """Insert the rows whose key (the first column, the primary key) is not in ``table``.

        Returns the keys it inserted: a row whose key is there already is left alone.
        """


#: A migration step: SQL both databases run, or SQL by database (``SqlPort.name``); a
#: database not named skips the step.
Statement = str | Mapping[str, str]

# The first login (by time, then event id) gives a visit's user, device and venue.
_VISITS_VIEW: Final = """CREATE VIEW visits AS
    SELECT visit_id,
        (array_agg(user_id ORDER BY authentication_time, event_id))[1] AS user_id,
        (array_agg(client_mac ORDER BY authentication_time, event_id))[1] AS client_mac,
        (array_agg(venue_id ORDER BY authentication_time, event_id))[1] AS venue_id,
        min(authentication_time) AS first_login_at,
        max(authentication_time) AS last_login_at,
        count(*) AS logins
    FROM logins
    WHERE visit_id IS NOT NULL
    GROUP BY visit_id"""

# Days are UTC days whatever the reading session's time zone: timezone('UTC', ...) is the UTC
# wall clock in both databases. A visitor is the user id, else the device; a new visit is the
# login the pipeline marked as opening one (visit.isNew).
_UTC_DAY: Final = "CAST(timezone('UTC', authentication_time) AS date)"
_VENUE_DAILY_VIEW: Final = f"""CREATE VIEW venue_daily AS
    SELECT venue_id, {_UTC_DAY} AS day,
        count(*) AS logins,
        count(DISTINCT coalesce(user_id, 'mac:' || client_mac)) AS unique_visitors,
        count(*) FILTER (WHERE visit_is_new) AS new_visits
    FROM logins
    WHERE venue_id IS NOT NULL
    GROUP BY venue_id, {_UTC_DAY}"""  # noqa: S608 (constants only)

# Column types both databases know by these names.
LOGINS_DDL: Final = """CREATE TABLE logins (
        event_id text PRIMARY KEY,
        user_id text,
        client_mac text,
        company_id text,
        venue_id text,
        venue_name text,
        provider text,
        authentication_time timestamptz NOT NULL,
        received_at timestamptz,
        visit_id text,
        visit_is_new boolean,
        late boolean NOT NULL,
        written_at timestamptz NOT NULL DEFAULT current_timestamp
    )"""

MIGRATIONS: Final[tuple[tuple[int, tuple[Statement, ...]], ...]] = (
    (
        1,
        (
            LOGINS_DDL,
            """CREATE TABLE visits (
                visit_id text PRIMARY KEY,
                user_id text,
                client_mac text,
                venue_id text,
                first_login_at timestamptz NOT NULL,
                last_login_at timestamptz NOT NULL,
                logins bigint NOT NULL
            )""",
            """CREATE TABLE venue_daily (
                venue_id text NOT NULL,
                day date NOT NULL,
                logins bigint NOT NULL,
                unique_visitors bigint NOT NULL,
                new_visits bigint NOT NULL,
                PRIMARY KEY (venue_id, day)
            )""",
            # Who was already counted at a venue on a day: makes unique_visitors additive.
            """CREATE TABLE venue_daily_visitors (
                venue_id text NOT NULL,
                day date NOT NULL,
                visitor text NOT NULL,
                PRIMARY KEY (venue_id, day, visitor)
            )""",
            # Where each consumer group resumes, and the epoch that fences zombie writers.
            """CREATE TABLE sink_offsets (
                consumer_group text NOT NULL,
                topic text NOT NULL,
                partition integer NOT NULL,
                next_offset bigint,
                epoch bigint NOT NULL,
                claimed_at timestamptz NOT NULL,
                PRIMARY KEY (consumer_group, topic, partition)
            )""",
        ),
    ),
    (
        # visits and venue_daily become views over logins (what they held is derived from it).
        2,
        (
            "DROP TABLE venue_daily_visitors",
            "DROP TABLE venue_daily",
            "DROP TABLE visits",
            _VISITS_VIEW,
            _VENUE_DAILY_VIEW,
            # Logins arrive in about time order: a block-range index costs next to nothing to
            # keep and lets a query for some days (of venue_daily too) read only their blocks.
            {
                "postgresql": f"CREATE INDEX logins_utc_day ON logins USING brin (({_UTC_DAY})) "
                "WITH (autosummarize = on)"
            },
        ),
    ),
)

_ADVANCE_OFFSETS: Final = (
    "UPDATE sink_offsets SET next_offset = v.next_offset FROM ("
    "SELECT unnest($1::text[]) AS topic, unnest($2::integer[]) AS part, "
    "unnest($3::bigint[]) AS next_offset, unnest($4::bigint[]) AS epoch) AS v "
    "WHERE sink_offsets.topic = v.topic AND sink_offsets.partition = v.part "
    "AND sink_offsets.epoch = v.epoch AND sink_offsets.consumer_group = $5 "
    "RETURNING sink_offsets.topic, sink_offsets.partition"
)
_POSITIONS: Final = (
    "SELECT topic, partition, next_offset FROM sink_offsets "
    "WHERE consumer_group = $1 AND topic IN (SELECT unnest($2::text[])) "
    "ORDER BY topic, partition"
)
_EPOCHS: Final = (
    "SELECT topic, partition, epoch FROM sink_offsets "
    "WHERE consumer_group = $1 AND topic IN (SELECT unnest($2::text[]))"
)
_MOVE: Final = (
    "INSERT INTO sink_offsets (consumer_group, topic, partition, next_offset, epoch, claimed_at) "
    "VALUES ($1, $2, $3, $4, 1, current_timestamp) "
    "ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET "
    "next_offset = excluded.next_offset, epoch = sink_offsets.epoch + 1, "
    "claimed_at = excluded.claimed_at"
)
_CLAIM: Final = (
    "INSERT INTO sink_offsets (consumer_group, topic, partition, next_offset, epoch, claimed_at) "
    "VALUES ($1, $2, $3, NULL, 1, current_timestamp) "
    "ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET "
    "epoch = sink_offsets.epoch + 1, claimed_at = excluded.claimed_at "
    "RETURNING epoch, next_offset"
)


class AnalyticsStore:
    """The analytics tables behind one :class:`SqlPort`; every method is one transaction.

    ``group_id`` is the Kafka consumer group: positions and epochs are kept per group, so a new
    group replays the topics from the start (and, the writes being idempotent, adds nothing).

    Errors of the database surface as :class:`StoreUnavailable` (retryable: nothing was
    written) or :class:`Fenced`; messages carry error classes only, never row values.
    """

    def __init__(self, sql: SqlPort, *, group_id: str) -> None:
        if not group_id:
            raise ValueError("group_id must not be empty")
        self._sql = sql
        self.group_id = group_id
        self._migrated = False

    @asynccontextmanager
    async def _translated(self) -> AsyncIterator[None]:
        """A transient database error becomes :class:`StoreUnavailable`; the connection goes."""
        try:
            yield
        except self._sql.transient_errors as exc:
            await self._sql.reset()
            raise StoreUnavailable(f"{self._sql.name}: {_describe(exc)}") from exc

    @property
    def kind(self) -> str:
        return self._sql.name

    async def open(self) -> None:
        """Connect and bring the schema to the newest version (idempotent, concurrency-safe)."""
        async with self._translated():
            await self._sql.connect()
            if not self._migrated:
                await self._migrate()
                self._migrated = True

    async def close(self) -> None:
        await self._sql.close()

    async def schema_version(self) -> int:
        await self.open()
        rows = await self._sql.fetch("SELECT max(version) FROM schema_version")
        return int(rows[0][0] or 0)

    async def claim(self, topic: str, partitions: Sequence[int]) -> list[Claim]:
        """Take ownership of ``partitions``: bump each one's epoch, return where to resume."""
        await self.open()
        claims: list[Claim] = []
        async with self._translated(), self._sql.transaction():
            for partition in sorted(partitions):
                rows = await self._sql.fetch(_CLAIM, self.group_id, topic, partition)
                epoch, next_offset = rows[0]
                claims.append(Claim(topic, partition, int(epoch), next_offset))
        return claims

    async def positions(self, topics: Sequence[str]) -> dict[tuple[str, int], int | None]:
        """Where the group resumes on each stored partition of ``topics`` (None: the start)."""
        await self.open()
        async with self._translated():
            rows = await self._sql.fetch(_POSITIONS, self.group_id, list(topics))
        return {(str(topic), int(partition)): offset for topic, partition, offset in rows}

    async def epochs(self, topics: Sequence[str]) -> dict[tuple[str, int], int]:
        """The current epoch of each stored partition of ``topics``, for this group."""
        await self.open()
        async with self._translated():
            rows = await self._sql.fetch(_EPOCHS, self.group_id, list(topics))
        return {(str(topic), int(partition)): int(epoch) for topic, partition, epoch in rows}

    async def move(self, moves: Mapping[tuple[str, int], int | None]) -> None:
        """Set where the group resumes (None: the start), fencing whoever holds the partitions.

        Each moved partition's epoch goes up, in one transaction: an instance writing it gets
        :class:`Fenced` on its next batch, claims it again and resumes from the new position.
        """
        await self.open()
        async with self._translated(), self._sql.transaction():
            for (topic, partition), offset in sorted(moves.items()):
                await self._sql.execute(_MOVE, self.group_id, topic, partition, offset)

    async def write(self, logins: Sequence[Login], positions: Sequence[Position]) -> WriteResult:
        """Store one batch and its partitions' next offsets in one transaction."""
        await self.open()
        unique = dedupe(logins)
        async with self._translated(), self._sql.transaction():
            await self._advance(positions)
            inserted = (
                await self._sql.insert_new("logins", LOGIN_COLUMNS, [u.row() for u in unique])
                if unique
                else []
            )
        return WriteResult(logins_inserted=len(inserted), duplicates=len(logins) - len(inserted))

    async def _migrate(self) -> None:
        async with self._sql.transaction():
            await self._sql.lock_migrations()
            await self._sql.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                "version integer PRIMARY KEY, applied_at timestamptz NOT NULL)"
            )
            rows = await self._sql.fetch("SELECT coalesce(max(version), 0) FROM schema_version")
            current = int(rows[0][0])
            for version, statements in MIGRATIONS:
                if version <= current:
                    continue
                for statement in statements:
                    sql = statement if isinstance(statement, str) else statement.get(self._sql.name)
                    if sql is not None:
                        await self._sql.execute(sql)
                await self._sql.execute(
                    "INSERT INTO schema_version (version, applied_at) "
                    "VALUES ($1, current_timestamp)",
                    version,
                )
                log.info("migrated analytics schema", extra={"version": version})

    async def _advance(self, positions: Sequence[Position]) -> None:
        if not positions:
            return
        rows = await self._sql.fetch(
            _ADVANCE_OFFSETS,
            [p.topic for p in positions],
            [p.partition for p in positions],
            [p.next_offset for p in positions],
            [p.epoch for p in positions],
            self.group_id,
        )
        advanced = {(str(topic), int(partition)) for topic, partition in rows}
        lost = [(p.topic, p.partition) for p in positions if (p.topic, p.partition) not in advanced]
        if lost:
            raise Fenced(lost)


def _describe(exc: BaseException) -> str:
    """The error's class (and SQLSTATE when there is one): never its text, which may quote rows."""
    state = getattr(exc, "sqlstate", None)
    return f"{type(exc).__name__}" + (f" (SQLSTATE {state})" if state else "")
