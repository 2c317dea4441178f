"""Browser sign-in in a real headless Chromium, against a real gateway process and redis-server,
in front of the demo app (which renders the identity headers and fires parallel fetches)."""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from tests.conftest import PASSWORD
from tests.e2e.conftest import ACCESS_TTL
from tests.support.gateway_process import GatewayProcess

pytestmark = pytest.mark.integration


def _cookies(context: Any) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in context.cookies()}


def _sign_in(page: Any, user: str = "alice", password: str = PASSWORD) -> None:
    """Fill and submit the sign-in form the page shows, the way a person does."""
    page.get_by_label("Username").fill(user)
    page.get_by_label("Password").fill(password)
    with page.expect_navigation():
        page.get_by_role("button", name="Sign in").click()


def _open_app(page: Any, gw: GatewayProcess, path: str = "/app/") -> None:
    """Sign in through the redirect and wait for the app page and its first fetches."""
    page.goto(gw.url + path)
    _sign_in(page)
    assert page.locator("#user").inner_text() == "alice"
    page.wait_for_function("document.querySelectorAll('#fetches li').length === 4")


def _wait_access_dropped(context: Any) -> None:
    """Until the browser has dropped the expired access cookie (Max-Age = access_ttl)."""
    deadline = time.monotonic() + ACCESS_TTL + 3
    while "gw_access" in _cookies(context):
        assert time.monotonic() < deadline, "the access cookie outlived its Max-Age"
        time.sleep(0.1)


def _audit_events(gw: GatewayProcess, name: str) -> int:
    count = 0
    for line in gw.logs().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == name:
            count += 1
    return count


def test_redirect_to_sign_in_and_back_to_the_original_page(gw, context, artifacts):
    page = context.new_page()
    original = "/app/?tab=reports&q=a%20b"
    response = page.goto(gw.url + original)
    url = urlsplit(page.url)
    assert url.path == "/auth/sign-in"
    assert parse_qs(url.query)["return"] == [original]
    assert response.status == 200
    assert page.title() == "Sign in"
    assert page.get_by_role("heading", name="Sign in").is_visible()
    page.screenshot(path=str(artifacts / "sign-in.png"))

    _sign_in(page)
    assert page.url == gw.url + original
    assert page.locator("#user").inner_text() == "alice"
    assert page.locator("#roles").inner_text() == "user"
    # The page's own parallel fetches went through with the same identity.
    page.wait_for_function("document.querySelectorAll('#fetches li').length === 4")
    assert page.locator("#fetches li").all_inner_texts() == ["200:alice"] * 4
    cookies = _cookies(context)
    for name in ("gw_access", "gw_session"):
        assert cookies[name]["httpOnly"] and cookies[name]["sameSite"] == "Lax"
        assert cookies[name]["path"] == "/"
    assert "gw_refresh" not in cookies and "gw_csrf" not in cookies
    assert "gw_" not in page.evaluate("document.cookie")  # out of reach of page scripts


def test_wrong_password_shows_a_message_and_the_form_still_works(gw, context):
    page = context.new_page()
    page.goto(gw.url + "/app/")
    _sign_in(page, password="not the password")
    alert = page.get_by_role("alert")
    assert alert.inner_text() == "Wrong username or password."
    assert urlsplit(page.url).path == "/auth/sign-in"
    assert page.get_by_label("Username").input_value() == "alice"
    assert page.get_by_label("Password").input_value() == ""
    assert page.evaluate("document.activeElement.id") == "password"  # what to type next
    assert "gw_session" not in _cookies(context)
    # The re-rendered form (with its fresh CSRF token) signs in and still goes back.
    _sign_in(page)
    assert page.url == gw.url + "/app/"
    assert page.locator("#user").inner_text() == "alice"


def test_sign_in_page_reads_well_on_a_phone(gw, chromium, artifacts):
    context = chromium.new_context(viewport={"width": 390, "height": 844},
                                   device_scale_factor=2, is_mobile=True, has_touch=True)
    try:
        page = context.new_page()
        page.goto(gw.url + "/auth/sign-in")
        layout = page.evaluate("""() => {
            const box = e => e.getBoundingClientRect();
            const input = document.getElementById('username');
            const button = document.querySelector('button');
            return {scroll: document.documentElement.scrollWidth, width: window.innerWidth,
                    input: [box(input).left, box(input).right],
                    button: [box(button).left, box(button).right, box(button).height],
                    font: parseFloat(getComputedStyle(input).fontSize)};
        }""")
        assert layout["scroll"] <= layout["width"]  # nothing to scroll sideways
        assert 0 <= layout["input"][0] and layout["input"][1] <= layout["width"]
        assert 0 <= layout["button"][0] and layout["button"][1] <= layout["width"]
        assert layout["button"][2] >= 44  # a comfortable touch target
        assert layout["font"] >= 16  # phones do not zoom into the field on focus
        page.screenshot(path=str(artifacts / "sign-in-phone.png"))
        _sign_in(page, password="wrong")
        assert page.get_by_role("alert").is_visible()
        page.screenshot(path=str(artifacts / "sign-in-error-phone.png"))
    finally:
        context.close()


