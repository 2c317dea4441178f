"""Properties over generated input: the config loader, the Authorization parser, gateway-cookie
stripping and cookie parsing, and the error -> response mapping."""

from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.clock import SystemClock
from gateway.config import ConfigError, GatewayConfig, load_config_text
from gateway.errors import GatewayError, RateLimited, all_error_types
from gateway.middlewares import error_response
from gateway.pipeline.authn import Authenticator, bearer_token
from gateway.pipeline.forwarded import TrustedProxies
from gateway.pipeline.identity import HeaderPlan
from gateway.pipeline.revocations import RevocationList
from gateway.tokens.signer import KeyRing

REPO = Path(__file__).resolve().parents[1]
SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# --- the config loader ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cfg")
    (directory / "users.yaml").write_text("users: {}\n")
    return directory


SECTION_KEYS = ["listen", "redis", "tokens", "auth", "users", "cookies", "identity", "metrics",
                "logging", "routes"]
NESTED_KEYS = [
    "host", "port", "trusted_proxies", "header_timeout", "keepalive_timeout", "url", "timeout",
    "connect_timeout", "retries", "pool_size", "sentinel", "cluster", "addresses", "issuer",
    "audience", "algorithm", "secret", "access_ttl", "refresh_ttl", "reuse_grace", "leeway",
    "prefix", "realm", "rate_limit", "window", "per_user", "file", "verifier", "enabled",
    "secure", "headers", "claims", "strip_prefixes", "name", "path", "upstream", "auth",
    "roles", "methods", "max_body", "browser", "websocket", "level", "max_token_bytes",
    "signing_key_file", "verify_key_files", "key_prefix", "max_line_size",
]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
    st.sampled_from(["30s", "1.5m", "-1s", "1e999", "10MB", "nan", "inf", "${UNSET}",
                     "${HOME:-x}", "http://127.0.0.1:1", "memory://", "redis://[::1", "EdDSA",
                     "HS256", "/api", "//x", "/auth", "public", "required", "file.yaml",
                     "a\x00b", "\u2028", "0x10", "0o7", "~"]),
)
KEYS = st.one_of(st.sampled_from(SECTION_KEYS + NESTED_KEYS), st.text(max_size=6))
TREES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=5)),
    max_leaves=30,
)
DOCUMENTS = st.dictionaries(st.sampled_from(SECTION_KEYS), TREES, max_size=6)


def valid_document(directory: Path) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "redis": {"url": "memory://"},
        "users": {"file": str(directory / "users.yaml")},
        "tokens": {"issuer": "t", "audience": "a"},
        "routes": [{"name": "api", "path": "/api", "upstream": "http://127.0.0.1:9",
                    "auth": "required"}],
    }


def assert_loads_or_locates(text: str, directory: Path) -> None:
    try:
        config = load_config_text(text, "fuzz.yaml", env={"HOME": "/h"}, base_dir=directory)
    except ConfigError as e:
        assert e.problems
        # YAML line breaks (NEL and the Unicode separators too), with room for end-of-stream.
        lines = sum(text.count(c) for c in "\n\r\x85\u2028\u2029") + 2
        for problem in e.problems:
            assert problem.file == "fuzz.yaml"
            assert 1 <= problem.line <= lines and problem.column >= 1, (str(problem), text)
    else:
        assert isinstance(config, GatewayConfig)


def dump(document: Any) -> str:
    return yaml.safe_dump(document, allow_unicode=True, sort_keys=False)


@SETTINGS
@given(document=DOCUMENTS)
def test_config_generated_structures_load_or_fail_located(config_dir: Path, document: Any) -> None:
    assert_loads_or_locates(dump(document), config_dir)


@SETTINGS
@given(section=st.sampled_from(SECTION_KEYS), key=KEYS, value=TREES)
def test_config_one_bad_value_in_a_valid_config(config_dir: Path, section: str, key: str,
                                                value: Any) -> None:
    """The same, starting from a valid config so validation reaches the deep checks."""
    document = valid_document(config_dir)
    if section == "routes":
        document["routes"][0][key] = value
    else:
        target = document.setdefault(section, {})
        target[key] = value
    assert_loads_or_locates(dump(document), config_dir)


@SETTINGS
@given(text=st.one_of(
    st.text(),
    st.text(alphabet=":-[]{}#&*!|>'\"%@`,? \t\n\r\\$.0123456789abcxyz", max_size=80),
))
@example(text="routes:\n  - {name: a, path: /a, upstream: 'http://x', auth: public}\n"
              "listen: {port: 99999}\n")
