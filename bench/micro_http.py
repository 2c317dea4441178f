"""Logins and refresh exchanges per second through a running gateway's HTTP endpoints, and a
count of Redis round trips per refresh exchange.

  python bench/micro_http.py --url http://127.0.0.1:8080 --phase refresh --redis-url redis://...
      [--clients 32] [--seconds 5] [--cpu-pids 123,456] [--client wrk|python] [--json out.json]

  login:   POST {prefix}/login back to back from concurrent aiohttp clients (argon2id verify +
           session create); the argon2 parameters are read from the hasher the users file uses.
  refresh: `clients` sessions are logged in, then POST {prefix}/refresh over `clients` keep-alive
           connections, each exchange presenting a live token and keeping its successor. The load
           generator is wrk with bench/refresh.lua (C; a queue of live tokens per thread) when wrk
           is installed, else a raw asyncio-protocol HTTP/1.1 client; either costs the box far less
           than the gateway, so exchanges/s is not capped by the client.
  rounds:  100 sequential refresh exchanges under Redis MONITOR: top-level commands per exchange
           (commands a Lua script runs show as `[db lua]` and are not round trips). Commands the
           gateway sends on a timer, not per exchange (PING health checks, the revocation feed's
           periodic re-read of the revoked set), are reported separately as background.
CPU of the gateway pids given (utime+stime from /proc) is sampled around the timed loop only.
Every loop is bounded by time and count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from bench.benchlib import BROWSER_UA, PASSWORD, cpu_seconds, summary_ms, write_json

BENCH = Path(__file__).resolve().parent
MAX_PER_CLIENT = 1_000_000
_MONITOR_LINE = re.compile(r'^\d+\.\d+ \[\d+ ([^\]]+)\] "([^"]+)"(?: "((?:[^"\\]|\\.)*)")?')
_REFRESH_TOKEN = re.compile(rb'"refresh_token"\s*:\s*"([^"]+)"')
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


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
    return {"clients": clients, "count": len(flat), "seconds": round(elapsed, 2),
            "per_s": round(len(flat) / elapsed, 1), **summary_ms(flat),
            "failures": dict(failures), "client": "aiohttp", "client_cpu_s": round(me, 2),
            **_gateway_cpu(cpu_pids, gw, elapsed, len(flat))}


def _gateway_cpu(cpu_pids: list[int], gw: float, elapsed: float, count: int) -> dict[str, Any]:
    if not cpu_pids:
        return {}
    # What one fully busy worker core would do: independent of the client's share of the box.
    return {"gateway_cpu_s": round(gw, 2), "gateway_cores": round(gw / elapsed, 2),
            "per_gateway_cpu_s": round(count / gw, 1) if gw > 0 else None}


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
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


# --- refresh ------------------------------------------------------------------------------------
async def refresh_tokens(url: str, users: list[str], clients: int) -> list[str]:
    """One live refresh token per client: logged in, then exchanged once (the warm-up)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        pairs = await asyncio.gather(*(login(session, url, users[c % len(users)])
                                       for c in range(clients)))
        tokens = []
        for pair in pairs:
            async with session.post(f"{url}/auth/refresh",
                                    json={"refresh_token": pair["refresh_token"]},
                                    headers={"User-Agent": BROWSER_UA}) as r:
                body = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"refresh warm-up failed: {r.status} {body}")
                tokens.append(body["refresh_token"])
    return tokens


async def phase_refresh(url: str, users: list[str], clients: int, seconds: float,
                        cpu_pids: list[int], ready_file: Path | None = None,
                        client: str = "wrk", wrk_threads: int = 1) -> dict[str, Any]:
    if client == "wrk":
        # One spare: wrk builds (and drops) one request on thread 0 before it connects.
        tokens = await refresh_tokens(url, users, clients + 1)
        return await wrk_refresh(url, tokens, clients, seconds, cpu_pids, ready_file,
                                 wrk_threads)
    tokens = await refresh_tokens(url, users, clients)
    return await raw_refresh(url, tokens, seconds, cpu_pids, ready_file)


