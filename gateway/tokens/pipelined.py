"""One pipelined connection to a single Redis server, for the session store's hot-path scripts.

Redis answers the commands of one connection in order, so concurrent callers can share a socket:
a command is one write, and each reply resolves the oldest waiting future. There is no pool
checkout, task or timer per command (redis-py's asyncio connection spends several of each, which
made it the largest share of a refresh exchange's CPU). One timer per connection enforces the
per-command timeout. A timeout or a lost connection fails every command in flight (their replies
can no longer be matched) and the next command reconnects. Errors are redis-py's exception
classes, so callers translate them exactly as they translate redis-py's.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any

import hiredis
from redis import exceptions as rx
from redis.asyncio.connection import Connection, ConnectionPool, UnixDomainSocketConnection

from gateway.config.model import RETRY_BACKOFF_CAP

Arg = bytes | str | int | float


class _Protocol(asyncio.Protocol):
    """The socket and its queue of (future, deadline) in send order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float):
        self._loop = loop
        self._timeout = timeout
        self._reader = hiredis.Reader(replyError=rx.ResponseError)
        self._pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: Commands sent in this turn of the event loop, written together at its end.
        self._outgoing: list[bytes] = []
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(rx.ConnectionError, "Connection closed by server.")

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        pending = self._pending
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as e:
                self.close(rx.ConnectionError, f"Protocol error: {e}")
                return
            if reply is False:
                return
            if not pending:  # a reply nobody asked for: every later one would be misattributed
                self.close(rx.ConnectionError, "Unexpected reply from Redis.")
                return
            future = pending.popleft()[0]
            if future.done():  # its caller was cancelled; the reply still had to be read
                continue
            if isinstance(reply, rx.ResponseError):
                message = str(reply)
                future.set_exception(rx.NoScriptError(message) if message.startswith("NOSCRIPT")
                                     else rx.ResponseError(message))
            else:
                future.set_result(reply)

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        if self.lost or self._transport is None:
            raise rx.ConnectionError("Connection closed.")
        future = self._loop.create_future()
        deadline = self._loop.time() + self._timeout
        self._pending.append((future, deadline))
        if not self._outgoing:
            self._loop.call_soon(self._write)
        self._outgoing.append(packed)
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._check_deadline)
        return future

    def _write(self) -> None:
        # One write per turn of the loop, whatever the number of commands: on loopback a send
        # costs the sender the receiver's network stack too, so fewer sends is less CPU.
        outgoing, self._outgoing = self._outgoing, []
        if not self.lost and self._transport is not None:
            self._transport.write(b"".join(outgoing))

    def _check_deadline(self) -> None:
        # Only the oldest command can be the first past its deadline: one timer suffices, and it
        # is re-armed when it fires, never per command.
        self._timer = None
        if not self._pending:
            return
        deadline = self._pending[0][1]
        if self._loop.time() >= deadline - 0.001:
            self.close(rx.TimeoutError, "Timeout reading from socket")
        else:
            self._timer = self._loop.call_at(deadline, self._check_deadline)

    def close(self, kind: type[Exception], message: str) -> None:
        self._fail(kind, message)
        if self._transport is not None:
            self._transport.abort()  # nothing left to send: a stalled peer must not hold it open

    def _fail(self, kind: type[Exception], message: str) -> None:
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending:
            future = self._pending.popleft()[0]
            if not future.done():
                future.set_exception(kind(message))  # one instance per caller: tracebacks differ


