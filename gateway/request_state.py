"""Typed per-request state shared by the pipeline, the API handlers and the access log."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from gateway.tokens.claims import Identity

REQUEST_ID = web.RequestKey("request_id", str)
ROUTE_NAME = web.RequestKey("route_name", str)
IDENTITY = web.RequestKey("identity", Identity)
UPSTREAM_DURATION = web.RequestKey("upstream_duration", float)
#: Why an access token was refused (metrics label), set where the refusal happens.
AUTH_FAILURE = web.RequestKey("auth_failure", str)


@dataclass(frozen=True, slots=True)
class PendingCookies:
    """Cookies this request must send back whatever its answer: a browser session rotated on
    the way has spent the old refresh cookie, so an error that drops them signs the user out."""

    apply: Callable[[web.StreamResponse], None]


PENDING_COOKIES = web.RequestKey("pending_cookies", PendingCookies)
