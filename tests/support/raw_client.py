"""Blocking raw-socket HTTP for hostile-input tests, and an echo upstream on its own thread.

`exchange` sends bytes exactly as given and collects every response the server writes back
(several, for pipelined requests) until it closes the connection or goes quiet; the upstream
runs on a background event loop so module-scoped fixtures and blocking test code can share it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field

from tests.support.raw_http import RawResponse
from tests.support.upstream import Received, Upstream


@dataclass
class Exchange:
    raw: bytes
    responses: list[RawResponse]
    #: The server closed the connection (EOF or reset) before we gave up waiting.
    closed: bool

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]


def _parse_one(data: bytes) -> tuple[RawResponse, bytes] | None:
    """One complete response from the front of `data` and the rest, or None if incomplete."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    chunked = any(k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in headers)
    length = next((int(v) for k, v in headers if k.lower() == "content-length"), None)
    if chunked:
        body = b""
        while True:
            size_line, nl, after = rest.partition(b"\r\n")
            if not nl:
                return None
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                _, end, rest = after.partition(b"\r\n")
                if not end:
                    return None
                break
            if len(after) < size + 2:
                return None
            body += after[:size]
            rest = after[size + 2:]
    elif length is not None:
        if len(rest) < length:
            return None
        body, rest = rest[:length], rest[length:]
    elif status in (204, 304) or 100 <= status < 200:
        body = b""
    else:  # delimited by the connection closing
        body, rest = rest, b""
    return RawResponse(status, headers, body), rest


def parse_responses(data: bytes) -> list[RawResponse]:
    out: list[RawResponse] = []
    while data:
        parsed = _parse_one(data)
        if parsed is None:
            break
        response, data = parsed
        out.append(response)
    return out


def exchange(port: int, data: bytes, *, expect: int = 1, quiet: float = 0.3,
             timeout: float = 8.0, chunks: list[bytes] | None = None,
             gap: float = 0.0) -> Exchange:
    """Send `data` (or `chunks`, one write each, `gap` seconds apart), then read until the server
    closes, or until `expect` responses arrived and nothing more came for `quiet` s, or `timeout`."""
    deadline = time.monotonic() + timeout
    received = b""
    closed = False
    quiet_since: float | None = None
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            for i, part in enumerate(chunks if chunks is not None else [data]):
                if i and gap:
                    time.sleep(gap)
                sock.sendall(part)
        except OSError:
            closed = True  # the server hung up while we were still sending
        while not closed and time.monotonic() < deadline:
            if len(parse_responses(received)) >= expect:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= quiet:
                    break
                sock.settimeout(quiet)
            else:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                got = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
            if not got:
                closed = True
                break
            received += got
            quiet_since = None
    return Exchange(received, parse_responses(received), closed)


class ThreadedUpstream:
    """The recording echo upstream (tests.support.upstream) served from a background thread."""

    def __init__(self) -> None:
        self.upstream = Upstream()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="upstream")

    @property
    def url(self) -> str:
        return self.upstream.url

    @property
    def received(self) -> list[Received]:
        return self.upstream.received

    def start(self) -> ThreadedUpstream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.upstream.start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.upstream.stop(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


@dataclass
class UpstreamLog:
    """What reached the upstream since a mark: to check one case at a time."""

    upstream: ThreadedUpstream
    start: int = field(default=0)

    def mark(self) -> None:
        self.start = len(self.upstream.received)

    def since(self) -> list[Received]:
        return self.upstream.received[self.start:]
