"""Helpers for the token-service tests: log in, refresh, read error codes, dump what Redis holds."""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from argon2 import PasswordHasher

from tests.conftest import PASSWORD
from tests.support.ports import free_port


def write_users(path: Path, *, cheap: bool = True) -> Path:
    """alice (user, email claim), bob (user, admin), carol (disabled); password PASSWORD.

    Cheap argon2id parameters keep logins fast; the gateway's dummy hash for unknown users
    follows the parameters the file uses.
    """
    ph = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1) if cheap else PasswordHasher()
    users = {
        "alice": {"password_hash": ph.hash(PASSWORD), "roles": ["user"],
                  "claims": {"email": "alice@example.test"}},
        "bob": {"password_hash": ph.hash(PASSWORD), "roles": ["user", "admin"]},
        "carol": {"password_hash": ph.hash(PASSWORD), "roles": ["user"], "disabled": True},
    }
    path.write_text(yaml.safe_dump({"users": users}))
    return path


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def jwt_claims(token: str) -> dict[str, Any]:
    """The (unverified) payload of a JWT, to read what the gateway put in it."""
    return json.loads(unb64(token.split(".")[1]))


async def login(client: Any, user: str = "alice", password: str = PASSWORD,
                **kw: Any) -> dict[str, Any]:
    r = await client.post("/auth/login", json={"username": user, "password": password}, **kw)
    assert r.status == 200, await r.text()
    return await r.json()


async def refresh(client: Any, token: str, **kw: Any) -> Any:
    return await client.post("/auth/refresh", json={"refresh_token": token}, **kw)


async def refreshed(client: Any, token: str) -> dict[str, Any]:
    r = await refresh(client, token)
    assert r.status == 200, await r.text()
    return await r.json()


async def error_of(response: Any, status: int) -> str:
    """Asserts the status and the JSON error body shape; returns the error code."""
    text = await response.text()
    assert response.status == status, text
    body = json.loads(text)
    assert set(body) == {"error", "error_description"}, body
    assert isinstance(body["error_description"], str) and body["error_description"]
    return str(body["error"])


async def refresh_error(client: Any, token: str) -> str:
    """The error code of a refresh that must fail with 401."""
    return await error_of(await refresh(client, token), 401)


def bearer(tokens: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens['access_token']}"}


async def redis_dump(redis: Any) -> list[tuple[bytes, str, list[bytes]]]:
    """Every key with its type and every byte string it holds (fields, members, values)."""
    out = []
    async for key in redis.scan_iter(count=1000):
        kind = (await redis.type(key)).decode()
        parts: list[bytes] = []
        if kind == "hash":
            for k, v in (await redis.hgetall(key)).items():
                parts += [k, v]
        elif kind == "string":
            parts.append(await redis.get(key))
        elif kind == "zset":
            for member, score in await redis.zrange(key, 0, -1, withscores=True):
                parts += [member, repr(score).encode()]
        elif kind == "set":
            parts += list(await redis.smembers(key))
        elif kind == "list":
            parts += list(await redis.lrange(key, 0, -1))
        else:
            raise AssertionError(f"unexpected key type {kind} for {key!r}")
        out.append((key, kind, parts))
    return out


@dataclass
class UserService:
    """A team's user service on loopback: POST {username, password} -> the configured answer."""

    status: int = 200
    #: A JSON document, or a str sent as text/html (a proxy's error page, say).
    body: Any = field(default_factory=lambda: {"sub": "u-alice", "roles": ["user"]})
    delay: float = 0.0
    port: int = field(default_factory=free_port)
    calls: list[dict[str, Any]] = field(default_factory=list)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/verify"

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append(await request.json())
        if self.delay:
            await asyncio.sleep(self.delay)
        if isinstance(self.body, str):
            return web.Response(text=self.body, content_type="text/html", status=self.status)
        return web.json_response(self.body, status=self.status)

    async def start(self) -> UserService:
        app = web.Application()
        app.router.add_post("/verify", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
