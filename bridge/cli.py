"""The ``wifi-bridge`` command: one entry point, a subcommand per service."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from bridge import __version__, config, logs
from bridge.config import Option
from bridge.errors import ConfigError, WifiBridgeError
from bridge.settings import BRIDGE_OPTIONS, KAFKA_OPTIONS, BridgeSettings, KafkaSettings
from consumers.pipeline.settings import PIPELINE_OPTIONS, PipelineSettings
from consumers.sinks.analytics.settings import ANALYTICS_OPTIONS, AnalyticsSettings
from consumers.sinks.crm_settings import CRM_OPTIONS, CrmSettings

SETTINGS_TABLES: tuple[tuple[str, tuple[Option, ...]], ...] = (
    ("Kafka (every service)", KAFKA_OPTIONS),
    ("Receiver (`wifi-bridge serve`)", BRIDGE_OPTIONS),
    ("Pipeline (`wifi-bridge pipeline`)", PIPELINE_OPTIONS),
    ("CRM sink (`wifi-bridge sink crm`)", CRM_OPTIONS),
    ("Analytics sink (`wifi-bridge sink analytics`)", ANALYTICS_OPTIONS),
)


def settings_markdown() -> str:
    """Every setting as Markdown tables (the README's settings section is this output)."""
    lines: list[str] = []
    for title, options in SETTINGS_TABLES:
        lines += [
            f"#### {title}",
            "",
            "| variable | flag | default | meaning |",
            "|---|---|---|---|",
        ]
        for option in options:
            default = "" if option.default is None else f"`{option.default}`"
            lines.append(f"| `{option.env}` | `{option.flag}` | {default} | {option.help} |")
        lines.append("")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wifi-bridge",
        description="BT Wi-Fi login webhooks into Kafka, and the services that consume them.",
    )
    parser.add_argument("--version", action="version", version=f"wifi-bridge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _service_parser(
        commands,
        "serve",
        "receive webhooks and publish them to Kafka",
        "Receive BT Wi-Fi webhooks and publish each to Kafka.",
        ("receiver", BRIDGE_OPTIONS),
    )

    spool = commands.add_parser("spool", help="inspect or drain a spool directory")
    spool_commands = spool.add_subparsers(dest="spool_command", required=True, metavar="ACTION")
    status = spool_commands.add_parser("status", help="records, bytes and age of a spool")
    status.add_argument("directory", type=Path)
    drain = spool_commands.add_parser(
        "drain",
        help="publish a spool's records to Kafka (offline; not while a bridge holds it)",
        description="Publish every record of a spool directory to Kafka, oldest first. "
        "Kafka settings as for serve.",
    )
    drain.add_argument("directory", type=Path)
    config.add_options(drain, "Kafka", KAFKA_OPTIONS)

    _service_parser(
        commands,
        "pipeline",
        "normalise, dedup, reorder and group raw logins into visits (exactly once)",
        "Read the raw topic in a consumer group and write clean records to the visits, late "
        "and dead-letter topics inside Kafka transactions.",
        ("pipeline", PIPELINE_OPTIONS),
    )

    simulate = commands.add_parser(
        "simulate",
        help="post realistic BT Wi-Fi traffic to a bridge (a simulator of the sender)",
        description="Post generated logins to a bridge as the BT Wi-Fi sender would: re-logins, "
        "redeliveries, small disorder, gzip, both body layouts, and an outage whose posts are "
        "retried later. Prints a progress line and, at the end, what was sent.",
    )
    from simulator.cli import add_arguments

    add_arguments(simulate)
    sink = commands.add_parser("sink", help="run a sink of the canonical login topics")
    sinks = sink.add_subparsers(dest="sink", required=True, metavar="SINK")
    _service_parser(
        sinks,
        "crm",
        "upsert visitors as CRM contacts (HubSpot, a signed webhook, or a local outbox)",
        "Read canonical login records and upsert each visitor as a CRM contact, at most once "
        "per CRM_MIN_INTERVAL_S.",
        ("CRM sink", CRM_OPTIONS),
    )
    _service_parser(
        sinks,
        "analytics",
        "logins, visits and daily venue figures into PostgreSQL or DuckDB",
        "Consume canonical login records and write them, with their offsets, to the analytics "
        "tables.",
        ("analytics sink", ANALYTICS_OPTIONS),
    )

    report = commands.add_parser(
        "report",
        help="what the analytics store holds: totals, per venue, and a chart",
        description="Read the analytics tables (ANALYTICS_URL) and print logins, visitors and "
        "visits in total and per venue; with --chart, draw logins per venue over time as a PNG. "
        "Given brokers, also count the raw and dead-letter topics; given CRM_STATE_DB, the "
        "CRM outbox.",
    )
    from consumers.report import add_arguments as report_arguments

    report_arguments(report)

    replay = commands.add_parser(
        "replay",
        help="move where a sink or a consumer group reads its topics, to read them again",
        description="Move the analytics sink's stored positions, or a consumer group's "
        "committed offsets, to the start of the topics, their end, a time or a duration back "
        "from now. Shows the move; --execute makes it.",
    )
    from consumers.replay import add_arguments as replay_arguments

    replay_arguments(replay)

    commands.add_parser("settings", help="print every setting as Markdown tables")
    return parser


