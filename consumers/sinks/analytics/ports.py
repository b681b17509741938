"""The :class:`~consumers.sinks.analytics.store.SqlPort` an ``ANALYTICS_URL`` names.

One place turns the URL into a connection of the right kind, for the sink, ``wifi-bridge
replay`` and ``wifi-bridge report``; the database driver of the other kind is not imported.
"""

from __future__ import annotations

from collections.abc import Callable

from consumers.sinks.analytics.settings import parse_store_url
from consumers.sinks.analytics.store import SqlPort

__all__ = ["STORE_RETRY_S", "sql_port"]

STORE_RETRY_S = 0.2
"""How often ``wifi-bridge report`` and ``wifi-bridge replay`` try a busy store again. A
DuckDB writer that hands its file over leaves it closed for longer than this, so one of
their attempts falls inside the gap."""


def sql_port(
    url: str,
    *,
    read_only: bool = False,
    statement_timeout_ms: int = 60_000,
    idle_release_s: float | None = None,
    on_hand_over: Callable[[], object] | None = None,
) -> SqlPort:
    """The port of ``url`` (nothing opened yet).

    ``statement_timeout_ms`` applies to PostgreSQL; ``read_only``, ``idle_release_s`` and
    ``on_hand_over`` (called each time the writer closes the file for a waiting reader) to a
    DuckDB file (see :class:`~consumers.sinks.analytics.duckdb_store.DuckDBPort`). A URL that
    is not one the sink takes raises :class:`~bridge.errors.ConfigError` naming ANALYTICS_URL.
    """
    store = parse_store_url(url)
    if store.kind == "postgresql":
        from consumers.sinks.analytics.postgres import PostgresPort

        return PostgresPort(store.url, statement_timeout_ms=statement_timeout_ms)
    from consumers.sinks.analytics.duckdb_store import DuckDBPort

    assert store.path is not None
    return DuckDBPort(
        store.path,
        read_only=read_only,
        idle_release_s=idle_release_s,
        on_hand_over=on_hand_over,
    )
