"""Off-the-shelf clients against the gateway: Authlib's OAuth2 client on /auth/token of a real
gateway process (password grant, automatic refresh), and PyJWT's JWKS client on the JWKS."""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from authlib.integrations.base_client.errors import OAuthError

with warnings.catch_warnings():
    # Authlib >= 1.7 prefers the `httpx2` package and warns when it falls back to `httpx`,
    # which is what this project depends on.
    warnings.filterwarnings("ignore", message="The httpx module is deprecated")
    from authlib.integrations.httpx_client import AsyncOAuth2Client

from gateway.tokens.signer import thumbprint
from tests.conftest import PASSWORD, gateway_yaml
from tests.support.gateway_process import GatewayProcess, start_gateway
from tests.support.tokens import jwt_claims, write_users

pytestmark = pytest.mark.integration
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
UNUSED_UPSTREAM = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_users(tmp_path_factory.mktemp("users") / "users.yaml")


@pytest.fixture(scope="module")
def process(tmp_path_factory: pytest.TempPathFactory, users: Path) -> Iterator[GatewayProcess]:
    """One real gateway process (EdDSA, embedded store) with 2 s access tokens."""
    text = gateway_yaml(UNUSED_UPSTREAM, users,
                        tokens="access_ttl: 2s\nreuse_grace: 10s\nextra_claims: [email]\n")
    gw = start_gateway(tmp_path_factory.mktemp("gw"), text)
    try:
        yield gw
    finally:
        gw.stop()


async def test_authlib_password_grant_and_automatic_refresh(process: GatewayProcess) -> None:
    updates: list[dict[str, Any]] = []

    async def update_token(token: dict[str, Any], refresh_token: str | None = None,
                           access_token: str | None = None) -> None:
        updates.append({"token": dict(token), "refresh_token": refresh_token})

    token_url = f"{process.url}/auth/token"
    async with AsyncOAuth2Client(client_id="interop-test", token_endpoint=token_url,
                                 update_token=update_token, leeway=0, timeout=10) as client:
        first = dict(await client.fetch_token(token_url, grant_type="password",
                                              username="alice", password=PASSWORD))
        assert first["token_type"] == "Bearer" and first["expires_in"] == 2
        assert abs(first["expires_at"] - (time.time() + 2)) < 3
        r = await client.get(f"{process.url}/auth/me")
        assert r.status_code == 200
        assert r.json()["sub"] == "alice" and r.json()["email"] == "alice@example.test"
        sid = r.json()["sid"]
        assert updates == []

        # The access token runs out (2 s): the next request refreshes on its own first.
        await asyncio.sleep(max(0.0, first["expires_at"] - time.time()) + 0.1)
        r = await client.get(f"{process.url}/auth/me")
        assert r.status_code == 200 and r.json()["sid"] == sid
        assert len(updates) == 1
        second = updates[0]["token"]
        assert updates[0]["refresh_token"] == first["refresh_token"]
        assert second["access_token"] != first["access_token"]
        assert second["refresh_token"] != first["refresh_token"]
        assert client.token["access_token"] == second["access_token"]
        assert r.request.headers["Authorization"] == f"Bearer {second['access_token']}"

        # Again, by declaring the token expired: Authlib must present the rotated refresh token
        # (the original one would get the same successor back inside the grace window).
        client.token["expires_at"] = int(time.time()) - 1
        r = await client.get(f"{process.url}/auth/me")
        assert r.status_code == 200 and r.json()["sid"] == sid
        assert len(updates) == 2
        third = updates[1]["token"]
        assert updates[1]["refresh_token"] == second["refresh_token"]
        assert third["refresh_token"] not in (first["refresh_token"], second["refresh_token"])

        # Replaying the first refresh token now is theft: the whole session is revoked ...
        r = await client.request("POST", token_url, withhold_token=True,
                                 data={"grant_type": "refresh_token",
                                       "refresh_token": first["refresh_token"]})
        assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
        assert r.headers["Cache-Control"] == "no-store"
        # ... so the client's next automatic refresh fails the OAuth way.
        client.token["expires_at"] = int(time.time()) - 1
        with pytest.raises(OAuthError) as failed:
            await client.get(f"{process.url}/auth/me")
        assert failed.value.error == "invalid_grant"


async def test_authlib_sees_invalid_grant_for_bad_credentials(process: GatewayProcess) -> None:
    token_url = f"{process.url}/auth/token"
    async with AsyncOAuth2Client(client_id="interop-test", token_endpoint=token_url,
                                 timeout=10) as client:
        with pytest.raises(OAuthError) as failed:
            await client.fetch_token(token_url, grant_type="password", username="alice",
                                     password="wrong")
        assert failed.value.error == "invalid_grant"