def _service_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    description: str,
    options: tuple[str, tuple[Option, ...]],
) -> None:
    """A service's subcommand: its Kafka options and its own, each a flag mirroring a variable."""
    command = commands.add_parser(
        name,
        help=summary,
        description=f"{description} Every flag mirrors the environment variable named in its "
        "help; a flag wins over the variable.",
    )
    config.add_options(command, "Kafka", KAFKA_OPTIONS)
    config.add_options(command, *options)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "settings":
        sys.stdout.write(settings_markdown())
        return 0
    if args.command == "spool":
        return _spool(args)
    if args.command == "report":
        from consumers.report import run as report_run

        return report_run(args, os.environ)
    if args.command == "replay":
        from consumers.replay import run as replay_run

        return replay_run(args, os.environ)
    if args.command == "simulate":
        from simulator.cli import run as simulate

        return simulate(args)
    if args.command == "sink" and args.sink == "crm":
        return _service(args, CrmSettings.load, "consumers.sinks.crm:run", "the CRM sink")
    if args.command == "sink" and args.sink == "analytics":
        runner = "consumers.sinks.analytics.service:run"
        return _service(args, AnalyticsSettings.load, runner, "the analytics sink")
    if args.command == "pipeline":
        runner = "consumers.pipeline.service:run"
        return _service(args, PipelineSettings.load, runner, "the pipeline")
    return _service(args, BridgeSettings.load, "bridge.server:run", "the receiver")


class _ServiceSettings(Protocol):
    @property
    def log_level(self) -> str: ...

    @property
    def log_format(self) -> str: ...


S = TypeVar("S", bound=_ServiceSettings)


def _service(
    args: argparse.Namespace,
    load: Callable[[argparse.Namespace, Mapping[str, str]], S],
    runner: str,
    what: str,
) -> int:
    """Load a service's settings, configure its logs and run it (imported only now)."""
    try:
        settings = load(args, os.environ)
    except ConfigError as exc:
        return _configuration_error(exc)
    logs.configure(level=settings.log_level, log_format=settings.log_format)
    module, _, name = runner.partition(":")
    run: Callable[[S], int] = getattr(importlib.import_module(module), name)
    try:
        return run(settings)
    except ConfigError as exc:
        return _configuration_error(exc)
    except OSError as exc:  # e.g. the port is taken
        print(f"wifi-bridge: cannot run {what}: {exc}", file=sys.stderr)
        return 1


def _configuration_error(exc: ConfigError) -> int:
    """Print what is wrong, with the flags of the settings it names; the exit code is 2."""
    message = str(exc)
    flags = [
        option.flag
        for _, options in SETTINGS_TABLES
        for option in options
        if re.search(rf"\b{option.env}\b", message)
    ]
    hint = f" (flag {', '.join(dict.fromkeys(flags))})" if flags else ""
    print(f"wifi-bridge: configuration error: {message}{hint}", file=sys.stderr)
    return 2


def _spool(args: argparse.Namespace) -> int:
    from bridge import spool_cli

    try:
        if args.spool_command == "status":
            return spool_cli.status(args.directory)
        kafka = KafkaSettings.from_values(config.resolve(KAFKA_OPTIONS, args, os.environ))
        logs.configure(level="WARNING", log_format="text")
        return asyncio.run(spool_cli.drain(args.directory, kafka))
    except ConfigError as exc:
        return _configuration_error(exc)
    except WifiBridgeError as exc:
        print(f"wifi-bridge: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
