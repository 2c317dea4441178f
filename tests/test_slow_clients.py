"""Slow and idle clients against the real gateway process: a slow request head is cut off by
`listen.header_timeout`, a stalled body by `listen.body_timeout`, and hundreds of idle keep-alive
connections do not keep a new client out."""

from __future__ import annotations

import asyncio
import json
import resource
from typing import Any

import aiohttp
import pytest

from tests.support.raw_http import complete, parse_response

TIMEOUTS = "listen: {host: 127.0.0.1, port: {port}, header_timeout: 1s, body_timeout: 1s}\n"


@pytest.fixture
async def gw(process_gateway, make_yaml, upstream) -> Any:
    text = make_yaml(upstream.url).replace("listen: {host: 127.0.0.1, port: {port}}\n", TIMEOUTS)
    assert "body_timeout" in text
    return await process_gateway(text)


async def _read_all(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    """Everything until the server closes (bounded)."""
    received = b""
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            received += chunk
    return received


async def _normal(url: str) -> int:
    async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                session.get(url) as r):
        await r.read()
        return r.status


def _assert_408(raw: bytes) -> None:
    assert complete(raw), raw[:300]
    response = parse_response(raw)
    assert response.status == 408, raw[:300]
    assert json.loads(response.body)["error"] == "request_timeout"


async def test_slow_head_is_cut_off_without_blocking_others(gw, upstream):
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    head = b"GET /public/slow-head HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"a" * 40 + b"\r\n\r\n"

    async def dribble() -> None:  # one byte every 0.25 s: the whole head would take ~15 s
        try:
            for byte in head:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.25)
        except (ConnectionError, OSError):
            pass

    sender = asyncio.ensure_future(dribble())
    try:
        await asyncio.sleep(0.3)
        assert await _normal(f"{gw.url}/public/meanwhile") == 200  # the worker is not held
        raw = await _read_all(reader, timeout=8)
        _assert_408(raw)
        assert not sender.done(), "the head finished before the timeout cut it off"
    finally:
        sender.cancel()
        writer.close()
    assert not any(r.path == "/public/slow-head" for r in upstream.received)


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_stalled_body_is_cut_off(gw, upstream, framing):
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    if framing == "length":
        writer.write(b"POST /public/slow-body HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n"
                     + b"b" * 10)
    else:
        writer.write(b"POST /public/slow-body HTTP/1.1\r\nHost: t\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\na\r\n" + b"b" * 10 + b"\r\n")
    await writer.drain()
    try:
        assert await _normal(f"{gw.url}/public/meanwhile") == 200
        raw = await _read_all(reader, timeout=8)  # the gateway also closes the connection
        _assert_408(raw)
    finally:
        writer.close()
    assert not any(r.path == "/public/slow-body" for r in upstream.received)


async def test_slow_but_steady_body_passes(gw, upstream):
    """The limit is on idle time between pieces, not on the whole body."""

    async def body() -> Any:
        for _ in range(5):
            yield b"c" * 10
            await asyncio.sleep(0.4)

    async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
                session.post(f"{gw.url}/public/steady", data=body()) as r):
        assert r.status == 200
        assert (await r.json())["body_size"] == 50


async def test_idle_keepalive_connections_do_not_lock_out_new_clients(gw):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    writers: list[asyncio.StreamWriter] = []
    try:
        for i in range(500):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writers.append(writer)
            if i % 2:  # half sent one whole request, got the answer, and now idle
                writer.write(b"GET /public/idle HTTP/1.1\r\nHost: t\r\n\r\n")
                await writer.drain()
                raw = b""
                async with asyncio.timeout(5):
                    while not complete(raw):
                        chunk = await reader.read(65536)
                        assert chunk, "closed before answering"
                        raw += chunk
                assert parse_response(raw).status == 200
        async with asyncio.timeout(5):
            assert await _normal(f"{gw.url}/public/new-client") == 200
    finally:
        for writer in writers:
            writer.close()
