"""Structured logs: one JSON object a line in production, ``key=value`` text at a terminal.

Fields passed as ``extra={...}`` (topic, partition, offset, event_id, ...) become fields of the
line. Callers never pass personal data (e-mails, names, dates of birth) or secrets.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        text = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if fields:
            text += f"  {fields}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


#: aiohttp's own loggers: their DEBUG lines carry request lines, and so the URL token.
_AIOHTTP_LOGGERS = ("aiohttp.access", "aiohttp.server", "aiohttp.web", "aiohttp.internal")


class _WithoutRequestBytes(logging.Filter):
    """Keeps a request aiohttp could not parse out of its log line, leaving the error's class.

    aiohttp logs such a request at ERROR with the exception, whose text quotes the offending
    bytes: for a broken request line, the path with the URL token.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.exc_info = None
            record.exc_text = None
            record.error = type(exc).__name__
        return True


_WITHOUT_REQUEST_BYTES = _WithoutRequestBytes()


def configure(*, level: str = "INFO", log_format: str = "auto") -> None:
    """Route every logger to stderr in the chosen format (``json``, ``text`` or ``auto``)."""
    if log_format == "auto":
        log_format = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet = max(logging.getLevelName(level), logging.WARNING)
    # aiohttp's access log would print the path, and so the URL token: never enable it.
    logging.getLogger("aiohttp.access").disabled = True
    for name in _AIOHTTP_LOGGERS:
        logging.getLogger(name).setLevel(quiet)
    server = logging.getLogger("aiohttp.server")
    if _WITHOUT_REQUEST_BYTES not in server.filters:
        server.addFilter(_WITHOUT_REQUEST_BYTES)
    logging.getLogger("aiokafka").setLevel(quiet)
