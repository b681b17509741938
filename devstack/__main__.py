"""``make run``: the whole product on one machine, a burst of simulated traffic, a reconciliation.

Starts the bridge, the pipeline and both sinks (analytics on DuckDB, the CRM sink on its local
outbox) as child processes against ``KAFKA_BOOTSTRAP_SERVERS`` (``make run`` starts the local
broker first), runs the sender simulator for a short burst with an outage, prints what was sent
beside what landed, then keeps the services running until Ctrl-C and stops them cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import orjson

ROOT = Path(__file__).resolve().parents[1]
_USERS = 200


@dataclass(frozen=True, slots=True)
class Ports:
    bridge: int = 8080
    pipeline: int = 9101
    analytics: int = 9102
    crm: int = 9103

    @classmethod
    def free(cls) -> Ports:
        from devkafka.broker import free_port

        return cls(free_port(), free_port(), free_port(), free_port())


@dataclass(frozen=True, slots=True)
class Names:
    """Topics and consumer groups; a suffix keeps a test's run apart from any other."""

    suffix: str = ""

    def topic(self, name: str) -> str:
        return f"wifi.auth.{name}{self.suffix}"

    def group(self, name: str) -> str:
        return f"wifi-{name}{self.suffix}"


@dataclass(slots=True)
class Service:
    """One child process and how to tell it is ready."""

    name: str
    argv: list[str]
    env: dict[str, str]
    ready_url: str
    ready_when: Callable[[bytes], bool] = lambda _body: True
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None


@dataclass(slots=True)
class Stack:
    services: list[Service] = field(default_factory=list)

    def start(self, log_dir: Path, out: TextIO) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        for service in self.services:
            service.log_path = log_dir / f"{service.name}.log"
            with service.log_path.open("ab") as log_file:
                service.process = subprocess.Popen(
                    service.argv,
                    cwd=ROOT,
                    env={**os.environ, **service.env},
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C reaches us only; we stop them in order
                )
            out.write(f"  started {service.name:<16} pid {service.process.pid:<7} ")
            out.write(f"log {service.log_path.relative_to(ROOT)}\n")
            out.flush()
        for service in self.services:
            wait_ready(service)
            out.write(f"  ready   {service.name}\n")
            out.flush()

    def stop(self, out: TextIO, *, timeout_s: float = 30.0) -> None:
        for service in reversed(self.services):
            process = service.process
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
            out.write(f"  stopped {service.name} (exit {code})\n")
            out.flush()
        out.write("all services stopped\n")
        out.flush()

    def check_alive(self) -> None:
        for service in self.services:
            if service.process is not None and service.process.poll() is not None:
                raise RuntimeError(
                    f"{service.name} exited with {service.process.returncode}; "
                    f"see {service.log_path}"
                )