async def test_pyjwt_jwks_client_verifies_an_access_token(process: GatewayProcess) -> None:
    async with httpx.AsyncClient(base_url=process.url, timeout=10) as http:
        r = await http.post("/auth/token", data={"grant_type": "password", "username": "bob",
                                                 "password": PASSWORD})
        assert r.status_code == 200
        access = r.json()["access_token"]
    jwks_client = jwt.PyJWKClient(f"{process.url}/.well-known/jwks.json")
    key = await asyncio.to_thread(jwks_client.get_signing_key_from_jwt, access)
    assert key.key_id == jwt.get_unverified_header(access)["kid"]
    claims = jwt.decode(access, key.key, algorithms=["EdDSA"], audience="test",
                        issuer="test-gateway", leeway=60)
    assert claims["sub"] == "bob" and claims["roles"] == ["user", "admin"]
    # A token signed by any other key is not verified by what the JWKS publishes.
    forged = jwt.encode(jwt_claims(access), "x" * 32, algorithm="HS256",
                        headers={"kid": key.key_id})
    with pytest.raises(jwt.PyJWTError):
        jwt.decode(forged, key.key, algorithms=["EdDSA"], audience="test", issuer="test-gateway")


async def test_jwks_caching_headers(process: GatewayProcess) -> None:
    url = "/.well-known/jwks.json"
    async with httpx.AsyncClient(base_url=process.url, timeout=10) as http:
        r = await http.get(url)
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("application/jwk-set+json")
        assert "max-age=2" in r.headers["Cache-Control"]  # never longer than access_ttl
        etag = r.headers["ETag"]
        assert etag.startswith('"') and etag.endswith('"')
        body = r.content
        for conditional in (etag, f"W/{etag}", f'"other", {etag}', "*"):
            r = await http.get(url, headers={"If-None-Match": conditional})
            assert r.status_code == 304, conditional
            assert r.content == b"" and r.headers["ETag"] == etag
            assert "max-age=2" in r.headers["Cache-Control"]
        r = await http.get(url, headers={"If-None-Match": '"something-else"'})
        assert r.status_code == 200 and r.content == body


@pytest.mark.parametrize("alg, expected, members", [
    ("EdDSA", {"kty": "OKP", "crv": "Ed25519"}, {"x"}),
    ("ES256", {"kty": "EC", "crv": "P-256"}, {"x", "y"}),
    ("RS256", {"kty": "RSA", "e": "AQAB"}, {"n"}),
])
async def test_jwks_publishes_only_public_keys(gateway: Any, upstream: Any, users: Path, alg: str,
                                               expected: dict[str, str], members: set[str]) -> None:
    client = await gateway(gateway_yaml(upstream.url, users, tokens=f"algorithm: {alg}\n"))
    r = await client.get("/.well-known/jwks.json")
    assert r.status == 200
    keys = (await r.json(content_type=None))["keys"]
    assert len(keys) == 1
    jwk = keys[0]
    assert not PRIVATE_MEMBERS & set(jwk), jwk
    assert set(jwk) == {"kid", "alg", "use", *expected, *members}
    assert {k: jwk[k] for k in expected} == expected
    assert jwk["alg"] == alg and jwk["use"] == "sig"
    assert jwk["kid"] == thumbprint(jwk)

    r = await client.post("/auth/login", json={"username": "alice", "password": PASSWORD})
    access = (await r.json())["access_token"]
    assert jwt.get_unverified_header(access)["kid"] == jwk["kid"]
    jwks_client = jwt.PyJWKClient(f"http://{client.host}:{client.port}/.well-known/jwks.json")
    key = await asyncio.to_thread(jwks_client.get_signing_key_from_jwt, access)
    claims = jwt.decode(access, key.key, algorithms=[alg], audience="test", issuer="test-gateway")
    assert claims["sub"] == "alice"


async def test_jwks_is_empty_for_hs256(gateway: Any, upstream: Any, users: Path) -> None:
    client = await gateway(gateway_yaml(upstream.url, users,
                                        tokens="algorithm: HS256\nsecret: " + "s" * 40 + "\n"))
    r = await client.get("/.well-known/jwks.json")
    assert r.status == 200
    assert await r.json(content_type=None) == {"keys": []}
    text = await r.text()
    assert "s" * 40 not in text
