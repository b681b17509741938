"""``wifi-bridge replay``: move where a consumer reads its topics, to read them again.

Every stage resumes by itself after an outage (the bridge drains its spool, the pipeline and
the sinks go on from what they committed), and every write downstream of the raw topic is
idempotent, so reading a topic again never counts anything twice. A replay is for the cases
where the data behind a consumer went away or is wanted again: an analytics database restored
from a backup, tables cleaned by hand, a data team's consumer rebuilding its own store.

Two kinds of position:

* ``replay analytics``: the analytics sink keeps its positions in its own database
  (``sink_offsets``), with an epoch per partition. The move bumps the epochs, so a running sink
  is fenced on its next batch, claims its partitions again and reads from the new positions: no
  need to stop it (a DuckDB file must be free for a moment, which the sink allows between
  batches).
* ``replay group GROUP``: any consumer group that commits its offsets to Kafka (the CRM sink's
  ``wifi-sink-crm``, data teams' consumers). Kafka takes new offsets only for a group with no
  member, so its consumers must be stopped first; the command says so otherwise.

``--to`` is ``beginning``, ``end`` or a time (ISO 8601 with an offset, ``2026-11-30T18:00:00Z``:
each partition's first record at or after it, by record timestamp); ``--ago`` is a duration back
from now (``3h``, ``90m``, ``2d``), the same as that time. Without ``--execute`` the command only
prints what it would move.
A move forward past records the consumer has not read yet (``--to end``, or a time later than
where a lagging consumer is) leaves them unread for good, a gap in the store behind it: the plan
marks it as a skip, and ``--execute`` refuses it unless ``--allow-skip`` is given too.
The pipeline's group is refused (by name, and by its changelog topic ``<group>-changelog``): its
offsets, state and outputs commit together, and moving its input alone would emit logins again;
re-derive the clean topics with a second pipeline (another ``PIPELINE_GROUP_ID`` and output
topics) instead. A group with no offsets on the topics (a mistyped name) is refused too, since
Kafka would create it; ``--create`` gives a new group its positions on purpose.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar

import confluent_kafka
from confluent_kafka import ConsumerGroupState, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

from bridge import config
from bridge.errors import ConfigError, WifiBridgeError
from bridge.rdkafka import client_config
from bridge.settings import KAFKA_OPTIONS, KafkaSettings
from consumers.sinks.analytics.settings import AnalyticsSettings

if TYPE_CHECKING:
    from consumers.sinks.analytics.store import AnalyticsStore

__all__ = ["ReplayError", "Target", "add_arguments", "parse_target", "run"]

_KAFKA_TIMEOUT_S = 30.0
_DURATION = re.compile(r"(\d+)\s*([smhd])")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
# The store may be held by the analytics sink for a batch (DuckDB: one process at a time).
_STORE_ATTEMPTS = 150

T = TypeVar("T")


class ReplayError(WifiBridgeError):
    """The move cannot be made (a group still has members, a topic does not exist, ...)."""

    code = "replay_error"


@dataclass(frozen=True, slots=True)
class Target:
    """Where to move each partition: its start, its end, or its first record at ``time_ms``."""

    kind: str
    time_ms: int | None = None

    def describe(self) -> str:
        if self.time_ms is None:
            return self.kind
        moment = datetime.fromtimestamp(self.time_ms / 1000).astimezone()
        return moment.isoformat(timespec="seconds")


def parse_target(to: str | None, ago: str | None, *, now_ms: int) -> Target:
    """``--to`` or ``--ago``; :class:`ConfigError` naming the option when it cannot be read."""
    if ago is not None:
        duration = _DURATION.fullmatch(ago.strip())
        if duration is None:
            raise ConfigError(f"--ago must be a duration like 3h, 90m or 2d, not {ago!r}")
        amount, unit = duration.groups()
        return Target("time", now_ms - int(amount) * _UNIT_MS[unit])
    value = (to or "").strip()
    if value in {"beginning", "end"}:
        return Target(value)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise ConfigError(
            "--to must be beginning, end or a time with its offset (2026-11-30T18:00:00Z), "
            f"not {to!r} (for a duration back from now, use --ago 3h)"
        )
    return Target("time", int(moment.timestamp() * 1000))


@dataclass(frozen=True, slots=True)
class Move:
    """One partition's move; an offset of None is "from the start" (the analytics sink's)."""

    topic: str
    partition: int
    current: int | None
    new: int | None
    low: int
    high: int

    @property
    def rereads(self) -> int:
        """Records it will read again (or, moving forward, skip: then negative)."""
        # A position before the log start (records deleted by retention) reads from the start.
        current = self.low if self.current is None else max(self.current, self.low)
        new = self.low if self.new is None else self.new
        return min(current, self.high) - new

    @property
    def skips(self) -> int:
        """Records not read yet that the move passes over: they would never be read."""
        return max(0, -self.rereads)


def skip_refusal(moves: Sequence[Move]) -> str | None:
    """Why ``moves`` must not be made without ``--allow-skip``: None when they skip nothing."""
    skipping = [m for m in moves if m.skips]
    if not skipping:
        return None
    where = ", ".join(f"{m.topic}[{m.partition}] {m.skips}" for m in skipping)
    return (
        f"the move would skip {sum(m.skips for m in skipping)} records not read yet, for good "
        f"({where}); to read again without a gap, pick an earlier --to/--ago; to skip them on "
        "purpose, add --allow-skip"
    )


def _client(kafka: KafkaSettings) -> dict[str, str | int | float | bool]:
    # librdkafka's informational lines (queues purged on close) are noise in a command's output.
    return {**client_config(kafka), "log_level": 4}


def _offsets(
    kafka: KafkaSettings, topics: Sequence[str], target: Target
) -> dict[tuple[str, int], tuple[int, int, int]]:
    """For each partition of ``topics``: (offset of ``target``, low watermark, high watermark)."""
    consumer = confluent_kafka.Consumer(
        {**_client(kafka), "group.id": "wifi-bridge-replay", "enable.auto.commit": False}
    )
    try:
        found: dict[tuple[str, int], tuple[int, int, int]] = {}
        for topic in topics:
            metadata = consumer.list_topics(topic, _KAFKA_TIMEOUT_S).topics.get(topic)
            if metadata is None or metadata.error is not None or not metadata.partitions:
                raise ReplayError(f"topic {topic} does not exist (or this client may not see it)")
            partitions = sorted(metadata.partitions)
            marks = {
                p: consumer.get_watermark_offsets(TopicPartition(topic, p), _KAFKA_TIMEOUT_S)
                for p in partitions
            }
            at: dict[int, int] = {}
            if target.kind == "time":
                assert target.time_ms is not None
                for tp in consumer.offsets_for_times(
                    [TopicPartition(topic, p, target.time_ms) for p in partitions],
                    _KAFKA_TIMEOUT_S,
                ):
                    # No record at or after the time: the end.
                    at[tp.partition] = tp.offset if tp.offset >= 0 else marks[tp.partition][1]
            for p in partitions:
                low, high = marks[p]
                offset = {"beginning": low, "end": high}.get(target.kind, at.get(p, high))
                found[topic, p] = (offset, low, high)
        return found
    finally:
        consumer.close()


# --------------------------------------------------------------------------------------------
# The analytics sink


def _store(url: str, group: str) -> AnalyticsStore:
    """The analytics store at ``url`` (nothing opened yet); imported only for this command."""
    from consumers.sinks.analytics.ports import sql_port
    from consumers.sinks.analytics.store import AnalyticsStore

    return AnalyticsStore(sql_port(url), group_id=group)


async def _with_store(
    url: str, group: str, action: str, work: Callable[[AnalyticsStore], Awaitable[T]]
) -> T:
    """Run ``work`` on the analytics store, retrying while the sink holds the file."""
    from consumers.sinks.analytics.ports import STORE_RETRY_S
    from consumers.sinks.analytics.store import StoreUnavailable

    for attempt in range(_STORE_ATTEMPTS):
        store = _store(url, group)
        try:
            return await work(store)
        except StoreUnavailable as exc:
            if attempt == _STORE_ATTEMPTS - 1:
                raise ReplayError(
                    f"cannot {action} the analytics store ({exc.message}); with DuckDB, the "
                    "sink holds the file while it writes: try again when it is idle, or stop it"
                ) from exc
            await asyncio.sleep(STORE_RETRY_S)
        finally:
            await store.close()
    raise AssertionError("unreachable")


async def plan_analytics(
    kafka: KafkaSettings, url: str, group: str, topics: Sequence[str], target: Target
) -> list[Move]:
    offsets = await asyncio.to_thread(_offsets, kafka, topics, target)

    async def read(store: AnalyticsStore) -> dict[tuple[str, int], int | None]:
        return await store.positions(topics)

    stored = await _with_store(url, group, "read", read)
    moves = []
    for (topic, partition), (offset, low, high) in sorted(offsets.items()):
        # "From the start" is stored as no position, which stays right when retention moves
        # the start on.
        new = None if target.kind == "beginning" else offset
        moves.append(Move(topic, partition, stored.get((topic, partition)), new, low, high))
    return moves


async def apply_analytics(url: str, group: str, moves: Sequence[Move]) -> None:
    async def move(store: AnalyticsStore) -> None:
        await store.move({(m.topic, m.partition): m.new for m in moves})

    await _with_store(url, group, "update", move)


# --------------------------------------------------------------------------------------------
# Consumer groups that commit to Kafka


def pipeline_refusal(group: str) -> str:
    """Why the pipeline's group is never moved, and what to do instead."""
    return (
        f"{group} is the pipeline's group: its offsets, state and outputs commit together, and "
        "moving its input alone would emit logins again. To re-derive the clean topics, run a "
        "second pipeline with another PIPELINE_GROUP_ID and other output topics"
    )


