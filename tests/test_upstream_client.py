"""The gateway's own HTTP/1.1 upstream client (gateway/pipeline/upstream.py), through the gateway
and directly: keep-alive reuse and its retry rule, response framing (HEAD, 1xx, 204/304,
close-delimited, chunked with trailers), malformed answers, request framing as the upstream sees
it, abandoned responses, TLS and header-line injection."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.pipeline.upstream import Origin, UpstreamPool, serialise_head
from tests.support.ports import free_port
from tests.support.raw_http import AppServer, complete, parse_response, raw_exchange

GET_CLOSE = b"GET /public/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"


def public(url: str, **options: Any) -> str:
    extra = "".join(f", {k}: {json.dumps(v)}" for k, v in options.items())
    return f"- {{name: public, path: /public, upstream: {url}, auth: public{extra}}}\n"


def ok(body: bytes = b"ok", *headers: str, status: str = "200 OK") -> bytes:
    """A keep-alive HTTP/1.1 response with a Content-Length body."""
    extra = "".join(f"{h}\r\n" for h in headers)
    return (f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def assert_bad_gateway(status: int, body: bytes) -> None:
    assert status == 502, body[:300]
    error = json.loads(body)
    assert error["error"] == "bad_gateway" and error["error_description"], error


# --- a scripted raw upstream -----------------------------------------------------------------
@dataclass
class Seen:
    """One request as it arrived on the wire."""

    conn: int  # which accepted connection (0, 1, ...)
    seq: int  # its place on that connection
    head: bytes
    wire_body: bytes  # the body bytes exactly as framed on the wire
    body: bytes  # the body with chunked framing removed
    reader: asyncio.StreamReader | None = field(default=None, repr=False)

    @property
    def line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    @property
    def path(self) -> str:
        return self.line.split(" ")[1]

    def headers(self) -> list[tuple[str, str]]:
        lines = self.head.decode("latin-1").split("\r\n")[1:]
        return [(k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines if ln)]

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers() if k.lower() == name.lower()]


Answer = Callable[[Seen, asyncio.StreamWriter], Awaitable[bool]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes, bytes] | None:
    """(head, wire body, body) of the next request, or None when the peer closed cleanly."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise
    lower = head.lower()
    if b"\r\ntransfer-encoding: chunked" in lower:
        wire, body = b"", b""
        for _ in range(100_000):
            size_line = await reader.readuntil(b"\r\n")
            wire += size_line
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while True:  # trailer section up to the empty line
                    line = await reader.readuntil(b"\r\n")
                    wire += line
                    if line == b"\r\n":
                        return head, wire, body
            data = await reader.readexactly(size + 2)
            wire += data
            body += data[:-2]
        raise AssertionError("endless chunked body")
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            data = await reader.readexactly(int(line.split(b":")[1]))
            return head, data, data
    return head, b"", b""


class Scripted:
    """A raw upstream: `answer(seen, writer)` writes each reply and says whether to keep the
    connection. Records every request and how many connections it accepted."""

    def __init__(self, answer: Answer):
        self.answer = answer
        self.port = free_port()
        self.seen: list[Seen] = []
        self.accepted = 0
        self.closed_conns: set[int] = set()
        self.conn_closed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Scripted:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for writer in self._writers:
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        conn = self.accepted
        self.accepted += 1
        try:
            for seq in range(1000):
                got = await asyncio.wait_for(read_request(reader), 10)
                if got is None:
                    break
                seen = Seen(conn, seq, *got, reader=reader)
                self.seen.append(seen)
                if not await self.answer(seen, writer):
                    break
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError,
                asyncio.CancelledError):
            pass  # a cancelled handler ends quietly: asyncio.streams logs a cancelled one
        finally:
            writer.close()
            self.closed_conns.add(conn)
            self.conn_closed.set()
            self._tasks.discard(task)


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Answer], Awaitable[Scripted]]]:
    started: list[Scripted] = []

    async def start(answer: Answer) -> Scripted:
        up = await Scripted(answer).start()
        started.append(up)
        return up

    yield start
    for up in started:
        await up.stop()


def canned(response: bytes, keep: bool = True) -> Answer:
    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(response)
        return keep

    return answer


