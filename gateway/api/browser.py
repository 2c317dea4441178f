"""Browser sign-in: the sign-in and sign-out pages, cookie sessions and inline silent refresh.

A person on a `browser: true` route never handles a token: the access token rides in an HttpOnly
SameSite=Lax cookie, the refresh token in another (Path=/ so that an expired access cookie can be
renewed inside the request that found it expired). Both are stripped before any upstream.
"""

from __future__ import annotations

import hmac
import html
import re
import secrets
from collections.abc import Awaitable, Callable
from urllib.parse import quote, unquote, urlsplit

from aiohttp import web

from gateway.api.auth import AuthApi
from gateway.clock import Clock
from gateway.config.model import GatewayConfig
from gateway.errors import (
    InvalidCredentials,
    RateLimited,
    RefreshError,
    StoreUnavailable,
    VerifierUnavailable,
)
from gateway.pipeline.edge import Renewed
from gateway.tokens.service import TokenPair
from gateway.tokens.signer import KeyRing

_CONTROL = re.compile(r"[\x00-\x20\x7f\\]")
#: Once decoded (by a browser, an app or a second redirect), an encoded space is harmless;
#: encoded controls and backslashes are not.
_DECODED_BAD = re.compile(r"[\x00-\x1f\x7f\\]")
#: Kept literally in a return target; anything else (non-ASCII, quotes, <>) is percent-encoded
#: so the Location header stays plain ASCII.
_URL_SAFE = "/?#[]@!$&'()*+,;=:%~"
#: allowed_return_hosts that can be named in the CSP header as they are.
_CSP_HOST = re.compile(r"^[a-z0-9.-]+(:\d{1,5})?$")
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def safe_return(target: str | None, allowed_hosts: frozenset[str]) -> str:
    """A same-origin relative path (or a URL on an allowed host); anything else becomes `/`."""
    if not target or len(target) > 2048 or _CONTROL.search(target):
        return "/"
    decoded = unquote(unquote(target))
    if _DECODED_BAD.search(decoded) or decoded.startswith("//"):
        return "/"
    try:
        parts = urlsplit(target)
        hostname = parts.hostname
    except ValueError:  # `http://[`: not a URL at all
        return "/"
    if target.startswith("/") and not target.startswith("//") and not parts.scheme and not parts.netloc:
        return quote(target, safe=_URL_SAFE)
    if parts.scheme in ("https", "http") and hostname and not parts.username:
        host = parts.netloc.lower()
        if host in allowed_hosts or hostname in allowed_hosts:
            return quote(target, safe=_URL_SAFE)
    return "/"


