"""The analytics store in an embedded DuckDB file: the default, nothing to run.

DuckDB's Python API is blocking, so every call runs on one worker thread of the store's own;
the event loop (and the Kafka consumer's heartbeats) never waits on the disk. DuckDB takes a
lock on the file: one sink process per file, which is what the embedded default is for (use
PostgreSQL to run several instances).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from consumers.sinks.analytics.ports import STORE_RETRY_S

__all__ = ["HAND_OVER_S", "DuckDBPort", "waiting_mark"]

T = TypeVar("T")

HAND_OVER_S = 2.5 * STORE_RETRY_S
"""How long a busy writer leaves the file closed for a process waiting on it (0.5 s): longer
than the readers' retry interval, so one of their attempts falls inside it."""
_REOPEN_ATTEMPTS = 100
_REOPEN_RETRY_S = 0.1


def waiting_mark(path: Path | str) -> Path:
    """The file whose modification time says another process waits for ``path``."""
    return Path(f"{path}.waiting")


class DuckDBPort:
    """:class:`~consumers.sinks.analytics.store.SqlPort` on a DuckDB database file.

    ``path`` is created with its parent directory when missing; ``:memory:`` is a private
    in-memory database (tests only). ``read_only`` opens an existing file for reading, which
    DuckDB allows only while no process holds it for writing.

    ``idle_release_s`` (default None: hold the file while connected): close the file once no
    call used it for that long, and open it again on the next call. DuckDB locks the file
    for as long as a writer keeps it open; releasing it when idle lets ``wifi-bridge report``
    and other readers in between batches.

    A writer with ``idle_release_s`` also hands the file over while busy. A port that finds
    the file locked touches ``<file>.waiting`` beside it; at its next call outside a
    transaction, the writer sees the newer mark, closes the file for
    :data:`HAND_OVER_S` and opens it again once the other process lets go. A reader that
    retries (``wifi-bridge report``, ``wifi-bridge replay``) therefore gets in within one
    batch, however steady the stream.
    """

    name = "duckdb"
    transient_errors: tuple[type[BaseException], ...] = (duckdb.Error, OSError)

    def __init__(
        self,
        path: Path | str,
        *,
        read_only: bool = False,
        idle_release_s: float | None = None,
        on_hand_over: Callable[[], object] | None = None,
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
        # Marks older than this port were left by readers that have gone since.
        self._handed_over_at = time.time()
        self.hand_overs = 0
        """How often this writer closed the file for a waiting process."""
        self._on_hand_over = on_hand_over

    async def _run(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def connect(self) -> None:
        self._last_used_s = time.monotonic()
        if self._connection is not None:
            return

        def open_file() -> duckdb.DuckDBPyConnection:
            if self._path != ":memory:" and not self._read_only:
                Path(self._path).parent.mkdir(parents=True, exist_ok=True)
            try:
                connection = duckdb.connect(self._path, read_only=self._read_only)
            except duckdb.IOException:
                self._ask_for_the_file()
                raise
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

    def _ask_for_the_file(self) -> None:
        """Tell the process that holds the file that this one waits for it."""
        if self._path == ":memory:":
            return
        with contextlib.suppress(OSError):  # a read-only directory: wait for an idle release
            waiting_mark(self._path).touch()

    def _someone_waits(self) -> bool:
        if self._idle_release_s is None or self._path == ":memory:":
            return False
        try:
            return waiting_mark(self._path).stat().st_mtime > self._handed_over_at
        except OSError:
            return False

    async def _hand_over(self) -> None:
        """Close the file for a waiting process, then take it back once it lets go."""
        self._handed_over_at = time.time()
        self.hand_overs += 1
        if self._on_hand_over is not None:
            self._on_hand_over()
        await self.reset()
        await asyncio.sleep(HAND_OVER_S)
        for attempt in range(_REOPEN_ATTEMPTS):
            try:
                await self.connect()
                return
            except duckdb.IOException:
                if attempt == _REOPEN_ATTEMPTS - 1:
                    raise
                self._handed_over_at = time.time()  # our own mark is no request to us
                await asyncio.sleep(_REOPEN_RETRY_S)

    async def _open(self) -> duckdb.DuckDBPyConnection:
        if not self._busy and self._connection is not None and self._someone_waits():
            await self._hand_over()
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
