"""No token, password, cookie or Authorization value ever reaches a log line.

Named to sort last: besides its own scenario (every credential-carrying path through a real gateway
process at debug level), it scans the log of every gateway process this test session started
(tests/support/gateway_process.py writes them to test-artifacts/logs/)."""

from __future__ import annotations

import asyncio
import base64
import re
import time
from pathlib import Path

import httpx
import pytest

from gateway.tokens.signer import generate_private_pem
from tests.conftest import PASSWORD, gateway_yaml
from tests.support.gateway_process import LOG_DIR, GatewayProcess, start_gateway
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer
from tests.support.upstream import Upstream

#: Collected at session start: logs written after this belong to this test session.
SESSION_START = time.time()
WRONG_PASSWORD = "hunter2-wrong-password"
JWT_SHAPED = re.compile(r"eyJ[A-Za-z0-9_-]{8,}")
REFRESH_SHAPED = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{103}(?![A-Za-z0-9_-])")


def leaks(text: str, secrets: set[str]) -> list[str]:
    """Each offending line, with the secret masked (the failure report is a log too)."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        hits = [s for s in secrets if s and s in line]
        hits += JWT_SHAPED.findall(line) + REFRESH_SHAPED.findall(line)
        if "Bearer " in line:
            hits.append("Bearer ")
        if "Basic " in line:
            hits.append("Basic ")
        for hit in hits:
            found.append(f"line {n}: ...{line.replace(hit, '<' + hit[:4] + '...>')[:300]}")
    return found


async def _scenario(gw: GatewayProcess, broken_route_port: int) -> set[str]:
    """Drive every path a credential travels; returns every secret value that went over the wire."""
    secrets = {PASSWORD, WRONG_PASSWORD}
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as c:
        # API login, failed and successful, JSON and form; the token endpoint's two grants.
        r = await c.post("/auth/login", json={"username": "alice", "password": WRONG_PASSWORD})
        assert r.status_code == 401
        r = await c.post("/auth/login", data={"username": "alice", "password": PASSWORD})
        assert r.status_code == 200
        api = r.json()
        secrets |= {api["access_token"], api["refresh_token"]}
        secrets |= {v for v in r.cookies.values()}
        r = await c.post("/auth/token", data={"grant_type": "password", "username": "bob",
                                              "password": PASSWORD})
        grant = r.json()
        secrets |= {grant["access_token"], grant["refresh_token"]}
        r = await c.post("/auth/token", data={"grant_type": "refresh_token",
                                              "refresh_token": grant["refresh_token"]})
        assert r.status_code == 200
        secrets |= {r.json()["access_token"], r.json()["refresh_token"]}
        c.cookies.clear()

        # Proxied requests: bearer, tokens and a password in the query, a tampered token,
        # Basic credentials, a JSON body with a password, an upstream that refuses.
        auth = {"Authorization": f"Bearer {api['access_token']}"}
        r = await c.get(f"/api/x?access_token={api['access_token']}&password={PASSWORD}",
                        headers=auth)
        assert r.status_code == 200
        tampered = api["access_token"][:-4] + ("AAAA" if not api["access_token"].endswith(
            "AAAA") else "BBBB")
        secrets.add(tampered)
        r = await c.get("/api/x", headers={"Authorization": f"Bearer {tampered}"})
        assert r.status_code == 401
        r = await c.get("/api/x", headers={"Authorization": f"Bearer {api['refresh_token']}"})
        assert r.status_code == 401
        basic = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
        secrets.add(basic)
        r = await c.get("/api/x", headers={"Authorization": f"Basic {basic}"})
        assert r.status_code == 401
        r = await c.post("/api/x", headers=auth, json={"password": PASSWORD})
        assert r.status_code == 200
        r = await c.get("/broken/x", headers=auth)
        assert r.status_code == 502
        r = await c.post("/auth/login", content=b'{"username": "alice", "password": "'
                         + PASSWORD.encode(), headers={"Content-Type": "application/json"})
        assert r.status_code == 400
        r = await c.get("/api/x", headers={**auth, "X-Big": "a" * 20000})
        assert r.status_code == 431

        # Refresh: rotation, the refresh cookie with its CSRF header, reuse of a spent token.
        r = await c.post("/auth/refresh", json={"refresh_token": api["refresh_token"]})
        assert r.status_code == 200
        second = r.json()
        secrets |= {second["access_token"], second["refresh_token"]}
        r = await c.post("/auth/refresh", headers={
            "X-Requested-With": "fetch", "Cookie": f"gw_refresh={second['refresh_token']}"})
        assert r.status_code == 200
        third = r.json()
        secrets |= {third["access_token"], third["refresh_token"]}
        await asyncio.sleep(0.02)
        r = await c.post("/auth/refresh", json={"refresh_token": api["refresh_token"]})
        assert r.json()["error"] == "refresh_token_reused"
        c.cookies.clear()

        # Browser sign-in: CSRF cookie, form post, access and session cookies, inline refresh.
        r = await c.get("/auth/sign-in")
        csrf = r.cookies["gw_csrf"]
        secrets.add(csrf)
        r = await c.post("/auth/sign-in", data={"username": "alice", "password": WRONG_PASSWORD,
                                                "csrf": csrf})
        assert r.status_code == 401
        csrf = r.cookies.get("gw_csrf") or csrf
        secrets.add(csrf)
        r = await c.post("/auth/sign-in", data={"username": "alice", "password": PASSWORD,
                                                "csrf": csrf, "return": "/app/"})
        assert r.status_code == 303
        session, access = r.cookies["gw_session"], r.cookies["gw_access"]
        secrets |= {session, access}
        c.cookies.clear()
        r = await c.get("/app/page", headers={
            "Cookie": f"gw_access={access}; gw_session={session}"})
        assert r.status_code == 200
        # Only the session cookie: the gateway refreshes inside this request.
        r = await c.get("/app/page", headers={"Cookie": f"gw_session={session}"})
        assert r.status_code == 200
        secrets |= {v for v in r.cookies.values()}
        c.cookies.clear()

        # Logout, logout-all, and requests with the now revoked tokens.
        login = (await c.post("/auth/login", json={"username": "bob",
                                                   "password": PASSWORD})).json()
        secrets |= {login["access_token"], login["refresh_token"]}
        r = await c.post("/auth/logout", json={"refresh_token": login["refresh_token"]})
        assert r.status_code == 204
        last = (await c.post("/auth/login", json={"username": "alice",
                                                  "password": PASSWORD})).json()
        secrets |= {last["access_token"], last["refresh_token"]}
        r = await c.post("/auth/logout-all",
                         headers={"Authorization": f"Bearer {last['access_token']}"})
        assert r.status_code == 204
        for spent in (third, last):  # revoked by reuse detection, and by logout-all
            r = await c.post("/auth/refresh", json={"refresh_token": spent["refresh_token"]})
            assert r.status_code == 401
            for _ in range(100):  # until the revocation feed has delivered it (milliseconds)
                r = await c.get("/api/x",
                                headers={"Authorization": f"Bearer {spent['access_token']}"})
                if r.status_code == 401:
                    break
                await asyncio.sleep(0.02)
            assert r.status_code == 401
        c.cookies.clear()

    # A request line aiohttp cannot parse, carrying a token.
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(f"GET /api/x HTTP/1.1 junk\r\nAuthorization: Bearer {api['access_token']}"
                 "\r\n\r\n".encode())
    await writer.drain()
    await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    await writer.wait_closed()
    return {s for s in secrets if len(s) >= 8}


async def test_no_secret_reaches_any_log_line(
    tmp_path: Path, users_file: Path, redis_server: RedisServer, redis_client: object,
    upstream: Upstream,
) -> None:
    key = tmp_path / "signing.pem"
    key.write_bytes(generate_private_pem("EdDSA"))
    broken = free_port()  # nothing listens there
    routes = (f"- {{name: api, path: /api, upstream: {upstream.url}, auth: required}}\n"
              f"- {{name: app, path: /app, upstream: {upstream.url}, auth: required, "
              "browser: true}\n"
              f"- {{name: broken, path: /broken, upstream: 'http://127.0.0.1:{broken}', "
              "auth: required}\n")
    text = gateway_yaml(
        upstream.url, users_file, redis_url=redis_server.url, routes=routes,
        tokens=f"signing_key_file: '{key}'\nreuse_grace: 0s",
        extra="cookies: {enabled: true, secure: false}\nlogging: {level: debug}\n"
              "auth: {rate_limit: {per_ip: 10000}}\n",
    )
    gw = start_gateway(tmp_path, text)
    try:
        secrets = await _scenario(gw, broken)
    finally:
        gw.stop()
    log = gw.logs()
    assert '"level":"debug"' in log  # debug logging really was on
    assert '"event":"login_success"' in log and '"status":431' in log  # the whole scenario
    problems = leaks(log, secrets)
    assert not problems, "secrets in the gateway log:\n" + "\n".join(problems[:20])
    # The formatter masks token-shaped values as a safety net; no code path should need it.
    assert "[redacted]" not in log


def test_no_secret_shaped_value_in_any_gateway_log_of_this_session() -> None:
    logs = [p for p in sorted(LOG_DIR.glob("*.log")) if p.stat().st_mtime >= SESSION_START]
    if not logs:
        pytest.skip("no gateway process ran in this session")
    problems = []
    for path in logs:
        for problem in leaks(path.read_text(errors="replace"), {PASSWORD}):
            problems.append(f"{path.name} {problem}")
    assert not problems, "secret-shaped values in gateway logs:\n" + "\n".join(problems[:30])
