"""Fixtures for the browser tests: Debian's chromium under Playwright, the demo upstream app and a
real gateway process on the real redis-server, configured for browser sign-in over plain http."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import PASSWORD, REPO, gateway_yaml
from tests.support.browser import DemoUpstream, write_cheap_users
from tests.support.gateway_process import GatewayProcess, write_config
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer, require_binary

ARTIFACTS = REPO / "test-artifacts"
ACCESS_TTL = 2.0
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # No name is ever looked up outside this machine: a redirect to evil.test fails to resolve
    # instead of sending a DNS query anywhere.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
]


def _playwright() -> ModuleType:
    try:
        from playwright import sync_api
    except ImportError:
        message = "playwright is not installed (pip install -e '.[test]')"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return sync_api


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    executable = require_binary("chromium")
    sync_api = _playwright()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def demo() -> Iterator[DemoUpstream]:
    upstream = DemoUpstream().start()
    try:
        yield upstream
    finally:
        upstream.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer,
       demo: DemoUpstream) -> Iterator[GatewayProcess]:
    """The real gateway: access_ttl 2s, reuse_grace 10s, cookies over plain http on loopback.

    `localhost:{demo port}` is an allowed return host: another origin a sign-in may go back to.
    """
    directory = tmp_path_factory.mktemp("e2e-browser")
    users = write_cheap_users(directory / "users.yaml", PASSWORD)
    port = free_port()
    text = gateway_yaml(
        demo.url, users, redis_url=redis_server.url,
        tokens=f"access_ttl: {ACCESS_TTL:g}s\nrefresh_ttl: 1h\nreuse_grace: 10s\nleeway: 0s\n",
        extra=textwrap.dedent(f"""\
            cookies: {{enabled: true, secure: false}}
            auth:
              allowed_return_hosts: ['localhost:{demo.port}']
            """),
        routes=f"- {{name: app, path: /app, upstream: {demo.url}, auth: required, browser: true}}\n",
    ).replace("{port}", str(port))
    proc = GatewayProcess(write_config(directory, text), port)
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def context(chromium: Any) -> Iterator[Any]:
    """A fresh browser profile (its own cookie jar and history) per test."""
    ctx = chromium.new_context(viewport={"width": 1024, "height": 720})
    ctx.set_default_timeout(10_000)
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