async def _peer_app(ports: list[int], **handlers: Callable[..., Any]) -> web.Application:
    """An aiohttp app that records the upstream-side peer port of every request."""
    async def echo(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        ports.append(peer[1] if peer else -1)
        body = await request.read()
        return web.json_response({"path": request.path, "size": len(body)})

    app = web.Application(client_max_size=0)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


# --- 1. keep-alive -----------------------------------------------------------------------------
async def test_sequential_requests_reuse_one_upstream_connection(gateway):
    ports: list[int] = []
    up = await AppServer(await _peer_app(ports)).start()
    try:
        client = await gateway(routes=public(up.url))
        for i in range(5):
            r = await client.get(f"/public/get{i}")
            assert r.status == 200 and (await r.json())["path"] == f"/public/get{i}"
        r = await client.post("/public/post", data=b"p" * 1000)
        assert (await r.json())["size"] == 1000
        r = await client.head("/public/head")
        assert r.status == 200
        r = await client.get("/public/after-head")
        assert (await r.json())["path"] == "/public/after-head"
    finally:
        await up.stop()
    assert len(ports) == 8
    # Everything up to the HEAD on one connection; after a HEAD the connection is not reused
    # (a stray body could not be told apart from the next response), so at most one more.
    assert len(set(ports[:7])) == 1, ports
    assert len(set(ports)) <= 2, ports


async def test_concurrent_requests_open_more_connections_then_reuse_them(gateway):
    n = 4
    ports: list[int] = []
    arrived = 0
    all_in = asyncio.Event()

    async def gathered(request: web.Request) -> web.Response:
        nonlocal arrived
        peer = request.transport.get_extra_info("peername") if request.transport else None
        ports.append(peer[1] if peer else -1)
        if request.path.startswith("/public/together"):
            arrived += 1
            if arrived == n:
                all_in.set()
            await asyncio.wait_for(all_in.wait(), 5)  # all n are in flight at once
        return web.Response(text=request.path)

    app = web.Application()
    app.router.add_get("/{tail:.*}", gathered)
    up = await AppServer(app).start()
    try:
        client = await gateway(routes=public(up.url))

        async def get(path: str) -> str:
            r = await client.get(path)
            assert r.status == 200, await r.text()
            return await r.text()

        bodies = await asyncio.gather(*(get(f"/public/together/{i}") for i in range(n)))
        assert bodies == [f"/public/together/{i}" for i in range(n)]
        for i in range(n):
            assert await get(f"/public/later/{i}") == f"/public/later/{i}"
    finally:
        await up.stop()
    assert len(set(ports[:n])) == n, ports
    assert set(ports[n:]) <= set(ports[:n]), ports  # the idle ones were reused


async def test_idle_connection_older_than_the_idle_timeout_is_not_reused():
    """Directly against the pool, with its clock injected."""
    from gateway.pipeline import upstream as mod

    up = await Scripted(canned(ok(b"hi"))).start()
    now = [1000.0]
    pool = UpstreamPool(monotonic=lambda: now[0])
    origin = Origin("127.0.0.1", up.port, False)

    async def get() -> bytes:
        head = serialise_head("GET", "/", [("Host", "u")])
        ex = await pool.send(origin, "GET", head, None, None, connect_timeout=2, timeout=2,
                             replayable=True)
        try:
            return await ex.read(2)
        finally:
            ex.release()

    try:
        assert await get() == b"hi"
        now[0] += mod.IDLE_TIMEOUT - 1
        assert await get() == b"hi"
        assert up.accepted == 1  # reused
        now[0] += mod.IDLE_TIMEOUT + 1
        assert await get() == b"hi"
        assert up.accepted == 2  # too old: a new one
        await asyncio.wait_for(_until(lambda: 0 in up.closed_conns), 2)  # the old one closed
    finally:
        await pool.close()
        await up.stop()


async def _until(check: Callable[[], bool], limit: int = 200) -> None:
    for _ in range(limit):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


# --- 2. the upstream closing idle connections --------------------------------------------------
async def test_upstream_keepalive_timeout_is_noticed(gateway):
    ports: list[int] = []
    app = await _peer_app(ports)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        client = await gateway(routes=public(f"http://127.0.0.1:{port}"))
        for i in range(3):
            r = await client.get(f"/public/g{i}")
            assert r.status == 200, await r.text()
            await asyncio.sleep(0.3)  # the upstream closes the idle connection meanwhile
            r = await client.post(f"/public/p{i}", data=b"body" * 10)
            assert r.status == 200, await r.text()  # a POST is never retried: no stale reuse
            assert (await r.json()) == {"path": f"/public/p{i}", "size": 40}
            await asyncio.sleep(0.3)
    finally:
        await runner.cleanup()
    assert len(set(ports)) == 6, ports  # each request found the previous connection closed


async def test_upstream_that_closes_after_each_answer(gateway, scripted):
    """It answers (keep-alive by default in HTTP/1.1) and then closes: the pool must see it."""
    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(ok(f"{seen.path} {len(seen.body)}".encode()))
        return False

    up = await scripted(answer)
    client = await gateway(routes=public(up.url))
    for i in range(3):
        r = await client.get(f"/public/g{i}")
        assert (r.status, await r.text()) == (200, f"/public/g{i} 0")
        await asyncio.sleep(0.05)  # the FIN arrives while the connection sits idle
        r = await client.post(f"/public/p{i}", data=b"x" * 7)
        assert (r.status, await r.text()) == (200, f"/public/p{i} 7")
        await asyncio.sleep(0.05)
    assert [s.path for s in up.seen] == [f"/public/{m}{i}" for i in range(3) for m in "gp"]
    assert up.accepted == 6


def _drop_second_on_first_conn(seen: Seen) -> bool:
    return seen.conn == 0 and seen.seq == 1


async def _drop_answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
    """Connection 0 answers its first request, then takes the second and closes unanswered."""
    if _drop_second_on_first_conn(seen):
        return False
    writer.write(ok(f"{seen.conn}:{seen.line}".encode()))
    return True


async def test_reused_connection_dropped_unanswered_retries_a_get(gateway, scripted):
    up = await scripted(_drop_answer)
    client = await gateway(routes=public(up.url))
    r = await client.get("/public/first")
    assert await r.text() == "0:GET /public/first HTTP/1.1"
    r = await client.get("/public/second")
    assert r.status == 200, await r.text()
    assert await r.text() == "1:GET /public/second HTTP/1.1"  # sent again, on a new connection
    assert [(s.conn, s.path) for s in up.seen] == [
        (0, "/public/first"), (0, "/public/second"), (1, "/public/second")]


async def test_reused_connection_dropped_unanswered_does_not_retry_a_post(gateway, scripted):
    up = await scripted(_drop_answer)
    client = await gateway(routes=public(up.url))
    r = await client.get("/public/first")
    assert r.status == 200
    r = await client.post("/public/pay", data=b"amount=5")
    assert_bad_gateway(r.status, await r.read())
    posts = [s for s in up.seen if s.line.startswith("POST")]
    assert len(posts) == 1 and posts[0].body == b"amount=5"  # never sent twice
    r = await client.get("/public/after")
    assert await r.text() == "1:GET /public/after HTTP/1.1"


async def test_a_connection_that_answered_partly_is_not_retried(gateway, scripted):
    """A GET whose reused connection sent some response bytes and then closed: the request was
    processed, so it is not silently replayed."""
    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if seen.conn == 0 and seen.seq == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
            return False
        writer.write(ok(b"fine"))
        return True

    up = await scripted(answer)
    client = await gateway(routes=public(up.url))
    assert await (await client.get("/public/a")).text() == "fine"
    r = await client.get("/public/b")
    assert_bad_gateway(r.status, await r.read())
    assert [s.path for s in up.seen] == ["/public/a", "/public/b"]


# --- 3./4. responses without a body --------------------------------------------------------------
async def _pipelined(port: int, *requests: bytes) -> bytes:
    """Send several requests on one connection (the last with Connection: close), read all."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"".join(requests))
        await writer.drain()
        data = b""
        async with asyncio.timeout(10):
            while chunk := await reader.read(65536):
                data += chunk
        return data
    finally:
        writer.close()


async def test_head_with_content_length_and_no_body(gateway, scripted):
    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if seen.line.startswith("HEAD"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: text/plain"
                         b"\r\nETag: \"h\"\r\n\r\n")
        else:
            writer.write(ok(b"after-head"))
        return True

    up = await scripted(answer)
    client = await gateway(routes=public(up.url))
    raw = await _pipelined(client.server.port,
                           b"HEAD /public/h HTTP/1.1\r\nHost: gw\r\n\r\n",
                           b"GET /public/g HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw[:300]
    assert b"\r\ncontent-length: 1234" in head.lower(), head
    assert b'\r\netag: "h"' in head.lower()
    # No body after the HEAD's head: the next bytes are the GET's response.
    assert rest.startswith(b"HTTP/1.1 200"), rest[:100]
    second = parse_response(rest)
    assert second.body == b"after-head"
    assert [s.line.split(" ")[0] for s in up.seen] == ["HEAD", "GET"]


async def test_204_and_304_with_content_length_have_no_body_and_keep_the_connection(
        gateway, scripted):
    """A 304 may carry the representation's Content-Length: no body follows it anyway, and the
    connection stays usable for the next answer."""
    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if seen.path.endswith("/304"):
            writer.write(b'HTTP/1.1 304 Not Modified\r\nETag: "v7"\r\nContent-Length: 50\r\n\r\n')
        elif seen.path.endswith("/204"):
            writer.write(b"HTTP/1.1 204 No Content\r\nX-Done: yes\r\n\r\n")
        else:
            writer.write(ok(b"plain"))
        return True

    up = await scripted(answer)
    client = await gateway(routes=public(up.url))
    raw = await _pipelined(
        client.server.port,
        b"GET /public/304 HTTP/1.1\r\nHost: gw\r\nIf-None-Match: \"v7\"\r\n\r\n",
        b"GET /public/204 HTTP/1.1\r\nHost: gw\r\n\r\n",
        b"GET /public/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    first, _, rest = raw.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 304"), raw[:300]
    assert b'\r\netag: "v7"' in first.lower()
    second, _, rest = rest.partition(b"\r\n\r\n")
    assert second.startswith(b"HTTP/1.1 204"), (first, rest[:200])
    assert b"\r\nx-done: yes" in second.lower()
    assert rest.startswith(b"HTTP/1.1 200"), rest[:200]
    assert parse_response(rest).body == b"plain"
    assert up.accepted == 1  # the upstream connection survived both


# --- 5./6. close-delimited, chunked, trailers, interim responses ----------------------------------
async def test_close_delimited_body_arrives_whole_and_streams(gateway, scripted):
    pieces = [bytes([65 + i]) * 50_000 for i in range(4)]
    client_saw_first = asyncio.Event()

    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
        writer.write(pieces[0])
        await writer.drain()
        await asyncio.wait_for(client_saw_first.wait(), 5)  # a buffering gateway stalls here
        for piece in pieces[1:]:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)
        return False  # the close ends the body

    up = await scripted(answer)
    client = await gateway(routes=public(up.url))
    async with client.get("/public/cd") as r:
        assert r.status == 200
        got = await r.content.readany()
        assert got and pieces[0].startswith(got)
        client_saw_first.set()
        got += await r.content.read()
    assert got == b"".join(pieces)


async def test_small_close_delimited_body_sent_at_once(gateway, scripted):
    up = await scripted(canned(b"HTTP/1.1 200 OK\r\nX-Kind: eof\r\n\r\nuntil-the-end", keep=False))
    client = await gateway(routes=public(up.url))
    for _ in range(2):  # a close-delimited answer never leaves a connection in the pool
        r = parse_response(await raw_exchange(client.server.port, GET_CLOSE))
        assert (r.status, r.body, r.header("X-Kind")) == (200, b"until-the-end", "eof")
    assert up.accepted == 2


async def test_chunked_body_with_extensions_and_trailer(gateway, scripted):
    """Chunks arriving apart, a chunk extension and a trailer: the body arrives whole, the
    trailer is not turned into a response header, and the connection is reused."""
    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if seen.path.endswith("/next"):
            writer.write(ok(b"next"))
            return True
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n"
                     b"\r\n5;ext=1\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"1\r\n \r\n5\r\nworld\r\n")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"0\r\nX-Checksum: abc\r\n\r\n")
        return True

    up = await scripted(answer)
    client = await gateway(routes=public(up.url))
    r = await client.get("/public/trailer")
    assert (r.status, await r.read()) == (200, b"hello world")
    assert "X-Checksum" not in r.headers
    r = await client.get("/public/next")
    assert await r.read() == b"next"
    assert up.accepted == 1


async def test_trailer_in_the_same_packet_is_not_a_header(gateway, scripted):
    """All at once the response is complete before its head is relayed: the trailer must still
    not be merged into the header section (RFC 9110 §6.5.1)."""
    up = await scripted(canned(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-Trailer: t\r\nSet-Cookie: from=trailer\r\n\r\n"))
    client = await gateway(routes=public(up.url))
    r = parse_response(await raw_exchange(client.server.port, GET_CLOSE))
    assert (r.status, r.body) == (200, b"abc")
    assert "x-trailer" not in r.names() and "set-cookie" not in r.names(), r.headers


@pytest.mark.parametrize("together", [True, False], ids=["one-write", "apart"])
async def test_interim_responses_are_skipped(gateway, scripted, together):
    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n"
                     b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
        if not together:
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(ok(b"final", "X-Final: 1", status="201 Created"))
        return True

    up = await scripted(answer)
    client = await gateway(routes=public(up.url))
    raw = await raw_exchange(client.server.port,
                             b"POST /public/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n"
                             b"Connection: close\r\n\r\nhi")
    assert raw.startswith(b"HTTP/1.1 201"), raw[:300]
    r = parse_response(raw)
    assert r.body == b"final" and r.header("X-Final") == "1"
    assert "link" not in r.names()  # the interim's fields are not the final answer's
    assert up.seen[0].body == b"hi"


# --- 7. malformed answers ---------------------------------------------------------------------
MALFORMED: dict[str, bytes] = {
    "cl-and-te": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"5\r\nhello\r\n0\r\n\r\n",
    "bad-chunk-size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
    "101-plain": b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    "101-upgrade": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                   b"Connection: Upgrade\r\n\r\nframes",
    "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
    "huge-head": b"HTTP/1.1 200 OK\r\n" + b"".join(
        b"X-Filler-%d: %s\r\n" % (i, b"f" * 1000) for i in range(70)) + b"Content-Length: 0\r\n\r\n",
    "huge-header": b"HTTP/1.1 200 OK\r\nX-Huge: " + b"h" * 70_000 + b"\r\nContent-Length: 0\r\n\r\n",
    "bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    "status-0": b"HTTP/1.1 000 Zero\r\nContent-Length: 2\r\n\r\nok",
    "status-99": b"HTTP/1.1 099 Low\r\nContent-Length: 2\r\n\r\nok",
    "ctl-in-value": b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 2\r\n\r\nok",
}


@pytest.mark.parametrize("kind", list(MALFORMED))
async def test_malformed_answer_is_a_json_502_and_the_gateway_keeps_serving(
        gateway, scripted, upstream, kind):
    up = await scripted(canned(MALFORMED[kind], keep=False))
    routes = public(up.url) + (f"- {{name: good, path: /good, upstream: {upstream.url}, "
                               f"auth: public}}\n")
    client = await gateway(routes=routes)
    for _ in range(2):
        raw = await raw_exchange(client.server.port, GET_CLOSE)
        assert complete(raw), raw[:300]
        r = parse_response(raw)
        assert_bad_gateway(r.status, r.body)
        assert (r.header("Content-Type") or "").startswith("application/json")
    r = await client.get("/good/x")
    assert r.status == 200 and (await r.json())["path"] == "/good/x"


async def test_a_head_that_never_ends_is_refused_not_buffered(gateway, scripted):
    """An upstream that keeps sending one header line and holds the connection: refused once
    past the head limit (502), not buffered until the route timeout (504)."""
    stop = asyncio.Event()

    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        for _ in range(100):  # up to 1.6 MB, 16 KiB at a time
            if stop.is_set():
                break
            writer.write(b"e" * 16384)
            await writer.drain()  # fails once the gateway gave up on the connection
            await asyncio.sleep(0.002)
        await asyncio.wait_for(stop.wait(), 5)
        return False

    up = await scripted(answer)
    client = await gateway(routes=public(up.url, timeout=2))
    try:
        r = await client.get("/public/x")
        assert_bad_gateway(r.status, await r.read())
        await asyncio.wait_for(up.conn_closed.wait(), 5)  # the gateway closed it
        assert not stop.is_set()
    finally:
        stop.set()


async def test_stray_response_after_a_complete_one_changes_nothing(gateway, scripted):
    """Bytes after a complete response in the same packet are not parsed into it: the client
    gets the first response's status, headers and body, and the connection is not reused."""
    up = await scripted(canned(ok(b"real", "X-Which: first")
                               + b"HTTP/1.1 404 Not Found\r\nX-Which: second\r\n"
                                 b"Content-Length: 4\r\n\r\nevil"))
    client = await gateway(routes=public(up.url))
    for i in range(2):
        raw = await raw_exchange(client.server.port, GET_CLOSE)
        r = parse_response(raw)
        if r.status == 502:  # refusing the whole exchange is acceptable too
            assert_bad_gateway(r.status, r.body)
        else:
            assert (r.status, r.body, r.all("X-Which")) == (200, b"real", ["first"]), raw[:300]
    assert up.accepted == 2  # the connection with stray bytes was not reused


async def test_odd_status_codes_are_not_a_500(gateway, scripted):
    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        code = seen.path.rsplit("/", 1)[1]
        writer.write(ok(b"odd", status=f"{code} Whatever"))
        return True

    up = await scripted(answer)
    client = await gateway(routes=public(up.url))
    for code in (299, 418, 599, 600, 999):
        raw = await raw_exchange(client.server.port,
                                 f"GET /public/{code} HTTP/1.1\r\nHost: gw\r\n"
                                 f"Connection: close\r\n\r\n".encode())
        r = parse_response(raw)
        if r.status == 502:
            assert_bad_gateway(r.status, r.body)
        else:
            assert (r.status, r.body) == (code, b"odd"), raw[:200]


# --- 8. a body cut short on a reused connection ---------------------------------------------------
async def test_body_cut_short_on_a_reused_connection_is_not_passed_off(gateway, scripted):
    """The cut-short cases of test_proxy, on a connection that already served an answer."""
    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if seen.seq == 0:
            writer.write(ok(b"warm"))
            return True
        if seen.path.endswith("/sized"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"s" * 10)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n"
                         + b"c" * 10 + b"\r\n")
        return False

    up = await scripted(answer)
    client = await gateway(routes=public(up.url))
    for kind in ("sized", "chunked"):
        assert await (await client.get("/public/warm")).read() == b"warm"
        raw = await raw_exchange(client.server.port,
                                 f"GET /public/{kind} HTTP/1.1\r\nHost: gw\r\n"
                                 f"Connection: close\r\n\r\n".encode())
        if raw.startswith(b"HTTP/1.1 502"):
            assert_bad_gateway(502, parse_response(raw).body)
        else:  # the head went out: the client must be able to tell the body is incomplete
            assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
            assert not complete(raw), raw[-100:]


