"""Route policy at the edge: public | optional | required, roles (any of), roles_all (all of),
and per-method routes; what the client gets and what the upstream receives."""

from __future__ import annotations

import textwrap
import time

import pytest

from gateway.clock import FakeClock
from tests.support.edge import bearer, claims, craft, login, refused


def _routes(url: str) -> str:
    return textwrap.dedent(f"""\
        - {{name: public, path: /public, upstream: {url}, auth: public}}
        - {{name: optional, path: /optional, upstream: {url}, auth: optional}}
        - {{name: api, path: /api, upstream: {url}, auth: required}}
        - {{name: any, path: /any, upstream: {url}, auth: required, roles: [admin, ops]}}
        - {{name: all, path: /all, upstream: {url}, auth: required, roles_all: [user, admin]}}
        - {{name: opt-admin, path: /opt-admin, upstream: {url}, auth: optional, roles: [admin]}}
        - {{name: items-read, path: /items, upstream: {url}, auth: public, methods: [GET, HEAD]}}
        - {{name: items-write, path: /items, upstream: {url}, auth: required, roles: [admin],
            methods: [POST, DELETE]}}
    """)


@pytest.fixture
async def client(gateway, upstream):
    return await gateway(routes=_routes(upstream.url))


# --- public ---------------------------------------------------------------------------------
async def test_public_route_needs_no_token(client, upstream):
    r = await client.get("/public/x")
    assert r.status == 200
    assert upstream.last.path == "/public/x"
    assert not {"x-user-id", "x-user-roles", "x-session-id"} & upstream.last.header_names()


async def test_public_route_ignores_a_token_and_adds_no_identity(client, upstream):
    """A public route never authenticates: no identity, and the credential is not forwarded."""
    for token in (craft(client, sub="bob", roles=["admin"]), "garbage"):
        r = await client.get("/public/x", headers=bearer(token))
        assert r.status == 200
        names = upstream.last.header_names()
        assert not {"x-user-id", "x-user-roles", "x-session-id", "authorization"} & names


# --- required --------------------------------------------------------------------------------
async def test_required_route_refuses_anonymous(client, upstream):
    r = await client.get("/api/x")
    await refused(r, 401, "missing_token")
    assert upstream.received == []


async def test_required_route_forwards_a_logged_in_identity(client, upstream):
    tokens = await login(client, "alice")
    r = await client.get("/api/x", headers=bearer(tokens["access_token"]))
    assert r.status == 200
    assert upstream.last.header("X-User-Id") == "alice"
    assert upstream.last.header("X-User-Roles") == "user"
    assert upstream.last.header("X-Session-Id")


# --- optional --------------------------------------------------------------------------------
async def test_optional_route_forwards_identity_with_a_valid_token(client, upstream):
    tokens = await login(client, "bob")
    r = await client.get("/optional/x", headers=bearer(tokens["access_token"]))
    assert r.status == 200
    assert upstream.last.header("X-User-Id") == "bob"
    assert upstream.last.header("X-User-Roles") == "user,admin"


async def test_optional_route_is_anonymous_without_a_token(client, upstream):
    r = await client.get("/optional/x", headers={"X-User-Id": "mallory"})
    assert r.status == 200
    assert not {"x-user-id", "x-user-roles", "x-session-id"} & upstream.last.header_names()


@pytest.mark.parametrize("bad", ["garbage", "forged", "wrong-aud", "Bearer"])
async def test_optional_route_refuses_an_invalid_token(client, upstream, bad):
    """Presenting a bad credential is an error even where none is needed: never downgrade."""
    token = {"garbage": "a.b.c", "forged": craft(client)[:-4] + "AAAA",
             "wrong-aud": craft(client, aud="elsewhere"), "Bearer": ""}[bad]
    headers = {"Authorization": "Bearer"} if bad == "Bearer" else bearer(token)
    r = await client.get("/optional/x", headers=headers)
    await refused(r, 401, "invalid_token", "invalid_token")
    assert upstream.received == []


async def test_optional_route_refuses_an_expired_token(gateway, upstream):
    clock = FakeClock(time.time())
    client = await gateway(clock=clock, routes=_routes(upstream.url))
    now = int(clock.now())
    token = craft(client, now=now - 7200, exp=now - 3600)
    r = await client.get("/optional/x", headers=bearer(token))
    await refused(r, 401, "token_expired", "invalid_token")
    assert upstream.received == []


