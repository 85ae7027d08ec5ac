"""Web Push through a push service that verifies VAPID and decrypts as a browser does."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pgnotify_worker.adapters.providers.webpush import WebPushProvider
from pgnotify_worker.errors import ProviderConfigError
from pgnotify_worker.models import Permanent, RenderedMessage, Retryable, Sent
from tests.fakes.webpush import FakePushService


def message(recipient: str) -> RenderedMessage:
    return RenderedMessage(
        notification_id=7,
        idempotency_key="pgn_7",
        channel="push",
        recipient=recipient,
        subject="Order shipped",
        text="Order 7 is on its way",
        html=None,
        data={"order": 7},
    )


@pytest.fixture
async def vapid() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
async def service(vapid: ec.EllipticCurvePrivateKey) -> AsyncIterator[FakePushService]:
    async with FakePushService(vapid_public=vapid.public_key()) as fake:
        yield fake


@pytest.fixture
async def provider(
    vapid: ec.EllipticCurvePrivateKey, service: FakePushService
) -> AsyncIterator[WebPushProvider]:
    pem = vapid.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    provider = WebPushProvider(
        pem,
        "mailto:ops@example.com",
        allowed_networks=["127.0.0.0/8"],
        ssl_context=service.ssl_context_for_clients(),
    )
    await provider.start()
    yield provider
    await provider.close()


async def test_the_browser_receives_and_decrypts_the_message(
    provider: WebPushProvider, service: FakePushService
) -> None:
    browser = service.browser()
    outcome = await provider.send(message(browser.subscription()))
    assert isinstance(outcome, Sent) and outcome.provider_message_id.startswith(
        f"{service.url}/message/"
    )
    ((_, payload),) = service.delivered
    assert payload == {
        "title": "Order shipped",
        "body": "Order 7 is on its way",
        "data": {"order": 7},
    }
    (request,) = service.requests
    assert request.header("ttl") == "86400" and request.header("urgency") == "normal"


async def test_an_expired_subscription_fails_and_deactivates(
    provider: WebPushProvider, service: FakePushService
) -> None:
    browser = service.browser()
    service.expired.add(browser.endpoint.rsplit("/", 1)[1])
    outcome = await provider.send(message(browser.subscription()))
    assert isinstance(outcome, Permanent) and outcome.deactivate and outcome.code == "webpush_410"


async def test_a_wrong_vapid_key_pauses_the_provider(service: FakePushService) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    raw = other.private_numbers().private_value.to_bytes(32, "big")
    from pgnotify_worker.core.webpush import b64u

    provider = WebPushProvider(
        b64u(raw), "mailto:ops@example.com", allowed_networks=["127.0.0.0/8"],
        ssl_context=service.ssl_context_for_clients(),
    )  # fmt: skip
    await provider.start()
    try:
        outcome = await provider.send(message(service.browser().subscription()))
    finally:
        await provider.close()
    assert isinstance(outcome, Retryable) and outcome.trip and outcome.code == "webpush_403"


async def test_throttling_is_retried_after_the_service_says(
    provider: WebPushProvider, service: FakePushService
) -> None:
    service.fail_next(1, status=429, body="slow down", headers={"Retry-After": "30"})
    outcome = await provider.send(message(service.browser().subscription()))
    assert isinstance(outcome, Retryable) and outcome.throttled and outcome.retry_after == 30


async def test_a_broken_subscription_fails_without_a_request(
    provider: WebPushProvider, service: FakePushService
) -> None:
    outcome = await provider.send(message('{"endpoint": "https://x/y", "keys": {}}'))
    assert isinstance(outcome, Permanent) and outcome.deactivate
    assert service.requests == []


async def test_a_private_endpoint_is_refused_without_the_allow_list(
    service: FakePushService,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    from pgnotify_worker.core.webpush import b64u

    provider = WebPushProvider(
        b64u(key.private_numbers().private_value.to_bytes(32, "big")),
        "mailto:ops@example.com",
        ssl_context=service.ssl_context_for_clients(),
    )
    await provider.start()
    try:
        outcome = await provider.send(message(service.browser().subscription()))
    finally:
        await provider.close()
    assert not isinstance(outcome, Sent)
    assert service.requests == []


def test_missing_or_bad_settings_are_named() -> None:
    with pytest.raises(ProviderConfigError, match="PGNOTIFY_WEBPUSH_VAPID_PRIVATE_KEY"):
        WebPushProvider(None, "mailto:ops@example.com")
    with pytest.raises(ProviderConfigError, match="mailto: or https:"):
        WebPushProvider("AAAA", "ops@example.com")
    with pytest.raises(ProviderConfigError, match="P-256"):
        WebPushProvider(
            "-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----", "mailto:a@b.co"
        )


def test_routing_by_address_kind() -> None:
    from pgnotify_worker.adapters.providers.fcm import FcmProvider

    assert FcmProvider.handles(object(), "fcm-token:abc")  # type: ignore[arg-type]
    assert not FcmProvider.handles(object(), '{"endpoint": "https://x"}')  # type: ignore[arg-type]
    assert WebPushProvider.handles(object(), '{"endpoint": "https://x"}')  # type: ignore[arg-type]
    assert not WebPushProvider.handles(object(), "fcm-token:abc")  # type: ignore[arg-type]
