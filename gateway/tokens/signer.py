"""The key ring: one active signing key plus verify-only keys, found by `kid`.

The only module that uses PyJWT. Algorithms, issuer, audience and required claims are pinned by
config; the token header only selects a key by `kid` and must name that key's own algorithm.
Signing, one per access token issued, builds the compact JWS itself (the header segment is fixed
per key) and signs with `cryptography` directly: the bytes are jwt.encode's, for a fraction of
its overhead.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from gateway.clock import Clock
from gateway.config.model import Tokens
from gateway.errors import InvalidToken, TokenExpired
from gateway.tokens.claims import Identity

if TYPE_CHECKING:
    from jwt.types import Options

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey

_REQUIRED = ("iss", "aud", "sub", "iat", "exp", "jti", "sid")
_DECODE_OPTIONS: Options = {
    # Time claims are checked below against the injected clock, with the configured leeway.
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "require": list(_REQUIRED),
}


class KeyFileError(ValueError):
    """A key file or secret that cannot serve the configured algorithm."""


@dataclass(frozen=True, slots=True)
class Key:
    kid: str
    alg: str
    sign_with: PrivateKey | bytes | None
    verify_with: PublicKey | bytes
    #: Public JWK for asymmetric keys; None for HMAC secrets (never published).
    jwk: Mapping[str, str] | None


#: Compact JSON, as PyJWT writes claims (one encoder, not one per call).
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _header_segment(key: Key) -> str:
    """The protected header of every token the key signs, as PyJWT writes it (sorted keys)."""
    header = {"alg": key.alg, "kid": key.kid, "typ": "JWT"}
    return _b64(json.dumps(header, separators=(",", ":"), sort_keys=True).encode())


def _signature_function(key: Key) -> Callable[[bytes], bytes] | None:
    """The JWS signature over a signing input (RFC 7518 section 3) with the key's algorithm."""
    private = key.sign_with
    if isinstance(private, bytes):  # HS256
        return lambda data: hmac.digest(private, data, "sha256")
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return private.sign
    if isinstance(private, ec.EllipticCurvePrivateKey):  # ES256: raw r || s, not DER
        curve = private

        def es256(data: bytes) -> bytes:
            r, s = decode_dss_signature(curve.sign(data, ec.ECDSA(hashes.SHA256())))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")

        return es256
    if isinstance(private, rsa.RSAPrivateKey):
        rsa_key = private
        return lambda data: rsa_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return None


def _public_jwk(public: PublicKey) -> dict[str, str]:
    # The key's type was checked against its algorithm when it was loaded.
    if isinstance(public, ed25519.Ed25519PublicKey):
        jwk = json.loads(OKPAlgorithm.to_jwk(public))
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = json.loads(ECAlgorithm.to_jwk(public))
    else:
        jwk = json.loads(RSAAlgorithm.to_jwk(public))
    return {k: v for k, v in jwk.items() if k in ("kty", "crv", "x", "y", "n", "e")}


def thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638 JWK thumbprint: the kid, so it names the key itself and not a file."""
    members = {"OKP": ("crv", "kty", "x"), "EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}
    canon = json.dumps({k: jwk[k] for k in members[jwk["kty"]]}, separators=(",", ":"))
    return _b64(hashlib.sha256(canon.encode()).digest())


def _check_type(alg: str, key: PrivateKey | PublicKey, source: str) -> None:
    ok = {
        "EdDSA": (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey),
        "ES256": (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey),
        "RS256": (rsa.RSAPrivateKey, rsa.RSAPublicKey),
    }[alg]
    if not isinstance(key, ok):
        raise KeyFileError(f"{source}: not a key for {alg}")
    if alg == "ES256" and not isinstance(key.curve, ec.SECP256R1):  # type: ignore[union-attr]
        raise KeyFileError(f"{source}: ES256 needs a P-256 key")
    if alg == "RS256" and key.key_size < 2048:  # type: ignore[union-attr]
        raise KeyFileError(f"{source}: RS256 keys must be at least 2048 bits")


def asymmetric_key(alg: str, pem: bytes, source: str, *, for_signing: bool) -> Key:
    try:
        private: PrivateKey | None = serialization.load_pem_private_key(pem, password=None)  # type: ignore[assignment]
    except (ValueError, TypeError):
        private = None
    if private is not None:
        _check_type(alg, private, source)
        public: PublicKey = private.public_key()
    elif for_signing:
        raise KeyFileError(f"{source}: not an unencrypted PEM private key")
    else:
        try:
            public = serialization.load_pem_public_key(pem)  # type: ignore[assignment]
        except (ValueError, TypeError):
            raise KeyFileError(f"{source}: not a PEM public or private key") from None
        _check_type(alg, public, source)
    jwk = _public_jwk(public)
    kid = thumbprint(jwk)
    published = MappingProxyType({**jwk, "kid": kid, "alg": alg, "use": "sig"})
    return Key(kid, alg, private if for_signing else None, public, published)


def hmac_key(secret: bytes, *, for_signing: bool) -> Key:
    kid = "hs-" + hashlib.sha256(b"kid:" + secret).hexdigest()[:16]
    return Key(kid, "HS256", secret if for_signing else None, secret, None)


def generate_private_pem(alg: str) -> bytes:
    key: PrivateKey
    if alg == "EdDSA":
        key = ed25519.Ed25519PrivateKey.generate()
    elif alg == "ES256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif alg == "RS256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    else:
        raise KeyFileError(f"{alg} has no key pair; use a random secret")
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_pem(private_pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(private_pem, password=None)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class KeyRing:
    """Signs with the active key; verifies with any key in the ring, chosen by `kid`."""

    def __init__(self, config: Tokens, active: Key, verify_only: tuple[Key, ...], clock: Clock):
        self.config = config
        self.active = active
        self._clock = clock
        self._keys = {k.kid: k for k in (active, *verify_only)}
        self._audience = config.audience[0] if len(config.audience) == 1 else list(config.audience)
        self._header = _header_segment(active) + "."
        self._signature = _signature_function(active)

    @classmethod
    def from_config(cls, config: Tokens, clock: Clock) -> KeyRing:
        if config.algorithm == "HS256":
            secret = config.secret.encode() if config.secret else secrets.token_bytes(32)
            active = hmac_key(secret, for_signing=True)
            older = tuple(hmac_key(s.encode(), for_signing=False) for s in config.previous_secrets)
            return cls(config, active, older, clock)
        if config.signing_key_file:
            path = config.signing_key_file
            active = asymmetric_key(config.algorithm, _read(path), path, for_signing=True)
        else:  # ephemeral: tokens die with the process; fine for the embedded demo
            pem = generate_private_pem(config.algorithm)
            active = asymmetric_key(config.algorithm, pem, "<ephemeral>", for_signing=True)
        older = tuple(
            asymmetric_key(config.algorithm, _read(p), p, for_signing=False)
            for p in config.verify_key_files
        )
        return cls(config, active, older, clock)

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [dict(k.jwk) for k in self._keys.values() if k.jwk is not None]}

    # --- signing -------------------------------------------------------------------------
    def sign(self, claims: Mapping[str, Any]) -> str:
        if self._signature is None:
            raise KeyFileError("the active key cannot sign")
        signing_input = self._header + _b64(_COMPACT.encode(claims).encode())
        return signing_input + "." + _b64(self._signature(signing_input.encode()))

    def access_token(
        self, *, sub: str, sid: str, roles: tuple[str, ...], extra: Mapping[str, Any] | None = None,
        issued_at: float | None = None,
    ) -> tuple[str, int]:
        """A fresh access token and its lifetime in seconds, issued now or at `issued_at`."""
        now = int(self._clock.now() if issued_at is None else issued_at)
        ttl = int(self.config.access_ttl)
        claims: dict[str, Any] = {
            **(extra or {}),
            "iss": self.config.issuer, "aud": self._audience, "sub": sub,
            "iat": now, "nbf": now, "exp": now + ttl,
            "jti": secrets.token_urlsafe(12), "sid": sid, "roles": list(roles),
        }
        return self.sign(claims), ttl

    def identity_token(self, identity: Identity, audience: str) -> tuple[str, float]:
        """A short-lived token for one upstream (aud = route name) and its expiry."""
        now = int(self._clock.now())
        exp = min(now + int(self.config.identity_token_ttl), int(identity.exp))
        token = self.sign({
            "iss": self.config.issuer, "aud": audience, "sub": identity.sub, "sid": identity.sid,
            "roles": list(identity.roles), "iat": now, "nbf": now, "exp": exp,
            "jti": secrets.token_urlsafe(12),
        })
        return token, float(exp)

    # --- verification --------------------------------------------------------------------
    def verify(self, token: str) -> Identity:
        """A verified Identity, or InvalidToken / TokenExpired saying why not."""
        if len(token) > self.config.max_token_bytes:
            raise InvalidToken("The access token is too large.")
        if not token.isascii():  # a JWT is base64url and dots; PyJWT would fail to encode it
            raise InvalidToken("The access token is malformed.")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("The access token is malformed.") from None
        kid = header.get("kid")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise InvalidToken("The access token was not signed by a known key.")
        if "crit" in header:
            raise InvalidToken("The access token has critical header parameters.")
        if header.get("alg") != key.alg:
            raise InvalidToken("The access token's algorithm does not match its key.")
        try:
            claims = jwt.decode(
                token, key.verify_with, algorithms=[key.alg],
                audience=self.config.audience, issuer=self.config.issuer, options=_DECODE_OPTIONS,
            )
        except jwt.InvalidAudienceError:
            raise InvalidToken("The access token is for another audience.") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("The access token has the wrong issuer.") from None
        except jwt.MissingRequiredClaimError as e:
            raise InvalidToken(f"The access token lacks the {e.claim} claim.") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("The access token signature is invalid.") from None
        except jwt.PyJWTError:
            raise InvalidToken("The access token is malformed.") from None
        return self._identity(claims)

    def _identity(self, claims: dict[str, Any]) -> Identity:
        now, leeway = self._clock.now(), self.config.leeway
        exp, iat = _seconds(claims.get("exp")), _seconds(claims.get("iat"))
        nbf = _seconds(claims.get("nbf", claims.get("iat")))
        if exp is None or iat is None or nbf is None:
            raise InvalidToken("The access token has malformed time claims.")
        if now >= exp + leeway:
            raise TokenExpired()
        if nbf > now + leeway or iat > now + leeway:
            raise InvalidToken("The access token is not valid yet.")
        sub, sid, jti, roles = claims["sub"], claims["sid"], claims["jti"], claims.get("roles", [])
        if not (isinstance(sub, str) and isinstance(sid, str) and isinstance(jti, str) and sub):
            raise InvalidToken("The access token has malformed claims.")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise InvalidToken("The access token has malformed roles.")
        extra = {k: claims[k] for k in self.config.extra_claims if k in claims}
        return Identity(sub, tuple(roles), sid, jti, iat, exp, MappingProxyType(extra))


def _seconds(value: object) -> float | None:
    """A NumericDate as a finite float; None for anything else (NaN would never expire)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) else None


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise KeyFileError(f"{path}: {e.strerror}") from None
