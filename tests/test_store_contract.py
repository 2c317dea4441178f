"""One contract for SessionStore, run on fakeredis (the embedded store) and a real redis-server."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import fakeredis
import pytest

from gateway.tokens.store import SessionRecord, SessionStore

HOUR_MS = 3600_000


@pytest.fixture
async def fake_redis() -> Any:
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    yield client
    await client.aclose()


@pytest.fixture(params=["fakeredis", "redis-server"])
def redis(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("fake_redis" if request.param == "fakeredis" else "redis_client")


@pytest.fixture
def store(redis: Any) -> SessionStore:
    return SessionStore(redis, "gw:")


def now_ms() -> int:
    return int(time.time() * 1000)


def record(sid: str, sub: str = "alice", *, created: int | None = None, idle_ms: int = HOUR_MS,
           max_ms: int = 2 * HOUR_MS, extra: str = "") -> SessionRecord:
    created = created if created is not None else now_ms()
    return SessionRecord(
        sid=sid, sub=sub, roles=("user", "admin"), extra=extra, created_ms=created,
        last_used_ms=created, expires_ms=created + idle_ms, max_expires_ms=created + max_ms,
        ip="127.0.0.1", user_agent="pytest/1", revoked=None,
    )


def digest() -> bytes:
    return os.urandom(32)


async def rotate(store: SessionStore, sid: str, gen: int, presented: bytes, successor: bytes,
                 *, now: int | None = None, idle_ms: int = HOUR_MS, grace_ms: int = 10_000,
                 blob: bytes = b"sealed") -> Any:
    return await store.rotate(sid, gen, presented, successor, now if now is not None else now_ms(),
                              idle_ms, grace_ms, blob)


async def test_create_and_get(store: SessionStore) -> None:
    rec = record("sid-1", extra='{"email":"a@example.test"}')
    assert await store.create(rec, digest(), b"k" * 16, 10) == []
    got = await store.get("sid-1")
    assert got == rec
    assert await store.get("no-such-sid") is None
    assert await store.is_active("sid-1")
    assert not await store.is_active("no-such-sid")


async def test_rotate_then_grace_then_reuse(store: SessionStore) -> None:
    h0, h1, h2 = digest(), digest(), digest()
    mac = os.urandom(16)
    rec = record("sid-r", extra='{"email":"a@example.test"}')
    await store.create(rec, h0, mac, 10)

    now = now_ms()
    res = await rotate(store, "sid-r", 0, h0, h1, now=now, idle_ms=60_000, grace_ms=60_000,
                       blob=b"successor-1")
    assert res.kind == "rotated"
    assert (res.sub, res.roles, res.extra, res.mac_key) == (
        "alice", ("user", "admin"), '{"email":"a@example.test"}', mac)
    assert res.expires_ms == now + 60_000
    got = await store.get("sid-r")
    assert got is not None and got.last_used_ms == now and got.expires_ms == now + 60_000

    # The previous token inside the grace window: the sealed successor, no second rotation.
    for _ in range(2):
        res = await rotate(store, "sid-r", 0, h0, digest(), blob=b"other")
        assert res.kind == "grace"
        assert (res.blob, res.sub, res.mac_key) == (b"successor-1", "alice", mac)
        assert res.roles == ("user", "admin") and res.extra == '{"email":"a@example.test"}'

    # The same generation with a wrong hash is noise, not theft.
    assert (await rotate(store, "sid-r", 1, digest(), digest())).kind == "invalid"
    assert (await rotate(store, "sid-r", 0, digest(), digest())).kind == "invalid"
    assert (await rotate(store, "sid-r", 7, h1, digest())).kind == "invalid"
    assert await store.is_active("sid-r")
    assert (await rotate(store, "sid-r", 1, h1, h2)).kind == "rotated"


async def test_previous_token_after_the_grace_window_revokes(store: SessionStore) -> None:
    h0, h1, h2 = digest(), digest(), digest()
    await store.create(record("sid-p"), h0, os.urandom(16), 10)
    assert (await rotate(store, "sid-p", 0, h0, h1, grace_ms=100)).kind == "rotated"
    await asyncio.sleep(0.3)  # past the 100 ms grace window (in Redis time)
    res = await rotate(store, "sid-p", 0, h0, digest())
    assert (res.kind, res.sub) == ("reused", "alice")
    assert not await store.is_active("sid-p")
    got = await store.get("sid-p")
    assert got is not None and got.revoked == "reused"
    assert (await rotate(store, "sid-p", 1, h1, h2)).kind == "revoked"
    assert await store.holder("sid-p", h1) is None


async def test_older_generation_asks_for_verification(store: SessionStore) -> None:
    h = [digest() for _ in range(4)]
    mac = os.urandom(16)
    await store.create(record("sid-v"), h[0], mac, 10)
    for gen in range(3):
        assert (await rotate(store, "sid-v", gen, h[gen], h[gen + 1])).kind == "rotated"
    res = await rotate(store, "sid-v", 0, h[0], digest())
    assert (res.kind, res.mac_key, res.sub) == ("verify", mac, "alice")
    # Asking is not revoking: the service decides after checking the tag.
    assert await store.is_active("sid-v")
    assert (await rotate(store, "sid-v", 3, h[3], digest())).kind == "rotated"


async def test_expired_missing_and_revoked(store: SessionStore) -> None:
    h0 = digest()
    start = now_ms()
    await store.create(record("sid-e", created=start, idle_ms=HOUR_MS), h0, os.urandom(16), 10)
    assert (await rotate(store, "sid-e", 0, h0, digest(), now=start + HOUR_MS)).kind == "expired"
    res = await rotate(store, "sid-e", 0, h0, digest(), now=start + HOUR_MS - 1)
    assert res.kind == "rotated"
    assert (await rotate(store, "no-such", 0, h0, digest())).kind == "missing"

    h1 = digest()
    await store.create(record("sid-x"), h1, os.urandom(16), 10)
    assert await store.revoke("sid-x", "logout") == "alice"
    assert await store.revoke("sid-x", "logout") is None  # already revoked
    assert await store.revoke("no-such", "logout") is None
    assert (await rotate(store, "sid-x", 0, h1, digest())).kind == "revoked"
    got = await store.get("sid-x")
    assert got is not None and got.revoked == "logout" and got.user_agent == ""


async def test_rotation_never_extends_past_the_absolute_expiry(store: SessionStore) -> None:
    h0, h1 = digest(), digest()
    start = now_ms()
    await store.create(record("sid-m", created=start, idle_ms=HOUR_MS, max_ms=HOUR_MS + 500),
                       h0, os.urandom(16), 10)
    res = await rotate(store, "sid-m", 0, h0, h1, now=start + 1000, idle_ms=HOUR_MS)
    assert res.kind == "rotated" and res.expires_ms == start + HOUR_MS + 500
    got = await store.get("sid-m")
    assert got is not None and got.expires_ms == start + HOUR_MS + 500


async def test_revoke_drops_the_grace_successor(store: SessionStore) -> None:
    h0, h1 = digest(), digest()
    await store.create(record("sid-g"), h0, os.urandom(16), 10)
    assert (await rotate(store, "sid-g", 0, h0, h1, grace_ms=60_000)).kind == "rotated"
    assert await store.revoke("sid-g", "logout") == "alice"
    # Inside the grace window, yet the family is gone: no successor is handed out.
    assert (await rotate(store, "sid-g", 0, h0, digest())).kind == "revoked"


async def test_holder(store: SessionStore) -> None:
    h0, h1, h2 = digest(), digest(), digest()
    await store.create(record("sid-h"), h0, os.urandom(16), 10)
    assert await store.holder("sid-h", h0) == "alice"
    assert await store.holder("sid-h", digest()) is None
    assert await store.holder("no-such", h0) is None
    await rotate(store, "sid-h", 0, h0, h1)
    assert await store.holder("sid-h", h1) == "alice"
    assert await store.holder("sid-h", h0) == "alice"  # the just-rotated token
    await rotate(store, "sid-h", 1, h1, h2)
    assert await store.holder("sid-h", h0) is None
    await store.revoke("sid-h", "logout")
    assert await store.holder("sid-h", h2) is None


async def test_user_index_lists_live_sessions_and_evicts_beyond_the_cap(
    store: SessionStore,
) -> None:
    base = now_ms()
    evicted = []
    for i in range(4):
        evicted.append(await store.create(record(f"s{i}", created=base + i), digest(),
                                          os.urandom(16), 3))
    assert evicted == [[], [], [], ["s0"]]  # the oldest absolute expiry goes first
    await store.create(record("other", sub="bob"), digest(), os.urandom(16), 3)
    assert sorted(await store.user_sids("alice", now_ms())) == ["s0", "s1", "s2", "s3"]
    assert await store.user_sids("bob", now_ms()) == ["other"]

    await store.revoke("s1", "logout")
    sessions = await store.user_sessions("alice", now_ms())
    # Revoked sessions are not listed, and are dropped from the index on the way.
    assert sorted(s.sid for s in sessions) == ["s0", "s2", "s3"]
    assert all(s.sub == "alice" and s.roles == ("user", "admin") for s in sessions)
    assert sorted(await store.user_sids("alice", now_ms())) == ["s0", "s2", "s3"]
    await store.unindex("alice", ["s0", "s2"])
    assert await store.user_sids("alice", now_ms()) == ["s3"]
    # Past their absolute expiry, sessions leave the index.
    assert await store.user_sids("alice", base + 3 * HOUR_MS) == []


async def test_user_sessions_leaves_out_sessions_past_their_idle_expiry(
    store: SessionStore,
) -> None:
    start = now_ms()
    await store.create(record("short", created=start, idle_ms=1000), digest(), os.urandom(16), 10)
    await store.create(record("long", created=start), digest(), os.urandom(16), 10)
    assert sorted(s.sid for s in await store.user_sessions("alice", start)) == ["long", "short"]
    # By the caller's clock "short" is over, whether or not Redis has dropped its key yet.
    assert [s.sid for s in await store.user_sessions("alice", start + 1000)] == ["long"]


async def test_new_session_is_not_evicted_when_expiries_tie(store: SessionStore) -> None:
    at = now_ms()
    # Each new sid sorts before the previous ones (ties in a sorted set order by member).
    for i in range(6):
        sid = f"t{9 - i}"
        evicted = await store.create(record(sid, created=at), digest(), os.urandom(16), 1)
        assert sid not in evicted
        assert len(evicted) == (1 if i else 0)
        await store.unindex("alice", evicted)  # what the service does after revoking them
    assert await store.user_sids("alice", at) == ["t4"]


async def test_user_names_with_braces_and_colons_are_indexed(store: SessionStore) -> None:
    await store.create(record("s-brace", sub="{we:ird}"), digest(), os.urandom(16), 10)
    assert await store.user_sids("{we:ird}", now_ms()) == ["s-brace"]
    assert await store.user_sids("we:ird", now_ms()) == []


async def test_revoked_set_and_announcements(store: SessionStore) -> None:
    now = now_ms()
    received: list[list[tuple[str, int]]] = []
    subscribed = asyncio.Event()

    async def follow() -> None:
        stream = store.subscribe()
        try:
            subscribed.set()
            async for batch in stream:
                received.append(batch)
                if len(received) == 2:
                    return
        finally:
            await stream.aclose()

    task = asyncio.ensure_future(follow())
    try:
        await subscribed.wait()
        # subscribe() registers on its first iteration; announce until the follower hears one.
        for _ in range(100):
            await store.announce_revoked(["a", "b"], now + 60_000, now)
            await asyncio.sleep(0.02)
            if received:
                break
        await store.announce_revoked(["c"], now + 1000, now)
        await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert received[0] == [("a", now + 60_000), ("b", now + 60_000)]
    assert received[-1] == [("c", now + 1000)]
    assert sorted(await store.revoked_set(now)) == [("a", now + 60_000), ("b", now + 60_000),
                                                   ("c", now + 1000)]
    # Once their access tokens are past expiry they are no longer reported ...
    assert sorted(await store.revoked_set(now + 5000)) == [("a", now + 60_000), ("b", now + 60_000)]
    # ... and the next announcement prunes them.
    await store.announce_revoked(["d"], now + 90_000, now + 5000)
    assert sorted(s for s, _ in await store.revoked_set(0)) == ["a", "b", "d"]
    await store.announce_revoked([], now + 90_000, now)  # nothing to say: no-op


async def test_hit_counts_in_a_fixed_window(store: SessionStore) -> None:
    assert await store.hit("user", "alice", 60_000, 0) == (0, 60_000)  # a peek creates nothing
    n, ttl = await store.hit("user", "alice", 60_000)
    assert n == 1 and 59_000 < ttl <= 60_000
    assert (await store.hit("user", "alice", 60_000))[0] == 2
    assert (await store.hit("user", "alice", 60_000, 0))[0] == 2
    assert (await store.hit("user", "bob", 60_000))[0] == 1  # per subject
    assert (await store.hit("ip", "alice", 60_000))[0] == 1  # per kind
    assert (await store.hit("user", "quick", 100))[0] == 1
    await asyncio.sleep(0.3)
    assert (await store.hit("user", "quick", 100))[0] == 1  # a new window


async def test_every_key_expires(store: SessionStore, redis: Any) -> None:
    h0, h1 = digest(), digest()
    await store.create(record("sid-t"), h0, os.urandom(16), 10)
    await store.create(record("sid-u", sub="bob"), digest(), os.urandom(16), 10)
    await rotate(store, "sid-t", 0, h0, h1)
    await store.revoke("sid-u", "logout")
    await store.announce_revoked(["sid-u"], now_ms() + 60_000, now_ms())
    await store.hit("ip", "127.0.0.1", 60_000)
    keys = [key async for key in redis.scan_iter(count=1000)]
    assert len(keys) == 7, keys  # 2 sessions, 1 grace blob, 2 user indexes, revoked, 1 counter
    for key in keys:
        assert await redis.pttl(key) > 0, f"{key!r} never expires"


async def test_ping(store: SessionStore) -> None:
    assert await store.ping()
