"""The token service against a REAL redis-server: rotation, reuse, concurrency, expiry in real
time, Redis going away and coming back, and the `gateway sessions` commands."""

from __future__ import annotations

import asyncio
import shutil
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, gateway_yaml
from tests.support.redis_server import RedisServer, start_redis
from tests.support.tokens import (
    bearer,
    error_of,
    jwt_claims,
    login,
    refresh,
    refresh_error,
    refreshed,
    unb64,
    write_users,
)

pytestmark = pytest.mark.integration
HEAD = struct.Struct(">B16sIII")


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_users(tmp_path_factory.mktemp("users") / "users.yaml")


@pytest.fixture
def real(gateway: Any, upstream: Any, users: Path, redis_server: RedisServer,
         redis_client: Any) -> Any:
    """An in-process gateway whose sessions live in the shared real redis-server (flushed)."""

    async def make(**kwargs: Any) -> Any:
        return await gateway(gateway_yaml(upstream.url, users, redis_url=redis_server.url,
                                          **kwargs))

    return make


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, to stop and restart."""
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


def fields(token: str) -> tuple[int, int]:
    """(expiry, session end) in unix seconds, as the token carries them."""
    _, _, _, expires, end = HEAD.unpack_from(unb64(token))
    return expires, end


async def sleep_until(unix: float) -> None:
    await asyncio.sleep(max(0.0, unix - time.time()))


async def test_rotation_and_reuse_after_grace(real: Any, redis_client: Any) -> None:
    client = await real(tokens="reuse_grace: 300ms\n")
    t0 = await login(client)
    t1 = await refreshed(client, t0["refresh_token"])
    assert t1["refresh_token"] != t0["refresh_token"]
    assert (await client.get("/auth/me", headers=bearer(t1))).status == 200
    await asyncio.sleep(0.45)
    assert await refresh_error(client, t0["refresh_token"]) == "refresh_token_reused"
    assert await refresh_error(client, t1["refresh_token"]) == "session_revoked"
    sid = jwt_claims(t1["access_token"])["sid"]
    # The revocation reached the edge: the session's access token is refused.
    for _ in range(250):
        r = await client.get("/auth/me", headers=bearer(t1))
        if r.status == 401:
            break
        await asyncio.sleep(0.02)
    assert await error_of(r, 401) == "token_revoked"
    assert sid in {m.decode() for m in await redis_client.zrange("gw:revoked", 0, -1)}


async def test_parallel_refreshes_share_one_successor(real: Any) -> None:
    client = await real()
    t0 = await login(client)
    responses = await asyncio.gather(*(refresh(client, t0["refresh_token"]) for _ in range(20)))
    bodies = []
    for r in responses:
        assert r.status == 200, await r.text()
        bodies.append(await r.json())
    successors = {b["refresh_token"] for b in bodies}
    assert len(successors) == 1
    successor = successors.pop()
    assert successor != t0["refresh_token"]
    for b in bodies:  # every access token is good
        assert (await client.get("/auth/me", headers=bearer(b))).status == 200
    t2 = await refreshed(client, successor)
    assert t2["refresh_token"] not in (successor, t0["refresh_token"])
    assert (await client.get("/auth/me", headers=bearer(t2))).status == 200


async def test_idle_timeout_and_absolute_lifetime_in_real_time(real: Any) -> None:
    client = await real(tokens="refresh_ttl: 2s\nsession_max_lifetime: 3s\nreuse_grace: 500ms\n")
    a = await login(client)
    b = await login(client)
    exp_a, _ = fields(a["refresh_token"])
    exp_b, end_b = fields(b["refresh_token"])
    assert end_b == exp_b + 1  # second-granular: floor(login + 3 s) = floor(login + 2 s) + 1

    # Just before B's idle timeout, B is used: its session is renewed up to the absolute end.
    await sleep_until(exp_b - 0.4)
    b1 = await refreshed(client, b["refresh_token"])
    assert fields(b1["refresh_token"])[0] == end_b

    await sleep_until(max(exp_a, exp_b) + 0.05)
    # A sat idle for its whole refresh_ttl: gone.
    assert await refresh_error(client, a["refresh_token"]) == "refresh_token_expired"
    # B is alive past the idle timeout because it was used, but not past the absolute end:
    # a refresh now gives 1 s, not refresh_ttl.
    b2 = await refreshed(client, b1["refresh_token"])
    assert fields(b2["refresh_token"])[0] == end_b
    assert b2["refresh_expires_in"] == 1
    r = await client.get("/auth/sessions", headers=bearer(b2))
    listed = [s["sid"] for s in (await r.json())["sessions"]]
    assert listed == [jwt_claims(b["access_token"])["sid"]]

    await sleep_until(end_b + 0.05)
    assert await refresh_error(client, b2["refresh_token"]) == "refresh_token_expired"


async def test_logout_and_logout_all(real: Any, redis_client: Any) -> None:
    client = await real()
    a1, a2, a3 = await login(client), await login(client), await login(client)
    b = await login(client, "bob")
    r = await client.post("/auth/logout", json={"refresh_token": a1["refresh_token"]})
    assert r.status == 204
    assert await refresh_error(client, a1["refresh_token"]) == "session_revoked"
    assert (await client.post("/auth/logout-all", headers=bearer(a2))).status == 204
    for t in (a2, a3):
        assert await refresh_error(client, t["refresh_token"]) == "session_revoked"
    await refreshed(client, b["refresh_token"])
    async for key in redis_client.scan_iter(count=1000):
        assert await redis_client.pttl(key) > 0, f"{key!r} never expires"


def _with_timeouts(text: str, url: str) -> str:
    line = f"redis: {{url: '{url}'}}"
    assert line in text
    return text.replace(line, f"redis: {{url: '{url}', timeout: 500ms, connect_timeout: 500ms}}")


async def _store_down(client: Any, refresh_token: str) -> None:
    """Login and refresh fail fast with 503 session_store_unavailable, not a hang or a 500."""
    for attempt in (
        lambda: client.post("/auth/login", json={"username": "alice", "password": "x"}),
        lambda: refresh(client, refresh_token),
    ):
        started = time.monotonic()
        r = await attempt()
        assert await error_of(r, 503) == "session_store_unavailable"
        # Bounded by redis.timeout (500 ms, one retry), far below the test's own timeout.
        assert time.monotonic() - started < 5
    r = await client.get("/readyz")
    assert r.status == 503


async def test_redis_stopped_then_restarted(gateway: Any, upstream: Any, users: Path,
                                            own_redis: RedisServer) -> None:
    text = _with_timeouts(gateway_yaml(upstream.url, users, redis_url=own_redis.url),
                          own_redis.url)
    client = await gateway(text)
    t = await login(client)
    t = await refreshed(client, t["refresh_token"])

    own_redis.stop()
    await _store_down(client, t["refresh_token"])

    own_redis.restart()  # same port, empty (no persistence)
    ok = None
    for _ in range(50):  # the pool reconnects on its own; no gateway restart
        r = await client.post("/auth/login", json={"username": "alice",
                                                    "password": "correct horse battery"})
        if r.status == 200:
            ok = await r.json()
            break
        await asyncio.sleep(0.1)
    assert ok is not None, "login never recovered after Redis came back"
    await refreshed(client, ok["refresh_token"])
    assert (await client.get("/readyz")).status == 200
    # The old session died with the data; it is not a server error.
    assert await refresh_error(client, t["refresh_token"]) == "invalid_refresh_token"
    # Revocations reach the edge again (the feed reconnected by itself).
    assert (await client.post("/auth/logout", headers=bearer(ok))).status == 204
    for _ in range(500):
        r = await client.get("/auth/me", headers=bearer(ok))
        if r.status == 401:
            break
        await asyncio.sleep(0.02)
    assert await error_of(r, 401) == "token_revoked"


async def test_redis_stalled_then_resumed(gateway: Any, upstream: Any, users: Path,
                                          own_redis: RedisServer) -> None:
    text = _with_timeouts(gateway_yaml(upstream.url, users, redis_url=own_redis.url),
                          own_redis.url)
    client = await gateway(text)
    t = await login(client)
    own_redis.pause()
    try:
        await _store_down(client, t["refresh_token"])
    finally:
        own_redis.resume()
    for _ in range(50):
        r = await refresh(client, t["refresh_token"])
        if r.status != 503:
            break
        await asyncio.sleep(0.1)
    assert r.status == 200, await r.text()


# --- the `gateway sessions` commands --------------------------------------------------------------
async def gateway_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_sessions_cli_lists_and_revokes(real: Any, upstream: Any, users: Path,
                                              redis_server: RedisServer, tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(gateway_yaml(upstream.url, users, redis_url=redis_server.url)
                      .replace("{port}", "0"))
    client = await real()
    a1 = await login(client, headers={"User-Agent": "phone/1.0"})
    a2 = await login(client, headers={"User-Agent": "laptop/2.0"})
    b = await login(client, "bob")
    sid1, sid2 = (jwt_claims(t["access_token"])["sid"] for t in (a1, a2))
    sid_b = jwt_claims(b["access_token"])["sid"]

    code, out, err = await gateway_cli("sessions", "list", "alice", "-c", str(config))
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2
    assert any(sid1 in line and "phone/1.0" in line and "127.0.0.1" in line for line in lines)
    assert any(sid2 in line and "laptop/2.0" in line for line in lines)
    assert sid_b not in out

    code, out, err = await gateway_cli("sessions", "revoke", "--session", sid1, "-c", str(config))
    assert code == 0, err
    assert f"{sid1}: revoked" in out
    assert await refresh_error(client, a1["refresh_token"]) == "session_revoked"
    await refreshed(client, a2["refresh_token"])
    # The running gateway hears about it: the session's access token stops working.
    for _ in range(250):
        r = await client.get("/auth/me", headers=bearer(a1))
        if r.status == 401:
            break
        await asyncio.sleep(0.02)
    assert await error_of(r, 401) == "token_revoked"

    code, out, err = await gateway_cli("sessions", "revoke", "--session", sid1, "-c", str(config))
    assert code == 0 and "no such live session" in out

    code, out, err = await gateway_cli("sessions", "revoke", "--user", "alice", "-c", str(config))
    assert code == 0, err
    assert "alice: 1 session(s) revoked" in out
    assert await refresh_error(client, a2["refresh_token"]) == "session_revoked"
    await refreshed(client, b["refresh_token"])


async def test_sessions_that_idled_out_do_not_count_against_the_cap(real: Any,
                                                                    redis_client: Any) -> None:
    """The per-user index lists sessions until their absolute end; one that idled out earlier
    must not push a live session out when the user logs in again within the cap."""
    client = await real(tokens="refresh_ttl: 4s\nreuse_grace: 1s\naccess_ttl: 60s\n",
                        extra="auth: {max_sessions_per_user: 2}\n")
    used = await login(client)                  # t=0: the device in use
    await asyncio.sleep(1.1)
    abandoned = await login(client)             # t=1.1: left alone, idles out by about t=5
    await asyncio.sleep(2.0)
    used = await refreshed(client, used["refresh_token"])  # t=3.1: renewed to about t=7
    await asyncio.sleep(2.1)                    # t=5.2
    gone = jwt_claims(abandoned["access_token"])["sid"]
    assert await redis_client.exists(f"gw:s:{{{gone}}}") == 0
    await login(client)                         # two live sessions: within the cap
    await refreshed(client, used["refresh_token"])
