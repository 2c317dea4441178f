"""Browser sign-in in-process: return-target validation, the redirect-or-401 choice, the sign-in
and sign-out pages, cookie attributes, inline silent refresh and parallel renewals at expiry."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import textwrap
import time
from collections.abc import Callable
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urljoin, urlsplit

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.browser import safe_return
from gateway.app import create_app
from gateway.clock import FakeClock
from gateway.config import load_config_text
from tests.conftest import PASSWORD, gateway_yaml
from tests.support.browser import write_cheap_users
from tests.support.ports import free_port
from tests.support.upstream import Upstream

GOOD = frozenset({"good.example", "apps.example:8443"})
PAGE = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
NAV = {**PAGE, "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Site": "none"}


# --- safe_return ---------------------------------------------------------------------------

@pytest.mark.parametrize("target", [
    "/", "/app", "/app/", "/app/page?x=1&y=%20z#frag", "/a/b;c=d", "/%7Euser",
    "/app?next=//evil.example",  # a query is the app's business: the path is ours
    "/app?return=https://evil.example",
])
def test_safe_return_keeps_same_origin_paths(target):
    assert safe_return(target, frozenset()) == target


@pytest.mark.parametrize("target", [
    None, "", " ", "app", "evil.example", "evil.example/app", "?x=1", "#frag", ".", "./app",
    # scheme-relative and its spellings
    "//evil.example", "///evil.example", "////evil.example", "//evil.example/app",
    "/\\evil.example", "\\\\evil.example", "\\/evil.example", "/\\/evil.example",
    # schemes, with and without slashes
    "https:evil.example", "http:evil.example", "https:/evil.example", "https:\\\\evil.example",
    "https://evil.example", "http://evil.example/app", "HTTPS://EVIL.EXAMPLE",
    "javascript:alert(1)", "JavaScript:alert(1)", "data:text/html,<script>alert(1)</script>",
    "ftp://good.example/", "ws://good.example/",
    # encoded slashes and backslashes, once and twice
    "/%2F%2Fevil.example", "/%2f%2fevil.example", "%2F%2Fevil.example", "/%2Fevil.example",
    "/%5Cevil.example", "/%5cevil.example", "%5C%5Cevil.example", "/%252F%252Fevil.example",
    "/%252Fevil.example", "%252F%252Fevil.example", "/%5C%2Fevil.example",
    # whitespace and control characters, literal and encoded (browsers drop tabs/newlines)
    "/\t/evil.example", "/\n/evil.example", "/\r/evil.example", "\t//evil.example",
    " //evil.example", "/ /evil.example", "/%09/evil.example", "/%0A/evil.example",
    "/%0d%0a/evil.example", "/app\r\nSet-Cookie: x=1", "/app%0D%0ASet-Cookie:%20x=1",
    "/\x00/evil.example", "/%00/evil.example", "/\x7f/evil.example", "/\x0b/evil.example",
    # credentials in the authority, either way round
    "https://evil.example@good.example", "https://good.example@evil.example",
    "https://good.example:443@evil.example", "https://good.example%40evil.example",
    "https://good.example\\@evil.example", "https://user:pw@good.example/",
    # lookalikes of an allowed host
    "https://good.example.evil.example/", "https://evilgood.example/", "https://good.examplex/",
    "https://evil.example/?good.example", "https://evil.example/#good.example",
    "https://apps.example:9999/",  # the allowed entry names a port
    "https://[::1]/", "https:///good.example",
    "/" + "a" * 2100,
])
def test_safe_return_rejects_other_origins(target):
    assert safe_return(target, GOOD) == "/"


@pytest.mark.parametrize("target", [
    "https://good.example/", "https://good.example/app?x=1#y", "http://good.example",
    "https://GOOD.example/app", "https://good.example:8443/", "https://apps.example:8443/x",
])
def test_safe_return_allows_configured_hosts(target):
    assert safe_return(target, GOOD) == target


def test_safe_return_percent_encodes_what_a_location_header_must_not_carry():
    assert safe_return("/café", frozenset()) == "/caf%C3%A9"
    assert safe_return('/a"b<c>', frozenset()) == "/a%22b%3Cc%3E"
    assert safe_return("/\u2028x", frozenset()) == "/%E2%80%A8x"


_PIECES = st.sampled_from([
    "/", "//", "\\", "%2F", "%2f", "%5C", "%5c", "%25", "%09", "%0A", "\t", "\n", " ", "@",
    ":", "https:", "http:", "javascript:", "evil.example", "good.example", "apps.example:8443",
    "?", "#", ".", "..", "%2e", "a", "\u3002", "\uff0f", "\x00",
])
_TARGETS = st.one_of(st.text(max_size=40), st.lists(_PIECES, max_size=8).map("".join))


def _on_allowed_host(result: str) -> bool:
    parts = urlsplit(result)
    return (parts.scheme in ("http", "https") and parts.username is None
            and (parts.netloc.lower() in GOOD or (parts.hostname or "") in GOOD))


@settings(max_examples=600, deadline=None)
@given(_TARGETS)
def test_safe_return_property(target):
    result = safe_return(target, GOOD)
    same_origin = result == "/" or (result.startswith("/") and result[1:2] not in ("/", "\\"))
    assert same_origin or _on_allowed_host(result), result
    # Plain printable ASCII only: nothing a browser strips, nothing that splits a header.
    assert all("\x21" <= c <= "\x7e" for c in result) and "\\" not in result, result
    # Where a browser on the gateway's page goes when sent there.
    netloc = urlsplit(urljoin("http://gateway.test/auth/sign-in", result)).netloc.lower()
    assert netloc == "gateway.test" or _on_allowed_host(result), result


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="\\"),
               max_size=40))
def test_safe_return_property_keeps_plain_paths(tail):
    """Any encoded path segment without controls or backslashes survives unchanged."""
    target = "/app/" + quote(tail, safe="")
    assert safe_return(target, frozenset()) == target


# --- an in-process gateway with browser routes ----------------------------------------------

ROUTES = """\
- {{name: app, path: /app, upstream: {url}, auth: required, browser: true}}
- {{name: ws, path: /ws, upstream: {url}, auth: required, browser: true}}
- {{name: api, path: /api, upstream: {url}, auth: required}}
"""


def _extra(*, secure: bool = False, auth: str = "", sign_out_redirect: str | None = None) -> str:
    lines = [f"cookies: {{enabled: true, secure: {str(secure).lower()}}}", "auth:"]
    lines.append("  rate_limit: {window: 5m, per_user: 3, per_ip: 100}")
    lines.append("  allowed_return_hosts: [good.example]")
    if sign_out_redirect:
        lines.append(f"  sign_out_redirect: {sign_out_redirect}")
    if auth:
        lines.append(textwrap.indent(auth, "  "))
    return "\n".join(lines) + "\n"


TOKENS = "access_ttl: 60s\nrefresh_ttl: 1h\nreuse_grace: 1s\nleeway: 0s\n"


class Browserish:
    """A TestClient whose cookies the test controls explicitly (no jar), plus the clock."""

    def __init__(self, client: Any, clock: FakeClock, upstream: Upstream):
        self.client = client
        self.clock = clock
        self.upstream = upstream

    async def request(self, method: str, path: str, *, cookies: dict[str, str] | None = None,
                      headers: dict[str, str] | None = None, **kw: Any) -> aiohttp.ClientResponse:
        h = dict(headers or {})
        if cookies:
            h["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        r = await self.client.request(method, path, headers=h, allow_redirects=False, **kw)
        await r.read()
        return r

    async def sign_in_form(self, return_to: str = "/app/") -> tuple[str, str]:
        """GET the sign-in page: (csrf form field, csrf cookie)."""
        r = await self.request("GET", f"/auth/sign-in?return={quote(return_to, safe='')}",
                               headers=NAV)
        assert r.status == 200
        body = await r.text()
        field = re.search(r'name="csrf" value="([^"]+)"', body)
        assert field is not None
        return field.group(1), r.cookies["gw_csrf"].value

    async def sign_in(self, user: str = "alice", password: str = PASSWORD,
                      return_to: str = "/app/") -> aiohttp.ClientResponse:
        field, cookie = await self.sign_in_form(return_to)
        return await self.request(
            "POST", "/auth/sign-in", cookies={"gw_csrf": cookie},
            headers={**PAGE, "Origin": str(self.client.make_url("")).rstrip("/")},
            data={"csrf": field, "return": return_to, "username": user, "password": password})

    async def session(self) -> dict[str, str]:
        r = await self.sign_in()
        assert r.status == 303, await r.text()
        return {"gw_access": r.cookies["gw_access"].value,
                "gw_session": r.cookies["gw_session"].value}


@pytest.fixture(scope="module")
def cheap_users(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cheap_users(tmp_path_factory.mktemp("users") / "users.yaml", PASSWORD)


@pytest.fixture
def make_yaml(cheap_users: Path) -> Callable[..., str]:
    def make(upstream_url: str, **kwargs: Any) -> str:
        return gateway_yaml(upstream_url, cheap_users, **kwargs)

    return make


@pytest.fixture
def browser_gw(aiohttp_client, make_yaml, upstream) -> Callable[..., Any]:
    async def make(*, extra: str | None = None, tokens: str = TOKENS,
                   routes: str | None = None) -> Browserish:
        clock = FakeClock(time.time())
        text = make_yaml(upstream.url, routes=routes or ROUTES.format(url=upstream.url),
                         extra=extra if extra is not None else _extra(), tokens=tokens)
        config = load_config_text(text.replace("{port}", "0"), "test.yaml")
        client = await aiohttp_client(create_app(config, clock=clock),
                                      cookie_jar=aiohttp.DummyCookieJar())
        return Browserish(client, clock, upstream)

    return make


def _set_cookies(r: aiohttp.ClientResponse) -> dict[str, Any]:
    jar: SimpleCookie = SimpleCookie()
    for line in r.headers.getall("Set-Cookie", []):
        jar.load(line)
    return dict(jar)


# --- redirect or 401 --------------------------------------------------------------------------

async def test_page_load_without_session_redirects_to_sign_in_with_return(browser_gw):
    gw = await browser_gw()
    r = await gw.request("GET", "/app/reports?year=2024&q=a%20b", headers=NAV)
    assert r.status == 302
    location = urlsplit(r.headers["Location"])
    assert location.path == "/auth/sign-in"
    assert parse_qs(location.query)["return"] == ["/app/reports?year=2024&q=a%20b"]
    assert r.headers["Cache-Control"] == "no-store"
    assert gw.upstream.received == []
    # The sign-in page carries that target in its form.
    r = await gw.request("GET", r.headers["Location"], headers=NAV)
    assert 'name="return" value="/app/reports?year=2024&amp;q=a%20b"' in await r.text()


@pytest.mark.parametrize("headers", [
    {"Accept": "application/json"},
    {"Accept": "*/*"},
    {},
    {**PAGE, "X-Requested-With": "XMLHttpRequest"},
    {**PAGE, "Sec-Fetch-Mode": "cors"},
    {**PAGE, "Sec-Fetch-Mode": "same-origin"},
    {**PAGE, "Sec-Fetch-Mode": "no-cors"},
], ids=["json", "any", "none", "xhr", "fetch-cors", "fetch-same-origin", "fetch-no-cors"])
async def test_api_style_requests_still_get_json_401(browser_gw, headers):
    gw = await browser_gw()
    r = await gw.request("GET", "/app/data", headers=headers)
    assert r.status == 401
    assert (await r.json())["error"] == "missing_token"
    assert r.headers["WWW-Authenticate"].startswith("Bearer ")
    assert "Location" not in r.headers


async def test_a_form_post_and_a_non_browser_route_get_json_401(browser_gw):
    gw = await browser_gw()
    r = await gw.request("POST", "/app/save", headers=NAV, data={"x": "1"})
    assert r.status == 401 and "Location" not in r.headers
    r = await gw.request("GET", "/api/page", headers=NAV)
    assert r.status == 401 and "Location" not in r.headers


# --- the sign-in page -------------------------------------------------------------------------

async def test_sign_in_page_is_self_contained_accessible_and_carries_a_csrf_token(browser_gw):
    gw = await browser_gw()
    r = await gw.request("GET", "/auth/sign-in?return=%2Fapp%2F", headers=NAV)
    assert r.status == 200
    assert r.content_type == "text/html"
    body = await r.text()
    # no external assets, no script: works without JavaScript, nothing fetched from elsewhere
    assert not re.search(r"<(script|link|img|iframe)\b|\bsrc=|url\(|@import|https?://", body)
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "form-action 'self'" in csp
    assert "frame-ancestors 'none'" in csp and r.headers["X-Frame-Options"] == "DENY"
    assert r.headers["Cache-Control"] == "no-store"
    # a phone can read it; every field has a label; the form posts back here
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in body
    assert '<html lang="en">' in body and "<title>Sign in</title>" in body
    assert '<form method="post" action="/auth/sign-in"' in body
    for field in ("username", "password"):
        assert f'<label for="{field}">' in body and f'id="{field}"' in body
    assert 'autocomplete="current-password"' in body and 'type="password"' in body
    token = re.search(r'name="csrf" value="([^"]+)"', body)
    assert token is not None and len(token.group(1)) >= 24
    csrf = _set_cookies(r)["gw_csrf"]
    assert csrf.value == token.group(1)
    assert csrf["httponly"] and csrf["samesite"] == "Strict" and csrf["path"] == "/auth"
    assert 'name="return" value="/app/"' in body


async def test_sign_in_page_drops_a_foreign_return_target(browser_gw):
    gw = await browser_gw()
    for evil in ("//evil.example/", "https://evil.example/", "/%2F%2Fevil.example"):
        r = await gw.request("GET", f"/auth/sign-in?return={quote(evil, safe='')}", headers=NAV)
        assert 'name="return" value="/"' in await r.text()


async def test_allowed_return_hosts_are_named_in_form_action(browser_gw):
    gw = await browser_gw()
    r = await gw.request("GET", "/auth/sign-in", headers=NAV)
    assert "form-action 'self' good.example;" in r.headers["Content-Security-Policy"]


async def test_sign_in_sets_httponly_lax_cookies_and_redirects_back(browser_gw):
    gw = await browser_gw()
    r = await gw.sign_in(return_to="/app/reports?y=1")
    assert r.status == 303
    assert r.headers["Location"] == "/app/reports?y=1"
    assert r.headers["Cache-Control"] == "no-store"
    cookies = _set_cookies(r)
    access, session = cookies["gw_access"], cookies["gw_session"]
    for c in (access, session):
        assert c["httponly"] and c["samesite"] == "Lax" and c["path"] == "/"
        assert not c["secure"]  # secure: false in this config (plain-http loopback)
    assert access["max-age"] == "60"
    assert int(session["max-age"]) == 3600
    assert cookies["gw_csrf"]["max-age"] == "0"  # the one-time form token is spent
    assert "gw_refresh" not in cookies  # API logins' cookie (Path=/auth) is not used here
    # The session works on the browser route; the upstream never sees the gateway's cookies.
    r = await gw.request("GET", "/app/reports?y=1", headers=NAV, cookies={
        "gw_access": access.value, "gw_session": session.value, "theme": "dark"})
    assert r.status == 200
    got = gw.upstream.last
    assert got.header("X-User-Id") == "alice"
    assert got.header("Cookie") == "theme=dark"
    assert r.headers["Cache-Control"] == "no-store"


async def test_secure_cookies_when_configured(browser_gw):
    gw = await browser_gw(extra=_extra(secure=True))
    cookies = _set_cookies(await gw.sign_in())
    assert cookies["gw_access"]["secure"] and cookies["gw_session"]["secure"]


async def test_sign_in_post_validates_the_return_target_again(browser_gw):
    gw = await browser_gw()
    for evil in ("//evil.example", "/\\evil.example", "https://evil.example@good.example",
                 "%2F%2Fevil.example", "/%09/evil.example"):
        r = await gw.sign_in(return_to=evil)
        assert r.status == 303 and r.headers["Location"] == "/", evil
    r = await gw.sign_in(return_to="https://good.example/home")
    assert r.headers["Location"] == "https://good.example/home"


async def test_wrong_password_shows_a_clear_message(browser_gw):
    gw = await browser_gw()
    r = await gw.sign_in(password="wrong password")
    assert r.status == 401
    assert r.content_type == "text/html"
    body = await r.text()
    assert '<p class="error" role="alert" id="error">Wrong username or password.</p>' in body
    assert 'aria-describedby="error"' in body
    assert 'value="alice"' in body  # the username is kept, the password is not
    assert re.search(r'<input id="password"[^>]*autofocus', body)
    assert "wrong password" not in body
    assert "gw_session" not in _set_cookies(r) and "gw_access" not in _set_cookies(r)
    # a fresh CSRF token comes with the re-rendered form
    assert re.search(r'name="csrf" value="([^"]+)"', body).group(1) == r.cookies["gw_csrf"].value


async def test_unknown_user_gets_the_same_message(browser_gw):
    gw = await browser_gw()
    r = await gw.sign_in(user="nobody")
    assert r.status == 401 and "Wrong username or password." in await r.text()


async def test_rate_limited_sign_in_says_when_to_retry(browser_gw):
    gw = await browser_gw()  # per_user: 3
    for _ in range(3):
        assert (await gw.sign_in(password="nope")).status == 401
    r = await gw.sign_in()  # even the right password waits now
    assert r.status == 429
    body = await r.text()
    seconds = int(r.headers["Retry-After"])
    assert 0 < seconds <= 301
    assert f"Too many attempts. Try again in {seconds} seconds." in body
    assert 'role="alert"' in body
    assert "gw_session" not in _set_cookies(r)


@pytest.mark.parametrize("case", ["missing-field", "missing-cookie", "mismatch", "non-ascii"])
async def test_sign_in_without_a_matching_csrf_token_is_refused(browser_gw, case):
    gw = await browser_gw()
    field, cookie = await gw.sign_in_form()
    data = {"csrf": field, "return": "/app/", "username": "alice", "password": PASSWORD}
    cookies = {"gw_csrf": cookie}
    if case == "missing-field":
        del data["csrf"]
    elif case == "missing-cookie":
        cookies = {}
    elif case == "mismatch":
        cookies = {"gw_csrf": cookie + "x"}
    else:  # compare_digest raises on non-ASCII str: a 500 unless compared as bytes
        data["csrf"] = field[:-1] + "\u00e9"
    r = await gw.request("POST", "/auth/sign-in", cookies=cookies, headers=PAGE, data=data)
    assert r.status == 403
    assert "Your sign-in form expired. Please try again." in await r.text()
    assert "gw_session" not in _set_cookies(r)


async def test_empty_fields_are_asked_for(browser_gw):
    gw = await browser_gw()
    r = await gw.sign_in(password="")
    assert r.status == 400 and "Enter your username and password." in await r.text()


async def test_sign_in_is_get_and_post_only(browser_gw):
    gw = await browser_gw()
    r = await gw.request("PUT", "/auth/sign-in")
    assert r.status == 405 and (await r.json())["error"] == "method_not_allowed"


# --- inline silent refresh ------------------------------------------------------------------

@pytest.mark.parametrize("send_access", [True, False], ids=["expired-cookie", "no-cookie"])
async def test_expired_access_is_renewed_inside_the_same_request(browser_gw, send_access):
    gw = await browser_gw()
    cookies = await gw.session()
    r = await gw.request("GET", "/app/", headers=NAV, cookies=cookies)
    sid = gw.upstream.last.header("X-Session-Id")
    gw.clock.advance(61)
    sent = cookies if send_access else {"gw_session": cookies["gw_session"]}
    r = await gw.request("GET", "/app/page", headers=NAV, cookies=sent)
    assert r.status == 200
    got = gw.upstream.last
    assert got.path == "/app/page"
    assert got.header("X-User-Id") == "alice" and got.header("X-Session-Id") == sid
    assert "gw_" not in (got.header("Cookie") or "")
    new = _set_cookies(r)
    assert new["gw_access"].value != cookies["gw_access"]
    assert new["gw_session"].value != cookies["gw_session"]
    assert new["gw_access"]["httponly"] and new["gw_session"]["samesite"] == "Lax"
    assert r.headers["Cache-Control"] == "no-store"
    # The renewed pair is the live one.
    gw.clock.advance(30)
    r = await gw.request("GET", "/app/next", headers=NAV, cookies={
        "gw_access": new["gw_access"].value, "gw_session": new["gw_session"].value})
    assert r.status == 200 and "gw_session" not in _set_cookies(r)


async def test_fetch_at_expiry_is_renewed_too(browser_gw):
    gw = await browser_gw()
    cookies = await gw.session()
    gw.clock.advance(61)
    r = await gw.request("GET", "/app/api/x", cookies=cookies,
                         headers={"Accept": "application/json", "Sec-Fetch-Mode": "cors"})
    assert r.status == 200 and "gw_session" in _set_cookies(r)


async def test_parallel_requests_at_expiry_share_one_successor(browser_gw):
    gw = await browser_gw()
    cookies = await gw.session()
    gw.clock.advance(61)
    n = 12
    responses = await asyncio.gather(*(
        gw.request("GET", f"/app/api/item/{i}", cookies=cookies,
                   headers={"Accept": "application/json", "Sec-Fetch-Mode": "cors"})
        for i in range(n)))
    assert [r.status for r in responses] == [200] * n
    successors = {_set_cookies(r)["gw_session"].value for r in responses}
    assert len(successors) == 1  # every presenter of the old token got the same new one
    assert {rec.header("X-User-Id") for rec in gw.upstream.received[-n:]} == {"alice"}
    assert len({rec.header("X-Session-Id") for rec in gw.upstream.received[-n:]}) == 1
    # The session goes on: the successor rotates normally at the next expiry.
    successor = successors.pop()
    gw.clock.advance(61)
    r = await gw.request("GET", "/app/", headers=NAV, cookies={"gw_session": successor})
    assert r.status == 200
    latest = _set_cookies(r)["gw_session"].value
    # Reuse detection is real: the first token, shown again after the grace window, is theft,
    # and ends the whole session (the latest token stops working too).
    await asyncio.sleep(1.2)  # reuse_grace: 1s (kept in Redis in real time)
    r = await gw.request("GET", "/app/", headers=NAV, cookies={"gw_session": cookies["gw_session"]})
    assert r.status == 302 and r.headers["Location"].startswith("/auth/sign-in?")
    gw.clock.advance(61)
    r = await gw.request("GET", "/app/", headers=NAV, cookies={"gw_session": latest})
    assert r.status == 302


async def test_failed_renewal_sends_a_page_load_to_sign_in_and_clears_cookies(browser_gw):
    gw = await browser_gw()
    r = await gw.request("GET", "/app/", headers=NAV,
                         cookies={"gw_access": "not.a.jwt", "gw_session": "garbage"})
    assert r.status == 302 and r.headers["Location"] == "/auth/sign-in?return=%2Fapp%2F"
    cleared = _set_cookies(r)
    for name in ("gw_access", "gw_session"):
        assert cleared[name].value == "" and cleared[name]["max-age"] == "0"
        assert cleared[name]["path"] == "/"
    r = await gw.request("GET", "/app/", cookies={"gw_session": "garbage"},
                         headers={"Accept": "application/json"})
    assert r.status == 401


async def test_bearer_requests_are_never_renewed_from_cookies(browser_gw):
    gw = await browser_gw()
    cookies = await gw.session()
    gw.clock.advance(61)
    r = await gw.request("GET", "/app/", cookies={"gw_session": cookies["gw_session"]},
                         headers={"Authorization": f"Bearer {cookies['gw_access']}",
                                  "Accept": "application/json"})
    assert r.status == 401 and (await r.json())["error"] == "token_expired"
    assert "gw_session" not in _set_cookies(r)


async def test_non_browser_routes_ignore_the_cookies(browser_gw):
    gw = await browser_gw()
    cookies = await gw.session()
    r = await gw.request("GET", "/api/x", cookies=cookies, headers={"Accept": "application/json"})
    assert r.status == 401


@pytest.mark.parametrize("size", [15, 200_000], ids=["small", "streamed"])
async def test_identity_responses_are_not_cacheable_whatever_the_upstream_says(
        aiohttp_client, make_yaml, size):
    body = ("<h1>secret</h1>" * (size // 15 + 1))[:size]

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=body, content_type="text/html", headers={
            "Cache-Control": "public, max-age=3600", "Vary": "Accept-Encoding, Accept-Language"})

    up = web.Application()
    up.router.add_get("/{tail:.*}", page)
    server = await aiohttp_client(up)
    url = str(server.make_url("")).rstrip("/")
    text = make_yaml(url, routes=ROUTES.format(url=url), extra=_extra(), tokens=TOKENS)
    config = load_config_text(text.replace("{port}", "0"), "test.yaml")
    gw = Browserish(await aiohttp_client(create_app(config), cookie_jar=aiohttp.DummyCookieJar()),
                    FakeClock(), Upstream())
    cookies = await gw.session()
    r = await gw.request("GET", "/app/", headers=NAV, cookies=cookies)
    assert r.status == 200 and await r.text() == body
    assert r.headers["Cache-Control"] == "no-store"
    # A cache in front must still key on what the upstream varies on, and on the cookie.
    assert r.headers.getall("Vary") == ["Accept-Encoding, Accept-Language, Cookie"]


async def test_websocket_upgrade_that_renews_carries_the_new_cookies(browser_gw):
    gw = await browser_gw()
    cookies = await gw.session()
    gw.clock.advance(61)
    url = gw.client.make_url("/ws")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET /ws HTTP/1.1\r\nHost: {url.host}:{url.port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      f"Sec-WebSocket-Version: 13\r\nCookie: gw_session={cookies['gw_session']}"
                      "\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    lines = head.decode().split("\r\n")
    assert lines[0].startswith("HTTP/1.1 101")
    set_cookie = [line for line in lines if line.lower().startswith("set-cookie:")]
    names = {line.split(":", 1)[1].strip().split("=", 1)[0] for line in set_cookie}
    assert {"gw_access", "gw_session"} <= names
    assert gw.upstream.last.header("X-User-Id") == "alice"


# --- sign-out ---------------------------------------------------------------------------------

async def _wait_rejected(gw: Browserish, access: str) -> int:
    """Status of a request with the old access cookie once revocation has propagated (<= 3 s)."""
    status = 0
    for _ in range(60):
        r = await gw.request("GET", "/app/", cookies={"gw_access": access},
                             headers={"Accept": "application/json"})
        status = r.status
        if status == 401:
            break
        await asyncio.sleep(0.05)
    return status


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_sign_out_revokes_clears_and_shows_a_page(browser_gw, method):
    gw = await browser_gw()
    cookies = await gw.session()
    r = await gw.request(method, "/auth/sign-out", cookies=cookies, headers=NAV)
    assert r.status == 200 and r.content_type == "text/html"
    body = await r.text()
    assert "You are signed out" in body and 'href="/auth/sign-in"' in body
    assert r.headers["Cache-Control"] == "no-store"
    cleared = _set_cookies(r)
    for name in ("gw_access", "gw_session"):
        assert cleared[name].value == "" and cleared[name]["max-age"] == "0", name
    # The session is over server-side, not merely forgotten by this browser:
    r = await gw.request("GET", "/app/", headers=NAV, cookies={"gw_session": cookies["gw_session"]})
    assert r.status == 302 and r.headers["Location"].startswith("/auth/sign-in?")
    assert await _wait_rejected(gw, cookies["gw_access"]) == 401


async def test_sign_out_with_an_expired_access_cookie_still_ends_the_session(browser_gw):
    gw = await browser_gw()
    cookies = await gw.session()
    gw.clock.advance(61)
    r = await gw.request("POST", "/auth/sign-out", cookies=cookies, headers=NAV)
    assert r.status == 200
    r = await gw.request("GET", "/app/", headers=NAV, cookies={"gw_session": cookies["gw_session"]})
    assert r.status == 302


async def test_sign_out_redirect(browser_gw):
    gw = await browser_gw(extra=_extra(sign_out_redirect="https://www.example/bye"))
    cookies = await gw.session()
    r = await gw.request("GET", "/auth/sign-out", cookies=cookies, headers=NAV)
    assert r.status == 303 and r.headers["Location"] == "https://www.example/bye"
    assert _set_cookies(r)["gw_session"]["max-age"] == "0"


async def test_sign_out_without_a_session_is_harmless(browser_gw):
    gw = await browser_gw()
    r = await gw.request("GET", "/auth/sign-out", headers=NAV,
                         cookies={"gw_session": "garbage", "gw_access": "x.y.z"})
    assert r.status == 200 and "You are signed out" in await r.text()


@pytest.mark.parametrize(("path", "status"), [("/admin/", 403), ("/down/", 502)])
async def test_a_session_renewed_by_a_failing_request_keeps_its_new_cookies(
        browser_gw, upstream, path, status):
    """The expired access cookie is renewed inside the request, which spends the old session
    cookie; the error that ends the request (a missing role, a dead upstream) still carries the
    successors, or the browser's next request would present a spent token and be signed out."""
    dead = f"http://127.0.0.1:{free_port()}"
    gw = await browser_gw(routes=textwrap.dedent(f"""\
        - {{name: app, path: /app, upstream: {upstream.url}, auth: required, browser: true}}
        - {{name: admin, path: /admin, upstream: {upstream.url}, auth: required, browser: true,
            roles: [admin]}}
        - {{name: down, path: /down, upstream: {dead}, auth: required, browser: true}}
        """))
    cookies = await gw.session()  # alice, roles [user]
    gw.clock.advance(61)  # the access cookie has expired
    r = await gw.request("GET", path, headers=NAV, cookies=cookies)
    assert r.status == status
    fresh = _set_cookies(r)
    assert {"gw_access", "gw_session"} <= fresh.keys(), r.headers.getall("Set-Cookie", [])
    assert fresh["gw_session"].value != cookies["gw_session"]
    gw.clock.advance(2)  # past reuse_grace: the old session cookie is spent for good
    r = await gw.request("GET", "/app/", headers=NAV,
                         cookies={"gw_session": fresh["gw_session"].value})
    assert r.status == 200, r.headers.get("Location")
