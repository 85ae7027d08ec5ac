"""A loopback webhook receiver for benchmarks, as cheap as possible so it does not compete with the
worker for this machine's CPU: a raw asyncio protocol speaking just enough keep-alive HTTP/1.1.

Run: python -m bench.sink PORT. POST /hook answers 200 at once and notes when each payload seq
arrived (CLOCK_MONOTONIC, comparable across processes); GET /stats returns
{"count": n, "arrivals": {seq: t}}, GET /count just the count; POST /reset clears both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import time

SEQ = re.compile(rb'"seq":(\d+)')
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"


class State:
    def __init__(self) -> None:
        self.count = 0
        self.arrivals: dict[int, float] = {}


class Sink(asyncio.Protocol):
    def __init__(self, state: State) -> None:
        self.state = state
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = 0
            marker = head.lower().find(b"content-length:")
            if marker >= 0:
                length = int(head[marker + 15 :].split(b"\r\n", 1)[0])
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            self.handle(head.split(b" ", 2), body)

    def handle(self, request_line: list[bytes], body: bytes) -> None:
        assert self.transport is not None
        method, path = request_line[0], request_line[1]
        if path == b"/hook":
            now = time.monotonic()
            self.state.count += 1
            match = SEQ.search(body)
            if match:
                self.state.arrivals.setdefault(int(match.group(1)), now)
            self.transport.write(OK)
        elif path == b"/count":  # cheap enough to poll while a drain runs
            payload = str(self.state.count).encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: "
                + str(len(payload)).encode()
                + b"\r\n\r\n"
                + payload
            )
        elif path == b"/stats":
            payload = json.dumps(
                {"count": self.state.count, "arrivals": self.state.arrivals}
            ).encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(payload)).encode()
                + b"\r\n\r\n"
                + payload
            )
        elif path == b"/reset" and method == b"POST":
            self.state.count = 0
            self.state.arrivals.clear()
            self.transport.write(NO_CONTENT)
        else:
            self.transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")


async def serve(port: int) -> None:
    state = State()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Sink(state), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