# --- 9. request framing as the upstream sees it ---------------------------------------------------
@pytest.fixture
async def recorder(scripted) -> Scripted:
    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(ok(hashlib.sha256(seen.body).hexdigest().encode()))
        return True

    return await scripted(answer)


def _framing(seen: Seen) -> tuple[list[str], list[str]]:
    return seen.all("Content-Length"), [v.lower() for v in seen.all("Transfer-Encoding")]


async def test_bodyless_requests_are_framed_by_method(gateway, recorder):
    client = await gateway(routes=public(recorder.url))
    for method in ("GET", "DELETE", "OPTIONS", "POST", "PUT", "PATCH"):
        r = await client.request(method, "/public/x")
        assert r.status == 200, (method, await r.text())
        seen = recorder.seen[-1]
        assert seen.line.startswith(method + " ")
        want = ([], []) if method in ("GET", "DELETE", "OPTIONS") else (["0"], [])
        assert _framing(seen) == want, (method, seen.head)
        assert seen.wire_body == b""


async def test_sized_bodies_arrive_with_their_exact_length(gateway, recorder):
    client = await gateway(routes=public(recorder.url, max_body="4MB"))
    for size in (1, 5000, 64 * 1024, 64 * 1024 + 1, 1024 * 1024):
        payload = bytes(i % 251 for i in range(size))
        r = await client.post("/public/sized", data=payload,
                              headers={"Content-Type": "application/octet-stream"})
        assert await r.text() == hashlib.sha256(payload).hexdigest(), size
        seen = recorder.seen[-1]
        assert _framing(seen) == ([str(size)], []), (size, seen.head)
        assert seen.wire_body == payload
    assert recorder.accepted == 1  # all on one keep-alive connection


