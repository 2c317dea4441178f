"""Forged, tampered, mis-scoped and misplaced access tokens are refused at the edge: each gets a
401 with the right error code and RFC 6750 challenge, and the upstream receives nothing."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from gateway.clock import FakeClock
from gateway.tokens.signer import generate_private_pem, public_pem
from tests.support.edge import (
    DROP,
    b64json,
    b64url,
    bearer,
    claims,
    craft,
    keyring_of,
    refused,
    split,
)


async def test_control_a_correctly_crafted_token_is_accepted(gateway, upstream):
    """The crafting helpers make tokens the gateway accepts, so every refusal below is real."""
    client = await gateway()
    r = await client.get("/api/x", headers=bearer(craft(client, sub="zed", roles=["user"])))
    assert r.status == 200, await r.text()
    assert upstream.last.header("X-User-Id") == "zed"


# --- signature and algorithm ----------------------------------------------------------------
@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("signature", ["", "c2ln"])
async def test_alg_none_is_refused(gateway, upstream, alg, signature):
    client = await gateway()
    kid = keyring_of(client).active.kid
    header = b64json({"alg": alg, "kid": kid, "typ": "JWT"})
    token = f"{header}.{b64json(claims(roles=['admin']))}.{signature}"
    r = await client.get("/admin/x", headers=bearer(token))
    await refused(r, 401, "invalid_token", "invalid_token")
    assert upstream.received == []


async def test_alg_none_without_kid_is_refused(gateway, upstream):
    client = await gateway()
    token = f"{b64json({'alg': 'none'})}.{b64json(claims())}."
    r = await client.get("/api/x", headers=bearer(token))
    await refused(r, 401, "invalid_token", "invalid_token")
    assert upstream.received == []


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One signing key file per asymmetric algorithm (RSA generation is slow: do it once)."""
    directory = tmp_path_factory.mktemp("keys")
    out = {}
    for alg in ("EdDSA", "RS256"):
        path = directory / f"{alg}.pem"
        path.write_bytes(generate_private_pem(alg))
        out[alg] = path
    return out


