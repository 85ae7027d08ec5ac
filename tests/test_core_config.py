"""Settings from PGNOTIFY_* environment variables: defaults, parsing, errors that name the
variable and never echo a secret, and secrets kept out of repr."""

from __future__ import annotations

import base64
import os

import pytest

from pgnotify_worker.config import ENV_PREFIX, Settings, load_settings
from pgnotify_worker.errors import ConfigError
from pgnotify_worker.models import CHANNELS

DB_PASSWORD = "S3cretPassw0rd"
DB_URL = f"postgresql://app:{DB_PASSWORD}@db.internal:5432/app"
SECRET_1 = "whsec_" + base64.b64encode(b"first-secret-0123456789ab").decode()
SECRET_2 = "whsec_" + base64.b64encode(b"second-secret-0123456789a").decode()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PGNOTIFY_* variable of the machine running the tests leaks in."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    s = load_settings()
    assert isinstance(s, Settings)
    assert s.database_url is None
    assert s.listen_database_url is None
    assert s.channels == list(CHANNELS)
    assert s.concurrency == 50
    assert s.channel_concurrency == {}
    assert s.http_port == 9090
    assert s.log_level == "INFO"
    assert s.log_format == "json"
    assert s.listen is True
    assert s.retry_base_seconds == 5.0
    assert s.retry_max_seconds == 3600.0
    assert s.webhook_secret is None
    assert s.webhook_allowed_networks == []
    # no dev sink unless chosen: email, SMS and push have no provider until one is set
    assert s.providers_for("email") == []
    assert s.providers_for("sms") == []
    assert s.providers_for("push") == []
    assert s.providers_for("webhook") == ["webhook"]
    assert s.providers_for("inapp") == ["inapp"]
    assert s.worker_id
    assert (s.inbox_max_streams_per_user, s.inbox_max_streams) == (8, 10_000)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("email,webhook", ["email", "webhook"]),
        (" email , webhook , ", ["email", "webhook"]),
        ("sms", ["sms"]),
        ("email,sms,push,webhook,inapp", list(CHANNELS)),
    ],
)
def test_channels_from_env(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: list[str]
) -> None:
    monkeypatch.setenv("PGNOTIFY_CHANNELS", value)
    assert load_settings().channels == expected


def test_channel_concurrency_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGNOTIFY_CHANNEL_CONCURRENCY", "webhook=200,email=5")
    monkeypatch.setenv("PGNOTIFY_CONCURRENCY", "7")
    s = load_settings()
    assert s.channel_concurrency == {"webhook": 200, "email": 5}
    assert s.concurrency_for("webhook") == 200
    assert s.concurrency_for("email") == 5
    assert s.concurrency_for("sms") == 7  # the general limit


@pytest.mark.parametrize(
    ("env", "value", "attribute", "expected"),
    [
        ("PGNOTIFY_HTTP_PORT", "8080", "http_port", 8080),
        ("PGNOTIFY_LOG_LEVEL", "debug", "log_level", "DEBUG"),
        ("PGNOTIFY_LISTEN", "false", "listen", False),
        ("PGNOTIFY_WEBHOOK_PROVIDERS", "webhook, file", "webhook_providers", ["webhook", "file"]),
        (
            "PGNOTIFY_WEBHOOK_ALLOWED_NETWORKS",
            "127.0.0.0/8, 10.0.0.0/8",
            "webhook_allowed_networks",
            ["127.0.0.0/8", "10.0.0.0/8"],
        ),
        ("pgnotify_concurrency", "12", "concurrency", 12),  # names are case-insensitive
    ],
)
def test_env_values_are_parsed(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, attribute: str, expected: object
) -> None:
    monkeypatch.setenv(env, value)
    assert getattr(load_settings(), attribute) == expected


def test_database_url_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGNOTIFY_DATABASE_URL", DB_URL)
    s = load_settings()
    assert s.database_url is not None
    assert s.database_url.get_secret_value() == DB_URL


def test_overrides_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGNOTIFY_CONCURRENCY", "7")
    assert load_settings(concurrency=9).concurrency == 9


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("PGNOTIFY_HTTP_PORT", "abc"),
        ("PGNOTIFY_HTTP_PORT", "70000"),
        ("PGNOTIFY_CHANNELS", "fax"),
        ("PGNOTIFY_CHANNELS", "email,fax"),
        ("PGNOTIFY_CHANNEL_CONCURRENCY", "webhook"),
        ("PGNOTIFY_CHANNEL_CONCURRENCY", "webhook=lots"),
        ("PGNOTIFY_CHANNEL_CONCURRENCY", "fax=3"),
        ("PGNOTIFY_CHANNEL_CONCURRENCY", "webhook=0"),
        ("PGNOTIFY_WEBHOOK_ALLOWED_NETWORKS", "nonsense"),
        ("PGNOTIFY_DATABASE_URL", "mysql://x"),
        ("PGNOTIFY_LISTEN_DATABASE_URL", "redis://x"),
        ("PGNOTIFY_LOG_LEVEL", "chatty"),
        ("PGNOTIFY_CONCURRENCY", "0"),
        ("PGNOTIFY_LEASE_SECONDS", "-1"),
        ("PGNOTIFY_INBOX_MAX_STREAMS", "0"),
        ("PGNOTIFY_INBOX_MAX_STREAMS_PER_USER", "0"),
        ("PGNOTIFY_INBOX_MAX_STREAMS_PER_USER", "many"),
    ],
)
def test_bad_values_raise_config_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert env in str(info.value)


