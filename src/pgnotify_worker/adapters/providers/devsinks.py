"""Dev sinks: print each message (console) or append it as a JSON line (file)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import IO

from pydantic import Field

from pgnotify_worker.adapters.providers.spec import NoSettings, ProviderSettings, ProviderSpec
from pgnotify_worker.core.redact import mask_recipient
from pgnotify_worker.models import Outcome, RenderedMessage, Sent


class ConsoleProvider:
    """Prints a short block per message to stdout; the recipient is masked."""

    name = "console"

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def send(self, message: RenderedMessage) -> Outcome:
        lines = [
            f"--- {message.channel} #{message.notification_id} to "
            f"{mask_recipient(message.channel, message.recipient)} (attempt {message.attempt})"
        ]
        if message.subject:
            lines.append(f"subject: {message.subject}")
        if message.text:
            lines.append(message.text.rstrip())
        elif not message.html:
            lines.append(json.dumps(message.data, ensure_ascii=False))
        print("\n".join(lines), file=self.stream, flush=True)
        return Sent(f"console-{message.notification_id}")


class FileProvider:
    """Appends one JSON object per message to a file (tests and demos read it back)."""

    name = "file"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    async def close(self) -> None:
        return None

    async def send(self, message: RenderedMessage) -> Outcome:
        line = json.dumps(
            {
                "id": message.notification_id,
                "idempotency_key": message.idempotency_key,
                "channel": message.channel,
                "recipient": message.recipient,
                "subject": message.subject,
                "text": message.text,
                "html": message.html,
                "data": message.data,
                "attempt": message.attempt,
                "unsubscribe_url": message.unsubscribe_url,
            },
            ensure_ascii=False,
        )
        async with self._lock:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(line + "\n")
        return Sent(f"file-{message.notification_id}")


# --- settings and construction (read by the registry and the settings table) -------------------


class FileSinkSettings(ProviderSettings):
    """The file dev sink's settings."""

    file_sink_path: Path = Field(
        Path(".pgnotify/outbox.jsonl"), description="Where the file dev sink appends JSON lines."
    )


ALL_CHANNELS = frozenset({"email", "sms", "push", "webhook", "inapp"})
SPECS = (
    ProviderSpec(
        "console", ALL_CHANNELS, NoSettings, lambda _cfg, _ctx: ConsoleProvider(), dev_sink=True
    ),
    ProviderSpec(
        "file",
        ALL_CHANNELS,
        FileSinkSettings,
        lambda cfg, _ctx: FileProvider(cfg.file_sink_path),
        dev_sink=True,
    ),
)
