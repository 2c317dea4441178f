"""Support for the browser sign-in tests: a users file that is cheap to verify, and the demo
upstream app (gateway.demo) served from a background thread for a real browser to load."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from aiohttp import web
from argon2 import PasswordHasher

from gateway.demo import demo_upstream
from tests.support.ports import free_port, wait_port


def write_cheap_users(path: Path, password: str) -> Path:
    """alice (user) and bob (user, admin): real argon2id hashes, with the cheapest parameters,
    so that the many sign-ins of these tests do not spend seconds hashing."""
    hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    users = {
        "alice": {"password_hash": hasher.hash(password), "roles": ["user"]},
        "bob": {"password_hash": hasher.hash(password), "roles": ["user", "admin"]},
    }
    path.write_text(yaml.safe_dump({"users": users}))
    return path


@dataclass
class DemoUpstream:
    """`gateway.demo.demo_upstream()` on a free loopback port, in its own thread and loop."""

    port: int = field(default_factory=free_port)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> DemoUpstream:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="demo-upstream", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), loop).result(10)
        wait_port(self.port)
        return self

    async def _serve(self) -> None:
        self._runner = web.AppRunner(demo_upstream(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        self._loop = self._thread = None
