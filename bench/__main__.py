"""``make bench``: the bridge beside a bare aiohttp handler and the naive listener.

Parts, selectable on the command line (all by default): ``receiver`` (below, alias ``http``),
``pipeline`` (the pipeline beside plain consume-and-produce loops, see :mod:`bench.pipeline`)
and ``analytics`` (the analytics sink's write path beside a bare bulk load, see
:mod:`bench.analytics`), e.g. ``python -m bench analytics``.

Contenders, each its own process on the same event loop (uvloop, as the bridge runs by
default) and against the same Kafka broker:

- ``bare``: an aiohttp handler that reads the body and answers 200 (the ceiling);
- ``naive``: one ``send_and_wait`` per request, aiokafka with default settings;
- ``keyed``: the least a correct keyed listener does on librdkafka (parse for the key, produce
  acks=all, answer after the ack; see :mod:`bench.servers`): what keyed publishing to 12
  partitions costs by itself;
- ``bridge``: ``wifi-bridge serve`` as shipped (librdkafka producer, acks=all, idempotent);
- ``bridge-aiokafka``: the same with ``BRIDGE_PRODUCER=aiokafka``, the measured alternative;
- ``bridge-spool``: the bridge while Kafka is down (it points at a port nobody listens on), so
  every record takes the spool path (append, group-commit fsync, then 200).

They are loaded in turn by ``wrk`` (64 connections, one thread) with distinct login bodies;
rounds alternate so a noisy neighbour hurts each alike. What matters is the ratios printed at
the end, measured in this same run: absolute numbers are not comparable between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.common import ROOT, SAMPLE_PATH, broker
from bridge.kafka import TopicSpec, ensure_topics
from bridge.settings import KafkaSettings
from devkafka.broker import free_port

PATH = "/webhooks/bt-wifi"
TARGET_BRIDGE_VS_BARE = 0.7

_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local template = [==[%s]==]
local counter = 0
request = function()
  counter = counter + 1
  -- the sample puts session.authenticationTime before user.id: minute first, then the id
  return wrk.format(nil, nil, nil, string.format(template, counter %% 60, counter))
end
"""


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us_per_request: float = 0.0


def _sample_template() -> str:
    sample = SAMPLE_PATH.read_text()
    sample = sample.replace("%", "%%").replace('"id":888,"lastName"', '"id":%d,"lastName"')
    return sample.replace("13:27:08", "13:%02d:08")


def _wait_http(url: str, timeout_s: float = 60, *, contains: bytes = b"") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (loopback)
                if response.status == 200 and contains in response.read():
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s} s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def contender(
    kind: str, bootstrap: str, topic: str, loop: str, spool_dir: Path
) -> Iterator[tuple[str, int]]:
    port = free_port()
    env = {**os.environ}
    if kind == "bridge-spool":
        bootstrap = f"127.0.0.1:{free_port()}"  # Kafka down
    if kind.startswith("bridge"):
        command = [sys.executable, "-m", "bridge", "serve"]
        env.update(
            KAFKA_BOOTSTRAP_SERVERS=bootstrap,
            BRIDGE_HOST="127.0.0.1",
            BRIDGE_PORT=str(port),
            BRIDGE_TOPIC_RAW=topic,
            BRIDGE_TOPIC_DLQ=topic + ".dlq",
            BRIDGE_LOG_LEVEL="WARNING",
            BRIDGE_EVENT_LOOP=loop,
            BRIDGE_PRODUCER="aiokafka" if kind == "bridge-aiokafka" else "librdkafka",
            BRIDGE_SPOOL_DIR=str(spool_dir / f"{kind}-{port}"),
        )
        ready = f"http://127.0.0.1:{port}/readyz"
    else:
        command = [sys.executable, "-m", "bench.servers", kind, "--port", str(port)]
        command += ["--bootstrap", bootstrap, "--topic", topic, "--loop", loop]
        ready = f"http://127.0.0.1:{port}{PATH}"
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    try:
        # A bridge is ready at once (its spool takes records); wait until Kafka is connected.
        need_kafka = kind.startswith("bridge") and kind != "bridge-spool"
        _wait_http(ready, contains=b'"kafka":true' if need_kafka else b"")
        yield f"http://127.0.0.1:{port}{PATH}", process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def _find(pattern: str, text: str) -> re.Match[str]:
    found = re.search(pattern, text, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"unexpected wrk output, no match for {pattern!r}:\n{text}")
    return found


