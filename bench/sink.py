"""A loopback webhook receiver for benchmarks: answers 200 at once, notes when each seq arrived.

Run: python -m bench.sink PORT. GET /stats returns {"count": n, "arrivals": {seq: monotonic}}.
"""

from __future__ import annotations

import json
import sys
import time

from aiohttp import web

arrivals: dict[int, float] = {}
count = 0


async def hook(request: web.Request) -> web.Response:
    global count
    body = await request.read()
    now = time.monotonic()
    count += 1
    try:
        seq = json.loads(body)["data"].get("seq")
    except (ValueError, KeyError, AttributeError):
        seq = None
    if seq is not None and seq not in arrivals:
        arrivals[seq] = now
    return web.Response(status=200)


async def stats(_request: web.Request) -> web.Response:
    return web.json_response({"count": count, "arrivals": arrivals})


async def reset(_request: web.Request) -> web.Response:
    global count
    arrivals.clear()
    count = 0
    return web.Response(status=204)


def main() -> None:
    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
