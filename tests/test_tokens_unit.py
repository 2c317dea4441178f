"""The token service in-process over fakeredis with a FakeClock: token format, what Redis holds,
rotation, the grace window, reuse detection, expiry, TTLs, per-user limits and disabled users."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import struct
import threading
import time
from pathlib import Path
from typing import Any

import fakeredis
import pytest

import gateway.app
from gateway.app import HOLDER, Reloader, create_app, reload
from gateway.clock import FakeClock
from gateway.config import load_config_text
from gateway.tokens import refresh as refresh_module
from tests.conftest import PASSWORD, gateway_yaml
from tests.support.tokens import (
    bearer,
    error_of,
    jwt_claims,
    login,
    redis_dump,
    refresh_error,
    refreshed,
    unb64,
    write_users,
)

TOKEN = re.compile(r"^[A-Za-z0-9_-]{103}$")
HEAD = struct.Struct(">B16sIII")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time())


@pytest.fixture
async def fake_redis() -> Any:
    # A server of its own: fakeredis clients without one share state between tests.
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    yield client
    await client.aclose()


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_users(tmp_path_factory.mktemp("users") / "users.yaml")


@pytest.fixture
def unit(gateway: Any, upstream: Any, users: Path, fake_redis: Any, clock: FakeClock) -> Any:
    async def make(**kwargs: Any) -> Any:
        return await gateway(gateway_yaml(upstream.url, users, **kwargs), redis=fake_redis,
                             clock=clock)

    return make


async def until_status(client: Any, path: str, headers: dict[str, str], status: int) -> Any:
    """GET `path` until it answers `status` (the revocation feed is asynchronous); bounded."""
    for _ in range(250):
        r = await client.get(path, headers=headers)
        if r.status == status:
            return r
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} never answered {status} (last {r.status}: {await r.text()})")


# --- format and what Redis holds -------------------------------------------------------------
async def test_refresh_token_format(unit: Any, clock: FakeClock, monkeypatch: Any) -> None:
    drawn: list[bytes] = []
    real_urandom = os.urandom

    def spy(n: int) -> bytes:
        data = real_urandom(n)
        drawn.append(data)
        return data

    monkeypatch.setattr(refresh_module.os, "urandom", spy)
    client = await unit(tokens="refresh_ttl: 1h\nsession_max_lifetime: 2h\n")
    now_ms = int(clock.now() * 1000)
    tokens = await login(client)
    token = tokens["refresh_token"]
    assert TOKEN.match(token), token
    raw = unb64(token)
    assert len(raw) == 77  # 61-byte body + 16-byte tag
    version, sid, generation, expiry, end = HEAD.unpack_from(raw)
    assert version == 1 and generation == 0
    assert refresh_module._b64(sid) == jwt_claims(tokens["access_token"])["sid"]
    assert expiry == (now_ms + 3600_000) // 1000
    assert end == (now_ms + 7200_000) // 1000
    assert tokens["refresh_expires_in"] == expiry - now_ms // 1000
    # The 32 bytes after the header are exactly 256 bits drawn from os.urandom for this token.
    random_part = raw[HEAD.size:HEAD.size + 32]
    assert random_part in [d for d in drawn if len(d) == 32]

    successor = (await refreshed(client, token))["refresh_token"]
    raw2 = unb64(successor)
    assert TOKEN.match(successor)
    assert HEAD.unpack_from(raw2)[1] == sid and HEAD.unpack_from(raw2)[2] == 1
    assert raw2[HEAD.size:HEAD.size + 32] != random_part
    assert raw2[HEAD.size:HEAD.size + 32] in [d for d in drawn if len(d) == 32]


async def test_redis_holds_only_hashes_of_refresh_tokens(unit: Any, fake_redis: Any) -> None:
    client = await unit()
    first = await login(client)
    second = await refreshed(client, first["refresh_token"])
    again = await refreshed(client, first["refresh_token"])  # grace: the sealed successor
    assert again["refresh_token"] == second["refresh_token"]

    needles: list[bytes] = []
    for pair in (first, second, again):
        token = pair["refresh_token"]
        raw = unb64(token)
        needles += [token.encode(), raw, raw[:61], raw[29:61], raw[61:],
                    pair["access_token"].encode()]
    dump = await redis_dump(fake_redis)
    assert dump, "login stored nothing"
    for key, _, parts in dump:
        for blob in (key, *parts):
            for needle in needles:
                assert needle not in blob, f"{key!r} holds token material"

    sessions = [(key, parts) for key, kind, parts in dump if kind == "hash"]
    assert len(sessions) == 1
    record = dict(zip(sessions[0][1][::2], sessions[0][1][1::2]))
    assert record[b"h"] == hashlib.sha256(unb64(second["refresh_token"])[:61]).digest()
    assert record[b"p"] == hashlib.sha256(unb64(first["refresh_token"])[:61]).digest()


# --- rotation, grace, reuse -------------------------------------------------------------------
async def test_rotation_issues_a_new_pair_and_keeps_the_session(unit: Any) -> None:
    client = await unit()
    first = await login(client)
    second = await refreshed(client, first["refresh_token"])
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert second["token_type"] == "Bearer"
    sid = jwt_claims(first["access_token"])["sid"]
    assert jwt_claims(second["access_token"])["sid"] == sid
    r = await client.get("/auth/me", headers=bearer(second))
    assert r.status == 200
    assert (await r.json())["sub"] == "alice"
    third = await refreshed(client, second["refresh_token"])
    assert third["refresh_token"] not in (first["refresh_token"], second["refresh_token"])


async def test_previous_token_within_grace_returns_the_same_successor(unit: Any) -> None:
    client = await unit()
    first = await login(client)
    second = await refreshed(client, first["refresh_token"])
    for _ in range(3):
        again = await refreshed(client, first["refresh_token"])
        assert again["refresh_token"] == second["refresh_token"]
    # The shared successor rotates normally afterwards.
    third = await refreshed(client, second["refresh_token"])
    r = await client.get("/auth/me", headers=bearer(third))
    assert r.status == 200


async def test_reuse_after_grace_revokes_the_family(unit: Any, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="gateway.audit")
    client = await unit(tokens="reuse_grace: 300ms\n")
    first = await login(client)
    second = await refreshed(client, first["refresh_token"])
    await asyncio.sleep(0.45)  # the grace blob expires in (fake)redis time
    assert await refresh_error(client, first["refresh_token"]) == "refresh_token_reused"
    assert await refresh_error(client, second["refresh_token"]) == "session_revoked"
    sid = jwt_claims(first["access_token"])["sid"]
    events = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.audit"]
    assert any(e["event"] == "refresh_token_reused" and e["sid"] == sid and e["user"] == "alice"
               for e in events), events
    # The access token of the revoked session stops working at the edge too.
    r = await until_status(client, "/auth/me", bearer(second), 401)
    assert await error_of(r, 401) == "token_revoked"
    # Presenting the stolen token again is still reported, and never revives the session.
    assert await refresh_error(client, first["refresh_token"]) == "session_revoked"


async def test_reuse_of_an_older_generation_revokes_even_within_grace(unit: Any) -> None:
    client = await unit()
    t0 = await login(client)
    t1 = await refreshed(client, t0["refresh_token"])
    t2 = await refreshed(client, t1["refresh_token"])
    assert await refresh_error(client, t0["refresh_token"]) == "refresh_token_reused"
    assert await refresh_error(client, t2["refresh_token"]) == "session_revoked"
    assert await refresh_error(client, t1["refresh_token"]) == "session_revoked"


async def test_forged_token_with_a_known_sid_does_not_revoke(unit: Any) -> None:
    client = await unit()
    t0 = await login(client)
    t1 = await refreshed(client, t0["refresh_token"])
    t2 = await refreshed(client, t1["refresh_token"])
    raw0 = unb64(t0["refresh_token"])
    forged_tag = raw0[:-16] + bytes(b ^ 0xFF for b in raw0[-16:])
    forged_body = raw0[:29] + os.urandom(32) + raw0[-16:]
    raw2 = unb64(t2["refresh_token"])
    forged_current = raw2[:29] + os.urandom(32) + os.urandom(16)
    for forged in (forged_tag, forged_body, forged_current):
        token = refresh_module._b64(forged)
        assert await refresh_error(client, token) == "invalid_refresh_token"
    # The real holder is unaffected.
    t3 = await refreshed(client, t2["refresh_token"])
    assert (await client.get("/auth/me", headers=bearer(t3))).status == 200


@pytest.mark.parametrize("token", [
    "", "x", "A" * 103, "A" * 200, "!" * 103, "not a token at all", "\u00e9" * 103,
])
async def test_malformed_refresh_tokens_are_invalid(unit: Any, token: str) -> None:
    client = await unit()
    r = await client.post("/auth/refresh", json={"refresh_token": token})
    code = await error_of(r, 400 if token == "" else 401)
    assert code == ("invalid_request" if token == "" else "invalid_refresh_token")


# --- expiry ------------------------------------------------------------------------------------
async def test_idle_timeout_is_renewed_by_use_then_expires(unit: Any, clock: FakeClock) -> None:
    client = await unit(tokens="refresh_ttl: 1h\nsession_max_lifetime: 30d\n")
    t = await login(client)
    for _ in range(3):  # 150 minutes in all, each step inside the idle timeout
        clock.advance(50 * 60)
        t = await refreshed(client, t["refresh_token"])
        assert t["refresh_expires_in"] == 3600
    clock.advance(3600 + 1)
    assert await refresh_error(client, t["refresh_token"]) == "refresh_token_expired"


async def test_absolute_lifetime_caps_the_session(unit: Any, clock: FakeClock) -> None:
    client = await unit(tokens="refresh_ttl: 1h\nsession_max_lifetime: 2h\n")
    t = await login(client)
    clock.advance(50 * 60)
    t = await refreshed(client, t["refresh_token"])
    assert t["refresh_expires_in"] == 3600
    clock.advance(50 * 60)
    t = await refreshed(client, t["refresh_token"])
    assert 1195 <= t["refresh_expires_in"] <= 1200  # only what is left of the 2 h
    clock.advance(15 * 60)
    t = await refreshed(client, t["refresh_token"])
    assert t["refresh_expires_in"] <= 300
    clock.advance(6 * 60)
    assert await refresh_error(client, t["refresh_token"]) == "refresh_token_expired"


async def test_every_key_in_redis_has_a_ttl(unit: Any, fake_redis: Any) -> None:
    client = await unit()
    a1 = await login(client)
    a2 = await login(client)
    await refreshed(client, a1["refresh_token"])
    await refreshed(client, a1["refresh_token"])
    b = await login(client, "bob")
    r = await client.post("/auth/login", json={"username": "bob", "password": "wrong"})
    assert r.status == 401
    r = await client.post("/auth/login", json={"username": "nobody", "password": "wrong"})
    assert r.status == 401
    r = await client.post("/auth/logout", json={"refresh_token": a2["refresh_token"]})
    assert r.status == 204
    assert (await client.post("/auth/logout-all", headers=bearer(b))).status == 204
    keys = [key async for key in fake_redis.scan_iter(count=1000)]
    kinds = {key.split(b":")[1] for key in keys}
    assert {b"s", b"g", b"u", b"revoked", b"rl"} <= kinds, keys
    for key in keys:
        assert await fake_redis.pttl(key) > 0, f"{key!r} never expires"


# --- per-user sessions, logout ------------------------------------------------------------------
async def test_sessions_per_user_are_bounded_oldest_evicted(unit: Any, clock: FakeClock) -> None:
    client = await unit(extra="auth: {max_sessions_per_user: 2}\n")
    logins = []
    for _ in range(4):
        logins.append(await login(client))
        clock.advance(1)
    assert await refresh_error(client, logins[0]["refresh_token"]) == "session_revoked"
    assert await refresh_error(client, logins[1]["refresh_token"]) == "session_revoked"
    r = await client.get("/auth/sessions", headers=bearer(logins[3]))
    listed = {s["sid"] for s in (await r.json())["sessions"]}
    assert listed == {jwt_claims(t["access_token"])["sid"] for t in logins[2:]}
    for t in logins[2:]:
        await refreshed(client, t["refresh_token"])


async def test_a_new_login_is_never_the_one_evicted(unit: Any) -> None:
    # The clock does not move: every session has the same absolute expiry.
    client = await unit(extra="auth: {max_sessions_per_user: 1}\n")
    for _ in range(5):
        t = await login(client)
        await refreshed(client, t["refresh_token"])
        r = await client.get("/auth/sessions", headers=bearer(t))
        listed = [s["sid"] for s in (await r.json())["sessions"]]
        assert listed == [jwt_claims(t["access_token"])["sid"]]


async def test_logout_and_logout_all(unit: Any) -> None:
    client = await unit()
    a1, a2, a3 = await login(client), await login(client), await login(client)
    b = await login(client, "bob")
    r = await client.post("/auth/logout", json={"refresh_token": a1["refresh_token"]})
    assert r.status == 204
    assert await refresh_error(client, a1["refresh_token"]) == "session_revoked"
    await refreshed(client, a2["refresh_token"])  # other sessions untouched
    r = await client.post("/auth/logout-all", headers=bearer(a3))
    assert r.status == 204
    for t in (a2, a3):
        assert await refresh_error(client, t["refresh_token"]) == "session_revoked"
    await refreshed(client, b["refresh_token"])  # another user's session untouched
    r = await until_status(client, "/auth/me", bearer(a3), 401)
    assert await error_of(r, 401) == "token_revoked"


async def test_a_revocation_during_a_stalled_refresh_outlasts_the_token_it_issues(
        unit: Any, clock: FakeClock, monkeypatch: Any) -> None:
    """Another instance revokes the session just after this one rotated it, then this one stalls
    (GC, CPU) before signing. The access token it then hands out must not outlive the revocation
    entry every instance keeps: after the entry is dropped, the token must be expired too."""
    client = await unit(tokens="access_ttl: 5m\nrefresh_ttl: 1h\nleeway: 10s\n")
    t = await login(client)
    service = client.app[HOLDER].current.service
    rotate = service.store.rotate

    async def rotate_then_revoked_elsewhere_then_stall(*args: Any, **kwargs: Any) -> Any:
        result = await rotate(*args, **kwargs)
        await service.revoke(jwt_claims(t["access_token"])["sid"], "logout")
        clock.advance(120)  # the stall
        return result

    monkeypatch.setattr(service.store, "rotate", rotate_then_revoked_elsewhere_then_stall)
    issued = await refreshed(client, t["refresh_token"])
    await until_status(client, "/auth/me", bearer(issued), 401)
    # Just past the revocation entry's end (access_ttl + 2 x leeway after the revocation, which
    # came 120 s before now). A token stamped after the stall would still be valid here.
    clock.advance(5 * 60 + 2 * 10 - 120 + 5)
    r = await client.get("/auth/me", headers=bearer(issued))
    assert await error_of(r, 401) in ("token_expired", "token_revoked")


# --- users ------------------------------------------------------------------------------------
async def test_disabled_user_cannot_log_in(unit: Any) -> None:
    client = await unit()
    r = await client.post("/auth/login", json={"username": "carol", "password": PASSWORD})
    assert await error_of(r, 401) == "invalid_credentials"
    wrong = await client.post("/auth/login", json={"username": "alice", "password": "nope"})
    assert await r.json() == await wrong.json()


@pytest.mark.parametrize("change", ["disable", "delete"])
async def test_user_disabled_or_deleted_after_login_cannot_refresh(
    aiohttp_client: Any, upstream: Any, fake_redis: Any, clock: FakeClock, tmp_path: Path,
    change: str,
) -> None:
    users = write_users(tmp_path / "users.yaml")
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(gateway_yaml(upstream.url, users).replace("{port}", "0"))
    app = create_app(load_config_text(config_path.read_text(), str(config_path)),
                     redis=fake_redis, clock=clock, config_path=str(config_path))
    client = await aiohttp_client(app)
    alice, bob = await login(client), await login(client, "bob")
    t1 = await refreshed(client, alice["refresh_token"])

    text = users.read_text()
    if change == "disable":
        text = text.replace("  alice:\n", "  alice:\n    disabled: true\n")
    else:
        text = re.sub(r"  alice:\n(    .*\n)+", "", text)
    assert text != users.read_text()
    users.write_text(text)
    assert await reload(app)

    assert await refresh_error(client, t1["refresh_token"]) == "session_revoked"
    # The session is over, not just this attempt.
    assert await refresh_error(client, t1["refresh_token"]) == "session_revoked"
    await refreshed(client, bob["refresh_token"])
    r = await client.post("/auth/login", json={"username": "alice", "password": PASSWORD})
    assert await error_of(r, 401) == "invalid_credentials"


async def test_reload_signals_during_a_reload_make_exactly_one_more(
    aiohttp_client: Any, upstream: Any, fake_redis: Any, clock: FakeClock, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    users = write_users(tmp_path / "users.yaml")
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(gateway_yaml(upstream.url, users).replace("{port}", "0"))
    app = create_app(load_config_text(config_path.read_text(), str(config_path)),
                     redis=fake_redis, clock=clock, config_path=str(config_path))
    await aiohttp_client(app)
    reading, go_on = threading.Event(), threading.Event()
    real_load = gateway.app.load_config

    def held_load(path: str) -> Any:  # the first reload stops while it reads the file
        if not reading.is_set():
            reading.set()
            assert go_on.wait(10)
        return real_load(path)

    monkeypatch.setattr(gateway.app, "load_config", held_load)
    reloader = Reloader(app)
    caplog.set_level(logging.INFO, logger="gateway")
    reloader.request()
    assert await asyncio.to_thread(reading.wait, 10)
    reloader.request()  # two more signals while the file is being read: one more reload
    reloader.request()
    go_on.set()
    await asyncio.wait_for(reloader.wait(), 10)
    done = [r for r in caplog.records if r.getMessage().startswith("configuration reloaded")]
    assert len(done) == 2


async def test_idle_expired_sessions_are_not_listed(unit: Any, clock: FakeClock) -> None:
    client = await unit(tokens="refresh_ttl: 1h\naccess_ttl: 5m\n")
    idle = await login(client)
    used = await login(client)
    clock.advance(50 * 60)
    used = await refreshed(client, used["refresh_token"])
    clock.advance(20 * 60)  # `idle` is past its idle timeout, `used` is not
    used = await refreshed(client, used["refresh_token"])
    r = await client.get("/auth/sessions", headers=bearer(used))
    listed = [s["sid"] for s in (await r.json())["sessions"]]
    assert listed == [jwt_claims(used["access_token"])["sid"]]
    assert await refresh_error(client, idle["refresh_token"]) == "refresh_token_expired"