@example(text="users: {file: \"a\\0b\"}\n")
@example(text="tokens: {verify_key_files: [\"a\\0b\"]}\n")
@example(text="\ufeff")
@example(text="&a [*a]")
@example(text="listen: {port: !!int x, host: !custom a}\nredis: {url: !!timestamp 2001-02-30}\n")
@example(text="[" * 5000 + "]" * 5000)
@example(text="a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(  # "billion laughs"
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)))
def test_config_random_text_loads_or_fails_located(config_dir: Path, text: str) -> None:
    assert_loads_or_locates(text, config_dir)


def test_config_example_file_loads() -> None:
    """The shipped example stays valid (so the generators above start from something real)."""
    from gateway.config import load_config

    assert isinstance(load_config(REPO / "config" / "gateway.yaml"), GatewayConfig)


# --- the Authorization header ----------------------------------------------------------------
B64 = string.ascii_letters + string.digits + "-._~+/="
AUTH_VALUES = st.one_of(
    st.text(max_size=40),
    st.builds(lambda scheme, sep, tok: scheme + sep + tok,
              st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "Bearerx", "Bear", ""]),
              st.sampled_from([" ", "  ", "\t", "", ",", " \u00a0"]),
              st.text(alphabet=B64 + " \t\x00\u00e9,", max_size=30)),
)


@SETTINGS
@given(values=st.lists(AUTH_VALUES, max_size=3))
@example(values=["Bearer a\u0660"])
@example(values=["Bearer\u00a0abc"])
def test_bearer_token_returns_a_token_none_or_a_gateway_error(values: list[str]) -> None:
    try:
        token = bearer_token(values)
    except GatewayError:
        return
    if token is not None:
        assert re.fullmatch(r"[A-Za-z0-9\-._~+/]+=*", token), token
        assert len(values) == 1 and token in values[0]


# --- gateway cookies -------------------------------------------------------------------------
GATEWAY_COOKIES = ("gw_access", "gw_refresh", "gw_session", "gw_csrf")


@pytest.fixture(scope="module")
def cookie_plan(config_dir: Path) -> tuple[HeaderPlan, Any]:
    document = valid_document(config_dir)
    document["cookies"] = {"enabled": True, "secure": False}
    config = load_config_text(dump(document), "plan.yaml")
    c = config.cookies
    names = (c.access_name, c.refresh_name, c.session_name, c.csrf_name)
    assert names == GATEWAY_COOKIES
    return HeaderPlan(config.identity, names, TrustedProxies(())), config.routes[0]


def forwarded_cookie(plan_and_route: tuple[HeaderPlan, Any], cookie: str) -> str | None:
    plan, route = plan_and_route
    headers = CIMultiDictProxy(CIMultiDict({"Cookie": cookie, "Host": "gw.test"}))
    out = plan.build(headers, route, None, peer="127.0.0.1", scheme="http", request_id="r")
    assert len(out.getall("Cookie", [])) <= 1
    return out.get("Cookie")


def parsed_cookies(cookie: str) -> dict[str, str]:
    """The cookies aiohttp (the gateway's own parser, and the test upstream's) reads."""
    return dict(make_mocked_request("GET", "/", headers={"Cookie": cookie}).cookies)


COOKIE_NAME = st.one_of(st.sampled_from(GATEWAY_COOKIES + ("a", "sid", "gw_accessx", "xgw_access")),
                        st.text(alphabet=string.ascii_letters + "_-", min_size=1, max_size=6))
COOKIE_VALUE = st.text(alphabet=string.ascii_letters + string.digits + "-_.%", max_size=8)
COOKIE_JUNK = st.lists(
    st.sampled_from(list("; =,\"'\t\\\x0b\u00a0") + list(GATEWAY_COOKIES) + ["a", "1", "x=1"]),
    max_size=12,
).map("".join)
COOKIE_HEADERS = st.one_of(
    st.text(max_size=40),
    COOKIE_JUNK,
    st.lists(st.tuples(COOKIE_NAME, COOKIE_VALUE, COOKIE_JUNK), max_size=5).map(
        lambda pairs: "".join(f"{n}={v}{junk}" for n, v, junk in pairs)),
)


