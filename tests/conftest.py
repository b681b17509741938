from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fixtures.kafka import kafka_broker

pytest_plugins = [
    "tests.fixtures.bridge",
    "tests.fixtures.pipeline",
    "tests.fixtures.hubspot",
    "tests.fixtures.crm_sink",
    "tests.fixtures.postgres",
    "tests.fixtures.analytics",
]


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers of a real broker (existing cluster, testcontainers, or local jars)."""
    with kafka_broker(tmp_path_factory.mktemp("broker")) as bootstrap:
        yield bootstrap
