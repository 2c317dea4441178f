"""A session stays in Redis's compact listpack encoding with a real browser User-Agent on the
default config (the User-Agent is stored in chunks of at most 64 bytes), and every User-Agent,
including sessions written by the previous single-field layout, reads back byte for byte."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest

from gateway.tokens import refresh as rt
from gateway.tokens.store import SessionRecord, SessionStore, _tag
from tests.support.tokens import bearer, login, refreshed

BROWSER_UA = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
              "Chrome/124.0.0.0 Safari/537.36")
# 256 characters (the most the gateway keeps) of 1- to 4-byte UTF-8, so that cutting every 64
# bytes would land inside characters.
MULTIBYTE_UA = ("Mozilla/5.0 (" + "é中😀a" * 70)[:256]
EMOJI_UA = "😀" * 256  # 1,024 bytes: the longest User-Agent the gateway can store
HOUR_MS = 3600_000


@pytest.fixture
async def fake_redis() -> AsyncIterator[Any]:
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    yield client
    await client.aclose()


@pytest.fixture(params=["fakeredis", "redis-server"])
def redis(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("fake_redis" if request.param == "fakeredis" else "redis_client")


@pytest.fixture
async def default_redis(redis_client: Any) -> Any:
    """The real server, which must run Redis's default listpack limit for these tests to mean
    anything."""
    config = await redis_client.config_get("hash-max-listpack-value")
    assert config == {"hash-max-listpack-value": "64"}
    return redis_client


def record(sid: str, user_agent: str, sub: str = "alice") -> SessionRecord:
    now = int(time.time() * 1000)
    return SessionRecord(
        sid=sid, sub=sub, roles=("user",), extra='{"email":"alice@example.test"}',
        created_ms=now, last_used_ms=now, expires_ms=now + HOUR_MS,
        max_expires_ms=now + 2 * HOUR_MS, ip="203.0.113.7", user_agent=user_agent, revoked=None,
    )


async def encoding(redis: Any, sid: str) -> bytes:
    return bytes(await redis.object("encoding", f"gw:s:{{{sid}}}"))


async def ua_fields(redis: Any, sid: str) -> list[bytes]:
    return sorted(k for k in await redis.hkeys(f"gw:s:{{{sid}}}") if k.startswith(b"ua"))


def test_the_multibyte_user_agent_crosses_chunk_boundaries() -> None:
    data = MULTIBYTE_UA.encode()
    assert len(MULTIBYTE_UA) == 256 and len(data) > 4 * 64
    # Some 64-byte cut falls inside a character: a naive split would break it.
    assert any(data[i] & 0xC0 == 0x80 for i in range(64, len(data), 64))


@pytest.mark.parametrize("ua", [BROWSER_UA, MULTIBYTE_UA, EMOJI_UA],
                         ids=["browser-111", "multibyte-256", "emoji-1024-bytes"])
async def test_a_long_user_agent_keeps_the_session_a_listpack(default_redis: Any, ua: str) -> None:
    store = SessionStore(default_redis, "gw:")
    sid = rt.new_sid()
    await store.create(record(sid, ua), os.urandom(32), os.urandom(16), 10)
    assert await encoding(default_redis, sid) == b"listpack"
    # Each chunk is UTF-8 by itself: a gateway of the previous version, which reads only `ua`,
    # lists a prefix during a rolling upgrade instead of failing on a cut character.
    key = f"gw:s:{{{sid}}}"
    chunks = [await default_redis.hget(key, name) for name in await ua_fields(default_redis, sid)]
    assert all(len(c) <= 64 and c.decode() for c in chunks)
    got = await store.get(sid)
    assert got is not None and got.user_agent == ua
    listed = await store.user_sessions("alice", int(time.time() * 1000))
    assert [r.user_agent for r in listed] == [ua]
    # Still compact after a rotation (which adds the previous token's digest).
    session = await default_redis.hgetall(f"gw:s:{{{sid}}}")
    res = await store.rotate(sid, 0, session[b"h"], os.urandom(32), int(time.time() * 1000),
                             HOUR_MS, 10_000, b"sealed")
    assert res.kind == "rotated"
    assert await encoding(default_redis, sid) == b"listpack"


async def test_the_browser_user_agent_is_listed_unchanged_and_compact_over_http(
    gateway: Any, default_redis: Any
) -> None:
    client = await gateway(redis=default_redis)
    for ua in (BROWSER_UA, MULTIBYTE_UA):
        tokens = await login(client, headers={"User-Agent": ua})
        r = await client.get("/auth/sessions", headers=bearer(tokens))
        assert r.status == 200, await r.text()
        mine = [s for s in (await r.json())["sessions"] if s["current"]]
        assert [s["user_agent"] for s in mine] == [ua]
        assert await encoding(default_redis, mine[0]["sid"]) == b"listpack"
        # A refresh keeps the session compact and its User-Agent intact.
        tokens = await refreshed(client, tokens["refresh_token"])
        assert await encoding(default_redis, mine[0]["sid"]) == b"listpack"
        r = await client.get("/auth/sessions", headers=bearer(tokens))
        assert [s["user_agent"] for s in (await r.json())["sessions"] if s["current"]] == [ua]


async def test_a_user_agent_past_the_cap_is_cut_at_a_character(redis: Any) -> None:
    """The service keeps 256 characters (at most 1 KiB); the store bounds the chunks itself."""
    store = SessionStore(redis, "gw:")
    sid = rt.new_sid()
    await store.create(record(sid, "é" * 700), os.urandom(32), os.urandom(16), 10)
    got = await store.get(sid)
    assert got is not None and got.user_agent == "é" * 512
    assert len(await ua_fields(redis, sid)) == 16


async def old_layout_session(redis: Any, sid: str, sub: str, ua: str) -> None:
    """A session as the previous version wrote it: the whole User-Agent in one `ua` field."""
    now = int(time.time() * 1000)
    key = f"gw:s:{{{sid}}}"
    await redis.hset(key, mapping={
        "sub": sub, "r": "user", "c": now, "u": now, "x": now + HOUR_MS, "m": now + 2 * HOUR_MS,
        "g": 0, "h": os.urandom(32), "k": os.urandom(16), "ip": "198.51.100.9", "ua": ua,
    })
    await redis.pexpireat(key, now + HOUR_MS)
    await redis.zadd(f"gw:u:{{{_tag(sub)}}}", {sid: now + 2 * HOUR_MS})


async def test_sessions_of_the_previous_layout_still_read_back(redis: Any) -> None:
    store = SessionStore(redis, "gw:")
    sids = {rt.new_sid(): ua for ua in (BROWSER_UA, MULTIBYTE_UA)}
    for sid, ua in sids.items():
        await old_layout_session(redis, sid, "alice", ua)
        got = await store.get(sid)
        assert got is not None and got.user_agent == ua
    listed = await store.user_sessions("alice", int(time.time() * 1000))
    assert {r.sid: r.user_agent for r in listed} == sids


async def test_sessions_of_the_previous_layout_are_listed_over_http(
    gateway: Any, redis_client: Any
) -> None:
    client = await gateway(redis=redis_client)
    tokens = await login(client, headers={"User-Agent": "laptop/2.0"})
    old_sid = rt.new_sid()
    await old_layout_session(redis_client, old_sid, "alice", MULTIBYTE_UA)
    r = await client.get("/auth/sessions", headers=bearer(tokens))
    assert r.status == 200, await r.text()
    listed = {s["sid"]: s["user_agent"] for s in (await r.json())["sessions"]}
    assert listed[old_sid] == MULTIBYTE_UA
    assert sorted(listed.values()) == sorted(["laptop/2.0", MULTIBYTE_UA])


async def test_revocation_drops_every_user_agent_chunk(redis: Any) -> None:
    store = SessionStore(redis, "gw:")
    revoked, reused = rt.new_sid(), rt.new_sid()
    h0 = os.urandom(32)
    for sid in (revoked, reused):
        await store.create(record(sid, MULTIBYTE_UA), h0, os.urandom(16), 10)
        assert len(await ua_fields(redis, sid)) > 4
    assert await store.revoke(revoked, "logout") == "alice"
    # The previous token presented once its grace successor is gone: reuse revokes the family.
    now = int(time.time() * 1000)
    res = await store.rotate(reused, 0, h0, os.urandom(32), now, HOUR_MS, 10_000, b"sealed")
    assert res.kind == "rotated"
    await redis.delete(f"gw:g:{{{reused}}}")
    res = await store.rotate(reused, 0, h0, os.urandom(32), now, HOUR_MS, 10_000, b"sealed")
    assert res.kind == "reused"
    for sid in (revoked, reused):
        assert await ua_fields(redis, sid) == []
        got = await store.get(sid)
        assert got is not None and got.revoked and got.user_agent == ""