class PipelinedConnection:
    """Commands to one Redis server over one shared connection, with redis-py's retry policy."""

    def __init__(
        self, *, host: str = "127.0.0.1", port: int = 6379, path: str | None = None,
        username: str | None = None, password: str | None = None, db: int = 0,
        timeout: float = 1.0, connect_timeout: float = 1.0, retries: int = 1,
    ):
        self._address = (host, port)
        self._path = path
        self._auth = tuple(a for a in (username, password) if a) if password else ()
        self._db = db
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._retries = retries
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None
        self._closed = False

    @classmethod
    def for_pool(cls, pool: ConnectionPool, *, timeout: float, connect_timeout: float,
                 retries: int) -> PipelinedConnection | None:
        """The same server, database and credentials as a redis-py pool's connections; None
        for what this class does not speak (TLS, and anything else that is not plain)."""
        kind, kw = pool.connection_class, pool.connection_kwargs
        if kind is Connection:
            where: dict[str, Any] = {"host": kw.get("host", "127.0.0.1"),
                                     "port": int(kw.get("port", 6379))}
        elif kind is UnixDomainSocketConnection:
            where = {"path": kw["path"]}
        else:
            return None
        if kw.get("credential_provider") is not None:
            return None
        return cls(**where, username=kw.get("username"), password=kw.get("password"),
                   db=int(kw.get("db") or 0), timeout=timeout, connect_timeout=connect_timeout,
                   retries=retries)

    async def execute(self, *args: Arg) -> Any:
        packed = _pack(args)
        failures = 0
        while True:
            try:
                protocol = self._protocol
                if protocol is None or protocol.lost:
                    protocol = await self._connect()
                return await protocol.send(packed)
            except (rx.ConnectionError, rx.TimeoutError):
                # redis-py's policy (gateway.tokens.connection): `retries` more attempts on a
                # new connection, with exponential backoff.
                failures += 1
                if failures > self._retries or self._closed:
                    raise
                await asyncio.sleep(min(RETRY_BACKOFF_CAP, 0.05 * 2**failures))

    async def evalsha(self, sha: str, script: str, keys: Sequence[Arg],
                      args: Sequence[Arg]) -> Any:
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except rx.NoScriptError:
            # The server lost its script cache (a restart, SCRIPT FLUSH): EVAL runs the script
            # and caches it again, so only this one command pays for the body.
            return await self.execute("EVAL", script, len(keys), *keys, *args)

    async def _connect(self) -> _Protocol:
        # Callers arriving while a connect is under way share it: a server that is down costs
        # one connect attempt per burst, not one per caller.
        if self._closed:
            raise rx.ConnectionError("Connection closed.")
        task = self._connecting
        if task is None or task.done():
            task = self._connecting = asyncio.ensure_future(self._open())
            task.add_done_callback(_consume)
        return await asyncio.shield(task)

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        transport: asyncio.BaseTransport | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self._path is not None:
                    transport, protocol = await loop.create_unix_connection(
                        lambda: _Protocol(loop, self._timeout), self._path)
                else:
                    transport, protocol = await loop.create_connection(
                        lambda: _Protocol(loop, self._timeout), *self._address)
                handshake: list[tuple[Arg, ...]] = []
                if self._auth:
                    handshake.append(("AUTH", *self._auth))
                if self._db:
                    handshake.append(("SELECT", self._db))
                for command in handshake:
                    await protocol.send(_pack(command))
            if self._closed:
                raise rx.ConnectionError("Connection closed.")
        except BaseException as e:
            _close(transport)
            if isinstance(e, rx.ResponseError):  # AUTH or SELECT refused
                raise rx.ConnectionError(f"Redis refused the connection set-up: {e}") from None
            if isinstance(e, OSError):  # refused, unreachable, or the connect timeout expired
                raise rx.ConnectionError(
                    f"Error connecting to Redis: {e or type(e).__name__}") from e
            raise
        self._protocol = protocol
        return protocol

    async def aclose(self) -> None:
        self._closed = True
        task, self._connecting = self._connecting, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})
        if self._protocol is not None:
            self._protocol.close(rx.ConnectionError, "Connection closed.")
            self._protocol = None


def _pack(args: tuple[Arg, ...]) -> bytes:
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]  # stub: 1-tuples only
    return packed


def _consume(task: asyncio.Task[Any]) -> None:
    """A failed connect nobody waits for any more is not an unhandled error."""
    if not task.cancelled():
        task.exception()


def _close(transport: asyncio.BaseTransport | None) -> None:
    if transport is not None:
        transport.close()
