"""The verified identity a request carries from authentication to the identity headers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Identity:
    sub: str
    roles: tuple[str, ...]
    sid: str
    jti: str
    iat: float
    exp: float
    #: Configured extra claims carried by the token (read-only).
    extra: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    def has_any(self, roles: tuple[str, ...]) -> bool:
        return any(r in self.roles for r in roles)

    def has_all(self, roles: tuple[str, ...]) -> bool:
        return all(r in self.roles for r in roles)
