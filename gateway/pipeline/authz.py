"""Route policy: public | optional | required, plus roles (any of) and roles_all (all of)."""

from __future__ import annotations

from gateway.config.model import Route
from gateway.errors import InsufficientScope, MissingToken
from gateway.tokens.claims import Identity


def authorize(route: Route, identity: Identity | None) -> None:
    """Raises unless `identity` may use `route`. Anonymous is fine on public and optional routes."""
    if identity is None:
        if route.auth == "required":
            raise MissingToken()
        return
    if route.roles and not identity.has_any(route.roles):
        raise InsufficientScope(f"This route requires one of the roles: {', '.join(route.roles)}.")
    if route.roles_all and not identity.has_all(route.roles_all):
        raise InsufficientScope(f"This route requires all of the roles: {', '.join(route.roles_all)}.")