def _hs256(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    signing_input = f"{b64json(header)}.{b64json(payload)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


@pytest.mark.parametrize("alg", ["EdDSA", "RS256"])
@pytest.mark.parametrize("secret_form", ["pem", "pem-no-newline", "der", "jwk-x-or-n"])
async def test_key_confusion_hs256_signed_with_public_key_is_refused(
    gateway, upstream, key_files, alg, secret_form
):
    client = await gateway(tokens=f"algorithm: {alg}\nsigning_key_file: '{key_files[alg]}'\n")
    keyring = keyring_of(client)
    assert keyring.active.alg == alg
    pem = public_pem(key_files[alg].read_bytes())
    # Everything an attacker can read from /.well-known/jwks.json or a published PEM.
    jwk = (await (await client.get("/.well-known/jwks.json")).json())["keys"][0]
    secret = {
        "pem": pem,
        "pem-no-newline": pem.rstrip(b"\n"),
        "der": serialization.load_pem_public_key(pem).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        "jwk-x-or-n": (jwk.get("x") or jwk["n"]).encode(),
    }[secret_form]
    token = _hs256({"alg": "HS256", "kid": keyring.active.kid, "typ": "JWT"},
                   claims(roles=["admin"]), secret)
    r = await client.get("/admin/x", headers=bearer(token))
    await refused(r, 401, "invalid_token", "invalid_token")
    # Control: the same claims signed by the real key pass this gateway.
    r = await client.get("/admin/x", headers=bearer(craft(client, roles=["admin"])))
    assert r.status == 200, await r.text()
    assert len(upstream.received) == 1


async def test_tampered_payload_roles_changed_to_admin_is_refused(gateway, upstream):
    client = await gateway()
    token = craft(client, roles=["user"])
    _header, payload, signature = split(token)
    payload["roles"] = ["user", "admin"]
    forged = f"{token.split('.')[0]}.{b64json(payload)}.{signature}"
    r = await client.get("/admin/x", headers=bearer(forged))
    await refused(r, 401, "invalid_token", "invalid_token")
    # The untampered token is genuine but lacks the role: proves the signature did the refusing.
    r = await client.get("/admin/x", headers=bearer(token))
    await refused(r, 403, "insufficient_scope", "insufficient_scope")
    assert upstream.received == []


async def test_tampered_header_is_refused(gateway, upstream):
    client = await gateway()
    token = craft(client)
    header, _, _ = split(token)
    header["typ"] = "at+jwt"
    _, p, s = token.split(".")
    r = await client.get("/api/x", headers=bearer(f"{b64json(header)}.{p}.{s}"))
    await refused(r, 401, "invalid_token", "invalid_token")
    assert upstream.received == []


@pytest.mark.parametrize("shape", ["empty-signature", "two-segments", "garbage-signature",
                                   "signature-of-other-token"])
async def test_stripped_or_swapped_signature_is_refused(gateway, upstream, shape):
    client = await gateway()
    token = craft(client, roles=["admin"])
    h, p, _s = token.split(".")
    other = craft(client, roles=["user"]).split(".")[2]
    forged = {
        "empty-signature": f"{h}.{p}.",
        "two-segments": f"{h}.{p}",
        "garbage-signature": f"{h}.{p}.{b64url(secrets.token_bytes(64))}",
        "signature-of-other-token": f"{h}.{p}.{other}",
    }[shape]
    r = await client.get("/admin/x", headers=bearer(forged))
    await refused(r, 401, "invalid_token", "invalid_token")
    assert upstream.received == []


async def test_token_signed_by_another_key_with_its_own_kid_is_refused(gateway, upstream):
    client = await gateway()
    other = serialization.load_pem_private_key(generate_private_pem("EdDSA"), password=None)
    token = jwt.encode(claims(), other, algorithm="EdDSA", headers={"kid": "attacker-key"})
    r = await client.get("/api/x", headers=bearer(token))
    body = await refused(r, 401, "invalid_token", "invalid_token")
    assert "key" in body["error_description"]
    assert upstream.received == []


async def test_token_signed_by_another_key_claiming_our_kid_is_refused(gateway, upstream):
    client = await gateway()
    other = serialization.load_pem_private_key(generate_private_pem("EdDSA"), password=None)
    token = jwt.encode(claims(), other, algorithm="EdDSA",
                       headers={"kid": keyring_of(client).active.kid})
    r = await client.get("/api/x", headers=bearer(token))
    await refused(r, 401, "invalid_token", "invalid_token")
    assert upstream.received == []


# --- issuer, audience, key id, header parameters ----------------------------------------------
@pytest.mark.parametrize("iss", ["evil-gateway", "TEST-GATEWAY", "test-gateway ", "", DROP])
async def test_wrong_or_missing_issuer_is_refused(gateway, upstream, iss):
    client = await gateway()
    r = await client.get("/api/x", headers=bearer(craft(client, iss=iss)))
    await refused(r, 401, "invalid_token", "invalid_token")
    assert upstream.received == []


@pytest.mark.parametrize("aud", ["other-service", ["other-service", "another"], "TEST", [], DROP])
async def test_wrong_or_missing_audience_is_refused(gateway, upstream, aud):
    client = await gateway()
    r = await client.get("/api/x", headers=bearer(craft(client, aud=aud)))
    await refused(r, 401, "invalid_token", "invalid_token")
    assert upstream.received == []


@pytest.mark.parametrize("claim", ["sub", "sid", "jti", "exp", "iat"])
async def test_missing_required_claim_is_refused(gateway, upstream, claim):
    client = await gateway()
    r = await client.get("/api/x", headers=bearer(craft(client, **{claim: DROP})))
    await refused(r, 401, "invalid_token", "invalid_token")
    assert upstream.received == []


def _signed(client: Any, header: dict[str, Any], payload: dict[str, Any]) -> str:
    """Signed with the gateway's real key, with any header at all (PyJWT refuses odd kids)."""
    key = keyring_of(client).active
    signing_input = f"{b64json({'alg': key.alg, **header})}.{b64json(payload)}"
    signature = jwt.get_algorithm_by_name(key.alg).sign(signing_input.encode(), key.sign_with)
    return f"{signing_input}.{b64url(signature)}"


async def test_control_signed_helper_with_real_kid_is_accepted(gateway, upstream):
    client = await gateway()
    token = _signed(client, {"kid": keyring_of(client).active.kid}, claims(roles=["admin"]))
    assert (await client.get("/admin/x", headers=bearer(token))).status == 200


@pytest.mark.parametrize("kid", [
    "unknown-kid", "", None, 7, ["k"], {"k": 1}, True,
    "../../dev/null", "../../../../../../etc/passwd", "/etc/passwd", "/dev/null",
    "file:///etc/passwd",
    "' OR '1'='1", "1; DROP TABLE keys;--", "x' UNION SELECT 'secret'--", "%00", "\u0000",
    "http://127.0.0.1:1/jwks.json",
])
async def test_unknown_or_hostile_kid_is_refused(gateway, upstream, kid):
    client = await gateway()
    header = {"kid": kid} if kid is not None else {}
    token = _signed(client, header, claims(roles=["admin"]))
    r = await client.get("/admin/x", headers=bearer(token))
    await refused(r, 401, "invalid_token", "invalid_token")
    assert upstream.received == []


async def test_kid_of_real_key_with_case_or_padding_changed_is_refused(gateway, upstream):
    client = await gateway()
    kid = keyring_of(client).active.kid
    for variant in (kid.upper(), kid.lower(), f" {kid}", f"{kid}\u0000", kid + "="):
        if variant == kid:
            continue
        r = await client.get("/api/x", headers=bearer(_signed(client, {"kid": variant}, claims())))
        await refused(r, 401, "invalid_token", "invalid_token")
    assert upstream.received == []


@pytest.mark.parametrize("kid", ["../../dev/null", "/dev/null", "' OR '1'='1"])
async def test_hostile_kid_with_hs256_over_empty_secret_is_refused(gateway, upstream, kid):
    """The classic: point kid at an empty file and sign with HMAC over an empty key."""
    client = await gateway()
    for secret in (b"", b"\n", b"1"):
        token = _hs256({"alg": "HS256", "kid": kid}, claims(roles=["admin"]), secret)
        r = await client.get("/admin/x", headers=bearer(token))
        await refused(r, 401, "invalid_token", "invalid_token")
    assert upstream.received == []


@pytest.mark.parametrize("crit", [["exp"], ["b64"], ["x-unknown"], []])
async def test_crit_header_is_refused(gateway, upstream, crit):
    client = await gateway()
    token = craft(client, headers={"crit": crit, "x-unknown": True, "b64": True})
    r = await client.get("/api/x", headers=bearer(token))
    await refused(r, 401, "invalid_token", "invalid_token")
    assert upstream.received == []


@pytest.mark.parametrize("header_extra", [
    {"jku": "http://127.0.0.1:1/jwks.json"}, {"x5u": "http://127.0.0.1:1/cert.pem"},
    {"jwk": {"kty": "OKP", "crv": "Ed25519", "x": b64url(b"\x00" * 32)}},
])
async def test_embedded_key_references_do_not_select_a_key(gateway, upstream, header_extra):
    """jku/x5u/jwk in the header are ignored: an attacker's own key never verifies anything."""
    client = await gateway()
    other = serialization.load_pem_private_key(generate_private_pem("EdDSA"), password=None)
    token = jwt.encode(claims(), other, algorithm="EdDSA", headers=header_extra)
    r = await client.get("/api/x", headers=bearer(token))
    await refused(r, 401, "invalid_token", "invalid_token")
    assert upstream.received == []


# --- time ----------------------------------------------------------------------------------------
LEEWAY = 30  # the default tokens.leeway


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time())