def wait_ready(service: Service, *, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert service.process is not None
        if service.process.poll() is not None:
            raise RuntimeError(
                f"{service.name} exited with {service.process.returncode} while starting; "
                f"see {service.log_path}"
            )
        body = http_get(service.ready_url)
        if body is not None and service.ready_when(body):
            return
        time.sleep(0.25)
    raise RuntimeError(f"{service.name} was not ready within {timeout_s:.0f} s")


def http_get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (loopback)
            return bytes(response.read()) if response.status == 200 else None
    except OSError:
        return None


def metric(port: int, name: str) -> float:
    """Sum of every sample of one metric (all label sets) on a local /metrics endpoint."""
    body = http_get(f"http://127.0.0.1:{port}/metrics")
    if body is None:
        return 0.0
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


@contextmanager
def stopping(stack: Stack, out: TextIO) -> Iterator[None]:
    try:
        yield
    finally:
        stack.stop(out)


def wait_for_ctrl_c(stack: Stack, out: TextIO) -> None:
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    out.write("services keep running; Ctrl-C stops them\n")
    out.flush()
    while not stopped.wait(1.0):
        stack.check_alive()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make run", description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".data")
    parser.add_argument("--rate", type=float, default=20.0, help="simulated logins per second")
    parser.add_argument("--duration-s", type=float, default=20.0, help="length of the burst")
    parser.add_argument(
        "--no-wait", action="store_true", help="stop the services after the summary"
    )
    parser.add_argument(
        "--isolated",
        action="store_true",
        help="free ports and topics of this run's own (for tests beside other runs)",
    )
    args = parser.parse_args(argv)
    out = sys.stdout
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    data_dir: Path = args.data_dir.resolve()
    ports = Ports.free() if args.isolated else Ports()
    names = Names(f".{uuid.uuid4().hex[:8]}" if args.isolated else "")
    stack = Stack(build_services(bootstrap, data_dir, ports, names))
    out.write(f"wifi-bridge: Kafka at {bootstrap}, data in {data_dir}\n")
    with stopping(stack, out):
        stack.start(data_dir / "logs", out)
        run_no = int(time.time())
        # New people on every run (the CRM contacts a person once a day at most), and the
        # stores are reconciled on this run's people only.
        people = range(
            10_000_000 + run_no % 1_000_000 * 1_000,
            10_000_000 + run_no % 1_000_000 * 1_000 + _USERS,
        )
        run = Run(bootstrap, data_dir, ports, names, people, int(time.time() * 1000))
        before = _landed(run)
        sent = simulate(args.rate, args.duration_s, data_dir, ports, people, run_no, out)
        landed = reconcile(sent, before, run, out)
        out.write(summary(sent, landed))
        out.write(
            f"\nwebhook URL: http://127.0.0.1:{ports.bridge}/webhooks/bt-wifi\n"
            f"report:      .venv/bin/wifi-bridge report --analytics-url "
            f"duckdb:///{data_dir / 'analytics.duckdb'} --chart {data_dir / 'logins.png'}\n"
        )
        out.flush()
        if not args.no_wait:
            wait_for_ctrl_c(stack, out)
    return 0 if landed.get("ok") else 1


def build_services(bootstrap: str, data_dir: Path, ports: Ports, names: Names) -> list[Service]:
    python = sys.executable
    text = "text"
    raw, visits, late, dlq = (names.topic(t) for t in ("raw", "visits", "late", "dlq"))
    clean = f"{visits},{late}"
    common = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        # One broker, so one replica; six partitions are plenty on a laptop.
        "KAFKA_TOPIC_PARTITIONS": os.environ.get("KAFKA_TOPIC_PARTITIONS", "6"),
    }
    return [
        Service(
            "bridge",
            [python, "-m", "bridge", "serve"],
            {
                **common,
                "BRIDGE_HOST": "127.0.0.1",
                "BRIDGE_PORT": str(ports.bridge),
                "BRIDGE_TOPIC_RAW": raw,
                "BRIDGE_TOPIC_DLQ": dlq,
                "BRIDGE_SPOOL_DIR": str(data_dir / "spool"),
                "BRIDGE_LOG_FORMAT": text,
            },
            f"http://127.0.0.1:{ports.bridge}/readyz",
            lambda body: b'"kafka":true' in body,
        ),
        Service(
            "pipeline",
            [python, "-m", "bridge", "pipeline"],
            {
                **common,
                "PIPELINE_GROUP_ID": names.group("pipeline"),
                "PIPELINE_TOPIC_RAW": raw,
                "PIPELINE_TOPIC_VISITS": visits,
                "PIPELINE_TOPIC_LATE": late,
                "PIPELINE_TOPIC_DLQ": dlq,
                # A short lateness, so the burst is in the stores seconds after it ends.
                "PIPELINE_LATENESS_S": "10",
                "PIPELINE_METRICS_HOST": "127.0.0.1",
                "PIPELINE_METRICS_PORT": str(ports.pipeline),
                "PIPELINE_LOG_FORMAT": text,
            },
            f"http://127.0.0.1:{ports.pipeline}/metrics",
            lambda body: b"wifi_pipeline_assigned_partitions 0.0" not in body,
        ),
        Service(
            "sink-analytics",
            [python, "-m", "bridge", "sink", "analytics"],
            {
                **common,
                "ANALYTICS_URL": f"duckdb:///{data_dir / 'analytics.duckdb'}",
                "ANALYTICS_TOPICS": clean,
                "ANALYTICS_TOPIC_DLQ": dlq,
                "ANALYTICS_GROUP_ID": names.group("sink-analytics"),
                "ANALYTICS_METRICS_HOST": "127.0.0.1",
                "ANALYTICS_METRICS_PORT": str(ports.analytics),
                "ANALYTICS_LOG_FORMAT": text,
            },
            f"http://127.0.0.1:{ports.analytics}/healthz",
        ),
        Service(
            "sink-crm",
            [python, "-m", "bridge", "sink", "crm"],
            {
                **common,
                "CRM_TOPICS": clean,
                "CRM_TOPIC_DLQ": dlq,
                "CRM_GROUP_ID": names.group("sink-crm"),
                "CRM_STATE_DB": str(data_dir / "crm-sink.db"),
                "CRM_METRICS_PORT": str(ports.crm),
                "CRM_LOG_FORMAT": text,
            },
            f"http://127.0.0.1:{ports.crm}/healthz",
        ),
    ]


