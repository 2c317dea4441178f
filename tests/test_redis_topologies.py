"""Redis as the distributed engine, against real topologies on loopback and real gateway processes:
Sentinel failover (SIGKILL of the primary mid-traffic), a three-primary Cluster (every Lua script
in one slot, revocations fanned out by pub/sub), a unix socket, and TLS (rediss://)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.config.model import RedisConfig
from gateway.tokens.connection import connect
from gateway.tokens.signer import generate_private_pem
from tests.conftest import PASSWORD
from tests.support.gateway_process import GatewayProcess, start_gateway
from tests.support.ports import free_port
from tests.support.redis_server import require_binary
from tests.support.topologies import (
    Cluster,
    Node,
    SentinelGroup,
    can_connect,
    remove,
    short_tmpdir,
    unix_socket_server,
    wait_until,
)
from tests.support.upstream import Upstream

pytestmark = pytest.mark.integration
CHANNEL = "gw:revocations"


# --- helpers --------------------------------------------------------------------------------
@pytest.fixture
def root() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    remove(path)


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One key file shared by every gateway instance, so tokens verify on any of them."""
    path = tmp_path_factory.mktemp("keys") / "signing.pem"
    path.write_bytes(generate_private_pem("EdDSA"))
    return path


def gateway_config(upstream: str, users: Path, key: Path, redis: str, tokens: str = "") -> str:
    return (
        "listen: {host: 127.0.0.1, port: {port}}\n"
        f"redis: {redis}\n"
        f"users: {{file: '{users}'}}\n"
        f"tokens: {{issuer: test-gateway, audience: test, signing_key_file: '{key}'{tokens}}}\n"
        "auth: {rate_limit: {per_ip: 100000}}\n"
        "routes:\n"
        f"  - {{name: api, path: /api, upstream: {upstream}, auth: required}}\n"
    )


@pytest.fixture
async def gateways() -> AsyncIterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    yield started
    for gw in started:
        gw.stop()