def _group_state(admin: AdminClient, group: str) -> tuple[ConsumerGroupState, int]:
    """The group's state and how many members it has (a group Kafka does not know: DEAD, 0)."""
    (described,) = admin.describe_consumer_groups([group]).values()
    description = described.result(_KAFKA_TIMEOUT_S)
    state: ConsumerGroupState = description.state
    return state, len(description.members)


def _has_members(group: str, state: ConsumerGroupState, members: int) -> ReplayError:
    return ReplayError(
        f"group {group} has {members} active member(s) (state {state.name}): stop its "
        "consumers first, since Kafka takes new offsets only for an empty group"
    )


def plan_group(
    kafka: KafkaSettings, group: str, topics: Sequence[str], target: Target, *, create: bool
) -> list[Move]:
    """The moves of ``group``; :class:`ConfigError` for the pipeline's group, and
    :class:`ReplayError` for a group with no offsets on ``topics`` unless ``create``."""
    admin = AdminClient(_client(kafka))
    # The pipeline names its changelog after its group unless told otherwise, so this finds
    # it under any PIPELINE_GROUP_ID. The whole topic list: asked for by name, a broker that
    # creates topics on request would create the changelog.
    if f"{group}-changelog" in admin.list_topics(timeout=_KAFKA_TIMEOUT_S).topics:
        raise ConfigError(pipeline_refusal(group))
    offsets = _offsets(kafka, topics, target)
    request = [ConsumerGroupTopicPartitions(group)]
    (future,) = admin.list_consumer_group_offsets(request).values()
    committed = {
        (tp.topic, tp.partition): tp.offset
        for tp in future.result(_KAFKA_TIMEOUT_S).topic_partitions
        if tp.offset >= 0
    }
    if not create and not committed.keys() & offsets.keys():
        # Kafka would create the group with these offsets: a mistyped name would "succeed".
        state, members = _group_state(admin, group)
        if members:
            raise _has_members(group, state, members)
        unknown = state is ConsumerGroupState.DEAD and not committed
        raise ReplayError(
            (
                f"group {group} does not exist (no member, no committed offsets): check its name"
                if unknown
                else f"group {group} has committed no offsets on {', '.join(topics)}: check "
                "the group and the topics"
            )
            + "; to give a new consumer group these positions on purpose, add --create"
        )
    return [
        Move(topic, partition, committed.get((topic, partition)), offset, low, high)
        for (topic, partition), (offset, low, high) in sorted(offsets.items())
    ]


