"""The handler every proxied request runs: route -> authenticate -> authorize -> identity -> proxy."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

from gateway.clock import Clock
from gateway.config.model import GatewayConfig, Route
from gateway.errors import AuthError, TokenRevoked
from gateway.pipeline.authn import Authenticator
from gateway.pipeline.authz import authorize
from gateway.pipeline.identity import HeaderPlan
from gateway.pipeline.proxy import Balancer, Proxy
from gateway.pipeline.router import Router
from gateway.request_state import (
    AUTH_FAILURE,
    IDENTITY,
    PENDING_COOKIES,
    REQUEST_ID,
    ROUTE_NAME,
    PendingCookies,
)
from gateway.tokens.claims import Identity
from gateway.tokens.signer import KeyRing

_IDENTITY_TOKEN_CACHE = 10_000


@dataclass(frozen=True, slots=True)
class Renewed:
    """A session rotated during the request itself (browser silent refresh)."""

    identity: Identity
    access_token: str
    access_ttl: int
    refresh_token: str
    refresh_ttl: int


class BrowserFlow(Protocol):
    """Browser routes: cookie sessions, inline refresh and the sign-in redirect."""

    async def renew(self, request: web.Request) -> Renewed | None:
        """Rotate the session from the refresh cookie; None when there is nothing to renew."""
        ...

    def sign_in_redirect(self, request: web.Request) -> web.StreamResponse | None:
        """A redirect to sign-in for a person's page load; None for API-style requests."""
        ...

    def apply(self, response: web.StreamResponse, renewed: Renewed) -> None:
        """Set the renewed session's cookies on the response (before it is sent)."""
        ...


@dataclass(slots=True)
class Edge:
    config: GatewayConfig
    router: Router
    authn: Authenticator
    plan: HeaderPlan
    proxy: Proxy
    keyring: KeyRing
    clock: Clock
    browser: BrowserFlow | None = None
    #: Strict per-request session check for routes with `check_session: true`.
    session_active: Callable[[str], Awaitable[bool]] | None = None
    balancers: dict[str, Balancer] = field(default_factory=dict)
    _identity_tokens: dict[tuple[str, str], tuple[str, float]] = field(default_factory=dict)
    _access_cookie: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        for route in self.router.routes():
            self.balancers[route.name] = Balancer(route.upstream, self.clock)
        self._access_cookie = self.config.cookies.access_name if self.config.cookies.enabled else None

    async def handle(self, request: web.Request, path: str) -> web.StreamResponse:
        """Serve a request whose path `dispatch` has already normalised."""
        match = self.router.match(request.method, path, request.headers.get("Host"))
        route = match.route
        request[ROUTE_NAME] = route.name
        identity: Identity | None = None
        renewed: Renewed | None = None
        try:
            if route.auth != "public":
                identity, renewed = await self._identify(request, route)
                if identity is not None:
                    request[IDENTITY] = identity
                if renewed is not None and self.browser is not None:
                    # Set on an error answer too (the middleware): see PendingCookies.
                    browser, fresh = self.browser, renewed
                    request[PENDING_COOKIES] = PendingCookies(lambda r: browser.apply(r, fresh))
            authorize(route, identity)
        except AuthError as e:
            # A person loading a page is sent to sign in instead of being shown a 401.
            if e.status == 401 and route.browser and self.browser is not None:
                redirect = self.browser.sign_in_redirect(request)
                if redirect is not None:
                    return redirect
            raise
        if (identity is not None and route.check_session and self.session_active is not None
                and not await self.session_active(identity.sid)):
            request[AUTH_FAILURE] = TokenRevoked.code
            raise TokenRevoked()
        headers = self.plan.build(
            request.headers, route, identity, peer=request.remote, scheme=request.scheme,
            request_id=request[REQUEST_ID],
            identity_token=self._identity_token(identity, route) if identity else None,
        )
        extra_headers = {"X-Request-Id": request[REQUEST_ID]}
        if route.browser and identity is not None:
            # Signed-in pages must not be replayed from cache (back button after sign-out).
            extra_headers["Cache-Control"] = "no-store"
            extra_headers["Vary"] = "Cookie"
        response = await self.proxy.forward(
            request, route, self.balancers[route.name], match.upstream_path, headers,
            extra_headers, identity,
            on_prepare=(lambda r: self.browser.apply(r, renewed))  # type: ignore[union-attr]
            if renewed is not None else None,
        )
        return response

    async def _identify(
        self, request: web.Request, route: Route
    ) -> tuple[Identity | None, Renewed | None]:
        bearer = request.headers.getall("Authorization", [])
        browser = self.browser if route.browser else None
        token = self.authn.credential(bearer, request.cookies,
                                      self._access_cookie if browser else None)
        error: AuthError | None = None
        if token is not None:
            try:
                return self.authn.verify(token), None
            except AuthError as e:
                request[AUTH_FAILURE] = e.code
                if browser is None or bearer:
                    raise
                error = e
        if browser is not None and not bearer:
            # Expired or absent access cookie: rotate the session inside this very request.
            renewed = await browser.renew(request)
            if renewed is not None:
                return renewed.identity, renewed
        if error is not None:
            raise error
        return None, None

    def _identity_token(self, identity: Identity, route: Route) -> str | None:
        if not route.identity_token:
            return None
        key = (identity.jti, route.name)
        cached = self._identity_tokens.get(key)
        now = self.clock.now()
        if cached is not None and cached[1] - now > 5:
            return cached[0]
        if len(self._identity_tokens) >= _IDENTITY_TOKEN_CACHE:
            self._identity_tokens.clear()
        token, exp = self.keyring.identity_token(identity, route.name)
        self._identity_tokens[key] = (token, exp)
        return token