def simulate(
    rate: float,
    duration_s: float,
    data_dir: Path,
    ports: Ports,
    people: range,
    run_no: int,
    out: TextIO,
) -> dict[str, Any]:
    summary_path = data_dir / "simulation.json"
    out.write(f"simulating {duration_s:.0f} s of traffic at {rate:g} logins/s, with an outage\n")
    out.flush()
    command = [
        sys.executable, "-m", "bridge", "simulate",
        "--url", f"http://127.0.0.1:{ports.bridge}/webhooks/bt-wifi",
        "--rate", str(rate),
        "--duration-s", str(duration_s),
        "--outage-start-s", str(duration_s * 0.3),
        "--outage-duration-s", str(duration_s * 0.2),
        "--seed", str(run_no),
        "--first-user-id", str(people.start),
        "--users", str(len(people)),
        "--summary", str(summary_path),
    ]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=False)
    result: dict[str, Any] = orjson.loads(summary_path.read_bytes())
    return result


@dataclass(frozen=True, slots=True)
class Run:
    """Where this run's services keep what they count, and who and when it simulates."""

    bootstrap: str
    data_dir: Path
    ports: Ports
    names: Names
    people: range
    started_ms: int
    """Epoch ms before the burst: a dead letter stamped since then is this run's."""


def reconcile(
    sent: dict[str, Any], before: dict[str, Any], run: Run, out: TextIO
) -> dict[str, Any]:
    """What this run added to the stores and the counters, once it stops changing."""
    expected = sent["expected"]
    out.write("waiting for the burst to reach the stores ...\n")
    out.flush()
    deadline = time.monotonic() + 120

    def delta() -> dict[str, Any]:
        now = _landed(run)
        return {
            key: value - before[key] if key in _COUNTERS else value for key, value in now.items()
        }

    landed = delta()
    while time.monotonic() < deadline:
        if landed["logins"] >= expected["unique_logins"] and landed["crm"] >= expected["visitors"]:
            time.sleep(3)  # a duplicate would arrive now, if any
            landed = delta()
            break
        time.sleep(1)
        landed = delta()
    landed["dead_letters"] = _dead_letters(run)
    sent_ids = set(sent["event_ids"])
    landed["missing"] = sorted(sent_ids - landed["event_ids"])
    landed["unexpected"] = sorted(landed["event_ids"] - sent_ids)
    landed["ok"] = (
        sent["sent"]["accepted"] == expected["posts"]
        and landed["logins"] == len(sent_ids) == expected["unique_logins"]
        and not landed["missing"]
        and not landed["unexpected"]
        and landed["visits"] == expected["visits"]
        and landed["duplicates"] == expected["redeliveries"]
        and landed["crm"] == expected["visitors"]
        and landed["dead_letters"] == 0
    )
    return landed


_COUNTERS = ("duplicates", "pipeline_late")
"""The pipeline's counters: this run's share is what they rose by while it ran."""


