"""Settings from environment variables, each mirrored by a command-line flag.

An :class:`Option` names one environment variable; its flag is derived from the name
(``BRIDGE_PORT`` -> ``--bridge-port``) so the two can never drift apart. A flag given on the
command line wins over the environment, which wins over the default. Parsing helpers raise
:class:`~bridge.errors.ConfigError` with a message that names the setting.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bridge.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: its environment variable, default (as text) and help line."""

    env: str
    default: str | None
    help: str
    secret: bool = False
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.env.lower().replace("_", "-")

    @property
    def dest(self) -> str:
        return self.env.lower()


Values = Mapping[str, str | None]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def log_options(prefix: str) -> tuple[Option, Option]:
    """``<PREFIX>_LOG_LEVEL`` and ``<PREFIX>_LOG_FORMAT``, as every service has them."""
    return (
        Option(f"{prefix}_LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR"),
        Option(
            f"{prefix}_LOG_FORMAT",
            "auto",
            "json, text, or auto (json unless stderr is a terminal)",
            choices=("auto", "json", "text"),
        ),
    )


def add_options(parser: argparse.ArgumentParser, title: str, options: Sequence[Option]) -> None:
    group = parser.add_argument_group(title)
    for option in options:
        shown = "(not set)" if option.default is None else repr(option.default)
        if option.secret and option.default is not None:
            shown = "(set)"
        group.add_argument(
            option.flag,
            dest=option.dest,
            metavar=option.env,
            default=None,
            help=f"{option.help} [env {option.env}, default {shown}]",
        )


def resolve(
    options: Iterable[Option], args: argparse.Namespace | None, environ: Mapping[str, str]
) -> dict[str, str | None]:
    """Pick each option's raw text: flag, else environment, else default; '' means unset."""
    values: dict[str, str | None] = {}
    for option in options:
        raw = getattr(args, option.dest, None) if args is not None else None
        if raw is None:
            raw = environ.get(option.env)
        if raw is None:
            raw = option.default
        if raw is not None:
            raw = raw.strip()
            if raw == "":
                raw = None
        if raw is not None and option.choices and raw not in option.choices:
            raise ConfigError(
                f"{option.env}: expected one of {', '.join(option.choices)}, got {raw!r}"
            )
        values[option.env] = raw
    return values


def text(values: Values, name: str) -> str:
    raw = values.get(name)
    if raw is None:
        raise ConfigError(f"{name}: a value is required")
    return raw


def optional_text(values: Values, name: str) -> str | None:
    return values.get(name)


def integer(values: Values, name: str, *, minimum: int, maximum: int | None = None) -> int:
    raw = text(values, name)
    try:
        number = int(raw.replace("_", ""))
    except ValueError:
        raise ConfigError(f"{name}: expected a whole number, got {raw!r}") from None
    if number < minimum or (maximum is not None and number > maximum):
        upper = "" if maximum is None else f" and at most {maximum}"
        raise ConfigError(f"{name}: expected at least {minimum}{upper}, got {number}")
    return number


_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def topic(values: Values, name: str) -> str:
    """A Kafka topic name: 1 to 249 of ``[A-Za-z0-9._-]``, and neither ``.`` nor ``..``."""
    return _topic_name(text(values, name), name)


def _topic_name(raw: str, name: str) -> str:
    if raw in {".", ".."} or not _TOPIC.fullmatch(raw):
        raise ConfigError(
            f"{name}: expected a Kafka topic name (1 to 249 letters, digits, '.', '_' or '-', "
            f"and not '.' or '..'), got {raw!r}"
        )
    return raw


def topics(values: Values, name: str) -> tuple[str, ...]:
    """Comma-separated Kafka topic names, each checked as :func:`topic`; a name given twice
    is kept once, in the order first given. At least one is required."""
    names = tuple(
        dict.fromkeys(
            # Each name checked here, so that a typo fails with the setting's name rather than
            # as a Kafka that never seems reachable.
            _topic_name(part.strip(), name)
            for part in text(values, name).split(",")
            if part.strip()
        )
    )
    if not names:
        raise ConfigError(f"{name}: name at least one topic")
    return names


def host(values: Values, name: str) -> str:
    """An IP address (IPv6 with or without brackets) or a DNS host name."""
    raw = text(values, name)
    bare = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    labels = raw.removesuffix(".").split(".")
    if len(raw) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(f"{name}: expected an IP address or a host name, got {raw!r}")
    return raw


def log_level(values: Values, name: str) -> str:
    level = text(values, name).upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f"{name}: expected DEBUG, INFO, WARNING or ERROR, got {level!r}")
    return level


def boolean(values: Values, name: str) -> bool:
    raw = text(values, name).lower()
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name}: expected true or false, got {raw!r}")


def optional_file(values: Values, name: str) -> Path | None:
    raw = values.get(name)
    if raw is None:
        return None
    path = Path(raw)
    if not path.is_file():
        raise ConfigError(f"{name}: no readable file at {raw!r}")
    return path


def networks(
    values: Values, name: str
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    raw = values.get(name)
    if raw is None:
        return ()
    found = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            found.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ConfigError(f"{name}: {part!r} is not an IP address or CIDR range") from None
    return tuple(found)
