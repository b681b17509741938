"""``wifi-bridge simulate``: post realistic BT Wi-Fi traffic to a bridge and say what was sent."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import aiohttp
import orjson

from simulator.sender import send
from simulator.traffic import Layout, TrafficConfig, plan

DEFAULT_URL = "http://127.0.0.1:8080/webhooks/bt-wifi"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrafficConfig()
    a = parser.add_argument
    a("--url", default=DEFAULT_URL, help=f"the bridge's webhook URL (default {DEFAULT_URL})")
    a("--rate", type=float, default=d.rate_per_s, help="logins per second (default %(default)s)")
    a(
        "--duration-s",
        type=float,
        default=d.duration_s,
        help="length of the run (default %(default)s)",
    )
    a("--venues", type=int, default=d.venues, help="number of venues (default %(default)s)")
    a(
        "--users",
        type=int,
        default=d.users,
        help="number of distinct visitors (default %(default)s)",
    )
    a(
        "--relogin-share",
        type=float,
        default=d.relogin_share,
        help="share of posts that are another login of a recent visitor at the same venue "
        "(default %(default)s)",
    )
    a(
        "--redelivery-share",
        type=float,
        default=d.redelivery_share,
        help="share of posts that repeat an earlier post unchanged (default %(default)s)",
    )
    a(
        "--disorder-share",
        type=float,
        default=d.disorder_share,
        help="share of posts delayed by up to --disorder-max-ms (default %(default)s)",
    )
    a("--disorder-max-ms", type=int, default=d.disorder_max_ms, help="(default %(default)s)")
    a(
        "--gzip-share",
        type=float,
        default=d.gzip_share,
        help="share of posts sent gzip-encoded; 0 turns gzip off (default %(default)s)",
    )
    a(
        "--layout",
        choices=[layout.value for layout in Layout],
        default=d.layout.value,
        help="body layout: the sender's sample, its field table, or both (default %(default)s)",
    )
    a(
        "--outage-start-s",
        type=float,
        default=None,
        help="simulate a listener outage starting this many seconds into the run: posts in "
        "it fail and are retried later, out of order",
    )
    a("--outage-duration-s", type=float, default=0.0, help="length of the outage (default 0)")
    a(
        "--time-compression",
        type=float,
        default=d.time_compression,
        help="the sender's 3-hour retry delay is divided by this (default %(default)s: 10.8 s)",
    )
    a(
        "--visit-gap-s",
        type=int,
        default=d.visit_gap_ms // 1000,
        help="gap that separates visits, to count the visits expected (default %(default)s, "
        "as PIPELINE_VISIT_GAP_S)",
    )
    a(
        "--first-user-id",
        type=int,
        default=d.first_user_id,
        help="visitor ids start here; another value simulates other people (default %(default)s)",
    )
    a("--seed", type=int, default=d.seed, help="same seed, same traffic (default %(default)s)")
    a("--concurrency", type=int, default=64, help="posts in flight at most (default 64)")
    a("--basic-auth", default=None, metavar="USER:PASSWORD", help="HTTP basic auth for the bridge")
    a("--summary", type=Path, default=None, help="also write the summary as JSON to this file")
    a("--quiet", action="store_true", help="no progress line")


def run(args: argparse.Namespace) -> int:
    try:
        config = TrafficConfig(
            rate_per_s=args.rate,
            duration_s=args.duration_s,
            venues=args.venues,
            users=args.users,
            relogin_share=args.relogin_share,
            redelivery_share=args.redelivery_share,
            disorder_share=args.disorder_share,
            disorder_max_ms=args.disorder_max_ms,
            gzip_share=args.gzip_share,
            layout=Layout(args.layout),
            outage_start_s=args.outage_start_s,
            outage_duration_s=args.outage_duration_s,
            time_compression=args.time_compression,
            visit_gap_ms=args.visit_gap_s * 1000,
            first_user_id=args.first_user_id,
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"wifi-bridge simulate: {exc}", file=sys.stderr)
        return 2
    auth = None
    if args.basic_auth:
        user, _, password = args.basic_auth.partition(":")
        auth = aiohttp.BasicAuth(user, password)
    deliveries, expected = plan(config, start_ms=int(time.time() * 1000))
    print(
        f"simulating {len(deliveries)} posts to {args.url} over about "
        f"{max(d.at_ms for d in deliveries) / 1000:.0f} s (seed {config.seed})",
        file=sys.stderr,
    )
    tally = asyncio.run(
        send(
            deliveries,
            args.url,
            time_compression=config.time_compression,
            concurrency=args.concurrency,
            auth=auth,
            progress=None if args.quiet else sys.stderr,
        )
    )
    summary = {
        "sent": tally.as_dict(),
        "expected": expected.as_dict(),
        # Redeliveries and retries repeat their login's event id: one id per unique login.
        "event_ids": sorted({d.event_id for d in deliveries}),
    }
    print(
        f"posts: {tally.sent} sent, {tally.accepted} accepted, {tally.failed_attempts} failed "
        f"attempts, {tally.outage_skipped} held by the outage and retried, {tally.gave_up} "
        "given up\n"
        f"logins: {expected.unique_logins} unique ({expected.relogins} re-logins), "
        f"{expected.redeliveries} redeliveries, {expected.outage_failed} retried after the "
        f"outage\nvisits expected: {expected.visits}"
    )
    if args.summary is not None:
        args.summary.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    return 0 if tally.gave_up == 0 else 1
