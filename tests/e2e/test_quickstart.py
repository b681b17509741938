"""The README's quickstart, executed as written: ``make run``, then the "Try it" commands.

``make run`` starts every service against the test's broker, simulates a burst with an
outage and must print a reconciled summary; the "Try it" block then runs in a shell against
the running services, ``wifi-bridge report`` included; Ctrl-C stops everything cleanly.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


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


def test_make_run_reconciles_and_the_try_it_commands_work(kafka_bootstrap: str) -> None:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}
    make_run = subprocess.Popen(
        ["make", "run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    lines: list[str] = []
    running = threading.Event()

    def read() -> None:
        assert make_run.stdout is not None
        for raw in make_run.stdout:
            line = raw.decode(errors="replace")
            lines.append(line)
            if "Ctrl-C stops them" in line:
                running.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert running.wait(timeout=400), "".join(lines[-60:])
        output = "".join(lines)
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
        os.killpg(make_run.pid, signal.SIGINT)  # Ctrl-C in the terminal
        code = make_run.wait(timeout=120)
        reader.join(timeout=10)
        assert make_run.stdout is not None
        make_run.stdout.close()
    output = "".join(lines)
    # make reports the interrupt (exit 2, or dies of the signal itself); what matters is that
    # every service stopped cleanly.
    assert code in (0, 2, -signal.SIGINT), output[-4000:]
    assert "all services stopped" in output, output[-3000:]
    assert "Traceback" not in output, output[-4000:]
    for service in ("bridge", "pipeline", "sink-analytics", "sink-crm"):
        assert re.search(rf"stopped {service} \(exit 0\)", output), output[-3000:]
