"""A bounded soak driver: concurrent clients running logins, proxied requests, refreshes, reuse
attempts and logouts against a gateway, each checked against the statuses it may get, while a
model of every session says what Redis must hold at the end."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

#: The statuses (and for errors, codes) each operation may get; anything else is a failure.
EXPECTED: dict[str, set[tuple[int, str | None]]] = {
    "login": {(200, None)},
    "bad_login": {(401, "invalid_credentials"), (429, "rate_limited")},
    "proxy": {(200, None)},
    "refresh": {(200, None)},
    "reuse": {(401, "refresh_token_reused")},
    "logout": {(204, None)},
    "revoked_access": {(401, "token_revoked")},
}


@dataclass
class Session:
    sid: str
    user: str
    access: str
    refresh: str
    #: Refresh tokens this session rotated away from, with when they were replaced.
    replaced: list[tuple[str, float]] = field(default_factory=list)
    #: None while live; else why it ended ("logout", "reused").
    ended: str | None = None
    ended_at: float = 0.0


@dataclass
class Report:
    ops: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    sessions: dict[str, Session] = field(default_factory=dict)
    #: (seconds since start, RSS bytes, open fds) of the gateway process, about once a second.
    samples: list[tuple[float, int, int]] = field(default_factory=list)

    def live(self) -> set[str]:
        return {sid for sid, s in self.sessions.items() if s.ended is None}

    def ended(self) -> set[str]:
        return {sid for sid, s in self.sessions.items() if s.ended is not None}


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sid_of(access_token: str) -> str:
    payload = access_token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sid"])


class Soak:
    def __init__(self, url: str, *, users: list[str], password: str, clients: int = 20,
                 reuse_grace: float = 1.0, logins_per_second: float = 3.0, seed: int = 0):
        self.url = url
        self.users = users
        self.password = password
        self.clients = clients
        self.reuse_grace = reuse_grace
        self.login_interval = 1.0 / logins_per_second
        self.report = Report()
        self._random = random.Random(seed)
        self._login_lock = asyncio.Lock()
        self._next_login = 0.0
        self._revoked_tokens: list[tuple[str, float]] = []

    # --- one checked call --------------------------------------------------------------------
    async def _call(self, http: aiohttp.ClientSession, op: str, method: str, path: str,
                    **kw: Any) -> tuple[int, dict[str, Any]]:
        async with http.request(method, self.url + path, **kw) as r:
            text = await r.text()
            status = r.status
        body: dict[str, Any] = {}
        if text:
            try:
                body = json.loads(text)
            except ValueError:
                body = {"_raw": text[:200]}
        code = body.get("error") if status >= 400 else None
        self.report.ops[op] += 1
        if (status, code) not in EXPECTED[op]:
            self.report.unexpected.append(f"{op} {method} {path}: {status} {text[:200]}")
        return status, body

    async def _paced_login(self) -> None:
        """Logins cost ~100 ms of argon2 on the gateway: keep them to a steady trickle."""
        async with self._login_lock:
            wait = self._next_login - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._next_login = time.monotonic() + self.login_interval

    # --- operations ----------------------------------------------------------------------------
    async def login(self, http: aiohttp.ClientSession, user: str) -> Session | None:
        await self._paced_login()
        status, body = await self._call(http, "login", "POST", "/auth/login",
                                        json={"username": user, "password": self.password})
        if status != 200:
            return None
        session = Session(sid_of(body["access_token"]), user, body["access_token"],
                          body["refresh_token"])
        if session.sid in self.report.sessions:
            self.report.unexpected.append(f"login returned an existing session {session.sid}")
        self.report.sessions[session.sid] = session
        return session

    async def bad_login(self, http: aiohttp.ClientSession) -> None:
        await self._paced_login()
        await self._call(http, "bad_login", "POST", "/auth/login",
                         json={"username": "mallory", "password": "wrong"})

    async def proxy(self, http: aiohttp.ClientSession, s: Session, n: int) -> None:
        await self._call(http, "proxy", "GET", f"/api/soak/{n}",
                         headers={"Authorization": f"Bearer {s.access}"})

    async def refresh(self, http: aiohttp.ClientSession, s: Session) -> None:
        status, body = await self._call(http, "refresh", "POST", "/auth/refresh",
                                        json={"refresh_token": s.refresh})
        if status == 200:
            s.replaced.append((s.refresh, time.monotonic()))
            s.refresh, s.access = body["refresh_token"], body["access_token"]

    async def reuse(self, http: aiohttp.ClientSession, s: Session, old: str) -> None:
        """A replaced token, past the grace window: theft; the session ends."""
        status, _ = await self._call(http, "reuse", "POST", "/auth/refresh",
                                     json={"refresh_token": old})
        if status == 401:
            self._end(s, "reused")

    async def logout(self, http: aiohttp.ClientSession, s: Session) -> None:
        status, _ = await self._call(http, "logout", "POST", "/auth/logout",
                                     json={"refresh_token": s.refresh})
        if status == 204:
            self._end(s, "logout")

    async def revoked_access(self, http: aiohttp.ClientSession, token: str) -> None:
        await self._call(http, "revoked_access", "GET", "/api/soak/revoked",
                         headers={"Authorization": f"Bearer {token}"})

    def _end(self, s: Session, reason: str) -> None:
        s.ended, s.ended_at = reason, time.monotonic()
        self._revoked_tokens.append((s.access, s.ended_at))

    # --- the clients ---------------------------------------------------------------------------
    async def _client(self, http: aiohttp.ClientSession, index: int, deadline: float) -> None:
        rnd = random.Random(self._random.random())
        user = self.users[index % len(self.users)]
        session: Session | None = None
        n = 0
        while time.monotonic() < deadline:
            n += 1
            try:
                if session is None or session.ended is not None:
                    session = await self.login(http, user)
                    continue
                roll = rnd.random()
                now = time.monotonic()
                stale = [t for t, at in session.replaced if now - at > self.reuse_grace + 0.5]
                settled = [t for t, at in self._revoked_tokens if now - at > 1.0]
                if roll < 0.70:
                    await self.proxy(http, session, n)
                elif roll < 0.85:
                    await self.refresh(http, session)
                elif roll < 0.88 and stale:
                    await self.reuse(http, session, rnd.choice(stale))
                elif roll < 0.91:
                    await self.logout(http, session)
                elif roll < 0.95 and settled:
                    await self.revoked_access(http, rnd.choice(settled))
                elif roll < 0.965:
                    await self.bad_login(http)
                elif roll < 0.98:
                    session = None  # abandoned: stays live in Redis, and in the model
                else:
                    await asyncio.sleep(0.05)
            except (TimeoutError, aiohttp.ClientError) as e:
                self.report.unexpected.append(f"client {index}: {type(e).__name__}: {e}")
                await asyncio.sleep(0.1)

    async def _sample(self, pid: int, started: float, deadline: float) -> None:
        while time.monotonic() < deadline:
            self.report.samples.append(
                (time.monotonic() - started, rss_bytes(pid), open_fds(pid)))
            await asyncio.sleep(1.0)

    async def run(self, seconds: float, pid: int) -> Report:
        started = time.monotonic()
        deadline = started + seconds
        timeout = aiohttp.ClientTimeout(total=30)
        connector = aiohttp.TCPConnector(limit=self.clients)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            sampler = asyncio.ensure_future(self._sample(pid, started, deadline))
            await asyncio.gather(*(self._client(http, i, deadline) for i in range(self.clients)))
            await sampler
        return self.report
