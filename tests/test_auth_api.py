"""The /auth endpoints in-process: what a client sends and gets back, errors included."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import argon2
import pytest

from gateway.clock import FakeClock
from tests.conftest import PASSWORD, gateway_yaml
from tests.support.ports import free_port
from tests.support.tokens import (
    UserService,
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

COOKIES = "cookies: {enabled: true, secure: false}\n"
TOKEN_FIELDS = {"access_token", "token_type", "expires_in", "refresh_token", "refresh_expires_in"}


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_users(tmp_path_factory.mktemp("users") / "users.yaml")


@pytest.fixture
def api(gateway: Any, upstream: Any, users: Path) -> Any:
    """`await api(**gateway_yaml kwargs, clock=...)`: an in-process gateway over the cheap users."""

    async def make(*, clock: Any = None, **kwargs: Any) -> Any:
        kwargs.setdefault("tokens", "extra_claims: [email]\n")
        return await gateway(gateway_yaml(upstream.url, users, **kwargs), clock=clock)

    return make


def form(**fields: str) -> dict[str, Any]:
    return {"data": urlencode(fields),
            "headers": {"Content-Type": "application/x-www-form-urlencoded"}}


def set_cookie(response: Any, name: str) -> dict[str, str]:
    """The attributes of the Set-Cookie header for `name` (lower-cased keys; flags map to '')."""
    for header in response.headers.getall("Set-Cookie", []):
        first, *attrs = [p.strip() for p in header.split(";")]
        if first.partition("=")[0] == name:
            out = {"value": first.partition("=")[2]}
            for attr in attrs:
                k, _, v = attr.partition("=")
                out[k.lower()] = v
            return out
    raise AssertionError(f"no Set-Cookie for {name}: {response.headers.getall('Set-Cookie', [])}")


# --- login ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["json", "form"])
async def test_login_returns_a_token_pair(api: Any, encoding: str) -> None:
    client = await api(tokens="access_ttl: 5m\nrefresh_ttl: 1h\nextra_claims: [email]\n")
    credentials = {"username": "alice", "password": PASSWORD}
    if encoding == "json":
        r = await client.post("/auth/login", json=credentials)
    else:
        r = await client.post("/auth/login", **form(**credentials))
    assert r.status == 200, await r.text()
    assert r.headers["Cache-Control"] == "no-store"
    assert r.content_type == "application/json"
    body = await r.json()
    assert set(body) == TOKEN_FIELDS
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 300
    assert 3599 <= body["refresh_expires_in"] <= 3600
    assert len(body["refresh_token"]) == 103
    claims = jwt_claims(body["access_token"])
    assert claims["sub"] == "alice" and claims["roles"] == ["user"]
    assert claims["exp"] - claims["iat"] == 300
    r = await client.get("/auth/me", headers=bearer(body))
    assert r.status == 200
    me = await r.json()
    assert (me["sub"], me["roles"], me["sid"]) == ("alice", ["user"], claims["sid"])
    assert me["email"] == "alice@example.test" and me["exp"] == claims["exp"]
    assert r.headers["Cache-Control"] == "no-store"


async def test_unknown_user_and_wrong_password_look_the_same(api: Any) -> None:
    client = await api()
    answers = []
    for user, password in [("nobody", PASSWORD), ("alice", "wrong password"), ("carol", PASSWORD)]:
        r = await client.post("/auth/login", json={"username": user, "password": password})
        assert await error_of(r, 401) == "invalid_credentials"
        headers = {k: v for k, v in r.headers.items() if k.lower() not in ("x-request-id", "date")}
        answers.append((await r.read(), headers))
    assert answers[0] == answers[1] == answers[2]


async def test_unknown_user_costs_an_argon2_verification_like_a_real_one(
    api: Any, users: Path, monkeypatch: Any
) -> None:
    calls: list[str] = []
    real_verify = argon2.PasswordHasher.verify

    def spy(self: argon2.PasswordHasher, hash: str | bytes, password: str | bytes) -> bool:
        calls.append(hash.decode() if isinstance(hash, bytes) else hash)
        return real_verify(self, hash, password)

    monkeypatch.setattr(argon2.PasswordHasher, "verify", spy)
    client = await api()
    r = await client.post("/auth/login", json={"username": "alice", "password": "wrong"})
    assert r.status == 401
    r = await client.post("/auth/login", json={"username": "nobody", "password": "wrong"})
    assert r.status == 401
    assert len(calls) == 2
    real, dummy = calls
    assert real in users.read_text() and dummy not in users.read_text()
    # Same algorithm and cost parameters as the file's hashes, so the same time.
    assert argon2.extract_parameters(dummy) == argon2.extract_parameters(real)


def _bad_bodies() -> list[tuple[str, dict[str, Any]]]:
    json_h = {"Content-Type": "application/json"}
    form_h = {"Content-Type": "application/x-www-form-urlencoded"}
    return [
        ("missing password", {"json": {"username": "alice"}}),
        ("missing username", {"json": {"password": PASSWORD}}),
        ("empty strings", {"json": {"username": "", "password": ""}}),
        ("empty body", {"data": b"", "headers": json_h}),
        ("bad json", {"data": b'{"username": "alice",', "headers": json_h}),
        ("json array", {"json": ["alice", PASSWORD]}),
        ("json number", {"data": b"42", "headers": json_h}),
        ("non-string password", {"json": {"username": "alice", "password": 12345}}),
        ("null password", {"json": {"username": "alice", "password": None}}),
        ("nested object", {"json": {"username": {"$ne": ""}, "password": PASSWORD}}),
        ("deeply nested json", {"data": b'{"username": ' + b"[" * 15000, "headers": json_h}),
        ("invalid utf-8 json", {"data": b'{"username": "\xff\xfe", "password": "x"}',
                                "headers": json_h}),
        ("invalid utf-8 form", {"data": b"username=\xff&password=x", "headers": form_h}),
        ("repeated form field", {"data": b"username=alice&username=bob&password=x",
                                 "headers": form_h}),
        ("nul in field", {"json": {"username": "alice\x00", "password": PASSWORD}}),
        ("huge field", {"json": {"username": "alice", "password": "x" * 5000}}),
        ("wrong content type", {"data": b"username=alice&password=x",
                                "headers": {"Content-Type": "text/plain"}}),
        ("xml", {"data": b"<login/>", "headers": {"Content-Type": "application/xml"}}),
        ("multipart", {"data": b"--b\r\n\r\n--b--\r\n",
                       "headers": {"Content-Type": "multipart/form-data; boundary=b"}}),
        ("huge body", {"data": b"username=alice&password=" + b"x" * 40_000, "headers": form_h}),
    ]


@pytest.mark.parametrize("case", _bad_bodies(), ids=[c[0] for c in _bad_bodies()])
async def test_malformed_login_is_invalid_request(api: Any,
                                                 case: tuple[str, dict[str, Any]]) -> None:
    client = await api()
    r = await client.post("/auth/login", **case[1])
    assert await error_of(r, 400) == "invalid_request"


async def test_huge_chunked_body_is_invalid_request(api: Any) -> None:
    client = await api()

    async def chunks() -> Any:
        for _ in range(40):
            yield b"x" * 1024

    r = await client.post("/auth/login", data=chunks(),
                          headers={"Content-Type": "application/json"})
    assert await error_of(r, 400) == "invalid_request"


async def test_login_endpoints_refuse_other_methods(api: Any) -> None:
    client = await api()
    r = await client.get("/auth/login")
    assert await error_of(r, 405) == "method_not_allowed"
    assert "POST" in r.headers["Allow"]


async def test_failed_logins_per_user_are_rate_limited(api: Any) -> None:
    client = await api(extra="auth: {rate_limit: {per_user: 3, per_ip: 100, window: 60s}}\n")
    for _ in range(3):
        r = await client.post("/auth/login", json={"username": "alice", "password": "wrong"})
        assert await error_of(r, 401) == "invalid_credentials"
    # The right password does not help once the account is throttled.
    r = await client.post("/auth/login", json={"username": "alice", "password": PASSWORD})
    assert await error_of(r, 429) == "rate_limited"
    assert 1 <= int(r.headers["Retry-After"]) <= 61
    r = await client.post("/auth/token", **form(grant_type="password", username="alice",
                                                 password=PASSWORD))
    assert await error_of(r, 429) == "rate_limited"
    assert "Retry-After" in r.headers
    await login(client, "bob")  # other users are not affected


async def test_every_spelling_of_a_name_shares_one_limit(api: Any) -> None:
    # A user service matching names case-insensitively would otherwise grant each spelling
    # (and each Unicode compatibility form) a limit of its own.
    client = await api(extra="auth: {rate_limit: {per_user: 3, per_ip: 100, window: 60s}}\n")
    for name in ("alice", "ALICE", "\uff41lice"):  # fullwidth a: NFKC folds it to "a"
        r = await client.post("/auth/login", json={"username": name, "password": "wrong"})
        assert await error_of(r, 401) == "invalid_credentials"
    r = await client.post("/auth/login", json={"username": "Alice", "password": "wrong"})
    assert await error_of(r, 429) == "rate_limited"


async def test_successful_logins_do_not_count_against_the_user(api: Any) -> None:
    client = await api(extra="auth: {rate_limit: {per_user: 2, per_ip: 100, window: 60s}}\n")
    for _ in range(4):
        await login(client)


async def test_concurrent_guesses_cannot_outrun_the_user_limit(api: Any) -> None:
    """Each attempt is counted before its password is checked: a burst of 30 guesses sent at
    once gets 3 password checks, not 30 (all would pass a check made before any failed)."""
    client = await api(extra="auth: {rate_limit: {per_user: 3, per_ip: 1000, window: 60s}}\n")

    async def attempt(password: str) -> int:
        r = await client.post("/auth/login", json={"username": "alice", "password": password})
        return r.status

    statuses = await asyncio.wait_for(
        asyncio.gather(*(attempt(f"guess-{i}") for i in range(30))), 60)
    assert sorted(set(statuses)) == [401, 429] and statuses.count(401) <= 3, statuses


async def test_logins_in_flight_count_until_they_succeed(api: Any) -> None:
    """A correct password gives its attempt back once checked: logins one after another never
    run into the limit, but no more than `per_user` checks run at the same time."""
    client = await api(extra="auth: {rate_limit: {per_user: 2, per_ip: 1000, window: 60s}}\n")
    statuses = await asyncio.wait_for(asyncio.gather(*(
        client.post("/auth/login", json={"username": "alice", "password": PASSWORD})
        for _ in range(6))), 60)
    assert {r.status for r in statuses} <= {200, 429} and any(r.status == 200 for r in statuses)
    for _ in range(4):
        await login(client)


async def test_a_body_arriving_in_pieces_is_read_whole(api: Any) -> None:
    """A login body split over TCP segments (or chunks) is read to its end, not cut short."""
    client = await api()
    body = f'{{"username": "alice", "password": "{PASSWORD}"}}'.encode()
    for chunked in (False, True):
        reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
        try:
            half = len(body) // 2
            framing = ("Transfer-Encoding: chunked" if chunked
                       else f"Content-Length: {len(body)}")
            writer.write(f"POST /auth/login HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         f"Content-Type: application/json\r\n{framing}\r\n"
                         "Connection: close\r\n\r\n".encode())
            pieces = [body[:half], body[half:]]
            if chunked:
                pieces = [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.1)
            answer = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert b"refresh_token" in answer


async def test_attempts_per_ip_are_rate_limited(api: Any) -> None:
    client = await api(extra="auth: {rate_limit: {per_user: 100, per_ip: 3, window: 60s}}\n")
    await login(client)
    await login(client, "bob")
    r = await client.post("/auth/login", json={"username": "nobody", "password": "x"})
    assert r.status == 401
    r = await client.post("/auth/login", json={"username": "bob", "password": PASSWORD})
    assert await error_of(r, 429) == "rate_limited"
    assert 1 <= int(r.headers["Retry-After"]) <= 61


# --- refresh -------------------------------------------------------------------------------------
async def test_refresh_json_and_every_error_code(api: Any) -> None:
    clock = FakeClock(time.time())
    client = await api(clock=clock, tokens="refresh_ttl: 1h\n")
    t0 = await login(client)
    r = await refresh(client, t0["refresh_token"])
    assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
    t1 = await r.json()
    assert set(t1) == TOKEN_FIELDS and t1["token_type"] == "Bearer"
    t2 = await refreshed(client, t1["refresh_token"])

    r = await refresh(client, "garbage")
    assert await error_of(r, 401) == "invalid_refresh_token"
    r = await client.post("/auth/refresh", json={})
    assert await error_of(r, 400) == "invalid_request"
    r = await refresh(client, t0["refresh_token"])
    assert await error_of(r, 401) == "refresh_token_reused"
    r = await refresh(client, t2["refresh_token"])
    assert await error_of(r, 401) == "session_revoked"

    t = await login(client)
    clock.advance(3601)
    r = await refresh(client, t["refresh_token"])
    assert await error_of(r, 401) == "refresh_token_expired"


async def test_a_forged_token_at_the_last_generation_is_refused_not_a_500(api: Any) -> None:
    """The generation field is 4 bytes: a token claiming the last one could have no successor.
    Forged with any session id, it is not one of ours (before any Redis lookup)."""
    import base64
    import os
    import struct

    body = struct.pack(">B16sIII", 1, os.urandom(16), 2**32 - 1, 2**32 - 1, 2**32 - 1)
    token = base64.urlsafe_b64encode(body + os.urandom(48)).decode().rstrip("=")
    client = await api(extra=COOKIES)
    assert await refresh_error(client, token) == "invalid_refresh_token"
    r = await client.post("/auth/token", **form(grant_type="refresh_token", refresh_token=token))
    assert await error_of(r, 400) == "invalid_grant"
    r = await client.post("/auth/refresh", cookies={"gw_session": token},
                          headers={"X-Requested-With": "fetch"})
    assert r.status == 401, await r.text()


async def test_refresh_by_cookie(api: Any) -> None:
    client = await api(extra=COOKIES)
    t0 = await login(client)
    client.session.cookie_jar.clear()
    headers = {"Cookie": f"gw_refresh={t0['refresh_token']}", "X-Requested-With": "fetch"}
    r = await client.post("/auth/refresh", headers=headers)
    assert r.status == 200, await r.text()
    t1 = await r.json()
    assert set_cookie(r, "gw_refresh")["value"] == t1["refresh_token"]
    # The rotated-away cookie is then reuse (after a second rotation), like the JSON field.
    await refreshed(client, t1["refresh_token"])
    client.session.cookie_jar.clear()
    r = await client.post("/auth/refresh", headers=headers)
    assert await error_of(r, 401) == "refresh_token_reused"


async def test_refresh_cookie_attributes(api: Any) -> None:
    client = await api(extra="cookies: {enabled: true}\n")
    r = await client.post("/auth/login", json={"username": "alice", "password": PASSWORD})
    body = await r.json()
    cookie = set_cookie(r, "gw_refresh")
    assert cookie["value"] == body["refresh_token"]
    assert cookie["path"] == "/auth"
    assert cookie["samesite"] == "Strict"
    assert "httponly" in cookie and "secure" in cookie
    assert int(cookie["max-age"]) == body["refresh_expires_in"]

    client = await api(extra=COOKIES)
    r = await client.post("/auth/login", json={"username": "alice", "password": PASSWORD})
    cookie = set_cookie(r, "gw_refresh")
    assert "secure" not in cookie and "httponly" in cookie and cookie["samesite"] == "Strict"


async def test_no_refresh_cookie_without_cookies_enabled(api: Any) -> None:
    client = await api()
    r = await client.post("/auth/login", json={"username": "alice", "password": PASSWORD})
    assert r.headers.getall("Set-Cookie", []) == []
    t = await r.json()
    r = await client.post("/auth/refresh", headers={"Cookie": f"gw_refresh={t['refresh_token']}",
                                                    "X-Requested-With": "x"})
    assert await error_of(r, 400) == "invalid_request"


@pytest.mark.parametrize("path", ["/auth/refresh", "/auth/logout"])
async def test_cookie_requests_need_same_origin_proof(api: Any, path: str) -> None:
    client = await api(extra=COOKIES)
    t = await login(client)
    client.session.cookie_jar.clear()
    cookie = {"Cookie": f"gw_refresh={t['refresh_token']}"}
    origin = f"http://{client.host}:{client.port}"
    for rejected in ({}, {"Origin": "https://evil.example"}, {"Origin": "null"},
                     {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
        r = await client.post(path, headers={**cookie, **rejected})
        assert await error_of(r, 403) == "csrf_rejected", rejected
    # Nothing happened to the session.
    await refreshed(client, t["refresh_token"])
    t = await login(client)
    client.session.cookie_jar.clear()
    r = await client.post(path, headers={"Cookie": f"gw_refresh={t['refresh_token']}",
                                         "Origin": origin})
    assert r.status == (200 if path == "/auth/refresh" else 204), await r.text()
    for accepted in ({"Sec-Fetch-Site": "same-origin"}, {"X-Requested-With": "XMLHttpRequest"}):
        t = await login(client)
        client.session.cookie_jar.clear()
        r = await client.post(path, headers={"Cookie": f"gw_refresh={t['refresh_token']}",
                                             **accepted})
        assert r.status in (200, 204), (accepted, await r.text())


async def test_logout_by_cookie_clears_it(api: Any) -> None:
    client = await api(extra=COOKIES)
    t = await login(client)
    client.session.cookie_jar.clear()
    r = await client.post("/auth/logout", headers={"Cookie": f"gw_refresh={t['refresh_token']}",
                                                   "X-Requested-With": "x"})
    assert r.status == 204
    cleared = set_cookie(r, "gw_refresh")
    assert cleared["value"] in ("", '""') and cleared["path"] == "/auth"
    assert cleared.get("max-age") == "0" or "expires" in cleared
    assert await refresh_error(client, t["refresh_token"]) == "session_revoked"


# --- RFC 6749 token endpoint ---------------------------------------------------------------------
async def test_token_endpoint_password_and_refresh_grants(api: Any) -> None:
    client = await api()
    r = await client.post("/auth/token", **form(grant_type="password", username="alice",
                                                password=PASSWORD))
    assert r.status == 200, await r.text()
    assert r.headers["Cache-Control"] == "no-store" and r.headers["Pragma"] == "no-cache"
    t0 = await r.json()
    assert set(t0) == TOKEN_FIELDS and t0["token_type"] == "Bearer"
    r = await client.post("/auth/token", **form(grant_type="refresh_token",
                                                refresh_token=t0["refresh_token"]))
    assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
    t1 = await r.json()
    assert t1["refresh_token"] != t0["refresh_token"]
    assert (await client.get("/auth/me", headers=bearer(t1))).status == 200


def _token_errors() -> list[tuple[str, dict[str, str], str]]:
    return [
        ("wrong password", {"grant_type": "password", "username": "alice", "password": "x"},
         "invalid_grant"),
        ("unknown user", {"grant_type": "password", "username": "nobody", "password": "x"},
         "invalid_grant"),
        ("disabled user", {"grant_type": "password", "username": "carol", "password": PASSWORD},
         "invalid_grant"),
        ("bad refresh token", {"grant_type": "refresh_token", "refresh_token": "nope"},
         "invalid_grant"),
        ("no username", {"grant_type": "password", "password": PASSWORD}, "invalid_request"),
        ("no password", {"grant_type": "password", "username": "alice"}, "invalid_request"),
        ("no refresh token", {"grant_type": "refresh_token"}, "invalid_request"),
        ("no grant type", {"username": "alice", "password": PASSWORD}, "invalid_request"),
        ("client credentials", {"grant_type": "client_credentials"}, "unsupported_grant_type"),
        ("authorization code", {"grant_type": "authorization_code", "code": "x"},
         "unsupported_grant_type"),
    ]


@pytest.mark.parametrize("case", _token_errors(), ids=[c[0] for c in _token_errors()])
async def test_token_endpoint_errors(api: Any, case: tuple[str, dict[str, str], str]) -> None:
    client = await api()
    r = await client.post("/auth/token", **form(**case[1]))
    assert await error_of(r, 400) == case[2]
    assert r.headers["Cache-Control"] == "no-store"


async def test_token_endpoint_takes_only_forms(api: Any) -> None:
    client = await api()
    r = await client.post("/auth/token", json={"grant_type": "password", "username": "alice",
                                               "password": PASSWORD})
    assert await error_of(r, 400) == "invalid_request"
    r = await client.post("/auth/token", data=b"grant_type=password&grant_type=refresh_token",
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert await error_of(r, 400) == "invalid_request"


async def test_token_endpoint_reuse_and_revoked_are_invalid_grant(api: Any) -> None:
    client = await api()
    t0 = await login(client)
    t1 = await refreshed(client, t0["refresh_token"])
    t2 = await refreshed(client, t1["refresh_token"])
    for token in (t0, t2):  # reuse, then the revoked family
        r = await client.post("/auth/token", **form(grant_type="refresh_token",
                                                    refresh_token=token["refresh_token"]))
        assert await error_of(r, 400) == "invalid_grant"


# --- logout and sessions -------------------------------------------------------------------------
async def test_logout_with_refresh_token_is_idempotent(api: Any) -> None:
    client = await api()
    t = await login(client)
    for _ in range(2):
        r = await client.post("/auth/logout", json={"refresh_token": t["refresh_token"]})
        assert r.status == 204 and r.headers["Cache-Control"] == "no-store"
    assert await refresh_error(client, t["refresh_token"]) == "session_revoked"
    r = await client.post("/auth/logout", json={"refresh_token": "not-a-token"})
    assert r.status == 204


async def test_logout_with_bearer(api: Any) -> None:
    client = await api()
    t, other = await login(client), await login(client)
    r = await client.post("/auth/logout", headers=bearer(t))
    assert r.status == 204
    assert await refresh_error(client, t["refresh_token"]) == "session_revoked"
    await refreshed(client, other["refresh_token"])
    r = await client.post("/auth/logout")
    assert await error_of(r, 401) == "missing_token"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")


async def test_logout_ends_the_bearers_session_whatever_refresh_token_comes_with_it(
        api: Any) -> None:
    # A stale or foreign refresh credential must not shadow the access token the caller sent:
    # the caller is told it is out, so the session it authenticated with must be over.
    client = await api(extra=COOKIES)
    t = await login(client)
    r = await client.post("/auth/logout", json={"refresh_token": "garbage"}, headers=bearer(t))
    assert r.status == 204
    assert await refresh_error(client, t["refresh_token"]) == "session_revoked"

    mine, cookie_jar_session = await login(client), await login(client)
    client.session.cookie_jar.clear()
    r = await client.post("/auth/logout", headers={
        **bearer(mine), "X-Requested-With": "x",
        "Cookie": f"gw_refresh={cookie_jar_session['refresh_token']}"})
    assert r.status == 204
    # Both ended: the one the caller authenticated with, and the one whose cookie it cleared.
    assert await refresh_error(client, mine["refresh_token"]) == "session_revoked"
    assert await refresh_error(client, cookie_jar_session["refresh_token"]) == "session_revoked"


async def test_logout_with_a_refresh_token_and_an_expired_access_token(api: Any) -> None:
    clock = FakeClock(time.time())
    client = await api(clock=clock, tokens="access_ttl: 1m\nrefresh_ttl: 1h\nextra_claims: [email]\n")
    t = await login(client)
    clock.advance(600)
    # The access token alone cannot end anything: the caller hears so.
    r = await client.post("/auth/logout", headers=bearer(t))
    assert await error_of(r, 401) == "token_expired"
    # Beside a live refresh token it is no obstacle: that session ends.
    r = await client.post("/auth/logout", json={"refresh_token": t["refresh_token"]},
                          headers=bearer(t))
    assert r.status == 204, await r.text()
    assert await refresh_error(client, t["refresh_token"]) == "session_revoked"


async def test_a_session_id_alone_cannot_log_anyone_out(api: Any) -> None:
    client = await api()
    victim = await login(client)
    raw = bytearray(unb64(victim["refresh_token"]))
    raw[29:] = bytes(len(raw) - 29)  # keep sid and generation, forge the rest
    from gateway.tokens.refresh import _b64

    r = await client.post("/auth/logout", json={"refresh_token": _b64(bytes(raw))})
    assert r.status == 204
    await refreshed(client, victim["refresh_token"])


async def test_logout_all(api: Any) -> None:
    client = await api()
    a1, a2 = await login(client), await login(client)
    b = await login(client, "bob")
    r = await client.post("/auth/logout-all", headers=bearer(a1))
    assert r.status == 204
    for t in (a1, a2):
        assert await refresh_error(client, t["refresh_token"]) == "session_revoked"
    await refreshed(client, b["refresh_token"])
    r = await client.post("/auth/logout-all")
    assert await error_of(r, 401) == "missing_token"


async def test_sessions_list_and_delete(api: Any) -> None:
    client = await api()
    first = await login(client, headers={"User-Agent": "phone/1.0"})
    second = await login(client, headers={"User-Agent": "laptop/2.0"})
    bob = await login(client, "bob")
    r = await client.get("/auth/sessions", headers=bearer(second))
    assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
    sessions = (await r.json())["sessions"]
    assert len(sessions) == 2
    for s in sessions:
        assert set(s) == {"sid", "created_at", "last_used_at", "expires_at", "user_agent", "ip",
                          "current"}
        assert s["ip"] == "127.0.0.1"
        assert s["created_at"] <= s["last_used_at"] < s["expires_at"]
    by_ua = {s["user_agent"]: s for s in sessions}
    assert by_ua["laptop/2.0"]["current"] is True and by_ua["phone/1.0"]["current"] is False
    assert by_ua["phone/1.0"]["sid"] == jwt_claims(first["access_token"])["sid"]

    bob_sid = jwt_claims(bob["access_token"])["sid"]
    r = await client.delete(f"/auth/sessions/{bob_sid}", headers=bearer(second))
    assert await error_of(r, 404) == "session_not_found"
    await refreshed(client, bob["refresh_token"])  # untouched
    r = await client.delete("/auth/sessions/AAAAAAAAAAAAAAAAAAAAAA", headers=bearer(second))
    assert await error_of(r, 404) == "session_not_found"

    r = await client.delete(f"/auth/sessions/{by_ua['phone/1.0']['sid']}", headers=bearer(second))
    assert r.status == 204
    assert await refresh_error(client, first["refresh_token"]) == "session_revoked"
    r = await client.delete(f"/auth/sessions/{by_ua['phone/1.0']['sid']}", headers=bearer(second))
    assert await error_of(r, 404) == "session_not_found"
    r = await client.get("/auth/sessions", headers=bearer(second))
    assert [s["user_agent"] for s in (await r.json())["sessions"]] == ["laptop/2.0"]
    r = await client.get("/auth/sessions")
    assert await error_of(r, 401) == "missing_token"
    r = await client.delete(f"/auth/sessions/{bob_sid}")
    assert await error_of(r, 401) == "missing_token"


async def test_me_requires_a_valid_token(api: Any) -> None:
    client = await api()
    r = await client.get("/auth/me")
    assert await error_of(r, 401) == "missing_token"
    r = await client.get("/auth/me", headers={"Authorization": "Bearer abc.def.ghi"})
    assert await error_of(r, 401) == "invalid_token"
    assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]


# --- users.verifier ------------------------------------------------------------------------------
@pytest.fixture
async def user_service() -> Any:
    service = await UserService().start()
    yield service
    await service.stop()


def verifier_yaml(upstream_url: str, users: Path, url: str, timeout: str = "2s",
                  **kwargs: Any) -> str:
    text = gateway_yaml(upstream_url, users, **kwargs)
    line = f"users: {{file: '{users}'}}"
    assert line in text
    return text.replace(line, f"users: {{verifier: {{url: '{url}', timeout: {timeout}}}}}")


async def test_verifier_accepts_a_login(gateway: Any, upstream: Any, users: Path,
                                        user_service: UserService) -> None:
    user_service.body = {"sub": "u-1234", "roles": ["user", "admin"], "email": "a@x.test"}
    client = await gateway(verifier_yaml(upstream.url, users, user_service.url,
                                         tokens="extra_claims: [email]\n"))
    t = await login(client, "alice@x.test", "s3cret")
    assert user_service.calls == [{"username": "alice@x.test", "password": "s3cret"}]
    claims = jwt_claims(t["access_token"])
    assert (claims["sub"], claims["roles"], claims["email"]) == ("u-1234", ["user", "admin"],
                                                                 "a@x.test")
    # Refresh does not ask the user service again; the session keeps its roles.
    t2 = await refreshed(client, t["refresh_token"])
    assert jwt_claims(t2["access_token"])["roles"] == ["user", "admin"]
    assert len(user_service.calls) == 1


async def test_verifier_rejection_is_invalid_credentials(gateway: Any, upstream: Any,
                                                         users: Path, user_service: UserService
                                                         ) -> None:
    user_service.status, user_service.body = 401, {"error": "nope"}
    client = await gateway(verifier_yaml(upstream.url, users, user_service.url))
    r = await client.post("/auth/login", json={"username": "alice", "password": "x"})
    assert await error_of(r, 401) == "invalid_credentials"


@pytest.mark.parametrize("failure", ["500", "timeout", "refused", "not json"])
async def test_verifier_failure_is_503_never_a_login(gateway: Any, upstream: Any, users: Path,
                                                     user_service: UserService,
                                                     failure: str) -> None:
    url = user_service.url
    if failure == "500":
        user_service.status = 500
    elif failure == "timeout":
        user_service.delay = 1.0  # it would say 200 (a login) if the gateway waited
    elif failure == "refused":
        url = f"http://127.0.0.1:{free_port()}/verify"
    else:
        user_service.body = "<html>bad gateway</html>"
    client = await gateway(verifier_yaml(upstream.url, users, url, timeout="200ms"))
    for _ in range(2):
        r = await client.post("/auth/login", json={"username": "alice", "password": "x"})
        assert await error_of(r, 503) == "user_service_unavailable"
    if failure != "refused":
        assert len(user_service.calls) == 2


async def test_logout_with_bearer_is_idempotent(api: Any) -> None:
    client = await api()
    t = await login(client)
    assert (await client.post("/auth/logout", headers=bearer(t))).status == 204
    for _ in range(250):  # until this instance has heard of the revocation
        r = await client.get("/auth/me", headers=bearer(t))
        if r.status == 401:
            break
        await asyncio.sleep(0.02)
    assert await error_of(r, 401) == "token_revoked"
    # Logging out of a session that is already over is done, not an error.
    r = await client.post("/auth/logout", headers=bearer(t))
    assert r.status == 204, await r.text()
