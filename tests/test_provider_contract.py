"""The contract every HTTP provider keeps, one table entry per provider.

Each provider is built as a user builds it: Settings pointing at a fake provider server, then
`build_providers(settings, store)`; the same checks run against each: a send is checked at the
fake and ends Sent with the provider's id, 5xx and timeouts are retryable, a 429 waits as long as
the provider's reset header says, a documented 4xx is permanent, retryable failures open the
circuit (throttling does not), and the configured secret never reaches a log or an outcome.

SMTP is not in the table: its reply codes mean the opposite of HTTP's (4xx transient, 5xx
permanent) and it has no rate-limit header, so three of the checks would not apply; its own tests
in test_providers.py cover success, timeouts, credentials and secrets. In-app and the dev sinks
make no network call.

Adding a provider = one `Contract` entry in CASES.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pgnotify_worker.adapters.db import QueueStore
from pgnotify_worker.adapters.registry import build_providers
from pgnotify_worker.config import Settings, load_settings
from pgnotify_worker.core.circuit import CircuitBreaker, CircuitState
from pgnotify_worker.core.webpush import b64u
from pgnotify_worker.delivery.destinations import Destinations
from pgnotify_worker.delivery.failover import ChannelProviders, ProviderSlot
from pgnotify_worker.models import Outcome, Permanent, RenderedMessage, Sent
from pgnotify_worker.ports import Provider
from tests.fakes.base import Recorded, bearer_token
from tests.fakes.fcm import FakeFCM, make_service_account
from tests.fakes.resend import FakeResend
from tests.fakes.sendgrid import FakeSendGrid
from tests.fakes.twilio import FakeTwilio, basic_credentials
from tests.fakes.webhook import FakeWebhookReceiver
from tests.fakes.webpush import FakePushService
from tests.support.providers import (
    FakeClock,
    assert_no_canary,
    assert_retryable,
    encodings,
    make_dispatcher,
    notification,
)

TIMEOUT = 0.3  # the providers' request timeout in these tests
SLOW = 2.0  # how long a stalled fake takes to answer
THRESHOLD = 3  # retryable failures in a row that open a circuit
OPEN_SECONDS = 30.0
CREATED = dt.datetime(2024, 5, 17, 9, 30, tzinfo=dt.UTC)

SENDER = "Acme <no-reply@acme.test>"
RESEND_KEY = "re_CANARY_contract_7f3a9b1c"
SENDGRID_KEY = "SG.CANARY_contract_5d2e8f0a.zz"
TWILIO_SID = "AC" + "5" * 32
TWILIO_TOKEN = "CANARY_twilio_contract_4b8e2d7f"
TWILIO_FROM = "+15005550006"
WEBHOOK_KEY = "whsec_" + base64.b64encode(b"CANARY-contract-webhook-key!!").decode()
VAPID_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_VAPID_KEY = ec.generate_private_key(ec.SECP256R1())

Fake = Any  # a tests.fakes server: FakeServer's requests / fail_next / slow_next, and its own


def pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def key_lines(pem_text: str) -> list[str]:
    """The base64 lines of a PEM key: any of them in a log is a leak."""
    return [line for line in pem_text.splitlines() if line and not line.startswith("-----")]


@dataclass(frozen=True, kw_only=True)
class Contract:
    """What differs between providers; the tests below are the same for all of them."""

    provider: str  # its name in PGNOTIFY_<CHANNEL>_PROVIDERS
    channel: str
    fake: Callable[[], AbstractAsyncContextManager[Fake]]  # a started fake server
    secret: Callable[[Fake], str]  # the credential the fake accepts
    wrong_secret: Callable[[Fake], str]  # a well-formed one the fake refuses
    settings: Callable[[Fake, str], dict[str, Any]]  # overrides aiming the provider at the fake
    recipient: Callable[[Fake], str]  # a valid address on the fake
    path: Callable[[Fake, str], str]  # the request path for that recipient
    authorized: Callable[[Fake, Recorded, str], bool]  # the request carries the secret's proof
    idempotency_key: Callable[[Recorded], str | None] | None  # None: the API has no place for it
    addressed_to: Callable[[Fake, Recorded], str]  # the recipient as the fake read it
    accepted: Callable[[Fake], list[Any]]  # what the fake accepted for delivery
    message_id: Callable[[Fake], str | None]  # the id the fake gave the accepted message
    rate_limit: Callable[[Fake, int], None]  # next send: 429, wait n s (the provider's header)
    rate_limited_code: str
    retry_after_slack: float = 0.0  # reset headers in whole epoch seconds lose up to this much
    reject: Callable[[Fake], None]  # next send: a 4xx with the provider's documented error body
    rejected_code: str
    canaries: Callable[[Fake, str], list[str]]  # must never show (evaluated after the sends)
    address: Callable[[str], str] = lambda recipient: recipient  # what addressed_to should be
    trust: Callable[[Fake, Provider], None] | None = None  # what Settings cannot say


# --- per-provider pieces ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def fcm_fake() -> AsyncIterator[FakeFCM]:
    fake = await FakeFCM.start_with_service_account("demo-project")
    try:
        yield fake
    finally:
        await fake.stop()


def fcm_secret(fake: FakeFCM) -> str:
    return json.dumps(fake.service_account)


def fcm_stranger(fake: FakeFCM) -> str:
    """A service account of the right e-mail whose key the project does not trust."""
    assert fake.service_account is not None
    stranger, _ = make_service_account(
        fake.token_uri, fake.project_id, client_email=fake.service_account["client_email"]
    )
    return json.dumps(stranger)


def webhook_signed(fake: FakeWebhookReceiver, request: Recorded, secret: str) -> bool:
    return secret == fake.secret and fake.verifies(request)


def vapid_key_of(request: Recorded) -> str:
    """The k= (public key) parameter of `Authorization: vapid t=..., k=...`."""
    scheme, _, rest = (request.header("authorization") or "").partition(" ")
    assert scheme.lower() == "vapid", request.header("authorization")
    params = dict(part.strip().split("=", 1) for part in rest.split(",") if "=" in part)
    return params.get("k", "")


def vapid_public(secret: str) -> str:
    key = serialization.load_pem_private_key(secret.encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    raw = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return b64u(raw)


def vapid_canaries(secret: str) -> list[str]:
    key = serialization.load_pem_private_key(secret.encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    raw = b64u(key.private_numbers().private_value.to_bytes(32, "big"))
    return [secret, raw, *key_lines(secret)]


def trust_push_service(fake: FakePushService, provider: Provider) -> None:
    """The fake push service is https with its own CA; no setting names a CA for Web Push."""
    assert hasattr(provider, "ssl_context"), "WebPushProvider no longer takes an ssl_context"
    provider.ssl_context = fake.ssl_context_for_clients()


CASES = [
    Contract(
        provider="resend",
        channel="email",
        fake=lambda: FakeResend(RESEND_KEY),
        secret=lambda fake: RESEND_KEY,
        wrong_secret=lambda fake: "re_CANARY_wrong_1c9b3a7f",
        settings=lambda fake, secret: {
            "resend_api_key": secret,
            "resend_base_url": fake.url,
            "email_from": SENDER,
        },
        recipient=lambda fake: "ada@example.com",
        path=lambda fake, recipient: "/emails",
        authorized=lambda fake, request, secret: bearer_token(request) == secret,
        idempotency_key=lambda request: request.header("idempotency-key"),
        addressed_to=lambda fake, request: request.json["to"][0],
        accepted=lambda fake: fake.sent,
        message_id=lambda fake: fake.sent_ids[0],
        rate_limit=lambda fake, seconds: fake.rate_limit_next(1, retry_after=seconds),
        rate_limited_code="resend_rate_limited",
        reject=lambda fake: fake.fail_next(1, status=400),  # name: validation_error
        rejected_code="resend_validation_error",
        canaries=lambda fake, secret: encodings("", secret),
    ),
    Contract(
        provider="sendgrid",
        channel="email",
        fake=lambda: FakeSendGrid(SENDGRID_KEY),
        secret=lambda fake: SENDGRID_KEY,
        wrong_secret=lambda fake: "SG.CANARY_wrong_0a8f2e5d.zz",
        settings=lambda fake, secret: {
            "sendgrid_api_key": secret,
            "sendgrid_base_url": fake.url,
            "email_from": SENDER,
        },
        recipient=lambda fake: "ada@example.com",
        path=lambda fake, recipient: "/v3/mail/send",
        authorized=lambda fake, request, secret: bearer_token(request) == secret,
        # no idempotency on SendGrid's side: the key travels in custom_args, for the events
        idempotency_key=lambda request: request.json["personalizations"][0]["custom_args"][
            "idempotency_key"
        ],
        addressed_to=lambda fake, request: request.json["personalizations"][0]["to"][0]["email"],
        accepted=lambda fake: fake.sent,
        message_id=lambda fake: fake.message_ids[0],
        rate_limit=lambda fake, seconds: fake.rate_limit_next(1, reset_in=seconds),
        rate_limited_code="http_429",
        retry_after_slack=2.0,  # X-RateLimit-Reset is an epoch in whole seconds
        reject=lambda fake: fake.fail_next(1, status=400),
        rejected_code="sendgrid_400",
        canaries=lambda fake, secret: encodings("", secret),
    ),
    Contract(
        provider="twilio",
        channel="sms",
        fake=lambda: FakeTwilio(TWILIO_SID, TWILIO_TOKEN),
        secret=lambda fake: TWILIO_TOKEN,
        wrong_secret=lambda fake: "CANARY_twilio_wrong_7d2e8b4f",
        settings=lambda fake, secret: {
            "twilio_account_sid": TWILIO_SID,
            "twilio_auth_token": secret,
            "twilio_from": TWILIO_FROM,
            "twilio_base_url": fake.url,
        },
        recipient=lambda fake: "+14155552671",
        path=lambda fake, recipient: fake.messages_path,
        authorized=lambda fake, request, secret: (
            basic_credentials(request.header("authorization")) == (TWILIO_SID, secret)
        ),
        idempotency_key=None,  # Twilio has no idempotency key for sends
        addressed_to=lambda fake, request: request.form["To"],
        accepted=lambda fake: fake.sent,
        message_id=lambda fake: fake.sent[0]["sid"],
        rate_limit=lambda fake, seconds: fake.fail_next(
            1, status=429, headers={"Retry-After": str(seconds)}
        ),
        rate_limited_code="twilio_20429",
        # 21617: body too long, a documented synchronous 400 that suppresses nothing
        reject=lambda fake: fake.fail_next(1, status=400, body=FakeTwilio.error(21617)),
        rejected_code="twilio_21617",
        canaries=lambda fake, secret: encodings(TWILIO_SID, secret),
    ),
    Contract(
        provider="fcm",
        channel="push",
        fake=fcm_fake,
        secret=fcm_secret,
        wrong_secret=fcm_stranger,
        settings=lambda fake, secret: {"fcm_service_account": secret, "fcm_base_url": fake.url},
        recipient=lambda fake: "device-token-1",
        path=lambda fake, recipient: fake.send_path,
        # the service-account key buys an access token at the fake's token endpoint
        authorized=lambda fake, request, secret: (
            secret == fcm_secret(fake) and bearer_token(request) in fake.issued
        ),
        idempotency_key=None,  # FCM v1 has no idempotency key
        addressed_to=lambda fake, request: request.json["message"]["token"],
        accepted=lambda fake: fake.sent,
        message_id=lambda fake: fake.names[0],
        rate_limit=lambda fake, seconds: fake.fcm_error_next(
            1, 429, "QUOTA_EXCEEDED", retry_after=seconds
        ),
        rate_limited_code="fcm_QUOTA_EXCEEDED",
        reject=lambda fake: fake.fail_next(1, status=400),  # INVALID_ARGUMENT
        rejected_code="fcm_INVALID_ARGUMENT",
        canaries=lambda fake, secret: [
            *key_lines(json.loads(secret)["private_key"]),
            *fake.issued,  # the access tokens the key bought are secrets too
        ],
    ),
    Contract(
        provider="webhook",
        channel="webhook",
        fake=lambda: FakeWebhookReceiver(WEBHOOK_KEY),
        secret=lambda fake: WEBHOOK_KEY,
        wrong_secret=lambda fake: (
            "whsec_" + base64.b64encode(b"CANARY-wrong-webhook-key!").decode()
        ),
        settings=lambda fake, secret: {"webhook_secret": secret},
        recipient=lambda fake: f"{fake.url}/hooks/contract",
        path=lambda fake, recipient: "/hooks/contract",
        authorized=webhook_signed,
        idempotency_key=lambda request: request.header("webhook-id"),
        addressed_to=lambda fake, request: f"{fake.url}{request.path}",
        accepted=lambda fake: fake.received,
        message_id=lambda fake: None,  # a receiver answers 2xx, no id
        rate_limit=lambda fake, seconds: fake.fail_next(
            1, status=429, headers={"Retry-After": str(seconds)}
        ),
        rate_limited_code="http_429",
        reject=lambda fake: fake.fail_next(1, status=400),
        rejected_code="http_400",
        canaries=lambda fake, secret: [secret, secret.removeprefix("whsec_")],
    ),
    Contract(
        provider="webpush",
        channel="push",
        fake=lambda: FakePushService(vapid_public=VAPID_KEY.public_key()),
        secret=lambda fake: pem(VAPID_KEY),
        wrong_secret=lambda fake: pem(OTHER_VAPID_KEY),
        settings=lambda fake, secret: {
            "webpush_vapid_private_key": secret,
            "webpush_subject": "mailto:ops@acme.test",
        },
        recipient=lambda fake: fake.browser().subscription(),
        path=lambda fake, recipient: urlsplit(json.loads(recipient)["endpoint"]).path,
        authorized=lambda fake, request, secret: vapid_key_of(request) == vapid_public(secret),
        idempotency_key=None,  # RFC 8030 has no idempotency key
        addressed_to=lambda fake, request: f"{fake.url}{request.path}",
        address=lambda recipient: json.loads(recipient)["endpoint"],
        accepted=lambda fake: fake.delivered,
        message_id=lambda fake: fake.locations[0],
        rate_limit=lambda fake, seconds: fake.fail_next(
            1, status=429, body="slow down", headers={"Retry-After": str(seconds)}
        ),
        rate_limited_code="http_429",
        reject=lambda fake: fake.fail_next(1, status=400),
        rejected_code="http_400",
        canaries=lambda fake, secret: vapid_canaries(secret),
        trust=trust_push_service,
    ),
]


# --- building providers the way the service does ------------------------------------------------


def settings_for(case: Contract, fake: Fake, secret: str, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "channels": case.channel,
        f"{case.channel}_providers": case.provider,
        "provider_timeout": TIMEOUT,
        "webhook_timeout": TIMEOUT,
        "webhook_allowed_networks": "127.0.0.0/8",  # the fakes listen on loopback
        "rate_limits": {case.provider: "1000/1000"},  # the account's limit is not under test
        "circuit_failure_threshold": THRESHOLD,
        "circuit_open_seconds": OPEN_SECONDS,
        **case.settings(fake, secret),
        **extra,
    }
    return load_settings(**values)


@dataclass
class Built:
    """The channels build_providers made, and the one provider slot under test."""

    channels: dict[str, ChannelProviders]
    slot: ProviderSlot

    @property
    def provider(self) -> Provider:
        return self.slot.provider


@contextlib.asynccontextmanager
async def built(
    case: Contract, fake: Fake, secret: str | None = None, **extra: Any
) -> AsyncIterator[Built]:
    """The provider from Settings through build_providers, started, closed at the end."""
    settings = settings_for(case, fake, case.secret(fake) if secret is None else secret, **extra)
    channels = build_providers(settings, cast(QueueStore, None))  # only in-app uses the store
    entry = channels[case.channel]
    assert entry.disabled_reason is None, entry.disabled_reason
    (slot,) = entry.slots
    assert slot.name == case.provider
    if case.trust is not None:
        case.trust(fake, slot.provider)
    await slot.provider.start()
    try:
        yield Built(channels, slot)
    finally:
        await slot.provider.close()


def rendered(case: Contract, recipient: str) -> RenderedMessage:
    """A message with its own idempotency key."""
    return RenderedMessage(
        notification_id=42,
        idempotency_key=f"pgn_{uuid.uuid4()}",
        channel=case.channel,
        recipient=recipient,
        subject="Your order shipped",
        text="Order 7 is on its way.",
        html="<p>Order <b>7</b> is on its way.</p>" if case.channel == "email" else None,
        data={"order": "7"},
        created_at=CREATED,
    )


@pytest.fixture(params=CASES, ids=[case.provider for case in CASES])
def case(request: pytest.FixtureRequest) -> Contract:
    return cast(Contract, request.param)


@pytest.fixture
async def fake(case: Contract) -> AsyncIterator[Fake]:
    async with case.fake() as server:
        yield server


@pytest.fixture
async def provider(case: Contract, fake: Fake) -> AsyncIterator[Provider]:
    async with built(case, fake) as b:
        yield b.provider


async def send(case: Contract, fake: Fake, provider: Provider) -> Outcome:
    return await provider.send(rendered(case, case.recipient(fake)))


# --- the contract -------------------------------------------------------------------------------


async def test_a_send_reaches_the_fake_once_and_ends_sent_with_its_id(
    case: Contract, fake: Fake, provider: Provider
) -> None:
    recipient = case.recipient(fake)
    message = rendered(case, recipient)
    outcome = await provider.send(message)

    (request,) = fake.requests
    (_,) = case.accepted(fake)
    assert (request.method, request.path) == ("POST", case.path(fake, recipient))
    assert case.authorized(fake, request, case.secret(fake)), request.headers
    assert (request.header("user-agent") or "").startswith("pgnotify-worker/")
    if case.idempotency_key is not None:
        assert case.idempotency_key(request) == message.idempotency_key
    assert case.addressed_to(fake, request) == case.address(recipient)
    assert outcome == Sent(case.message_id(fake))


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_a_5xx_answer_is_retryable(
    case: Contract, fake: Fake, provider: Provider, status: int
) -> None:
    fake.fail_next(1, status=status)
    assert_retryable(await send(case, fake, provider), f"http_{status}")
    assert case.accepted(fake) == []


async def test_a_429_is_throttled_for_as_long_as_the_reset_header_says(
    case: Contract, fake: Fake, provider: Provider
) -> None:
    case.rate_limit(fake, 7)
    outcome = assert_retryable(
        await send(case, fake, provider), case.rate_limited_code, throttled=True
    )
    assert outcome.retry_after is not None, outcome
    assert 7.0 - case.retry_after_slack <= outcome.retry_after <= 7.0


async def test_a_documented_4xx_is_permanent(
    case: Contract, fake: Fake, provider: Provider
) -> None:
    case.reject(fake)
    outcome = await send(case, fake, provider)
    assert isinstance(outcome, Permanent), outcome
    assert outcome.code == case.rejected_code
    assert (outcome.suppress, outcome.deactivate) == (None, False)  # nothing says the address died
    assert case.accepted(fake) == []


async def test_an_answer_slower_than_the_timeout_is_a_retryable_timeout(
    case: Contract, fake: Fake, provider: Provider
) -> None:
    fake.slow_next(1, SLOW)
    started_at = time.monotonic()
    assert_retryable(await send(case, fake, provider), "timeout")
    assert time.monotonic() - started_at < SLOW


async def test_retryable_failures_in_a_row_open_the_circuit(case: Contract, fake: Fake) -> None:
    """A provider sending to many hosts (webhook, webpush: it names a destination) opens that
    destination's circuit and never its own; a single-API provider opens its own."""
    clock = FakeClock()
    async with built(case, fake) as b:
        destinations = Destinations(
            {case.channel: 10}, threshold=THRESHOLD, open_seconds=OPEN_SECONDS, clock=clock
        )
        dispatcher = make_dispatcher(b.channels, clock, destinations=destinations)
        destination_of = getattr(b.slot.provider, "destination", None)
        key = destination_of(case.recipient(fake)) if destination_of else None

        def breaker() -> CircuitBreaker:
            return destinations.get(key).breaker if key else b.slot.breaker

        fake.fail_next(THRESHOLD, status=503)
        for attempt in range(1, THRESHOLD + 1):
            assert breaker().state is CircuitState.CLOSED, attempt
            outcome, name = await dispatcher.send_chain(
                case.channel, rendered(case, case.recipient(fake))
            )
            assert name == case.provider
            assert_retryable(outcome, "http_503")
        assert breaker().state is CircuitState.OPEN
        if key:
            assert b.slot.breaker.state is CircuitState.CLOSED  # the provider goes on for others

        # open: a send is not passed on, and says how long the pause lasts
        outcome, name = await dispatcher.send_chain(
            case.channel, rendered(case, case.recipient(fake))
        )
    if key:
        assert name == case.provider
        paused = assert_retryable(outcome, "destination_paused")
    else:
        assert name == "none"
        paused = assert_retryable(outcome, "circuit_open")
    assert paused.retry_after == OPEN_SECONDS and not paused.tried
    assert len(fake.requests) == THRESHOLD


