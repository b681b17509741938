"""Kafka plumbing shared by every process: client security options and topic provisioning."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, for_code
from aiokafka.helpers import create_ssl_context

from bridge.settings import KafkaSettings

log = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36


def client_options(settings: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments every aiokafka client of this project takes (servers, security)."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers.split(","),
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        options["sasl_plain_password"] = settings.sasl_password
    if settings.security_protocol.endswith("SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None,
            certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
            keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
            password=settings.ssl_key_password,
        )
    return options


class _Client(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


ClientT = TypeVar("ClientT", bound=_Client)


async def started(client: ClientT) -> ClientT:
    """``client`` (an aiokafka producer or consumer) started; when its start fails it is
    stopped again, so nothing is left behind and the start can simply be tried again."""
    try:
        await client.start()
    except BaseException:
        await client.stop()
        raise
    return client


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic this project creates when it is missing; ``None`` takes the settings' value."""

    name: str
    partitions: int | None = None
    configs: dict[str, str] = field(default_factory=dict)


async def ensure_topics(settings: KafkaSettings, topics: Sequence[TopicSpec]) -> list[str]:
    """Create the topics that do not exist yet; returns the names it created.

    Existing topics are left as they are (partition counts are never changed behind an
    operator's back: that would move keys between partitions).
    """
    if not settings.create_topics:
        return []
    # A name asked for twice is created once (as first asked): Kafka refuses a request that
    # names a topic twice.
    unique: dict[str, TopicSpec] = {}
    for spec in topics:
        unique.setdefault(spec.name, spec)
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(
                name=spec.name,
                num_partitions=spec.partitions or settings.topic_partitions,
                replication_factor=settings.replication_factor,
                topic_configs={
                    "min.insync.replicas": str(settings.min_insync_replicas),
                    **spec.configs,
                },
            )
            for spec in unique.values()
            if spec.name not in existing
        ]
        if not wanted:
            return []
        response = await admin.create_topics(wanted)
        created = []
        for name, code, *rest in response.topic_errors:
            if code == 0:
                created.append(name)
                log.info("created topic", extra={"topic": name})
            elif code != _TOPIC_ALREADY_EXISTS:
                detail = rest[0] if rest and rest[0] else for_code(code).__name__
                raise KafkaError(f"could not create topic {name}: {detail}")
        return created
    finally:
        await admin.close()
