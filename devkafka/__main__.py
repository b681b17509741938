"""``python -m devkafka up|down|status``: a detached local Kafka broker for development.

* ``up``: start a broker (idempotent).  Data dir ``--data-dir`` or ``$KAFKA_DATA_DIR``
  (default ``.kafka-data``, relative to the current directory); client port ``--port`` or
  ``$KAFKA_PORT`` (default 9092).  The broker keeps running after this command exits; its
  pid is in ``<data dir>/broker.pid``.  If that broker is already running and answering,
  says so and exits 0.  ``--sasl-port``, ``--ssl-port`` and ``--sasl-ssl-port`` add
  secured client listeners (SASL_PLAINTEXT, SSL, SASL_SSL; see
  :class:`devkafka.broker.LocalKafka`); ``--sasl-user NAME=PASSWORD`` (repeatable) sets
  their users (default ``bridge=bridge-secret``; SCRAM users only take effect on a data dir
  formatted by this start, i.e. a new one).
* ``down``: SIGTERM the broker, wait (``--timeout``, default 30 s), then SIGKILL; removes
  the pid file.  Exit 0 also when nothing was running.
* ``status``: prints whether it runs.  Exit 0 running and answering, 1 running but not
  answering, 3 not running.

Errors are reported as ``devkafka: <message>`` on stderr with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from devkafka.broker import (
    DEFAULT_SASL_USERS,
    KAFKA_VERSION,
    SASL_MECHANISMS,
    DevKafkaError,
    LocalKafka,
    ensure_jars,
    file_lock,
    is_broker_process,
    is_serving,
    pid_cmdline,
    terminate_pid,
)

PID_FILE_NAME = "broker.pid"
EXIT_NOT_RUNNING = 3
SECURED_PORTS = ("sasl_port", "ssl_port", "sasl_ssl_port")


def _env_port() -> int:
    raw = os.environ.get("KAFKA_PORT", "").strip()
    if not raw:
        return 9092
    try:
        port = int(raw)
    except ValueError:
        raise DevKafkaError(f"KAFKA_PORT must be a port number, got {raw!r}") from None
    return port


def _data_dir(arg: str | None) -> Path:
    raw = arg or os.environ.get("KAFKA_DATA_DIR", "").strip() or ".kafka-data"
    return Path(raw).expanduser().resolve()


def _read_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / PID_FILE_NAME).read_text().strip())
    except (OSError, ValueError):
        return None


def _state(data_dir: Path) -> dict[str, object]:
    try:
        loaded = json.loads((data_dir / "devkafka.json").read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _endpoint(data_dir: Path) -> tuple[str, int] | None:
    state = _state(data_dir)
    host, port = state.get("host"), state.get("port")
    if isinstance(host, str) and isinstance(port, int):
        return host, port
    return None


def find_broker_pid(data_dir: Path) -> int | None:
    """Pid of the broker JVM running from ``data_dir``: pid file first, else a /proc scan."""
    pid = _read_pid(data_dir)
    if pid is not None and is_broker_process(pid, data_dir):
        return pid
    config = str(data_dir / "server.properties")
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if entry.isdigit():
            cmd = pid_cmdline(int(entry))
            if "kafka.Kafka" in cmd and config in cmd:
                return int(entry)
    return None


def _sasl_users(pairs: Sequence[str] | None) -> dict[str, str]:
    if not pairs:
        return dict(DEFAULT_SASL_USERS)
    users: dict[str, str] = {}
    for pair in pairs:
        name, sep, password = pair.partition("=")
        if not sep or not name or not password:
            raise DevKafkaError(f"--sasl-user wants NAME=PASSWORD, got {pair!r}")
        users[name] = password
    return users


def _describe_secured(broker: LocalKafka) -> list[str]:
    users = ", ".join(f"{name} / {password}" for name, password in broker.sasl_users.items())
    mechanisms = ", ".join(SASL_MECHANISMS)
    lines = []
    if broker.sasl_port is not None:
        lines.append(f"  SASL_PLAINTEXT on {broker.sasl_bootstrap_servers} ({mechanisms}; {users})")
    if broker.ssl_port is not None:
        lines.append(f"  SSL on {broker.ssl_bootstrap_servers} (CA: {broker.ssl_cafile})")
    if broker.sasl_ssl_port is not None:
        lines.append(
            f"  SASL_SSL on {broker.sasl_ssl_bootstrap_servers} ({mechanisms}; {users}; "
            f"CA: {broker.ssl_cafile})"
        )
    return lines


def cmd_up(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args.data_dir)
    port = args.port if args.port is not None else _env_port()
    for number in (port, *(getattr(args, name) for name in SECURED_PORTS)):
        if number is not None and not 0 < number < 65536:
            raise DevKafkaError(f"invalid port {number}")
    users = _sasl_users(args.sasl_user)
    data_dir.mkdir(parents=True, exist_ok=True)
    ensure_jars()  # outside the lock: has its own, and may take a while
    with file_lock(data_dir / ".devkafka.lock"):
        pid = find_broker_pid(data_dir)
        if pid is not None:
            return _already_running(data_dir, pid, port, args)
        (data_dir / PID_FILE_NAME).unlink(missing_ok=True)
        try:
            broker = LocalKafka(
                data_dir=data_dir,
                port=port,
                host=args.host,
                heap_mb=args.heap_mb,
                die_with_parent=False,
                sasl_port=args.sasl_port,
                ssl_port=args.ssl_port,
                sasl_ssl_port=args.sasl_ssl_port,
                sasl_users=users,
            )
        except ValueError as exc:
            raise DevKafkaError(str(exc)) from None
        started = time.monotonic()
        broker.spawn()
        assert broker.pid is not None
        (data_dir / PID_FILE_NAME).write_text(f"{broker.pid}\n")
        try:
            broker.wait_until_serving(timeout_s=args.timeout)
        except BaseException:
            broker.kill()
            (data_dir / PID_FILE_NAME).unlink(missing_ok=True)
            raise
        logging.getLogger("devkafka").info("started in %.1f s", time.monotonic() - started)
        print(f"Kafka {KAFKA_VERSION} ready on {broker.bootstrap_servers} (data: {data_dir})")
        for line in _describe_secured(broker):
            print(line)
        return 0


def _already_running(data_dir: Path, pid: int, port: int, args: argparse.Namespace) -> int:
    endpoint = _endpoint(data_dir)
    if endpoint is None:
        raise DevKafkaError(
            f"a Kafka broker (pid {pid}) runs from {data_dir} but its port is unknown; "
            "run `python -m devkafka down` first"
        )
    host, running_port = endpoint
    if running_port != port:
        raise DevKafkaError(
            f"Kafka already runs from {data_dir} on {host}:{running_port} (pid {pid}), "
            f"not on port {port}; run `python -m devkafka down` first"
        )
    state = _state(data_dir)
    for name in SECURED_PORTS:
        wanted = getattr(args, name)
        if wanted is not None and state.get(name) != wanted:
            flag = "--" + name.replace("_", "-")
            raise DevKafkaError(
                f"Kafka already runs from {data_dir} (pid {pid}) without {flag} {wanted}; "
                "run `python -m devkafka down` first"
            )
    (data_dir / PID_FILE_NAME).write_text(f"{pid}\n")
    timeout_s: float = args.timeout
    deadline = time.monotonic() + timeout_s
    while not is_serving(host, running_port):  # maybe a concurrent `up` is still starting it
        if time.monotonic() >= deadline or not is_broker_process(pid, data_dir):
            raise DevKafkaError(
                f"Kafka (pid {pid}) runs from {data_dir} but does not answer on "
                f"{host}:{running_port}; see {data_dir / 'logs' / 'server.log'}"
            )
        time.sleep(0.5)
    print(
        f"Kafka {KAFKA_VERSION} already running on {host}:{running_port} "
        f"(pid {pid}, data: {data_dir})"
    )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args.data_dir)
    if not data_dir.is_dir():
        print(f"Kafka not running (no data dir {data_dir})")
        return 0
    with file_lock(data_dir / ".devkafka.lock"):
        pid = find_broker_pid(data_dir)
        if pid is None:
            (data_dir / PID_FILE_NAME).unlink(missing_ok=True)
            print(f"Kafka not running (data: {data_dir})")
            return 0
        killed = terminate_pid(pid, timeout_s=args.timeout)
        (data_dir / PID_FILE_NAME).unlink(missing_ok=True)
        how = "killed with SIGKILL after SIGTERM timed out" if killed else "stopped"
        print(f"Kafka {how} (pid {pid}, data: {data_dir})")
        return 0


def cmd_status(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args.data_dir)
    pid = find_broker_pid(data_dir) if data_dir.is_dir() else None
    if pid is None:
        print(f"Kafka not running (data: {data_dir})")
        return EXIT_NOT_RUNNING
    endpoint = _endpoint(data_dir)
    if endpoint is not None and is_serving(*endpoint):
        host, port = endpoint
        print(f"Kafka {KAFKA_VERSION} running on {host}:{port} (pid {pid}, data: {data_dir})")
        return 0
    print(f"Kafka process running (pid {pid}) but not answering (data: {data_dir})")
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devkafka",
        description=f"Local Apache Kafka {KAFKA_VERSION} broker (KRaft, no Docker).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--data-dir",
            help="broker data directory (default: $KAFKA_DATA_DIR or ./.kafka-data)",
        )

    up = sub.add_parser("up", help="start the broker if it is not running (detached)")
    common(up)
    up.add_argument("--port", type=int, help="client port (default: $KAFKA_PORT or 9092)")
    up.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    up.add_argument("--heap-mb", type=int, default=512, help="JVM max heap, MiB (default 512)")
    up.add_argument(
        "--timeout", type=float, default=90.0, help="seconds to wait for start-up (default 90)"
    )
    up.add_argument("--sasl-port", type=int, help="also a SASL_PLAINTEXT listener on this port")
    up.add_argument("--ssl-port", type=int, help="also an SSL listener (self-signed CA)")
    up.add_argument("--sasl-ssl-port", type=int, help="also a SASL_SSL listener on this port")
    up.add_argument(
        "--sasl-user",
        action="append",
        metavar="NAME=PASSWORD",
        help="SASL user, repeatable (default bridge=bridge-secret)",
    )
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop the broker (SIGTERM, then SIGKILL)")
    common(down)
    down.add_argument(
        "--timeout", type=float, default=30.0, help="seconds before SIGKILL (default 30)"
    )
    down.set_defaults(func=cmd_down)

    status = sub.add_parser("status", help="print whether the broker runs")
    common(status)
    status.set_defaults(func=cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="devkafka: %(message)s",
    )
    try:
        code: int = args.func(args)
    except DevKafkaError as exc:
        print(f"devkafka: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("devkafka: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