def test_expired_access_is_renewed_silently_on_navigation(gw, context):
    page = context.new_page()
    _open_app(page, gw)
    sid = page.locator("#sid").inner_text()
    before = _cookies(context)["gw_session"]["value"]
    _wait_access_dropped(context)
    response = page.goto(gw.url + "/app/?after=expiry")
    assert response.status == 200
    assert page.url == gw.url + "/app/?after=expiry"  # no detour through the sign-in page
    assert page.locator("#user").inner_text() == "alice"
    assert page.locator("#sid").inner_text() == sid  # the same session, renewed
    cookies = _cookies(context)
    assert "gw_access" in cookies
    assert cookies["gw_session"]["value"] != before  # the refresh token rotated
    assert response.header_value("cache-control") == "no-store"


def test_a_burst_of_fetches_at_expiry_all_succeed_and_the_session_survives(gw, context):
    page = context.new_page()
    _open_app(page, gw)
    sid = page.locator("#sid").inner_text()
    reused_before = _audit_events(gw, "refresh_token_reused")
    seen: list[Any] = []
    page.on("request", lambda r: seen.append(r) if "/app/api/item/" in r.url else None)
    _wait_access_dropped(context)
    stale = _cookies(context)["gw_session"]["value"]

    results = page.evaluate("burst(12)")

    assert results == ["200:alice"] * 12
    sent = [r.all_headers().get("cookie", "") for r in seen]
    assert len(sent) == 12
    presenters = [c for c in sent if f"gw_session={stale}" in c and "gw_access=" not in c]
    # Several requests presented the same expired session at once: the race is real.
    assert len(presenters) >= 2, sent
    assert _audit_events(gw, "refresh_token_reused") == reused_before
    # Still signed in, still the same session, through another expiry and renewal.
    _wait_access_dropped(context)
    page.reload()
    assert page.locator("#user").inner_text() == "alice"
    assert page.locator("#sid").inner_text() == sid
    page.wait_for_function("document.querySelectorAll('#fetches li').length === 4")
    assert page.locator("#fetches li").all_inner_texts() == ["200:alice"] * 4


def test_sign_out_then_back_does_not_show_protected_content(gw, context):
    page = context.new_page()
    _open_app(page, gw)
    old = _cookies(context)
    with page.expect_navigation():
        page.get_by_role("link", name="Sign out").click()
    assert page.get_by_role("heading", name="You are signed out").is_visible()
    assert not {"gw_access", "gw_session"} & set(_cookies(context))

    page.go_back()
    assert urlsplit(page.url).path == "/auth/sign-in"
    assert page.locator("#user").count() == 0
    assert "alice" not in page.content()

    # The session is ended at the gateway, not only forgotten here: the old cookies, put back,
    # lead to the sign-in page too.
    context.add_cookies([{"name": n, "value": old[n]["value"], "url": gw.url}
                         for n in ("gw_access", "gw_session")])
    page.goto(gw.url + "/app/")
    assert urlsplit(page.url).path == "/auth/sign-in"
    assert page.locator("#user").count() == 0


EVIL_RETURNS = [
    "//evil.test/", "///evil.test/", "/\\evil.test/", "\\\\evil.test/", "https:evil.test",
    "http://evil.test/", "/%2F%2Fevil.test/", "%2F%2Fevil.test/", "/%5Cevil.test/",
    "/\t/evil.test/", "/%09/evil.test/", "\n//evil.test/", "javascript:alert(document.domain)",
    "https://evil.test@127.0.0.1/", "https://127.0.0.1@evil.test/",
]


def test_open_redirect_attempts_stay_on_the_gateway(gw, context):
    page = context.new_page()
    landed = {}
    for evil in EVIL_RETURNS:
        page.goto(f"{gw.url}/auth/sign-in?return={quote(evil, safe='')}")
        _sign_in(page)
        landed[evil] = page.url
    assert landed == {evil: gw.url + "/" for evil in EVIL_RETURNS}


def test_a_tampered_return_field_is_checked_again(gw, context):
    page = context.new_page()
    page.goto(gw.url + "/auth/sign-in?return=%2Fapp%2F")
    for evil in ("//evil.test/", "/\\evil.test/", "https://evil.test/"):
        page.eval_on_selector("input[name=return]", "(e, v) => { e.value = v; }", evil)
        _sign_in(page)
        assert page.url == gw.url + "/", page.url
        page.goto(gw.url + "/auth/sign-in?return=%2Fapp%2F")


def test_an_allowed_return_host_is_reached(gw, context, demo):
    page = context.new_page()
    target = f"http://localhost:{demo.port}/app/"
    page.goto(f"{gw.url}/auth/sign-in?return={quote(target, safe='')}")
    _sign_in(page)
    assert page.url == target
    # The demo app, reached directly: no gateway in between, so no identity.
    assert page.locator("#user").inner_text() == "anonymous"


def test_fetch_without_a_session_gets_json_401_not_the_sign_in_page(gw, context):
    page = context.new_page()
    page.goto(gw.url + "/healthz")
    got = page.evaluate("""async () => {
        const r = await fetch('/app/api/x');
        return [r.status, r.headers.get('content-type'), r.redirected, (await r.json()).error];
    }""")
    assert got == [401, "application/json; charset=utf-8", False, "missing_token"]

