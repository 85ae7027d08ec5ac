"""Settings: one pydantic-settings object, read once from PGNOTIFY_* environment variables."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from pgnotify_worker.core import netguard
from pgnotify_worker.core.ratelimit import parse_rate
from pgnotify_worker.errors import ConfigError
from pgnotify_worker.models import CHANNELS

ENV_PREFIX = "PGNOTIFY_"
# Providers that can batch, and the most messages their API takes in one request.
BATCH_LIMITS = {"resend": 100, "sendgrid": 1000, "inapp": 1000}


def _split(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _number_pairs(value: Any, key: str) -> Any:
    """'a=1, b=2' as {'a': 1, 'b': 2} (a mapping given as such passes through)."""
    if not isinstance(value, str):
        return value
    pairs: dict[str, int] = {}
    for item in _split(value):
        name, sep, number = item.partition("=")
        if not sep or not number.strip().isdigit():
            raise ValueError(f"{item!r} is not {key}=number")
        pairs[name.strip()] = int(number)
    return pairs


class CoreSettings(BaseSettings):
    """The settings every part shares; each provider module adds its own (see Settings below).
    The README table is generated from these descriptions."""

    # defer_build: only the composed Settings below is ever validated, so this class's own
    # validator (every shared field again) is never built; with the providers' settings
    # deferred too, 0.3-0.4 MB less resident (bench/results/memory.md).
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        validate_default=True,
        hide_input_in_errors=True,
        defer_build=True,
    )

    # --- database ---------------------------------------------------------------------------
    database_url: SecretStr | None = Field(
        None,
        description="PostgreSQL URL (postgresql://user:pass@host:5432/db). Unset: an embedded "
        "PostgreSQL is started under data_dir.",
    )
    listen_database_url: SecretStr | None = Field(
        None,
        description="Direct (not transaction-pooled) URL for the LISTEN connection; defaults to "
        "database_url. Set it when database_url goes through PgBouncer/Supavisor in transaction "
        "mode.",
    )
    listen: bool = Field(
        True, description="Wake on LISTEN/NOTIFY. false = poll-only (every poll_interval)."
    )
    wake_tokens: bool = Field(
        True,
        description="While busy on a channel, hold its wake token so producers' INSERTs skip the "
        "NOTIFY (docs/concepts.md). Needs listen; false = producers always notify.",
    )
    statement_cache_size: int = Field(
        100, ge=0, description="asyncpg prepared-statement cache; 0 behind a transaction pooler."
    )
    pool_min_size: int = Field(1, ge=0, description="Minimum pooled connections.")
    pool_max_size: int = Field(10, ge=1, description="Maximum pooled connections.")
    connect_timeout: float = Field(10.0, gt=0, description="Seconds to wait for a connection.")
    migrate_on_start: bool = Field(
        True, description="Apply pending schema migrations at start (under an advisory lock)."
    )

    # --- delivery ---------------------------------------------------------------------------
    worker_id: str | None = Field(
        None,
        description="Name in locked_by and events; default host-pid-random (unique per process).",
    )
    channels: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [str(c) for c in CHANNELS],
        description="Channels this replica serves, comma-separated.",
    )
    concurrency: int = Field(50, ge=1, le=10_000, description="In-flight sends per channel.")
    processes: int = Field(
        1,
        ge=1,
        le=256,
        description="Worker processes `run` starts (one per core; each a full worker with its "
        "own pool, HTTP port + i); the parent forwards SIGTERM. Needs PGNOTIFY_DATABASE_URL.",
    )
    channel_concurrency: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict, description="Per-channel override, e.g. webhook=200,email=20."
    )
    lease_seconds: float = Field(
        60.0, ge=1, description="Lease of a claimed row; extended while the send runs (heartbeat)."
    )
    poll_interval: float = Field(
        5.0, gt=0, description="Fallback poll when no NOTIFY arrives (and the poll-only period)."
    )
    reap_interval: float = Field(10.0, gt=0, description="How often expired leases are requeued.")
    grace_period: float = Field(
        25.0, ge=0, description="On SIGTERM, seconds in-flight sends may take before they are cut."
    )
    retry_base_seconds: float = Field(5.0, gt=0, description="Ceiling of the first retry delay.")
    retry_max_seconds: float = Field(3600.0, gt=0, description="Largest retry delay.")
    listener_ping_interval: float = Field(
        10.0, gt=0, description="Seconds between NOTIFY round trips that prove the listener works."
    )
    queue_metrics_interval: float = Field(
        15.0, gt=0, description="How often queue-depth gauges are refreshed from the database."
    )

    # --- providers --------------------------------------------------------------------------
    email_providers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Email providers in failover order: resend, sendgrid, smtp (console, file: "
        "dev sinks). None set: email rows wait and /status says why.",
    )
    sms_providers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="SMS providers in failover order: twilio (console, file: dev sinks). None "
        "set: SMS rows wait and /status says why.",
    )
    push_providers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Push providers: fcm, webpush (browser subscriptions) (console, file: dev "
        "sinks). None set: push rows wait and /status says why.",
    )
    webhook_providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["webhook"],
        description="Webhook providers: webhook, console, file.",
    )
    inapp_providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["inapp"], description="In-app providers: inapp, console, file."
    )
    webhook_allowed_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="CIDRs webhooks may reach although private/loopback, e.g. 10.0.0.0/8.",
    )
    webhook_proxy: SecretStr | None = Field(
        None,
        description="HTTP proxy URL (http://[user:pass@]host:port) for webhooks and Web Push, "
        "which otherwise go direct (they ignore HTTPS_PROXY). The SSRF guard then cannot see the "
        "address a target resolves to: the proxy must enforce egress rules (IP-literal targets "
        "are still refused).",
    )
    simulate: bool = Field(
        False,
        description="Route email, sms, push and webhook to the console dev sink (on by default in "
        "the embedded `make run`); in-app keeps writing pgnotify.inbox (it only touches the "
        "database).",
    )
    provider_timeout: float = Field(
        15.0, gt=0, description="Seconds an email/SMS/push provider request may take."
    )
    rate_limits: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="Per-provider requests per second and burst, e.g. resend=5/10,twilio=20, "
        "shared by all replicas (kept in PostgreSQL; give every replica the same value). "
        "Defaults: resend 5/s, sendgrid 100/s, smtp 10/s, twilio 50/s, fcm 500/s, webhook none.",
    )
    batch_providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["inapp"],
        description="Providers that send a claimed broadcast in batch requests: resend "
        "(POST /emails/batch), sendgrid (personalizations), inapp (one INSERT); empty = every "
        "notification its own request. See docs/batch-sends.md.",
    )
    batch_size: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict,
        description="Messages per batch request, e.g. resend=50,sendgrid=500. Defaults and most: "
        "resend 100, sendgrid 1000, inapp 1000.",
    )
    batch_retries: int = Field(
        2,
        ge=0,
        le=10,
        description="Times a batch request that failed as a whole (5xx, timeout) is sent again "
        "at once, unchanged (the same Idempotency-Key), before its rows are retried one by one.",
    )
    circuit_failure_threshold: int = Field(
        5, ge=1, description="Retryable failures in a row that open a provider's circuit."
    )
    circuit_open_seconds: float = Field(
        30.0, gt=0, description="How long an open circuit waits before one probe send."
    )
    destination_concurrency: int = Field(
        0,
        ge=0,
        description="Sends one destination (a webhook endpoint's origin, scheme://host:port) may "
        "have in flight; 0 = a quarter of its channel's concurrency (at least 1). A slow "
        "endpoint holds at most this many of the channel's slots.",
    )
    destination_disable_after: float = Field(
        259_200.0,
        gt=0,
        description="Seconds a destination may keep failing (no success in between) before it "
        "is disabled: its rows fail with destination_disabled until "
        "pgnotify.enable_destination(origin). Default 3 days.",
    )
    public_base_url: str | None = Field(
        None,
        description="This worker's public URL (https://notify.example.com): Twilio status "
        "callbacks are requested there and their signatures checked against it.",
    )

    # --- recipients, digests, jobs --------------------------------------------------------------
    unsubscribe_secret: SecretStr | None = Field(
        None,
        description="Key that signs unsubscribe links (32+ random characters). With "
        "public_base_url set, templates get unsubscribe_url and emails List-Unsubscribe.",
    )
    unsubscribe_link_days: int = Field(
        180, ge=1, description="How long an unsubscribe link stays valid, in days."
    )
    digest_hour: int = Field(8, ge=0, le=23, description="Local hour digests go out at.")
    digest_weekday: int = Field(
        1, ge=1, le=7, description="Day of the weekly digest (ISO: 1 = Monday ... 7 = Sunday)."
    )
    jobs: bool = Field(True, description="Run periodic jobs (pgnotify.jobs) in this replica.")
    workflows: bool = Field(
        True, description="Evaluate workflow runs (pgnotify.trigger) in this replica."
    )
    workflow_poll_interval: float = Field(
        5.0,
        gt=0,
        description="Longest wait between looks for due workflow runs (a trigger's NOTIFY and "
        "the earliest next_at wake it sooner).",
    )
    workflow_recheck_interval: float = Field(
        15.0,
        gt=0,
        description="How often a workflow condition on a notification still on its way (sent? "
        "failed?) looks again.",
    )
    tracing: bool = Field(
        True,
        description="OpenTelemetry spans per claim and per send (when the tracing extra is "
        "installed). With the SDK and OTLP exporter (otlp extra, the image), "
        "OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_TRACES_EXPORTER sends them (OTEL_* variables).",
    )
    alert_recipients: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Who hears of a job failing three runs in a row: channel:address pairs, "
        "e.g. email:ops@acme.com,webhook:https://hooks.acme.com/pgnotify.",
    )

    # --- email ---------------------------------------------------------------------------------
    email_from: str | None = Field(
        None, description="Sender of every email: 'Acme <no-reply@acme.com>' (required for email)."
    )

    # --- sms -----------------------------------------------------------------------------------
    sms_default_region: str = Field(
        "US", min_length=2, max_length=2, description="Region for numbers without +country code."
    )

    # --- HTTP, logs, embedded ----------------------------------------------------------------
    http_host: str = Field(
        "0.0.0.0",  # noqa: S104 - probes and Prometheus reach the pod from outside
        description="Address of /metrics, /healthz, /readyz, /status.",
    )
    http_port: int = Field(9090, ge=0, le=65535, description="Port of the HTTP server (0 = any).")
    status_token: SecretStr | None = Field(
        None,
        description="Bearer token for GET /status (Authorization: Bearer <token>). Unset: /status "
        "answers loopback clients only (kubectl port-forward/exec); /healthz, /readyz and "
        "/metrics stay open either way.",
    )
    # --- app-facing APIs (inbox feed, preference API) ----------------------------------------
    app_token_secret: SecretStr | None = Field(
        None,
        description="Key the app's backend signs user tokens with (HS256 JWT, sub = user id; 32+ "
        "random characters). Unset: the inbox and preference APIs answer 404.",
    )
    app_token_max_lifetime: int = Field(
        86_400,
        ge=60,
        description="Longest lifetime (exp - iat, seconds) of a user token the APIs accept.",
    )
    app_token_audience: str | None = Field(
        None, description="When set, user tokens must carry this aud claim."
    )
    app_cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins (https://app.example.com) whose pages may call the app-facing APIs "
        "from the browser (CORS). Empty: same-origin and server-to-server only.",
    )
    inbox_max_streams_per_user: int = Field(
        8,
        ge=1,
        le=1000,
        description="Open /inbox/stream connections one user may hold in this process; one more "
        "closes that user's oldest stream (a closed event, then the browser reconnects and "
        "replays), so the newest tab always gets a live feed.",
    )
    inbox_max_streams: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Open /inbox/stream connections this process serves in all; past it a new "
        "stream gets 429 with Retry-After (another replica may take it).",
    )
    # --- admin console (/console/) --------------------------------------------------------------
    console_admin_password: SecretStr | None = Field(
        None,
        description="Turns the admin console on at /console/: the admin login's password, plain "
        "or an argon2/bcrypt hash (pip install 'pgnotify-worker[console]'). Unset: no console.",
    )
    console_viewer_password: SecretStr | None = Field(
        None,
        description="Optional read-only console login (addresses masked, no actions): plain or "
        "an argon2/bcrypt hash.",
    )
    console_session_secret: SecretStr | None = Field(
        None,
        description="Mixed into the key that signs console session cookies (the same on every "
        "replica). Sessions also end when a console password changes.",
    )
    console_session_hours: float = Field(
        12.0, gt=0, le=720, description="Lifetime of a console login, in hours."
    )
    console_trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Networks of reverse proxies (10.0.0.0/8) whose X-Forwarded-For and "
        "X-Forwarded-Proto the console believes (client address for rate limits and the audit "
        "trail, HTTPS for Secure cookies). Empty: the TCP peer, and HTTPS never inferred.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level."
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="json lines, or text for humans."
    )
    data_dir: Path = Field(
        Path(".pgnotify"), description="Embedded PostgreSQL data and dev files (no database_url)."
    )

    @field_validator(
        "channels",
        "email_providers",
        "sms_providers",
        "push_providers",
        "webhook_providers",
        "inapp_providers",
        "webhook_allowed_networks",
        "alert_recipients",
        "app_cors_origins",
        "console_trusted_proxies",
        "batch_providers",
        mode="before",
    )
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return _split(value)

    @field_validator("app_cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        out = []
        for origin in value:
            parts = urlsplit(origin)
            if (
                parts.scheme not in ("http", "https")
                or not parts.hostname
                or parts.path not in ("", "/")
                or parts.query
                or parts.fragment
                or parts.username
            ):
                raise ValueError(
                    f"{origin!r} is not an origin: give scheme://host[:port], e.g. "
                    "https://app.example.com ('*' is not allowed: tokens are credentials)"
                )
            out.append(f"{parts.scheme}://{parts.netloc}".lower())
        return out

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("channels")
    @classmethod
    def _known_channels(cls, value: list[str]) -> list[str]:
        unknown = [c for c in value if c not in CHANNELS]
        if unknown:
            raise ValueError(
                f"unknown channel(s) {', '.join(unknown)}; known: {', '.join(CHANNELS)}"
            )
        return value

    @field_validator("rate_limits", mode="before")
    @classmethod
    def _parse_rates(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        pairs: dict[str, str] = {}
        for item in _split(value):
            name, sep, spec = item.partition("=")
            if not sep:
                raise ValueError(f"{item!r} is not provider=rate[/burst]")
            parse_rate(spec)  # raises ValueError naming the bad spec
            pairs[name.strip()] = spec.strip()
        return pairs

    @field_validator("channel_concurrency", mode="before")
    @classmethod
    def _parse_pairs(cls, value: Any) -> Any:
        return _number_pairs(value, "channel")

    @field_validator("channel_concurrency")
    @classmethod
    def _known_pairs(cls, value: dict[str, int]) -> dict[str, int]:
        for name, number in value.items():
            if name not in CHANNELS:
                raise ValueError(f"unknown channel {name!r}")
            if number < 1:
                raise ValueError(f"{name}: concurrency must be at least 1")
        return value

    @field_validator("batch_providers")
    @classmethod
    def _batching(cls, value: list[str]) -> list[str]:
        unknown = [p for p in value if p not in BATCH_LIMITS]
        if unknown:
            raise ValueError(
                f"{', '.join(unknown)} cannot batch; batching providers: {', '.join(BATCH_LIMITS)}"
            )
        return value

    @field_validator("batch_size", mode="before")
    @classmethod
    def _parse_sizes(cls, value: Any) -> Any:
        return _number_pairs(value, "provider")

    @field_validator("batch_size")
    @classmethod
    def _known_sizes(cls, value: dict[str, int]) -> dict[str, int]:
        for name, number in value.items():
            if name not in BATCH_LIMITS:
                raise ValueError(
                    f"{name!r} cannot batch; batching providers: {', '.join(BATCH_LIMITS)}"
                )
            if not 1 <= number <= BATCH_LIMITS[name]:
                raise ValueError(f"{name}: a batch holds 1 to {BATCH_LIMITS[name]} messages")
        return value

    @field_validator("alert_recipients")
    @classmethod
    def _alert_targets(cls, value: list[str]) -> list[str]:
        for item in value:
            channel, sep, address = item.partition(":")
            if not sep or channel not in CHANNELS or not address:
                raise ValueError(f"{item!r} is not channel:address (e.g. email:ops@acme.com)")
        return value

    @field_validator("webhook_allowed_networks", "console_trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        netguard.parse_networks(value)  # raises ValueError naming the bad entry
        return value

    @field_validator("webhook_proxy")
    @classmethod
    def _proxy_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None  # empty: not set (as in the example Secret)
        if not value.get_secret_value().startswith(("http://", "https://")):
            raise ValueError("must be an http:// (or https://) proxy URL")
        return value

    @field_validator("database_url", "listen_database_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(
            ("postgres://", "postgresql://")
        ):
            raise ValueError("must start with postgresql:// (or postgres://)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CoreSettings:
        if self.retry_max_seconds < self.retry_base_seconds:
            raise ValueError("retry_max_seconds must not be below retry_base_seconds")
        if self.pool_min_size > self.pool_max_size:
            raise ValueError("pool_min_size must not exceed pool_max_size")
        if self.inbox_max_streams_per_user > self.inbox_max_streams:
            raise ValueError("inbox_max_streams_per_user must not exceed inbox_max_streams")
        if self.worker_id is None:
            self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        return self

    # --- derived -----------------------------------------------------------------------------
    def concurrency_for(self, channel: str) -> int:
        """In-flight limit of one channel."""
        return self.channel_concurrency.get(channel, self.concurrency)

    def destination_cap(self, channel: str) -> int:
        """In-flight limit of one destination of a channel."""
        return self.destination_concurrency or max(1, self.concurrency_for(channel) // 4)

    def providers_for(self, channel: str) -> list[str]:
        """Provider names of one channel, in failover order. Simulating routes every channel that
        leaves the machine to the console; in-app writes only this database, so it stays real."""
        if self.simulate and channel != "inapp":
            return ["console"]
        providers: list[str] = getattr(self, f"{channel}_providers")
        return providers

    def secret_values(self) -> list[str]:
        """Every secret setting's value (each SecretStr field, so a provider's secrets are
        found without a list kept by hand), for log scrubbing."""
        values = []
        for name in type(self).model_fields:
            field = getattr(self, name)
            if isinstance(field, SecretStr):
                raw = field.get_secret_value()
                values.append(raw)
                parts = [part.strip() for part in raw.split(",") if part.strip()]
                values.extend(parts)
                # a Standard Webhooks secret is whsec_<base64 key>: the key alone leaks as much
                values.extend(p.removeprefix("whsec_") for p in parts if p.startswith("whsec_"))
                if "://" in raw and "@" in raw:  # the password inside a URL
                    userinfo = raw.split("://", 1)[1].split("@", 1)[0]
                    if ":" in userinfo:
                        values.append(userinfo.split(":", 1)[1])
        return sorted({v for v in values if v}, key=len, reverse=True)  # longest first

    def secret_pairs(self) -> list[tuple[str, str]]:
        """(user, secret) pairs that travel together as Basic credentials (base64 of
        user:secret), so scrubbing can remove that form too; each provider's settings say
        theirs (`basic_auth_pairs`: Twilio's SID and token, the SMTP user and password)."""
        from pgnotify_worker.adapters.providers.catalog import provider_specs  # noqa: PLC0415

        pairs: list[tuple[str, str]] = []
        for spec in provider_specs().values():
            found = getattr(spec.own(self), "basic_auth_pairs", None)
            if found is not None:
                pairs.extend(found())
        return pairs


def _compose() -> type[CoreSettings]:
    """CoreSettings plus every provider module's settings: one class, flat PGNOTIFY_* names."""
    from pgnotify_worker.adapters.providers.catalog import provider_specs  # noqa: PLC0415

    mixins: list[type[BaseModel]] = []
    for spec in provider_specs().values():
        if spec.settings not in mixins and spec.settings.model_fields:
            mixins.append(spec.settings)
    return type(
        "Settings",
        (CoreSettings, *reversed(mixins)),
        {"__module__": __name__, "__doc__": "Every setting of the worker."},
    )


if TYPE_CHECKING:
    Settings = CoreSettings
else:
    Settings = _compose()


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment; ConfigError with PGNOTIFY_ names when unusable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "settings"
            name = f"{ENV_PREFIX}{where.upper()}" if error["loc"] else where
            problems.append(f"{name}: {error['msg']}")
        raise ConfigError("unusable settings:\n  " + "\n  ".join(problems)) from None


def settings_table() -> str:
    """The README's settings table, generated from the field descriptions (the shared settings
    first, then each provider's)."""
    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    core = list(CoreSettings.model_fields)
    names = core + [n for n in Settings.model_fields if n not in core]
    for name in names:
        field = Settings.model_fields[name]
        if field.default_factory is not None:
            default: Any = field.default_factory()  # type: ignore[call-arg]
        else:
            default = field.default
        if isinstance(default, bool):
            default = str(default).lower()
        elif isinstance(default, list):
            default = ",".join(str(v) for v in default)
        elif isinstance(default, dict):
            default = ",".join(f"{k}={v}" for k, v in default.items())
        shown = "" if default in (None, "") else f"`{default}`"
        if name == "worker_id":
            shown = "host-pid-random"
        secret = " Secret." if "SecretStr" in str(field.annotation) else ""
        meaning = (field.description or "").replace("<", "&lt;")
        lines.append(f"| `{ENV_PREFIX}{name.upper()}` | {shown} | {meaning}{secret} |")
    return "\n".join(lines)


def write_readme_table(readme: Path) -> None:
    """Replace the table between the README's settings markers with the generated one."""
    text = readme.read_text()
    head, rest = text.split("<!-- settings:start", 1)
    marker, rest = rest.split("-->", 1)
    _, tail = rest.split("<!-- settings:end -->", 1)
    readme.write_text(
        f"{head}<!-- settings:start{marker}-->\n{settings_table()}\n<!-- settings:end -->{tail}"
    )


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--readme"]:
        write_readme_table(Path(sys.argv[2]))
    else:
        print(settings_table())  # noqa: T201 - the table, for docs
