"""The CRM sink's own SQLite file: per-user sync marks, and the outbox used when no CRM is set.

One file (``CRM_STATE_DB``, default ``.data/crm-sink.db``), never the analytics DuckDB file.

- ``crm_sync_state``: one row per user (:class:`~consumers.sinks.contacts.SyncMark`), so a
  restarted sink does not send everyone again and the min-interval throttle survives restarts.
- ``crm_outbox``: what would have been sent, one row per upsert, keyed by the login's event id:
  writing the same upsert twice (a replay, a crash before the marks were saved) changes nothing.

SQLite in WAL mode: a committed transaction survives a killed process. A failure of the file
(locked by another process, disk full, I/O error) raises :class:`CrmStateError`, which the
sink retries: the file is the sink's memory of what the CRM holds, never worth a crash.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import orjson

from bridge.errors import WifiBridgeError
from consumers.sinks.contacts import Contact, SyncMark
from consumers.sinks.crm_port import UpsertResult
from consumers.sinks.webhook import contact_json

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS crm_sync_state (
    user_key TEXT PRIMARY KEY,
    synced_event_ms INTEGER,
    handled_event_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS crm_outbox (
    event_id TEXT PRIMARY KEY,
    email TEXT NOT NULL,
    last_visit_ms INTEGER NOT NULL,
    contact TEXT NOT NULL,
    stored_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS crm_outbox_email ON crm_outbox (email);
"""


class CrmStateError(WifiBridgeError):
    """The sink's SQLite file failed (locked, full, an I/O error); the same call may work later.

    ``operation`` (``read_marks``, ``save_marks``, ``write_outbox``) and ``error`` (SQLite's
    error name, such as ``SQLITE_BUSY`` or ``SQLITE_FULL``) are fit for a metric label: neither
    carries anything from a record.
    """

    code = "crm_state_error"
    retryable = True

    def __init__(self, message: str, *, operation: str, error: str) -> None:
        super().__init__(message)
        self.operation = operation
        self.error = error


@contextmanager
def _state_errors(operation: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        error = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
        raise CrmStateError(
            f"the CRM state file failed to {operation.replace('_', ' ')}: {error}",
            operation=operation,
            error=error,
        ) from exc


class CrmStore:
    """The sink's SQLite file; one instance per process (one writer).

    ``busy_timeout_ms`` (default 5000) is how long a write waits for another connection's
    lock before it fails with :class:`CrmStateError`.
    """

    def __init__(self, path: Path, *, busy_timeout_ms: int = 5000) -> None:
        if busy_timeout_ms < 0:
            raise ValueError("busy_timeout_ms must be >= 0")
        if path.parent != Path():
            path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        self._db.executescript(_SCHEMA)

    def marks(self, user_keys: Iterable[str]) -> dict[str, SyncMark]:
        keys = orjson.dumps(list(dict.fromkeys(user_keys))).decode()
        with _state_errors("read_marks"):
            rows = self._db.execute(
                "SELECT user_key, synced_event_ms, handled_event_ms FROM crm_sync_state "
                "WHERE user_key IN (SELECT value FROM json_each(?))",
                (keys,),
            ).fetchall()
        return {key: SyncMark(key, synced, handled) for key, synced, handled in rows}

    def save_marks(self, marks: Sequence[SyncMark]) -> None:
        """Store marks; never moves a user's times backwards."""
        if not marks:
            return
        now_ms = int(time.time() * 1000)
        with _state_errors("save_marks"), self._transaction():
            self._db.executemany(
                "INSERT INTO crm_sync_state VALUES (?, ?, ?, ?) ON CONFLICT (user_key) DO UPDATE "
                "SET synced_event_ms = max(coalesce(synced_event_ms, excluded.synced_event_ms),"
                " coalesce(excluded.synced_event_ms, synced_event_ms)),"
                " handled_event_ms = max(handled_event_ms, excluded.handled_event_ms),"
                " updated_at_ms = excluded.updated_at_ms",
                [(m.user_key, m.synced_event_ms, m.handled_event_ms, now_ms) for m in marks],
            )

    def store_outbox(self, contacts: Sequence[Contact]) -> None:
        now_ms = int(time.time() * 1000)
        with _state_errors("write_outbox"), self._transaction():
            self._db.executemany(
                "INSERT INTO crm_outbox VALUES (?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING",
                [
                    (
                        c.event_id,
                        c.email,
                        c.last_visit_ms,
                        orjson.dumps(contact_json(c)).decode(),
                        now_ms,
                    )
                    for c in contacts
                ],
            )

    def outbox_rows(self) -> int:
        (count,) = self._db.execute("SELECT count(*) FROM crm_outbox").fetchone()
        return int(count)

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        # SQLite may already have rolled back (a full disk does), and a COMMIT that fails (a
        # reader holding the file, an I/O error) leaves the transaction open: either way the
        # connection must come out of it, or every later BEGIN fails too.
        try:
            if kind is None:
                self._db.execute("COMMIT")
        finally:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")


class OutboxCrm:
    """The default CRM: upserts land in the ``crm_outbox`` table, idempotently."""

    name = "outbox"

    def __init__(self, store: CrmStore, *, max_batch_size: int = 100) -> None:
        self._store = store
        self.max_batch_size = max_batch_size

    async def upsert(self, contacts: Sequence[Contact]) -> UpsertResult:
        self._store.store_outbox(contacts)
        return UpsertResult(accepted=list(contacts))

    async def close(self) -> None:
        """The store belongs to the service, which closes it."""
