"""The analytics store in an embedded DuckDB file: the default, nothing to run.

DuckDB's Python API is blocking, so every call runs on one worker thread of the store's own;
the event loop (and the Kafka consumer's heartbeats) never waits on the disk. DuckDB takes a
lock on the file: one sink process per file, which is what the embedded default is for (use
PostgreSQL to run several instances).
"""

from __future__ import annotations

import asyncio
import time
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
    in-memory database (tests only). ``read_only`` opens an existing file for reading, which
    DuckDB allows only while no process holds it for writing.

    ``idle_release_s`` (default None: hold the file while connected): close the file once no
    call used it for that long, and open it again on the next call. DuckDB locks the file
    for as long as a writer keeps it open; releasing it when idle lets ``wifi-bridge report``
    and other readers in between batches.
    """

    name = "duckdb"
    transient_errors: tuple[type[BaseException], ...] = (duckdb.Error, OSError)

    def __init__(
        self, path: Path | str, *, read_only: bool = False, idle_release_s: float | None = None
    ) -> None:
        if idle_release_s is not None and idle_release_s <= 0:
            raise ValueError("idle_release_s must be positive")
        self._path = str(path)
        self._read_only = read_only
        self._idle_release_s = idle_release_s
        self._connection: duckdb.DuckDBPyConnection | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duckdb")
        self._busy = 0
        self._last_used_s = 0.0
        self._releaser: asyncio.Task[None] | None = None

    async def _run(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def connect(self) -> None:
        self._last_used_s = time.monotonic()
        if self._connection is not None:
            return

        def open_file() -> duckdb.DuckDBPyConnection:
            if self._path != ":memory:" and not self._read_only:
                Path(self._path).parent.mkdir(parents=True, exist_ok=True)
            connection = duckdb.connect(self._path, read_only=self._read_only)
            connection.execute("SET TimeZone = 'UTC'")
            return connection

        self._connection = await self._run(open_file)
        if self._idle_release_s is not None and self._releaser is None:
            self._releaser = asyncio.create_task(self._release_when_idle(self._idle_release_s))

    async def reset(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await self._run(connection.close)

    async def close(self) -> None:
        if self._releaser is not None:
            self._releaser.cancel()
            await asyncio.gather(self._releaser, return_exceptions=True)
            self._releaser = None
        await self.reset()
        self._executor.shutdown(wait=True)

    async def _release_when_idle(self, idle_s: float) -> None:
        while True:
            await asyncio.sleep(idle_s / 2)
            idle = time.monotonic() - self._last_used_s >= idle_s
            if idle and not self._busy and self._connection is not None:
                await self.reset()

    async def _open(self) -> duckdb.DuckDBPyConnection:
        await self.connect()  # again, after an idle release
        assert self._connection is not None
        return self._connection

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        connection = await self._open()
        self._busy += 1
        try:
            await self._run(lambda: connection.execute("BEGIN TRANSACTION"))
            try:
                yield
            except BaseException:
                await self._run(lambda: connection.execute("ROLLBACK"))
                raise
            await self._run(lambda: connection.execute("COMMIT"))
        finally:
            self._busy -= 1
            self._last_used_s = time.monotonic()

    async def fetch(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        connection = await self._open()
        return await self._run(lambda: connection.execute(query, list(args)).fetchall())

    async def execute(self, query: str, *args: Any) -> None:
        connection = await self._open()
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
        connection = await self._open()
        query = f"{_insert_unnest(table, columns)} {tail}"
        data = [list(column) for column in zip(*rows, strict=True)]
        return await self._run(lambda: connection.execute(query, data).fetchall())

    async def insert_all(
        self, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
    ) -> None:
        """:meth:`insert_rows` with no conflict clause: a key already there fails them all."""
        await self.insert_rows(table, columns, rows, "")


def _insert_unnest(table: str, columns: Sequence[str]) -> str:
    values = ", ".join(f"unnest(${i})" for i in range(1, len(columns) + 1))
    return f"INSERT INTO {table} ({', '.join(columns)}) SELECT {values}"