@pytest.mark.parametrize("claim", ["nbf", "iat"])
async def test_future_nbf_or_iat_beyond_leeway_is_refused(gateway, upstream, clock, claim):
    client = await gateway(clock=clock)
    now = clock.now()
    token = craft(client, now=now, **{claim: int(now) + LEEWAY + 60})
    r = await client.get("/api/x", headers=bearer(token))
    body = await refused(r, 401, "invalid_token", "invalid_token")
    assert "not valid yet" in body["error_description"]
    assert upstream.received == []
    # Within the leeway (clock skew between issuer and gateway) the same claim is fine.
    token = craft(client, now=now, **{claim: int(now) + LEEWAY - 5})
    r = await client.get("/api/x", headers=bearer(token))
    assert r.status == 200, await r.text()


async def test_past_exp_beyond_leeway_is_token_expired(gateway, upstream, clock):
    client = await gateway(clock=clock)
    now = int(clock.now())
    token = craft(client, now=now - 3600, exp=now - LEEWAY - 1)
    r = await client.get("/api/x", headers=bearer(token))
    body = await refused(r, 401, "token_expired", "invalid_token")
    assert "expired" in body["error_description"]
    assert "expired" in r.headers["WWW-Authenticate"]
    assert upstream.received == []


async def test_past_exp_within_leeway_is_still_accepted(gateway, upstream, clock):
    client = await gateway(clock=clock)
    now = int(clock.now())
    token = craft(client, now=now - 3600, exp=now - LEEWAY + 5)
    r = await client.get("/api/x", headers=bearer(token))
    assert r.status == 200, await r.text()
    assert upstream.last.header("X-User-Id") == "alice"


@pytest.mark.parametrize("bad", ["1700000000", None, True, [1], {"t": 1}, "soon"])
async def test_malformed_time_claims_are_refused(gateway, upstream, bad):
    client = await gateway()
    for claim in ("exp", "iat", "nbf"):
        r = await client.get("/api/x", headers=bearer(craft(client, **{claim: bad})))
        await refused(r, 401, "invalid_token", "invalid_token")
    assert upstream.received == []