class Browser:
    def __init__(self, config: GatewayConfig, api: AuthApi, keyring: KeyRing, clock: Clock):
        self._config = config
        self._cookies = config.cookies
        self._prefix = config.auth.prefix
        self._api = api
        self._keyring = keyring
        self._clock = clock
        self._allowed = frozenset(h.lower() for h in config.auth.allowed_return_hosts)
        # form-action also governs the redirect after the POST: allowed return hosts need it.
        targets = " ".join(sorted(h for h in self._allowed if _CSP_HOST.match(h)))
        self._page_headers = {
            **_PAGE_HEADERS,
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                       f"form-action 'self' {targets}".rstrip()
                                       + "; frame-ancestors 'none'; base-uri 'none'",
        }

    def routes(self) -> dict[str, dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]]:
        p = self._prefix
        return {
            f"{p}/sign-in": {"GET": self.sign_in_page, "POST": self.sign_in},
            f"{p}/sign-out": {"GET": self.sign_out, "POST": self.sign_out},
        }

    # --- the edge hooks (BrowserFlow) -------------------------------------------------------
    async def renew(self, request: web.Request) -> Renewed | None:
        token = request.cookies.get(self._cookies.session_name)
        if not token:
            return None
        try:
            pair = await self._api.service.refresh(token, self._api.client(request))
        except RefreshError:
            return None  # the person signs in again; the redirect clears the stale cookies
        identity = self._keyring.verify(pair.access_token)
        return Renewed(identity, pair.access_token, pair.expires_in, pair.refresh_token,
                       pair.refresh_expires_in)

    def sign_in_redirect(self, request: web.Request) -> web.StreamResponse | None:
        if not _is_page_load(request):
            return None
        target = quote(request.raw_path, safe="/?&=%:@!$'()*+,;~-._")
        response = web.Response(status=302, headers={
            "Location": f"{self._prefix}/sign-in?return={quote(target, safe='')}",
            "Cache-Control": "no-store",
        })
        self._clear(response)
        return response

    def apply(self, response: web.StreamResponse, renewed: Renewed) -> None:
        self._set_session(response, renewed.access_token, renewed.access_ttl,
                          renewed.refresh_token, renewed.refresh_ttl)

    # --- cookies ----------------------------------------------------------------------------
    def _cookie(self, response: web.StreamResponse, name: str, value: str, max_age: int,
                path: str, samesite: str) -> None:
        response.set_cookie(name, value, max_age=max_age, path=path, secure=self._cookies.secure,
                            httponly=True, samesite=samesite, domain=self._cookies.domain)

    def _set_session(self, response: web.StreamResponse, access: str, access_ttl: int,
                     refresh: str, refresh_ttl: int) -> None:
        c = self._cookies
        self._cookie(response, c.access_name, access, access_ttl, "/", "Lax")
        self._cookie(response, c.session_name, refresh, refresh_ttl, "/", "Lax")

    def _clear(self, response: web.StreamResponse) -> None:
        c = self._cookies
        for name, path in ((c.access_name, "/"), (c.session_name, "/"),
                           (c.refresh_name, self._prefix)):
            response.del_cookie(name, path=path, domain=c.domain)

    # --- pages --------------------------------------------------------------------------------
    async def sign_in_page(self, request: web.Request) -> web.Response:
        return_to = safe_return(request.query.get("return"), self._allowed)
        return self._render_sign_in(return_to, message=None, status=200)

    def _render_sign_in(self, return_to: str, message: str | None, status: int,
                        username: str = "") -> web.Response:
        csrf = secrets.token_urlsafe(24)
        body = _SIGN_IN.format(
            action=html.escape(f"{self._prefix}/sign-in"), csrf=csrf,
            return_to=html.escape(return_to), username=html.escape(username),
            message=(f'<p class="error" role="alert" id="error">{html.escape(message)}</p>'
                     if message else ""),
            described='aria-describedby="error"' if message else "",
            # After a failed attempt the username is kept: the password is what to type next.
            focus_username="" if username else "autofocus",
            focus_password="autofocus" if username else "",
        )
        response = web.Response(status=status, text=body, content_type="text/html",
                                headers=self._page_headers)
        response.set_cookie(self._cookies.csrf_name, csrf, path=self._prefix, httponly=True,
                            secure=self._cookies.secure, samesite="Strict",
                            domain=self._cookies.domain)
        return response

    async def sign_in(self, request: web.Request) -> web.StreamResponse:
        fields = await self._api.fields(request)
        return_to = safe_return(fields.get("return"), self._allowed)
        expected = request.cookies.get(self._cookies.csrf_name, "")
        # Compared as bytes: compare_digest refuses (raises on) non-ASCII str.
        if not expected or not hmac.compare_digest(
                expected.encode("utf-8", "surrogatepass"),
                fields.get("csrf", "").encode("utf-8", "surrogatepass")):
            return self._render_sign_in(return_to, "Your sign-in form expired. Please try again.",
                                        403)
        username, password = fields.get("username", ""), fields.get("password", "")
        if not username or not password:
            return self._render_sign_in(return_to, "Enter your username and password.", 400,
                                        username)
        try:
            pair = await self._api.service.login(username, password, self._api.client(request))
        except InvalidCredentials:
            return self._render_sign_in(return_to, "Wrong username or password.", 401, username)
        except RateLimited as e:
            response = self._render_sign_in(
                return_to, f"Too many attempts. Try again in {e.retry_after} seconds.", 429,
                username)
            response.headers["Retry-After"] = str(e.retry_after)
            return response
        except (StoreUnavailable, VerifierUnavailable):
            return self._render_sign_in(
                return_to, "Sign-in is unavailable right now. Please try again shortly.", 503,
                username)
        return self._signed_in(pair, return_to)

    def _signed_in(self, pair: TokenPair, return_to: str) -> web.StreamResponse:
        response = web.Response(status=303, headers={"Location": return_to,
                                                     "Cache-Control": "no-store"})
        self._set_session(response, pair.access_token, pair.expires_in, pair.refresh_token,
                          pair.refresh_expires_in)
        response.del_cookie(self._cookies.csrf_name, path=self._prefix, domain=self._cookies.domain)
        return response

    async def sign_out(self, request: web.Request) -> web.StreamResponse:
        c = self._cookies
        tokens = [t for name in (c.session_name, c.refresh_name) if (t := request.cookies.get(name))]
        access, sid = request.cookies.get(c.access_name), None
        if access:
            try:
                sid = self._api.authn.verify(access).sid
            except Exception:  # noqa: BLE001 - an expired or bad cookie has nothing to revoke
                sid = None
        await self._api.service.logout(tokens, sid)
        target = self._config.auth.sign_out_redirect
        if target:
            response: web.StreamResponse = web.Response(
                status=303, headers={"Location": target, "Cache-Control": "no-store"})
        else:
            response = web.Response(text=_SIGNED_OUT.format(
                sign_in=html.escape(f"{self._prefix}/sign-in")), content_type="text/html",
                headers=self._page_headers)
        self._clear(response)
        return response


