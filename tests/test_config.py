"""The config loader: units, ${VAR} interpolation, frozen typed objects, and located errors."""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from gateway.config import ConfigError, GatewayConfig, load_config, load_config_text
from gateway.config.units import parse_duration, parse_size
from tests.conftest import REPO

MINIMAL = "users: {verifier: {url: 'http://127.0.0.1:9'}}\n"


def with_users(text: str) -> str:
    """`text` (dedented) after a minimal users section, which takes line 1."""
    return MINIMAL + textwrap.dedent(text)


def load(text: str, env: Mapping[str, str] | None = None, base_dir: Path | None = None,
         filename: str = "gw.yaml") -> GatewayConfig:
    return load_config_text(textwrap.dedent(text), filename, env=env or {}, base_dir=base_dir)


def problems(text: str, env: Mapping[str, str] | None = None, base_dir: Path | None = None,
             filename: str = "gw.yaml") -> list[str]:
    with pytest.raises(ConfigError) as e:
        load(text, env, base_dir, filename)
    lines = [str(p) for p in e.value.problems]
    assert str(e.value).splitlines() == lines
    return lines


# --- units ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("30s", 30.0), ("15m", 900.0), ("2h", 7200.0), ("14d", 14 * 86400.0),
    ("1.5s", 1.5), ("45", 45.0), (" 10s ", 10.0), (0, 0.0), (12, 12.0), (2.5, 2.5),
])
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", [
    "5x", "-1s", "", "s", "1 minute", "10 s s", True, None, [], float("inf"), float("nan"), -1,
])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(
    [("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600), ("d", 86400), ("", 1)]))
@settings(max_examples=100, deadline=None)
def test_parse_duration_any_count_and_unit(n: int, unit: tuple[str, float]) -> None:
    assert math.isclose(parse_duration(f"{n}{unit[0]}"), n * unit[1])


@pytest.mark.parametrize(("text", "size"), [
    (1048576, 1048576), (0, 0), ("1MB", 1_000_000), ("512KiB", 524_288), ("512KB", 512_000),
    ("10mb", 10_000_000), ("1GiB", 1024**3), ("1GB", 1000**3), ("1MiB", 1024**2), ("7B", 7),
    ("42", 42),
])
def test_parse_size(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["1.5MB", "MB", "1TB", "-1", -1, 1.5, True, None, "ten"])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_units_land_in_the_config_as_numbers() -> None:
    config = load(with_users("""\
        listen: {header_timeout: 500ms, max_line_size: 16KiB}
        tokens: {access_ttl: 15m, refresh_ttl: 14d, session_max_lifetime: 30d, reuse_grace: 30s,
                 max_token_bytes: 1MB}
        routes:
          - {name: a, path: /a, upstream: 'http://127.0.0.1:9', timeout: 2h, max_body: 512KiB}
          - {name: b, path: /b, upstream: 'http://127.0.0.1:9', max_body: 1048576}
        """))
    assert config.listen.header_timeout == 0.5
    assert config.listen.max_line_size == 16 * 1024
    assert (config.tokens.access_ttl, config.tokens.refresh_ttl) == (900.0, 14 * 86400.0)
    assert config.tokens.session_max_lifetime == 30 * 86400.0
    assert config.tokens.reuse_grace == 30.0
    assert config.tokens.max_token_bytes == 1_000_000
    assert config.routes[0].timeout == 7200.0
    assert config.routes[0].max_body == 524_288
    assert config.routes[1].max_body == 1_048_576


# --- interpolation ----------------------------------------------------------------------------
def test_interpolation_from_env_and_defaults() -> None:
    config = load("""\
        listen:
          host: ${HOST:-127.0.0.2}
          port: ${PORT}
        redis: {url: '${REDIS_URL:-memory://}', key_prefix: '${APP}:${ENVIRONMENT:-dev}:'}
        users: {verifier: {url: '${USERS}/verify'}}
        tokens: {algorithm: HS256, secret: '${SECRET}'}
        """, env={"PORT": "9001", "USERS": "http://users.internal", "APP": "shop",
                  "SECRET": "s" * 40, "HOST": ""})
    assert config.listen.host == "127.0.0.2"  # an empty variable counts as unset, like ${X:-d}
    assert config.listen.port == 9001
    assert config.redis.url == "memory://"
    assert config.redis.key_prefix == "shop:dev:"
    assert config.users.verifier is not None
    assert config.users.verifier.url == "http://users.internal/verify"
    assert config.tokens.secret == "s" * 40


def test_interpolation_set_variable_wins_over_default() -> None:
    config = load("listen: {host: '${HOST:-127.0.0.2}'}\n" + MINIMAL, env={"HOST": "127.0.0.9"})
    assert config.listen.host == "127.0.0.9"


def test_unset_variable_without_default_is_a_located_error() -> None:
    assert problems("""\
        listen:
          port: ${PORT}
        users:
          verifier: {url: "${USERS_URL}/verify"}
        tokens: {issuer: "${ISS:-me}"}
        """) == [
        "gw.yaml:2:9: listen.port: environment variable PORT is not set",
        "gw.yaml:4:19: users.verifier.url: environment variable USERS_URL is not set",
    ]


def test_load_config_reads_the_process_environment(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_TEST_PORT", "9123")
    monkeypatch.delenv("GW_TEST_UNSET", raising=False)
    path = tmp_path / "gateway.yaml"
    path.write_text("listen: {port: '${GW_TEST_PORT}'}\n" + MINIMAL)
    assert load_config(path).listen.port == 9123
    path.write_text("listen: {host: '${GW_TEST_UNSET}'}\n" + MINIMAL)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert [str(p) for p in e.value.problems] == [
        f"{path}:1:16: listen.host: environment variable GW_TEST_UNSET is not set"]


# --- frozen typed objects ---------------------------------------------------------------------
FULL = """\
    listen: {trusted_proxies: [10.0.0.0/8]}
    tokens: {audience: [a, b], extra_claims: [email]}
    identity: {claims: {email: X-User-Email}, strip_prefixes: [X-User-]}
    auth: {allowed_return_hosts: [app.example.com]}
    users: {verifier: {url: 'http://127.0.0.1:9'}}
    routes:
      - name: api
        path: /api/
        upstream: [http://127.0.0.1:9001, 'https://backend.internal:8443/base']
        methods: [get, post]
        roles: [admin]
    """


def _walk(value: Any, where: str, seen: list[str]) -> None:
    """Every container reachable from the config is immutable."""
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            _walk(getattr(value, name), f"{where}.{name}", seen)
    elif isinstance(value, (list, dict, set, bytearray)):
        seen.append(f"{where}: mutable {type(value).__name__}")
    elif isinstance(value, tuple):
        for i, item in enumerate(value):
            _walk(item, f"{where}[{i}]", seen)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _walk(v, f"{where}[{k!r}]", seen)


def test_config_is_frozen_all_the_way_down() -> None:
    config = load(FULL)
    mutable: list[str] = []
    _walk(config, "config", mutable)
    assert mutable == []
    with pytest.raises(ValidationError, match="frozen"):
        config.listen.port = 1
    with pytest.raises(ValidationError, match="frozen"):
        config.routes[0].auth = "public"
    with pytest.raises(ValidationError, match="frozen"):
        config.routes = ()
    with pytest.raises(TypeError):
        config.identity.claims["role"] = "X-User-Role"  # type: ignore[index]
    with pytest.raises(AttributeError):
        config.routes[0].upstream.append("http://evil")  # type: ignore[attr-defined]


def test_config_values_are_typed_and_normalised() -> None:
    config = load(FULL)
    route = config.routes[0]
    assert route.path == "/api"  # trailing slash dropped
    assert route.methods == ("GET", "POST")
    assert route.upstream == ("http://127.0.0.1:9001", "https://backend.internal:8443/base")
    assert route.roles == ("admin",)
    assert config.tokens.audience == ("a", "b")
    assert dict(config.identity.claims) == {"email": "X-User-Email"}
    assert config.listen.trusted_proxies == ("10.0.0.0/8",)


def test_upstream_may_be_one_url_or_a_list() -> None:
    config = load(with_users("""\
        routes:
          - {name: one, path: /one, upstream: 'http://127.0.0.1:9001'}
          - {name: many, path: /many, upstream: ['http://127.0.0.1:9001', 'http://[::1]:9002']}
        """))
    assert config.routes[0].upstream == ("http://127.0.0.1:9001",)
    assert config.routes[1].upstream == ("http://127.0.0.1:9001", "http://[::1]:9002")


# --- located errors ---------------------------------------------------------------------------
def test_unknown_key_names_the_key_and_what_is_expected() -> None:
    assert problems(with_users("""\
        listen:
          port: 8080
          prot: 8081
        """)) == [
        ("gw.yaml:4:3: listen.prot: unknown key 'prot'; expected one of: body_timeout, "
        "drain_timeout, header_timeout, host, keepalive_timeout, max_field_size, max_headers, max_line_size, "
        "port, trusted_proxies"),
    ]


def test_unknown_top_level_section() -> None:
    lines = problems(MINIMAL + "route:\n  - {name: a}\n")
    assert len(lines) == 1
    assert lines[0].startswith("gw.yaml:2:1: route: unknown key 'route'; expected one of: ")
    assert "routes" in lines[0]


def test_wrong_type() -> None:
    assert problems(MINIMAL + "listen:\n  port: eighty\n") == [
        ("gw.yaml:3:9: listen.port: Input should be a valid integer, unable to parse string as "
        "an integer, got str 'eighty'"),
    ]


def test_bad_duration() -> None:
    assert problems(MINIMAL + "tokens:\n  access_ttl: 5 minutes\n") == [
        ("gw.yaml:3:15: tokens.access_ttl: expected a duration like 30s, 15m or 14d, "
        "got '5 minutes'"),
    ]


def test_non_finite_duration() -> None:
    lines = problems(MINIMAL + "routes:\n  - {name: a, path: /a, upstream: 'http://h', "
                     "timeout: .nan}\n")
    assert len(lines) == 1
    assert lines[0].startswith("gw.yaml:3:56: routes[0].timeout: expected a finite duration")


def test_duplicate_route_name() -> None:
    assert problems(with_users("""\
        routes:
          - {name: api, path: /a, upstream: 'http://127.0.0.1:9'}
          - {name: api, path: /b, upstream: 'http://127.0.0.1:9'}
        """)) == [
        "gw.yaml:4:12: routes[1].name: duplicate route name 'api' (first at routes[0])",
    ]


@pytest.mark.parametrize("tokens", ["", "tokens: {audience: [billing, api]}\n"])
def test_a_route_cannot_be_named_like_an_access_token_audience(tokens: str) -> None:
    """Identity tokens carry aud = route name; a route named like an access-token audience would
    let its upstream replay them as access tokens on every route."""
    name = "api" if tokens else "edge-gateway"
    lines = problems(MINIMAL + tokens + "routes:\n"
                     f"  - {{name: {name}, path: /a, upstream: 'http://127.0.0.1:9'}}\n")
    assert len(lines) == 1 and f"route name '{name}' is also an access-token audience" in lines[0]


@pytest.mark.parametrize(("upstream", "col", "why"), [
    ("ftp://example.com", 15,
     "'ftp://example.com': expected an http:// or https:// URL with a host"),
    ("example.com:8080", 15, "'example.com:8080': expected an http:// or https:// URL with a host"),
    ("not a url", 15, "'not a url': expected an http:// or https:// URL with a host"),
    ("http://", 15, "'http://': expected an http:// or https:// URL with a host"),
    ("'http://h/x?q=1'", 15, "'http://h/x?q=1': an upstream URL cannot have a query or fragment"),
    ("[http://127.0.0.1:9, mailto:x]", 15,
     "'mailto:x': expected an http:// or https:// URL with a host"),
])
def test_upstream_must_be_a_url(upstream: str, col: int, why: str) -> None:
    assert problems(with_users(f"""\
        routes:
          - name: a
            path: /a
            upstream: {upstream}
        """)) == [f"gw.yaml:5:{col}: routes[0].upstream: {why}"]


def test_duplicate_yaml_key() -> None:
    assert problems("""\
        users: {verifier: {url: 'http://127.0.0.1:9'}}
        tokens:
          issuer: a
          access_ttl: 5m
          issuer: b
        """) == ["gw.yaml:5:3: tokens.issuer: duplicate key 'issuer'"]


@pytest.mark.parametrize(("text", "where", "what"), [
    ("listen:\n  host: a: b\n", "gw.yaml:2:10", "mapping values are not allowed here"),
    ("routes: [a, b\n", "gw.yaml:2:1", "expected ',' or ']'"),
    ("listen:\n\tport: 1\n", "gw.yaml:2:1", "found character '\\t' that cannot start any token"),
    ("listen: {port: 1\n", "gw.yaml:2:1", "expected ',' or '}'"),
])
def test_invalid_yaml_is_located(text: str, where: str, what: str) -> None:
    lines = problems(text)
    assert len(lines) == 1
    assert lines[0].startswith(f"{where}: invalid YAML: ")
    assert what in lines[0]


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a\n- b\n", "just text\n"])
def test_empty_or_not_a_mapping(text: str) -> None:
    lines = problems(text)
    assert len(lines) == 1 and lines[0].startswith("gw.yaml:1:1: ")


def test_missing_required_section() -> None:
    assert problems("listen: {port: 8080}\n") == [
        "gw.yaml:1:1: users: required key 'users' is missing"]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = """\
        listen:
          port: eighty
          colour: blue
          port: 8081
        tokens:
          access_ttl: 5 minutes
        users:
          file: missing-users.yaml
        routes:
          - name: web
            path: /web
            upstream: ftp://example.com
          - name: web
            path: /healthz
            upstream: [http://127.0.0.1:9000, not a url]
          - name: env
            path: /env
            upstream: ${UPSTREAM}
        """
    assert problems(text, base_dir=tmp_path) == [
        ("gw.yaml:2:9: listen.port: Input should be a valid integer, unable to parse string as an "
        "integer, got str 'eighty'"),
        ("gw.yaml:3:3: listen.colour: unknown key 'colour'; expected one of: body_timeout, "
        "drain_timeout, header_timeout, host, keepalive_timeout, max_field_size, max_headers, max_line_size, "
        "port, trusted_proxies"),
        "gw.yaml:4:3: listen.port: duplicate key 'port'",
        ("gw.yaml:6:15: tokens.access_ttl: expected a duration like 30s, 15m or 14d, "
        "got '5 minutes'"),
        f"gw.yaml:8:9: users.file: no such file: {tmp_path / 'missing-users.yaml'}",
        ("gw.yaml:12:15: routes[0].upstream: 'ftp://example.com': expected an http:// or https:// "
        "URL with a host"),
        "gw.yaml:13:11: routes[1].name: duplicate route name 'web' (first at routes[0])",
        "gw.yaml:14:11: routes[1].path: /healthz is reserved by the gateway",
        ("gw.yaml:15:15: routes[1].upstream: 'not a url': expected an http:// or https:// URL "
        "with a host"),
        # An unset variable is reported once, not again as an invalid URL.
        "gw.yaml:18:15: routes[2].upstream: environment variable UPSTREAM is not set",
    ]


def test_route_policy_errors_are_located() -> None:
    assert problems(with_users("""\
        routes:
          - {name: a, path: /a, upstream: 'http://h', auth: public, roles: [admin]}
          - {name: b, path: a/b, upstream: 'http://h', auth: sometimes}
          - {name: c, path: /c/../d, upstream: 'http://h', host: 'bad host', methods: [GET, 'P T']}
        """)) == [
        "gw.yaml:3:5: routes[0]: a public route cannot require roles",
        "gw.yaml:4:21: routes[1].path: must start with /",
        ("gw.yaml:4:54: routes[1].auth: expected 'public', 'optional' or 'required', "
        "got 'sometimes'"),
        ("gw.yaml:5:21: routes[2].path: must be a normalised path (no dot segments, //, % or "
        "backslash)"),
        ("gw.yaml:5:58: routes[2].host: 'bad host' is not a host name (optionally *.suffix and "
        ":port)"),
        "gw.yaml:5:79: routes[2].methods: 'P T' is not an HTTP method",
    ]


# --- reserved paths ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", [
    "/auth", "/auth/", "/auth/login", "/auth/x/y", "/healthz", "/readyz", "/.well-known",
    "/.well-known/jwks.json", "/metrics", "/metrics/",
])
def test_reserved_paths_cannot_be_routes(path: str) -> None:
    shown = path.rstrip("/") or "/"
    assert problems(MINIMAL + f"routes:\n  - {{name: r, path: '{path}', upstream: 'http://h'}}\n") \
        == [f"gw.yaml:3:21: routes[0].path: {shown} is reserved by the gateway"]


def test_reserved_paths_follow_the_configured_prefixes() -> None:
    base = MINIMAL + "auth: {prefix: /login}\nmetrics: {path: /stats}\nroutes:\n"
    config = load(base + textwrap.indent(textwrap.dedent("""\
        - {name: a, path: /auth, upstream: 'http://h'}
        - {name: m, path: /metrics, upstream: 'http://h'}
        - {name: x, path: /authx, upstream: 'http://h'}
        - {name: y, path: /healthzz, upstream: 'http://h'}
        - {name: s, path: /.well-known/security.txt, upstream: 'http://h'}
        - {name: root, path: /, upstream: 'http://h'}
        """), "  "))
    assert [r.path for r in config.routes] == [
        "/auth", "/metrics", "/authx", "/healthzz", "/.well-known/security.txt", "/"]
    assert problems(base + textwrap.indent(textwrap.dedent("""\
        - {name: l, path: /login/x, upstream: 'http://h'}
        - {name: s, path: /stats, upstream: 'http://h'}
        """), "  ")) == [
        "gw.yaml:5:21: routes[0].path: /login/x is reserved by the gateway",
        "gw.yaml:6:21: routes[1].path: /stats is reserved by the gateway",
    ]


# --- files ------------------------------------------------------------------------------------
def test_relative_files_resolve_against_the_config_directory(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "users.yaml").write_text("users: {}\n")
    path = tmp_path / "conf" / "gateway.yaml"
    path.write_text("users: {file: users.yaml}\n")
    config = load_config(path, env={})
    assert config.users.file == str(tmp_path / "conf" / "users.yaml")


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "nope.yaml")
    [problem] = e.value.problems
    assert str(problem).startswith(f"{tmp_path / 'nope.yaml'}:1:1: cannot read config")


def test_the_shipped_example_config_loads() -> None:
    config = load_config(REPO / "config" / "gateway.yaml", env={})
    assert [r.name for r in config.routes] == ["public", "api", "admin", "app", "ws"]
    admin = config.routes[2]
    assert (admin.path, admin.auth, admin.roles, admin.check_session) == (
        "/admin", "required", ("admin",), True)
    assert config.routes[0].upstream == ("http://127.0.0.1:8081",)
    assert config.users.file == str(REPO / "config" / "users.yaml")
    assert config.tokens.access_ttl == 300.0
    assert config.redis.embedded
    assert os.path.isfile(config.users.file)
