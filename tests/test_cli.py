"""The `gateway` command, run as a real process: check, route, keys generate, users add."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from tests.conftest import PASSWORD, REPO
from tests.support.upstream import Upstream


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO),
           "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=REPO, env=env,
                          input=stdin, capture_output=True, text=True, timeout=60, check=False)


def cli_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The same `main`, without a new interpreter (for the many small `route` variants)."""
    from gateway.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def table(stdout: str) -> list[list[str]]:
    """The route table under the `OK` line, as whitespace-separated cells."""
    return [line.split() for line in stdout.splitlines()[1:]]


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def valid_config(tmp_path: Path, users_file: Path) -> Path:
    return write(tmp_path / "gateway.yaml", f"""\
        users: {{file: '{users_file}'}}
        routes:
          - {{name: public, path: /public, upstream: 'http://127.0.0.1:9001', auth: public}}
          - name: admin
            path: /admin
            upstream: ['http://127.0.0.1:9001', 'http://127.0.0.1:9002']
            roles: [admin]
            methods: [GET, POST]
            check_session: true
          - {{name: tenant, path: /t, host: '*.example.com', upstream: 'http://127.0.0.1:9003',
             auth: optional, strip_prefix: true}}
        """)


# --- check ------------------------------------------------------------------------------------
def test_check_prints_the_route_table(valid_config: Path) -> None:
    r = cli("check", "-c", str(valid_config))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"{valid_config}: OK (3 routes)"
    assert table(r.stdout) == [
        ["NAME", "HOST", "PATH", "METHODS", "AUTH", "ROLES", "UPSTREAM"],
        ["public", "*", "/public/*", "*", "public", "-", "http://127.0.0.1:9001"],
        ["admin", "*", "/admin/*", "GET,POST", "required", "admin", "http://127.0.0.1:9001",
         "http://127.0.0.1:9002"],
        ["tenant", "*.example.com", "/t/*", "*", "optional", "-", "http://127.0.0.1:9003"],
    ]
    # No signing key: the ephemeral-key warning goes to stderr, the check still passes.
    assert "ephemeral" in r.stderr
    assert "reuse_grace" not in r.stderr  # the embedded store never retries


@pytest.mark.parametrize(("redis", "grace", "warned"), [
    ("{url: 'redis://127.0.0.1:6379/0'}", "10s", False),             # window 2.5s
    ("{url: 'redis://127.0.0.1:6379/0'}", "2s", True),
    ("{url: 'redis://127.0.0.1:6379/0', retries: 0}", "0s", False),   # nothing is retried
    ("{url: 'redis://127.0.0.1:6379/0', retries: 4, timeout: 2s}", "10s", True),  # 14s
])
def test_check_warns_when_a_retried_refresh_would_look_like_reuse(
        tmp_path: Path, users_file: Path, redis: str, grace: str, warned: bool) -> None:
    # A rotation whose reply was lost is sent again after timeout + backoff + reconnect; if
    # that can outlast reuse_grace, the retry is taken for a stolen token and the user is out.
    config = write(tmp_path / "gateway.yaml", f"""\
        redis: {redis}
        tokens: {{reuse_grace: {grace}}}
        users: {{file: '{users_file}'}}
        """)
    r = cli("check", "-c", str(config))
    assert r.returncode == 0, r.stderr
    assert ("warning: tokens.reuse_grace" in r.stderr) is warned, r.stderr


def test_the_shipped_example_passes_check() -> None:
    r = cli("check", "-c", "config/gateway.yaml")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "config/gateway.yaml: OK (5 routes)"
    assert [row[0] for row in table(r.stdout)] == ["NAME", "public", "api", "admin", "app", "ws"]