# --- size, placement and shape of the credential ----------------------------------------------
async def test_oversized_token_is_refused(gateway, upstream):
    client = await gateway(tokens="max_token_bytes: 1KB\n")
    big = craft(client, pad="x" * 1200)
    assert 1000 < len(big) < 8000
    r = await client.get("/api/x", headers=bearer(big))
    body = await refused(r, 401, "invalid_token", "invalid_token")
    assert "too large" in body["error_description"]
    assert upstream.received == []
    # Control: a normal-sized token signed by the same key passes.
    r = await client.get("/api/x", headers=bearer(craft(client)))
    assert r.status == 200


async def test_token_size_limit_boundary(gateway, upstream):
    client = await gateway(tokens="max_token_bytes: 2000\n")
    # Base64 grows in steps: collect real tokens around the limit and take the nearest each side.
    by_length = {len(t): t for t in (craft(client, pad="x" * n) for n in range(1100, 1300))}
    at_limit = by_length[max(n for n in by_length if n <= 2000)]
    over = by_length[min(n for n in by_length if n > 2000)]
    assert 1995 <= len(at_limit) <= 2000 < len(over) <= 2005
    r = await client.get("/api/x", headers=bearer(at_limit))
    assert r.status == 200, await r.text()
    r = await client.get("/api/x", headers=bearer(over))
    body = await refused(r, 401, "invalid_token", "invalid_token")
    assert "too large" in body["error_description"]
    assert len(upstream.received) == 1


@pytest.mark.parametrize("param", ["access_token", "token", "jwt"])
async def test_token_only_in_query_string_is_missing_token(gateway, upstream, param):
    client = await gateway()
    token = craft(client)
    r = await client.get(f"/api/x?{param}={token}")
    await refused(r, 401, "missing_token")
    assert upstream.received == []
    # Nor does a form body carry a credential (RFC 6750 §2.2 is not supported).
    r = await client.post("/api/x", data={"access_token": token})
    await refused(r, 401, "missing_token")
    assert upstream.received == []


async def test_missing_token_challenge_without_error_attribute(gateway, upstream):
    client = await gateway()
    r = await client.get("/api/x")
    body = await refused(r, 401, "missing_token")
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="gateway"'
    assert body["error"] == "missing_token"
    assert upstream.received == []


async def test_challenge_carries_configured_realm(gateway, upstream):
    client = await gateway(extra="auth: {realm: corp-edge}\n")
    r = await client.get("/api/x")
    await refused(r, 401, "missing_token", realm="corp-edge")
    r = await client.get("/api/x", headers=bearer("a.b.c"))
    await refused(r, 401, "invalid_token", "invalid_token", realm="corp-edge")
    assert upstream.received == []


@pytest.mark.parametrize("value", [
    "Bearer", "Bearer ", "Bearer  ", "bearer a b", "Bearer tok,en", "Bearer tok\ten",
    "Bearer \"quoted\"", "Bearer ====", "Bearer abc=def", "BearerX abc", "Bearer\u00e9abc",
    "Bearer not-a-jwt", "Bearer a.b.c", "Bearer ...", "Bearer a.b.c.d.e",
])
async def test_malformed_authorization_header_is_invalid_token(gateway, upstream, value):
    client = await gateway()
    r = await client.get("/api/x", headers={"Authorization": value})
    await refused(r, 401, "invalid_token", "invalid_token")
    assert upstream.received == []


@pytest.mark.parametrize("value", ["Basic YWxpY2U6cHc=", "Digest username=alice", "Token abc", ""])
async def test_other_authorization_schemes_are_no_bearer_credential(gateway, upstream, value):
    client = await gateway()
    r = await client.get("/api/x", headers={"Authorization": value})
    await refused(r, 401, "missing_token")
    assert upstream.received == []


@pytest.mark.parametrize("second", ["valid", "garbage", "same"])
async def test_two_authorization_headers_are_refused(gateway, upstream, second):
    """RFC 6750 §3.1: more than one credential is invalid_request (400), never a guess."""
    client = await gateway()
    user = craft(client, sub="alice", roles=["user"])
    other = {"valid": craft(client, sub="bob", roles=["admin"]), "garbage": "x.y.z",
             "same": user}[second]
    for path in ("/api/x", "/admin/x", "/optional/x"):
        r = await client.get(path, headers=[("Authorization", f"Bearer {user}"),
                                            ("Authorization", f"Bearer {other}")])
        assert r.status == 400, await r.text()
        assert (await r.json())["error"] == "invalid_request"
    assert upstream.received == []


async def test_refused_token_on_optional_route_never_reaches_upstream(gateway, upstream):
    client = await gateway()
    r = await client.get("/optional/x", headers=bearer(craft(client, iss="evil")))
    await refused(r, 401, "invalid_token", "invalid_token")
    assert upstream.received == []
