"""Worker processes for tests: `python -m pgnotify_worker run`, followed through its JSON logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from typing import Any


class WorkerProcess:
    """One worker subprocess; waits on log actions (ready, listener_connected) instead of sleeping."""

    def __init__(self, env: dict[str, str], module: str = "pgnotify_worker") -> None:
        self.env = {**os.environ, "PGNOTIFY_LOG_FORMAT": "json", **env}
        self.module = module  # what `python -m` runs (tests.support.module_probe wraps the CLI)
        self.proc: asyncio.subprocess.Process | None = None
        self.logs: list[dict[str, Any]] = []
        self.stdout: list[str] = []
        self._seen: asyncio.Condition = asyncio.Condition()
        self._readers: list[asyncio.Task[None]] = []

    async def start(self, *args: str) -> WorkerProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            self.module,
            *(args or ("run",)),
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(self.proc.stderr, parse=True)),
            asyncio.create_task(self._read(self.proc.stdout, parse=False)),
        ]
        return self

    async def _read(self, stream: asyncio.StreamReader, *, parse: bool) -> None:
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip("\n")
            if parse:
                try:
                    entry = json.loads(text)
                except ValueError:
                    entry = {"message": text, "action": "raw"}
                self.logs.append(entry)
            else:
                self.stdout.append(text)
            async with self._seen:
                self._seen.notify_all()

    def actions(self) -> list[str]:
        return [entry.get("action", "") for entry in self.logs]

    async def wait_action(self, action: str, timeout: float = 20.0) -> dict[str, Any]:
        """Until a log line with this action appears (or the process dies: then fail loudly)."""
        assert self.proc is not None
        async with asyncio.timeout(timeout), self._seen:
            while True:
                for entry in self.logs:
                    if entry.get("action") == action:
                        return entry
                if self.proc.returncode is not None:
                    raise AssertionError(f"worker exited {self.proc.returncode}: {self.logs[-5:]}")
                await self._seen.wait()

    async def ready(self, timeout: float = 20.0) -> WorkerProcess:
        await self.wait_action("ready", timeout)
        if self.env.get("PGNOTIFY_LISTEN", "true") != "false":
            await self.wait_action("listener_connected", timeout)
        return self

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            for reader in self._readers:
                await reader
        return code

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.kill()
            with contextlib.suppress(TimeoutError):
                await self.wait(10)
        for reader in self._readers:
            reader.cancel()
