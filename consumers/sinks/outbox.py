"""The CRM sink's own SQLite file: per-user sync marks, and the outbox used when no CRM is set.

One file (``CRM_STATE_DB``, default ``.data/crm-sink.db``), never the analytics DuckDB file.

- ``crm_sync_state``: one row per user (:class:`~consumers.sinks.contacts.SyncMark`), so a
  restarted sink does not send everyone again and the min-interval throttle survives restarts.
- ``crm_outbox``: what would have been sent, one row per upsert, keyed by the login's event id:
  writing the same upsert twice (a replay, a crash before the marks were saved) changes nothing.

SQLite in WAL mode: a committed transaction survives a killed process.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

import orjson

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


class CrmStore:
    """The sink's SQLite file; one instance per process (one writer)."""

    def __init__(self, path: Path) -> None:
        if path.parent != Path():
            path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def marks(self, user_keys: Iterable[str]) -> dict[str, SyncMark]:
        keys = orjson.dumps(list(dict.fromkeys(user_keys))).decode()
        rows = self._db.execute(
            "SELECT user_key, synced_event_ms, handled_event_ms FROM crm_sync_state "
            "WHERE user_key IN (SELECT value FROM json_each(?))",
            (keys,),
        )
        return {key: SyncMark(key, synced, handled) for key, synced, handled in rows}

    def save_marks(self, marks: Sequence[SyncMark]) -> None:
        """Store marks; never moves a user's times backwards."""
        if not marks:
            return
        now_ms = int(time.time() * 1000)
        with self._transaction():
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
        with self._transaction():
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
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")


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
