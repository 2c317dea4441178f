"""Keep-alive HTTP/1.1 to upstreams: pooled asyncio protocols, responses parsed by llhttp.

A proxy needs little of a general HTTP client: no redirects, cookies, decompression, auth or
URL handling, just one write of the request head and the response handed over as it arrives.
aiohttp's client did all of those per request and cost about as much CPU as its server (the
profile in docs/benchmarks.md); this does the part a proxy needs. WebSockets and the user
verifier still use aiohttp's client.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

import httptools

#: Idle connections older than this are not reused (aiohttp's default keep-alive is 15 s too).
IDLE_TIMEOUT = 15.0
#: Idle connections kept per origin; more concurrent requests than this open extra ones.
MAX_IDLE = 128
#: A response head larger than this is refused (a runaway upstream, not an answer).
MAX_HEAD = 64 * 1024
#: Response bytes buffered before reading from the upstream pauses (a slow client).
_HIGH_WATER = 256 * 1024
#: Methods a request may be sent twice with (RFC 9110 §9.2.2): only these are retried when a
#: reused keep-alive connection turns out to have been closed by the upstream.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class UpstreamError(Exception):
    """An exchange with an upstream failed; `message` is safe to show a client."""

    message = "The upstream connection failed."


class ConnectFailed(UpstreamError):
    """No connection could be made: nothing was sent, another upstream may be tried."""

    message = "The upstream refused the connection."

    def __init__(self, timed_out: bool = False):
        super().__init__(self.message)
        self.timed_out = timed_out


class UpstreamTimeout(UpstreamError):
    message = "The upstream did not answer in time."


class UpstreamClosed(UpstreamError):
    message = "The upstream closed the connection without a response."


class Malformed(UpstreamError):
    message = "The upstream sent a malformed response."


@dataclass(frozen=True, slots=True)
class Origin:
    host: str
    port: int
    tls: bool


class _Connection(asyncio.Protocol):
    """One upstream connection; it carries one exchange at a time."""

    def __init__(self, origin: Origin, loop: asyncio.AbstractEventLoop):
        self.origin = origin
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.used = 0
        self._parser: httptools.HttpResponseParser | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._error: UpstreamError | None = None
        self._head_only = False
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._head_bytes = 0  # received while the head was incomplete
        self._framed = False  # Content-Length or chunked: the body does not end at EOF
        self._interim = False
        self.head_done = False
        self.done = False
        self.keep_alive = False
        self.got_bytes = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0

    # --- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._parser is not None and not self.done:
            if self.head_done and not self._framed:
                self.done = True  # a body delimited by the end of the connection
                self.keep_alive = False
            elif self._error is None:
                self._error = UpstreamClosed() if not self.head_done else Malformed(
                    "The upstream closed the connection in the middle of the body.")
        self._wake()
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self.done:
            self._close()  # bytes nobody asked for: the connection can no longer be trusted
            return
        self.got_bytes = True
        if not self.head_done:
            # llhttp buffers a header line until it ends: an endless one is cut off here.
            if self._head_bytes > MAX_HEAD:
                self._fail(Malformed())
                return
            self._head_bytes += len(data)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(Malformed("The upstream switched protocols on a plain request."))
        except httptools.HttpParserError:
            if self.done:
                self._close()  # bytes after a complete answer: it stands, the connection does not
            else:
                self._fail(Malformed())

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    # --- llhttp callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.done:  # a second response in the same read: not parsed into the first
            raise httptools.HttpParserError("bytes after the response")
        self.reason = b""
        self.headers = []

    def on_status(self, reason: bytes) -> None:
        self.reason += reason
        self._count(len(reason))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        if self.head_done:
            return  # a trailer field: never merged into the relayed head (RFC 9110 §6.5.1)
        lower = name.lower()
        if lower == b"content-length" or lower == b"transfer-encoding":
            self._framed = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if status < 100 or status == 101:
            # Not a status, or a protocol switch this path never asks for (it sends no Upgrade).
            raise httptools.HttpParserError(f"status {status}")
        if 100 <= status < 200:
            self._interim = True  # 100 Continue and friends: the real answer follows
            self._framed = False
            return
        self.status = status
        # After HEAD the parser cannot tell where a stray body would end: no reuse.
        self.keep_alive = self._parser.should_keep_alive() and not self._head_only
        self.head_done = True
        if self._head_only or status in (204, 304):
            # No body follows (RFC 9110 §6.4.1), whatever Content-Length says.
            self.done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.done:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.done = True
        self._wake()

    # --- the exchange -----------------------------------------------------------------------
    def start(self, method: str) -> None:
        """Ready for a new response (the request is about to be written)."""
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = method == "HEAD"
        self.status = 0
        self.reason = b""
        self.headers = []
        self._head_size = self._head_bytes = 0
        self._framed = False
        self._interim = False
        self.head_done = self.done = self.keep_alive = self.got_bytes = False
        self._error = None
        self._chunks.clear()
        self._buffered = 0
        self.used += 1

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    async def drain(self, timeout: float) -> None:
        if self._write_paused and not self.closed:
            self._drain = self.loop.create_future()
            await self._wait_for(self._drain, timeout)

    async def head(self, timeout: float) -> None:
        while not self.head_done:
            self._raise_error()
            await self._wait(timeout)
        self._raise_error_unless_done()

    async def read(self, timeout: float) -> bytes:
        while not self.done:
            self._raise_error()
            await self._wait(timeout)
        self._raise_error_unless_done()
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return data

    async def iter_body(self, timeout: float) -> AsyncIterator[bytes]:
        while True:
            if self._chunks:
                data = b"".join(self._chunks)
                self._chunks.clear()
                self._buffered = 0
                if self._read_paused and self.transport is not None and not self.closed:
                    self._read_paused = False
                    self.transport.resume_reading()
                yield data
                continue
            if self.done:
                return
            self._raise_error()
            await self._wait(timeout)

    def reusable(self) -> bool:
        return (self.done and self.keep_alive and not self.closed and self._error is None
                and not self._chunks)

    def finish(self) -> None:
        self._parser = None

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error
        if self.closed and not self.done:
            raise UpstreamClosed()

    def _raise_error_unless_done(self) -> None:
        if self._error is not None:
            raise self._error

    async def _wait(self, timeout: float) -> None:
        self._waiter = self.loop.create_future()
        try:
            await self._wait_for(self._waiter, timeout)
        finally:
            self._waiter = None

    async def _wait_for(self, future: asyncio.Future[None], timeout: float) -> None:
        timer = self.loop.call_later(timeout, _expire, future)
        try:
            await future
        finally:
            timer.cancel()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _count(self, n: int) -> None:
        self._head_size += n
        if self._head_size > MAX_HEAD:
            raise httptools.HttpParserError("response head too large")

    def _fail(self, error: UpstreamError) -> None:
        self._error = error
        self._close()
        self._wake()

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(UpstreamTimeout())


class Exchange:
    """An upstream's response being received; `release()` hands the connection back."""

    __slots__ = ("_conn", "_pool", "_released")

    def __init__(self, conn: _Connection, pool: UpstreamPool):
        self._conn = conn
        self._pool = pool
        self._released = False

    @property
    def status(self) -> int:
        return self._conn.status

    @property
    def reason(self) -> str:
        return self._conn.reason.decode("latin-1").strip()

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return self._conn.headers

    @property
    def complete(self) -> bool:
        return self._conn.done

    async def read(self, timeout: float) -> bytes:
        return await self._conn.read(timeout)

    def iter_body(self, timeout: float) -> AsyncIterator[bytes]:
        return self._conn.iter_body(timeout)

    def release(self) -> None:
        """Back to the pool when the response was read to its end; closed otherwise."""
        if not self._released:
            self._released = True
            self._pool._release(self._conn)


