"""A bounded soak (SOAK_SECONDS, default 60) of the real gateway process on a real Redis: mixed
traffic from concurrent clients with zero unexpected answers, Redis holding exactly the
sessions the clients' model says, and the process's memory and file descriptors flat."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gateway.users.file import add_user
from tests.conftest import PASSWORD, gateway_yaml
from tests.support.gateway_process import GatewayProcess, start_gateway
from tests.support.raw_client import ThreadedUpstream
from tests.support.redis_server import RedisServer, start_redis
from tests.support.soak import EXPECTED, Soak, open_fds, rss_bytes

pytestmark = pytest.mark.integration

SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
CLIENTS = int(os.environ.get("SOAK_CLIENTS", "20"))
#: RSS may grow by at most this between 25% of the run and its end (caches are bounded).
RSS_GROWTH = 20 * 1024 * 1024
#: Descriptors the process may hold beyond its baseline (pools settling, a log rotation...).
FD_SLACK = 10


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[GatewayProcess, RedisServer]]:
    # Production argon2 cost (not the shared cheap test file): the soak paces logins instead.
    users_file = tmp_path / "users.yaml"
    for user in ("alice", "bob"):
        add_user(str(users_file), user, PASSWORD, ("user",))
    server = start_redis()
    upstream = ThreadedUpstream().start()
    process: GatewayProcess | None = None
    try:
        text = gateway_yaml(
            upstream.url, users_file, redis_url=server.url, tokens="reuse_grace: 1s\n",
            extra="auth: {rate_limit: {per_ip: 1000000, per_user: 10},"
                  " max_sessions_per_user: 1000000}\n",
        )
        process = start_gateway(tmp_path, text)
        yield process, server
    finally:
        if process is not None:
            process.stop()
        upstream.stop()
        server.stop()


def redis_sessions(url: str) -> tuple[set[str], set[str]]:
    """(sids without the revoked marker, sids with it) among the session hashes."""
    client = redis.Redis.from_url(url)
    live: set[str] = set()
    revoked: set[str] = set()
    try:
        for key in client.scan_iter(match="gw:s:*", count=1000):
            match = re.fullmatch(r"gw:s:\{(.+)\}", key.decode())
            assert match, key
            (revoked if client.hexists(key, "rv") else live).add(match.group(1))
    finally:
        client.close()
    return live, revoked


@pytest.mark.timeout(SECONDS + 90)
async def test_soak(stack: tuple[GatewayProcess, RedisServer]) -> None:
    process, server = stack
    assert process.proc is not None
    pid = process.proc.pid
    fds_at_start = open_fds(pid)

    soak = Soak(process.url, users=["alice", "bob"], password=PASSWORD, clients=CLIENTS,
                reuse_grace=1.0)
    report = await soak.run(SECONDS, pid)

    print(f"soak {SECONDS:.0f}s x {CLIENTS} clients: {dict(report.ops)}; "
          f"sessions {len(report.live())} live, {len(report.ended())} ended; "
          f"RSS/fds {[(round(t), r // 2**20, f) for t, r, f in report.samples[::5]]}")
    # Every answer was one its operation may get, and every operation ran.
    assert report.unexpected == [], "\n".join(report.unexpected[:30])
    assert set(report.ops) == set(EXPECTED), report.ops
    assert sum(report.ops.values()) > 10 * SECONDS, report.ops

    # Redis holds exactly the sessions logged in: live ones unmarked, ended ones marked.
    live, revoked = await asyncio.to_thread(redis_sessions, server.url)
    assert live == report.live(), (len(live), len(report.live()))
    assert revoked == report.ended(), (len(revoked), len(report.ended()))

    # Memory flat after warm-up; no descriptor leaked (clients are gone, pools remain).
    await asyncio.sleep(1.0)
    rss_end, fds_end = rss_bytes(pid), open_fds(pid)
    warm = next(s for s in report.samples if s[0] >= SECONDS * 0.25)
    growth = rss_end - warm[1]
    assert growth < RSS_GROWTH, (
        f"RSS grew {growth / 2**20:.1f} MiB after warm-up: "
        f"{[(round(t), r // 2**20) for t, r, _ in report.samples]}")
    assert fds_end <= warm[2] + FD_SLACK, (fds_end, warm[2])
    # Pools may hold one connection per concurrent client (upstream and Redis), no more.
    assert fds_end <= fds_at_start + 2 * CLIENTS + FD_SLACK, (fds_at_start, fds_end)

    assert process.proc.poll() is None
    logs = process.logs()
    assert "Traceback" not in logs and '"level":"error"' not in logs, logs[-3000:]
