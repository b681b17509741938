"""The README's quickstart, executed as written: ``make run``, then the "Try it" commands.

``make run`` runs with none of the settings it documents, so it starts its own local broker on
127.0.0.1:9092 (``make kafka-up``), starts every service, simulates a burst with an outage and
must print a reconciled summary; the "Try it" block then runs in a shell against the running
services, ``wifi-bridge report`` included; Ctrl-C stops the services cleanly, and the test stops
the broker (``make kafka-down``) whatever happened and removes the data directories it made.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# Settings that would make `make run` differ from what the README shows: none may leak in.
AS_WRITTEN_UNSET = ("KAFKA_BOOTSTRAP_SERVERS", "KAFKA_PORT", "KAFKA_DATA_DIR", "ANALYTICS_URL")
PORTS = {
    9092: "the local broker",
    8080: "the bridge",
    9101: "the pipeline's metrics",
    9102: "the analytics sink's metrics",
    9103: "the CRM sink's metrics",
}


def code_blocks(section: str | None) -> list[str]:
    """The ```sh blocks of the README, of one ``## section`` or before the first section."""
    text = README.read_text()
    if section is None:
        text = text.split("\n## ", 1)[0]
    else:
        text = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", text, re.S)


def test_the_readme_starts_with_the_two_commands() -> None:
    (first,) = code_blocks(None)
    commands = [line.split("#")[0].strip() for line in first.splitlines()]
    assert commands == ["make run", "make test"]


def taken(port: int) -> bool:
    """Whether something listens on the port (a socket in TIME_WAIT does not count)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_make_run_as_written_starts_its_broker_reconciles_and_the_try_it_commands_work() -> None:
    busy = [f"{port} ({what})" for port, what in PORTS.items() if taken(port)]
    if busy:
        pytest.fail(
            "make run, as the README writes it, starts a broker and services on fixed ports, "
            f"and these are taken: {', '.join(busy)}. Stop what holds them (a broker from "
            "`make kafka-up`: `make kafka-down`) and run the test again."
        )
    env = {name: value for name, value in os.environ.items() if name not in AS_WRITTEN_UNSET}
    made = [path for path in (ROOT / ".kafka-data", ROOT / ".data") if not path.exists()]
    make_run = subprocess.Popen(
        ["make", "run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    lines: list[str] = []
    settled = threading.Event()  # the services keep running, or make run ended

    def read() -> None:
        assert make_run.stdout is not None
        for raw in make_run.stdout:
            line = raw.decode(errors="replace")
            lines.append(line)
            if "Ctrl-C stops them" in line:
                settled.set()
        settled.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert settled.wait(timeout=480), "".join(lines[-60:])
        output = "".join(lines)
        assert "Ctrl-C stops them" in output, output[-4000:]
        assert re.search(r"^Kafka \S+ ready on 127\.0\.0\.1:9092 ", output, re.M), output[:3000]
        assert "wifi-bridge: Kafka at 127.0.0.1:9092" in output, output[:3000]
        assert "reconciled: every login once" in output, output[-4000:]
        late = re.search(r"^late logins \(outage retries\)\s+<= \d+\s+(\d+)", output, re.M)
        assert late is not None, output[-4000:]
        assert int(late.group(1)) > 0  # the outage's retries came back late, and were kept

        (try_it,) = code_blocks("Try it")
        shell = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", try_it],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert shell.returncode == 0, shell.stdout[-3000:] + shell.stderr[-3000:]
        assert "wifiWebhookListener: 1" in shell.stdout
        assert "wifi_bridge_requests_total" in shell.stdout
        assert re.search(r"^logins: \d+", shell.stdout, re.M), shell.stdout[-3000:]
        chart = ROOT / ".data" / "logins.png"
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert time.time() - chart.stat().st_mtime < 300
    finally:
        try:
            with contextlib.suppress(ProcessLookupError):  # make run may have ended already
                os.killpg(make_run.pid, signal.SIGINT)  # Ctrl-C in the terminal
            try:
                code = make_run.wait(timeout=120)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(make_run.pid, signal.SIGKILL)
                code = make_run.wait()
            reader.join(timeout=10)
            assert make_run.stdout is not None
            make_run.stdout.close()
        finally:
            down = subprocess.run(
                ["make", "kafka-down"], cwd=ROOT, env=env, capture_output=True, text=True
            )
            for path in made:
                shutil.rmtree(path, ignore_errors=True)
    output = "".join(lines)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "Kafka stopped" in down.stdout, down.stdout
    # make reports the interrupt (exit 2, or dies of the signal itself); what matters is that
    # every service stopped cleanly.
    assert code in (0, 2, -signal.SIGINT), output[-4000:]
    assert "all services stopped" in output, output[-3000:]
    assert "Traceback" not in output, output[-4000:]
    for service in ("bridge", "pipeline", "sink-analytics", "sink-crm"):
        assert re.search(rf"stopped {service} \(exit 0\)", output), output[-3000:]
