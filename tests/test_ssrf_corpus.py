"""Every form of tests/data/ssrf-corpus.txt (from shared/reference: loopback, private,
link-local and metadata addresses written every way a URL parser accepts) is refused at INSERT or
by the send-time guard, and no connection reaches a listener on this machine."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from pgnotify_worker.config import Settings
from tests.support.db import wait_rows
from tests.support.worker import running

CORPUS = [
    line.strip()
    for line in (Path(__file__).parent / "data" / "ssrf-corpus.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]
PORT = 18090  # the corpus' stand-in for a receiver on this machine
# How a refused target ends: the guard's words, never an HTTP status or a connection error.
REFUSALS = ("refused", "invalid URL", "name lookup failed", "not allowed", "blocked", "bad_url")


@contextlib.asynccontextmanager
async def listeners() -> AsyncIterator[list[str]]:
    """Accept on 127.0.0.1 and [::1] port 18090 and record every connection."""
    seen: list[str] = []

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(str(writer.get_extra_info("peername")))
        writer.close()

    servers = []
    for host, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
        try:
            servers.append(await asyncio.start_server(accepted, host, PORT, family=family))
        except OSError as exc:
            if not servers:
                pytest.skip(f"port {PORT} is taken here: {exc}")
    try:
        yield seen
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()


def test_the_corpus_is_whole() -> None:
    assert len(CORPUS) == 41


async def test_no_form_of_the_corpus_reaches_a_listener(
    conn: asyncpg.Connection, worker_settings: Callable[..., Settings]
) -> None:
    await conn.execute("SET pgnotify.webhook_allowed_networks = ''")  # production's INSERT check
    refused_at_insert: list[str] = []
    queued: dict[int, str] = {}
    for url in CORPUS:
        try:
            nid = await conn.fetchval(
                "SELECT pgnotify.enqueue('webhook', $1, max_attempts => 1)", url
            )
        except asyncpg.CheckViolationError:
            refused_at_insert.append(url)
        else:
            queued[nid] = url
    settings = worker_settings(webhook_allowed_networks="")
    async with listeners() as seen, running(settings) as service:
        rows = await wait_rows(conn, list(queued), {"failed", "dead"}, service, timeout=30)
    assert seen == []  # not one connection
    for row in rows:
        error = row["last_error"] or ""
        assert any(word in error for word in REFUSALS), (queued[row["id"]], error)
    # everything whose address is visible in the URL is refused before it is stored
    # 33 of the 41 here: the names (and a name before a #fragment) can only be judged at send
    assert len(refused_at_insert) >= 30, refused_at_insert