async def test_throttled_answers_never_open_the_circuit(case: Contract, fake: Fake) -> None:
    async with built(case, fake) as b:
        dispatcher = make_dispatcher(b.channels, FakeClock())
        for _ in range(THRESHOLD + 1):
            case.rate_limit(fake, 1)
        for _ in range(THRESHOLD + 1):
            outcome, _ = await dispatcher.send_chain(
                case.channel, rendered(case, case.recipient(fake))
            )
            assert_retryable(outcome, case.rate_limited_code, throttled=True)
        assert b.slot.breaker.state is CircuitState.CLOSED
    assert len(fake.requests) == THRESHOLD + 1


@pytest.mark.parametrize("credential", ["accepted", "refused"])
async def test_the_secret_is_in_no_log_record_and_no_outcome(
    case: Contract, fake: Fake, caplog: pytest.LogCaptureFixture, credential: str
) -> None:
    """Every path (sent, 5xx, 4xx, 429, timeout, refused credentials) directly and through the
    Dispatcher on a last attempt (ERROR logs), with a circuit that opens on each failure."""
    caplog.set_level("DEBUG")
    secret = case.secret(fake) if credential == "accepted" else case.wrong_secret(fake)
    arrange: list[Callable[[], None]] = [lambda: None]  # as the fake answers by itself
    if credential == "accepted":
        arrange += [
            lambda: fake.fail_next(1, status=503),
            lambda: case.reject(fake),
            lambda: case.rate_limit(fake, 1),
            lambda: fake.slow_next(1, SLOW),
        ]
    shown: list[object] = []
    async with built(
        case, fake, secret, circuit_failure_threshold=1, circuit_open_seconds=0.001
    ) as b:
        dispatcher = make_dispatcher(b.channels)
        for step in arrange:
            step()
            shown.append(await send(case, fake, b.provider))
            step()
            delivery = await dispatcher.deliver(notification(case.channel, case.recipient(fake)))
            shown += [delivery, delivery.completion.error]
    if credential == "refused":
        assert not any(isinstance(item, Sent) for item in shown), shown
        assert case.accepted(fake) == []
    assert_no_canary(caplog, shown, case.canaries(fake, secret))
