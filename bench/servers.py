"""Reference servers the bridge is measured against (run as their own processes).

``bare``: an aiohttp handler that reads the body and answers 200, nothing else: the ceiling.
``naive``: the listener most people write: one ``send_and_wait`` per request on an aiokafka
producer with default settings.
``keyed``: the least a correct keyed listener does: parse the body for ``user.id``, produce
it keyed on librdkafka (acks=all, idempotent, murmur2, linger 1 ms, TCP_NODELAY, reports
served by a thread), answer after the ack. No auth, event id, headers, spool or metrics: the
bridge's distance to it is the cost of those.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import confluent_kafka
import orjson
from aiohttp import web
from aiokafka import AIOKafkaProducer


def bare_app(path: str) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="ok", headers={"wifiWebhookListener": "1"})

    app = web.Application()
    app.router.add_route("*", path, handle)
    return app


def naive_app(path: str, bootstrap: str, topic: str) -> web.Application:
    producer_key = web.AppKey("producer", AIOKafkaProducer)

    async def producer_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        app[producer_key] = producer
        yield
        await producer.stop()

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        if request.method == "POST":
            await request.app[producer_key].send_and_wait(topic, body)
        return web.Response(text="ok", headers={"wifiWebhookListener": "1"})

    app = web.Application()
    app.cleanup_ctx.append(producer_ctx)
    app.router.add_route("*", path, handle)
    return app


def keyed_app(path: str, bootstrap: str, topic: str) -> web.Application:
    producer = confluent_kafka.Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 1,
            "partitioner": "murmur2_random",
            "socket.nagle.disable": True,
        }
    )
    reports: list[tuple[asyncio.Future[None], Any]] = []
    running = True

    def collect(delivered: asyncio.Future[None], err: Any, _msg: Any) -> None:
        reports.append((delivered, err))

    def settle(batch: list[tuple[asyncio.Future[None], Any]]) -> None:
        for delivered, err in batch:
            if err is None:
                delivered.set_result(None)
            else:
                delivered.set_exception(confluent_kafka.KafkaException(err))

    def poll(loop: asyncio.AbstractEventLoop) -> None:
        while running:
            producer.poll(0.1)
            if reports:
                batch = reports[:]
                reports.clear()
                loop.call_soon_threadsafe(settle, batch)

    async def poller(app: web.Application) -> AsyncIterator[None]:
        nonlocal running
        thread = threading.Thread(target=poll, args=(asyncio.get_running_loop(),), daemon=True)
        thread.start()
        yield
        running = False
        await asyncio.to_thread(thread.join)
        producer.flush(5)

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        if request.method == "POST":
            key = str(orjson.loads(body)["user"]["id"]).encode()
            delivered = asyncio.get_running_loop().create_future()
            producer.produce(topic, body, key, on_delivery=partial(collect, delivered))
            await delivered
        return web.Response(text="ok", headers={"wifiWebhookListener": "1"})

    app = web.Application()
    app.cleanup_ctx.append(poller)
    app.router.add_route("*", path, handle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("bare", "naive", "keyed"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/webhooks/bt-wifi")
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--topic", default="bench.naive")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    if args.kind == "bare":
        app = bare_app(args.path)
    elif args.kind == "keyed":
        app = keyed_app(args.path, args.bootstrap, args.topic)
    else:
        app = naive_app(args.path, args.bootstrap, args.topic)
    loop = None
    if args.loop == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None, loop=loop)


if __name__ == "__main__":
    main()