async def test_chunked_client_body_arrives_whole_and_chunked(gateway, recorder):
    client = await gateway(routes=public(recorder.url, max_body="4MB"))
    parts = [b"first-", b"", b"x" * 100_000, b"-last"]

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part
            await asyncio.sleep(0.01)

    r = await client.post("/public/chunked", data=body())
    whole = b"".join(parts)
    assert await r.text() == hashlib.sha256(whole).hexdigest()
    seen = recorder.seen[-1]
    assert _framing(seen) == ([], ["chunked"]), seen.head
    assert seen.body == whole
    assert seen.wire_body.endswith(b"0\r\n\r\n")
    # The client's Content-Length/Transfer-Encoding are replaced, never doubled.
    assert len(seen.all("Transfer-Encoding")) == 1


async def test_expect_continue_is_answered_by_the_gateway_not_forwarded(gateway, recorder):
    client = await gateway(routes=public(recorder.url))
    r = await client.post("/public/e", data=b"abc", expect100=True)
    assert await r.text() == hashlib.sha256(b"abc").hexdigest()
    seen = recorder.seen[-1]
    assert seen.all("Expect") == [] and seen.body == b"abc"


# --- 10. response headers --------------------------------------------------------------------
async def test_non_utf8_header_bytes_are_relayed_not_a_500(gateway, scripted):
    up = await scripted(canned(
        b"HTTP/1.1 200 Caf\xe9\r\nX-Latin: caf\xe9\r\nX-Utf8: caf\xc3\xa9\r\n"
        b"Content-Disposition: attachment; filename=\"r\xe9sum\xe9.pdf\"\r\n"
        b"X-Bytes: \xff\xfe\r\nX-Tabs: a\tb\r\nX-Empty:\r\nX-!#$%&'*+.^_`|~: token\r\n"
        b"Content-Length: 2\r\n\r\nok"))
    client = await gateway(routes=public(up.url))
    raw = await raw_exchange(client.server.port, GET_CLOSE)
    r = parse_response(raw)
    assert (r.status, r.body) == (200, b"ok"), raw[:300]
    head = raw.partition(b"\r\n\r\n")[0]
    assert b"\r\nX-Utf8: caf\xc3\xa9\r\n" in head  # valid UTF-8 goes through byte for byte
    # obs-text is relayed as the same characters (aiohttp writes header values as UTF-8).
    assert (b"\r\nX-Latin: caf\xe9\r\n" in head) or (b"\r\nX-Latin: caf\xc3\xa9\r\n" in head)
    assert b"filename=\"r" in head
    names = r.names()
    assert {"x-bytes", "x-tabs", "x-empty", "x-!#$%&'*+.^_`|~"} <= names, r.headers
    assert r.header("X-Tabs") == "a\tb" and r.header("X-Empty") == ""


