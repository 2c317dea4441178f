"""Byte-exact HTTP on loopback for proxy tests: a raw client, a raw canned-response server, and a
small aiohttp app server for purpose-built upstreams."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

from aiohttp import web

from tests.support.ports import free_port


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


def complete(data: bytes) -> bool:
    """True once `data` holds a whole response (framed by Content-Length or chunked)."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        return rest.endswith(b"0\r\n\r\n")
    m = re.search(rb"\r\ncontent-length: *(\d+)", lower)
    return m is not None and len(rest) >= int(m.group(1))


def parse_response(data: bytes) -> RawResponse:
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    if any(k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in headers):
        body = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2:]
    else:
        length = next((int(v) for k, v in headers if k.lower() == "content-length"), None)
        body = rest if length is None else rest[:length]
    return RawResponse(status, headers, body)


async def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send `data`, read until one whole response arrived or the server closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        received = b""
        async with asyncio.timeout(timeout):
            while not complete(received):
                chunk = await reader.read(65536)
                if not chunk:
                    break
                received += chunk
        return received
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def raw_request(port: int, data: bytes, timeout: float = 10.0) -> RawResponse:
    return parse_response(await raw_exchange(port, data, timeout))


@dataclass
class CannedServer:
    """Answers every connection with the same response bytes, then closes it; records requests."""

    response: bytes
    port: int = field(default_factory=free_port)
    requests: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            self.requests.append(head)
            writer.write(self.response)
            await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def start(self) -> CannedServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@dataclass
class AppServer:
    """An aiohttp app as an upstream; handlers are cancelled when the peer goes away."""

    app: web.Application
    port: int = field(default_factory=free_port)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> AppServer:
        self.runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True,
                                    shutdown_timeout=1.0)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
