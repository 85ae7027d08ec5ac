"""`run --processes N`: N full workers on one machine, one per core. Python runs one thread of
bytecode at a time, so one worker process uses one core at most; each child here is a complete
worker (its own pool, listener, HTTP server on port + i), exactly as N replicas would be. The
parent only starts them, forwards SIGTERM/SIGINT, and exits when they have: with the first
non-zero exit status, after stopping the others (a supervisor then restarts the whole set).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from types import FrameType

log = logging.getLogger(__name__)


def child_env(
    base: dict[str, str], index: int, http_port: int, worker_id: str | None
) -> dict[str, str]:
    """Child `index`'s environment: one process, its own HTTP port and worker name."""
    env = {**base, "PGNOTIFY_PROCESSES": "1"}
    if http_port:  # 0 = any free port, in every child
        env["PGNOTIFY_HTTP_PORT"] = str(http_port + index)
    if worker_id:  # unset: each child makes its own unique name (host-pid-random)
        env["PGNOTIFY_WORKER_ID"] = f"{worker_id}-{index}"
    return env


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the parent dies, even by SIGKILL, so no
    orphan worker keeps sending after its supervisor is gone."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def supervise(count: int, http_port: int, worker_id: str | None) -> int:
    """Start `count` workers and wait for them; returns the exit status for the parent."""
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "pgnotify_worker", "run"],
            env=child_env(dict(os.environ), i, http_port, worker_id),
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
        )
        for i in range(count)
    ]
    log.info(
        "started %s worker processes: %s",
        count,
        ", ".join(str(c.pid) for c in children),
        extra={"action": "processes_started", "count": count},
    )
    received: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)  # a second SIGTERM cuts in-flight sends, as alone

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        while any(c.poll() is None for c in children):
            for child in children:
                code = child.poll()
                if code not in (None, 0) and not received and status == 0:
                    status = code  # one died on its own: stop the others, exit with its status
                    log.error(
                        "worker process %s exited with %s: stopping the others",
                        child.pid,
                        code,
                        extra={"action": "process_exited", "count": count},
                    )
                    for other in children:
                        if other.poll() is None:
                            other.terminate()
            time.sleep(0.1)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    codes = [c.returncode for c in children]
    if status == 0:
        status = next((code for code in codes if code not in (0, -signal.SIGTERM)), 0)
    return status