class UpstreamPool:
    def __init__(self, ssl_context: ssl.SSLContext | None = None,
                 monotonic: Callable[[], float] | None = None):
        self._ssl = ssl_context
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._active: set[_Connection] = set()
        self._monotonic = monotonic
        self._closing = False

    async def send(
        self, origin: Origin, method: str, head: bytes, body: bytes | None,
        stream: AsyncIterator[bytes] | None, *, connect_timeout: float, timeout: float,
        replayable: bool,
    ) -> Exchange:
        """Send one request and wait for the response head.

        `head` is the serialised request line and headers; `body` a whole body sent with it, or
        `stream` chunks already framed for the wire. A reused connection that the upstream had
        closed is retried once on a new one when the request is idempotent and `replayable`."""
        loop = asyncio.get_running_loop()
        retry = replayable and stream is None and method in _IDEMPOTENT
        while True:
            conn = self._idle_connection(origin, loop)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(origin, loop, connect_timeout)
            conn.start(method)
            self._active.add(conn)
            try:
                conn.write(head + body if body else head)
                if stream is not None:
                    async for chunk in stream:
                        if conn.closed:
                            break  # it answered (or failed) early: what it sent still counts
                        conn.write(chunk)
                        await conn.drain(timeout)
                await conn.head(timeout)
            except UpstreamClosed:
                self._discard(conn)
                if reused and retry and not conn.got_bytes:
                    continue  # the upstream closed it while idle: the request never arrived
                raise
            except BaseException:
                self._discard(conn)
                raise
            return Exchange(conn, self)

    async def close(self) -> None:
        self._closing = True
        for conns in self._idle.values():
            for conn in conns:
                conn._close()
        self._idle.clear()
        for conn in list(self._active):
            conn._close()
        self._active.clear()

    def _now(self, loop: asyncio.AbstractEventLoop) -> float:
        return self._monotonic() if self._monotonic is not None else loop.time()

    def _idle_connection(self, origin: Origin, loop: asyncio.AbstractEventLoop
                         ) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        stale = self._now(loop) - IDLE_TIMEOUT
        while idle and idle[0].idle_since < stale:
            idle.popleft()._close()
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be timed out
            if not conn.closed:
                return conn
        return None

    async def _connect(self, origin: Origin, loop: asyncio.AbstractEventLoop,
                       timeout: float) -> _Connection:
        tls = self._ssl if origin.tls else None
        if origin.tls and tls is None:
            tls = self._ssl = ssl.create_default_context()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(origin, loop), origin.host, origin.port, ssl=tls,
                    server_hostname=origin.host if tls else None,
                )
        except TimeoutError as e:
            raise ConnectFailed(timed_out=True) from e
        except (OSError, ssl.SSLError, ValueError) as e:
            raise ConnectFailed() from e
        return conn

    def _release(self, conn: _Connection) -> None:
        self._active.discard(conn)
        keep = conn.reusable() and not self._closing
        conn.finish()
        if not keep:
            conn._close()
            return
        idle = self._idle.setdefault(conn.origin, deque())
        if len(idle) >= MAX_IDLE:
            conn._close()
            return
        conn.idle_since = self._now(conn.loop)
        idle.append(conn)

    def _discard(self, conn: _Connection) -> None:
        self._active.discard(conn)
        conn.finish()
        conn._close()


def serialise_head(method: str, target: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """The request line and header block. Header values come from aiohttp's parser (no CR/LF
    possible) or from the gateway itself; a line break anywhere is refused, not sent."""
    parts = [f"{method} {target} HTTP/1.1\r\n"]
    for name, value in headers:
        parts.append(f"{name}: {value}\r\n")
    parts.append("\r\n")
    text = "".join(parts)
    if text.count("\n") != len(parts) or text.count("\r") != len(parts):
        raise ValueError("line break in a header")
    return text.encode("utf-8", "surrogateescape")


def chunked(stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A body of unknown length framed as HTTP/1.1 chunks."""

    async def frames() -> AsyncIterator[bytes]:
        async for chunk in stream:
            if chunk:
                yield b"%x\r\n%b\r\n" % (len(chunk), chunk)
        yield b"0\r\n\r\n"

    return frames()
