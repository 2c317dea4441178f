"""Bodies stream through the gateway without being buffered: large uploads and downloads through a
real gateway process with bounded memory, events that arrive one by one, WebSockets, and a
client going away cancelling the upstream request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from tests.support.raw_http import AppServer

MiB = 1024 * 1024
TOTAL = 100 * MiB
#: Peak resident memory allowed to a gateway process that relayed 100 MB.
RSS_BOUND = 150 * MiB
#: The receiving side stalls this long after the first chunk: a gateway without backpressure
#: would pull the whole 100 MB into memory meanwhile (loopback moves that in well under a second).
STALL = 1.0


def public(url: str, **options: str) -> str:
    extra = "".join(f", {k}: {v}" for k, v in options.items())
    return f"- {{name: public, path: /public, upstream: {url}, auth: public{extra}}}\n"


def reset_peak_rss(pid: int) -> None:
    """Start-up (an argon2 hash of 64 MiB) is not what is measured: reset VmHWM to VmRSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


async def test_100mb_upload_streams_with_bounded_memory(process_gateway, make_yaml):
    received = {"bytes": 0}

    async def sink(request: web.Request) -> web.Response:
        first = await request.content.readany()
        received["bytes"] += len(first)
        await asyncio.sleep(STALL)
        async for chunk in request.content.iter_any():
            received["bytes"] += len(chunk)
        return web.json_response({"bytes": received["bytes"]})

    app = web.Application(client_max_size=0)
    app.router.add_post("/{tail:.*}", sink)
    up = await AppServer(app).start()
    try:
        gw = await process_gateway(make_yaml(up.url, routes=public(up.url, max_body="200MB")))
        reset_peak_rss(gw.proc.pid)  # type: ignore[union-attr]
        chunk = b"u" * MiB

        async def body() -> AsyncIterator[bytes]:
            for _ in range(TOTAL // MiB):
                yield chunk

        async with (aiohttp.ClientSession() as session,
                    session.post(f"{gw.url}/public/upload", data=body()) as r):
            assert r.status == 200, await r.text()
            assert (await r.json())["bytes"] == TOTAL
        assert received["bytes"] == TOTAL
        peak = peak_rss(gw.proc.pid)  # type: ignore[union-attr]
        assert peak < RSS_BOUND, f"gateway peak RSS {peak / MiB:.0f} MiB"
    finally:
        await up.stop()


async def test_100mb_download_streams_with_bounded_memory(process_gateway, make_yaml):
    async def source(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = TOTAL
        await response.prepare(request)
        chunk = b"d" * MiB
        for _ in range(TOTAL // MiB):
            await response.write(chunk)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/{tail:.*}", source)
    up = await AppServer(app).start()
    try:
        gw = await process_gateway(make_yaml(up.url, routes=public(up.url)))
        reset_peak_rss(gw.proc.pid)  # type: ignore[union-attr]
        got = 0
        async with (aiohttp.ClientSession() as session,
                    session.get(f"{gw.url}/public/download") as r):
            assert r.status == 200
            assert r.headers["Content-Length"] == str(TOTAL)
            got += len(await r.content.readany())
            await asyncio.sleep(STALL)
            async for data in r.content.iter_any():
                got += len(data)
        assert got == TOTAL
        peak = peak_rss(gw.proc.pid)  # type: ignore[union-attr]
        assert peak < RSS_BOUND, f"gateway peak RSS {peak / MiB:.0f} MiB"
    finally:
        await up.stop()


# --- incremental delivery ------------------------------------------------------------------
class LockStep:
    """An upstream that sends event i+1 only after the test saw event i arrive through the
    gateway: a gateway that buffered the response would stall it (and the test times out)."""

    def __init__(self, n: int, content_type: str):
        self.n = n
        self.content_type = content_type
        self.seen = [asyncio.Event() for _ in range(n)]
        self.sent: list[int] = []

    async def handler(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": self.content_type,
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        for i in range(self.n):
            await response.write(f"id: {i}\ndata: event {i}\n\n".encode())
            self.sent.append(i)
            await asyncio.wait_for(self.seen[i].wait(), 10)
        return response


@pytest.mark.parametrize("content_type", ["text/event-stream", "application/octet-stream"])
async def test_events_arrive_one_by_one(gateway, content_type):
    lock = LockStep(5, content_type)
    app = web.Application()
    app.router.add_get("/{tail:.*}", lock.handler)
    up = await AppServer(app).start()
    try:
        client = await gateway(routes=public(up.url))
        arrived: list[tuple[int, int]] = []  # (event, events the upstream had sent by then)
        async with asyncio.timeout(20):
            r = await client.get("/public/events")
            assert r.status == 200
            assert r.headers["Content-Type"].startswith(content_type)
            buffer = b""
            while len(arrived) < lock.n:
                data = await r.content.readany()
                assert data, "stream ended early"
                buffer += data
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    i = int(event.split(b"\n")[0].removeprefix(b"id: "))
                    arrived.append((i, len(lock.sent)))
                    lock.seen[i].set()
            assert await r.content.read() == b""
    finally:
        await up.stop()
    # Each event arrived while the upstream had not yet sent the next one.
    assert arrived == [(i, i + 1) for i in range(lock.n)]


async def test_sse_first_event_arrives_before_the_last_is_sent(gateway):
    """Real gaps instead of lock-step: the first event is read before the upstream even sends
    the last one (3 gaps of 0.3 s later)."""
    loop = asyncio.get_running_loop()
    sent: list[float] = []

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(4):
            if i:
                await asyncio.sleep(0.3)
            sent.append(loop.time())
            await response.write(f"data: {i}\n\n".encode())
        return response

    app = web.Application()
    app.router.add_get("/{tail:.*}", events)
    up = await AppServer(app).start()
    try:
        client = await gateway(routes=public(up.url))
        r = await client.get("/public/sse")
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        arrived: list[tuple[float, bytes]] = []
        buffer = b""
        async with asyncio.timeout(15):
            while True:
                data = await r.content.readany()
                if not data:
                    break
                buffer += data
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    arrived.append((loop.time(), event))
    finally:
        await up.stop()
    assert [e for _, e in arrived] == [f"data: {i}".encode() for i in range(4)]
    assert len(sent) == 4
    assert arrived[0][0] < sent[-1]


# --- WebSocket -----------------------------------------------------------------------------
async def test_websocket_is_proxied(gateway, upstream):
    routes = f"- {{name: ws, path: /ws, upstream: {upstream.url}, auth: public}}\n"
    client = await gateway(routes=routes)
    async with asyncio.timeout(10):
        # The client's framing headers are its own: the upstream's handshake carries no body.
        ws = await client.ws_connect("/ws?room=1", headers={"Content-Length": "0"})
        await ws.send_str("hello")
        msg = await ws.receive()
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "hello")
        await ws.send_bytes(b"\x00\x01binary")
        msg = await ws.receive()
        assert (msg.type, msg.data) == (WSMsgType.BINARY, b"\x00\x01binary")
        for i in range(20):
            await ws.send_str(f"m{i}")
        echoed = [(await ws.receive()).data for _ in range(20)]
        assert echoed == [f"m{i}" for i in range(20)]
        await ws.close()
        assert ws.closed
    got = upstream.last
    assert got.raw_path == "/ws?room=1"
    assert got.header("X-Forwarded-For") == "127.0.0.1"
    assert (got.header("Upgrade") or "").lower() == "websocket"
    assert got.header("Content-Length") is None


async def test_websocket_upstream_close_reaches_client(gateway):
    async def closer(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("bye")
        await ws.close(code=4001, message=b"done")
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", closer)
    up = await AppServer(app).start()
    try:
        client = await gateway(routes=public(up.url))
        async with asyncio.timeout(10):
            ws = await client.ws_connect("/public/ws")
            assert (await ws.receive()).data == "bye"
            msg = await ws.receive()
            assert msg.type == WSMsgType.CLOSE
            assert ws.close_code == 4001
    finally:
        await up.stop()


async def test_websocket_refused_upgrade_is_502(gateway, upstream):
    client = await gateway()
    r = await client.get("/public/not-a-socket", headers={
        "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    })
    assert r.status == 502
    assert (await r.json())["error"] == "bad_gateway"


# --- a client going away cancels the upstream request -------------------------------------
class Observed:
    """An upstream handler that records whether it was cancelled or saw the connection drop."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.finished = asyncio.Event()
        self.cancelled = False
        self.completed = False
        self.chunks_sent = 0

    async def slow(self, request: web.Request) -> web.Response:
        self.started.set()
        try:
            await asyncio.sleep(30)
            self.completed = True
            return web.Response(text="late")
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        finally:
            self.finished.set()

    async def upload(self, request: web.Request) -> web.Response:
        try:
            self.started.set()
            async for _ in request.content.iter_any():
                pass
            self.completed = True
            return web.Response(text="all read")
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        except aiohttp.ClientPayloadError:  # the peer closed mid-body
            self.cancelled = True
            raise
        finally:
            self.finished.set()

    async def endless(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            for _ in range(600):
                await response.write(b"x" * 1024)
                self.chunks_sent += 1
                self.started.set()
                await asyncio.sleep(0.05)
            self.completed = True
            return response
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled = True
            raise
        finally:
            self.finished.set()


@pytest.fixture
async def observed() -> AsyncIterator[tuple[Observed, AppServer]]:
    obs = Observed()
    app = web.Application(client_max_size=0)
    app.router.add_get("/public/slow", obs.slow)
    app.router.add_post("/public/upload", obs.upload)
    app.router.add_get("/public/endless", obs.endless)
    up = await AppServer(app).start()
    yield obs, up
    await up.stop()


async def _open(port: int, head: bytes) -> asyncio.StreamWriter:
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    return writer


async def _abort(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()
    await asyncio.sleep(0)


async def test_client_disconnect_while_waiting_cancels_upstream(process_gateway, make_yaml,
                                                                observed):
    obs, up = observed
    gw = await process_gateway(make_yaml(up.url, routes=public(up.url)))
    writer = await _open(gw.port, b"GET /public/slow HTTP/1.1\r\nHost: gw\r\n\r\n")
    await asyncio.wait_for(obs.started.wait(), 10)
    await _abort(writer)
    await asyncio.wait_for(obs.finished.wait(), 10)
    assert obs.cancelled and not obs.completed


async def test_client_disconnect_mid_upload_cancels_upstream(process_gateway, make_yaml, observed):
    obs, up = observed
    gw = await process_gateway(make_yaml(up.url, routes=public(up.url)))
    writer = await _open(gw.port, b"POST /public/upload HTTP/1.1\r\nHost: gw\r\n"
                                  b"Content-Length: 5000000\r\n\r\n" + b"p" * 100_000)
    await asyncio.wait_for(obs.started.wait(), 10)
    await _abort(writer)
    await asyncio.wait_for(obs.finished.wait(), 10)
    assert obs.cancelled and not obs.completed


async def test_client_disconnect_mid_download_stops_upstream(process_gateway, make_yaml, observed):
    obs, up = observed
    gw = await process_gateway(make_yaml(up.url, routes=public(up.url)))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /public/endless HTTP/1.1\r\nHost: gw\r\n\r\n")
    await writer.drain()
    assert b"200" in await asyncio.wait_for(reader.readline(), 10)
    await asyncio.wait_for(reader.readexactly(2048), 10)  # the stream is flowing
    await _abort(writer)
    await asyncio.wait_for(obs.finished.wait(), 10)
    assert obs.cancelled and not obs.completed
    assert obs.chunks_sent < 600


async def test_websocket_broken_handshake_is_400_without_contacting_upstream(gateway, upstream):
    routes = f"- {{name: ws, path: /ws, upstream: {upstream.url}, auth: public}}\n"
    client = await gateway(routes=routes)
    r = await client.get("/ws", headers={"Upgrade": "websocket", "Connection": "Upgrade"})
    assert r.status == 400
    assert (await r.json())["error"] == "invalid_request"
    r = await client.get("/ws", headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                         "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "x"})
    assert r.status == 400
    assert upstream.received == []
