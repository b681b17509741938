"""The analytics store in an embedded DuckDB file: the default, nothing to run.

DuckDB's Python API is blocking, so every call runs on one worker thread of the store's own;
the event loop (and the Kafka consumer's heartbeats) never waits on the disk. DuckDB takes a
lock on the file: one sink process per file, which is what the embedded default is for (use
PostgreSQL to run several instances).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import duckdb

__all__ = ["DuckDBPort"]

T = TypeVar("T")


class DuckDBPort:
    """:class:`~consumers.sinks.analytics.store.SqlPort` on a DuckDB database file.

    ``path`` is created with its parent directory when missing; ``:memory:`` is a private
    in-memory database (tests only).
    """

    name = "duckdb"
    transient_errors: tuple[type[BaseException], ...] = (duckdb.Error, OSError)

    def __init__(self, path: Path | str) -> None:
        self._path = str(path)
        self._connection: duckdb.DuckDBPyConnection | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duckdb")

    async def _run(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def connect(self) -> None:
        if self._connection is not None:
            return

        def open_file() -> duckdb.DuckDBPyConnection:
            if self._path != ":memory:":
                Path(self._path).parent.mkdir(parents=True, exist_ok=True)
            connection = duckdb.connect(self._path)
            connection.execute("SET TimeZone = 'UTC'")
            return connection

        self._connection = await self._run(open_file)

    async def reset(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await self._run(connection.close)

    async def close(self) -> None:
        await self.reset()
        self._executor.shutdown(wait=True)

    def _open(self) -> duckdb.DuckDBPyConnection:
        if self._connection is None:
            raise duckdb.ConnectionException("not connected")
        return self._connection

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        connection = self._open()
        await self._run(lambda: connection.execute("BEGIN TRANSACTION"))
        try:
            yield
        except BaseException:
            await self._run(lambda: connection.execute("ROLLBACK"))
            raise
        await self._run(lambda: connection.execute("COMMIT"))

    async def fetch(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        connection = self._open()
        return await self._run(lambda: connection.execute(query, list(args)).fetchall())

    async def execute(self, query: str, *args: Any) -> None:
        connection = self._open()
        await self._run(lambda: connection.execute(query, list(args)))

    async def lock_migrations(self) -> None:
        """Nothing to do: DuckDB's file lock already admits one process."""

    async def insert_new(
        self, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        key = columns[0]
        tail = f"ON CONFLICT ({key}) DO NOTHING RETURNING {key}"
        return [row[0] for row in await self.insert_rows(table, columns, rows, tail)]

    async def insert_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]], tail: str
    ) -> list[tuple[Any, ...]]:
        """One ``INSERT ... SELECT unnest($1), unnest($2), ...`` of the rows' column lists.

        Without pandas or Arrow, lists bound as parameters are DuckDB's fastest way in from
        Python objects; its ``executemany`` is one statement per row.
        """
        connection = self._open()
        query = f"{_insert_unnest(table, columns)} {tail}"
        data = [list(column) for column in zip(*rows, strict=True)]
        return await self._run(lambda: connection.execute(query, data).fetchall())

    async def bulk_insert(self, table: str, columns: Sequence[str], rows: list[Any]) -> None:
        """Bare bulk insert of ``rows`` (column lists unnested): the benchmark's yardstick."""
        connection = self._open()
        query = _insert_unnest(table, columns)
        data = [list(column) for column in zip(*rows, strict=True)]
        await self._run(lambda: connection.execute(query, data))


def _insert_unnest(table: str, columns: Sequence[str]) -> str:
    values = ", ".join(f"unnest(${i})" for i in range(1, len(columns) + 1))
    return f"INSERT INTO {table} ({', '.join(columns)}) SELECT {values}"
