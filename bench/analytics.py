"""``python -m bench analytics``: the analytics sink's write path beside a bare bulk load.

For each store, the same logins (built from the sender's sample, canonical as the pipeline
writes them, parsed once up front) are written in the sink's batch size:

- ``sink``: :meth:`AnalyticsStore.write`, what ``wifi-bridge sink analytics`` runs per batch
  (epoch check and offsets, idempotent insert of the logins, one transaction; ``visits``
  and ``venue_daily`` are views over ``logins``);
- ``bare``: the same rows into a table defined like ``logins`` (same primary key) with the
  fastest plain bulk load: PostgreSQL's binary ``COPY``; for DuckDB an ``INSERT ... SELECT
  unnest(...)`` of column lists, its fastest load from Python objects without extra packages.

Each round starts from empty tables, and rounds alternate sink and bare so a noisy neighbour
hurts both alike; the ratio of their medians is the figure to compare (target >= 0.5).
PostgreSQL: ``ANALYTICS_BENCH_POSTGRES_URL`` (a server where databases may be created), else
a throwaway local cluster (``devpostgres``).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from consumers.pipeline.normalise import normalise
from consumers.sinks.analytics.duckdb_store import DuckDBPort
from consumers.sinks.analytics.postgres import PostgresPort
from consumers.sinks.analytics.rows import LOGIN_COLUMNS, Login, parse_login
from consumers.sinks.analytics.store import LOGINS_DDL, AnalyticsStore, Position
from devpostgres import create_database, drop_database, local_cluster

TARGET_SINK_VS_BARE = 0.5
ROOT = Path(__file__).resolve().parents[1]


def make_logins(
    count: int, *, venues: int = 50, per_visit: int = 3, spread: int = 2000
) -> list[Login]:
    """``count`` distinct logins: users of ``venues`` venues, visits of ``per_visit`` logins.

    In arrival order, as at peak load: about ``spread`` other logins arrive between two of
    one visit (a visit lasts minutes, a batch seconds), so most of a batch's logins continue a
    visit that an earlier batch opened.
    """
    sample = orjson.loads(
        (ROOT.parent / "shared" / "testdata" / "documented-sample.json").read_bytes()
    )
    visits = max(1, count // per_visit)
    # Visit u opens at time u and comes back every `gap`: per_visit logins arrive per unit of
    # time, so about `spread` arrive between two of one visit.
    gap = spread / per_visit
    order = sorted(range(count), key=lambda n: n // per_visit + n % per_visit * gap)
    logins = []
    for n in order:
        user = n // per_visit
        sample["user"]["id"] = 100_000 + user
        sample["user"]["venue"]["id"] = 1 + user % venues
        sample["client"]["mac"] = (
            f"02:00:{user >> 16 & 255:02x}:{user >> 8 & 255:02x}:{user & 255:02x}:01"
        )
        minute, second = divmod(n % per_visit * 7 + user % 50, 60)
        day = 1 + user * 28 // visits
        sample["session"]["authenticationTime"] = (
            f"2026-11-{day:02d}T10:{minute:02d}:{second:02d}+0000"
        )
        record = normalise(orjson.dumps(sample))
        record["visit"] = {"id": f"visit-{user}", "isNew": n % per_visit == 0}
        logins.append(parse_login(orjson.dumps(record)))
    return logins


def batches(logins: list[Login], size: int) -> Iterator[list[Login]]:
    for start in range(0, len(logins), size):
        yield logins[start : start + size]


async def sink_round(store: AnalyticsStore, logins: list[Login], batch_size: int) -> float:
    """Rows per second through the sink's write path, into empty tables."""
    (claim,) = await store.claim("bench", [0])
    offset = 0
    started = time.perf_counter()
    for batch in batches(logins, batch_size):
        offset += len(batch)
        await store.write(batch, [Position("bench", 0, claim.epoch, offset)])
    return len(logins) / (time.perf_counter() - started)