def _is_page_load(request: web.Request) -> bool:
    """A person navigating (not fetch/XHR), who can follow a redirect to a page."""
    if request.method not in ("GET", "HEAD"):
        return False
    if request.headers.get("X-Requested-With"):
        return False
    mode = request.headers.get("Sec-Fetch-Mode")
    if mode is not None and mode != "navigate":
        return False
    return "text/html" in request.headers.get("Accept", "")


_STYLE = """
*{box-sizing:border-box}body{margin:0;font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
sans-serif;background:#f4f5f7;color:#1b1f24;display:flex;min-height:100vh;align-items:center;
justify-content:center;padding:1rem}main{background:#fff;border-radius:12px;padding:2rem;
width:100%;max-width:24rem;box-shadow:0 2px 12px rgba(0,0,0,.08)}h1{font-size:1.5rem;
margin:0 0 1.25rem}label{display:block;font-weight:600;margin:1rem 0 .35rem}input{width:100%;
padding:.7rem .8rem;font:inherit;border:1px solid #8a94a3;border-radius:8px}input:focus{
outline:3px solid #2f6feb;outline-offset:1px;border-color:#2f6feb}button{margin-top:1.5rem;
width:100%;padding:.8rem;font:inherit;font-weight:600;color:#fff;background:#1f5fd6;border:0;
border-radius:8px;cursor:pointer}button:focus{outline:3px solid #0b3a91;outline-offset:2px}
.error{background:#fdecec;color:#8a1c1c;border:1px solid #f3b4b4;border-radius:8px;
padding:.7rem .8rem;margin:0 0 .5rem}a{color:#1f5fd6}
@media (prefers-color-scheme:dark){body{background:#15181d;color:#e6e8eb}main{background:#1f242b}
input{background:#15181d;color:#e6e8eb;border-color:#5b6572}.error{background:#3a1717;
color:#ffd0d0;border-color:#7a2d2d}a{color:#8ab4ff}}
"""

_SIGN_IN = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign in</title><style>""" + _STYLE.replace("{", "{{").replace("}", "}}") + """</style></head>
<body><main><h1>Sign in</h1>{message}
<form method="post" action="{action}" novalidate>
<input type="hidden" name="csrf" value="{csrf}">
<input type="hidden" name="return" value="{return_to}">
<label for="username">Username</label>
<input id="username" name="username" type="text" autocomplete="username" autocapitalize="none"
 spellcheck="false" required value="{username}" {described} {focus_username}>
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required
 {described} {focus_password}>
<button type="submit">Sign in</button>
</form></main></body></html>
"""

_SIGNED_OUT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Signed out</title><style>""" + _STYLE.replace("{", "{{").replace("}", "}}") + """</style></head>
<body><main><h1>You are signed out</h1>
<p>Your session has ended on this device.</p>
<p><a href="{sign_in}">Sign in again</a></p></main></body></html>
"""
