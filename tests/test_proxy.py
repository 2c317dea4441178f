"""Proxying, in-process: what the upstream received and what the client got, header by header."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from tests.support.ports import free_port
from tests.support.raw_http import AppServer, CannedServer, raw_exchange, raw_request
from tests.support.upstream import Upstream

HOP_BY_HOP = ("connection", "keep-alive", "proxy-connection", "te", "trailer",
              "transfer-encoding", "upgrade", "proxy-authorization")
TRUSTED_LISTEN = "listen: {host: 127.0.0.1, port: {port}, trusted_proxies: ['127.0.0.1']}"


def public(url: str, **options: Any) -> str:
    """A routes block with one public route `/public` to `url` (options as YAML flow values)."""
    extra = "".join(f", {k}: {json.dumps(v)}" for k, v in options.items())
    return f"- {{name: public, path: /public, upstream: {url}, auth: public{extra}}}\n"


def assert_json_error(status: int, body: bytes, want_status: int, code: str) -> None:
    assert status == want_status, body
    assert json.loads(body)["error"] == code


@pytest.fixture
async def second_upstream() -> AsyncIterator[Upstream]:
    up = await Upstream().start()
    yield up
    await up.stop()


# --- hop-by-hop ----------------------------------------------------------------------------
async def test_hop_by_hop_request_headers_are_not_forwarded(gateway, upstream):
    client = await gateway()
    port = client.server.port
    body = b"5\r\nhello\r\n0\r\n\r\n"
    request = (
        b"POST /public/hop HTTP/1.1\r\n"
        b"Host: gw.test\r\n"
        b"Connection: close, X-Private, x-other\r\n"
        b"Keep-Alive: timeout=300\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-Checksum\r\n"
        b"Upgrade: h2c\r\n"
        b"Proxy-Authorization: Basic c2VjcmV0OnNlY3JldA==\r\n"
        b"X-Private: must-not-pass\r\n"
        b"X-Other: nor-this\r\n"
        b"X-Kept: yes\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + body
    )
    r = await raw_request(port, request)
    assert r.status == 200, r.body
    got = upstream.last
    assert got.body_size == 5
    names = got.header_names()
    for name in ("keep-alive", "proxy-connection", "te", "trailer", "upgrade",
                 "proxy-authorization", "x-private", "x-other"):
        assert name not in names, (name, got.headers)
    assert got.header("X-Kept") == "yes"
    # The gateway's client frames the body itself: one Transfer-Encoding of its own, never the
    # client's Connection tokens.
    assert [v for k, v in got.headers if k.lower() == "transfer-encoding"] in ([], ["chunked"])
    connection = (got.header("Connection") or "").lower()
    assert "x-private" not in connection and "x-other" not in connection


async def test_hop_by_hop_response_headers_are_not_forwarded(gateway):
    canned = await CannedServer(
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/plain\r\n"
        b"Content-Length: 2\r\n"
        b"Connection: close, X-Secret-Hop\r\n"
        b"Keep-Alive: timeout=5, max=100\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-Checksum\r\n"
        b"Upgrade: h2c\r\n"
        b"Proxy-Authorization: Basic dXA6c3RyZWFt\r\n"
        b"Proxy-Authenticate: Basic realm=up\r\n"
        b"X-Secret-Hop: internal\r\n"
        b"X-Kept: yes\r\n"
        b"\r\nok"
    ).start()
    try:
        client = await gateway(routes=public(canned.url))
        r = await raw_request(client.server.port,
                              b"GET /public/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    finally:
        await canned.stop()
    assert r.status == 200
    assert r.body == b"ok"
    names = r.names()
    for name in ("keep-alive", "proxy-connection", "te", "trailer", "upgrade",
                 "proxy-authorization", "proxy-authenticate", "x-secret-hop", "transfer-encoding"):
        assert name not in names, (name, r.headers)
    assert "x-secret-hop" not in (r.header("Connection") or "").lower()
    assert r.header("X-Kept") == "yes"


@pytest.mark.parametrize("answer, server", [
    (b"Content-Length: 2\r\n\r\nok", "edge-gateway"),
    (b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", "edge-gateway"),
    (b"Server: backend/1\r\nContent-Length: 2\r\n\r\nok", "backend/1"),
], ids=["small", "streamed", "upstream-named"])
async def test_server_header_never_names_python_or_aiohttp(gateway, answer, server):
    canned = await CannedServer(b"HTTP/1.1 200 OK\r\nConnection: close\r\n" + answer).start()
    try:
        client = await gateway(routes=public(canned.url))
        proxied = await raw_request(client.server.port,
                                    b"GET /public/x HTTP/1.1\r\nHost: gw\r\n\r\n")
        no_route = await raw_request(client.server.port, b"GET /nowhere HTTP/1.1\r\nHost: gw\r\n\r\n")
    finally:
        await canned.stop()
    assert (proxied.status, proxied.body) == (200, b"ok")
    assert proxied.all("Server") == [server]
    assert (no_route.status, no_route.all("Server")) == (404, ["edge-gateway"])
    # (answers to unparseable requests: test_process.py::test_protocol_errors_are_json)


async def test_upstream_transfer_encoding_is_reframed_not_copied(gateway):
    canned = await CannedServer(
        b"HTTP/1.1 200 OK\r\n"
        b"Transfer-Encoding: chunked\r\n"
        b"Connection: close\r\n"
        b"\r\n"
        b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
    ).start()
    try:
        client = await gateway(routes=public(canned.url))
        r = await raw_request(client.server.port,
                              b"GET /public/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    finally:
        await canned.stop()
    assert r.status == 200
    assert r.body == b"abcdefg"
    assert r.all("Transfer-Encoding") in ([], ["chunked"])


# --- X-Forwarded-* and X-Request-Id --------------------------------------------------------
async def test_forwarded_headers_are_set(gateway, upstream):
    client = await gateway()
    r = await client.get("/public/x", headers={"Host": "app.example:8443"})
    assert r.status == 200
    got = upstream.last
    assert got.header("X-Forwarded-For") == "127.0.0.1"
    assert got.header("X-Forwarded-Proto") == "http"
    assert got.header("X-Forwarded-Host") == "app.example:8443"


async def test_untrusted_client_forwarded_headers_are_replaced(gateway, upstream):
    client = await gateway()
    r = await client.get("/public/x", headers={
        "Host": "real.example", "X-Forwarded-For": "203.0.113.9, 10.0.0.1",
        "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example",
        "X-Real-IP": "203.0.113.9", "Forwarded": "for=203.0.113.9",
    })
    assert r.status == 200
    got = upstream.last
    assert [v for k, v in got.headers if k.lower() == "x-forwarded-for"] == ["127.0.0.1"]
    assert got.header("X-Forwarded-Proto") == "http"
    assert got.header("X-Forwarded-Host") == "real.example"
    assert "x-real-ip" not in got.header_names()
    assert "forwarded" not in got.header_names()


async def test_trusted_proxy_forwarded_headers_are_kept_and_appended(gateway, make_yaml, upstream):
    text = make_yaml(upstream.url).replace("listen: {host: 127.0.0.1, port: {port}}",
                                           TRUSTED_LISTEN)
    assert "trusted_proxies" in text
    client = await gateway(config_text=text)
    r = await client.get("/public/x", headers={
        "Host": "inner.example", "X-Forwarded-For": "203.0.113.9, 10.0.0.1",
        "X-Forwarded-Proto": "https", "X-Forwarded-Host": "outer.example",
    })
    assert r.status == 200
    got = upstream.last
    assert got.header("X-Forwarded-For") == "203.0.113.9, 10.0.0.1, 127.0.0.1"
    assert got.header("X-Forwarded-Proto") == "https"
    assert got.header("X-Forwarded-Host") == "outer.example"
    # Without client-supplied values a trusted peer gets the same treatment as anyone.
    r = await client.get("/public/y", headers={"Host": "inner.example"})
    assert r.status == 200
    assert upstream.last.header("X-Forwarded-For") == "127.0.0.1"
    assert upstream.last.header("X-Forwarded-Proto") == "http"
    assert upstream.last.header("X-Forwarded-Host") == "inner.example"


async def test_well_formed_request_id_is_kept(gateway, upstream):
    client = await gateway()
    r = await client.get("/public/x", headers={"X-Request-Id": "req-42.a:b_C"})
    assert r.status == 200
    assert r.headers["X-Request-Id"] == "req-42.a:b_C"
    assert upstream.last.header("X-Request-Id") == "req-42.a:b_C"


async def test_request_id_is_generated_when_absent_or_malformed(gateway, upstream):
    client = await gateway()
    seen: set[str] = set()
    for supplied in (None, "has space", "x" * 129, "semi;colon", "", "new\u00e9line"):
        headers = {} if supplied is None else {"X-Request-Id": supplied}
        r = await client.get("/public/x", headers=headers)
        assert r.status == 200
        rid = r.headers["X-Request-Id"]
        assert rid != supplied and len(rid) == 32 and int(rid, 16) >= 0
        assert [v for k, v in upstream.last.headers if k.lower() == "x-request-id"] == [rid]
        seen.add(rid)
    assert len(seen) == 6  # a fresh id each time


async def test_request_id_on_gateway_errors(gateway):
    client = await gateway()
    r = await client.get("/nowhere", headers={"X-Request-Id": "trace-1"})
    assert r.status == 404
    assert r.headers["X-Request-Id"] == "trace-1"


async def test_upstream_request_id_does_not_override_ours(gateway):
    canned = await CannedServer(
        b"HTTP/1.1 200 OK\r\nX-Request-Id: upstream-made\r\nContent-Length: 0\r\n"
        b"Connection: close\r\n\r\n"
    ).start()
    try:
        client = await gateway(routes=public(canned.url))
        r = await client.get("/public/x", headers={"X-Request-Id": "mine"})
    finally:
        await canned.stop()
    assert r.status == 200
    assert r.headers.getall("X-Request-Id") == ["mine"]


# --- the request target --------------------------------------------------------------------
QUERIES = [
    b"a=%20b&c=%2F&d=%zz&e",
    b"q=a+b&plus=%2B",
    b"k=1&k=2&k=",
    b"empty=&=v&&x",
    b"sp=%7e%7E&u=%C3%A9",
    b"a=b?c=d/e",
    b"x=%2e%2e%2F..%2f&y=;z",
]


async def test_query_string_reaches_upstream_byte_for_byte(gateway, upstream):
    client = await gateway()
    for query in QUERIES:
        target = b"/public/q?" + query
        r = await raw_request(client.server.port, b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\n"
                                                  b"Connection: close\r\n\r\n")
        assert r.status == 200, (query, r.body)
        assert upstream.last.raw_path == target.decode(), query


async def test_query_string_exact_for_the_brief_example(gateway, upstream):
    client = await gateway()
    r = await raw_request(client.server.port, b"GET /public/q?a=%20b&c=%2F&d=%zz&e HTTP/1.1\r\n"
                                              b"Host: gw\r\nConnection: close\r\n\r\n")
    assert r.status == 200
    assert upstream.last.raw_path == "/public/q?a=%20b&c=%2F&d=%zz&e"


async def test_strip_prefix(gateway, upstream):
    client = await gateway(routes=public(upstream.url, strip_prefix=True))
    r = await client.get("/public/a/b?x=1")
    assert r.status == 200
    assert upstream.last.raw_path == "/a/b?x=1"
    r = await client.get("/public")
    assert r.status == 200
    assert upstream.last.raw_path == "/"
    r = await client.get("/publicity")
    assert r.status == 404  # a prefix match is segment-aware


async def test_upstream_base_path_is_prefixed(gateway, upstream):
    client = await gateway(routes=public(upstream.url + "/base/", strip_prefix=True))
    r = await client.get("/public/a?x=1")
    assert r.status == 200
    assert upstream.last.raw_path == "/base/a?x=1"


async def test_host_is_the_upstreams_unless_preserve_host(gateway, upstream):
    client = await gateway()
    r = await client.get("/public/x", headers={"Host": "client.example"})
    assert r.status == 200
    assert upstream.last.header("Host") == f"127.0.0.1:{upstream.port}"
    assert upstream.last.header("X-Forwarded-Host") == "client.example"

    client = await gateway(routes=public(upstream.url, preserve_host=True))
    r = await client.get("/public/x", headers={"Host": "client.example"})
    assert r.status == 200
    assert [v for k, v in upstream.last.headers if k.lower() == "host"] == ["client.example"]


# --- bodies and response headers ------------------------------------------------------------
async def test_request_body_reaches_upstream(gateway, upstream):
    client = await gateway()
    r = await client.post("/public/x", data=b"z" * 100_000)
    assert r.status == 200
    assert upstream.last.body_size == 100_000
    assert upstream.last.method == "POST"


async def test_multiple_set_cookie_headers_survive(gateway):
    client = await gateway()
    r = await client.get("/public/cookies")
    assert r.status == 200
    assert r.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]


async def test_content_encoding_passes_through_without_decompression(gateway):
    payload = json.dumps({"n": list(range(2000))}).encode()
    compressed = gzip.compress(payload, mtime=0)
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Accept-Encoding"))
        return web.Response(body=compressed, headers={
            "Content-Encoding": "gzip", "Content-Type": "application/json",
            "Vary": "Accept-Encoding",
        })

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    up = await AppServer(app).start()
    try:
        client = await gateway(routes=public(up.url))
        r = await raw_request(client.server.port,
                              b"GET /public/g HTTP/1.1\r\nHost: gw\r\n"
                              b"Accept-Encoding: gzip\r\nConnection: close\r\n\r\n")
        r2 = await raw_request(client.server.port, b"GET /public/g HTTP/1.1\r\nHost: gw\r\n"
                                                   b"Connection: close\r\n\r\n")
    finally:
        await up.stop()
    assert r.status == 200
    assert r.header("Content-Encoding") == "gzip"
    assert r.body == compressed
    assert gzip.decompress(r.body) == payload
    # The client's Accept-Encoding is forwarded as sent; the gateway adds none of its own.
    assert seen == ["gzip", None]
    assert r2.body == compressed


# --- upstream failures ---------------------------------------------------------------------
async def test_route_timeout_is_504_before_the_upstream_answers(gateway):
    gave_up = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        try:
            await asyncio.sleep(float(request.query["s"]))
            return web.Response(text="too late")
        except asyncio.CancelledError:
            gave_up.set()  # the gateway dropped the upstream connection when it timed out
            raise

    app = web.Application()
    app.router.add_get("/public/slow", slow)
    up = await AppServer(app).start()
    try:
        client = await gateway(routes=public(up.url, timeout="500ms"))
        started = time.monotonic()
        r = await client.get("/public/slow?s=3")
        elapsed = time.monotonic() - started
        assert r.status == 504
        assert r.headers["Content-Type"].startswith("application/json")
        assert (await r.json())["error"] == "gateway_timeout"
        assert elapsed < 2.5  # the upstream answers only after 3s: the 504 came from the timeout
        await asyncio.wait_for(gave_up.wait(), 2)
    finally:
        await up.stop()


async def test_refused_connection_is_502(gateway):
    client = await gateway(routes=public(f"http://127.0.0.1:{free_port()}"))
    r = await client.get("/public/x")
    assert r.status == 502
    body = await r.json()
    assert body["error"] == "bad_gateway"
    assert body["error_description"]


async def test_upstream_closing_without_response_is_502(gateway):
    canned = await CannedServer(b"").start()
    try:
        client = await gateway(routes=public(canned.url))
        r = await client.get("/public/x")
    finally:
        await canned.stop()
    assert r.status == 502
    assert (await r.json())["error"] == "bad_gateway"


async def test_garbage_from_upstream_is_502(gateway):
    canned = await CannedServer(b"SSH-2.0-OpenSSH_9.0\r\n\r\n").start()
    try:
        client = await gateway(routes=public(canned.url))
        r = await client.get("/public/x")
    finally:
        await canned.stop()
    assert r.status == 502
    assert (await r.json())["error"] == "bad_gateway"


async def test_round_robin_over_upstreams(gateway, upstream, second_upstream):
    routes = (f"- {{name: public, path: /public, upstream: [{upstream.url}, "
              f"{second_upstream.url}], auth: public}}\n")
    client = await gateway(routes=routes)
    for _ in range(6):
        r = await client.get("/public/x")
        assert r.status == 200
    assert len(upstream.received) == 3
    assert len(second_upstream.received) == 3


async def test_refusing_upstream_is_skipped(gateway, upstream, second_upstream):
    dead = f"http://127.0.0.1:{free_port()}"
    routes = (f"- {{name: public, path: /public, upstream: [{upstream.url}, {dead}, "
              f"{second_upstream.url}], auth: public}}\n")
    client = await gateway(routes=routes)
    for _ in range(9):
        r = await client.get("/public/x")
        assert r.status == 200, await r.text()
    assert len(upstream.received) + len(second_upstream.received) == 9
    assert upstream.received and second_upstream.received


async def test_all_upstreams_refusing_is_502(gateway):
    routes = (f"- {{name: public, path: /public, upstream: [http://127.0.0.1:{free_port()}, "
              f"http://127.0.0.1:{free_port()}], auth: public}}\n")
    client = await gateway(routes=routes)
    for _ in range(3):
        r = await client.get("/public/x")
        assert r.status == 502
        assert (await r.json())["error"] == "bad_gateway"


# --- max_body ------------------------------------------------------------------------------
async def test_max_body_by_content_length_before_contacting_upstream(gateway, upstream):
    client = await gateway(routes=public(upstream.url, max_body=1000))
    # Only the head: the gateway must answer without waiting for (or forwarding) the body.
    r = await raw_request(client.server.port, b"POST /public/x HTTP/1.1\r\nHost: gw\r\n"
                                              b"Content-Length: 1001\r\nConnection: close\r\n\r\n",
                          timeout=5)
    assert_json_error(r.status, r.body, 413, "payload_too_large")
    assert upstream.received == []
    r2 = await client.post("/public/x", data=b"x" * 1000)
    assert r2.status == 200
    assert upstream.last.body_size == 1000


async def test_max_body_for_a_chunked_body(gateway, upstream):
    client = await gateway(routes=public(upstream.url, max_body=1000))

    async def body() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"y" * 400

    r = await client.post("/public/x", data=body())
    assert r.status == 413
    assert (await r.json())["error"] == "payload_too_large"
    assert all(rec.body_size <= 1000 for rec in upstream.received)

    async def small() -> AsyncIterator[bytes]:
        for _ in range(2):
            yield b"y" * 400

    r = await client.post("/public/x", data=small())
    assert r.status == 200
    assert upstream.last.body_size == 800


async def test_max_body_chunked_over_raw_socket(gateway, upstream):
    client = await gateway(routes=public(upstream.url, max_body=1000))
    chunk = b"400\r\n" + b"c" * 0x400 + b"\r\n"
    r = await raw_request(client.server.port,
                          b"PUT /public/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n"
                          b"Connection: close\r\n\r\n" + chunk + b"0\r\n\r\n")
    assert_json_error(r.status, r.body, 413, "payload_too_large")


# --- routing errors and hostile input --------------------------------------------------------
async def test_no_route_is_json_404(gateway):
    client = await gateway()
    r = await client.get("/definitely/not/routed")
    assert r.status == 404
    assert r.headers["Content-Type"].startswith("application/json")
    body = await r.json()
    assert body == {"error": "no_route", "error_description": body["error_description"]}
    assert body["error_description"]


HOSTILE: list[bytes] = [
    b"GET /public/%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\nHost: gw\r\n",
    b"GET /public/%2f%2f HTTP/1.1\r\nHost: gw\r\n",
    b"GET /public/%00 HTTP/1.1\r\nHost: gw\r\n",
    b"GET /public/%zz HTTP/1.1\r\nHost: gw\r\n",
    b"GET /public/%e9 HTTP/1.1\r\nHost: gw\r\n",
    b"GET /public/\xc3\xa9 HTTP/1.1\r\nHost: gw\r\n",
    b"GET /public/..;/admin HTTP/1.1\r\nHost: gw\r\n",
    b"GET /public\\..\\admin HTTP/1.1\r\nHost: gw\r\n",
    b"GET * HTTP/1.1\r\nHost: gw\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: gw\r\n",
    b"GET http://other.example/public/x HTTP/1.1\r\nHost: gw\r\n",
    b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n",
    b"GET //public HTTP/1.1\r\nHost: gw\r\n",
    b"GET /public/x HTTP/1.0\r\n",
    b"GET /public/x HTTP/1.1\r\n",
    b"GET /public/x HTTP/1.1\r\nHost: gw\r\nHost: other\r\n",
    b"GET /public/x HTTP/1.1\r\nHost: gw\r\nX-Request-Id: \xff\xfe\r\n",
    b"GET /public/x HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: not-an-ip, ,,\r\n",
    b"GET /public/x HTTP/1.1\r\nHost: gw\r\nConnection: Keep-Alive, , close\r\n",
    b"GET /public/x HTTP/1.1\r\nHost: gw\r\nContent-Length: abc\r\n",
    b"GET /public/x HTTP/1.1\r\nHost: gw\r\nContent-Length: -1\r\n",
    (b"POST /public/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n"
    b"\r\n0\r\n"),
    b"POST /public/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /public/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip\r\n",
    b"GET /public/x HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
    b"GET /public/x HTTP/1.1\r\nHost: gw\r\nCookie: ;;;=;a\r\nAuthorization: Bearer \r\n",
    b"BREW /public/x HTTP/1.1\r\nHost: gw\r\n",
    b"GET /public/x?" + b"q" * 6000 + b" HTTP/1.1\r\nHost: gw\r\n",
    b"GET /" + b"a/" * 3000 + b" HTTP/1.1\r\nHost: gw\r\n",
    b"GET /api/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer a.b.c\r\n",
    b"GET /api/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Basic Og==\r\n",
    b"GET /auth/me HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer \xff\r\n",
    (b"POST /auth/login HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
    b"Content-Length: 5\r\n\r\n{{{{{"),
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    b"GET /public/x HTTP/2.0\r\nHost: gw\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
]


async def test_no_input_produces_a_500(gateway):
    client = await gateway()
    answered = 0
    for request_head in HOSTILE:
        data = request_head
        if b"\r\n" in data and b"\r\n\r\n" not in data:
            data += b"Connection: close\r\n\r\n"
        raw = await _exchange_tolerant(client.server.port, data)
        if not raw:
            continue  # closing the connection is an acceptable answer to garbage
        answered += 1
        assert b"Traceback" not in raw and b"File \"" not in raw, request_head[:60]
        status = int(raw.split(b" ", 2)[1])
        assert status < 500, (request_head[:60], raw[:300])
    assert answered >= len(HOSTILE) - 3


async def _exchange_tolerant(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(65536), 3)
        except (TimeoutError, ConnectionResetError):
            return b""
    finally:
        writer.close()


async def test_errors_are_json_everywhere(gateway, upstream):
    client = await gateway()
    checks: list[tuple[Callable[[], Any], int, str]] = [
        (lambda: client.get("/nowhere"), 404, "no_route"),
        (lambda: client.get("/public/%2e%2e/%2e%2e/x"), 404, "no_route"),
        (lambda: client.get("/api/x"), 401, "missing_token"),
        (lambda: client.post("/healthz"), 405, "method_not_allowed"),
    ]
    for call, status, code in checks:
        r = await call()
        assert r.status == status
        assert r.headers["Content-Type"].startswith("application/json")
        assert (await r.json())["error"] == code


async def test_slow_upload_is_not_an_upstream_timeout(gateway):
    """The route timeout is the upstream's time to answer; a client taking longer than that
    to send its body is not the upstream timing out."""
    async def consume(request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        return web.json_response({"size": size})

    app = web.Application()
    app.router.add_post("/{tail:.*}", consume)
    up = await AppServer(app).start()
    try:
        client = await gateway(routes=public(up.url, timeout="300ms"))

        async def trickle() -> AsyncIterator[bytes]:
            for _ in range(3):
                yield b"t" * 100
                await asyncio.sleep(0.5)  # each pause longer than the route timeout

        r = await client.post("/public/x", data=trickle())
        assert r.status == 200, await r.text()
        assert (await r.json())["size"] == 300
    finally:
        await up.stop()


async def test_trusted_proxy_forwarded_for_over_several_header_lines(gateway, make_yaml, upstream):
    """Several X-Forwarded-For lines are one list (RFC 9110 §5.3): no hop may be dropped."""
    text = make_yaml(upstream.url).replace("listen: {host: 127.0.0.1, port: {port}}",
                                           TRUSTED_LISTEN)
    client = await gateway(config_text=text)
    r = await raw_request(client.server.port,
                          b"GET /public/x HTTP/1.1\r\nHost: gw\r\n"
                          b"X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-For: 198.51.100.7\r\n"
                          b"Connection: close\r\n\r\n")
    assert r.status == 200
    assert [v for k, v in upstream.last.headers if k.lower() == "x-forwarded-for"] == [
        "203.0.113.9, 198.51.100.7, 127.0.0.1"]


async def test_head_is_proxied_without_a_body(gateway, upstream):
    client = await gateway()
    r = await raw_request(client.server.port, b"HEAD /public/x HTTP/1.1\r\nHost: gw\r\n"
                                              b"Connection: close\r\n\r\n")
    assert r.status == 200
    assert r.body == b""
    assert int(r.header("Content-Length") or 0) > 0  # the upstream's length for the GET body
    assert upstream.last.method == "HEAD"


async def test_upstream_204_and_304_pass_through(gateway):
    async def status(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        return web.Response(status=code, headers={"ETag": '"v1"'})

    app = web.Application()
    app.router.add_get("/public/{code}", status)
    up = await AppServer(app).start()
    try:
        client = await gateway(routes=public(up.url))
        for code in (204, 304):
            r = await client.get(f"/public/{code}", headers={"If-None-Match": '"v1"'})
            assert r.status == code
            assert r.headers["ETag"] == '"v1"'
            assert await r.read() == b""
    finally:
        await up.stop()


async def test_small_upstream_body_cut_short_is_a_502(gateway):
    # Small sized bodies are read whole before anything is sent: a short one never starts a 200.
    canned = await CannedServer(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\nonly-part"
    ).start()
    try:
        client = await gateway(routes=public(canned.url))
        r = await raw_request(client.server.port,
                              b"GET /public/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    finally:
        await canned.stop()
    assert r.status == 502
    assert json.loads(r.body)["error"] == "bad_gateway"


async def test_large_upstream_body_cut_short_is_not_passed_off_as_complete(gateway):
    # Large bodies stream: once the head is out, a short body is signalled by the connection
    # closing before the declared length.
    canned = await CannedServer(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\nConnection: close\r\n\r\nonly-part"
    ).start()
    try:
        client = await gateway(routes=public(canned.url))
        r = await raw_request(client.server.port,
                              b"GET /public/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    finally:
        await canned.stop()
    assert r.status == 200
    assert r.header("Content-Length") == "1000000"
    assert len(r.body) < 1000000  # the client sees a short body against the declared length


async def test_chunked_upstream_body_cut_short_is_not_terminated(gateway):
    canned = await CannedServer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"5\r\nhello\r\n"
    ).start()
    try:
        client = await gateway(routes=public(canned.url))
        raw = await raw_exchange(client.server.port, b"GET /public/x HTTP/1.1\r\nHost: gw\r\n"
                                                     b"Connection: close\r\n\r\n")
    finally:
        await canned.stop()
    assert raw.startswith(b"HTTP/1.1 200")
    assert b"hello" in raw
    assert not raw.endswith(b"0\r\n\r\n")  # no last-chunk: the client knows the body is broken


async def test_gateway_adds_no_request_headers_of_its_own(gateway, upstream):
    """Only what the client sent, minus what is stripped, plus the documented gateway headers."""
    client = await gateway()
    r = await raw_request(client.server.port, b"POST /public/x HTTP/1.1\r\nHost: gw\r\n"
                                              b"Content-Length: 2\r\nConnection: close\r\n\r\nhi")
    assert r.status == 200
    assert upstream.last.header_names() == {
        "host", "content-length", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
        "x-request-id",
    }
    r = await raw_request(client.server.port, b"GET /public/x HTTP/1.1\r\nHost: gw\r\n"
                                              b"Accept: text/html\r\nUser-Agent: probe/1\r\n"
                                              b"Connection: close\r\n\r\n")
    assert r.status == 200
    assert upstream.last.header("Accept") == "text/html"
    assert upstream.last.header("User-Agent") == "probe/1"
