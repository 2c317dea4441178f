"""Forwarding: bodies flow both ways without buffering (small ones in one write), WebSockets are
relayed, upstream failures become 502/504, and a client that goes away cancels its request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from gateway.clock import Clock
from gateway.config.model import Route
from gateway.errors import (
    BadGateway,
    BadRequest,
    GatewayTimeout,
    PayloadTooLarge,
    RequestTimeout,
)
from gateway.pipeline.identity import HOP_BY_HOP
from gateway.pipeline.upstream import (
    ConnectFailed,
    Exchange,
    Origin,
    UpstreamError,
    UpstreamPool,
    UpstreamTimeout,
    chunked,
    serialise_head,
)
from gateway.request_state import UPSTREAM_DURATION
from gateway.tokens.claims import Identity

log = logging.getLogger("gateway.proxy")

#: A down upstream is skipped for this long after a failed connect (unless all are down).
_DOWN_FOR = 5.0
#: Sized response bodies up to this are read whole and sent with the head in one write.
_SMALL_BODY = 64 * 1024
#: Dropped from a WebSocket handshake: aiohttp makes its own Sec-WebSocket-*, and the handshake
#: carries no body, so the client's framing must not announce one to the upstream.
_WS_HEADERS = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                         "sec-websocket-protocol", "sec-websocket-accept", "content-length",
                         "transfer-encoding"})
#: Methods whose bodyless requests carry no Content-Length.
_BODYLESS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE"})
#: Session check for long-lived WebSockets: sid -> when it was last refreshed (epoch seconds),
#: None when it is revoked or gone.
SessionProbe = Callable[[str], Awaitable[float | None]]


@dataclass(frozen=True, slots=True)
class _Target:
    scheme: str
    host: str
    port: int | None
    base_path: str
    authority: str
    origin: Origin


class Balancer:
    """Round-robin over a route's upstreams, skipping one that just refused a connection."""

    def __init__(self, urls: tuple[str, ...], clock: Clock):
        self.targets = tuple(_target(URL(u)) for u in urls)
        self._down_until = [0.0] * len(self.targets)
        self._next = 0
        self._clock = clock

    def order(self) -> list[int]:
        n = len(self.targets)
        start = self._next
        self._next = (start + 1) % n
        ring = [(start + i) % n for i in range(n)]
        if n == 1:
            return ring
        now = self._clock.monotonic()
        up = [i for i in ring if self._down_until[i] <= now]
        return up + [i for i in ring if self._down_until[i] > now]

    def failed(self, index: int) -> None:
        self._down_until[index] = self._clock.monotonic() + _DOWN_FOR


def _target(url: URL) -> _Target:
    assert url.host is not None and url.port is not None
    return _Target(url.scheme, url.host, url.explicit_port, url.raw_path.rstrip("/"),
                   url.raw_authority, Origin(url.host, url.port, url.scheme == "https"))


