"""Bearer header (or the access cookie on browser routes) -> verified Identity, or anonymous.

A verified token is cached until it expires, so a hot client costs one dict lookup instead of a
signature check; revocation is checked on every request, cached or not, against memory.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping

from gateway.clock import Clock
from gateway.errors import BadRequest, InvalidToken, TokenExpired, TokenRevoked
from gateway.pipeline.revocations import RevocationList
from gateway.tokens.claims import Identity
from gateway.tokens.signer import KeyRing

# RFC 6750 §2.1: "Bearer" 1*SP b64token
_BEARER = re.compile(r"^[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*) *$")


def bearer_token(values: list[str]) -> str | None:
    """The token of the Authorization header, None without a bearer credential."""
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest("More than one Authorization header.")
    value = values[0]
    if not value[:7].lower().startswith("bearer"):
        return None  # another scheme (Basic, ...) is not a bearer credential
    m = _BEARER.match(value)
    if m is None:
        raise InvalidToken("The Authorization header is not a valid bearer credential.")
    return m.group(1)


class Authenticator:
    def __init__(self, keyring: KeyRing, revocations: RevocationList, clock: Clock, cache_size: int):
        self._keyring = keyring
        self._revocations = revocations
        self._clock = clock
        self._leeway = keyring.config.leeway
        self._cache: OrderedDict[str, Identity] = OrderedDict()
        self._cache_size = cache_size

    def verify(self, token: str) -> Identity:
        """Verified (or cached) identity; raises InvalidToken, TokenExpired or TokenRevoked."""
        identity = self._cache.get(token)
        if identity is not None:
            if self._clock.now() >= identity.exp + self._leeway:
                del self._cache[token]
                raise TokenExpired()
            self._cache.move_to_end(token)
        else:
            identity = self._keyring.verify(token)
            if self._cache_size:
                self._cache[token] = identity
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        if self._revocations.is_revoked(identity.sid):
            raise TokenRevoked()
        return identity

    def credential(
        self, authorization: list[str], cookies: Mapping[str, str], cookie_name: str | None
    ) -> str | None:
        """The access token a request presents: bearer header first, then the access cookie."""
        token = bearer_token(authorization)
        if token is None and cookie_name is not None:
            token = cookies.get(cookie_name) or None
        return token
