"""Reference servers the bridge is measured against (run as their own processes).

``bare``: an aiohttp handler that reads the body and answers 200, nothing else: the ceiling.
``naive``: the listener most people write: one ``send_and_wait`` per request on an aiokafka
producer with default settings.
"""

from __future__ import annotations

import argparse

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("bare", "naive"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/webhooks/bt-wifi")
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--topic", default="bench.naive")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    if args.kind == "bare":
        app = bare_app(args.path)
    else:
        app = naive_app(args.path, args.bootstrap, args.topic)
    loop = None
    if args.loop == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None, loop=loop)


if __name__ == "__main__":
    main()
