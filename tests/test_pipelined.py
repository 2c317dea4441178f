"""The session store's pipelined Redis connection (gateway.tokens.pipelined) against a real
redis-server: concurrent callers get their own replies, the script cache is reloaded after a
flush, a stalled or restarted server fails fast and is reconnected to, credentials and the
database number are honoured, and what connect() builds for each kind of URL."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis import exceptions as rx

from gateway.config.model import RedisConfig
from gateway.tokens.connection import GatewayRedis, connect
from gateway.tokens.store import SessionRecord, SessionStore
from tests.support.redis_server import RedisServer, start_redis

HOUR_MS = 3600_000


@pytest.fixture
async def own_server() -> Any:
    """A server of this test's own, free to be paused, stopped and restarted."""
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


async def lane_client(url: str, **options: Any) -> GatewayRedis:
    client = connect(RedisConfig(url=url, **options))
    assert isinstance(client, GatewayRedis) and client.lane is not None
    return client


async def test_connect_builds_a_lane_only_for_a_plain_server(redis_server: RedisServer) -> None:
    tcp = connect(RedisConfig(url=redis_server.url))
    unix = connect(RedisConfig(url="unix:///tmp/gw-test-none.sock"))
    tls = connect(RedisConfig(url=redis_server.url.replace("redis://", "rediss://")))
    embedded = connect(RedisConfig(url="memory://"))
    try:
        assert tcp.lane is not None and unix.lane is not None
        assert tls.lane is None  # TLS stays with redis-py
        assert getattr(embedded, "lane", None) is None
    finally:
        for client in (tcp, unix, tls, embedded):
            await client.aclose()


async def test_concurrent_callers_get_their_own_replies(redis_server: RedisServer) -> None:
    client = await lane_client(redis_server.url)
    try:
        lane = client.lane
        assert lane is not None
        replies = await asyncio.gather(*(lane.execute("ECHO", f"m{i}") for i in range(300)))
        assert replies == [f"m{i}".encode() for i in range(300)]
        # A caller that gives up keeps its place in line: its reply is read and dropped.
        gone = asyncio.ensure_future(lane.execute("ECHO", "cancelled"))
        await asyncio.sleep(0)  # sent
        gone.cancel()
        assert await lane.execute("ECHO", "after") == b"after"
        assert gone.cancelled()
        with pytest.raises(rx.ResponseError, match="unknown command"):
            await lane.execute("NO-SUCH-COMMAND")
        assert await lane.execute("ECHO", "still in step") == b"still in step"
    finally:
        await client.aclose()


def session(sid: str) -> SessionRecord:
    now = int(time.time() * 1000)
    return SessionRecord(sid=sid, sub="alice", roles=("user",), extra="", created_ms=now,
                         last_used_ms=now, expires_ms=now + HOUR_MS, max_expires_ms=now + HOUR_MS,
                         ip="127.0.0.1", user_agent="pytest/1", revoked=None)


async def test_rotation_goes_over_the_lane_and_survives_a_script_flush(
    redis_server: RedisServer, redis_client: Any,
) -> None:
    client = await lane_client(redis_server.url)
    try:
        store = SessionStore(client, "gw:")
        digests = [os.urandom(32) for _ in range(4)]
        await store.create(session("sid-lane"), digests[0], os.urandom(16), 10)

        async def rotate(gen: int) -> str:
            now = int(time.time() * 1000)
            result = await store.rotate("sid-lane", gen, digests[gen], digests[gen + 1], now,
                                        HOUR_MS, 10_000, b"sealed")
            return result.kind

        assert await rotate(0) == "rotated"
        await redis_client.config_resetstat()
        await redis_client.script_flush()  # what a restart does to the script cache
        assert await rotate(1) == "rotated"
        assert await rotate(2) == "rotated"
        stats = await redis_client.info("commandstats")
        # One EVALSHA per rotation (the first refused: NOSCRIPT), and one EVAL reloaded it.
        evalsha = stats["cmdstat_evalsha"]
        assert (evalsha["calls"], evalsha["failed_calls"]) == (2, 1)
        assert stats["cmdstat_eval"]["calls"] == 1
        assert int(await redis_client.hget("gw:s:{sid-lane}", "g")) == 3
    finally:
        await client.aclose()


