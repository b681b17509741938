"""The analytics store on a PostgreSQL server, through asyncpg (binary protocol, async).

One connection per sink instance: batches are written one after another, so a pool would only
add idle connections. A connection that fails is dropped and opened again on the next batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import asyncpg

__all__ = ["PostgresPort"]

# An advisory lock id of our own, so two instances starting together migrate one at a time.
_MIGRATION_LOCK: Final = int.from_bytes(
    hashlib.sha256(b"wifi-bridge analytics migrations").digest()[:8], "big", signed=True
)


class PostgresPort:
    """:class:`~consumers.sinks.analytics.store.SqlPort` on one asyncpg connection.

    ``connect_timeout_s`` (default 10) bounds opening the connection; ``statement_timeout_ms``
    (default 60000) bounds each statement on the server, so a stuck lock cannot hang a batch.
    """

    name = "postgresql"
    transient_errors: tuple[type[BaseException], ...] = (
        OSError,
        TimeoutError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
    )

    def __init__(
        self, url: str, *, connect_timeout_s: float = 10.0, statement_timeout_ms: int = 60_000
    ) -> None:
        if connect_timeout_s <= 0 or statement_timeout_ms <= 0:
            raise ValueError("timeouts must be positive")
        self._url = url
        self._connect_timeout_s = connect_timeout_s
        self._statement_timeout_ms = statement_timeout_ms
        self._connection: asyncpg.Connection[Any] | None = None

    async def connect(self) -> None:
        if self._connection is not None and not self._connection.is_closed():
            return
        self._connection = await asyncpg.connect(
            self._url,
            timeout=self._connect_timeout_s,
            server_settings={
                "application_name": "wifi-sink-analytics",
                "statement_timeout": str(self._statement_timeout_ms),
                "timezone": "UTC",
            },
        )

    async def reset(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.terminate()

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                await connection.close(timeout=5)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                connection.terminate()

    def _open(self) -> asyncpg.Connection[Any]:
        if self._connection is None:
            raise asyncpg.InterfaceError("not connected")
        return self._connection

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        async with self._open().transaction():
            yield

    async def fetch(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in await self._open().fetch(query, *args)]

    async def execute(self, query: str, *args: Any) -> None:
        await self._open().execute(query, *args)

    async def lock_migrations(self) -> None:
        await self._open().execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)

    async def copy_rows(self, table: str, columns: tuple[str, ...], rows: list[Any]) -> None:
        """Bare ``COPY`` (binary) of ``rows`` into ``table``: the benchmark's yardstick."""
        await self._open().copy_records_to_table(table, records=rows, columns=list(columns))
