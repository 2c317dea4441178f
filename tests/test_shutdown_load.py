"""Reload and shutdown under a steady stream of requests, against the real gateway process:
SIGHUP loses no request; after SIGTERM every request that got a response start completes with
200, new connections are refused, and the gateway never answers 5xx."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import aiohttp

from tests.support.processes import (
    refuses_connections,
    wait_refusing,
)

CLIENTS = 10
TIMEOUT = aiohttp.ClientTimeout(total=10)
#: Before a response starts, the connection may be refused or dropped: that is not a loss.
NOT_STARTED = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError,
               aiohttp.ClientOSError)


async def _stream(url: str, stop: asyncio.Event, seconds: float,
                  outcomes: list[tuple[str, Any, float]]) -> None:
    """One keep-alive client requesting until `stop` or `seconds` pass (bounded)."""
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        i = 0
        while not stop.is_set() and time.monotonic() < deadline:
            i += 1
            started = time.monotonic()
            try:
                response = await session.get(url)
            except NOT_STARTED as e:
                outcomes.append(("not-started", type(e).__name__, started))
                await asyncio.sleep(0.02)
                continue
            try:  # headers arrived: the body must complete
                body = await response.json()
                outcomes.append(("done", (response.status, body.get("path")), started))
            except Exception as e:  # noqa: BLE001 - any failure after the start is a loss
                outcomes.append(("broken", f"{response.status} {type(e).__name__}", started))
            finally:
                response.release()


async def test_sighup_under_load_loses_no_request(process_gateway, make_yaml, upstream):
    gw = await process_gateway(make_yaml(upstream.url))
    outcomes: list[tuple[str, Any, float]] = []
    stop = asyncio.Event()
    clients = [asyncio.ensure_future(_stream(f"{gw.url}/public/hup", stop, 5, outcomes))
               for _ in range(CLIENTS)]
    for _ in range(4):
        await asyncio.sleep(0.5)
        gw.signal(signal.SIGHUP)
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*clients), 15)
    assert len(outcomes) > 50, "the load never got going"
    assert {kind for kind, _, _ in outcomes} == {"done"}, \
        [o for o in outcomes if o[0] != "done"][:10]
    assert {got for _, got, _ in outcomes} == {(200, "/public/hup")}
    assert gw.proc is not None and gw.proc.poll() is None
    reloads = gw.logs().count("configuration reloaded")
    assert reloads == 4, gw.logs()[-2000:]


async def test_sigterm_under_load_completes_started_requests(process_gateway, make_yaml,
                                                              upstream):
    gw = await process_gateway(make_yaml(upstream.url))
    outcomes: list[tuple[str, Any, float]] = []
    stop = asyncio.Event()
    # Each request takes 0.3 s upstream, so some are always in flight when SIGTERM lands.
    url = f"{gw.url}/public/slow?s=0.3"
    clients = [asyncio.ensure_future(_stream(url, stop, 5, outcomes)) for _ in range(CLIENTS)]
    await asyncio.sleep(1.0)
    sent_at = time.monotonic()
    gw.signal(signal.SIGTERM)

    await wait_refusing(gw.port)
    for _ in range(5):  # and it stays refused
        assert await refuses_connections(gw.port)
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*clients), 15)
    assert gw.proc is not None
    assert await asyncio.to_thread(gw.proc.wait, 15) == 0

    broken = [o for o in outcomes if o[0] == "broken"]
    assert not broken, broken[:10]
    done = [got for kind, got, _ in outcomes if kind == "done"]
    assert set(done) == {(200, "/public/slow?s=0.3")}, set(done)
    # Requests in flight at SIGTERM (started before it) did complete.
    assert any(kind == "done" and sent_at - 0.3 < t < sent_at for kind, _, t in outcomes)
    assert len(done) >= CLIENTS * 2
