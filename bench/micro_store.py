"""Refresh exchanges per second against a real Redis, with concurrent clients, in-process:

  store:   `SessionStore.rotate` alone: the one atomic Lua step (one EVALSHA round trip)
  service: `TokenService.refresh`: parse, mint and seal the successor, rotate, sign the access token

  python bench/micro_store.py --redis-url redis://127.0.0.1:6379/0 [--seconds 3] [--clients 32]
Sessions are created through `TokenService.login` (with a stand-in user check, so no argon2 cost)
under the prefix `gwb-store:`; they are deleted at the end. Loops are bounded by time and count.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchlib import BROWSER_UA, HS256_SECRET, summary_ms, write_json
from gateway.clock import SystemClock
from gateway.config.model import GatewayConfig, RedisConfig
from gateway.tokens import refresh as rt
from gateway.tokens.connection import connect
from gateway.tokens.service import ClientInfo, TokenService
from gateway.tokens.signer import KeyRing
from gateway.tokens.store import SessionStore
from gateway.users import UserRecord

PREFIX = "gwb-store:"
MAX_PER_CLIENT = 1_000_000


class InstantUsers:
    """Accepts every password at once: these benchmarks measure sessions, not argon2."""

    async def authenticate(self, username: str, password: str) -> UserRecord | None:
        return UserRecord(username, ("user",))

    def current(self, sub: str) -> UserRecord | None | bool:
        return UserRecord(sub, ("user",))


def service_for(redis: Any, algorithm: str) -> TokenService:
    tokens: dict[str, Any] = {"algorithm": algorithm, "issuer": "bench", "audience": "bench"}
    if algorithm == "HS256":
        tokens["secret"] = HS256_SECRET
    config = GatewayConfig.model_validate({
        "users": {"file": "unused.yaml"}, "tokens": tokens,
        "auth": {"rate_limit": {"per_ip": 10**9, "per_user": 10**9},
                 "max_sessions_per_user": 10**6},
        "redis": {"key_prefix": PREFIX},
    })
    clock = SystemClock()
    store = SessionStore(redis, PREFIX)
    return TokenService(config, KeyRing.from_config(config.tokens, clock), store, InstantUsers(),
                        clock, lambda event, fields: None)


async def drive(clients: int, seconds: float,
                step: Callable[[int], Awaitable[None]]) -> dict[str, Any]:
    """`clients` tasks each calling step(client) back to back until the deadline."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    deadline = time.monotonic() + seconds

    async def worker(c: int) -> None:
        samples = latencies[c]
        while time.monotonic() < deadline and len(samples) < MAX_PER_CLIENT:
            t0 = time.perf_counter()
            await step(c)
            samples.append(time.perf_counter() - t0)

    cpu0, t0 = _cpu(), time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker(c) for c in range(clients))), seconds + 30)
    elapsed, cpu = time.perf_counter() - t0, _cpu() - cpu0
    flat = [x for xs in latencies for x in xs]
    return {"clients": clients, "exchanges": len(flat), "seconds": round(elapsed, 2),
            "exchanges_per_s": round(len(flat) / elapsed), **summary_ms(flat),
            "client_cpu_s": round(cpu, 2)}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run(redis_url: str, seconds: float, clients: int, algorithm: str) -> dict[str, Any]:
    redis = connect(RedisConfig(url=redis_url, pool_size=max(64, clients), key_prefix=PREFIX))
    try:
        service = service_for(redis, algorithm)
        store = service.store
        client = ClientInfo("203.0.113.7", BROWSER_UA)
        pairs = [await service.login(f"user{c}", "x", client) for c in range(clients)]
        refresh_ms = int(service.keyring.config.refresh_ttl * 1000)

        # --- store only: the rotate step with precomputed digests ----------------------------
        chains: list[tuple[str, int, bytes]] = []
        for pair in pairs:
            token = rt.parse(pair.refresh_token)
            assert token is not None
            chains.append((token.sid, token.generation, token.digest))
        blob = os.urandom(60)  # the size of a sealed successor: nonce 12 + body 57 + tag 16 ~ 85

        async def rotate(c: int) -> None:
            sid, gen, digest = chains[c]
            successor = os.urandom(32)
            now_ms = int(time.time() * 1000)
            result = await store.rotate(sid, gen, digest, successor, now_ms, refresh_ms, 10_000,
                                        blob)
            if result.kind != "rotated":
                raise RuntimeError(f"rotate returned {result.kind}")
            chains[c] = (sid, gen + 1, successor)

        store_result = await drive(clients, seconds, rotate)

        # --- the whole refresh policy, in-process ----------------------------------------------
        current = [p.refresh_token for p in
                   [await service.login(f"svc{c}", "x", client) for c in range(clients)]]

        async def refresh(c: int) -> None:
            pair = await service.refresh(current[c], client)
            current[c] = pair.refresh_token

        service_result = await drive(clients, seconds, refresh)
        return {"algorithm": algorithm, "store_rotate": store_result,
                "service_refresh": service_result}
    finally:
        await _delete_prefix(redis, PREFIX)
        await redis.aclose()


async def _delete_prefix(redis: Any, prefix: str) -> None:
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            await redis.unlink(*batch)
            batch.clear()
    if batch:
        await redis.unlink(*batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--algorithm", default="EdDSA", choices=["EdDSA", "HS256"])
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    _install_uvloop()
    write_json(args.json, asyncio.run(run(args.redis_url, args.seconds, args.clients,
                                          args.algorithm)))


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


if __name__ == "__main__":
    main()
