"""Where an error becomes a response (the only place), request ids, and the JSON access log."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING, Any

from aiohttp import web, web_protocol, web_server
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from gateway.errors import (
    BadRequest,
    GatewayError,
    HeadersTooLarge,
    MethodNotAllowed,
    NoRoute,
    PayloadTooLarge,
    RequestTimeout,
    UriTooLong,
)
from gateway.logs import emit
from gateway.metrics import Metrics
from gateway.request_state import (
    AUTH_FAILURE,
    IDENTITY,
    PENDING_COOKIES,
    REQUEST_ID,
    ROUTE_NAME,
    UPSTREAM_DURATION,
)

log = logging.getLogger("gateway")
access_log = logging.getLogger("gateway.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: The Server header of the gateway's own answers: the product, not the versions of the
#: Python and aiohttp behind it (aiohttp would add those).
SERVER = "edge-gateway"
if TYPE_CHECKING:
    from aiohttp.typedefs import Middleware

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(error: GatewayError, realm: str) -> web.Response:
    """The JSON body `{"error", "error_description"}` plus the headers the error calls for."""
    body = json.dumps({"error": error.code, "error_description": error.description})
    response = web.Response(status=error.status, text=body, content_type="application/json")
    response.headers["Cache-Control"] = "no-store"
    response.headers["Server"] = SERVER  # also answers that never reach the application
    for name, value in error.headers.items():
        response.headers[name] = value
    if error.bearer_error is not None:
        challenge = f'Bearer realm="{realm}"'
        if error.bearer_error:
            description = error.description.replace('"', "'")
            challenge += f', error="{error.bearer_error}", error_description="{description}"'
        response.headers["WWW-Authenticate"] = challenge
    return response


def _from_http_exception(e: web.HTTPException) -> GatewayError:
    """aiohttp's own exceptions (raised by aiohttp internals) in our vocabulary."""
    if e.status == 404:
        return NoRoute()
    if e.status == 405:
        return MethodNotAllowed()
    if e.status == 413:
        return PayloadTooLarge()
    if e.status == 431:
        return HeadersTooLarge()
    if 400 <= e.status < 500:
        error = BadRequest(e.reason)
        error.status = e.status
        return error
    return GatewayError()


def new_request_id(supplied: str | None) -> str:
    if supplied and _REQUEST_ID.match(supplied):
        return supplied
    return os.urandom(16).hex()


def make_middleware(
    realm: str, metrics: Metrics
) -> Middleware:
    @web.middleware
    async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = new_request_id(request.headers.get("X-Request-Id"))
        request[REQUEST_ID] = request_id
        started = time.monotonic()
        metrics.in_flight.inc()
        status = 499  # the client went away before we answered
        try:
            try:
                response = await handler(request)
            except GatewayError as e:
                response = error_response(e, realm)
                metrics.refused(e)
                failure = request.get(AUTH_FAILURE)
                if failure:
                    metrics.token_failure(failure)
            except web.HTTPException as e:
                response = error_response(_from_http_exception(e), realm)
            except (asyncio.CancelledError, ConnectionResetError):
                raise
            except Exception:
                # Logged with its traceback for operators; the client learns only the request id.
                log.exception("unhandled error (request id %s)", request_id)
                response = error_response(GatewayError(), realm)
            if not response.prepared:
                response.headers["X-Request-Id"] = request_id
                pending = request.get(PENDING_COOKIES)
                if pending is not None:
                    pending.apply(response)  # the same cookies again on a proxied answer: one each
                if response.status == RequestTimeout.status and request.protocol is not None:
                    # A too-slow body: answer, then hang up rather than linger reading the rest.
                    response.force_close()
                    await response.prepare(request)
                    await response.write_eof()
                    request.protocol.force_close()
            status = response.status
            return response
        finally:
            metrics.in_flight.dec()
            metrics.observe_request(request.get(ROUTE_NAME, "gateway"), status,
                                    time.monotonic() - started, request.get(UPSTREAM_DURATION))

    return gateway_middleware