@pytest.mark.parametrize(
    ("env", "detail"),
    [
        ("PGNOTIFY_CHANNELS", "fax"),
        ("PGNOTIFY_CHANNEL_CONCURRENCY", "channel=number"),
        ("PGNOTIFY_WEBHOOK_ALLOWED_NETWORKS", "nonsense"),
        ("PGNOTIFY_DATABASE_URL", "postgresql://"),
    ],
)
def test_error_messages_say_what_is_wrong(
    monkeypatch: pytest.MonkeyPatch, env: str, detail: str
) -> None:
    values = {
        "PGNOTIFY_CHANNELS": "fax",
        "PGNOTIFY_CHANNEL_CONCURRENCY": "webhook",
        "PGNOTIFY_WEBHOOK_ALLOWED_NETWORKS": "nonsense",
        "PGNOTIFY_DATABASE_URL": "mysql://x",
    }
    monkeypatch.setenv(env, values[env])
    with pytest.raises(ConfigError, match=detail):
        load_settings()


@pytest.mark.parametrize(
    ("env", "value", "secret"),
    [
        ("PGNOTIFY_DATABASE_URL", f"mysql://app:{DB_PASSWORD}@db/app", DB_PASSWORD),
        ("PGNOTIFY_LISTEN_DATABASE_URL", f"mysql://app:{DB_PASSWORD}@db/app", DB_PASSWORD),
        ("PGNOTIFY_HTTP_PORT", "p4ssw0rd-in-wrong-var", "p4ssw0rd"),
        ("PGNOTIFY_LOG_LEVEL", "hunter2-oops", "hunter2"),
    ],
)
def test_error_messages_never_echo_the_input(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, secret: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert env in message
    assert secret not in message
    assert info.value.__cause__ is None  # the ValidationError (with inputs) is not chained


def test_several_problems_are_reported_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGNOTIFY_HTTP_PORT", "abc")
    monkeypatch.setenv("PGNOTIFY_CHANNELS", "fax")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "PGNOTIFY_HTTP_PORT" in str(info.value)
    assert "PGNOTIFY_CHANNELS" in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"retry_base_seconds": 10.0, "retry_max_seconds": 5.0}, "retry_max_seconds"),
        ({"pool_min_size": 5, "pool_max_size": 2}, "pool_min_size"),
        ({"inbox_max_streams": 4, "inbox_max_streams_per_user": 5}, "inbox_max_streams_per_user"),
    ],
)
def test_inconsistent_settings_are_refused(overrides: dict[str, float], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_settings(**overrides)


def test_secret_values_include_url_password_and_webhook_secret_parts() -> None:
    s = load_settings(database_url=DB_URL, webhook_secret=f"{SECRET_1}, {SECRET_2}")
    values = s.secret_values()
    assert DB_URL in values
    assert DB_PASSWORD in values
    assert SECRET_1 in values
    assert SECRET_2 in values
    assert all(values)


def test_secret_values_of_the_listen_url() -> None:
    listen = "postgres://listener:Li5tenPw99@db:5432/app"
    s = load_settings(database_url=DB_URL, listen_database_url=listen)
    assert "Li5tenPw99" in s.secret_values()
    assert DB_PASSWORD in s.secret_values()


def test_secret_values_empty_without_secrets() -> None:
    assert load_settings().secret_values() == []
    no_password = load_settings(database_url="postgresql://app@db/app")
    assert set(no_password.secret_values()) == {"postgresql://app@db/app"}


def test_repr_and_str_never_show_secrets() -> None:
    s = load_settings(database_url=DB_URL, webhook_secret=SECRET_1)
    for shown in (repr(s), str(s), f"{s}", repr(s.database_url), str(s.webhook_secret)):
        assert DB_PASSWORD not in shown
        assert SECRET_1 not in shown
        assert SECRET_1.removeprefix("whsec_") not in shown
    assert DB_PASSWORD not in s.model_dump_json()


def test_worker_id_default_is_unique_per_call() -> None:
    ids = {load_settings().worker_id for _ in range(20)}
    assert len(ids) == 20
    assert str(os.getpid()) in next(iter(ids))


def test_explicit_worker_id_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(worker_id="replica-1").worker_id == "replica-1"
    monkeypatch.setenv("PGNOTIFY_WORKER_ID", "replica-2")
    assert load_settings().worker_id == "replica-2"
