"""The opaque refresh token: its wire format, its stored hash, and the grace-window envelope.

Wire format (base64url, 103 chars): body = version(1) sid(16) generation(4) expiry(4) session-end(4) random(32),
then tag(16). Redis keeps only SHA-256(body); the 256 random bits make the body the secret. The
tag is an HMAC of the body under a per-session key (held in Redis, returned by the rotate step),
so a token of an older generation can be recognised as genuine (theft) rather than forged
(noise). During the reuse-grace window the successor body is kept encrypted under a key derived
from the body it replaces, so only a holder of that token can read it; it expires with the window.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_VERSION = 1
_HEAD = struct.Struct(">B16sIII")  # version, sid, generation, expiry, session end (unix s)
_RANDOM = 32
_TAG = 16
_SIZE = _HEAD.size + _RANDOM + _TAG
MAX_TOKEN_CHARS = 128
_LAST_GENERATION = 2**32 - 1  # the generation field is 4 bytes


@dataclass(frozen=True, slots=True)
class RefreshToken:
    body: bytes
    sid: str
    generation: int
    #: When this token stops working if unused (idle timeout, never past `session_end`).
    expires: int
    #: The session's absolute end (`session_max_lifetime` after login); no refresh extends it.
    session_end: int

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.body).digest()

    def token(self, mac_key: bytes) -> str:
        """The wire form: body and its tag under the session's key."""
        return _b64(self.body + _tag(mac_key, self.body))


def new_sid() -> str:
    return _b64(os.urandom(16))


def new_mac_key() -> bytes:
    return os.urandom(16)


def mint(sid: str, generation: int, expires: int, session_end: int) -> RefreshToken:
    expires = min(expires, session_end)
    body = _HEAD.pack(_VERSION, _unb64(sid), generation, expires, session_end) + os.urandom(_RANDOM)
    return RefreshToken(body, sid, generation, expires, session_end)


def _tag(mac_key: bytes, body: bytes) -> bytes:
    return hmac.digest(mac_key, body, "sha256")[:_TAG]


def parse(token: str) -> PresentedToken | None:
    """The token's visible fields, or None if it is not one of ours. Says nothing of validity."""
    if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_CHARS:
        return None
    try:
        raw = _unb64(token)
    except (ValueError, binascii.Error):
        return None
    if len(raw) != _SIZE or _b64(raw) != token:
        return None
    version, sid, generation, expires, end = _HEAD.unpack_from(raw)
    if version != _VERSION or generation >= _LAST_GENERATION:
        return None  # the last generation is never minted: it could have no successor
    return PresentedToken(raw[:-_TAG], _b64(sid), generation, expires, end, raw[-_TAG:])


@dataclass(frozen=True, slots=True)
class PresentedToken(RefreshToken):
    presented_tag: bytes

    def genuine(self, mac_key: bytes) -> bool:
        return hmac.compare_digest(_tag(mac_key, self.body), self.presented_tag)


def seal(previous: RefreshToken, successor: RefreshToken) -> bytes:
    """Encrypt the successor's body under a key only the holder of `previous` can derive."""
    nonce = os.urandom(12)
    return nonce + AESGCM(_envelope_key(previous.body)).encrypt(nonce, successor.body, None)


def unseal(previous: RefreshToken, blob: bytes) -> RefreshToken | None:
    try:
        body = AESGCM(_envelope_key(previous.body)).decrypt(blob[:12], blob[12:], None)
    except (InvalidTag, ValueError):
        return None
    if len(body) != _HEAD.size + _RANDOM:
        return None
    _, sid, generation, expires, end = _HEAD.unpack_from(body)
    return RefreshToken(body, _b64(sid), generation, expires, end)


def _envelope_key(body: bytes) -> bytes:
    # Domain-separated from the stored SHA-256(body): what Redis holds never yields this key.
    return hmac.digest(body, b"gateway refresh grace envelope v1", "sha256")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
