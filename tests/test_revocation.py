"""A revoked session's still-unexpired access token is refused at the edge: in-process, across
REAL gateway processes sharing one REAL redis-server, for new instances, with the verify cache,
and via the strict per-request check of `check_session` routes."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import jwt
import pytest

from gateway.app import SHARED
from gateway.clock import FakeClock
from gateway.tokens.signer import generate_private_pem
from tests.conftest import PASSWORD, REPO, gateway_yaml
from tests.support.edge import bearer, craft, keyring_of, login, refused
from tests.support.gateway_process import GatewayProcess, start_gateway


def _sid(access_token: str) -> str:
    sid: str = jwt.decode(access_token, options={"verify_signature": False})["sid"]
    return sid


async def _until(check: Callable[[], Awaitable[bool]], seconds: float, step: float = 0.02) -> float:
    """Poll `check` until true; returns the time it took. Bounded in time and count."""
    started = time.monotonic()
    for _ in range(int(seconds / step) + 1):
        if await check():
            return time.monotonic() - started
        if time.monotonic() - started > seconds:
            break
        await asyncio.sleep(step)
    raise AssertionError(f"condition not met within {seconds}s")


async def _revoked_at(client: Any, token: str, path: str = "/api/x") -> None:
    r = await client.get(path, headers=bearer(token))
    body = await refused(r, 401, "token_revoked", "invalid_token")
    assert "revoked" in body["error_description"]


# --- in-process: every way a session ends ---------------------------------------------------
async def test_logout_with_refresh_token_revokes_the_access_token(gateway, upstream):
    client = await gateway()
    tokens = await login(client)
    access = tokens["access_token"]
    assert (await client.get("/api/x", headers=bearer(access))).status == 200
    r = await client.post("/auth/logout", json={"refresh_token": tokens["refresh_token"]})
    assert r.status == 204
    await _revoked_at(client, access)
    await _revoked_at(client, access, "/optional/x")  # optional routes too: never downgraded
    assert len(upstream.received) == 1


async def test_logout_with_bearer_revokes_the_access_token(gateway, upstream):
    client = await gateway()
    tokens = await login(client)
    r = await client.post("/auth/logout", headers=bearer(tokens["access_token"]))
    assert r.status == 204
    await _revoked_at(client, tokens["access_token"])
    # The refresh token of that session is dead as well.
    r = await client.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert r.status == 401
    assert upstream.received == []


async def test_logout_all_revokes_every_session_of_the_user_only(gateway, upstream):
    client = await gateway()
    first, second, bob = await login(client), await login(client), await login(client, "bob")
    r = await client.post("/auth/logout-all", headers=bearer(first["access_token"]))
    assert r.status == 204
    await _revoked_at(client, first["access_token"])
    await _revoked_at(client, second["access_token"])
    r = await client.get("/api/x", headers=bearer(bob["access_token"]))
    assert r.status == 200
    assert [x.header("X-User-Id") for x in upstream.received] == ["bob"]


async def test_delete_own_session_revokes_its_access_token(gateway, upstream):
    client = await gateway()
    keep, drop = await login(client), await login(client)
    r = await client.delete(f"/auth/sessions/{_sid(drop['access_token'])}",
                            headers=bearer(keep["access_token"]))
    assert r.status == 204
    await _revoked_at(client, drop["access_token"])
    assert (await client.get("/api/x", headers=bearer(keep["access_token"]))).status == 200


async def test_refresh_token_reuse_revokes_the_latest_access_token(gateway, upstream):
    client = await gateway()
    t0 = await login(client)

    async def refresh(token: str) -> dict[str, Any]:
        r = await client.post("/auth/refresh", json={"refresh_token": token})
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return body

    t1 = await refresh(t0["refresh_token"])
    t2 = await refresh(t1["refresh_token"])
    assert (await client.get("/api/x", headers=bearer(t2["access_token"]))).status == 200
    # A stolen, twice-superseded refresh token shows up: the whole family ends.
    r = await client.post("/auth/refresh", json={"refresh_token": t0["refresh_token"]})
    assert r.status == 401 and (await r.json())["error"] == "refresh_token_reused"
    for tokens in (t0, t1, t2):
        await _revoked_at(client, tokens["access_token"])
    assert len(upstream.received) == 1


async def test_cli_sessions_revoke_is_enforced_by_a_running_gateway(
    gateway, upstream, redis_server, redis_client, users_file, tmp_path
):
    client = await gateway(redis_url=redis_server.url)
    one, two, other = await login(client), await login(client), await login(client, "bob")
    config = tmp_path / "cli.yaml"
    config.write_text(gateway_yaml(upstream.url, users_file, redis_url=redis_server.url)
                      .replace("{port}", "0"))

    async def cli(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "sessions", "revoke", *args, "-c", str(config),
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, out.decode()
        return out.decode()

    sid = _sid(one["access_token"])
    assert f"{sid}: revoked" in await cli("--session", sid)
    await _until(lambda: _is_revoked(client, one["access_token"]), 2.0)
    assert (await client.get("/api/x", headers=bearer(two["access_token"]))).status == 200

    assert "1 session(s) revoked" in await cli("--user", "alice")
    await _until(lambda: _is_revoked(client, two["access_token"]), 2.0)
    assert (await client.get("/api/x", headers=bearer(other["access_token"]))).status == 200


async def _is_revoked(client: Any, token: str) -> bool:
    r = await client.get("/api/x", headers=bearer(token))
    if r.status == 200:
        return False
    assert r.status == 401 and (await r.json())["error"] == "token_revoked"
    return True


# --- check_session: the strict per-request check -----------------------------------------------
def _check_routes(url: str) -> str:
    return textwrap.dedent(f"""\
        - {{name: api, path: /api, upstream: {url}, auth: required}}
        - {{name: strict, path: /strict, upstream: {url}, auth: required, check_session: true}}
    """)


async def test_check_session_refuses_a_session_revoked_only_in_redis(gateway, upstream):
    await _check_session_after_silent_revoke(gateway, upstream)


async def test_check_session_on_real_redis(gateway, upstream, redis_server, redis_client):
    await _check_session_after_silent_revoke(gateway, upstream, redis_url=redis_server.url)


async def _check_session_after_silent_revoke(gateway: Any, upstream: Any, **kwargs: Any) -> None:
    client = await gateway(routes=_check_routes(upstream.url), **kwargs)
    tokens = await login(client)
    access = tokens["access_token"]
    assert (await client.get("/strict/x", headers=bearer(access))).status == 200
    # Revoked in the store directly: no announcement, no pub/sub message, nothing in memory.
    store = client.app[SHARED].store
    assert await store.revoke(_sid(access), "test") == "alice"
    await _revoked_at(client, access, "/strict/x")
    # The plain route relies on the (silent) feed and still accepts the token: the refusal above
    # came from the per-request check.
    assert (await client.get("/api/x", headers=bearer(access))).status == 200
    assert [x.path for x in upstream.received] == ["/strict/x", "/api/x"]


async def test_check_session_refuses_a_token_for_a_session_that_never_existed(gateway, upstream):
    client = await gateway(routes=_check_routes(upstream.url))
    token = craft(client, sid="no-such-session")
    assert (await client.get("/api/x", headers=bearer(token))).status == 200
    await _revoked_at(client, token, "/strict/x")


# --- the verify cache ------------------------------------------------------------------------
@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time())


def _spy_verify(client: Any) -> list[str]:
    keyring = keyring_of(client)
    calls: list[str] = []
    real = keyring.verify

    def spy(token: str) -> Any:
        calls.append(token)
        return real(token)

    keyring.verify = spy  # type: ignore[method-assign]
    return calls


async def test_verify_cache_skips_the_signature_check_on_repeat(gateway, upstream):
    client = await gateway()
    calls = _spy_verify(client)
    token = (await login(client))["access_token"]
    for _ in range(3):
        assert (await client.get("/api/x", headers=bearer(token))).status == 200
    assert calls == [token]
    other = craft(client)
    assert (await client.get("/api/x", headers=bearer(other))).status == 200
    assert calls == [token, other]


async def test_verify_cache_does_not_outlive_the_token(gateway, upstream, clock):
    client = await gateway(clock=clock, tokens="access_ttl: 60s\nleeway: 5s\n")
    calls = _spy_verify(client)
    token = (await login(client))["access_token"]
    assert (await client.get("/api/x", headers=bearer(token))).status == 200
    clock.advance(60 + 4)  # expired, but within the leeway: still served (from the cache)
    assert (await client.get("/api/x", headers=bearer(token))).status == 200
    assert len(calls) == 1
    clock.advance(2)
    r = await client.get("/api/x", headers=bearer(token))
    body = await refused(r, 401, "token_expired", "invalid_token")
    assert "expired" in body["error_description"]
    r = await client.get("/api/x", headers=bearer(token))  # evicted: a full check, same answer
    await refused(r, 401, "token_expired", "invalid_token")
    assert len(upstream.received) == 2


async def test_verify_cache_still_enforces_revocation(gateway, upstream):
    client = await gateway()
    calls = _spy_verify(client)
    tokens = await login(client)
    access = tokens["access_token"]
    assert (await client.get("/api/x", headers=bearer(access))).status == 200
    assert (await client.get("/api/x", headers=bearer(access))).status == 200
    assert calls == [access]  # cached
    assert (await client.post("/auth/logout", headers=bearer(access))).status == 204
    await _revoked_at(client, access)
    await _revoked_at(client, access)
    assert len(upstream.received) == 2


async def test_verify_cache_is_bounded(gateway, upstream):
    client = await gateway(tokens="verify_cache_size: 2\n")
    calls = _spy_verify(client)
    a, b, c = craft(client), craft(client), craft(client)
    for token in (a, b, c, a):
        assert (await client.get("/api/x", headers=bearer(token))).status == 200
    assert calls == [a, b, c, a]  # a was evicted by c


# --- REAL processes sharing one REAL redis-server ------------------------------------------
@pytest.fixture
def shared_yaml(upstream, users_file, redis_server, redis_client, tmp_path) -> str:
    """A config two gateway processes can share: one signing key file, one Redis."""
    key = tmp_path / "signing.pem"
    key.write_bytes(generate_private_pem("EdDSA"))
    key.chmod(0o600)
    return gateway_yaml(upstream.url, users_file, redis_url=redis_server.url,
                        tokens=f"signing_key_file: '{key}'\n")


@pytest.fixture
async def processes(tmp_path):
    started: list[GatewayProcess] = []

    async def start(text: str) -> GatewayProcess:
        proc = await asyncio.to_thread(start_gateway, tmp_path, text)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        await asyncio.to_thread(proc.stop)


@pytest.mark.integration
async def _call(http: aiohttp.ClientSession, method: str, url: str,
                **kwargs: Any) -> tuple[int, Any, Any]:
    """(status, JSON body or None, headers), with the response always read and released."""
    async with http.request(method, url, **kwargs) as r:
        text = await r.text()
        body = await r.json() if r.content_type == "application/json" else None
        assert r.status < 500, text
        return r.status, body, r.headers


@pytest.mark.integration
async def test_logout_on_one_instance_is_refused_on_another_within_a_second(
    processes, shared_yaml, upstream
):
    a, b = await processes(shared_yaml), await processes(shared_yaml)
    alice = {"username": "alice", "password": PASSWORD}
    async with aiohttp.ClientSession() as http:
        status, tokens, _ = await _call(http, "POST", f"{a.url}/auth/login", json=alice)
        assert status == 200, tokens
        access = tokens["access_token"]
        for gw in (a, b):
            status, body, _ = await _call(http, "GET", f"{gw.url}/api/x", headers=bearer(access))
            assert status == 200, body
        assert [x.header("X-User-Id") for x in upstream.received] == ["alice", "alice"]

        status, _, _ = await _call(http, "POST", f"{a.url}/auth/logout",
                                   json={"refresh_token": tokens["refresh_token"]})
        assert status == 204
        logged_out = time.monotonic()

        async def refused_on(gw: GatewayProcess) -> bool:
            status, body, headers = await _call(http, "GET", f"{gw.url}/api/x",
                                                headers=bearer(access))
            if status == 200:
                return False
            assert (status, body["error"]) == (401, "token_revoked"), body
            assert 'error="invalid_token"' in headers["WWW-Authenticate"]
            return True

        await _until(lambda: refused_on(b), 1.0, step=0.01)
        assert time.monotonic() - logged_out < 1.0
        assert await refused_on(a)  # and on A itself, of course

        # An instance started after the revocation loads the revoked set: its very first
        # proxied request is refused.
        c = await processes(shared_yaml)
        assert await refused_on(c)

        # Control: C verifies and proxies a live session's token (shared key, shared Redis).
        bob = {"username": "bob", "password": PASSWORD}
        status, tokens, _ = await _call(http, "POST", f"{b.url}/auth/login", json=bob)
        assert status == 200, tokens
        status, body, _ = await _call(http, "GET", f"{c.url}/api/x",
                                      headers=bearer(tokens["access_token"]))
        assert status == 200, body
    assert [x.header("X-User-Id") for x in upstream.received] == ["alice", "alice", "bob"]
