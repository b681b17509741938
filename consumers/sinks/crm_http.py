"""HTTP plumbing the CRM adapters share: one session, the rate limit, timing, error mapping."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp

from consumers.sinks.crm_metrics import CrmMetrics
from consumers.sinks.crm_port import (
    CrmBatchRejected,
    CrmRateLimited,
    CrmUnavailable,
    truncate_detail,
)
from consumers.sinks.crm_retry import RetryReason, Verdict, classify_status, parse_retry_after
from consumers.sinks.ratelimit import SlidingWindowLimiter

log = logging.getLogger(__name__)

MAX_RETRY_AFTER_S = 900.0
"""The longest ``Retry-After`` the sink honours; a longer one waits this long and asks again."""

MAX_SLEEP_S = 1.0
"""The longest wait for the rate limit spent inside :meth:`HttpClient.post`; a longer one is
the caller's (:class:`CrmRateLimited`), so that a stop or the consumer's poll never waits
behind it (a ``Retry-After`` may hold the limiter for up to :data:`MAX_RETRY_AFTER_S`)."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    text: str


class HttpClient:
    """POSTs JSON bodies within a rate limit; raises the CRM port's errors for failures.

    A 2xx answer (including 207) is returned; 429, 5xx, 401/403, 3xx (redirects are not
    followed), 404/405/410 (a wrong URL), timeouts and connection errors raise
    :class:`CrmUnavailable` (a 429's ``Retry-After`` also blocks the limiter); any other
    status raises :class:`CrmBatchRejected` with the answer's text. A request the rate limit
    holds for more than ``max_sleep_s`` is not sent: :class:`CrmRateLimited` says how long
    to wait.
    """

    def __init__(
        self,
        *,
        crm: str,
        limiter: SlidingWindowLimiter,
        metrics: CrmMetrics,
        timeout_s: float,
        max_sleep_s: float = MAX_SLEEP_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if max_sleep_s < 0:
            raise ValueError("max_sleep_s must be >= 0")
        self._max_sleep_s = max_sleep_s
        self._crm = crm
        self._limiter = limiter
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Answer:
        while True:
            sent_s = self._clock()
            wait_s = self._limiter.acquire(sent_s)
            if wait_s <= 0:
                break
            if wait_s > self._max_sleep_s:
                raise CrmRateLimited(
                    f"the rate limit holds requests to {self._crm}", retry_after_s=wait_s
                )
            await asyncio.sleep(wait_s)
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        started = time.perf_counter()
        try:
            async with self._session.post(
                url, data=body, headers=dict(headers), allow_redirects=False
            ) as response:
                text = await response.text(errors="replace")
                status = response.status
                retry_after = response.headers.get("Retry-After")
        except TimeoutError:
            raise CrmUnavailable(
                f"{self._crm} did not answer in time", reason=RetryReason.TIMEOUT
            ) from None
        except aiohttp.ClientError as exc:
            raise CrmUnavailable(
                f"cannot reach {self._crm}: {type(exc).__name__}",
                reason=RetryReason.CONNECTION_ERROR,
            ) from None
        finally:
            self._limiter.finished(sent_s, self._clock())
            self._metrics.request_seconds.labels(crm=self._crm).observe(
                time.perf_counter() - started
            )
        verdict, reason = classify_status(status)
        if verdict is Verdict.ACCEPTED:
            return Answer(status, text)
        if verdict is Verdict.RETRY:
            assert reason is not None
            retry_after_s = parse_retry_after(retry_after, now_epoch_s=time.time())
            if retry_after_s is not None and retry_after_s > MAX_RETRY_AFTER_S:
                # A wait of hours or days (a bogus header, a date in the wrong year) would
                # stall the sink without a word; the backoff goes on asking instead.
                log.warning(
                    "the CRM's Retry-After is longer than the sink waits: capped",
                    extra={"crm": self._crm, "retry_after_s": retry_after_s},
                )
                retry_after_s = MAX_RETRY_AFTER_S
            if status == 429:
                self._limiter.block_until(self._clock() + (retry_after_s or 1.0))
            if reason is RetryReason.UNAUTHORIZED:
                log.error("the CRM refuses the credentials", extra={"crm": self._crm})
            elif reason is RetryReason.REDIRECTED:
                log.error(
                    "the CRM's URL answers with a redirect: set the final URL",
                    extra={"crm": self._crm, "status": status},
                )
            elif reason is RetryReason.WRONG_URL:
                log.error(
                    "the CRM's URL is not an endpoint that takes contacts: check it",
                    extra={"crm": self._crm, "status": status},
                )
            raise CrmUnavailable(
                f"{self._crm} answered {status}",
                reason=reason,
                retry_after_s=retry_after_s,
                status=status,
                detail=truncate_detail(text),
            )
        raise CrmBatchRejected(
            f"{self._crm} refused the request with {status}",
            status=status,
            detail=truncate_detail(text),
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
