"""The token endpoints under `auth.prefix`: login, refresh, token (RFC 6749), logout, sessions, me.

Thin: parse the request, call the token service, shape the response. Errors are raised, never
rendered here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from aiohttp import web

from gateway.config.model import GatewayConfig
from gateway.errors import (
    AuthError,
    BadRequest,
    CsrfRejected,
    InvalidCredentials,
    InvalidGrant,
    MissingToken,
    RefreshError,
    RequestTimeout,
    TokenRevoked,
    UnsupportedGrantType,
)
from gateway.pipeline.authn import Authenticator, bearer_token
from gateway.pipeline.forwarded import TrustedProxies, forwarded_for
from gateway.request_state import IDENTITY
from gateway.tokens.claims import Identity
from gateway.tokens.service import ClientInfo, TokenPair, TokenService

_MAX_FORM = 16 * 1024
_MAX_FIELD = 4096


class AuthApi:
    def __init__(self, config: GatewayConfig, service: TokenService, authn: Authenticator,
                 trusted: TrustedProxies):
        self._config = config
        self._cookies = config.cookies
        self._prefix = config.auth.prefix
        self._allowed_hosts = frozenset(h.lower() for h in config.auth.allowed_return_hosts)
        self.service = service
        self.authn = authn
        self.trusted = trusted

    def routes(self) -> list[web.RouteDef]:
        p = self._prefix
        return [
            web.post(f"{p}/login", self.login),
            web.post(f"{p}/refresh", self.refresh),
            web.post(f"{p}/token", self.token),
            web.post(f"{p}/logout", self.logout),
            web.post(f"{p}/logout-all", self.logout_all),
            web.get(f"{p}/sessions", self.sessions),
            web.get(f"{p}/me", self.me),
        ]

    # --- request helpers ------------------------------------------------------------------
    def client(self, request: web.Request) -> ClientInfo:
        ip = self.trusted.client_ip(request.remote, forwarded_for(request.headers))
        return ClientInfo(ip, request.headers.get("User-Agent", ""))

    async def fields(self, request: web.Request) -> dict[str, str]:
        """A small JSON object or urlencoded form as str -> str; anything else is a 400."""
        if request.content_length is not None and request.content_length > _MAX_FORM:
            raise BadRequest("The request body is too large.")
        raw = await self._body(request)
        kind = request.content_type
        try:
            if kind == "application/json":
                data = json.loads(raw) if raw else {}
                if not isinstance(data, dict):
                    raise BadRequest("The JSON body must be an object.")
                pairs: list[tuple[str, Any]] = list(data.items())
            elif kind in ("application/x-www-form-urlencoded", "") and raw:
                pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True,
                                  strict_parsing=False, max_num_fields=20)
                if len({k for k, _ in pairs}) != len(pairs):
                    raise BadRequest("A form field is repeated.")
            elif not raw:
                pairs = []
            else:
                raise BadRequest("Send application/json or application/x-www-form-urlencoded.")
        except (ValueError, UnicodeDecodeError, RecursionError):
            # RecursionError: JSON nested deeper than the parser's stack (`[[[[...`).
            raise BadRequest("The request body could not be parsed.") from None
        out: dict[str, str] = {}
        for key, value in pairs:
            if not isinstance(value, str):
                raise BadRequest(f"Field {key!r} must be a string.")
            if len(value) > _MAX_FIELD or "\x00" in value or not _encodable(value):
                raise BadRequest(f"Field {key!r} is not acceptable.")
            out[str(key)] = value
        return out

    async def _body(self, request: web.Request) -> bytes:
        # A body may arrive in several segments (or chunks): read to its end, bounded in size
        # and, per segment, by the listener's idle body timeout.
        parts: list[bytes] = []
        seen = 0
        while True:
            try:
                async with asyncio.timeout(self._config.listen.body_timeout):
                    chunk = await request.content.readany()
            except TimeoutError:
                raise RequestTimeout() from None
            if not chunk:
                return b"".join(parts)
            seen += len(chunk)
            if seen > _MAX_FORM:
                raise BadRequest("The request body is too large.")
            parts.append(chunk)

    def check_csrf(self, request: web.Request) -> None:
        """Cookie-authenticated state changes must come from our own pages."""
        if request.headers.get("X-Requested-With"):
            return  # a custom header cannot be sent cross-site without a CORS preflight
        host = (request.headers.get("Host") or "").lower()
        origin = request.headers.get("Origin")
        if origin and origin != "null":
            try:
                netloc = urlsplit(origin).netloc.lower()
            except ValueError:  # `http://[`: not an origin, so not ours
                netloc = ""
            if netloc and (netloc == host or netloc in self._allowed_hosts):
                return
        elif request.headers.get("Sec-Fetch-Site") in ("same-origin", "none"):
            return
        raise CsrfRejected("Cookie-authenticated requests must come from this site.")

    async def refresh_credential(self, request: web.Request, fields: Mapping[str, str]) -> str | None:
        token = fields.get("refresh_token")
        if token:
            return token
        if self._cookies.enabled:
            for name in (self._cookies.refresh_name, self._cookies.session_name):
                token = request.cookies.get(name)
                if token:
                    self.check_csrf(request)
                    return token
        return None

    def identity(self, request: web.Request, *, state_changing: bool) -> Identity:
        """The caller's verified access token (Bearer, or the access cookie with CSRF checks)."""
        token = bearer_token(request.headers.getall("Authorization", []))
        if token is None and self._cookies.enabled:
            token = request.cookies.get(self._cookies.access_name)
            if token and state_changing:
                self.check_csrf(request)
        if token is None:
            raise MissingToken()
        identity = self.authn.verify(token)
        request[IDENTITY] = identity
        return identity

    def token_response(self, pair: TokenPair) -> web.Response:
        response = web.json_response(pair.body())
        response.headers["Cache-Control"] = "no-store"
        response.headers["Pragma"] = "no-cache"
        if self._cookies.enabled:
            self.set_refresh_cookie(response, pair.refresh_token, pair.refresh_expires_in)
        return response

    def set_refresh_cookie(self, response: web.StreamResponse, token: str, max_age: int) -> None:
        response.set_cookie(
            self._cookies.refresh_name, token, max_age=max_age, path=self._prefix,
            secure=self._cookies.secure, httponly=True, samesite="Strict",
            domain=self._cookies.domain,
        )

    def clear_cookies(self, response: web.StreamResponse) -> None:
        if self._cookies.enabled:
            response.del_cookie(self._cookies.refresh_name, path=self._prefix,
                                domain=self._cookies.domain, secure=self._cookies.secure,
                                httponly=True, samesite="Strict")
            response.del_cookie(self._cookies.access_name, path="/", domain=self._cookies.domain,
                                secure=self._cookies.secure, httponly=True, samesite="Lax")

    # --- handlers ---------------------------------------------------------------------------
    async def login(self, request: web.Request) -> web.Response:
        fields = await self.fields(request)
        username, password = fields.get("username", ""), fields.get("password", "")
        if not username or not password:
            raise BadRequest("Both username and password are required.")
        pair = await self.service.login(username, password, self.client(request))
        return self.token_response(pair)

    async def refresh(self, request: web.Request) -> web.Response:
        fields = await self.fields(request)
        token = await self.refresh_credential(request, fields)
        if not token:
            raise BadRequest("A refresh_token is required.")
        pair = await self.service.refresh(token, self.client(request))
        return self.token_response(pair)

    async def token(self, request: web.Request) -> web.Response:
        """RFC 6749 §4.3 and §6: password and refresh_token grants, errors per §5.2."""
        if request.content_type != "application/x-www-form-urlencoded":
            raise BadRequest("The token endpoint takes application/x-www-form-urlencoded.")
        fields = await self.fields(request)
        grant = fields.get("grant_type")
        try:
            if grant == "password":
                username, password = fields.get("username"), fields.get("password")
                if not username or not password:
                    raise BadRequest("username and password are required.")
                pair = await self.service.login(username, password, self.client(request))
            elif grant == "refresh_token":
                token = fields.get("refresh_token")
                if not token:
                    raise BadRequest("refresh_token is required.")
                pair = await self.service.refresh(token, self.client(request))
            elif not grant:
                raise BadRequest("grant_type is required.")
            else:
                raise UnsupportedGrantType()
        except (InvalidCredentials, RefreshError) as e:
            raise InvalidGrant(e.description) from None
        response = web.json_response(pair.body())
        response.headers["Cache-Control"] = "no-store"
        response.headers["Pragma"] = "no-cache"
        return response

    async def logout(self, request: web.Request) -> web.Response:
        fields = await self.fields(request)
        token = await self.refresh_credential(request, fields)
        try:
            identity: Identity | None = self.identity(request, state_changing=True)
        except TokenRevoked:
            identity = None  # the session is already over: logging out again is done, not an error
        except AuthError:
            if token is None:
                raise  # nothing presented ends a session: the caller must know it is still in
            identity = None  # an expired access token beside a refresh token adds nothing to end
        await self.service.logout([token] if token else [], identity.sid if identity else None)
        response = web.Response(status=204)
        response.headers["Cache-Control"] = "no-store"
        self.clear_cookies(response)
        return response

    async def logout_all(self, request: web.Request) -> web.Response:
        identity = self.identity(request, state_changing=True)
        await self.service.revoke_user(identity.sub, "logout_all")
        response = web.Response(status=204)
        self.clear_cookies(response)
        return response

    async def sessions(self, request: web.Request) -> web.Response:
        identity = self.identity(request, state_changing=False)
        records = await self.service.sessions(identity.sub)
        body = {"sessions": [
            {
                "sid": r.sid, "created_at": r.created_ms // 1000,
                "last_used_at": r.last_used_ms // 1000, "expires_at": r.expires_ms // 1000,
                "user_agent": r.user_agent, "ip": r.ip, "current": r.sid == identity.sid,
            }
            for r in sorted(records, key=lambda r: r.created_ms)
        ]}
        response = web.json_response(body)
        response.headers["Cache-Control"] = "no-store"
        return response

    async def delete_session(self, request: web.Request) -> web.Response:
        identity = self.identity(request, state_changing=True)
        await self.service.revoke_own(identity, request.path.rsplit("/", 1)[-1])
        return web.Response(status=204)

    async def me(self, request: web.Request) -> web.Response:
        identity = self.identity(request, state_changing=False)
        response = web.json_response({
            "sub": identity.sub, "roles": list(identity.roles), "sid": identity.sid,
            "exp": int(identity.exp), **dict(identity.extra),
        })
        response.headers["Cache-Control"] = "no-store"
        return response


def _encodable(value: str) -> bool:
    """False for JSON strings with lone surrogates (`"\\ud800"`): not text, and they would fail
    later, deep in the token service, as a 500."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
