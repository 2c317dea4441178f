"""Credentials checked by a team's own user service: POST {username, password} -> 200 {sub, roles}."""

from __future__ import annotations

from types import MappingProxyType

import aiohttp

from gateway.config.model import Verifier
from gateway.errors import VerifierUnavailable
from gateway.users import UserRecord
from gateway.users.file import ROLE


class HttpVerifier:
    def __init__(self, config: Verifier, session: aiohttp.ClientSession):
        self._url = config.url
        self._timeout = aiohttp.ClientTimeout(total=config.timeout)
        self._session = session

    async def authenticate(self, username: str, password: str) -> UserRecord | None:
        try:
            async with self._session.post(
                self._url, json={"username": username, "password": password},
                timeout=self._timeout, allow_redirects=False,
            ) as resp:
                if resp.status >= 500:
                    raise VerifierUnavailable()
                if resp.status != 200:
                    return None
                body = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError) as e:
            raise VerifierUnavailable() from e
        if not isinstance(body, dict):
            return None
        sub, roles = body.get("sub"), body.get("roles", [])
        if not isinstance(sub, str) or not sub or not isinstance(roles, list):
            return None
        if not all(isinstance(r, str) and ROLE.match(r) for r in roles):
            return None
        claims = {k: v for k, v in body.items() if k not in ("sub", "roles")}
        return UserRecord(sub, tuple(roles), MappingProxyType(claims))

    def current(self, sub: str) -> UserRecord | None | bool:
        return True  # the user service is only asked at login; sessions keep their roles