async def test_connection_named_headers_over_several_lines_are_dropped_when_streaming(
        gateway, scripted):
    big = b"b" * 100_000  # over the small-body limit: the streamed path
    up = await scripted(canned(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: X-Hop-One, x-hop-two\r\n"
        b"Keep-Alive: timeout=5\r\nX-Hop-One: 1\r\nX-Hop-Two: 2\r\nSet-Cookie: a=1\r\n"
        b"Set-Cookie: b=2\r\nContent-Length: %d\r\n\r\n" % len(big) + big))
    client = await gateway(routes=public(up.url))
    r = parse_response(await raw_exchange(client.server.port, GET_CLOSE))
    assert r.status == 200 and r.body == big
    assert not {"x-hop-one", "x-hop-two", "keep-alive"} & r.names(), r.headers
    assert r.all("Set-Cookie") == ["a=1", "b=2"]
    assert r.header("Content-Length") == str(len(big))


# --- 11. a client that goes away mid-response ---------------------------------------------------
@pytest.mark.parametrize("cancellation", [True, False], ids=["cancelled", "write-fails"])
async def test_abandoned_response_closes_the_upstream_connection(
        aiohttp_client, make_yaml, scripted, cancellation):
    """The client goes away mid-body. With handler cancellation (how serve.py runs) the
    upstream may be idle meanwhile; without it the gateway notices on its next write, so
    that upstream keeps sending. Either way the half-read connection is closed, never pooled."""
    from gateway.app import create_app
    from gateway.config import load_config_text

    after_abandon: list[bytes] = []

    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if seen.path.endswith("/next"):
            writer.write(ok(b"the-next-answer"))
            return True
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"%x\r\n%s\r\n" % (1000, b"a" * 1000))
        await writer.drain()
        if cancellation:
            assert seen.reader is not None
            # b"" once the gateway closes the connection; a byte if it sent it another request
            after_abandon.append(await asyncio.wait_for(seen.reader.read(1), 5))
            return False
        for i in range(500):  # bounded: 500 x 20 ms
            writer.write(b"%x\r\n%s\r\n" % (1000, bytes([97 + i % 26]) * 1000))
            await writer.drain()  # raises once the gateway closed this connection
            await asyncio.sleep(0.02)
        writer.write(b"0\r\n\r\n")
        return True

    up = await scripted(answer)
    text = make_yaml(up.url, routes=public(up.url)).replace("{port}", "0")
    client = await aiohttp_client(create_app(load_config_text(text, "t.yaml")),
                                  server_kwargs={"handler_cancellation": cancellation})
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(b"GET /public/stream HTTP/1.1\r\nHost: gw\r\n\r\n")
    await writer.drain()
    first = await asyncio.wait_for(reader.read(4096), 5)
    assert first.startswith(b"HTTP/1.1 200")
    writer.transport.abort()  # the client goes away mid-body
    await asyncio.wait_for(up.conn_closed.wait(), 5)  # ... and so does the upstream connection
    assert 0 in up.closed_conns
    assert after_abandon == ([b""] if cancellation else [])
    r = await client.get("/public/next")
    assert (r.status, await r.read()) == (200, b"the-next-answer")
    assert [(s.conn, s.path) for s in up.seen] == [(0, "/public/stream"), (1, "/public/next")]


