"""Typed per-request state shared by the pipeline, the API handlers and the access log."""

from __future__ import annotations

from aiohttp import web

from gateway.tokens.claims import Identity

REQUEST_ID = web.RequestKey("request_id", str)
ROUTE_NAME = web.RequestKey("route_name", str)
IDENTITY = web.RequestKey("identity", Identity)
UPSTREAM_DURATION = web.RequestKey("upstream_duration", float)
#: Why an access token was refused (metrics label), set where the refusal happens.
AUTH_FAILURE = web.RequestKey("auth_failure", str)
