"""Helpers for the edge-enforcement tests: log in, craft JWTs with PyJWT, check refusals."""

from __future__ import annotations

import base64
import json
import secrets
import time
from typing import Any

import jwt
from aiohttp import ClientResponse

from gateway.app import HOLDER
from gateway.tokens.signer import KeyRing
from tests.conftest import PASSWORD

ISSUER = "test-gateway"
AUDIENCE = "test"
_DROP = object()


def b64url(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")))


def keyring_of(client: Any) -> KeyRing:
    """The key ring the in-process gateway signs and verifies with."""
    keyring: KeyRing = client.app[HOLDER].current.keyring
    return keyring


def claims(*, now: float | None = None, **overrides: Any) -> dict[str, Any]:
    """A complete, valid claim set; an override of `DROP` removes that claim."""
    now = int(time.time() if now is None else now)
    out: dict[str, Any] = {
        "iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "nbf": now,
        "exp": now + 300, "jti": secrets.token_urlsafe(8), "sid": secrets.token_urlsafe(12),
        "roles": ["user"],
    }
    for name, value in overrides.items():
        if value is _DROP:
            out.pop(name, None)
        else:
            out[name] = value
    return out


DROP = _DROP


def craft(client: Any, payload: dict[str, Any] | None = None, *,
          headers: dict[str, Any] | None = None, **overrides: Any) -> str:
    """A token signed with the gateway's own active key (PyJWT), unless told otherwise."""
    key = keyring_of(client).active
    body = payload if payload is not None else claims(**overrides)
    return jwt.encode(body, key.sign_with, algorithm=key.alg,  # type: ignore[arg-type]
                      headers={"kid": key.kid, "typ": "JWT", **(headers or {})})


def split(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    h, p, s = token.split(".")
    pad = lambda x: x + "=" * (-len(x) % 4)
    return (json.loads(base64.urlsafe_b64decode(pad(h))),
            json.loads(base64.urlsafe_b64decode(pad(p))), s)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def login(client: Any, user: str = "alice") -> dict[str, Any]:
    r = await client.post("/auth/login", json={"username": user, "password": PASSWORD})
    assert r.status == 200, await r.text()
    body: dict[str, Any] = await r.json()
    return body


async def refused(r: ClientResponse, status: int, code: str,
                  bearer_error: str | None = None, realm: str = "gateway") -> dict[str, Any]:
    """Assert a JSON refusal with its RFC 6750 challenge; returns the body."""
    text = await r.text()
    assert r.status == status, text
    assert r.content_type == "application/json", r.content_type
    body: dict[str, Any] = json.loads(text)
    assert body["error"] == code, body
    assert isinstance(body["error_description"], str) and body["error_description"]
    challenges = r.headers.getall("WWW-Authenticate", [])
    assert len(challenges) == 1, challenges
    challenge = challenges[0]
    if bearer_error is None:
        assert challenge == f'Bearer realm="{realm}"', challenge
    else:
        assert challenge.startswith(f'Bearer realm="{realm}", '), challenge
        assert f'error="{bearer_error}"' in challenge, challenge
    return body