async def timed_bulk(
    load: Callable[[list[Any]], Awaitable[None]], logins: list[Login], batch_size: int
) -> float:
    """Rows per second of a bare bulk load; building the row tuples is timed, as in the sink."""
    started = time.perf_counter()
    for batch in batches(logins, batch_size):
        await load([login.row() for login in batch])
    return len(logins) / (time.perf_counter() - started)


async def postgres_rounds(
    server: str, logins: list[Login], batch_size: int, rounds: int
) -> tuple[list[float], list[float]]:
    sink, bare = [], []
    for _ in range(rounds):
        url = await create_database(server, "bench")
        try:
            store = AnalyticsStore(PostgresPort(url), group_id="bench")
            await store.open()
            sink.append(await sink_round(store, logins, batch_size))
            await store.close()

            port = PostgresPort(url)
            await port.connect()
            await port.execute(LOGINS_DDL.replace("CREATE TABLE logins", "CREATE TABLE bare"))

            async def copy(rows: list[Any], port: PostgresPort = port) -> None:
                await port.insert_all("bare", LOGIN_COLUMNS, rows)

            bare.append(await timed_bulk(copy, logins, batch_size))
            await port.close()
        finally:
            await drop_database(server, url)
    return sink, bare


async def duckdb_rounds(
    directory: Path, logins: list[Login], batch_size: int, rounds: int
) -> tuple[list[float], list[float]]:
    sink, bare = [], []
    for n in range(rounds):
        store = AnalyticsStore(DuckDBPort(directory / f"sink-{n}.duckdb"), group_id="bench")
        await store.open()
        sink.append(await sink_round(store, logins, batch_size))
        await store.close()

        port = DuckDBPort(directory / f"bare-{n}.duckdb")
        await port.connect()
        await port.execute(LOGINS_DDL.replace("CREATE TABLE logins", "CREATE TABLE bare"))

        async def insert(rows: list[Any], port: DuckDBPort = port) -> None:
            await port.insert_all("bare", LOGIN_COLUMNS, rows)

        bare.append(await timed_bulk(insert, logins, batch_size))
        await port.close()
    return sink, bare


@contextmanager
def postgres_server() -> Iterator[str]:
    existing = os.environ.get("ANALYTICS_BENCH_POSTGRES_URL")
    if existing:
        yield existing
        return
    print("starting a throwaway PostgreSQL cluster ...", flush=True)
    with local_cluster() as url:
        yield url


def run(*, records: int, batch_size: int, rounds: int) -> int:
    print(f"building {records} canonical logins ...", flush=True)
    started = time.perf_counter()
    logins = make_logins(records)
    print(f"  normalise + parse: {records / (time.perf_counter() - started):,.0f} records/s")

    results: dict[str, tuple[list[float], list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-analytics-") as tmp:
        results["duckdb"] = asyncio.run(duckdb_rounds(Path(tmp), logins, batch_size, rounds))
        print_store("duckdb", *results["duckdb"])
        with postgres_server() as server:
            results["postgresql"] = asyncio.run(postgres_rounds(server, logins, batch_size, rounds))
        print_store("postgresql", *results["postgresql"])

    print()
    print(f"analytics sink, {records} logins in batches of {batch_size}, median of {rounds}")
    print(f"{'store':<12}{'sink rows/s':>14}{'bare rows/s':>14}{'sink / bare':>14}")
    for kind, (sink, bare) in results.items():
        ratio = statistics.median(sink) / statistics.median(bare)
        print(
            f"{kind:<12}{statistics.median(sink):>14,.0f}{statistics.median(bare):>14,.0f}"
            f"{ratio:>14.2f}  (target >= {TARGET_SINK_VS_BARE})"
        )
    return 0


def print_store(kind: str, sink: list[float], bare: list[float]) -> None:
    for n, (s, b) in enumerate(zip(sink, bare, strict=True), 1):
        print(f"round {n} {kind:<11} sink {s:10,.0f} rows/s   bare {b:10,.0f} rows/s", flush=True)
