"""Prometheus metrics on a registry this object owns. Labels are bounded enums, never recipients."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from pgnotify_worker import __version__

if TYPE_CHECKING:
    pass

# No `pgnotify_*_created` series: nobody graphs them and they double the counters' series count.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Sends: 1 ms .. 60 s; end to end: 1 ms .. 1 h (retries make it long).
SEND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
E2E_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
    3600,
)
QUEUE_STATES = ("ready", "scheduled", "processing", "retrying", "dead", "failed", "held")
# Running workflow runs: due now, waiting for a delay, waiting for a send's notification to settle.
WORKFLOW_STATES = ("due", "delayed", "waiting_send")
# Why an inbox stream (GET /inbox/stream) ended, and why one was refused before it opened.
INBOX_CLOSE_REASONS = (
    "client_closed",  # the client went away (or its connection broke)
    "token_expired",  # its token ran out (an `expired` event, then the end)
    "user_limit",  # the user opened one more than PGNOTIFY_INBOX_MAX_STREAMS_PER_USER
    "server_stopping",  # SIGTERM: every stream ends at once
    "slow_client",  # it left STREAM_QUEUE events unread
)
INBOX_REFUSE_REASONS = (
    "process_limit",  # 429: PGNOTIFY_INBOX_MAX_STREAMS streams open already
    "unavailable",  # 503: the database did not answer the stream's first queries
    "server_stopping",  # 503: the process is shutting down
)


class Metrics:
    """Every metric of one worker process."""

    def __init__(self, worker_id: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        # process_* (CPU seconds, resident memory, open fds: /proc, Linux only), python_info and
        # python_gc_*: the standard collectors, registered in this registry, not the global one.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.info = Info("pgnotify_worker", "Version and identity of this worker.", registry=r)
        self.info.info({"version": __version__, "worker_id": worker_id})
        self.notifications = Counter(
            "pgnotify_notifications",
            "Delivery attempts by channel, provider and outcome "
            "(sent, retry, failed, dead, released, lost_lease).",
            ["channel", "provider", "outcome"],
            registry=r,
        )
        self.send_duration = Histogram(
            "pgnotify_send_duration_seconds",
            "Time from the start of a render to the provider's answer.",
            ["channel", "provider"],
            buckets=SEND_BUCKETS,
            registry=r,
        )
        self.end_to_end = Histogram(
            "pgnotify_end_to_end_latency_seconds",
            "Time from the notification's insert (database clock) to the provider accepting it.",
            ["channel"],
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "pgnotify_in_flight", "Sends under way, per channel.", ["channel"], registry=r
        )
        self.queue_depth = Gauge(
            "pgnotify_queue_depth",
            "Rows per channel and state: ready, scheduled, processing, retrying, dead, failed, "
            "held (for a digest).",
            ["channel", "state"],
            registry=r,
        )
        self.oldest_ready = Gauge(
            "pgnotify_queue_oldest_ready_seconds",
            "Age of the oldest ready row per channel (0 when none).",
            ["channel"],
            registry=r,
        )
        self.claimed = Counter(
            "pgnotify_claimed", "Rows claimed, per channel.", ["channel"], registry=r
        )
        self.claim_batch = Histogram(
            "pgnotify_claim_batch_size",
            "Rows per claim statement.",
            buckets=(0, 1, 2, 5, 10, 20, 50, 100, 200, 500),
            registry=r,
        )
        self.completion_batch = Histogram(
            "pgnotify_completion_batch_size",
            "Outcomes per write-back statement.",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
            registry=r,
        )
        self.leases_expired = Counter(
            "pgnotify_leases_expired",
            "Rows whose lease expired and were requeued (or dead), per channel.",
            ["channel"],
            registry=r,
        )
        self.listener_connected = Gauge(
            "pgnotify_listener_connected", "1 while the LISTEN connection is healthy.", registry=r
        )
        self.listener_reconnects = Counter(
            "pgnotify_listener_reconnects",
            "Times the LISTEN connection was re-established.",
            registry=r,
        )
        self.db_errors = Counter(
            "pgnotify_db_errors",
            "Database calls that failed, by operation.",
            ["operation"],
            registry=r,
        )
        self.ready = Gauge("pgnotify_ready", "1 when the worker reports ready.", registry=r)
        self.circuit_state = Gauge(
            "pgnotify_provider_circuit_state",
            "Circuit of each provider: 0 closed (sending), 1 half-open (probing), 2 open (paused).",
            ["provider"],
            registry=r,
        )
        self.job_runs = Counter(
            "pgnotify_job_runs",
            "Periodic job runs this worker made, by periodic_job and status (succeeded, failed).",
            ["periodic_job", "status"],
            registry=r,
        )
        self.job_failures = Gauge(
            "pgnotify_job_consecutive_failures",
            "Failed runs in a row of each periodic job (alert at 3).",
            ["periodic_job"],
            registry=r,
        )
        self.job_last_success = Gauge(
            "pgnotify_job_last_success_timestamp_seconds",
            "When each periodic job last succeeded in this worker (Unix time).",
            ["periodic_job"],
            registry=r,
        )
        self.failovers = Counter(
            "pgnotify_provider_failovers",
            "Sends that moved on to a later provider of the channel, by that provider.",
            ["channel", "provider"],
            registry=r,
        )
        self.channel_enabled = Gauge(
            "pgnotify_channel_enabled",
            "1 when this worker delivers the channel (0: no usable provider).",
            ["channel"],
            registry=r,
        )

        self.oldest_transaction = Gauge(
            "pgnotify_oldest_transaction_age_seconds",
            "Age of the oldest open transaction of another client session on this database "
            "(sessions of other roles count with pg_read_all_stats only; 0 when none).",
            registry=r,
        )
        self.oldest_xmin = Gauge(
            "pgnotify_oldest_xmin_age_transactions",
            "Transaction IDs assigned since the oldest snapshot another session on this database "
            "still holds (age(backend_xmin), every role's sessions; 0 when none).",
            registry=r,
        )
        self.dead_tuples = Gauge(
            "pgnotify_queue_dead_tuples",
            "Dead row versions per queue table (notifications, events), from pg_stat_user_tables.",
            ["table"],
            registry=r,
        )

        self.destinations_disabled = Gauge(
            "pgnotify_destinations_disabled",
            "Destinations (webhook endpoints, push services) disabled after failing for "
            "PGNOTIFY_DESTINATION_DISABLE_AFTER; their rows fail until re-enabled.",
            registry=r,
        )
        self.destination_circuits_open = Gauge(
            "pgnotify_destination_circuits_open",
            "Destinations this worker has paused after failures (open or half-open circuit).",
            registry=r,
        )

        # Workflows. No workflow label: names are the application's (up to 100 characters, as
        # many as it defines), so the series stay bounded; per workflow, ask
        # pgnotify.workflow_runs_view.
        self.workflow_runs_started = Counter(
            "pgnotify_workflow_runs_started",
            "Workflow runs whose first step this worker evaluated.",
            registry=r,
        )
        self.workflow_runs_finished = Counter(
            "pgnotify_workflow_runs_finished",
            "Workflow runs this worker ended, by outcome (completed, stopped: a stop step or a "
            "condition going to stop, cancelled: a cancel_if, failed). Runs cancelled by "
            "pgnotify.cancel_run() or a read inbox message end in the database, not here.",
            ["outcome"],
            registry=r,
        )
        self.workflow_steps = Counter(
            "pgnotify_workflow_steps",
            "Workflow steps this worker executed, by kind (send, delay, condition, stop) and "
            "outcome (created, unreachable, refused, waiting, true, false, stopped).",
            ["kind", "outcome"],
            registry=r,
        )
        self.workflow_runs_waiting = Gauge(
            "pgnotify_workflow_runs_waiting",
            "Running workflow runs by state: due (to be evaluated now), delayed (a delay step or "
            "a later start), waiting_send (a condition waits for a notification to settle).",
            ["state"],
            registry=r,
        )
        self.workflow_overdue = Gauge(
            "pgnotify_workflow_oldest_overdue_seconds",
            "How long the most overdue running workflow run has been due (0 when none): large "
            "when no runner evaluates runs.",
            registry=r,
        )
        self.batch_windows_open = Gauge(
            "pgnotify_batch_windows_open",
            "Batching windows open (pgnotify.batches not closed yet).",
            registry=r,
        )
        self.throttled = Counter(
            "pgnotify_throttled",
            "Sends over their category's throttle, by channel and action (drop, delay, batch).",
            ["channel", "action"],
            registry=r,
        )

        # The inbox feed (GET /inbox/stream). No user label: reasons are a fixed set; per user,
        # nothing (a user's streams are bounded by PGNOTIFY_INBOX_MAX_STREAMS_PER_USER).
        self.inbox_streams_open = Gauge(
            "pgnotify_inbox_streams_open",
            "Inbox event streams (GET /inbox/stream) open in this process.",
            registry=r,
        )
        self.inbox_streams_opened = Counter(
            "pgnotify_inbox_streams_opened",
            "Inbox event streams this process opened (answered 200 and started).",
            registry=r,
        )
        self.inbox_streams_closed = Counter(
            "pgnotify_inbox_streams_closed",
            "Inbox event streams that ended, by reason (client_closed, token_expired, user_limit: "
            "the user's oldest stream, closed for a new one, server_stopping, slow_client).",
            ["reason"],
            registry=r,
        )
        self.inbox_streams_refused = Counter(
            "pgnotify_inbox_streams_refused",
            "Inbox stream requests refused before they opened, by reason (process_limit: 429 "
            "at PGNOTIFY_INBOX_MAX_STREAMS, unavailable: 503 database, server_stopping: 503).",
            ["reason"],
            registry=r,
        )
        self.inbox_messages_pushed = Counter(
            "pgnotify_inbox_messages_pushed",
            "Inbox message events written to open streams (live and replayed; one per stream).",
            registry=r,
        )
        for reason in INBOX_CLOSE_REASONS:
            self.inbox_streams_closed.labels(reason)
        for reason in INBOX_REFUSE_REASONS:
            self.inbox_streams_refused.labels(reason)

    def destinations(self, disabled: int, paused: int) -> None:
        """The destination gauges (refreshed with the destinations table)."""
        self.destinations_disabled.set(disabled)
        self.destination_circuits_open.set(paused)

    def database(self, health: dict[str, Any]) -> None:
        """The gauges of what holds the queue back: the oldest open transaction (a pinned
        snapshot keeps every dead row) and the dead rows it keeps (refreshed with queue depth)."""
        if health.get("age_seconds") is not None:
            self.oldest_transaction.set(health["age_seconds"])
        if health.get("xmin_age") is not None:
            self.oldest_xmin.set(health["xmin_age"])
        for table, dead in health.get("dead_tuples", {}).items():
            self.dead_tuples.labels(table).set(dead)

    def child(self, metric: Any, *labels: str) -> Any:
        """metric.labels(*labels), cached: the lookup is measurable on the hot path."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)

    # --- what the delivery loop reports (ports.DeliveryMetrics) ---------------------------------

    def db_error(self, operation: str) -> None:
        """A database call of the loop failed."""
        self.db_errors.labels(operation).inc()

    def claimed_rows(self, channel: str, count: int) -> None:
        """One claim returned `count` rows."""
        self.claim_batch.observe(count)
        if count:
            self.claimed.labels(channel).inc(count)

    def in_flight_delta(self, channel: str, delta: int) -> None:
        """A send started (+1) or ended (-1)."""
        self.child(self.in_flight, channel).inc(delta)

    def written(self, size: int) -> None:
        """One batched write-back of `size` outcomes."""
        self.completion_batch.observe(size)

    def outcome(self, channel: str, provider: str, outcome: str, e2e: float | None) -> None:
        """An attempt's outcome was written (or lost: outcome lost_lease / released)."""
        self.child(self.notifications, channel, provider, outcome).inc()
        if e2e is not None:
            self.child(self.end_to_end, channel).observe(e2e)

    def released(self, channel: str, count: int) -> None:
        """Unfinished claims handed back at shutdown."""
        self.notifications.labels(channel, "none", "released").inc(count)

    def lease_expired(self, channel: str, count: int) -> None:
        """The reaper requeued or killed rows whose lease ran out."""
        self.leases_expired.labels(channel).inc(count)

    def queue(self, rows: list[dict[str, Any]]) -> None:
        """Refresh the queue gauges from the queue_status view."""
        for row in rows:
            for state in QUEUE_STATES:
                self.queue_depth.labels(row["channel"], state).set(row[state])
            self.oldest_ready.labels(row["channel"]).set(row["oldest_ready_seconds"])

    def workflows(self, status: dict[str, Any]) -> None:
        """Refresh the workflow gauges from the workflow_status query (with the queue's)."""
        for state in WORKFLOW_STATES:
            self.workflow_runs_waiting.labels(state).set(status[state])
        self.workflow_overdue.set(status["oldest_overdue_seconds"])
        self.batch_windows_open.set(status["batch_windows_open"])

    def workflow_counts(self) -> dict[str, Any]:
        """This worker's workflow and throttle counters, for /status."""

        def totals(metric: Any, *labels: str) -> dict[str, int]:
            return {
                "/".join(sample.labels[label] for label in labels): int(sample.value)
                for family in metric.collect()
                for sample in family.samples
                if sample.name.endswith("_total")
            }

        return {
            "runs_started": totals(self.workflow_runs_started).get("", 0),
            "runs_finished": totals(self.workflow_runs_finished, "outcome"),
            "steps": totals(self.workflow_steps, "kind", "outcome"),
            "throttled": totals(self.throttled, "channel", "action"),
        }

    def throttle(self, channel: str, action: str) -> None:
        """A send went over its category's throttle: dropped, delayed or batched."""
        self.child(self.throttled, channel, action).inc()

    # --- what the workflow runner reports (ports.WorkflowMetrics) -------------------------------

    def workflow_run_started(self) -> None:
        """A run's first evaluation committed."""
        self.workflow_runs_started.inc()

    def workflow_run_finished(self, outcome: str) -> None:
        """A run this worker ended: completed, stopped, cancelled or failed."""
        self.child(self.workflow_runs_finished, outcome).inc()

    def workflow_step(self, kind: str, outcome: str) -> None:
        """A step recorded (committed) by this worker."""
        self.child(self.workflow_steps, kind, outcome).inc()

    # --- what the inbox feed reports (ports.InboxMetrics) --------------------------------------

    def inbox_stream_opened(self) -> None:
        """A stream answered 200 and started."""
        self.inbox_streams_opened.inc()
        self.inbox_streams_open.inc()

    def inbox_stream_closed(self, reason: str) -> None:
        """An opened stream ended (once per opened stream)."""
        self.child(self.inbox_streams_closed, reason).inc()
        self.inbox_streams_open.dec()

    def inbox_stream_refused(self, reason: str) -> None:
        """A stream request was refused before it opened."""
        self.child(self.inbox_streams_refused, reason).inc()

    def inbox_messages(self, count: int) -> None:
        """`count` message events were written to one stream."""
        self.inbox_messages_pushed.inc(count)