async def login(client: httpx.AsyncClient, user: str = "alice") -> dict[str, str]:
    r = await client.post("/auth/login", json={"username": user, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def refresh(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.post("/auth/refresh", json={"refresh_token": token})


def bearer(tokens: dict[str, str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens['access_token']}"}


async def refused_within(client: httpx.AsyncClient, tokens: dict[str, str], seconds: float) -> str:
    """Poll the API with an access token until it is refused; returns the error code."""
    deadline = time.monotonic() + seconds
    while True:
        r = await client.get("/api/probe", headers=bearer(tokens))
        if r.status_code == 401:
            return str(r.json()["error"])
        assert r.status_code == 200, r.text
        if time.monotonic() > deadline:
            raise AssertionError(f"access token still accepted {seconds}s after revocation")
        await asyncio.sleep(0.02)


# --- Sentinel ------------------------------------------------------------------------------
async def test_sentinel_failover_keeps_sessions_and_recovers(
    root: Path, tmp_path: Path, users_file: Path, signing_key: Path, upstream: Upstream,
    gateways: list[GatewayProcess],
) -> None:
    group = SentinelGroup(root)
    try:
        group.start()
        redis = (f"{{sentinel: {{addresses: {json.dumps(group.addresses)}, "
                 f"service_name: {group.service_name}}}, timeout: 500ms, connect_timeout: 500ms}}")
        gw = start_gateway(tmp_path, gateway_config(upstream.url, users_file, signing_key, redis))
        gateways.append(gw)
        async with httpx.AsyncClient(base_url=gw.url, timeout=5) as client:
            # Sessions made before the failover, replicated, then left untouched until after it.
            before = [await login(client) for _ in range(3)]
            rotated = (await refresh(client, before[0]["refresh_token"])).json()
            before[0] = rotated
            group.wait_replicated()

            statuses: list[tuple[float, int, str]] = []
            stop = asyncio.Event()

            async def traffic() -> None:
                """Logins and refresh chains, restarting the chain after any failure."""
                current: str | None = None
                for _ in range(5000):
                    if stop.is_set():
                        return
                    if current is None:
                        r = await client.post("/auth/login",
                                              json={"username": "bob", "password": PASSWORD})
                    else:
                        r = await refresh(client, current)
                    body = r.json()
                    statuses.append((time.monotonic(), r.status_code, body.get("error", "")))
                    current = body["refresh_token"] if r.status_code == 200 else None
                    if r.status_code != 200:
                        await asyncio.sleep(0.05)

            task = asyncio.ensure_future(traffic())
            # Kill mid-traffic: once the refresh chain is running (a login costs argon2 time).
            deadline = time.monotonic() + 15
            while len(statuses) < 10 and time.monotonic() < deadline and not task.done():
                await asyncio.sleep(0.05)
            old_primary = group.master_port()
            assert statuses and all(s == 200 for _, s, _ in statuses)
            killed = time.monotonic()
            assert group.primary is not None
            group.primary.kill()

            # Refreshes succeed again once a sentinel has promoted the replica (bounded wait).
            def recovered() -> bool:
                return any(t > killed and s == 200 for t, s, _ in statuses[-5:]) and (
                    sum(1 for t, s, _ in statuses if t > killed and s == 200) >= 5
                )

            deadline = time.monotonic() + 30
            while not recovered() and time.monotonic() < deadline and not task.done():
                await asyncio.sleep(0.1)
            stop.set()
            await asyncio.wait_for(task, 10)
            assert recovered(), f"no successful refresh after the failover: {statuses[-10:]}"

            assert group.replica is not None
            assert group.master_port() == group.replica.port != old_primary
            after = [(s, e) for t, s, e in statuses if t > killed]
            # While no primary is reachable the gateway answers 503 (never 500); at most one
            # refresh acknowledged by the old primary in its last instant can be lost with it.
            assert any(s == 503 for s, _ in after), "the failover never interrupted traffic"
            assert {e for s, e in after if s == 503} == {"session_store_unavailable"}
            assert all(s in (200, 401, 503) for s, _ in after), after
            assert sum(1 for s, _ in after if s == 401) <= 1, after

            # Tokens issued (and replicated) before the failover keep working after it.
            for tokens in before:
                r = await client.get("/api/after-failover", headers=bearer(tokens))
                assert r.status_code == 200
                r = await refresh(client, tokens["refresh_token"])
                assert r.status_code == 200, r.text
            assert (await client.get("/readyz")).status_code == 200
    finally:
        group.stop()


# --- Cluster -------------------------------------------------------------------------------
async def test_cluster_sessions_reuse_logout_and_revocation_feed(
    root: Path, tmp_path: Path, users_file: Path, signing_key: Path, upstream: Upstream,
    gateways: list[GatewayProcess],
) -> None:
    cluster = Cluster(root)
    try:
        cluster.start()
        text = gateway_config(upstream.url, users_file, signing_key,
                              f"{{url: '{cluster.url}', cluster: true}}", ", reuse_grace: 0s")
        a = start_gateway(tmp_path, text)
        gateways.append(a)
        b = start_gateway(tmp_path, text)
        gateways.append(b)
        # Both instances follow the revocation channel before anything is revoked.
        wait_until(lambda: cluster.subscribers(CHANNEL) >= 2, 10, "both gateways subscribed")
        async with (httpx.AsyncClient(base_url=a.url, timeout=5) as ca,
                    httpx.AsyncClient(base_url=b.url, timeout=5) as cb):
            assert (await ca.get("/readyz")).status_code == 200

            # Login on A, use and refresh on B, refresh again on A: one session, any instance.
            first = await login(ca)
            r = await cb.get("/api/who", headers=bearer(first))
            assert r.status_code == 200
            assert upstream.last.header("X-User-Id") == "alice"
            r1 = await refresh(cb, first["refresh_token"])
            assert r1.status_code == 200, r1.text
            r2 = await refresh(ca, r1.json()["refresh_token"])
            assert r2.status_code == 200, r2.text
            latest = r2.json()
            # The session hash and its grace blob are hash-tagged into one slot: the node that
            # owns it holds the session (rotate.lua touches both keys in one call).
            sid = (await cb.get("/auth/me", headers=bearer(latest))).json()["sid"]
            owner = cluster.owner_of(f"gw:s:{{{sid}}}")
            assert cluster.owner_of(f"gw:g:{{{sid}}}") is owner
            node = owner.client()
            try:
                assert node.exists(f"gw:s:{{{sid}}}") == 1
            finally:
                node.close()

            # Reuse detection: an already rotated token, after the (1 ms) grace window, revokes
            # the session; its newest refresh token and its access tokens stop working everywhere.
            await asyncio.sleep(0.05)
            r = await refresh(cb, first["refresh_token"])
            assert (r.status_code, r.json()["error"]) == (401, "refresh_token_reused")
            r = await refresh(ca, latest["refresh_token"])
            assert (r.status_code, r.json()["error"]) == (401, "session_revoked")
            assert await refused_within(ca, latest, 1.0) == "token_revoked"
            assert await refused_within(cb, latest, 1.0) == "token_revoked"

            # Logout on A: B refuses the access token within about a second (pub/sub fan-out).
            session = await login(ca)
            assert (await cb.get("/api/x", headers=bearer(session))).status_code == 200
            r = await ca.post("/auth/logout", json={"refresh_token": session["refresh_token"]})
            assert r.status_code == 204
            assert await refused_within(cb, session, 1.0) == "token_revoked"
            r = await refresh(cb, session["refresh_token"])
            assert (r.status_code, r.json()["error"]) == (401, "session_revoked")

            # Logout-all on B ends every session of the user, on both instances.
            sessions = [await login(ca, "bob"), await login(cb, "bob")]
            other = await login(ca, "alice")
            r = await cb.post("/auth/logout-all", headers=bearer(sessions[0]))
            assert r.status_code == 204
            for tokens in sessions:
                assert await refused_within(ca, tokens, 1.0) == "token_revoked"
                r = await refresh(ca, tokens["refresh_token"])
                assert r.status_code == 401
            assert (await cb.get("/api/x", headers=bearer(other))).status_code == 200
            assert (await refresh(cb, other["refresh_token"])).status_code == 200
    finally:
        cluster.stop()


# --- unix socket and TLS -------------------------------------------------------------------
async def test_unix_socket_url(
    root: Path, tmp_path: Path, users_file: Path, signing_key: Path, upstream: Upstream,
    gateways: list[GatewayProcess],
) -> None:
    server = unix_socket_server(root)
    try:
        gw = start_gateway(tmp_path, gateway_config(
            upstream.url, users_file, signing_key, f"{{url: 'unix://{server.unixsocket}'}}"))
        gateways.append(gw)
        async with httpx.AsyncClient(base_url=gw.url, timeout=5) as client:
            assert (await client.get("/readyz")).status_code == 200
            tokens = await login(client)
            r = await refresh(client, tokens["refresh_token"])
            assert r.status_code == 200
            # The session really lives in the server behind the socket.
            redis = server.client()
            try:
                assert redis.keys("gw:s:*")
            finally:
                redis.close()
            server.stop()
            r = await refresh(client, r.json()["refresh_token"])
            assert (r.status_code, r.json()["error"]) == (503, "session_store_unavailable")
            assert (await client.get("/readyz")).status_code == 503
    finally:
        server.stop()


def _tls_files(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA) and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "redis.crt", directory / "redis.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_rediss_url_verifies_the_server_certificate(
    root: Path, tmp_path: Path, users_file: Path, signing_key: Path, upstream: Upstream,
    gateways: list[GatewayProcess],
) -> None:
    require_binary("redis-server")
    cert, key = _tls_files(root)
    port = free_port()
    server = Node(root / "tls", f"tls-port {port}\ntls-cert-file {cert}\ntls-key-file {key}\n"
                  f"tls-ca-cert-file {cert}\ntls-auth-clients no\nsave \"\"\n", 0)
    server.start()
    try:
        wait_until(lambda: can_connect(port), 10, "TLS port")
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"
        gw = start_gateway(tmp_path, gateway_config(upstream.url, users_file, signing_key,
                                                     f"{{url: '{url}'}}"))
        gateways.append(gw)
        async with httpx.AsyncClient(base_url=gw.url, timeout=5) as client:
            assert (await client.get("/readyz")).status_code == 200
            tokens = await login(client)
            assert (await refresh(client, tokens["refresh_token"])).status_code == 200
        # Without the CA the certificate is not trusted: the store is unavailable, not bypassed.
        untrusted = connect(RedisConfig(url=f"rediss://127.0.0.1:{port}/0", timeout=1,
                                        retries=0))
        try:
            from redis.exceptions import ConnectionError as RedisConnectionError

            with pytest.raises(RedisConnectionError):
                await untrusted.ping()
        finally:
            await untrusted.aclose()
    finally:
        server.stop()

