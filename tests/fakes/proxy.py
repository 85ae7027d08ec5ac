"""A tiny HTTP forward proxy on 127.0.0.1 that records what it carried: absolute-form requests
(`POST http://host:port/path HTTP/1.1`, forwarded with Connection: close) and CONNECT tunnels."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Self

from yarl import URL


class FakeProxy:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []  # (method, target) per request it carried
        self._server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def targets(self, method: str | None = None) -> list[str]:
        return [target for m, target in self.seen if method is None or m == method]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.close()
            return
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _version = request_line.split(" ", 2)
        self.seen.append((method, target))
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            return
        url = URL(target)
        headers = [
            line
            for line in header_lines
            if line and not line.lower().startswith(("proxy-", "connection:", "keep-alive:"))
        ]
        length = next(
            (int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length:")),
            0,
        )
        body = await reader.readexactly(length) if length else b""
        assert url.host is not None and url.port is not None
        up_reader, up_writer = await asyncio.open_connection(url.host, url.port)
        path = url.raw_path_qs
        up_writer.write(
            f"{method} {path} HTTP/1.1\r\n".encode("latin-1")
            + "".join(f"{h}\r\n" for h in headers).encode("latin-1")
            + b"Connection: close\r\n\r\n"
            + body
        )
        await up_writer.drain()
        answer = await up_reader.read()  # Connection: close: the whole answer, then EOF
        up_writer.close()
        writer.write(answer)
        await writer.drain()
        writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, asyncio.CancelledError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()