class Proxy:
    def __init__(self, pool: UpstreamPool, session: aiohttp.ClientSession, clock: Clock,
                 probe: SessionProbe | None,
                 watch: Callable[[str, Callable[[], None]], Callable[[], None]],
                 body_timeout: float = 30.0):
        self._pool = pool
        self._session = session  # WebSockets only
        self._body_timeout = body_timeout
        self._clock = clock
        self._probe = probe
        self._watch = watch

    async def forward(
        self, request: web.Request, route: Route, balancer: Balancer, path: str,
        headers: CIMultiDict[str], response_headers: dict[str, str], identity: Identity | None,
        on_prepare: Callable[[web.StreamResponse], None] | None = None,
    ) -> web.StreamResponse:
        if route.websocket and _is_websocket(request):
            return await self._websocket(request, route, balancer, path, headers, identity,
                                         on_prepare)
        body = _request_body(request, route.max_body, self._body_timeout)
        # Small sized bodies are read first: one write with the head, and a retry can resend them.
        payload = await body.read() if body is not None and body.small else None
        _frame(headers, request.method, body, payload)
        query = _raw_query(request)
        order = balancer.order()
        started = self._clock.monotonic()
        try:
            for attempt, index in enumerate(order):
                target = balancer.targets[index]
                if not route.preserve_host:
                    headers["Host"] = target.authority
                stream = None
                if body is not None and payload is None:
                    stream = body.stream() if body.length is not None else chunked(body.stream())
                try:
                    head = serialise_head(request.method, _target_path(target, path, query),
                                          headers.items())
                except ValueError:
                    raise BadRequest("A header value contains a line break.") from None
                try:
                    exchange = await self._pool.send(
                        target.origin, request.method, head, payload, stream,
                        connect_timeout=route.connect_timeout, timeout=route.timeout,
                        replayable=stream is None,
                    )
                except ConnectFailed as e:
                    balancer.failed(index)
                    if attempt + 1 < len(order):
                        continue  # nothing was sent: safe to try the next upstream
                    if e.timed_out:
                        raise GatewayTimeout("The upstream did not accept a connection in time.") from e
                    raise BadGateway(e.message) from e
                return await self._respond(request, route, exchange, response_headers, on_prepare,
                                           started)
        except UpstreamTimeout as e:
            raise GatewayTimeout() from e
        except UpstreamError as e:
            raise BadGateway(e.message) from e
        finally:
            if UPSTREAM_DURATION not in request:
                request[UPSTREAM_DURATION] = self._clock.monotonic() - started
        raise BadGateway()  # unreachable: order() is never empty

    async def _respond(
        self, request: web.Request, route: Route, exchange: Exchange,
        response_headers: dict[str, str], on_prepare: Callable[[web.StreamResponse], None] | None,
        started: float,
    ) -> web.StreamResponse:
        response: web.StreamResponse | None = None
        try:
            status = exchange.status
            has_body = request.method != "HEAD" and status not in (204, 304)
            headers, length = _response_headers(exchange.headers)
            if has_body and (exchange.complete or (length is not None and length <= _SMALL_BODY)):
                # Small answers (most API calls): read whole, sent with the head in one write. A
                # short read fails before anything reaches the client.
                data = await exchange.read(route.timeout)
                request[UPSTREAM_DURATION] = self._clock.monotonic() - started
                headers.popall("Content-Length", None)  # web.Response sets it from the body
                small = web.Response(status=status, reason=exchange.reason, body=data,
                                     headers=headers)
                _add_headers(small.headers, response_headers)
                if on_prepare is not None:
                    on_prepare(small)
                return small
            response = web.StreamResponse(status=status, reason=exchange.reason, headers=headers)
            _add_headers(response.headers, response_headers)
            if on_prepare is not None:
                on_prepare(response)
            await response.prepare(request)
            request[UPSTREAM_DURATION] = self._clock.monotonic() - started
            if has_body:
                async for chunk in exchange.iter_body(route.timeout):
                    await response.write(chunk)
            await response.write_eof()
            return response
        except (UpstreamError, ConnectionError) as e:
            if response is None or not response.prepared:
                raise
            # Headers are out; the only honest signal left is an aborted connection.
            log.info("upstream stream broke after headers: %s", type(e).__name__)
            if request.transport is not None:
                request.transport.close()
            return response
        finally:
            exchange.release()

    # --- WebSocket ----------------------------------------------------------------------------
    async def _websocket(
        self, request: web.Request, route: Route, balancer: Balancer, path: str,
        headers: CIMultiDict[str], identity: Identity | None,
        on_prepare: Callable[[web.StreamResponse], None] | None = None,
    ) -> web.StreamResponse:
        if not web.WebSocketResponse().can_prepare(request).ok:
            # The client's broken handshake is its own error: answer before opening an upstream.
            raise BadRequest("The WebSocket handshake is invalid.")
        target = balancer.targets[balancer.order()[0]]
        scheme = "wss" if target.scheme == "https" else "ws"
        url = _url(target, path, _raw_query(request)).with_scheme(scheme)
        protocols = tuple(
            p.strip() for v in request.headers.getall("Sec-WebSocket-Protocol", ())
            for p in v.split(",") if p.strip()
        )
        for name in list(headers):
            if name.lower() in _WS_HEADERS:
                del headers[name]
        if not route.preserve_host:
            headers["Host"] = target.authority
        try:
            # The whole handshake (connect, then the upstream's 101) within the route's timeout,
            # as a plain request's answer must come; aiohttp takes no per-call timeout here.
            async with asyncio.timeout(route.timeout):
                upstream = await self._session.ws_connect(
                    url, headers=headers, protocols=protocols, autoclose=False, autoping=True,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
                    max_msg_size=route.max_body or 0,
                )
        except TimeoutError as e:
            raise GatewayTimeout("The upstream did not answer the WebSocket upgrade in time.") from e
        except aiohttp.WSServerHandshakeError as e:
            raise BadGateway(f"The upstream refused the WebSocket upgrade ({e.status}).") from e
        except (aiohttp.ClientError, OSError) as e:
            raise BadGateway(_describe(e)) from e
        client = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (), autoclose=False,
            max_msg_size=route.max_body or 0,
        )
        if on_prepare is not None:
            on_prepare(client)  # a session renewed by this upgrade: the 101 carries the cookies
        try:
            await client.prepare(request)
            await self._relay(client, upstream, identity)
        finally:
            await upstream.close()
            if not client.closed:
                await client.close()
        return client

    async def _relay(self, client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse,
                     identity: Identity | None) -> None:
        policy_close = asyncio.Event()
        unwatch: Callable[[], None] | None = None
        timer: asyncio.TimerHandle | None = None
        loop = asyncio.get_running_loop()
        if identity is not None:
            unwatch = self._watch(identity.sid, policy_close.set)
            timer = loop.call_later(max(0.0, identity.exp - self._clock.now()),
                                    lambda: asyncio.ensure_future(expire()))

        # Only a refresh after the token in hand extends the socket. `iat` is whole seconds and
        # the session records its refreshes in ms: a refresh within the token's own second
        # (its issuing login or refresh) is not counted, which can only close a socket early.
        newer_than = identity.iat + 1.0 if identity is not None else 0.0

        async def expire() -> None:
            nonlocal timer, newer_than
            assert identity is not None
            refreshed = await _safe(self._probe(identity.sid)) if self._probe else None
            if refreshed is not None and refreshed >= newer_than:
                # Refreshed since: the socket lives as long as the newest access token does.
                ttl = max(1.0, identity.exp - identity.iat)
                newer_than = refreshed + 0.001
                timer = loop.call_later(max(0.0, refreshed + ttl - self._clock.now()),
                                        lambda: asyncio.ensure_future(expire()))
            else:
                policy_close.set()

        pumps = [
            asyncio.ensure_future(_pump(client, upstream)),
            asyncio.ensure_future(_pump(upstream, client)),
            asyncio.ensure_future(policy_close.wait()),
        ]
        try:
            done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            if pumps[2] in done:
                await client.close(code=1008, message=b"session ended")
        finally:
            for task in pumps:
                task.cancel()
            if unwatch:
                unwatch()
            if timer:
                timer.cancel()


