"""Logins and refresh exchanges per second through a running gateway's HTTP endpoints, with
concurrent aiohttp clients, and a count of Redis round trips per refresh exchange.

  python bench/micro_http.py --url http://127.0.0.1:8080 --phase refresh --redis-url redis://...
      [--clients 32] [--seconds 5] [--cpu-pids 123,456] [--json out.json]

  login:   POST {prefix}/login back to back (argon2id verify + session create); the argon2
           parameters are read from the hasher the users file uses.
  refresh: each client logs in once, then POST {prefix}/refresh with its latest refresh token.
  rounds:  100 sequential refresh exchanges under Redis MONITOR: top-level commands per exchange
           (commands a Lua script runs show as `[db lua]` and are not round trips).
CPU of the gateway pids given (utime+stime from /proc) is sampled around the timed loop only.
Every loop is bounded by time and count.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402

from bench.benchlib import BROWSER_UA, PASSWORD, cpu_seconds, summary_ms, write_json  # noqa: E402

MAX_PER_CLIENT = 1_000_000
_MONITOR_LINE = re.compile(r'^\d+\.\d+ \[\d+ ([^\]]+)\] "([^"]+)"')


async def login(session: aiohttp.ClientSession, url: str, user: str) -> dict[str, Any]:
    async with session.post(f"{url}/auth/login", json={"username": user, "password": PASSWORD},
                            headers={"User-Agent": BROWSER_UA}) as r:
        body = await r.json()
        if r.status != 200:
            raise RuntimeError(f"login {user}: {r.status} {body}")
        return dict(body)


async def timed_loop(clients: int, seconds: float, step: Any, cpu_pids: list[int],
                     ready_file: Path | None = None) -> dict[str, Any]:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures: Counter[str] = Counter()
    deadline = time.monotonic() + seconds

    async def worker(c: int) -> None:
        samples = latencies[c]
        while time.monotonic() < deadline and len(samples) < MAX_PER_CLIENT:
            t0 = time.perf_counter()
            error = await step(c)
            if error:
                failures[error] += 1
                if sum(failures.values()) > 100:
                    return
                continue
            samples.append(time.perf_counter() - t0)

    if ready_file is not None:  # tells a profiler that the timed loop starts now
        ready_file.touch()
    gw0, me0, t0 = cpu_seconds(cpu_pids), _self_cpu(), time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker(c) for c in range(clients))), seconds + 60)
    elapsed = time.perf_counter() - t0
    gw, me = cpu_seconds(cpu_pids) - gw0, _self_cpu() - me0
    flat = [x for xs in latencies for x in xs]
    out: dict[str, Any] = {
        "clients": clients, "count": len(flat), "seconds": round(elapsed, 2),
        "per_s": round(len(flat) / elapsed, 1), **summary_ms(flat),
        "failures": dict(failures), "client_cpu_s": round(me, 2),
    }
    if cpu_pids:
        out["gateway_cpu_s"] = round(gw, 2)
        out["gateway_cores"] = round(gw / elapsed, 2)
        # What one fully busy worker core would do: independent of the client's share of the box.
        out["per_gateway_cpu_s"] = round(len(flat) / gw, 1) if gw > 0 else None
    return out


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def argon2_parameters() -> dict[str, Any]:
    from gateway.users.file import hasher

    h = hasher()
    digest = h.hash(PASSWORD)
    t0 = time.perf_counter()
    for _ in range(5):
        h.verify(digest, PASSWORD)
    one = (time.perf_counter() - t0) / 5
    return {"type": h.type.name, "time_cost": h.time_cost, "memory_cost_kib": h.memory_cost,
            "parallelism": h.parallelism, "hash_len": h.hash_len, "salt_len": h.salt_len,
            "verify_ms_one_thread": round(one * 1000, 1)}


async def phase_login(url: str, users: list[str], clients: int, seconds: float,
                      cpu_pids: list[int]) -> dict[str, Any]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        await login(session, url, users[0])  # warm-up

        async def step(c: int) -> str | None:
            user = users[c % len(users)]
            async with session.post(f"{url}/auth/login",
                                    json={"username": user, "password": PASSWORD},
                                    headers={"User-Agent": BROWSER_UA}) as r:
                await r.read()
                return None if r.status == 200 else f"status {r.status}"

        result = await timed_loop(clients, seconds, step, cpu_pids)
    return {"argon2": argon2_parameters(), **result}


async def phase_refresh(url: str, users: list[str], clients: int, seconds: float,
                        cpu_pids: list[int], ready_file: Path | None = None) -> dict[str, Any]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        pairs = await asyncio.gather(*(login(session, url, users[c % len(users)])
                                       for c in range(clients)))
        current = [p["refresh_token"] for p in pairs]

        async def step(c: int) -> str | None:
            async with session.post(f"{url}/auth/refresh", json={"refresh_token": current[c]},
                                    headers={"User-Agent": BROWSER_UA}) as r:
                body = await r.json()
                if r.status != 200:
                    return f"status {r.status} {body.get('error')}"
                current[c] = body["refresh_token"]
                return None

        for c in range(clients):  # warm-up: one exchange each
            if await step(c):
                raise RuntimeError("refresh warm-up failed")
        return await timed_loop(clients, seconds, step, cpu_pids, ready_file)


async def phase_rounds(url: str, user: str, redis_url: str, exchanges: int = 100) -> dict[str, Any]:
    """Top-level Redis commands seen by MONITOR during `exchanges` sequential refreshes."""
    parts = urlsplit(redis_url)
    async with aiohttp.ClientSession() as session:
        token = (await login(session, url, user))["refresh_token"]
        with tempfile.TemporaryFile() as out:
            monitor = subprocess.Popen(
                ["redis-cli", "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379),
                 "monitor"], stdout=out, stderr=subprocess.DEVNULL)
            try:
                await asyncio.sleep(0.5)
                for _ in range(exchanges):
                    async with session.post(f"{url}/auth/refresh",
                                            json={"refresh_token": token}) as r:
                        body = await r.json()
                        if r.status != 200:
                            raise RuntimeError(f"refresh: {r.status} {body}")
                        token = body["refresh_token"]
                await asyncio.sleep(0.5)
            finally:
                monitor.terminate()
                monitor.wait(5)
            out.seek(0)
            lines = out.read().decode(errors="replace").splitlines()
    top: Counter[str] = Counter()
    scripted: Counter[str] = Counter()
    for line in lines:
        m = _MONITOR_LINE.match(line)
        if m is None:
            continue
        (scripted if m.group(1) == "lua" else top)[m.group(2).upper()] += 1
    background = top.pop("PING", 0)  # connection health checks, not part of an exchange
    return {"exchanges": exchanges, "top_level_commands": dict(top),
            "round_trips_per_exchange": round(sum(top.values()) / exchanges, 2),
            "script_commands": dict(scripted), "background_pings": background}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True, help="the gateway, e.g. http://127.0.0.1:8080")
    p.add_argument("--phase", required=True, choices=["login", "refresh", "rounds"])
    p.add_argument("--users", default="bench0", help="comma-separated user names")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--redis-url", help="needed by --phase rounds")
    p.add_argument("--cpu-pids", default="", help="gateway pids whose CPU is sampled")
    p.add_argument("--ready-file", type=Path, help="touched when the timed refresh loop starts")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    users = [u for u in args.users.split(",") if u]
    pids = [int(x) for x in args.cpu_pids.split(",") if x]
    if args.phase == "login":
        coro = phase_login(args.url, users, args.clients, args.seconds, pids)
    elif args.phase == "refresh":
        coro = phase_refresh(args.url, users, args.clients, args.seconds, pids, args.ready_file)
    else:
        if not args.redis_url:
            p.error("--phase rounds needs --redis-url")
        coro = phase_rounds(args.url, users[0], args.redis_url)
    write_json(args.json, asyncio.run(coro))


if __name__ == "__main__":
    main()
