"""What every benchmark shares: where the sample body is, and a Kafka broker to run against."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from devkafka.broker import LocalKafka, free_port

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_PATH = ROOT.parent / "shared" / "testdata" / "documented-sample.json"


@contextmanager
def broker() -> Iterator[str]:
    """``KAFKA_BOOTSTRAP_SERVERS`` when set, else a local broker for the run's duration."""
    existing = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if existing:
        yield existing
        return
    with tempfile.TemporaryDirectory(prefix="bench-kafka-") as data:
        local = LocalKafka(data_dir=Path(data), port=free_port())
        print(f"starting a local Kafka broker on {local.bootstrap_servers} ...", flush=True)
        local.start()
        try:
            yield local.bootstrap_servers
        finally:
            local.stop()
