"""Liveness and readiness as a load balancer sees them: JSON bodies, never cached, readiness
following the session store, and never shadowed by a route."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from tests.support.ports import free_port
from tests.support.redis_server import start_redis


def catch_all(url: str) -> str:
    return f"- {{name: everything, path: /, upstream: {url}, auth: public}}\n"


async def test_healthz_body_and_headers(gateway):
    client = await gateway()
    r = await client.get("/healthz")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.headers["Cache-Control"] == "no-store"
    assert r.headers["X-Request-Id"]
    assert await r.json() == {"status": "ok"}


async def test_healthz_head_and_query(gateway):
    client = await gateway()
    r = await client.head("/healthz")
    assert r.status == 200
    assert r.headers["Cache-Control"] == "no-store"
    assert await r.read() == b""
    r = await client.get("/healthz?probe=lb")
    assert r.status == 200
    assert await r.json() == {"status": "ok"}


@pytest.mark.parametrize("path,allow", [("/healthz", "GET, HEAD"), ("/readyz", "GET, HEAD")])
async def test_health_wrong_method_is_json_405(gateway, path, allow):
    client = await gateway()
    r = await client.post(path, data=b"x")
    assert r.status == 405
    assert r.headers["Allow"] == allow
    assert r.headers["Cache-Control"] == "no-store"
    assert (await r.json())["error"] == "method_not_allowed"


async def test_readyz_with_a_reachable_store(gateway, redis_server):
    client = await gateway(redis_url=redis_server.url)
    r = await client.get("/readyz")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.headers["Cache-Control"] == "no-store"
    assert await r.json() == {"status": "ready", "session_store": True}
    r = await client.head("/readyz")
    assert r.status == 200
    assert await r.read() == b""


async def test_readyz_embedded_store_is_ready(gateway):
    client = await gateway()
    r = await client.get("/readyz")
    assert r.status == 200
    assert await r.json() == {"status": "ready", "session_store": True}


async def test_readyz_refused_store_is_503(gateway):
    client = await gateway(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    r = await client.get("/readyz")
    assert r.status == 503
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.headers["Cache-Control"] == "no-store"
    assert await r.json() == {"status": "unavailable", "session_store": False}
    r = await client.get("/healthz")  # liveness does not depend on the store
    assert r.status == 200


async def test_readyz_stalled_store_is_503_not_a_hang(gateway):
    server = start_redis()
    try:
        client = await gateway(redis_url=server.url)
        assert (await client.get("/readyz")).status == 200
        server.pause()
        async with asyncio.timeout(10):  # the store's own timeouts answer, not the client's
            r = await client.get("/readyz")
        assert r.status == 503
        assert await r.json() == {"status": "unavailable", "session_store": False}
        server.resume()
        for _ in range(50):
            r = await client.get("/readyz")
            if r.status == 200:
                break
            await asyncio.sleep(0.1)
        assert r.status == 200
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


async def test_health_is_not_shadowed_by_a_catch_all_route(gateway, upstream):
    client = await gateway(routes=catch_all(upstream.url))
    for path in ("/healthz", "/readyz"):
        r = await client.get(path)
        assert r.status == 200
        assert r.headers["Cache-Control"] == "no-store"
    assert upstream.received == []
    r = await client.get("/healthzz")  # only the exact path is the gateway's
    assert r.status == 200
    assert upstream.last.raw_path == "/healthzz"