async def wrk_refresh(url: str, tokens: list[str], clients: int, seconds: float,
                      cpu_pids: list[int], ready_file: Path | None, threads: int) -> dict[str, Any]:
    threads = max(1, min(threads, clients))
    prefix = urlsplit(url).path.rstrip("/")
    with tempfile.NamedTemporaryFile("w", suffix=".tokens") as f:
        f.write("\n".join(tokens) + "\n")
        f.flush()
        cmd = ["wrk", f"-t{threads}", f"-c{clients}", f"-d{max(1, round(seconds))}s",
               "--timeout", "5s", "-s", str(BENCH / "refresh.lua"), url,
               "--", f.name, str(threads), f"{prefix}/auth/refresh", BROWSER_UA]
        if ready_file is not None:
            ready_file.touch()
        gw0, me0 = cpu_seconds(cpu_pids), _children_cpu()
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE,
                                                    stderr=subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), seconds + 60)
        gw, me = cpu_seconds(cpu_pids) - gw0, _children_cpu() - me0
    text = out.decode(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{text[-2000:]}")
    w = json.loads(line.removeprefix("BENCH_JSON "))
    elapsed = w["duration_us"] / 1e6
    failures = {k: w[k] for k in ("failed", "starved") if w[k]}
    failures.update({f"socket {k[7:]}": w[k] for k in ("errors_connect", "errors_read",
                                                        "errors_write", "errors_timeout") if w[k]})
    return {"clients": clients, "count": w["ok"], "seconds": round(elapsed, 2),
            "per_s": round(w["ok"] / elapsed, 1), "p50_ms": round(w["p50_us"] / 1000, 3),
            "p99_ms": round(w["p99_us"] / 1000, 3), "mean_ms": round(w["mean_us"] / 1000, 3),
            "failures": failures, "client": f"wrk ({threads} thread(s))",
            "client_cpu_s": round(me, 2), **_gateway_cpu(cpu_pids, gw, elapsed, w["ok"])}


class _RefreshConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection exchanging its own token chain back to back."""

    def __init__(self, host: str, path: str, token: bytes, deadline: float,
                 samples: list[float], failures: Counter[str]):
        self.head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {BROWSER_UA}\r\n"
                     "Content-Type: application/json\r\nContent-Length: ").encode()
        self.token, self.deadline = token, deadline
        self.samples, self.failures = samples, failures
        self.buffer = b""
        self.started = 0.0
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        if time.monotonic() >= self.deadline or len(self.samples) >= MAX_PER_CLIENT:
            self.transport.close()
            return
        body = b'{"refresh_token":"' + self.token + b'"}'
        self.started = time.perf_counter()
        self.transport.write(self.head + str(len(body)).encode() + b"\r\n\r\n" + body)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        length = _CONTENT_LENGTH.search(self.buffer, 0, end + 2)
        if length is None or len(self.buffer) < end + 4 + int(length.group(1)):
            return
        stop = end + 4 + int(length.group(1))
        status, body, self.buffer = self.buffer[9:12], self.buffer[end + 4:stop], self.buffer[stop:]
        token = _REFRESH_TOKEN.search(body) if status == b"200" else None
        if token is None:  # the chain is lost: this connection is done
            self.failures[f"status {status.decode(errors='replace')}"] += 1
            assert self.transport is not None
            self.transport.close()
            return
        self.samples.append(time.perf_counter() - self.started)
        self.token = token.group(1)
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.failures[type(exc).__name__] += 1
        if not self.closed.done():
            self.closed.set_result(None)


async def raw_refresh(url: str, tokens: list[str], seconds: float, cpu_pids: list[int],
                      ready_file: Path | None) -> dict[str, Any]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path.rstrip("/") + "/auth/refresh"
    loop = asyncio.get_running_loop()
    latencies: list[list[float]] = [[] for _ in tokens]
    failures: Counter[str] = Counter()
    if ready_file is not None:
        ready_file.touch()
    gw0, me0, t0 = cpu_seconds(cpu_pids), _self_cpu(), time.perf_counter()
    deadline = time.monotonic() + seconds
    conns = [(await loop.create_connection(
        lambda c=c: _RefreshConnection(f"{host}:{port}", path, tokens[c].encode(), deadline,
                                       latencies[c], failures), host, port))[1]
        for c in range(len(tokens))]
    await asyncio.wait_for(asyncio.gather(*(c.closed for c in conns)), seconds + 60)
    elapsed = time.perf_counter() - t0
    gw, me = cpu_seconds(cpu_pids) - gw0, _self_cpu() - me0
    flat = [x for xs in latencies for x in xs]
    return {"clients": len(tokens), "count": len(flat), "seconds": round(elapsed, 2),
            "per_s": round(len(flat) / elapsed, 1), **summary_ms(flat),
            "failures": dict(failures), "client": "python (asyncio protocol)",
            "client_cpu_s": round(me, 2), **_gateway_cpu(cpu_pids, gw, elapsed, len(flat))}


# --- Redis round trips ------------------------------------------------------------------------
def _background(command: str, key: str) -> bool:
    """Commands the gateway sends on a timer whatever the traffic: connection health checks and
    pub/sub keep-alives (PING), and the revocation feed's periodic re-read of the revoked set."""
    return command == "PING" or (command == "ZRANGEBYSCORE" and key.endswith("revoked"))


async def _refresh_once(session: aiohttp.ClientSession, url: str, token: str) -> str:
    async with session.post(f"{url}/auth/refresh", json={"refresh_token": token}) as r:
        body = await r.json()
        if r.status != 200:
            raise RuntimeError(f"refresh: {r.status} {body}")
        return str(body["refresh_token"])


async def phase_rounds(url: str, user: str, redis_url: str, exchanges: int = 100) -> dict[str, Any]:
    """Top-level Redis commands seen by MONITOR during `exchanges` sequential refreshes."""
    parts = urlsplit(redis_url)
    async with aiohttp.ClientSession() as session:
        token = (await login(session, url, user))["refresh_token"]
        # One exchange before MONITOR starts: connecting and (after a Redis restart) reloading
        # the script happen once, not per exchange.
        token = await _refresh_once(session, url, token)
        with tempfile.TemporaryFile() as out:
            monitor = await asyncio.create_subprocess_exec(
                "redis-cli", "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379),
                "monitor", stdout=out, stderr=subprocess.DEVNULL)
            try:
                await asyncio.sleep(0.5)
                started = time.monotonic()
                for _ in range(exchanges):
                    token = await _refresh_once(session, url, token)
                await asyncio.sleep(0.5)
                window = time.monotonic() - started
            finally:
                monitor.terminate()
                await asyncio.wait_for(monitor.wait(), 5)
            out.seek(0)
            lines = out.read().decode(errors="replace").splitlines()
    top: Counter[str] = Counter()
    scripted: Counter[str] = Counter()
    background: Counter[str] = Counter()
    for line in lines:
        m = _MONITOR_LINE.match(line)
        if m is None:
            continue
        command, key = m.group(2).upper(), m.group(3) or ""
        if m.group(1) == "lua":
            scripted[command] += 1
        elif _background(command, key):
            background[command] += 1
        else:
            top[command] += 1
    return {"exchanges": exchanges, "top_level_commands": dict(top),
            "round_trips_per_exchange": round(sum(top.values()) / exchanges, 2),
            "script_commands": dict(scripted), "background_commands": dict(background),
            "monitor_seconds": round(window + 0.5, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the gateway, e.g. http://127.0.0.1:8080")
    p.add_argument("--phase", required=True, choices=["login", "refresh", "rounds"])
    p.add_argument("--users", default="bench0", help="comma-separated user names")
    p.add_argument("--clients", type=int, default=32,
                   help="concurrent clients (refresh: keep-alive connections, one session each)")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--client", choices=["wrk", "python"],
                   help="refresh load generator (default: wrk if installed, else python)")
    p.add_argument("--wrk-threads", type=int, default=1)
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
        client = args.client or ("wrk" if shutil.which("wrk") else "python")
        coro = phase_refresh(args.url, users, args.clients, args.seconds, pids, args.ready_file,
                             client, args.wrk_threads)
    else:
        if not args.redis_url:
            p.error("--phase rounds needs --redis-url")
        coro = phase_rounds(args.url, users[0], args.redis_url)
    write_json(args.json, asyncio.run(coro))


if __name__ == "__main__":
    main()