@SETTINGS
@given(cookie=COOKIE_HEADERS)
@example(cookie="a=1, gw_access=tok")
@example(cookie="a=1 gw_access=tok")
@example(cookie='a="x;" gw_access=tok')
@example(cookie="a=1;\u00a0gw_access=tok")
@example(cookie="a=1;\x0bgw_session=tok")
def test_gateway_cookies_never_reach_the_upstream(cookie_plan: Any, cookie: str) -> None:
    """Whatever the Cookie header, the forwarded one holds no gateway cookie as aiohttp (the
    gateway's own cookie parser) reads it; and building headers raises nothing else."""
    try:
        forwarded = forwarded_cookie(cookie_plan, cookie)
        parsed_cookies(cookie)  # the gateway reads request.cookies for the browser flows
    except GatewayError:
        return
    if forwarded is not None:
        assert forwarded.strip()
        leaked = set(parsed_cookies(forwarded)) & set(GATEWAY_COOKIES)
        assert not leaked, (cookie, forwarded)


@SETTINGS
@given(pairs=st.lists(st.tuples(COOKIE_NAME, COOKIE_VALUE), max_size=6))
def test_well_formed_cookies_other_than_ours_are_all_forwarded(cookie_plan: Any,
                                                               pairs: list[tuple[str, str]]) -> None:
    cookie = "; ".join(f"{n}={v}" for n, v in pairs)
    forwarded = forwarded_cookie(cookie_plan, cookie) if cookie else None
    want = [(n, v) for n, v in pairs if n not in GATEWAY_COOKIES]
    if not want:
        assert forwarded is None
        return
    assert forwarded == "; ".join(f"{n}={v}" for n, v in want)


@pytest.fixture(scope="module")
def authn(config_dir: Path) -> Authenticator:
    config = load_config_text(dump(valid_document(config_dir)), "authn.yaml")
    clock = SystemClock()
    return Authenticator(KeyRing.from_config(config.tokens, clock), RevocationList(clock), clock,
                         config.tokens.verify_cache_size)


@SETTINGS
@given(cookie=COOKIE_HEADERS, authorization=st.lists(AUTH_VALUES, max_size=2))
def test_credential_from_header_or_cookie_raises_only_gateway_errors(
        authn: Authenticator, cookie: str, authorization: list[str]) -> None:
    """The edge's credential lookup over a real aiohttp request's parsed cookies."""
    request = make_mocked_request("GET", "/", headers={"Cookie": cookie})
    try:
        token = authn.credential(authorization, request.cookies, "gw_access")
    except GatewayError:
        return
    assert token is None or isinstance(token, str)


# --- the error mapping -----------------------------------------------------------------------
def instance(cls: type[GatewayError]) -> GatewayError:
    return RateLimited(7) if issubclass(cls, RateLimited) else cls()


README = (REPO / "README.md").read_text()


@pytest.mark.parametrize("cls", all_error_types(), ids=lambda c: c.__name__)
def test_every_error_renders_its_documented_code(cls: type[GatewayError]) -> None:
    error = instance(cls)
    response = error_response(error, "gateway")
    assert 400 <= response.status <= 599
    assert response.status == cls.status
    assert response.content_type == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.text is not None
    body = json.loads(response.text)
    assert body == {"error": cls.code, "error_description": cls.description}
    assert re.search(rf"(?<![\w-]){cls.code}(?![\w-])", README), f"{cls.code} not in README.md"
    if cls.bearer_error is not None:
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="gateway"')
    if issubclass(cls, RateLimited):
        assert response.headers["Retry-After"] == "7"


def test_one_code_means_one_status() -> None:
    """A client can act on the code alone: no code is used with two statuses."""
    statuses: dict[str, set[int]] = {}
    for cls in all_error_types():
        statuses.setdefault(cls.code, set()).add(cls.status)
    assert {code: s for code, s in statuses.items() if len(s) > 1} == {}


@SETTINGS
@given(description=st.text(max_size=60))
@example(description='say "hi", error="other"')
def test_error_description_cannot_break_the_response(description: str) -> None:
    from gateway.errors import InvalidToken

    response = error_response(InvalidToken(description), "gateway")
    assert response.text is not None
    want = description or InvalidToken.description
    assert json.loads(response.text)["error_description"] == want
    challenge = response.headers["WWW-Authenticate"]
    assert '"' not in challenge.split('error_description="', 1)[1][:-1]