async def server_header(_request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: a proxied answer keeps the upstream's Server; any other says ours.
    (aiohttp fills in its own before or after this hook, depending on its version.)"""
    if response.headers.get("Server", SERVER_SOFTWARE) == SERVER_SOFTWARE:
        response.headers["Server"] = SERVER


def _json(value: Any) -> str:
    """One JSON value, as json.dumps writes it: strings through its C escaper, ints as digits."""
    kind = type(value)
    if kind is str:
        return encode_basestring_ascii(value)
    if kind is int:
        return int.__repr__(value)
    return "null" if value is None else json.dumps(value)


class JsonAccessLogger(AbstractAccessLogger):
    """One JSON line per request; the path without its query (values there may be secrets).

    The line is written out field by field, the same bytes `json.dumps` made of the same dict,
    and handed to `gateway.logs.emit`: every proxied request pays for it, so it skips LogRecord
    and Formatter (and keeps their redaction)."""

    _second = -1
    _stamp = ""

    def _time(self) -> str:
        # strftime once per second per connection, not per request
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        return f"{self._stamp}.{int(now % 1 * 1000):03d}Z"

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time_: float) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        identity = request.get(IDENTITY)
        upstream = request.get(UPSTREAM_DURATION)
        failure = request.get(AUTH_FAILURE)
        line = (
            f'{{"time":"{self._time()}","request_id":{_json(request.get(REQUEST_ID))},'
            f'"remote":{_json(request.remote)},"method":{encode_basestring_ascii(request.method)},'
            f'"path":{encode_basestring_ascii(request.raw_path.partition("?")[0][:2048])},'
            f'"route":{_json(request.get(ROUTE_NAME))},"status":{response.status},'
            f'"bytes":{_json(response.body_length)},"duration_ms":{round(time_ * 1000, 3)!r},'
            f'"upstream_ms":{"null" if upstream is None else repr(round(upstream * 1000, 3))},'
            f'"user_id":{_json(identity.sub) if identity else "null"},'
            f'"session_id":{_json(identity.sid) if identity else "null"}'
            + (f',"auth_failure":{_json(failure)}}}' if failure else "}")
        )
        emit(self.logger, line)

    @property
    def enabled(self) -> bool:
        return True


class _JsonErrorRequestHandler(web_protocol.RequestHandler):
    """The HTTP/1.1 connection handler, with two additions.

    Errors aiohttp raises before any handler runs (bad request line, oversized headers) get the
    same JSON body as everything else and are not logged as server errors. And a client must
    finish each request head within `header_timeout` once it has started sending it, so a
    slow-header client cannot hold a connection (and its memory) for ever.
    """

    header_timeout = 10.0
    max_line_size = 8190
    _head_timer: asyncio.TimerHandle | None = None
    _awaiting_head = True
    #: The current head's first bytes, up to just past the longest request line allowed: what
    #: tells a too-long request line (414) from a too-long header line (431).
    _head_start = b""

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head and len(self._head_start) <= self.max_line_size:
            self._head_start += data[:self.max_line_size + 2 - len(self._head_start)]
        before = self._request_count
        super().data_received(data)
        if self._request_count > before:
            self._awaiting_head = False
            self._cancel_head_timer()
        elif self._awaiting_head and data and self._head_timer is None:
            self._head_timer = self._loop.call_later(self.header_timeout, self._head_too_slow)

    def log_access(self, request: web.BaseRequest, response: web.StreamResponse,
                   time: float | None) -> None:
        super().log_access(request, response, time)
        self._awaiting_head = True  # the next bytes on this connection start a new head
        self._head_start = b""

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        transport = self.transport
        if not self._awaiting_head or transport is None or transport.is_closing():
            return
        body = json.dumps({"error": RequestTimeout.code,
                           "error_description": RequestTimeout.description}).encode()
        transport.write(
            b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
            + body
        )
        transport.close()

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        start = self._head_start
        if isinstance(exc, LineTooLong) and start and b"\n" not in start[:self.max_line_size + 2]:
            error: GatewayError = UriTooLong()
        elif isinstance(exc, LineTooLong) or (
                isinstance(exc, BadHttpMessage) and "Too many headers" in exc.message):
            error = HeadersTooLarge()
        elif isinstance(exc, BadHttpMessage) or 400 <= status < 500:
            error = BadRequest("The request could not be parsed as HTTP/1.1.")
            error.status = status if 400 <= status < 500 else 400
        else:
            log.error("error handling request: %s", type(exc).__name__ if exc else status)
            error = GatewayError()
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        response = error_response(error, "gateway")
        response.force_close()
        return response


class GatewayRunner(web.AppRunner):
    """An AppRunner whose connections answer protocol errors in JSON and time out slow heads."""

    def __init__(self, app: web.Application, *, header_timeout: float = 10.0,
                 max_line_size: int = 8190, **kwargs: Any):
        super().__init__(app, max_line_size=max_line_size, **kwargs)
        handler: type[_JsonErrorRequestHandler] = type(
            "RequestHandler", (_JsonErrorRequestHandler,),
            {"header_timeout": header_timeout, "max_line_size": max_line_size})

        class Server(web_server.Server):
            def __call__(self) -> web_protocol.RequestHandler:
                return handler(self, loop=self._loop, **self._kwargs)

        self._server_class = Server

    async def _make_server(self) -> web_server.Server:
        server = await super()._make_server()
        server.__class__ = self._server_class
        return server
