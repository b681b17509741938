"""Posts a :func:`simulator.traffic.plan` to a bridge, in real time, as the sender would.

Each delivery is posted at its planned time (``POST`` with ``Content-Type: application/json``,
gzip-encoded for some). A planned outage failure is not sent at all (the listener is
"unreachable"); its retry is part of the plan. A post that really fails (an error status or no
answer within 10 s, the sender's timeout) is retried like the sender does, after 3 hours
divided by the time compression, at most twice more.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

import aiohttp

from simulator.traffic import RETRY_DELAY_MS, Delivery

log = logging.getLogger(__name__)

_SENDER_TIMEOUT_S = 10.0
_MAX_ATTEMPTS = 3


@dataclass(slots=True)
class Tally:
    """What happened to the posts of one run."""

    planned: int = 0
    sent: int = 0
    accepted: int = 0
    failed_attempts: int = 0
    gave_up: int = 0
    outage_skipped: int = 0
    retried: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    lost_event_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "planned": self.planned,
            "sent": self.sent,
            "accepted": self.accepted,
            "failed_attempts": self.failed_attempts,
            "gave_up": self.gave_up,
            "outage_skipped": self.outage_skipped,
            "retried_after_failure": self.retried,
            "by_status": dict(sorted(self.by_status.items())),
        }


async def send(
    deliveries: list[Delivery],
    url: str,
    *,
    time_compression: float,
    concurrency: int = 64,
    auth: aiohttp.BasicAuth | None = None,
    progress: TextIO | None = sys.stderr,
) -> Tally:
    """Post every delivery at its time; returns the tally once all are done."""
    tally = Tally(planned=len(deliveries))
    limit = asyncio.Semaphore(concurrency)
    start = time.monotonic()
    retry_delay_s = RETRY_DELAY_MS / 1000 / time_compression
    timeout = aiohttp.ClientTimeout(total=_SENDER_TIMEOUT_S)

    async with aiohttp.ClientSession(timeout=timeout, auth=auth) as session:

        async def post(delivery: Delivery, attempt: int) -> None:
            async with limit:
                status = await _post(session, url, delivery)
            tally.sent += 1
            key = str(status) if status else "no answer"
            tally.by_status[key] = tally.by_status.get(key, 0) + 1
            if status is not None and 200 <= status < 300:
                tally.accepted += 1
                return
            tally.failed_attempts += 1
            if attempt >= _MAX_ATTEMPTS:
                tally.gave_up += 1
                tally.lost_event_ids.append(delivery.event_id)
                return
            tally.retried += 1
            await asyncio.sleep(retry_delay_s)
            await post(delivery, attempt + 1)

        async def scheduled(delivery: Delivery) -> None:
            delay_s = start + delivery.at_ms / 1000 - time.monotonic()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            if delivery.fails:
                tally.outage_skipped += 1
                return
            await post(delivery, 1)

        reporter = asyncio.create_task(_report(tally, start, progress)) if progress else None
        try:
            await asyncio.gather(*(scheduled(d) for d in deliveries))
        finally:
            if reporter is not None:
                reporter.cancel()
                await asyncio.gather(reporter, return_exceptions=True)
                _line(tally, start, progress)
                if progress is not None and progress.isatty():
                    progress.write("\n")
    return tally


async def _post(session: aiohttp.ClientSession, url: str, delivery: Delivery) -> int | None:
    headers = {"Content-Type": "application/json"}
    data = delivery.body
    if delivery.gzip:
        data = gzip.compress(data)
        headers["Content-Encoding"] = "gzip"
    try:
        async with session.post(url, data=data, headers=headers) as response:
            await response.read()
            return response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.debug("post failed", extra={"error": type(exc).__name__})
        return None


async def _report(tally: Tally, start: float, out: TextIO | None) -> None:
    while True:
        await asyncio.sleep(1.0)
        _line(tally, start, out)


def _line(tally: Tally, start: float, out: TextIO | None) -> None:
    if out is None:
        return
    elapsed_s = time.monotonic() - start
    # On a terminal the line is rewritten in place; in a log, each report is a line.
    lead = "\r" if out.isatty() else ""
    tail = "" if out.isatty() else "\n"
    out.write(
        f"{lead}{elapsed_s:6.1f} s  sent {tally.sent}/{tally.planned}  accepted {tally.accepted}  "
        f"failed {tally.failed_attempts}  outage held {tally.outage_skipped}  "
        f"{tally.sent / max(elapsed_s, 0.001):6.1f}/s {tail}"
    )
    out.flush()
