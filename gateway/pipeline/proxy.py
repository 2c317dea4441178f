"""Streaming forward over one pooled client: bodies flow both ways without buffering, WebSockets
are relayed, upstream failures become 502/504, and a client that goes away cancels its request."""

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
from gateway.request_state import UPSTREAM_DURATION
from gateway.tokens.claims import Identity

log = logging.getLogger("gateway.proxy")

#: A down upstream is skipped for this long after a failed connect (unless all are down).
_DOWN_FOR = 5.0
_CHUNK = 64 * 1024
#: Sized response bodies up to this are read whole and sent with the head in one write.
_SMALL_BODY = 64 * 1024
_WS_HEADERS = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                         "sec-websocket-protocol", "sec-websocket-accept"})
#: aiohttp's client would add these to a request that lacks them; the upstream gets what the
#: client sent.
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
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
    assert url.host is not None
    return _Target(url.scheme, url.host, url.explicit_port, url.raw_path.rstrip("/"),
                   url.raw_authority)


class Proxy:
    def __init__(self, session: aiohttp.ClientSession, clock: Clock, probe: SessionProbe | None,
                 watch: Callable[[str, Callable[[], None]], Callable[[], None]],
                 body_timeout: float = 30.0):
        self._session = session
        self._body_timeout = body_timeout
        self._clock = clock
        self._probe = probe
        self._watch = watch
        self._timeouts: dict[str, aiohttp.ClientTimeout] = {}

    def _timeout(self, route: Route) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(route.name)
        if timeout is None:
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=route.connect_timeout, sock_read=route.timeout
            )
            self._timeouts[route.name] = timeout
        return timeout

    async def forward(
        self, request: web.Request, route: Route, balancer: Balancer, path: str,
        headers: CIMultiDict[str], response_headers: dict[str, str], identity: Identity | None,
        on_prepare: Callable[[web.StreamResponse], None] | None = None,
    ) -> web.StreamResponse:
        if route.websocket and _is_websocket(request):
            return await self._websocket(request, route, balancer, path, headers, identity,
                                         on_prepare)
        body = _request_body(request, route.max_body, self._body_timeout)
        order = balancer.order()
        for attempt, index in enumerate(order):
            target = balancer.targets[index]
            url = _url(target, path, _raw_query(request))
            if not route.preserve_host:
                headers["Host"] = target.authority
            try:
                return await self._exchange(request, route, url, headers, body, response_headers,
                                            on_prepare)
            except aiohttp.ClientConnectorError as e:
                balancer.failed(index)
                if attempt + 1 < len(order):
                    continue  # nothing was sent: safe to try the next upstream
                raise BadGateway("The upstream refused the connection.") from e
        raise BadGateway()  # unreachable: order() is never empty

    async def _exchange(
        self, request: web.Request, route: Route, url: URL, headers: CIMultiDict[str],
        body: _Body | None, response_headers: dict[str, str],
        on_prepare: Callable[[web.StreamResponse], None] | None,
    ) -> web.StreamResponse:
        started = self._clock.monotonic()
        response: web.StreamResponse | None = None
        try:
            async with self._session.request(
                request.method, url, headers=headers, data=body.stream() if body else None,
                timeout=self._timeout(route), allow_redirects=False, compress=False,
                chunked=None, skip_auto_headers=_NO_AUTO_HEADERS,
            ) as upstream:
                has_body = request.method != "HEAD" and upstream.status not in (204, 304)
                length = upstream.content_length
                if has_body and length is not None and length <= _SMALL_BODY:
                    # Small, sized bodies (most API answers): read them whole and send head and
                    # body in one write. A short read raises before anything reaches the client.
                    data = await upstream.read()
                    request[UPSTREAM_DURATION] = self._clock.monotonic() - started
                    small = web.Response(status=upstream.status, reason=upstream.reason, body=data)
                    _copy_response_headers(upstream, small, skip_length=True)
                    small.headers.update(response_headers)
                    if on_prepare is not None:
                        on_prepare(small)
                    return small
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                _copy_response_headers(upstream, response)
                response.headers.update(response_headers)
                if on_prepare is not None:
                    on_prepare(response)
                await response.prepare(request)
                request[UPSTREAM_DURATION] = self._clock.monotonic() - started
                if has_body:
                    async for chunk in upstream.content.iter_any():
                        await response.write(chunk)
                await response.write_eof()
                return response
        except aiohttp.ClientConnectorError:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            if body is not None and body.too_large:
                raise PayloadTooLarge() from None
            if body is not None and body.too_slow and not (response and response.prepared):
                raise RequestTimeout() from None
            if response is not None and response.prepared:
                # Headers are out; the only honest signal left is an aborted connection.
                log.info("upstream stream broke after headers: %s", type(e).__name__)
                if request.transport is not None:
                    request.transport.close()
                return response
            if isinstance(e, asyncio.TimeoutError):
                raise GatewayTimeout() from e
            raise BadGateway(_describe(e)) from e
        finally:
            if UPSTREAM_DURATION not in request:
                request[UPSTREAM_DURATION] = self._clock.monotonic() - started

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
            upstream = await self._session.ws_connect(
                url, headers=headers, protocols=protocols, autoclose=False, autoping=True,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
                max_msg_size=route.max_body or 0,
            )
        except aiohttp.WSServerHandshakeError as e:
            raise BadGateway(f"The upstream refused the WebSocket upgrade ({e.status}).") from e
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
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
    return (request.headers.get("Upgrade", "").lower() == "websocket"
            and "upgrade" in request.headers.get("Connection", "").lower())


class _Body:
    """The client's body as a stream to the upstream, counted against the route's limit."""

    def __init__(self, request: web.Request, limit: int, idle: float):
        self._content = request.content
        self._limit = limit
        self._idle = idle
        self.too_large = False
        self.too_slow = False

    async def stream(self) -> AsyncIterator[bytes]:
        seen = 0
        while True:
            try:
                chunk = await asyncio.wait_for(self._content.readany(), self._idle)
            except asyncio.TimeoutError:
                self.too_slow = True
                raise RequestTimeout() from None
            if not chunk:
                return
            seen += len(chunk)
            if self._limit and seen > self._limit:
                self.too_large = True
                raise PayloadTooLarge()
            yield chunk


def _request_body(request: web.Request, limit: int, idle: float) -> _Body | None:
    length = request.content_length
    if length is not None and limit and length > limit:
        raise PayloadTooLarge()
    if not request.body_exists:
        return None
    return _Body(request, limit, idle)


def _raw_query(request: web.Request) -> str:
    """The query exactly as the client sent it (aiohttp's query_string is decoded)."""
    return request.raw_path.partition("?")[2]


def _url(target: _Target, path: str, query: str) -> URL:
    return URL.build(
        scheme=target.scheme, host=target.host, port=target.port,
        path=target.base_path + path, query_string=query, encoded=True,
    )


def _copy_response_headers(
    upstream: aiohttp.ClientResponse, response: web.StreamResponse, *, skip_length: bool = False
) -> None:
    connection = upstream.headers.getall("Connection", ())
    connection_named = {t.strip().lower() for v in connection for t in v.split(",")}
    for name, value in upstream.headers.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in connection_named:
            continue
        if skip_length and lower == "content-length":
            continue  # web.Response sets it from the body it holds
        response.headers.add(name, value)


def _describe(e: BaseException) -> str:
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "The upstream closed the connection without a response."
    if isinstance(e, (aiohttp.ClientResponseError, aiohttp.ClientPayloadError)):
        return "The upstream sent a malformed response."
    return "The upstream connection failed."