def run_wrk(url: str, script: Path, duration_s: int, connections: int) -> Result:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency"]
    out = subprocess.run(
        [*command, "-s", str(script), url], check=True, capture_output=True, text=True
    ).stdout
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    errors = int(non_2xx.group(1)) if non_2xx else 0
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return Result(
        rps=float(_find(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        p50_ms=_ms(*_find(r"^\s+50%\s+([\d.]+)(us|ms|s)$", out).groups()),
        p99_ms=_ms(*_find(r"^\s+99%\s+([\d.]+)(us|ms|s)$", out).groups()),
        errors=errors,
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="make bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "parts",
        nargs="*",
        help="what to measure: receiver (alias http), pipeline, analytics (default: all)",
    )
    parser.add_argument("--duration-s", type=int, default=10, help="measured seconds per round")
    parser.add_argument("--warmup-s", type=int, default=3, help="unmeasured seconds per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per contender (median)")
    parser.add_argument(
        "--broker-warmup-s", type=int, default=10, help="unmeasured load before the first round"
    )
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    parser.add_argument(
        "--analytics-records", type=int, default=30_000, help="logins written per round"
    )
    parser.add_argument(
        "--analytics-batch", type=int, default=2000, help="sink batch size (its default)"
    )
    parser.add_argument(
        "--pipeline-records", type=int, default=100_000, help="raw records in the pipeline's input"
    )
    args = parser.parse_args()
    parts = ["receiver" if part == "http" else part for part in args.parts] or [
        "receiver",
        "pipeline",
        "analytics",
    ]
    unknown = set(parts) - {"receiver", "pipeline", "analytics"}
    if unknown:
        parser.error(
            f"unknown part(s): {', '.join(sorted(unknown))}; choose receiver, pipeline, analytics"
        )
    status = 0
    if "receiver" in parts:
        status = bench_http(args)
    if "pipeline" in parts and status == 0:
        from bench import pipeline

        status = pipeline.main(
            ["--records", str(args.pipeline_records), "--rounds", str(args.rounds)]
        )
    if "analytics" in parts and status == 0:
        from bench import analytics

        status = analytics.run(
            records=args.analytics_records, batch_size=args.analytics_batch, rounds=args.rounds
        )
    return status


def bench_http(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        print("make bench needs wrk (Debian: apt-get install wrk)", file=sys.stderr)
        return 2

    kinds = ("bare", "naive", "keyed", "bridge", "bridge-aiokafka", "bridge-spool")
    results: dict[str, list[Result]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, broker() as bootstrap:
        script = Path(tmp) / "post.lua"
        script.write_text(_LUA % _sample_template())
        topics = [TopicSpec(f"bench.{k}") for k in kinds]
        topics += [TopicSpec(f"bench.{k}.dlq") for k in kinds if k.startswith("bridge")]
        asyncio.run(ensure_topics(KafkaSettings(bootstrap_servers=bootstrap), topics))
        # A fresh broker's JVM is not warmed up yet: its first seconds of load cost it several
        # times the CPU per record of later ones, and would penalise whoever comes first.
        print(f"warming up the broker ({args.broker_warmup_s} s of bridge traffic) ...", flush=True)
        with contender("bridge", bootstrap, "bench.bridge", args.loop, Path(tmp)) as (url, _):
            run_wrk(url, script, args.broker_warmup_s, args.connections)
        for round_no in range(1, args.rounds + 1):
            for kind in kinds:
                with contender(kind, bootstrap, f"bench.{kind}", args.loop, Path(tmp)) as (
                    url,
                    pid,
                ):
                    run_wrk(url, script, args.warmup_s, args.connections)
                    cpu_before = cpu_seconds(pid)
                    result = run_wrk(url, script, args.duration_s, args.connections)
                    used_s = cpu_seconds(pid) - cpu_before
                    result.cpu_us_per_request = used_s / (result.rps * args.duration_s) * 1e6
                results[kind].append(result)
                print(
                    f"round {round_no}/{args.rounds} {kind:<16} {result.rps:9.0f} req/s  "
                    f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  "
                    f"cpu {result.cpu_us_per_request:5.0f} us/req  errors {result.errors}",
                    flush=True,
                )

    median = {k: statistics.median(r.rps for r in v) for k, v in results.items()}
    p99 = {k: statistics.median(r.p99_ms for r in v) for k, v in results.items()}
    p50 = {k: statistics.median(r.p50_ms for r in v) for k, v in results.items()}
    cpu = {k: statistics.median(r.cpu_us_per_request for r in v) for k, v in results.items()}
    print()
    print(f"event loop: {args.loop}, {args.connections} connections, median of {args.rounds}")
    print(f"{'contender':<17}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'cpu us/req':>12}")
    for kind in kinds:
        print(
            f"{kind:<17}{median[kind]:>10.0f}{p50[kind]:>10.2f}{p99[kind]:>10.2f}{cpu[kind]:>12.0f}"
        )
    print()
    ratio = median["bridge"] / median["bare"]
    print(f"bridge / bare aiohttp (ceiling): {ratio:.2f}  (target >= {TARGET_BRIDGE_VS_BARE})")
    # The machine's speed drifts between rounds; each round's pair ran minutes apart at most.
    per_round = statistics.median(
        b.rps / c.rps for b, c in zip(results["bridge"], results["bare"], strict=True)
    )
    print(f"  the same, median of the rounds' own ratios: {per_round:.2f}")
    print(f"bridge / naive send_and_wait:    {median['bridge'] / median['naive']:.2f}")
    print(f"naive  / bare aiohttp:           {median['naive'] / median['bare']:.2f}")
    print(f"keyed minimum / bare aiohttp:    {median['keyed'] / median['bare']:.2f}")
    print(f"bridge / keyed minimum:          {median['bridge'] / median['keyed']:.2f}")
    aiokafka_ratio = median["bridge-aiokafka"] / median["bare"]
    print(f"bridge on aiokafka / bare:       {aiokafka_ratio:.2f}  (the other producer client)")
    # Throughput also depends on what else shares the machine (the broker and wrk run beside
    # the bridge, not beside the bare handler); CPU per request is the server's own cost.
    spool_ratio = median["bridge-spool"] / median["bridge"]
    print(f"bridge, Kafka down (spool) / bridge: {spool_ratio:.2f}  (target >= 0.5)")
    print(
        f"  p99 with Kafka down: {p99['bridge-spool']:.2f} ms, with Kafka: {p99['bridge']:.2f} ms"
    )
    print(f"CPU per request, bare / bridge:  {cpu['bare'] / cpu['bridge']:.2f}")
    # A process serves about one core's worth of Python (one GIL), so the throughput target is
    # a budget of CPU per request on top of the bare handler's.
    allowed_us = cpu["bare"] / TARGET_BRIDGE_VS_BARE - cpu["bare"]
    print(
        f"CPU per request on top of the bare handler: keyed minimum "
        f"+{cpu['keyed'] - cpu['bare']:.0f} us, bridge +{cpu['bridge'] - cpu['bare']:.0f} us; "
        f"the target allows +{allowed_us:.0f} us"
    )
    print(f"CPU per request, bare / bridge on aiokafka: {cpu['bare'] / cpu['bridge-aiokafka']:.2f}")
    if any(r.errors for r in results["bridge"]):
        print("WARNING: the bridge answered errors during the run", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
