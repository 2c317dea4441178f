"""Shared fixtures: a real redis-server per test session, echo upstreams, gateway configs."""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.support.redis_server import RedisServer, start_redis
from tests.support.upstream import Upstream

# The real-process fixture (`process_gateway`) for every module that starts `gateway serve`.
pytest_plugins = ("tests.support.processes",)

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "correct horse battery"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[Any]:
    """A client of the real server, flushed before each test."""
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = await Upstream().start()
    yield up
    await up.stop()


@pytest.fixture(scope="session")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """alice (user, email claim), bob (user, admin), carol (disabled); password PASSWORD.

    Hashed with cheap argon2id parameters so logins in tests take milliseconds; the
    production cost is exercised by the tests of `gateway users add` and the demo users.
    """
    from tests.support.tokens import write_users

    return write_users(tmp_path_factory.mktemp("users") / "users.yaml")


def gateway_yaml(upstream_url: str, users: Path, *, redis_url: str = "memory://",
                 extra: str = "", routes: str | None = None, tokens: str = "") -> str:
    """A complete config: the usual routes to `upstream_url`, overridable sections."""
    routes = routes if routes is not None else textwrap.dedent(f"""\
        - {{name: public, path: /public, upstream: {upstream_url}, auth: public}}
        - {{name: optional, path: /optional, upstream: {upstream_url}, auth: optional}}
        - {{name: api, path: /api, upstream: {upstream_url}, auth: required}}
        - {{name: admin, path: /admin, upstream: {upstream_url}, auth: required, roles: [admin]}}
    """)
    return (
        "listen: {host: 127.0.0.1, port: {port}}\n"
        f"redis: {{url: '{redis_url}'}}\n"
        f"users: {{file: '{users}'}}\n"
        f"tokens:\n  issuer: test-gateway\n  audience: test\n{textwrap.indent(tokens, '  ')}\n"
        + extra
        + "routes:\n" + textwrap.indent(routes, "  ")
    )


@pytest.fixture
def make_yaml(users_file: Path) -> Callable[..., str]:
    def make(upstream_url: str, **kwargs: Any) -> str:
        return gateway_yaml(upstream_url, users_file, **kwargs)

    return make


@pytest.fixture
async def gateway(
    aiohttp_client: Any, make_yaml: Callable[..., str], upstream: Upstream
) -> Callable[..., Any]:
    """An in-process gateway (create_app) in front of `upstream`; returns an aiohttp TestClient.

    `gateway(**yaml_kwargs)` or `gateway(config_text=...)`; pass `redis=` (a client) and
    `clock=` to inject them.
    """
    from gateway.app import create_app
    from gateway.config import load_config_text

    async def make(config_text: str | None = None, *, redis: Any = None, clock: Any = None,
                   **kwargs: Any) -> Any:
        text = config_text if config_text is not None else make_yaml(upstream.url, **kwargs)
        config = load_config_text(text.replace("{port}", "0"), "test.yaml")
        return await aiohttp_client(create_app(config, redis=redis, clock=clock))

    return make
