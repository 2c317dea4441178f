"""What operators see: Prometheus metrics (main port, admin listener, totals across workers), the
JSON access log (one line per request) and the audit log (one line per security event)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from gateway.clock import FakeClock
from gateway.tokens.signer import generate_private_pem
from tests.conftest import PASSWORD, REPO, gateway_yaml
from tests.support.gateway_process import GatewayProcess, start_gateway
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer, start_redis
from tests.support.upstream import Upstream

ACCESS_FIELDS = {"time", "request_id", "method", "path", "route", "status", "bytes",
                 "duration_ms", "upstream_ms", "user_id", "session_id"}


# --- helpers --------------------------------------------------------------------------------
def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    """A sample's value, 0 when the series does not exist (yet)."""
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for raw in text.splitlines():
        raw = raw.strip()
        if raw:
            lines.append(json.loads(raw))  # every line the gateway writes is one JSON object
    return lines


def access_lines(text: str) -> list[dict[str, Any]]:
    return [line for line in json_lines(text) if "status" in line and "request_id" in line]


def audit_lines(text: str) -> list[dict[str, Any]]:
    return [line for line in json_lines(text) if "event" in line]


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server this test may stop."""
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("obs-keys") / "signing.pem"
    path.write_bytes(generate_private_pem("EdDSA"))
    return path


@pytest.fixture
def processes() -> Iterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    yield started
    for p in started:
        p.stop()


# --- metrics in-process ---------------------------------------------------------------------
async def test_metrics_count_requests_failures_and_token_outcomes(
    redis_client: Any, gateway: Any
) -> None:
    # redis_client first: torn down after the app (a client closed under a running revocation
    # feed can leave the feed task uncancellable in redis-py 8.1, hanging the teardown).
    clock = FakeClock(time.time())
    client = await gateway(redis=redis_client, clock=clock,
                           tokens="access_ttl: 60s\nleeway: 0s\nreuse_grace: 0s")
    login = {"username": "alice", "password": PASSWORD}

    r = await client.post("/auth/login", json={"username": "alice", "password": "wrong pw!"})
    assert r.status == 401
    r = await client.post("/auth/login", json=login)
    assert r.status == 200
    first = await r.json()
    assert (await client.get("/api/a", headers=bearer(first["access_token"]))).status == 200
    assert (await client.get("/api/b")).status == 401
    assert (await client.get("/api/c", headers=bearer("not.a.jwt"))).status == 401
    assert (await client.get("/nowhere")).status == 404

    r = await client.post("/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert r.status == 200
    second = await r.json()
    await asyncio.sleep(0.02)  # past the 1 ms grace window
    r = await client.post("/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert (r.status, (await r.json())["error"]) == (401, "refresh_token_reused")
    r = await client.post("/auth/refresh", json={"refresh_token": "A" * 103})
    assert (r.status, (await r.json())["error"]) == (401, "invalid_refresh_token")
    r = await client.post("/auth/refresh", json={"refresh_token": second["refresh_token"]})
    assert (r.status, (await r.json())["error"]) == (401, "session_revoked")

    r = await client.post("/auth/login", json=login)
    third = await r.json()
    r = await client.post("/auth/logout", json={"refresh_token": third["refresh_token"]})
    assert r.status == 204
    clock.advance(61)
    r = await client.get("/api/d", headers=bearer(third["access_token"]))
    assert (r.status, (await r.json())["error"]) == (401, "token_expired")

    r = await client.get("/metrics")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    text = await r.text()

    assert value(text, "gateway_requests_total", route="api", status="2xx") == 1
    assert value(text, "gateway_requests_total", route="api", status="4xx") == 3
    assert value(text, "gateway_requests_total", route="/auth/login", status="2xx") == 2
    assert value(text, "gateway_requests_total", route="/auth/login", status="4xx") == 1
    assert value(text, "gateway_requests_total", route="/auth/refresh", status="2xx") == 1
    assert value(text, "gateway_requests_total", route="/auth/refresh", status="4xx") == 3
    assert value(text, "gateway_requests_total", route="gateway", status="4xx") == 1  # no route
    assert value(text, "gateway_request_duration_seconds_count", route="api") == 4
    # Only the one proxied request reached the upstream.
    assert value(text, "gateway_upstream_duration_seconds_count", route="api") == 1

    assert value(text, "gateway_token_validation_failures_total", reason="invalid_token") == 1
    assert value(text, "gateway_token_validation_failures_total", reason="token_expired") == 1
    assert value(text, "gateway_logins_total", result="success") == 2
    assert value(text, "gateway_logins_total", result="failure") == 1
    assert value(text, "gateway_refreshes_total", result="success") == 1
    assert value(text, "gateway_refreshes_total", result="reused") == 1
    assert value(text, "gateway_refreshes_total", result="invalid_refresh_token") == 1
    assert value(text, "gateway_refreshes_total", result="session_revoked") == 1
    assert value(text, "gateway_refresh_reuse_detected_total") == 1
    assert value(text, "gateway_revocations_total", reason="logout") == 1
    assert value(text, "gateway_revocations_total", reason="refresh_token_reused") == 1
    # Session store calls are timed by intent; nothing failed.
    assert value(text, "gateway_redis_latency_seconds_count", op="rotate") == 3
    assert value(text, "gateway_redis_latency_seconds_count", op="create") == 2
    assert not [k for k, v in samples(text).items() if k[0] == "gateway_redis_errors_total" and v]


async def test_in_flight_gauge_counts_requests_being_handled(
    gateway: Any, upstream: Upstream
) -> None:
    client = await gateway()
    slow = asyncio.ensure_future(client.get("/public/slow?s=1"))
    for _ in range(200):
        if upstream.received:
            break
        await asyncio.sleep(0.01)
    assert upstream.received, "the slow request never reached the upstream"
    text = await (await client.get("/metrics")).text()
    assert value(text, "gateway_in_flight_requests") == 2  # the slow one and this scrape
    assert (await slow).status == 200
    text = await (await client.get("/metrics")).text()
    assert value(text, "gateway_in_flight_requests") == 1


async def test_redis_failures_are_counted_and_answered_503(
    gateway: Any, own_redis: RedisServer
) -> None:
    redis = aioredis.Redis.from_url(own_redis.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        client = await gateway(redis=redis)
        r = await client.post("/auth/login", json={"username": "alice", "password": PASSWORD})
        tokens = await r.json()
        own_redis.stop()
        r = await client.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
        assert (r.status, (await r.json())["error"]) == (503, "session_store_unavailable")
        text = await (await client.get("/metrics")).text()
        assert value(text, "gateway_redis_errors_total", op="rotate") == 1
        assert value(text, "gateway_redis_latency_seconds_count", op="rotate") == 1
        assert value(text, "gateway_requests_total", route="/auth/refresh", status="5xx") == 1
    finally:
        await redis.aclose()


# --- real processes -------------------------------------------------------------------------
def _process_config(upstream: Upstream, users: Path, redis_url: str, key: Path,
                    extra: str = "") -> str:
    return gateway_yaml(upstream.url, users, redis_url=redis_url,
                        tokens=f"signing_key_file: '{key}'\nreuse_grace: 0s",
                        extra=extra + "auth: {rate_limit: {per_ip: 10000}}\n")


async def test_admin_listener_and_totals_across_two_workers(
    tmp_path: Path, users_file: Path, redis_server: RedisServer, redis_client: Any,
    upstream: Upstream, signing_key: Path, processes: list[GatewayProcess],
) -> None:
    admin_port = free_port()
    gw = start_gateway(tmp_path, _process_config(
        upstream, users_file, redis_server.url, signing_key,
        extra=f"metrics: {{host: 127.0.0.1, port: {admin_port}}}\n"), workers=2)
    processes.append(gw)
    admin = f"http://127.0.0.1:{admin_port}/metrics"
    async with httpx.AsyncClient(timeout=10) as c:
        # Both workers must be up before traffic, or one would take it all.
        for _ in range(100):
            if (await c.get(admin)).status_code == 200:
                break
            await asyncio.sleep(0.05)
        # The admin listener serves metrics; the public port does not.
        r = await c.get(f"{gw.url}/metrics")
        assert (r.status_code, r.json()["error"]) == (404, "no_route")
        n = 40
        for i in range(n):
            # A new connection each time: SO_REUSEPORT spreads connections over the workers.
            async with httpx.AsyncClient(timeout=10) as one:
                assert (await one.get(f"{gw.url}/public/{i}")).status_code == 200
        r = await c.post(f"{gw.url}/auth/login", json={"username": "bob", "password": PASSWORD})
        assert r.status_code == 200
    # Whichever worker answers the scrape, the totals are the sums over both workers.
    for _ in range(8):
        async with httpx.AsyncClient(timeout=10) as one:
            r = await one.get(admin)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        assert value(r.text, "gateway_requests_total", route="public", status="2xx") == n
        assert value(r.text, "gateway_upstream_duration_seconds_count", route="public") == n
        assert value(r.text, "gateway_logins_total", result="success") == 1
        assert value(r.text, "gateway_in_flight_requests") == 0  # scrapes are not requests
    assert len(upstream.received) == n

    # Workers killed mid-request are restarted; their counts stay, their in-flight does not.
    assert gw.proc is not None
    workers = children(gw.proc.pid)
    assert len(workers) == 2
    async with httpx.AsyncClient(timeout=10) as c:
        slow = asyncio.ensure_future(c.get(f"{gw.url}/public/slow?s=2"))
        for _ in range(200):
            if len(upstream.received) > n:
                break
            await asyncio.sleep(0.01)
        r = await c.get(admin)
        assert value(r.text, "gateway_in_flight_requests") == 1
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(httpx.HTTPError):
            await slow
        text = ""
        for _ in range(200):  # the supervisor restarts both (bounded: 20 s)
            await asyncio.sleep(0.1)
            try:
                r = await c.get(admin)
            except httpx.HTTPError:
                continue
            if r.status_code == 200 and len(children(gw.proc.pid)) == 2:
                text = r.text
                break
        assert text, "workers were not restarted"
    assert value(text, "gateway_in_flight_requests") == 0
    assert value(text, "gateway_requests_total", route="public", status="2xx") == n


def children(pid: int) -> list[int]:
    """Live child processes of `pid` (from /proc: the supervisor's workers)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


async def test_access_and_audit_logs_are_json_lines(
    tmp_path: Path, users_file: Path, redis_server: RedisServer, redis_client: Any,
    upstream: Upstream, signing_key: Path, processes: list[GatewayProcess],
) -> None:
    config_text = _process_config(upstream, users_file, redis_server.url, signing_key)
    gw = start_gateway(tmp_path, config_text)
    processes.append(gw)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as c:
        r = await c.get("/public/page?q=not-logged&x=1", headers={"X-Request-Id": "obs-public"})
        assert r.status_code == 200
        r = await c.post("/auth/login", json={"username": "alice", "password": "nope-nope"})
        assert r.status_code == 401
        r = await c.post("/auth/login", json={"username": "alice", "password": PASSWORD})
        first = r.json()
        me = (await c.get("/auth/me", headers=bearer(first["access_token"]))).json()
        r = await c.get("/api/data?page=2", headers={**bearer(first["access_token"]),
                                                      "X-Request-Id": "obs-api"})
        assert r.status_code == 200
        r = await c.post("/auth/refresh", json={"refresh_token": first["refresh_token"]})
        assert r.status_code == 200
        await asyncio.sleep(0.02)
        r = await c.post("/auth/refresh", json={"refresh_token": first["refresh_token"]})
        assert r.json()["error"] == "refresh_token_reused"
        second = (await c.post("/auth/login", json={"username": "alice",
                                                    "password": PASSWORD})).json()
        r = await c.post("/auth/logout", json={"refresh_token": second["refresh_token"]})
        assert r.status_code == 204
        third = (await c.post("/auth/login", json={"username": "alice",
                                                   "password": PASSWORD})).json()
        r = await c.post("/auth/logout-all", headers=bearer(third["access_token"]))
        assert r.status_code == 204
        fourth = (await c.post("/auth/login", json={"username": "bob",
                                                    "password": PASSWORD})).json()
        bob_sid = (await c.get("/auth/me", headers=bearer(fourth["access_token"]))).json()["sid"]
    # An operator revokes a session from the command line: audited there too.
    admin = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gateway", "sessions", "revoke", "--session", bob_sid,
         "-c", str(gw.config_path)],
        capture_output=True, text=True, timeout=30, cwd=REPO, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert admin.returncode == 0, admin.stderr
    gw.stop()
    log = gw.logs()

    access = access_lines(log)
    public = [line for line in access if line["request_id"] == "obs-public"]
    assert len(public) == 1  # one line per request
    line = public[0]
    assert ACCESS_FIELDS <= line.keys()
    assert (line["method"], line["path"], line["route"], line["status"]) == (
        "GET", "/public/page", "public", 200)  # no query string: values there may be secrets
    assert line["bytes"] > 0 and line["duration_ms"] >= 0 and line["upstream_ms"] >= 0
    assert line["user_id"] is None and line["session_id"] is None
    api = [line for line in access if line["request_id"] == "obs-api"]
    assert len(api) == 1
    assert (api[0]["path"], api[0]["route"], api[0]["user_id"], api[0]["session_id"]) == (
        "/api/data", "api", "alice", me["sid"])
    # Every request got exactly one access line, each with its own request id.
    ids = [line["request_id"] for line in access]
    assert len(ids) == len(set(ids))
    assert sum(1 for line in access if line["path"] == "/auth/login") == 5

    audit = audit_lines(log)
    events = [a["event"] for a in audit]
    assert events.count("login_failure") == 1
    assert events.count("login_success") == 4
    for event in ("refresh", "refresh_token_reused", "logout", "logout_all"):
        assert event in events, event
    for a in audit:
        assert "time" in a and "status" not in a and "request_id" not in a  # separate lines
    reused = next(a for a in audit if a["event"] == "refresh_token_reused")
    assert (reused["user"], reused["sid"]) == ("alice", me["sid"])
    logout_all = next(a for a in audit if a["event"] == "logout_all")
    assert (logout_all["user"], logout_all["count"]) == ("alice", 1)
    failure = next(a for a in audit if a["event"] == "login_failure")
    assert failure["user"] == "alice" and failure["ip"] == "127.0.0.1"

    printed = (admin.stdout + admin.stderr).splitlines()
    admin_audit = [a for a in map(json.loads, (ln for ln in printed if ln.startswith("{")))
                   if "event" in a]
    assert [(a["event"], a["sid"]) for a in admin_audit] == [("session_revoked_admin", bob_sid)]


def test_log_formatter_masks_token_shaped_values() -> None:
    """The safety net under every log line: whatever a library puts in a message or an
    exception, JWTs, refresh tokens and Authorization credentials come out masked."""
    import logging

    from gateway.serve import JsonFormatter

    jwt = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXZhbHVl"
    refresh = "Ab-_" * 25 + "xyz"
    assert len(refresh) == 103
    try:
        raise ValueError(f"could not decode {jwt}")
    except ValueError:
        record = logging.LogRecord("gateway", logging.ERROR, __file__, 1,
                                   "failed for %s with Authorization: Bearer %s", (refresh, jwt),
                                   sys.exc_info())
    line = JsonFormatter().format(record)
    parsed = json.loads(line)
    assert jwt not in line and refresh not in line and "Bearer " not in line
    assert parsed["message"] == "failed for [redacted] with Authorization: [redacted]"
    assert "[redacted]" in parsed["traceback"]
    access = logging.LogRecord("gateway.access", logging.INFO, __file__, 1,
                               json.dumps({"path": f"/api/{jwt}", "status": 200}), (), None)
    assert json.loads(JsonFormatter().format(access)) == {"path": "/api/[redacted]",
                                                           "status": 200}