# --- 12. https upstreams ---------------------------------------------------------------------------
def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@dataclass
class TlsUpstream:
    cert: Path
    port: int = field(default_factory=free_port)
    ports: list[int] = field(default_factory=list)
    runner: web.AppRunner | None = None

    async def start(self, key: Path) -> TlsUpstream:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, key)
        self.runner = web.AppRunner(await _peer_app(self.ports), access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=context).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def tls_upstream(tmp_path: Path) -> AsyncIterator[TlsUpstream]:
    cert, key = _self_signed(tmp_path)
    up = await TlsUpstream(cert).start(key)
    yield up
    await up.stop()


async def test_untrusted_https_upstream_is_refused(gateway, tls_upstream):
    client = await gateway(routes=public(f"https://127.0.0.1:{tls_upstream.port}"))
    r = await client.get("/public/x")
    assert_bad_gateway(r.status, await r.read())
    assert tls_upstream.ports == []  # no request went over the unverified connection


async def test_trusted_https_upstream_works_and_keeps_alive(tls_upstream):
    context = ssl.create_default_context(cafile=str(tls_upstream.cert))
    pool = UpstreamPool(ssl_context=context)
    origin = Origin("127.0.0.1", tls_upstream.port, True)
    try:
        for i in range(3):
            head = serialise_head("POST", f"/t{i}", [("Host", "127.0.0.1"),
                                                     ("Content-Length", "3")])
            ex = await pool.send(origin, "POST", head, b"abc", None, connect_timeout=2,
                                 timeout=2, replayable=True)
            try:
                assert ex.status == 200
                assert json.loads(await ex.read(2)) == {"path": f"/t{i}", "size": 3}
            finally:
                ex.release()
    finally:
        await pool.close()
    assert len(tls_upstream.ports) == 3 and len(set(tls_upstream.ports)) == 1


