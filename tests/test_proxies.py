"""Egress proxies: provider APIs (Resend, SendGrid, Twilio, FCM and its token endpoint) honour
HTTP(S)_PROXY/NO_PROXY; webhooks and Web Push (customer-chosen URLs) go direct through the SSRF
guard unless PGNOTIFY_WEBHOOK_PROXY names a proxy for them."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pgnotify_worker.adapters.providers.fcm import FcmProvider
from pgnotify_worker.adapters.providers.resend import ResendProvider
from pgnotify_worker.adapters.providers.webhook import WebhookProvider
from pgnotify_worker.adapters.providers.webpush import WebPushProvider
from pgnotify_worker.config import Settings
from pgnotify_worker.models import Permanent, Sent
from tests.fakes.fcm import FakeFCM
from tests.fakes.proxy import FakeProxy
from tests.fakes.resend import FakeResend
from tests.fakes.webpush import FakePushService
from tests.support.webhooks import WebhookSink
from tests.test_providers import RESEND_KEY, SENDER, fcm_account, message

SECRET = "whsec_" + base64.b64encode(b"k" * 24).decode()
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture
async def proxy() -> AsyncIterator[FakeProxy]:
    async with FakeProxy() as fake:
        yield fake


@pytest.fixture
def proxy_env(monkeypatch: pytest.MonkeyPatch, proxy: FakeProxy) -> FakeProxy:
    """HTTP_PROXY names the fake proxy and nothing bypasses it (the fakes are on 127.0.0.1)."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("http_proxy", proxy.url)
    return proxy


async def test_a_provider_api_call_goes_through_the_environment_proxy(
    proxy_env: FakeProxy,
) -> None:
    async with FakeResend(RESEND_KEY) as fake:
        provider = ResendProvider(RESEND_KEY, SENDER, base_url=fake.url)
        await provider.start()
        try:
            outcome = await provider.send(message())
        finally:
            await provider.close()
    assert isinstance(outcome, Sent)
    assert proxy_env.targets("POST") == [f"{fake.url}/emails"]
    assert len(fake.requests) == 1


async def test_no_proxy_bypasses_it(proxy_env: FakeProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    async with FakeResend(RESEND_KEY) as fake:
        provider = ResendProvider(RESEND_KEY, SENDER, base_url=fake.url)
        await provider.start()
        try:
            outcome = await provider.send(message())
        finally:
            await provider.close()
    assert isinstance(outcome, Sent)
    assert proxy_env.seen == []


async def test_fcm_and_its_token_endpoint_go_through_the_environment_proxy(
    proxy_env: FakeProxy,
) -> None:
    fake = await FakeFCM.start_with_service_account("demo-project")
    try:
        provider = FcmProvider(fcm_account(fake), base_url=fake.url)
        await provider.start()
        try:
            outcome = await provider.send(message("device-token-1", channel="push"))
        finally:
            await provider.close()
    finally:
        await fake.stop()
    assert isinstance(outcome, Sent)
    paths = [target.removeprefix(fake.url) for target in proxy_env.targets("POST")]
    assert paths == ["/token", "/v1/projects/demo-project/messages:send"]


async def webhook_send(sink: WebhookSink, **options: object) -> object:
    provider = WebhookProvider(SECRET, allowed_networks=["127.0.0.0/8"], **options)  # type: ignore[arg-type]
    await provider.start()
    try:
        return await provider.send(message(f"{sink.url}/hook", channel="webhook"))
    finally:
        await provider.close()


async def test_webhooks_ignore_the_environment_proxy(
    proxy_env: FakeProxy, webhook_sink: WebhookSink
) -> None:
    assert isinstance(await webhook_send(webhook_sink), Sent)
    assert proxy_env.seen == []
    assert len(webhook_sink.requests) == 1


async def test_webhooks_use_the_webhook_proxy_when_set(
    proxy: FakeProxy, webhook_sink: WebhookSink
) -> None:
    assert isinstance(await webhook_send(webhook_sink, proxy=proxy.url), Sent)
    assert proxy.targets("POST") == [f"{webhook_sink.url}/hook"]
    assert len(webhook_sink.requests) == 1


async def test_the_webhook_proxy_still_refuses_private_ip_literals(proxy: FakeProxy) -> None:
    provider = WebhookProvider(SECRET, proxy=proxy.url)  # no allowed networks
    await provider.start()
    try:
        outcome = await provider.send(message("http://127.0.0.1:9/hook", channel="webhook"))
    finally:
        await provider.close()
    assert isinstance(outcome, Permanent) and outcome.code == "target_refused"
    assert proxy.seen == []
    assert provider.proxy is not None  # it did go the proxy way: refused before any connection


def test_the_webhook_proxy_setting_is_a_secret_http_url() -> None:
    settings = Settings(webhook_proxy="http://user:pw@proxy.internal:3128")  # type: ignore[call-arg]
    assert settings.webhook_proxy is not None
    assert "pw" not in repr(settings.webhook_proxy)
    assert Settings(webhook_proxy="").webhook_proxy is None  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="proxy URL"):
        Settings(webhook_proxy="socks5://proxy.internal:1080")  # type: ignore[call-arg]


async def webpush_send(proxy: str | None = None) -> tuple[object, FakePushService]:
    vapid = ec.generate_private_key(ec.SECP256R1())
    pem = vapid.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    async with FakePushService(vapid_public=vapid.public_key()) as service:
        provider = WebPushProvider(
            pem,
            "mailto:ops@example.com",
            allowed_networks=["127.0.0.0/8"],
            ssl_context=service.ssl_context_for_clients(),
            proxy=proxy,
        )
        await provider.start()
        try:
            outcome = await provider.send(
                message(service.browser().subscription(), channel="push", html=None)
            )
        finally:
            await provider.close()
    return outcome, service


async def test_web_push_ignores_the_environment_proxy(
    proxy_env: FakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy_env.url)  # the push service is https
    monkeypatch.setenv("https_proxy", proxy_env.url)
    outcome, service = await webpush_send()
    assert isinstance(outcome, Sent)
    assert proxy_env.seen == [] and len(service.delivered) == 1


async def test_web_push_uses_the_webhook_proxy_when_set(proxy: FakeProxy) -> None:
    outcome, service = await webpush_send(proxy.url)
    assert isinstance(outcome, Sent)
    host = service.url.removeprefix("https://").split("/")[0]
    assert proxy.targets("CONNECT") == [host]  # TLS tunnelled through it
    assert len(service.delivered) == 1