async def test_a_stalled_server_times_out_every_caller_then_recovers(
    own_server: RedisServer,
) -> None:
    client = await lane_client(own_server.url, timeout=0.2, connect_timeout=0.2, retries=0)
    try:
        lane = client.lane
        assert lane is not None
        assert await lane.execute("PING") == b"PONG"
        own_server.pause()
        try:
            started = time.monotonic()
            results = await asyncio.gather(*(lane.execute("PING") for _ in range(30)),
                                           return_exceptions=True)
            took = time.monotonic() - started
        finally:
            own_server.resume()
        assert all(isinstance(r, rx.TimeoutError) for r in results), results
        assert took < 2.0  # each on its own timeout, not one after another
        assert await lane.execute("PING") == b"PONG"  # a new connection
    finally:
        await client.aclose()


async def test_a_restarted_server_is_reconnected_to(own_server: RedisServer) -> None:
    client = await lane_client(own_server.url, timeout=0.5, connect_timeout=0.5, retries=1)
    try:
        lane = client.lane
        assert lane is not None
        assert await lane.execute("SET", "k", "v") == b"OK"
        await asyncio.to_thread(own_server.restart)  # same port, empty data set
        assert await lane.execute("GET", "k") is None  # the retry took a new connection
        await asyncio.to_thread(own_server.stop)
        with pytest.raises(rx.ConnectionError):
            await lane.execute("PING")
    finally:
        await client.aclose()


async def test_password_and_database_number_are_used() -> None:
    server = start_redis("--requirepass", "lane-secret-1")
    base = f"127.0.0.1:{server.port}"
    client = await lane_client(f"redis://:lane-secret-1@{base}/3")
    wrong = await lane_client(f"redis://:not-the-password@{base}/3", retries=0)
    check = aioredis.Redis.from_url(f"redis://:lane-secret-1@{base}/3")
    try:
        assert client.lane is not None and wrong.lane is not None
        assert await client.lane.execute("SET", "where", "db3") == b"OK"
        assert await check.get("where") == b"db3"
        with pytest.raises(rx.ConnectionError):
            await wrong.lane.execute("PING")
    finally:
        for c in (client, wrong, check):
            await c.aclose()
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


async def test_closing_the_client_closes_the_lane(redis_server: RedisServer) -> None:
    client = await lane_client(redis_server.url)
    lane = client.lane
    assert lane is not None
    assert await lane.execute("PING") == b"PONG"
    await client.aclose()
    with pytest.raises(rx.ConnectionError):
        await lane.execute("PING")


async def fake_redis(answer: bytes) -> tuple[asyncio.Server, int]:
    """A loopback server that answers each chunk it reads with `answer` (a misbehaving Redis)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(65536):
                writer.write(answer)
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_a_reply_nobody_asked_for_drops_the_connection() -> None:
    server, port = await fake_redis(b"+first\r\n+extra\r\n")
    client = await lane_client(f"redis://127.0.0.1:{port}/0", retries=0)
    try:
        assert client.lane is not None
        assert await client.lane.execute("PING") == b"first"
        # `extra` must never be taken for the answer to the next command.
        assert await client.lane.execute("PING") == b"first"
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


async def test_a_protocol_error_fails_the_command() -> None:
    server, port = await fake_redis(b"?not resp\r\n")
    client = await lane_client(f"redis://127.0.0.1:{port}/0", retries=0)
    try:
        assert client.lane is not None
        with pytest.raises(rx.ConnectionError, match="Protocol error"):
            await client.lane.execute("PING")
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