def apply_group(kafka: KafkaSettings, group: str, moves: Sequence[Move]) -> None:
    admin = AdminClient(_client(kafka))
    state, members = _group_state(admin, group)
    if members:
        raise _has_members(group, state, members)
    if state not in {ConsumerGroupState.EMPTY, ConsumerGroupState.DEAD}:
        raise ReplayError(f"group {group} is {state.name}: try again in a moment")
    partitions = [TopicPartition(m.topic, m.partition, m.new) for m in moves if m.new is not None]
    (future,) = admin.alter_consumer_group_offsets(
        [ConsumerGroupTopicPartitions(group, partitions)]
    ).values()
    future.result(_KAFKA_TIMEOUT_S)


# --------------------------------------------------------------------------------------------
# The command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``wifi-bridge replay``."""
    kinds = parser.add_subparsers(dest="replay", required=True, metavar="CONSUMER")

    def common(command: argparse.ArgumentParser, topics_help: str | None) -> None:
        where = command.add_mutually_exclusive_group(required=True)
        where.add_argument(
            "--to", help="beginning, end, or a time with its offset (2026-11-30T18:00:00Z)"
        )
        where.add_argument("--ago", help="a duration back from now: 3h, 90m, 2d")
        command.add_argument(
            "--topics",
            default=None,
            required=topics_help is None,
            help="topics to move, comma-separated" + (f" {topics_help}" if topics_help else ""),
        )
        command.add_argument(
            "--execute", action="store_true", help="make the move (without it: only show it)"
        )
        command.add_argument(
            "--allow-skip",
            action="store_true",
            help="let --execute move forward past records not read yet (they are never read)",
        )
        config.add_options(command, "Kafka", KAFKA_OPTIONS)

    analytics = kinds.add_parser(
        "analytics",
        help="move the analytics sink's stored positions (it may keep running)",
        description="Move where the analytics sink resumes, in its database; a running sink "
        "is fenced and resumes from there. Writes are idempotent: tables do not change unless "
        "rows are missing.",
    )
    analytics.add_argument(
        "--analytics-url",
        default=None,
        metavar="ANALYTICS_URL",
        help="the sink's store [env ANALYTICS_URL, default 'duckdb:///.data/analytics.duckdb']",
    )
    analytics.add_argument(
        "--group",
        default=None,
        metavar="ANALYTICS_GROUP_ID",
        help="the sink's consumer group [env ANALYTICS_GROUP_ID, default wifi-sink-analytics]",
    )
    common(analytics, "[env ANALYTICS_TOPICS, default 'wifi.auth.visits,wifi.auth.late']")
    group = kinds.add_parser(
        "group",
        help="move a consumer group's committed offsets (its consumers stopped)",
        description="Move the offsets a consumer group committed to Kafka, e.g. the CRM "
        "sink's (wifi-sink-crm) or a data team's. Its consumers must be stopped.",
    )
    group.add_argument("group", help="the consumer group")
    group.add_argument(
        "--create",
        action="store_true",
        help="let a group with no offsets on the topics (a new one) be given these positions",
    )
    common(group, None)


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """``wifi-bridge replay``: 0 when done (or shown), 1 when it cannot be done, 2 bad usage."""
    try:
        target = parse_target(args.to, args.ago, now_ms=int(time.time() * 1000))
        if args.replay == "analytics":
            # The sink's own settings: the topics, store and group it reads with, from the same
            # environment (ANALYTICS_TOPICS, ...), each flag of this command winning.
            sink = _analytics_settings(args, environ)
            kafka, topics = sink.kafka, list(sink.topics)
            url, group_id = sink.store.url, sink.group_id
        else:
            url, group_id = "", args.group
            kafka = KafkaSettings.from_values(config.resolve(KAFKA_OPTIONS, args, environ))
            topics = [t.strip() for t in args.topics.split(",") if t.strip()]
            if not topics:
                raise ConfigError("--topics must name at least one topic")
            pipeline_group = environ.get("PIPELINE_GROUP_ID") or "wifi-pipeline"
            if args.group == pipeline_group:
                raise ConfigError(pipeline_refusal(args.group))
            analytics_group = environ.get("ANALYTICS_GROUP_ID") or "wifi-sink-analytics"
            if args.group == analytics_group:
                # Its Kafka offsets are for lag monitoring only: the sink resumes from the
                # positions in its database, so moving them would replay nothing.
                raise ConfigError(
                    f"{args.group} is the analytics sink's group: it resumes from the positions "
                    "in its database, not from offsets in Kafka; move those with "
                    "wifi-bridge replay analytics"
                )
    except ConfigError as exc:
        print(f"wifi-bridge replay: {exc}", file=sys.stderr)
        return 2
    try:
        if args.replay == "analytics":
            moves = asyncio.run(plan_analytics(kafka, url, group_id, topics, target))
            who = f"analytics sink (group {group_id}, positions in its store)"
        else:
            moves = plan_group(kafka, group_id, topics, target, create=args.create)
            who = f"consumer group {group_id} (offsets in Kafka)"
        print(f"replay {who} to {target.describe()}:")
        _print_moves(moves)
        refusal = None if args.allow_skip else skip_refusal(moves)
        if not args.execute:
            needs = " and --allow-skip, since it skips records" if refusal else ""
            print(f"dry run: nothing changed (add --execute{needs} to move)")
            return 0
        if refusal is not None:
            raise ReplayError(f"nothing moved: {refusal}")
        if args.replay == "analytics":
            asyncio.run(apply_analytics(url, group_id, moves))
        else:
            apply_group(kafka, group_id, moves)
    except ConfigError as exc:
        print(f"wifi-bridge replay: {exc}", file=sys.stderr)
        return 2
    except (ReplayError, confluent_kafka.KafkaException) as exc:
        message = exc.message if isinstance(exc, ReplayError) else exc.args[0].str()
        print(f"wifi-bridge replay: {message}", file=sys.stderr)
        return 1
    print(f"moved {len(moves)} partitions")
    return 0


def _analytics_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> AnalyticsSettings:
    flags = argparse.Namespace(**vars(args))
    flags.analytics_group_id, flags.analytics_topics = args.group, args.topics
    return AnalyticsSettings.load(flags, environ)


def _print_moves(moves: Sequence[Move]) -> None:
    def shown(offset: int | None) -> str:
        return "start" if offset is None else str(offset)

    print(f"  {'topic':<28}{'partition':>10}{'from':>12}{'to':>12}{'end':>12}  records")
    for m in moves:
        change = f"SKIP {m.skips} (never read)" if m.skips else f"re-read {m.rereads}"
        print(
            f"  {m.topic:<28}{m.partition:>10}{shown(m.current):>12}{shown(m.new):>12}"
            f"{m.high:>12}  {change}"
        )
    again = sum(m.rereads for m in moves if m.rereads > 0)
    skipped = sum(m.skips for m in moves)
    print(
        f"  {again} records to read again"
        + (f"; SKIPS {skipped} records not read yet, which are then never read" if skipped else "")
    )