async def _safe(check: Awaitable[float | None]) -> float | None:
    try:
        return await check
    except Exception:  # noqa: BLE001 - a failed check must close the socket, not crash
        return None


async def _pump(source: Any, sink: Any) -> None:
    async for msg in source:
        if msg.type == WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            break
    code = source.close_code or 1000
    if not sink.closed:
        await sink.close(code=code if 1000 <= code < 5000 and code not in (1005, 1006) else 1000)


def _is_websocket(request: web.Request) -> bool:
    # RFC 6455 4.1: the opening handshake is a GET. Another method asking to upgrade was
    # authorized for that method only, so it is forwarded as a plain request (no upgrade).
    return (request.method == "GET"
            and request.headers.get("Upgrade", "").lower() == "websocket"
            and "upgrade" in request.headers.get("Connection", "").lower())


class _Body:
    """The client's body, counted against the route's limit and the idle body timeout."""

    def __init__(self, request: web.Request, limit: int, idle: float):
        self._content = request.content
        self._limit = limit
        self._idle = idle
        self.length = request.content_length
        self.small = self.length is not None and self.length <= _SMALL_BODY

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.stream()])

    async def stream(self) -> AsyncIterator[bytes]:
        seen = 0
        while True:
            try:
                async with asyncio.timeout(self._idle):
                    chunk = await self._content.readany()
            except TimeoutError:
                raise RequestTimeout() from None
            if not chunk:
                return
            seen += len(chunk)
            if self._limit and seen > self._limit:
                raise PayloadTooLarge()
            yield chunk


