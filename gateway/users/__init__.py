"""Where credentials are checked: a users file of argon2id hashes, or a team's own user service."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class UserRecord:
    sub: str
    roles: tuple[str, ...]
    #: Extra claims offered for the access token (only `tokens.extra_claims` are copied).
    claims: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


class Credentials(Protocol):
    async def authenticate(self, username: str, password: str) -> UserRecord | None:
        """The user on success; None for any failed login. Raises VerifierUnavailable."""
        ...

    def current(self, sub: str) -> UserRecord | None | bool:
        """At refresh: the user's current record, None if gone or disabled, True if unknown here."""
        ...