# --- 13. no header-line injection -------------------------------------------------------------
@pytest.mark.parametrize("method,target,headers", [
    ("GET", "/x", [("X-A", "1\r\nX-Injected: 1")]),
    ("GET", "/x", [("X-A", "1\nX-Injected: 1")]),
    ("GET", "/x", [("X-A", "1\rX-Injected: 1")]),
    ("GET", "/x", [("X-A\r\nX-Injected", "1")]),
    ("GET", "/x\r\nX-Injected: 1", []),
    ("GET", "/x HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /y", [("Host", "h")]),
    ("GET\r\n", "/x", []),
])
def test_serialise_head_refuses_line_breaks(method, target, headers):
    with pytest.raises(ValueError):
        serialise_head(method, target, headers)


def test_serialise_head_writes_exactly_the_given_lines():
    head = serialise_head("PUT", "/a?b=%20c", [("Host", "u:1"), ("X-Empty", ""),
                                               ("X-Utf8", "caf\u00e9")])
    assert head == (b"PUT /a?b=%20c HTTP/1.1\r\nHost: u:1\r\nX-Empty: \r\n"
                    b"X-Utf8: caf\xc3\xa9\r\n\r\n")


INJECTIONS = [
    b"GET /public/a%0D%0AX-Injected:%201 HTTP/1.1\r\nHost: gw\r\n",
    b"GET /public/a?q=%0D%0AX-Injected:%201 HTTP/1.1\r\nHost: gw\r\n",
    b"GET /public/a HTTP/1.1\r\nHost: gw\r\nX-A: 1\r\n X-Injected: folded\r\n",
    b"GET /public/a HTTP/1.1\r\nHost: gw\r\nX-A: 1\rX-Injected: cr\r\n",
    b"GET /public/a HTTP/1.1\r\nHost: gw\r\nX-A: 1\nX-Injected: lf\r\n",
]


@pytest.mark.parametrize("request_head", INJECTIONS, ids=range(len(INJECTIONS)))
async def test_no_injected_header_line_reaches_the_upstream(gateway, recorder, request_head):
    client = await gateway(routes=public(recorder.url))
    raw = await raw_exchange(client.server.port,
                             request_head + b"Connection: close\r\n\r\n", timeout=5)
    if raw:
        assert int(raw.split(b" ", 2)[1]) < 500, raw[:300]
    for seen in recorder.seen:
        lines = seen.head.split(b"\r\n")
        assert not any(ln.lower().startswith(b"x-injected") for ln in lines), seen.head
        assert b"\r" not in b"".join(lines) and b"\n" not in b"".join(lines), seen.head
