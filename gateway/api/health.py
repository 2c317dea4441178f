"""Liveness, readiness and the JWKS document."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.errors import GatewayError
from gateway.tokens.signer import KeyRing


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, headers={"Cache-Control": "no-store"})


def readyz(check: Callable[[], Awaitable[bool]]) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        try:
            ok = await check()
        except GatewayError:
            ok = False
        body = {"status": "ready" if ok else "unavailable", "session_store": ok}
        return web.json_response(body, status=200 if ok else 503,
                                 headers={"Cache-Control": "no-store"})

    return handler


def jwks(keyring: KeyRing, max_age: int) -> Callable[[web.Request], Awaitable[web.Response]]:
    body = json.dumps(keyring.jwks(), separators=(",", ":"), sort_keys=True).encode()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {
        "Cache-Control": f"public, max-age={max_age}",
        "ETag": etag,
        "Content-Type": "application/jwk-set+json",
    }

    async def handler(request: web.Request) -> web.Response:
        # RFC 9110 §13.1.2: a list of tags, compared weakly (caches may send W/"..." or several).
        candidates = {t.strip().removeprefix("W/")
                      for t in request.headers.get("If-None-Match", "").split(",")}
        if etag in candidates or "*" in candidates:
            return web.Response(status=304, headers={k: v for k, v in headers.items()
                                                     if k != "Content-Type"})
        return web.Response(body=body, headers=headers)

    return handler
