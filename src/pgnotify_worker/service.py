"""Composition root: builds everything from Settings inside one AsyncExitStack and runs it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import asyncpg

from pgnotify_worker import __version__
from pgnotify_worker.adapters import db, http_server, migrate, queries
from pgnotify_worker.adapters.console import console_from_settings
from pgnotify_worker.adapters.inbound import Inbound
from pgnotify_worker.adapters.inbox_http import inbox_routes
from pgnotify_worker.adapters.jobs import JobRunner
from pgnotify_worker.adapters.listener import Listener
from pgnotify_worker.adapters.metrics import WORKFLOW_STATES, Metrics
from pgnotify_worker.adapters.preferences_http import PreferenceCentre
from pgnotify_worker.adapters.providers.spec import reveal
from pgnotify_worker.adapters.registry import build_providers, inbound_endpoints, share_limits
from pgnotify_worker.adapters.unsubscribe_http import UnsubscribePages
from pgnotify_worker.adapters.workflow_runner import WorkflowRunner
from pgnotify_worker.config import Settings
from pgnotify_worker.core import preference_links
from pgnotify_worker.core.backoff import Backoff
from pgnotify_worker.core.circuit import CircuitState
from pgnotify_worker.core.redact import Scrubber
from pgnotify_worker.core.retry import RetryPolicy
from pgnotify_worker.core.templates import Renderer
from pgnotify_worker.core.unsubscribe import make_token
from pgnotify_worker.delivery.batch import BatchSender, BatchSettings
from pgnotify_worker.delivery.destinations import Destinations
from pgnotify_worker.delivery.dispatcher import Dispatcher
from pgnotify_worker.delivery.failover import ChannelProviders, Failover
from pgnotify_worker.delivery.limits import SharedLimits
from pgnotify_worker.delivery.templates import TemplateStore
from pgnotify_worker.delivery.worker import Health, Worker, WorkerSettings
from pgnotify_worker.errors import ConfigError
from pgnotify_worker.heap import trim_loop
from pgnotify_worker.models import ListenerState, Wake
from pgnotify_worker.tracing import Tracing

log = logging.getLogger(__name__)
JOB_STATUS_ERRORS: tuple[type[Exception], ...] = (*db.DB_ERRORS, TimeoutError)
MODES_INTERVAL = 30.0  # seconds between delivery-mode stamps (real providers) and floor reads
CIRCUIT_GAUGE = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}


class Service:
    """One worker process: HTTP server, pool, listener, providers and the delivery loop."""

    def __init__(self, settings: Settings, dsn: str, listen_dsn: str | None = None) -> None:
        assert settings.worker_id is not None
        self.settings = settings
        self.dsn = dsn
        self.listen_dsn = listen_dsn or dsn
        self.worker_id = settings.worker_id
        self.metrics = Metrics(self.worker_id)
        # built once: everything stored (via the QueueStore) and shown (/status, /readyz) goes
        # through it, so a provider's echo of our key or of a recipient never leaves the process
        self.scrubber = Scrubber(settings.secret_values(), settings.secret_pairs())
        self.health = Health(listen=settings.listen)
        self.started_at = time.time()
        self.http_port: int | None = None
        self.worker: Worker | None = None
        self.store: db.QueueStore | None = None
        self.providers: dict[str, ChannelProviders] = {}
        self.destinations: Destinations | None = None
        self.jobs: JobRunner | None = None
        self.ready = asyncio.Event()  # set once the worker claims (tests and the CLI wait on it)
        self.listening = asyncio.Event()  # set while the listener is connected and proven
        self._stop_requested = asyncio.Event()

    # --- lifecycle -----------------------------------------------------------------------------

    def stop(self, *, force: bool = False) -> None:
        """Graceful stop; force skips the grace period."""
        self._stop_requested.set()
        if self.worker is not None:
            self.worker.stop(force=force)

    def _install_signals(self) -> Callable[[], None]:
        loop = asyncio.get_running_loop()
        seen: list[int] = []

        def handle(signum: int) -> None:
            seen.append(signum)
            force = len(seen) > 1
            log.info(
                "received %s%s",
                signal.Signals(signum).name,
                " again: cutting in-flight sends now" if force else ": stopping gracefully",
                extra={"action": "signal"},
            )
            self.stop(force=force)

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, handle, signum)

        def remove() -> None:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

        return remove

    async def _connect(self) -> asyncpg.Pool | None:
        """Migrate (if set), check the schema version and open the pool; retry while the
        database is unreachable, fail at once on what retrying cannot fix (auth, no database)."""
        backoff = Backoff(0.5, 10.0)
        while not self._stop_requested.is_set():
            try:
                conn = await asyncpg.connect(
                    self.dsn,
                    timeout=self.settings.connect_timeout,
                    statement_cache_size=self.settings.statement_cache_size,
                )
                try:
                    if self.settings.migrate_on_start:
                        await migrate.migrate(conn)
                    await migrate.check_version(conn)
                finally:
                    await conn.close()
                return await db.create_pool(
                    self.dsn,
                    min_size=self.settings.pool_min_size,
                    max_size=self.settings.pool_max_size,
                    statement_cache_size=self.settings.statement_cache_size,
                    connect_timeout=self.settings.connect_timeout,
                    application_name=f"pgnotify-worker {self.worker_id}",
                )
            except (
                asyncpg.InvalidPasswordError,
                asyncpg.InvalidAuthorizationSpecificationError,
                asyncpg.InvalidCatalogNameError,
            ) as exc:
                raise ConfigError(f"cannot use the database: {exc}") from None
            except db.DB_UNAVAILABLE as exc:
                self.health.db_ok = False
                self.health.db_error = f"{type(exc).__name__}: {exc}"[:300]
                delay = backoff.next()
                log.warning(
                    "cannot reach the database (%s); retrying in %.1fs",
                    self.health.db_error,
                    delay,
                    extra={"action": "db_connect_failed"},
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_requested.wait(), delay)
        return None  # stopped before the database came up

    async def run(self, *, install_signals: bool = True) -> None:
        """Run until stopped (SIGTERM/SIGINT or stop())."""
        s = self.settings
        async with AsyncExitStack() as stack:
            if install_signals:
                stack.callback(self._install_signals())
            inbound = Inbound(
                lambda: self.store,
                inbound_endpoints(s),
                public_base_url=s.public_base_url,
                sms_region=s.sms_default_region,
            )
            unsubscribe_key = (
                s.unsubscribe_secret.get_secret_value().encode() if s.unsubscribe_secret else None
            )
            pages = UnsubscribePages(lambda: self.store, unsubscribe_key)
            inbox = inbox_routes(
                s.app_token_secret.get_secret_value().encode() if s.app_token_secret else None,
                self.listen_dsn,
                lambda: self.store.pool if self.store else None,
                max_lifetime=s.app_token_max_lifetime,
                audience=s.app_token_audience,
                cors_origins=s.app_cors_origins,
                connect_timeout=s.connect_timeout,
                max_streams=s.inbox_max_streams,
                max_streams_per_user=s.inbox_max_streams_per_user,
                metrics=self.metrics,
            )
            preferences = PreferenceCentre(
                lambda: self.store,
                unsubscribe_key,
                app_secret=s.app_token_secret.get_secret_value().encode()
                if s.app_token_secret
                else None,
                app_max_lifetime=s.app_token_max_lifetime,
                app_audience=s.app_token_audience,
                cors_origins=s.app_cors_origins,
            )
            console = console_from_settings(
                s,
                pool=lambda: self.store.pool if self.store else None,
                listen_dsn=self.listen_dsn,
                circuits=self._circuits,
                scrub=self.scrubber.clean,
            )
            app = http_server.make_app(
                self.status,
                self.ready_reasons,
                self.metrics.render,
                (inbound.routes, pages.routes, inbox, preferences.routes)
                + ((console.routes,) if console else ()),
                status_token=reveal(s.status_token),
            )
            try:
                runner, self.http_port = await http_server.start(app, s.http_host, s.http_port)
            except OSError as exc:
                raise ConfigError(
                    f"PGNOTIFY_HTTP_PORT: cannot listen on {s.http_host}:{s.http_port}: "
                    f"{exc.strerror}"
                ) from None
            stack.push_async_callback(runner.cleanup)
            log.info(
                "http server on %s:%s",
                s.http_host,
                self.http_port,
                extra={"action": "http_started"},
            )

            pool = await self._connect()
            if pool is None:
                return
            stack.push_async_callback(pool.close)
            self.health.db_ok = True
            self.health.db_error = None
            wake_tokens = s.listen and s.wake_tokens
            store = db.QueueStore(
                pool,
                self.worker_id,
                self.scrubber,
                token_dsn=self.listen_dsn if wake_tokens else None,  # a direct connection
            )
            stack.push_async_callback(store.close_wake_tokens)
            self.store = store

            self.providers = build_providers(s, store)
            for entry in self.providers.values():
                for slot in entry.slots:
                    await slot.provider.start()
                    stack.push_async_callback(slot.provider.close)
                    self.metrics.circuit_state.labels(slot.name).set(0)
                self.metrics.channel_enabled.labels(entry.channel).set(
                    0 if entry.disabled_reason else 1
                )
            await self._delivery_modes(store)

            templates = TemplateStore(store)
            metrics = self.metrics
            tracing = Tracing(enabled=s.tracing)
            self.destinations = Destinations(
                {channel: s.destination_cap(channel) for channel in self.providers},
                threshold=s.circuit_failure_threshold,
                open_seconds=s.circuit_open_seconds,
                max_open_seconds=s.retry_max_seconds,
                disable_after=s.destination_disable_after,
                store=store,
                on_refresh=metrics.destinations,
            )
            failover = Failover(
                self.providers,
                on_circuit=lambda p, b: metrics.circuit_state.labels(p).set(CIRCUIT_GAUGE[b.state]),
                on_failover=lambda c, p: metrics.child(metrics.failovers, c, p).inc(),
                destinations=self.destinations,
                limits=SharedLimits(store, await share_limits(self.providers, store)),
            )
            dispatcher = Dispatcher(
                failover,
                templates,
                Renderer(),
                RetryPolicy(base=s.retry_base_seconds, cap=s.retry_max_seconds),
                store=store,
                observe_send=lambda c, p, sec: metrics.child(metrics.send_duration, c, p).observe(
                    sec
                ),
                sms_region=s.sms_default_region,
                unsubscribe_url=self._unsubscribe_links(unsubscribe_key),
                preferences_url=self._preference_links(unsubscribe_key),
                tracing=tracing,
                on_throttled=metrics.throttle,
            )
            batcher = BatchSender(
                dispatcher,
                BatchSettings(
                    frozenset(s.batch_providers), dict(s.batch_size), retries=s.batch_retries
                ),
            )
            enabled = {
                channel: batcher.row_limit(channel, s.concurrency_for(channel))
                for channel, entry in self.providers.items()
                if not entry.disabled_reason
            }
            worker = Worker(
                store,
                dispatcher,
                templates,
                self.metrics,
                self.health,
                enabled,
                WorkerSettings(
                    lease_seconds=s.lease_seconds,
                    poll_interval=s.poll_interval,
                    reap_interval=s.reap_interval,
                    grace_period=s.grace_period,
                    queue_metrics_interval=s.queue_metrics_interval,
                    wake_tokens=wake_tokens,
                ),
                tracing,
                batcher,
            )
            self.worker = worker
            if self._stop_requested.is_set():
                worker.stop()

            destinations = self.destinations
            background = [
                lambda: destinations.watch(s.queue_metrics_interval),
                self._modes_loop,
                trim_loop,  # freed heap pages back to the OS: RSS stays flat under load
            ]
            flows = WorkflowRunner(
                pool,
                self.worker_id,
                s.workflow_poll_interval,
                s.workflow_recheck_interval,
                metrics=metrics,
            )
            if s.workflows:
                background.append(flows.run)

            def on_wake(wake: Wake) -> None:
                worker.on_wake(wake)
                flows.on_wake(wake)

            def on_connect() -> None:
                worker.on_listener_connect()
                flows.on_listener_connect()

            if s.listen:
                listener = Listener(
                    self.listen_dsn,
                    self.worker_id,
                    on_wake,
                    on_connect,
                    ping_interval=s.listener_ping_interval,
                    ping_timeout=min(5.0, max(1.0, 2 * s.listener_ping_interval)),
                    connect_timeout=s.connect_timeout,
                    on_state_change=self._listener_changed,
                    ping_via=lambda channel, token: pool.execute(queries.PING, channel, token),
                )
                self.health.listener = listener.state
                background.append(listener.run)
            else:
                log.info(
                    "LISTEN is off: polling every %.1fs",
                    s.poll_interval,
                    extra={"action": "poll_only"},
                )
            if s.jobs:
                self.jobs = JobRunner(
                    pool,
                    self.worker_id,
                    builtin_commands={
                        "digest_daily": queries.digest_job(
                            "daily", s.digest_hour, s.digest_weekday
                        ),
                        "digest_weekly": queries.digest_job(
                            "weekly", s.digest_hour, s.digest_weekday
                        ),
                    },
                    alert=self._alert,
                    on_finish=self._job_finished,
                    scrub=lambda text: self.scrubber.clean(text, limit=1000),
                )
                background.append(self.jobs.run)
            self.ready.set()
            log.info(
                "worker %s ready: channels %s",
                self.worker_id,
                ", ".join(f"{c}={n}" for c, n in enabled.items()) or "none",
                extra={"action": "ready"},
            )
            await worker.run(background)

    def _mode_channels(self) -> tuple[list[str], list[str]]:
        """(channels a real provider serves, channels only dev sinks serve)."""
        served = [e for e in (self.providers or {}).values() if e.slots]
        return [e.channel for e in served if not e.dev_only], [
            e.channel for e in served if e.dev_only
        ]

    async def _delivery_modes(self, store: db.QueueStore) -> None:
        """Record the channels a real provider serves; dev-sink channels leave the rows that were
        enqueued while one did (they wait for a real provider, never "sent" to a console)."""
        real, dev_only = self._mode_channels()
        try:
            await store.mark_real(real)
            await store.refresh_claim_floors(dev_only)
        except db.DB_ERRORS as exc:
            log.warning(
                "could not record the delivery mode: %s", exc, extra={"action": "modes_failed"}
            )
        for channel in dev_only:
            floor = store.claim_floor.get(channel)
            log.warning(
                "channel %s goes to a dev sink (%s): nothing leaves this machine%s",
                channel,
                ", ".join(slot.name for slot in (self.providers or {})[channel].slots),
                f"; rows enqueued up to {floor:%Y-%m-%d %H:%M:%S} UTC, when a real provider "
                "last served it, wait for a real provider"
                if floor
                else "",
                extra={"action": "dev_sink", "channel": channel},
            )

    async def _modes_loop(self) -> None:
        """Keep the delivery modes fresh (a real worker stamps its channels; a dev-sink worker
        follows the stamps of real workers beside it)."""
        while True:
            await asyncio.sleep(MODES_INTERVAL)
            store = self.store
            if store is None:
                continue
            real, dev_only = self._mode_channels()
            with contextlib.suppress(*db.DB_ERRORS):
                await store.mark_real(real)
                await store.refresh_claim_floors(dev_only)

    def _unsubscribe_links(self, key: bytes | None) -> Callable[[str, str | None], str] | None:
        """Links for templates and List-Unsubscribe: needs a key and the public base URL."""
        base = self.settings.public_base_url
        if key is None or not base:
            return None
        lifetime = self.settings.unsubscribe_link_days * 86_400

        def link(user_id: str, category: str | None) -> str:
            token = make_token(key, user_id, category, int(time.time()) + lifetime)
            return f"{base.rstrip('/')}/unsubscribe?token={token}"

        return link

    def _preference_links(self, key: bytes | None) -> Callable[[str], str] | None:
        """Preference-centre links for templates (preferences_url): the unsubscribe key's."""
        base = self.settings.public_base_url
        if key is None or not base:
            return None
        lifetime = self.settings.unsubscribe_link_days * 86_400

        def link(user_id: str) -> str:
            token = preference_links.make_token(key, user_id, int(time.time()) + lifetime)
            return f"{base.rstrip('/')}/preferences?token={token}"

        return link

    def _job_finished(self, job: str, status: str, streak: int) -> None:
        self.metrics.child(self.metrics.job_runs, job, status).inc()
        self.metrics.job_failures.labels(job).set(streak)
        if status == "succeeded":
            self.metrics.job_last_success.labels(job).set(time.time())

    async def _alert(self, job: str, streak: int, error: str | None) -> None:
        """A job failed `streak` runs in a row: tell the configured admins (critical category)."""
        targets = self.settings.alert_recipients
        if not targets or self.store is None:
            log.error(
                "job %s failed %s times in a row and no PGNOTIFY_ALERT_RECIPIENTS are set",
                job,
                streak,
                extra={"action": "job_alert_unsent"},
            )
            return
        subject = f"pgnotify job {job} failed {streak} times in a row"
        body = f"The periodic job {job} failed {streak} runs in a row. Last error: {error}"
        hour = int(time.time() // 3600)
        for target in targets:
            channel, _, address = target.partition(":")
            try:
                await self.store.enqueue(
                    channel,
                    address,
                    payload={"job": job, "consecutive_failures": streak, "error": error},
                    subject=subject,
                    body=body,
                    category="system_alert",
                    priority=10,
                    idempotency_key=f"job-alert:{job}:{hour}:{channel}:{address}",
                )
            except db.DB_ERRORS as exc:
                log.error(
                    "could not enqueue a job alert: %s", exc, extra={"action": "job_alert_failed"}
                )

    def _listener_changed(self, state: ListenerState) -> None:
        self.metrics.listener_connected.set(1 if state.connected else 0)
        if state.connected:
            self.listening.set()
        else:
            self.listening.clear()
        if state.connected and state.reconnects:
            self.metrics.listener_reconnects.inc()

    # --- HTTP callbacks --------------------------------------------------------------------------

    def _circuits(self) -> list[dict[str, Any]]:
        """Each provider's circuit in this worker, for the console's overview."""
        return [
            {
                "channel": channel,
                "provider": slot.name,
                "state": slot.breaker.state.value,
                "last_failure": self.scrubber.clean(slot.breaker.reason or "") or None,
            }
            for channel, entry in self.providers.items()
            for slot in entry.slots
        ]

    async def ready_reasons(self) -> list[str]:
        """Empty when ready."""
        reasons = self.health.reasons()
        if self.store is not None and not await self.store.alive():
            reasons.append("database does not answer")
        self.metrics.ready.set(0 if reasons else 1)
        return [self.scrubber.clean(reason) for reason in reasons]

    async def _jobs_status(self) -> list[dict[str, Any]] | dict[str, str]:
        if self.jobs is None:
            return {"enabled": "false"}
        try:
            return await asyncio.wait_for(self.jobs.status(), 5)
        except JOB_STATUS_ERRORS as exc:
            return {"error": type(exc).__name__}

    async def status(self) -> dict[str, Any]:
        """The /status document, scrubbed: circuits' last failures and database/listener errors
        are free text from providers and drivers."""
        document: dict[str, Any] = self.scrubber.tree(await self._status())
        return document

    async def _status(self) -> dict[str, Any]:
        worker = self.worker
        channels = {}
        for name, entry in self.providers.items():
            state = worker.channels.get(name) if worker else None
            channels[name] = {
                "enabled": entry.disabled_reason is None,
                "disabled_reason": entry.disabled_reason,
                "providers": [slot.name for slot in entry.slots],
                "circuits": {
                    slot.name: {
                        "state": slot.breaker.state.value,
                        "failures_in_a_row": slot.breaker.failures,
                        "last_failure": slot.breaker.reason,
                        "probe_in_seconds": round(slot.breaker.opens_in(time.monotonic()), 1),
                        "rate_per_second": slot.rate[0] if slot.rate else None,
                    }
                    for slot in entry.slots
                },
                "concurrency": self.settings.concurrency_for(name) if state else 0,
                "in_flight": state.in_flight if state else 0,
            }
        batching = {  # channels whose provider sends batch requests now (delivery/batch.py)
            name: {"batch_size": size, "rows_in_flight_limit": state.limit}
            for name, state in (worker.channels.items() if worker else ())
            if worker is not None
            and worker.batcher is not None
            and (size := worker.batcher.size(name)) > 1
        }
        queue: list[dict[str, Any]] | dict[str, str] = []
        if self.store is not None:
            try:
                queue = await asyncio.wait_for(self.store.queue_status(), 5)
            except db.DB_ERRORS as exc:
                queue = {"error": type(exc).__name__}
        limits: list[dict[str, Any]] | dict[str, str] = []
        if self.store is not None:
            try:  # shared by every replica: tokens now and a 429's pause
                limits = await asyncio.wait_for(self.store.provider_limits(), 5)
            except db.DB_ERRORS as exc:
                limits = {"error": type(exc).__name__}
        listener = self.health.listener
        return {
            "worker_id": self.worker_id,
            "version": __version__,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "ready": not self.health.reasons(),
            "not_ready_reasons": self.health.reasons(),
            "database": {"ok": self.health.db_ok, "last_error": self.health.db_error},
            "listener": (
                {
                    "enabled": True,
                    "connected": listener.connected,
                    "reconnects": listener.reconnects,
                    "last_ping_ms": listener.last_ping_ms,
                    "last_error": listener.last_error,
                }
                if listener is not None
                else {"enabled": False, "poll_interval": self.settings.poll_interval}
            ),
            "held_claims": len(worker.held) if worker else 0,
            "jobs": await self._jobs_status(),
            "channels": channels,
            "batching": batching,
            "destinations": self.destinations.describe() if self.destinations else {},
            "queue": queue,
            "rate_limits": limits,
            "workflows": await self._workflows_status(),
            "status_notify": await self._status_notify(),
        }

    async def _status_notify(self) -> dict[str, Any]:
        """Whether this worker's status changes are announced by NOTIFY pgnotify_status (the
        database setting pgnotify.status_notify, schema 0027, as its sessions see it)."""
        if self.store is None:
            return {}
        try:
            return await asyncio.wait_for(self.store.status_notify(), 5)
        except JOB_STATUS_ERRORS as exc:
            return {"error": type(exc).__name__}

    async def _workflows_status(self) -> dict[str, Any]:
        """The workflow gauges (from the database, as /metrics has them) and this worker's
        counters."""
        section: dict[str, Any] = {"runner_enabled": self.settings.workflows}
        if self.store is not None:
            try:
                found = await asyncio.wait_for(self.store.workflow_status(), 5)
            except JOB_STATUS_ERRORS as exc:
                section["error"] = type(exc).__name__
            else:
                section["runs_waiting"] = {state: found[state] for state in WORKFLOW_STATES}
                section["oldest_overdue_seconds"] = round(found["oldest_overdue_seconds"], 1)
                section["batch_windows_open"] = found["batch_windows_open"]
        section["this_worker"] = self.metrics.workflow_counts()
        return section