def _request_body(request: web.Request, limit: int, idle: float) -> _Body | None:
    length = request.content_length
    if length is not None and limit and length > limit:
        raise PayloadTooLarge()
    if not request.body_exists:
        return None
    return _Body(request, limit, idle)


def _frame(headers: CIMultiDict[str], method: str, body: _Body | None,
           payload: bytes | None) -> None:
    """The upstream request's own body framing, never the client's."""
    headers.popall("Content-Length", None)
    if payload is not None:
        headers["Content-Length"] = str(len(payload))
    elif body is not None:
        if body.length is not None:
            headers["Content-Length"] = str(body.length)
        else:
            headers["Transfer-Encoding"] = "chunked"
    elif method not in _BODYLESS:
        headers["Content-Length"] = "0"  # some servers answer a POST without one with 411


def _raw_query(request: web.Request) -> str:
    """The query exactly as the client sent it (aiohttp's query_string is decoded)."""
    return request.raw_path.partition("?")[2]


def _url(target: _Target, path: str, query: str) -> URL:
    return URL.build(
        scheme=target.scheme, host=target.host, port=target.port,
        path=target.base_path + path, query_string=query, encoded=True,
    )


def _target_path(target: _Target, path: str, query: str) -> str:
    return f"{target.base_path}{path}?{query}" if query else target.base_path + path


def _response_headers(raw: list[tuple[bytes, bytes]]) -> tuple[CIMultiDict[str], int | None]:
    """The upstream's end-to-end headers (hop-by-hop and Connection-named ones dropped) and
    its Content-Length, if it gave one and the body is not chunked."""
    pairs = [(_text(n, "latin-1"), _text(v)) for n, v in raw]
    headers: CIMultiDict[str] = CIMultiDict()
    connection_named: set[str] = set()
    length: int | None = None
    chunked_body = False
    for name, value in pairs:
        lower = name.lower()
        if lower == "connection":
            connection_named.update(t.strip().lower() for t in value.split(","))
        elif lower == "transfer-encoding":
            chunked_body = True
        elif lower == "content-length":
            length = int(value) if value.isdigit() else None
    for name, value in pairs:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in connection_named:
            continue
        if lower == "content-length" and chunked_body:
            continue
        headers.add(name, value)
    return headers, None if chunked_body else length


def _add_headers(headers: CIMultiDict[str], extra: dict[str, str]) -> None:
    """The gateway's own response headers over the upstream's. Vary is a list that caches key
    on: the gateway's field is added to the upstream's, never put in its place."""
    for name, value in extra.items():
        if name != "Vary" or "Vary" not in headers:
            headers[name] = value
            continue
        fields = [f.strip() for v in headers.getall("Vary") for f in v.split(",") if f.strip()]
        if "*" not in fields and value.lower() not in (f.lower() for f in fields):
            fields.append(value)
        headers["Vary"] = ", ".join(fields)


def _text(raw: bytes, encoding: str = "utf-8") -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _describe(e: BaseException) -> str:
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "The upstream closed the connection without a response."
    if isinstance(e, (aiohttp.ClientResponseError, aiohttp.ClientPayloadError)):
        return "The upstream sent a malformed response."
    return "The upstream connection failed."