def _dead_letters(run: Run) -> int | None:
    """Records in the dead-letter topic stamped since the run started, from any stage.

    ``None`` when Kafka does not let them be counted: the summary shows that, not a guess.
    """
    from consumers.counts import CountError, count_topic

    client = {"bootstrap.servers": run.bootstrap}
    try:
        return count_topic(client, run.names.topic("dlq"), since_ms=run.started_ms).records
    except CountError as exc:
        print(f"make run: cannot count the dead letters: {exc}", file=sys.stderr)
        return None


def _landed(run: Run) -> dict[str, Any]:
    """What the stores hold of this run's simulated people, and the pipeline's counters."""
    from consumers.report import fetch

    data_dir, ports, people = run.data_dir, run.ports, run.people
    analytics_url = f"duckdb:///{data_dir / 'analytics.duckdb'}"
    rows: list[tuple[Any, ...]] = []
    with contextlib.suppress(FileNotFoundError):  # no batch written yet
        rows = asyncio.run(
            fetch(
                analytics_url,
                "SELECT event_id, visit_id, late FROM logins "
                "WHERE TRY_CAST(user_id AS BIGINT) BETWEEN $1 AND $2",
                people.start,
                people.stop - 1,
            )
        )
    crm = 0
    crm_db = data_dir / "crm-sink.db"
    if crm_db.exists():
        with (
            contextlib.closing(sqlite3.connect(f"file:{crm_db}?mode=ro", uri=True)) as db,
            contextlib.suppress(sqlite3.OperationalError),  # the table is not created yet
        ):
            emails = {row[0] for row in db.execute("SELECT DISTINCT email FROM crm_outbox")}
            crm = sum(1 for email in emails if _person_of(email) in people)
    return {
        "logins": len(rows),
        "event_ids": {str(row[0]) for row in rows},
        "visits": len({row[1] for row in rows if row[1] is not None}),
        "late": sum(1 for row in rows if row[2]),
        "duplicates": int(metric(ports.pipeline, "wifi_pipeline_duplicates_dropped_total")),
        "pipeline_late": int(metric(ports.pipeline, "wifi_pipeline_late_records_total")),
        "crm": crm,
    }


def _person_of(email: str) -> int:
    """The simulator's e-mails end in ``.<user id>@example.com``."""
    local = email.partition("@")[0]
    number = local.rpartition(".")[2]
    return int(number) if number.isdigit() else -1


def summary(sent: dict[str, Any], landed: dict[str, Any]) -> str:
    expected, tally = sent["expected"], sent["sent"]
    rows = [
        ("posts answered 200 by the bridge", expected["posts"], tally["accepted"]),
        ("unique logins (analytics logins)", expected["unique_logins"], landed["logins"]),
        ("redeliveries (pipeline dropped)", expected["redeliveries"], landed["duplicates"]),
        ("visits (analytics visits)", expected["visits"], landed["visits"]),
        ("late logins (outage retries)", f"<= {expected['outage_failed']}", landed["late"]),
        ("dead letters (dlq topic, any stage)", 0, landed["dead_letters"]),
        ("CRM upserts (outbox contacts)", expected["visitors"], landed["crm"]),
    ]
    lines = ["", f"{'':<36}{'sent':>10}{'landed':>10}"]
    for label, want, got in rows:
        mark = "" if isinstance(want, str) else ("  ok" if want == got else "  MISMATCH")
        if label.startswith("unique logins") and (landed["missing"] or landed["unexpected"]):
            mark = "  MISMATCH"  # the same count of other logins is not the same logins
        shown = "unknown" if got is None else got
        lines.append(f"{label:<36}{want!s:>10}{shown!s:>10}{mark}")
    for what, ids in (
        ("sent, not in the store", landed["missing"]),
        ("in the store, not sent", landed["unexpected"]),
    ):
        if ids:
            lines.append(f"  event ids {what}: {len(ids)} (first: {', '.join(ids[:3])})")
    lines.append("reconciled: every login once" if landed["ok"] else "NOT reconciled")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