def test_check_prints_every_error_located(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", """\
        listen:
          port: eighty
          colour: blue
        tokens:
          access_ttl: 5 minutes
        users:
          file: nowhere.yaml
        routes:
          - name: web
            path: /web
            upstream: ftp://example.com
          - name: web
            path: /auth/login
            upstream: http://127.0.0.1:9001
        """)
    r = cli("check", "-c", str(path))
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.splitlines() == [
        (f"{path}:2:9: listen.port: Input should be a valid integer, unable to parse string as an "
        "integer, got str 'eighty'"),
        (f"{path}:3:3: listen.colour: unknown key 'colour'; expected one of: body_timeout, "
        "drain_timeout, header_timeout, host, keepalive_timeout, max_field_size, max_headers, "
        "max_line_size, port, trusted_proxies"),
        (f"{path}:5:15: tokens.access_ttl: expected a duration like 30s, 15m or 14d, "
        "got '5 minutes'"),
        f"{path}:7:9: users.file: no such file: {tmp_path / 'nowhere.yaml'}",
        (f"{path}:11:15: routes[0].upstream: 'ftp://example.com': expected an http:// or "
        "https:// URL with a host"),
        f"{path}:12:11: routes[1].name: duplicate route name 'web' (first at routes[0])",
        f"{path}:13:11: routes[1].path: /auth/login is reserved by the gateway",
    ]


def test_check_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "users:\n  file: [a, b\n")
    r = cli("check", "-c", str(path))
    assert r.returncode == 1
    [line] = r.stderr.splitlines()
    assert line.startswith(f"{path}:3:1: invalid YAML: expected ',' or ']'")


def test_check_missing_config_file(tmp_path: Path) -> None:
    r = cli("check", "-c", str(tmp_path / "nope.yaml"))
    assert r.returncode == 1
    [line] = r.stderr.splitlines()
    assert line.startswith(f"{tmp_path / 'nope.yaml'}:1:1: cannot read config:")


def test_check_locates_a_key_file_without_a_key_and_a_broken_users_file(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_text("not a key\n")
    (tmp_path / "users.yaml").write_text("users:\n  bob: {roles: [admin]}\n")
    path = write(tmp_path / "gateway.yaml", """\
        tokens:
          algorithm: EdDSA
          signing_key_file: key.pem
        users:
          file: users.yaml
        """)
    r = cli("check", "-c", str(path))
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert lines[0] == (f"{path}:3:21: tokens.signing_key_file: {tmp_path / 'key.pem'}: "
                        "not an unencrypted PEM private key")
    assert lines[1].startswith(f"{path}:5:9: users.file: {tmp_path / 'users.yaml'}: ")
    assert "password_hash" in lines[1]
    assert len(lines) == 2


# --- route ------------------------------------------------------------------------------------
def test_route_explains_the_route_and_its_policy(valid_config: Path) -> None:
    r = cli("route", "-c", str(valid_config), "get", "/public/%2e%2e/admin/users?x=1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "GET /public/%2e%2e/admin/users?x=1",
        "  normalised path: /admin/users",
        "  route:           admin (path /admin, host *)",
        "  auth:            required (session checked in Redis per request)",
        "  methods:         GET, POST",
        "  roles (any):     admin",
        "  upstream:        http://127.0.0.1:9001, http://127.0.0.1:9002 path /admin/users",
        "  timeout:         30s, max body 10000000 bytes",
    ]


def test_route_unmatched_is_404_no_route(valid_config: Path) -> None:
    r = cli("route", "-c", str(valid_config), "GET", "/publicity")
    assert (r.returncode, r.stdout.strip()) == (
        1, "GET /publicity: 404 no_route: No route matches this request.")


def test_route_with_host_and_strip_prefix(valid_config: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli_in_process(capsys, "route", "-c", str(valid_config), "GET", "/t/x",
                                  "--host", "a.example.com:8443")
    assert code == 0
    assert "  route:           tenant (path /t, host *.example.com)" in out.splitlines()
    assert "  auth:            optional" in out.splitlines()
    assert "  upstream:        http://127.0.0.1:9003 path /x" in out.splitlines()
    code, out, _ = cli_in_process(capsys, "route", "-c", str(valid_config), "GET", "/t/x",
                                  "--host", "example.org")
    assert (code, out.strip()) == (1, "GET /t/x: 404 no_route: No route matches this request.")


def test_route_method_mismatch_and_invalid_path(valid_config: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli_in_process(capsys, "route", "-c", str(valid_config), "DELETE", "/admin/x")
    assert code == 1
    assert out.startswith("DELETE /admin/x: 405 method_not_allowed: ")
    code, out, _ = cli_in_process(capsys, "route", "-c", str(valid_config), "GET",
                                  "/public/..;/admin")
    assert code == 1
    assert out.startswith("GET /public/..;/admin: 400 invalid_path: ")


# --- keys generate ----------------------------------------------------------------------------
@pytest.mark.parametrize(("alg", "key_type"), [
    ("EdDSA", ed25519.Ed25519PrivateKey), ("ES256", ec.EllipticCurvePrivateKey)])
def test_keys_generate_writes_a_private_key_that_check_accepts(
    tmp_path: Path, users_file: Path, alg: str, key_type: type
) -> None:
    r = cli("keys", "generate", "--alg", alg, "--out", str(tmp_path / "keys"))
    assert r.returncode == 0, r.stderr
    private = sorted((tmp_path / "keys").glob("*.pem"))
    [priv] = [p for p in private if not p.name.endswith(".pub.pem")]
    [pub] = [p for p in private if p.name.endswith(".pub.pem")]
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(priv.read_bytes(), password=None)
    assert isinstance(key, key_type)
    public = serialization.load_pem_public_key(pub.read_bytes())
    spki = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert public.public_bytes(*spki) == key.public_key().public_bytes(*spki)
    assert f"signing_key_file: {priv}" in r.stdout

    config = write(tmp_path / "gateway.yaml", f"""\
        tokens: {{algorithm: {alg}, signing_key_file: keys/{priv.name},
                 verify_key_files: [keys/{pub.name}]}}
        users: {{file: '{users_file}'}}
        routes:
          - {{name: api, path: /api, upstream: 'http://127.0.0.1:9001'}}
        """)
    r = cli("check", "-c", str(config))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"{config}: OK (1 routes)"
    assert "ephemeral" not in r.stderr


def test_keys_generate_hs256_secret_is_private(tmp_path: Path) -> None:
    r = cli("keys", "generate", "--alg", "HS256", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    [secret] = tmp_path.glob("hs256-*.secret")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert len(secret.read_bytes()) >= 32


def test_keys_generate_never_overwrites_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from gateway import cli as gateway_cli

    # Both runs get the same timestamp, i.e. the same file name.
    monkeypatch.setattr(time, "strftime", lambda fmt: "20240101000000")
    assert gateway_cli.main(["keys", "generate", "--alg", "EdDSA", "--out", str(tmp_path)]) == 0
    key = tmp_path / "eddsa-20240101000000.pem"
    first = key.read_bytes()
    # The same second again: refused with a message, not a traceback; the first key is intact.
    assert gateway_cli.main(["keys", "generate", "--alg", "EdDSA", "--out", str(tmp_path)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert key.read_bytes() == first


# --- users add --------------------------------------------------------------------------------
async def test_users_add_writes_an_argon2id_hash_the_gateway_accepts(
    tmp_path: Path, gateway: Any, upstream: Upstream
) -> None:
    users = tmp_path / "users.yaml"
    r = cli("users", "add", "dana", "--roles", "a, b", "--file", str(users), "--password-stdin",
            stdin=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    r = cli("users", "add", "erin", "--file", str(users), "--password-stdin",
            stdin="erin's password\n")
    assert r.returncode == 0, r.stderr
    text = users.read_text()
    assert text.count("$argon2id$") == 2
    assert PASSWORD not in text

    client = await gateway(config_text=textwrap.dedent(f"""\
        users: {{file: '{users}'}}
        tokens: {{issuer: test, audience: test}}
        routes:
          - {{name: api, path: /api, upstream: '{upstream.url}'}}
        """))
    r = await client.post("/auth/login", json={"username": "dana", "password": PASSWORD})
    assert r.status == 200, await r.text()
    token = (await r.json())["access_token"]
    r = await client.get("/api/me", headers={"Authorization": f"Bearer {token}"})
    assert r.status == 200
    assert upstream.last.header("X-User-Id") == "dana"
    assert upstream.last.header("X-User-Roles") == "a,b"
    r = await client.post("/auth/login", json={"username": "erin", "password": "erin's password"})
    assert r.status == 200
    r = await client.post("/auth/login", json={"username": "dana", "password": "wrong password"})
    assert r.status == 401
    assert (await r.json())["error"] == "invalid_credentials"


def test_users_add_rejects_a_short_password(tmp_path: Path) -> None:
    users = tmp_path / "users.yaml"
    r = cli("users", "add", "dana", "--file", str(users), "--password-stdin", stdin="short\n")
    assert r.returncode == 1
    assert "at least 8 characters" in r.stderr
    assert not users.exists()
