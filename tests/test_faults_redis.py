"""Redis faults against the real gateway process: Redis stopped, and Redis stalled (SIGSTOP).

Valid access tokens keep working (no Redis on the request path); login, refresh and readiness
fail fast with 503 while Redis is gone and recover on their own when it returns, and so does
the revocation feed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import PASSWORD
from tests.support.gateway_process import GatewayProcess, start_gateway
from tests.support.redis_server import RedisServer, start_redis
from tests.support.upstream import Upstream

pytestmark = pytest.mark.integration

#: A failed Redis call must answer well within this (timeouts are 300 ms, retries 0).
FAST = 2.0
#: How long the gateway may take to notice Redis is back (feed backoff is capped at 5 s).
RECOVERY = 15.0


@dataclass
class Stack:
    gateway: GatewayProcess
    redis: RedisServer
    http: aiohttp.ClientSession

    def url(self, path: str) -> str:
        return self.gateway.url + path

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, dict[str, Any], float]:
        started = time.monotonic()
        async with self.http.request(method, self.url(path), **kw) as r:
            text = await r.text()
            body = json.loads(text) if text else {}
            return r.status, body, time.monotonic() - started

    async def login(self) -> dict[str, Any]:
        status, body, _ = await self.call(
            "POST", "/auth/login", json={"username": "alice", "password": PASSWORD})
        assert status == 200, body
        return body

    async def refresh(self, token: str) -> tuple[int, dict[str, Any], float]:
        return await self.call("POST", "/auth/refresh", json={"refresh_token": token})


@pytest.fixture
async def stack(tmp_path: Path, make_yaml: Callable[..., str],
                upstream: Upstream) -> AsyncIterator[Stack]:
    redis = start_redis()
    gateway: GatewayProcess | None = None
    try:
        text = make_yaml(upstream.url, redis_url=redis.url).replace(
            f"redis: {{url: '{redis.url}'}}",
            f"redis: {{url: '{redis.url}', timeout: 300ms, connect_timeout: 300ms, retries: 0}}",
        )
        assert "retries: 0" in text
        gateway = await asyncio.to_thread(start_gateway, tmp_path, text)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
            yield Stack(gateway, redis, http)
    finally:
        if gateway is not None:
            await asyncio.to_thread(gateway.stop)
        await asyncio.to_thread(redis.stop)


@dataclass
class Traffic:
    """Proxied requests with a valid access token, sent back to back until stopped."""

    stack: Stack
    token: str
    statuses: list[int] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        for i in range(100_000):
            if self._stop.is_set():
                return
            status, _, _ = await self.stack.call("GET", f"/api/during-fault/{i}", headers=headers)
            self.statuses.append(status)
            await asyncio.sleep(0.01)

    def start(self) -> Traffic:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def stop(self) -> list[int]:
        self._stop.set()
        assert self._task is not None
        await asyncio.wait_for(self._task, 20)
        return self.statuses


async def assert_store_unavailable(stack: Stack, refresh_token: str) -> None:
    """Login, refresh and readiness each answer 503 quickly; 50 concurrent refreshes too."""
    status, body, took = await stack.call(
        "POST", "/auth/login", json={"username": "alice", "password": PASSWORD})
    assert (status, body["error"]) == (503, "session_store_unavailable") and took < FAST, body
    status, body, took = await stack.refresh(refresh_token)
    assert (status, body["error"]) == (503, "session_store_unavailable") and took < FAST, body
    status, body, took = await stack.call("GET", "/readyz")
    assert status == 503 and body["session_store"] is False and took < FAST, body

    started = time.monotonic()
    answers = await asyncio.gather(*(stack.refresh(refresh_token) for _ in range(50)))
    # No pile-up: every one fails on its own timeout, not queued behind the others.
    assert time.monotonic() - started < 2 * FAST
    assert {(s, b["error"]) for s, b, _ in answers} == {(503, "session_store_unavailable")}
    assert max(took for _, _, took in answers) < FAST


async def wait_recovered(stack: Stack) -> dict[str, Any]:
    """Poll (bounded) until readyz and a login both succeed; returns the login's tokens."""
    deadline = time.monotonic() + RECOVERY
    last: Any = None
    while time.monotonic() < deadline:
        ready, body, _ = await stack.call("GET", "/readyz")
        if ready == 200:
            status, tokens, _ = await stack.call(
                "POST", "/auth/login", json={"username": "alice", "password": PASSWORD})
            if status == 200:
                return tokens
            last = (status, tokens)
        else:
            last = (ready, body)
        await asyncio.sleep(0.2)
    raise AssertionError(f"gateway did not recover within {RECOVERY}s: {last}")


async def assert_revocation_enforced(stack: Stack, tokens: dict[str, Any]) -> None:
    """A logout is refused at the edge again, i.e. the revocation feed is following Redis."""
    headers = {"Authorization": f"Bearer {tokens['access_token']}"}
    status, body, _ = await stack.call("GET", "/api/before-logout", headers=headers)
    assert status == 200, body
    status, _, _ = await stack.call(
        "POST", "/auth/logout", json={"refresh_token": tokens["refresh_token"]})
    assert status == 204
    deadline = time.monotonic() + RECOVERY
    while time.monotonic() < deadline:
        status, body, _ = await stack.call("GET", "/api/after-logout", headers=headers)
        if status == 401:
            assert body["error"] == "token_revoked"
            return
        assert status == 200, body
        await asyncio.sleep(0.2)
    raise AssertionError("logout not enforced at the edge after Redis came back")


async def test_redis_stopped_then_restarted(stack: Stack, upstream: Upstream) -> None:
    tokens = await stack.login()
    traffic = Traffic(stack, tokens["access_token"]).start()
    await asyncio.sleep(0.2)
    await asyncio.to_thread(stack.redis.stop)
    await assert_store_unavailable(stack, tokens["refresh_token"])
    await asyncio.sleep(0.5)  # traffic keeps flowing while Redis is down

    await asyncio.to_thread(stack.redis.restart)  # same port, empty data set
    fresh = await wait_recovered(stack)
    statuses = await traffic.stop()
    assert statuses and set(statuses) == {200}, statuses
    assert sum(1 for r in upstream.received if "/during-fault/" in r.path) == len(statuses)

    # The old session died with Redis's data; the new one refreshes normally.
    status, body, _ = await stack.refresh(tokens["refresh_token"])
    assert (status, body["error"]) == (401, "invalid_refresh_token")
    status, body, _ = await stack.refresh(fresh["refresh_token"])
    assert status == 200, body
    await assert_revocation_enforced(stack, body)


async def test_redis_stalled_then_resumed(stack: Stack, upstream: Upstream) -> None:
    """A Redis that accepts connections but never answers (SIGSTOP) fails on the timeout."""
    tokens = await stack.login()
    traffic = Traffic(stack, tokens["access_token"]).start()
    await asyncio.sleep(0.2)
    stack.redis.pause()
    try:
        await assert_store_unavailable(stack, tokens["refresh_token"])
        await asyncio.sleep(0.5)
    finally:
        stack.redis.resume()
    await wait_recovered(stack)
    statuses = await traffic.stop()
    assert statuses and set(statuses) == {200}, statuses

    # Refreshes sent while Redis was stalled may have run once it resumed, their answers
    # lost; retrying the same token within the reuse grace must still succeed, not count
    # as reuse (which would end the session).
    status, body, _ = await stack.refresh(tokens["refresh_token"])
    assert status == 200, body
    status, body, _ = await stack.refresh(body["refresh_token"])
    assert status == 200, body
    await assert_revocation_enforced(stack, body)
