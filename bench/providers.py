"""Provider clients at full speed against their local fakes, beside a bare aiohttp POST of the same
request to the same fake: requests/s, latency, and what the client adds. Not a test.

    python -m bench.providers            # a few thousand requests per provider
    python -m bench.providers --smoke    # a few hundred
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from bench.run import machine
from pgnotify_worker.adapters.providers.fcm import FcmProvider
from pgnotify_worker.adapters.providers.resend import ResendProvider
from pgnotify_worker.adapters.providers.sendgrid import SendGridProvider
from pgnotify_worker.adapters.providers.twilio import TwilioProvider
from pgnotify_worker.adapters.providers.webhook import WebhookProvider
from pgnotify_worker.models import RenderedMessage, Sent
from tests.fakes.fcm import FakeFCM
from tests.fakes.resend import FakeResend
from tests.fakes.sendgrid import FakeSendGrid
from tests.fakes.twilio import FakeTwilio

SENDER = "Acme <no-reply@acme.test>"


async def ok(_request: web.Request) -> web.Response:
    return web.Response(status=204)


@dataclass
class Result:
    name: str
    requests: int
    per_second: float
    p50_ms: float
    p99_ms: float


def message(i: int, channel: str, recipient: str) -> RenderedMessage:
    return RenderedMessage(
        notification_id=i,
        idempotency_key=f"pgn_bench-{i}",
        channel=channel,
        recipient=recipient,
        subject="Your order shipped",
        text=f"Order {i} is on its way.",
        html=f"<p>Order {i} is on its way.</p>",
        data={"order": i},
    )


async def drive(count: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> Result:
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    async def lane() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            started = time.perf_counter()
            await one(i)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return Result(
        "",
        count,
        count / elapsed,
        1000 * statistics.median(latencies),
        1000 * latencies[int(0.99 * (len(latencies) - 1))],
    )


async def pair(
    name: str,
    count: int,
    concurrency: int,
    client: Callable[[int], Awaitable[None]],
    bare: Callable[[int], Awaitable[None]],
    rounds: int = 3,
) -> tuple[Result, Result]:
    """Medians of `rounds` rounds that alternate which side goes first (this machine drifts)."""
    await drive(min(200, count), concurrency, client)  # warm connections and caches
    await drive(min(200, count), concurrency, bare)
    ours_runs, bare_runs = [], []
    for i in range(rounds):
        order = ((client, ours_runs), (bare, bare_runs))
        for fn, into in order if i % 2 == 0 else reversed(order):
            into.append(await drive(count, concurrency, fn))

    def median(runs: list[Result], label: str) -> Result:
        return Result(
            label,
            runs[0].requests,
            statistics.median(r.per_second for r in runs),
            statistics.median(r.p50_ms for r in runs),
            statistics.median(r.p99_ms for r in runs),
        )

    return median(ours_runs, name), median(bare_runs, f"{name}: bare aiohttp POST")


async def expect_sent(outcome_awaitable: Awaitable[object]) -> None:
    outcome = await outcome_awaitable
    if not isinstance(outcome, Sent):
        raise RuntimeError(f"benchmark send failed: {outcome}")


async def run(count: int, concurrency: int) -> list[tuple[Result, Result]]:
    results = []
    async with aiohttp.ClientSession() as http:

        async def post(url: str, **kw: object) -> None:
            async with http.post(url, **kw) as response:  # type: ignore[arg-type]
                await response.read()
                if response.status >= 300:
                    raise RuntimeError(f"bare POST got {response.status}")

        async with FakeResend("re_bench") as fake:
            resend = ResendProvider("re_bench", SENDER, base_url=fake.url)
            await resend.start()
            results.append(
                await pair(
                    "resend",
                    count,
                    concurrency,
                    lambda i: expect_sent(resend.send(message(i, "email", "ada@example.com"))),
                    lambda i: post(
                        f"{fake.url}/emails",
                        data=json.dumps(resend.body(message(i, "email", "ada@example.com"))),
                        headers={
                            "Authorization": "Bearer re_bench",
                            "Content-Type": "application/json",
                            "Idempotency-Key": f"bare-{i}-{time.monotonic_ns()}",
                        },
                    ),
                )
            )
            await resend.close()

        async with FakeSendGrid("SG.bench") as fake:
            sendgrid = SendGridProvider("SG.bench", SENDER, base_url=fake.url)
            await sendgrid.start()
            results.append(
                await pair(
                    "sendgrid",
                    count,
                    concurrency,
                    lambda i: expect_sent(sendgrid.send(message(i, "email", "ada@example.com"))),
                    lambda i: post(
                        f"{fake.url}/v3/mail/send",
                        data=json.dumps(sendgrid.body(message(i, "email", "ada@example.com"))),
                        headers={
                            "Authorization": "Bearer SG.bench",
                            "Content-Type": "application/json",
                        },
                    ),
                )
            )
            await sendgrid.close()

        sid = "AC" + "0" * 32
        async with FakeTwilio(sid, "bench-token") as fake:
            twilio = TwilioProvider(sid, "bench-token", sender="+14155550100", base_url=fake.url)
            await twilio.start()
            basic = "Basic " + base64.b64encode(f"{sid}:bench-token".encode()).decode()
            results.append(
                await pair(
                    "twilio",
                    count,
                    concurrency,
                    lambda i: expect_sent(twilio.send(message(i, "sms", "+14155550123"))),
                    lambda i: post(
                        twilio.url,
                        data={"To": "+14155550123", "From": "+14155550100", "Body": f"Order {i}"},
                        headers={"Authorization": basic},
                    ),
                )
            )
            await twilio.close()

        fake_fcm = await FakeFCM.start_with_service_account("bench-project")
        try:
            fcm = FcmProvider(json.dumps(fake_fcm.service_account), base_url=fake_fcm.url)
            await fcm.start()
            token = await fcm.tokens.get(fcm.session)
            results.append(
                await pair(
                    "fcm",
                    count,
                    concurrency,
                    lambda i: expect_sent(fcm.send(message(i, "push", f"device-token-{i}"))),
                    lambda i: post(
                        fcm.url,
                        data=json.dumps(fcm.body(message(i, "push", f"device-token-{i}"))),
                        headers={
                            "Authorization": f"Bearer {token}",
                            "Content-Type": "application/json",
                        },
                    ),
                )
            )
            await fcm.close()
        finally:
            await fake_fcm.stop()

        receiver = web.Application()
        receiver.router.add_post("/hook", ok)
        runner = web.AppRunner(receiver, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        url = f"http://127.0.0.1:{port}/hook"
        try:
            secret = "whsec_" + base64.b64encode(b"bench-secret-0123456789abcdef").decode()
            webhook = WebhookProvider(secret, allowed_networks=["127.0.0.0/8"])
            await webhook.start()
            body = webhook.build(message(0, "webhook", url), 0)[0]
            results.append(
                await pair(
                    "webhook (signing, SSRF guard)",
                    count,
                    concurrency,
                    lambda i: expect_sent(webhook.send(message(i, "webhook", url))),
                    lambda i: post(url, data=body, headers={"Content-Type": "application/json"}),
                )
            )
            await webhook.close()
        finally:
            await runner.cleanup()
    return results


def report(results: list[tuple[Result, Result]], concurrency: int) -> str:
    lines = ["## Provider clients against their local fakes", ""]
    lines += [f"- {k}: {v}" for k, v in machine().items()]
    lines += [
        f"- {concurrency} requests in flight; fake and client in one process (the fake's own cost "
        "is the same on both lines of a pair); medians of 3 rounds alternating which side goes first",
        "",
        "| client | requests | req/s | p50 ms | p99 ms | bare aiohttp req/s | bare p50 ms | added p50 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ours, bare in results:
        lines.append(
            f"| {ours.name} | {ours.requests} | {ours.per_second:,.0f} | {ours.p50_ms:.2f} | "
            f"{ours.p99_ms:.2f} | {bare.per_second:,.0f} | {bare.p50_ms:.2f} | "
            f"{ours.p50_ms - bare.p50_ms:+.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()
    count = 300 if args.smoke else args.count
    print(report(asyncio.run(run(count, args.concurrency)), args.concurrency))


if __name__ == "__main__":
    main()
