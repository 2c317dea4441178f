"""Upstream faults against the real gateway process: refused connections, resets mid-response,
answers slower than the route timeout, malformed responses. Each ends in a JSON 502/504 (or an
aborted connection once headers were out), never a hang, and leaks no descriptor."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
from collections import Counter
from typing import Any

import aiohttp
import pytest

from tests.support.ports import free_port
from tests.support.processes import wait_for
from tests.support.raw_http import complete, parse_response, raw_exchange

#: Route timeout for the slow upstream; its handler sleeps much longer.
ROUTE_TIMEOUT = 0.3
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=10)


class FaultyUpstream:
    """A raw TCP upstream whose misbehaviour is chosen by the request path's first segment."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.seen: Counter[str] = Counter()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FaultyUpstream:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port,
                                                 backlog=512)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            kind = head.split(b" ", 2)[1].split(b"/")[1].decode()
            self.seen[kind] += 1
            if kind == "reset-length":  # small: the gateway may still buffer it whole
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: 1000\r\n\r\n" + b"x" * 100)
                await self._reset(writer)
            elif kind == "reset-large":  # large: streamed, so the head is out before the RST
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: 10000000\r\n\r\n" + b"x" * 100_000)
                await self._reset(writer)
            elif kind == "reset-chunked":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n64\r\n" + b"y" * 100 + b"\r\n")
                await self._reset(writer)
            elif kind == "reset-head":  # RST before any response byte
                await self._reset(writer, pause=0)
            elif kind == "slow":
                await asyncio.sleep(ROUTE_TIMEOUT * 10)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            elif kind == "garbage":
                writer.write(b"HTTQ/9 abc nonsense\r\n\r\n")
            elif kind == "bad-header":
                writer.write(b"HTTP/1.1 200 OK\r\nNo colon here\r\nContent-Length: 2\r\n\r\nok")
            elif kind == "bad-length":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: banana\r\n\r\nok")
            await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _reset(writer: asyncio.StreamWriter, pause: float = 0.05) -> None:
        await writer.drain()
        await asyncio.sleep(pause)  # the partial response reaches the gateway before the RST
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()


@pytest.fixture
async def faulty() -> Any:
    up = await FaultyUpstream().start()
    yield up
    await up.stop()


def _routes(faulty_url: str, dead_url: str) -> str:
    kinds = ("reset-length", "reset-large", "reset-chunked", "reset-head", "slow", "garbage", "bad-header",
             "bad-length")
    lines = [f"- {{name: refused, path: /refused, upstream: {dead_url}, auth: public}}"]
    lines += [f"- {{name: {k}, path: /{k}, upstream: {faulty_url}, auth: public, "
              f"timeout: {ROUTE_TIMEOUT}}}" for k in kinds]
    return "\n".join(lines) + "\n"


@pytest.fixture
async def gw(process_gateway, make_yaml, faulty) -> Any:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    return await process_gateway(make_yaml(faulty.url, routes=_routes(faulty.url, dead)))


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _get_raw(port: int, path: str) -> bytes:
    request = f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
    return await raw_exchange(port, request, timeout=10)


#: path -> (status, error code) for faults that happen before the response head went out.
BEFORE_HEADERS = {
    "/refused/x": (502, "bad_gateway"),
    "/reset-head/x": (502, "bad_gateway"),
    "/reset-length/x": (502, "bad_gateway"),  # small: buffered, so the short read is seen first
    "/slow/x": (504, "gateway_timeout"),
    "/garbage/x": (502, "bad_gateway"),
    "/bad-header/x": (502, "bad_gateway"),
    "/bad-length/x": (502, "bad_gateway"),
}


async def test_each_fault_is_a_json_error_or_an_aborted_stream(gw):
    """One gateway for every case (a process start costs more than the cases)."""
    for path, (status, code) in BEFORE_HEADERS.items():
        raw = await _get_raw(gw.port, path)
        assert complete(raw), (path, raw[:300])
        response = parse_response(raw)
        assert response.status == status, (path, raw[:300])
        assert (response.header("Content-Type") or "").startswith("application/json"), path
        body = json.loads(response.body)
        assert body["error"] == code and body["error_description"], path
    for path in ("/reset-large/x", "/reset-chunked/x"):
        raw = await _get_raw(gw.port, path)
        # The head and the first bytes went out; then the connection must end in a way the
        # client can tell from a finished response.
        assert raw.startswith(b"HTTP/1.1 200"), (path, raw[:300])
        assert b"x" * 100 in raw or b"y" * 100 in raw, path
        assert not complete(raw), (path, raw[-100:])


async def _one(session: aiohttp.ClientSession, url: str) -> str:
    try:
        async with session.get(url) as r:
            body = await r.read()
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
        return "aborted"
    if r.status in (502, 504) and json.loads(body)["error"] in ("bad_gateway", "gateway_timeout"):
        return str(r.status)
    return f"unexpected {r.status} {body[:100]!r}"


async def test_thousand_faults_leak_no_descriptors(gw, faulty):
    assert gw.proc is not None
    expected = {"refused": {"502"}, "reset-length": {"502"}, "reset-large": {"aborted"},
                "reset-chunked": {"aborted"},
                "reset-head": {"502"}, "slow": {"504"}, "garbage": {"502"},
                "bad-header": {"502"}, "bad-length": {"502"}}
    kinds = list(expected)

    async def run(n: int) -> list[tuple[str, str]]:
        sem = asyncio.Semaphore(20)
        connector = aiohttp.TCPConnector(limit=20)
        async with aiohttp.ClientSession(connector=connector, timeout=CLIENT_TIMEOUT) as session:
            async def bounded(i: int) -> tuple[str, str]:
                kind = kinds[i % len(kinds)]
                async with sem:
                    return kind, await _one(session, f"{gw.url}/{kind}/{i}")
            return await asyncio.gather(*(bounded(i) for i in range(n)))

    await run(len(kinds) * 3)  # warm: lazily created pools, loggers, caches
    await asyncio.sleep(0.3)
    before = _fds(gw.proc.pid)
    results = await run(1000)
    wrong = [(k, got) for k, got in results if got not in expected[k]]
    assert not wrong, wrong[:10]
    assert sum(faulty.seen.values()) >= 1000 * 7 // 8
    # Client connections are closed; the gateway must be back to its baseline.
    try:
        await wait_for(lambda: _fds(gw.proc.pid) <= before + 5, timeout=5)
    except TimeoutError:
        pass
    after = _fds(gw.proc.pid)
    assert after <= before + 5, (before, after, sorted(os.listdir(f"/proc/{gw.proc.pid}/fd")))
    # And it still serves.
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        assert await _one(session, f"{gw.url}/garbage/last") == "502"
