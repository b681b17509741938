"""devpostgres: a throwaway PostgreSQL cluster from the Debian binaries, for tests and bench.

:func:`local_cluster` runs ``initdb`` and ``pg_ctl`` in a temporary directory on a free
port, with the unix socket in that directory, and removes everything afterwards. PostgreSQL
refuses to run as root, so as root the cluster runs as the ``postgres`` user (which the Debian
package creates). :class:`PostgresUnavailable` says why no cluster could be started.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg

from devkafka.broker import free_port

__all__ = [
    "PostgresUnavailable",
    "create_database",
    "drop_database",
    "local_cluster",
    "postgres_bindir",
]

_INITDB_OPTIONS = ("-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")
# Durability off: these clusters hold test data only, and the tests crash the sink, not them.
_SERVER_OPTIONS = (
    "-c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
    "-c full_page_writes=off -c max_connections=50"
)


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL cluster can be started here; the message says why."""


def postgres_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``, newest version first."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        found = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if found:
            candidates.append(Path(found))
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    versions.sort(key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    candidates += [Path(p) for p in reversed(versions)]
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file():
            return directory
    return None


@contextmanager
def local_cluster() -> Iterator[str]:
    """Yields the URL of a fresh cluster's ``postgres`` database; stops and removes it after."""
    bindir = postgres_bindir()
    if bindir is None:
        raise PostgresUnavailable("initdb not found (apt-get install postgresql)")
    as_root = os.geteuid() == 0
    prefix: list[str] = ["runuser", "-u", "postgres", "--"] if as_root else []
    # Not under pytest's tmp_path: its parents are private to root, and postgres must reach it.
    root = Path(tempfile.mkdtemp(prefix="wifi-pg-"))
    try:
        if as_root:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root and there is no postgres user") from None
            os.chown(root, owner.pw_uid, owner.pw_gid)
        data, log_file = root / "data", root / "server.log"
        port = free_port()
        initdb = subprocess.run(
            [*prefix, str(bindir / "initdb"), "-D", str(data), *_INITDB_OPTIONS],
            capture_output=True,
            text=True,
            check=False,
        )
        if initdb.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {initdb.stderr.strip()}")
        pg_ctl = [*prefix, str(bindir / "pg_ctl"), "-D", str(data)]
        options = f"-p {port} -k {root} {_SERVER_OPTIONS}"
        started = subprocess.run(
            [*pg_ctl, "-l", str(log_file), "-o", options, "-w", "-t", "60", "start"],
            capture_output=True,
            text=True,
            check=False,
        )
        if started.returncode != 0:
            server_log = log_file.read_text() if log_file.exists() else ""
            raise PostgresUnavailable(f"pg_ctl start failed: {started.stderr}\n{server_log}")
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True, check=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def create_database(server_url: str, prefix: str = "analytics") -> str:
    """A new empty database on the server; returns its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return f"{server_url.rpartition('/')[0]}/{name}"


async def drop_database(server_url: str, database_url: str) -> None:
    name = database_url.rpartition("/")[2]
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
