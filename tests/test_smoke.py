"""The whole path once, in-process: login, a proxied request with identity, spoofing stripped."""

from tests.conftest import PASSWORD


async def test_login_then_proxy_with_identity(gateway, upstream):
    client = await gateway()
    r = await client.post("/auth/login", json={"username": "alice", "password": PASSWORD})
    assert r.status == 200
    tokens = await r.json()
    r = await client.get("/api/things?q=%20x", headers={
        "Authorization": f"Bearer {tokens['access_token']}", "X-User-Id": "mallory",
        "x-auth-admin": "1",
    })
    assert r.status == 200
    got = upstream.last
    assert got.header("X-User-Id") == "alice"
    assert got.header("X-User-Roles") == "user"
    assert got.raw_path == "/api/things?q=%20x"
    assert "x-auth-admin" not in got.header_names()
    assert "authorization" not in got.header_names()
