"""FCM without a key file: access tokens from the GCE/GKE metadata server (Workload Identity),
against the fake FCM's metadata route (it insists on `Metadata-Flavor: Google`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from pgnotify_worker.adapters.providers.fcm import SPECS, FcmProvider
from pgnotify_worker.adapters.providers.google_auth import MetadataTokenSource
from pgnotify_worker.adapters.providers.spec import Context
from pgnotify_worker.config import Settings
from pgnotify_worker.errors import ProviderConfigError
from pgnotify_worker.models import Sent
from tests.fakes.base import Script, bearer_token
from tests.fakes.fcm import FakeFCM
from tests.fakes.proxy import FakeProxy
from tests.support.pgcluster import free_port
from tests.support.providers import assert_retryable
from tests.test_providers import push


@pytest.fixture
async def fake() -> AsyncIterator[FakeFCM]:
    fake = await FakeFCM.start_with_service_account("demo-project")
    try:
        yield fake
    finally:
        await fake.stop()


def metadata_provider(fake: FakeFCM, host: str | None = None) -> FcmProvider:
    return FcmProvider(
        None,
        credentials="metadata",
        project_id="demo-project",
        metadata_host=host or fake.metadata_host,
        base_url=fake.url,
    )


@pytest.fixture
async def fcm(fake: FakeFCM) -> AsyncIterator[FcmProvider]:
    provider = metadata_provider(fake)
    await provider.start()
    yield provider
    await provider.close()


async def test_fcm_sends_with_a_metadata_server_token_and_caches_it(
    fcm: FcmProvider, fake: FakeFCM
) -> None:
    assert isinstance(await fcm.send(push()), Sent)
    assert isinstance(await fcm.send(push("device-token-2")), Sent)
    (asked,) = fake.metadata_requests  # cached: one token for both sends
    assert asked.method == "GET" and asked.header("metadata-flavor") == "Google"
    assert fake.token_requests == []  # no JWT grant: there is no key
    first, second = fake.requests
    assert bearer_token(first) == bearer_token(second)
    assert (bearer_token(first) or "").startswith("ya29.metadata-")
    assert fcm.describe() == {"credentials": "metadata", "project_id": "demo-project"}


async def test_the_token_is_renewed_shortly_before_it_expires(
    fcm: FcmProvider, fake: FakeFCM
) -> None:
    now = [1_000_000.0]
    fcm.tokens.clock = lambda: now[0]
    fake.metadata_expires_in = 3599
    assert isinstance(await fcm.send(push()), Sent)
    now[0] += 3599 - 61  # still more than the margin left: cached
    assert isinstance(await fcm.send(push()), Sent)
    assert len(fake.metadata_requests) == 1
    now[0] += 2  # less than a minute left: renewed
    assert isinstance(await fcm.send(push()), Sent)
    assert len(fake.metadata_requests) == 2
    tokens = [bearer_token(r) for r in fake.requests]
    assert tokens[0] == tokens[1] != tokens[2]


async def test_a_token_fcm_refuses_is_renewed_once(fcm: FcmProvider, fake: FakeFCM) -> None:
    assert isinstance(await fcm.send(push()), Sent)
    fake.expire_tokens()
    assert isinstance(await fcm.send(push()), Sent)
    assert len(fake.metadata_requests) == 2


async def test_metadata_server_down_is_retryable_and_trips_the_circuit(fake: FakeFCM) -> None:
    provider = metadata_provider(fake, host=f"127.0.0.1:{free_port()}")  # nothing listens
    await provider.start()
    try:
        outcome = assert_retryable(await provider.send(push()), "fcm_token", trip=True)
    finally:
        await provider.close()
    assert "metadata server" in outcome.message and "unreachable" in outcome.message
    assert fake.requests == []


async def test_no_service_account_bound_trips_the_circuit(fcm: FcmProvider, fake: FakeFCM) -> None:
    fake._push(Script("respond", 1, status=404, body="Not Found"), fake.metadata_channel)
    outcome = assert_retryable(await fcm.send(push()), "fcm_token", trip=True)
    assert "404" in outcome.message
    assert fake.requests == []


async def test_a_metadata_server_error_retries_without_tripping(
    fcm: FcmProvider, fake: FakeFCM
) -> None:
    fake._push(Script("respond", 1, status=503, body="busy"), fake.metadata_channel)
    assert_retryable(await fcm.send(push()), "fcm_token")
    assert isinstance(await fcm.send(push()), Sent)


async def test_the_fake_metadata_server_insists_on_the_header(fake: FakeFCM) -> None:
    async with aiohttp.ClientSession() as http:
        url = f"http://{fake.metadata_host}{fake.metadata_token_path}"
        async with http.get(url) as answer:
            assert answer.status == 403
    source = MetadataTokenSource(fake.metadata_host)
    try:
        async with aiohttp.ClientSession() as http:
            assert (await source.get(http)).startswith("ya29.metadata-")
    finally:
        await source.close()


async def test_the_metadata_server_is_asked_directly_despite_an_egress_proxy(
    fake: FakeFCM, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with FakeProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("http_proxy", proxy.url)
        provider = metadata_provider(fake)
        await provider.start()
        try:
            assert isinstance(await provider.send(push()), Sent)
        finally:
            await provider.close()
    assert proxy.targets() == [f"{fake.url}/v1/projects/demo-project/messages:send"]
    assert len(fake.metadata_requests) == 1


def test_metadata_credentials_need_a_project_id() -> None:
    with pytest.raises(ProviderConfigError, match="PGNOTIFY_FCM_PROJECT_ID"):
        FcmProvider(None, credentials="metadata")
    with pytest.raises(ProviderConfigError, match="PGNOTIFY_FCM_CREDENTIALS=metadata"):
        FcmProvider(None)


async def test_the_settings_build_a_metadata_provider(fake: FakeFCM) -> None:
    settings = Settings(  # type: ignore[call-arg]
        fcm_credentials="metadata",
        fcm_project_id="demo-project",
        fcm_metadata_host=fake.metadata_host,
        fcm_base_url=fake.url,
    )
    (spec,) = SPECS
    provider = spec.create(settings, Context(settings, None))  # type: ignore[arg-type]
    await provider.start()
    try:
        assert isinstance(await provider.send(push()), Sent)
    finally:
        await provider.close()
    assert len(fake.metadata_requests) == 1
