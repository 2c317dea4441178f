"""The key ring: sign and verify for every algorithm, rotation with verify-only keys, kid = RFC 7638
thumbprint, and the tokens it must refuse."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc.jwk import JWKRegistry

from gateway.clock import FakeClock
from gateway.config.model import Tokens
from gateway.errors import InvalidToken, TokenExpired
from gateway.tokens.signer import (
    KeyFileError,
    KeyRing,
    asymmetric_key,
    generate_private_pem,
    hmac_key,
    public_pem,
    thumbprint,
)

ASYMMETRIC = ["EdDSA", "ES256", "RS256"]
SECRET_A = "a" * 40
SECRET_B = "b" * 40


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], claims: dict[str, Any], sign: Any) -> str:
    """A JWT built by hand, for the shapes PyJWT refuses to produce."""
    head = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    return head + "." + b64(sign(head.encode()))


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """For each algorithm: an old and a new private key file (RSA generation is slow: once)."""
    directory = tmp_path_factory.mktemp("keys")
    out = {}
    for alg in ASYMMETRIC:
        paths = []
        for name in ("old", "new"):
            path = directory / f"{alg}-{name}.pem"
            path.write_bytes(generate_private_pem(alg))
            paths.append(path)
        out[alg] = (paths[0], paths[1])
    return out


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time())


def tokens_config(alg: str, **kwargs: Any) -> Tokens:
    return Tokens(issuer="https://gw.test", audience=("svc",), algorithm=alg, leeway=30,
                  access_ttl=300, extra_claims=("email",), **kwargs)


def ring(alg: str, pems: dict[str, tuple[Path, Path]], clock: FakeClock, *, key: str = "new",
         verify_old: bool = False) -> KeyRing:
    if alg == "HS256":
        config = tokens_config(alg, secret=SECRET_B if key == "new" else SECRET_A,
                               previous_secrets=(SECRET_A,) if verify_old else ())
    else:
        old, new = pems[alg]
        verify = ()
        if verify_old:  # the old key kept as a public key file only
            pub = old.with_suffix(".pub.pem")
            pub.write_bytes(public_pem(old.read_bytes()))
            verify = (str(pub),)
        config = tokens_config(alg, signing_key_file=str(new if key == "new" else old),
                               verify_key_files=verify)
    return KeyRing.from_config(config, clock)


@pytest.mark.parametrize("alg", [*ASYMMETRIC, "HS256"])
def test_sign_and_verify(alg: str, pems: Any, clock: FakeClock) -> None:
    keys = ring(alg, pems, clock)
    token, ttl = keys.access_token(sub="alice", sid="sid-1", roles=("user", "admin"),
                                   extra={"email": "a@x.test", "other": 1})
    assert ttl == 300
    header = jwt.get_unverified_header(token)
    assert header["alg"] == alg and header["kid"] == keys.active.kid and header["typ"] == "JWT"
    identity = keys.verify(token)
    assert (identity.sub, identity.sid, identity.roles) == ("alice", "sid-1", ("user", "admin"))
    assert dict(identity.extra) == {"email": "a@x.test"}
    assert identity.exp - identity.iat == 300
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["iss"] == "https://gw.test" and claims["aud"] == "svc"
    assert {"jti", "sid", "iat", "nbf", "exp"} <= set(claims)


@pytest.mark.parametrize("alg", [*ASYMMETRIC, "HS256"])
def test_tokens_are_byte_for_byte_what_pyjwt_signs(alg: str, pems: Any, clock: FakeClock) -> None:
    """The ring builds the compact JWS itself; it must be exactly jwt.encode's token (ES256
    signatures are randomised: the same header and claims, and PyJWT accepts the signature)."""
    keys = ring(alg, pems, clock)
    claims = {"email": "\u00e5@x.test", "iss": "https://gw.test", "aud": "svc", "sub": "alice",
              "iat": 1_700_000_000, "nbf": 1_700_000_000, "exp": 1_700_000_300, "jti": "j-1",
              "sid": "sid-1", "roles": ["user", "admin"]}
    mine = keys.sign(claims)
    theirs = jwt.encode(dict(claims), keys.active.sign_with,  # type: ignore[arg-type]
                        algorithm=alg, headers={"kid": keys.active.kid, "typ": "JWT"})
    if alg == "ES256":
        assert mine.rsplit(".", 1)[0] == theirs.rsplit(".", 1)[0]
        decoded = jwt.decode(mine, keys.active.verify_with,  # type: ignore[arg-type]
                             algorithms=["ES256"], audience="svc",
                             options={"verify_exp": False, "verify_iat": False})
        assert decoded == claims
    else:
        assert mine == theirs


@pytest.mark.parametrize("alg", [*ASYMMETRIC, "HS256"])
def test_rotation_keeps_old_tokens_verifying(alg: str, pems: Any, clock: FakeClock) -> None:
    before = ring(alg, pems, clock, key="old")
    old_token, _ = before.access_token(sub="alice", sid="s", roles=())
    after = ring(alg, pems, clock, key="new", verify_old=True)
    assert after.active.kid != before.active.kid
    assert after.verify(old_token).sub == "alice"  # signed by the old key, still good
    new_token, _ = after.access_token(sub="bob", sid="s2", roles=())
    assert jwt.get_unverified_header(new_token)["kid"] == after.active.kid
    assert after.verify(new_token).sub == "bob"
    # The old key only verifies: a ring that dropped it refuses the old token ...
    dropped = ring(alg, pems, clock, key="new")
    with pytest.raises(InvalidToken, match="known key"):
        dropped.verify(old_token)
    # ... and the ring that still verifies it never signs with it.
    if alg != "HS256":
        assert [k["kid"] for k in after.jwks()["keys"]] == [after.active.kid, before.active.kid]


@pytest.mark.parametrize("alg", [*ASYMMETRIC, "HS256"])
def test_unknown_or_missing_kid_is_rejected(alg: str, pems: Any, clock: FakeClock) -> None:
    keys = ring(alg, pems, clock)
    token, _ = keys.access_token(sub="alice", sid="s", roles=())
    claims = jwt.decode(token, options={"verify_signature": False})
    signing = keys.active.sign_with
    for header in ({"kid": "someone-else"}, {}, {"kid": keys.active.kid + "x"}):
        forged = jwt.encode(claims, signing, algorithm=alg,  # type: ignore[arg-type]
                            headers=header)
        with pytest.raises(InvalidToken, match="known key"):
            keys.verify(forged)
    # A kid that is not a string (PyJWT will not write one; build it by hand).
    head = b64(json.dumps({"alg": alg, "kid": 42}).encode())
    with pytest.raises(InvalidToken):
        keys.verify(f"{head}.{token.split('.', 1)[1]}")


@pytest.mark.parametrize("alg", ASYMMETRIC)
def test_algorithm_is_pinned_to_the_key(alg: str, pems: Any, clock: FakeClock) -> None:
    keys = ring(alg, pems, clock)
    token, _ = keys.access_token(sub="alice", sid="s", roles=())
    claims = jwt.decode(token, options={"verify_signature": False})
    kid = keys.active.kid
    public = public_pem(pems[alg][1].read_bytes())
    # HS256 "signed" with the public key (algorithm confusion), and alg none.
    confused = handmade({"alg": "HS256", "kid": kid, "typ": "JWT"}, claims,
                        lambda data: hmac.new(public, data, hashlib.sha256).digest())
    unsigned = handmade({"alg": "none", "kid": kid}, claims, lambda data: b"")
    # Another algorithm's key under this kid.
    other_alg = "ES256" if alg != "ES256" else "EdDSA"
    other = asymmetric_key(other_alg, generate_private_pem(other_alg), "other", for_signing=True)
    wrong_key = jwt.encode(claims, other.sign_with, algorithm=other_alg,  # type: ignore[arg-type]
                           headers={"kid": kid})
    for bad in (confused, unsigned, wrong_key):
        with pytest.raises(InvalidToken):
            keys.verify(bad)
    with pytest.raises(InvalidToken):  # critical extensions the gateway does not understand
        keys.verify(jwt.encode(claims, keys.active.sign_with,  # type: ignore[arg-type]
                               algorithm=alg, headers={"kid": kid, "crit": ["exp"]}))


def test_tampering_and_claim_checks(pems: Any, clock: FakeClock) -> None:
    keys = ring("EdDSA", pems, clock)
    token, _ = keys.access_token(sub="alice", sid="s", roles=("user",))
    head, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["roles"] = ["admin"]
    with pytest.raises(InvalidToken, match="signature"):
        keys.verify(f"{head}.{b64(json.dumps(claims).encode())}.{sig}")

    def signed(**changes: Any) -> str:
        body = {**jwt.decode(token, options={"verify_signature": False}), **changes}
        for name in [k for k, v in changes.items() if v is None]:
            del body[name]
        return jwt.encode(body, keys.active.sign_with, algorithm="EdDSA",  # type: ignore[arg-type]
                          headers={"kid": keys.active.kid})

    for bad in (signed(aud="other"), signed(iss="https://evil.test"), signed(sid=None),
                signed(jti=None), signed(sub=""), signed(roles="admin"),
                signed(nbf=clock.now() + 3600), signed(exp="soon")):
        with pytest.raises(InvalidToken) as info:
            keys.verify(bad)
        assert type(info.value) is InvalidToken
    with pytest.raises(InvalidToken, match="too large"):
        keys.verify(token + "A" * 9000)
    with pytest.raises(InvalidToken):
        keys.verify("not.a.jwt")


def test_expiry_uses_the_clock_and_leeway(pems: Any, clock: FakeClock) -> None:
    keys = ring("EdDSA", pems, clock)
    token, _ = keys.access_token(sub="alice", sid="s", roles=())
    clock.advance(300 + 29)  # inside the 30 s leeway
    assert keys.verify(token).sub == "alice"
    clock.advance(2)
    with pytest.raises(TokenExpired):
        keys.verify(token)


def test_rfc7638_thumbprint_example() -> None:
    # RFC 7638 §3.1
    jwk = {
        "kty": "RSA",
        "n": (
            "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tS"
            "oc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65Y"
            "GjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrd"
            "kt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKn"
            "qDKgw"
        ),
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.mark.parametrize("alg", ASYMMETRIC)
def test_kid_is_the_thumbprint_of_the_public_key(alg: str, pems: Any) -> None:
    pem = pems[alg][1].read_bytes()
    private = asymmetric_key(alg, pem, "private", for_signing=True)
    public_only = asymmetric_key(alg, public_pem(pem), "public", for_signing=False)
    assert private.kid == public_only.kid  # the key names itself, whichever file holds it
    assert public_only.sign_with is None
    # An independent implementation (joserfc, Authlib's JOSE library) agrees.
    key_type = {"EdDSA": "OKP", "ES256": "EC", "RS256": "RSA"}[alg]
    assert private.kid == JWKRegistry.import_key(public_pem(pem), key_type).thumbprint()
    assert private.jwk is not None and private.jwk["kid"] == private.kid


def test_hmac_kid_does_not_reveal_the_secret() -> None:
    key = hmac_key(SECRET_A.encode(), for_signing=True)
    assert SECRET_A not in key.kid and key.jwk is None
    assert hmac_key(SECRET_A.encode(), for_signing=False).kid == key.kid
    assert hmac_key(SECRET_B.encode(), for_signing=False).kid != key.kid


def test_key_files_must_match_the_algorithm(tmp_path: Path) -> None:
    eddsa = generate_private_pem("EdDSA")
    with pytest.raises(KeyFileError):
        asymmetric_key("ES256", eddsa, "k", for_signing=True)
    p384 = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    with pytest.raises(KeyFileError, match="P-256"):
        asymmetric_key("ES256", p384, "k", for_signing=True)
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    with pytest.raises(KeyFileError, match="2048"):
        asymmetric_key("RS256", small, "k", for_signing=True)
    with pytest.raises(KeyFileError):  # a public key cannot be the signing key
        asymmetric_key("EdDSA", public_pem(eddsa), "k", for_signing=True)
    with pytest.raises(KeyFileError):
        asymmetric_key("EdDSA", b"garbage", "k", for_signing=False)
    missing = tmp_path / "missing.pem"
    with pytest.raises(KeyFileError, match="missing.pem"):
        KeyRing.from_config(tokens_config("EdDSA", signing_key_file=str(missing)), FakeClock())