async def test_optional_route_with_roles_admits_anonymous_but_not_the_wrong_role(client, upstream):
    r = await client.get("/opt-admin/x")
    assert r.status == 200
    assert "x-user-id" not in upstream.last.header_names()
    r = await client.get("/opt-admin/x", headers=bearer(craft(client, roles=["user"])))
    await refused(r, 403, "insufficient_scope", "insufficient_scope")
    r = await client.get("/opt-admin/x", headers=bearer(craft(client, sub="bob", roles=["admin"])))
    assert r.status == 200
    assert upstream.last.header("X-User-Id") == "bob"
    assert len(upstream.received) == 2


# --- roles -----------------------------------------------------------------------------------
@pytest.mark.parametrize("roles,allowed", [
    (["admin"], True), (["ops"], True), (["user", "ops"], True), (["user"], False), ([], False),
    (["Admin"], False), (["admin "], False), (["administrator"], False),
])
async def test_roles_any_of(client, upstream, roles, allowed):
    r = await client.get("/any/x", headers=bearer(craft(client, roles=roles)))
    if allowed:
        assert r.status == 200
        assert upstream.last.header("X-User-Roles") == ",".join(roles)
    else:
        body = await refused(r, 403, "insufficient_scope", "insufficient_scope")
        assert "admin" in body["error_description"] and "ops" in body["error_description"]
        assert upstream.received == []


@pytest.mark.parametrize("roles,allowed", [
    (["user", "admin"], True), (["admin", "user", "ops"], True), (["admin"], False),
    (["user"], False), ([], False),
])
async def test_roles_all_of(client, upstream, roles, allowed):
    r = await client.get("/all/x", headers=bearer(craft(client, roles=roles)))
    if allowed:
        assert r.status == 200
    else:
        await refused(r, 403, "insufficient_scope", "insufficient_scope")
        assert upstream.received == []


async def test_roles_from_a_real_login(client, upstream):
    alice = (await login(client, "alice"))["access_token"]
    bob = (await login(client, "bob"))["access_token"]
    await refused(await client.get("/any/x", headers=bearer(alice)), 403, "insufficient_scope",
                  "insufficient_scope")
    await refused(await client.get("/all/x", headers=bearer(alice)), 403, "insufficient_scope",
                  "insufficient_scope")
    assert upstream.received == []
    assert (await client.get("/any/x", headers=bearer(bob))).status == 200
    assert (await client.get("/all/x", headers=bearer(bob))).status == 200
    assert [r.header("X-User-Id") for r in upstream.received] == ["bob", "bob"]


async def test_roles_claim_of_the_wrong_type_is_not_a_role(client, upstream):
    """A string roles claim is not iterated character by character into a role list."""
    for roles in ("admin", {"admin": True}, [["admin"]], [1]):
        r = await client.get("/any/x", headers=bearer(craft(client, roles=roles)))
        await refused(r, 401, "invalid_token", "invalid_token")
    assert upstream.received == []


async def test_missing_roles_claim_means_no_roles(client, upstream):
    payload = claims()
    del payload["roles"]
    token = craft(client, payload)
    await refused(await client.get("/any/x", headers=bearer(token)), 403, "insufficient_scope",
                  "insufficient_scope")
    r = await client.get("/api/x", headers=bearer(token))
    assert r.status == 200
    assert upstream.last.header("X-User-Roles") == ""


# --- methods ---------------------------------------------------------------------------------
async def test_methods_select_the_route_and_its_policy(client, upstream):
    r = await client.get("/items/1")
    assert r.status == 200
    assert upstream.last.method == "GET"
    r = await client.head("/items/1")
    assert r.status == 200

    r = await client.post("/items/1")
    await refused(r, 401, "missing_token")
    r = await client.delete("/items/1", headers=bearer(craft(client, roles=["user"])))
    await refused(r, 403, "insufficient_scope", "insufficient_scope")
    assert [x.method for x in upstream.received] == ["GET", "HEAD"]

    r = await client.post("/items/1", headers=bearer(craft(client, sub="bob", roles=["admin"])))
    assert r.status == 200
    assert upstream.last.method == "POST"
    assert upstream.last.header("X-User-Id") == "bob"


async def test_method_no_route_accepts_is_405_with_allow(client, upstream):
    r = await client.put("/items/1", headers=bearer(craft(client, sub="bob", roles=["admin"])))
    assert r.status == 405
    assert (await r.json())["error"] == "method_not_allowed"
    assert r.headers["Allow"] == "DELETE, GET, HEAD, POST"
    assert upstream.received == []
