"""Redis cost of sessions: memory per session (every index included) and refresh latency as the
number of sessions grows.

  memory: FLUSHALL, create N sessions the way `SessionStore.create` does (create.lua, then the
          per-user index commands; pipelined 1000 at a time, and checked against a session made
          by store.create itself), then (INFO used_memory delta) / N. Two users' worth
          of record shape are measured: a browser User-Agent (111 chars) and a short one; the
          report names the session hash's encoding (listpack while no value is longer than
          hash-max-listpack-value, 64 bytes by default: the User-Agent is stored in chunks).
  scale:  probe sessions created through the store, then filler sessions bulk-loaded by a Lua
          script writing the store's hash layout (same fields, same value sizes, checked against
          a probe) and the user index, up to each level (1k, 100k, 1M), each level in its own
          logical database of the same server (one keyspace each); then one client rotates each
          level's probes back to back, the levels taking turns in 10 interleaved rounds so that
          the machine's noise falls on every level alike, and `SessionStore.rotate` p50/p99 is
          recorded per level.

  python bench/micro_redis.py --redis-url redis://127.0.0.1:PORT/0 --flush-ok [--quick]
FLUSHALL wipes that Redis: --flush-ok says it is a throwaway server (the suite starts its own).
Bounded: each phase has a time budget; a level that cannot be loaded in time is reported as such.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchlib import BROWSER_UA, summary_ms, write_json
from gateway.config.model import RedisConfig
from gateway.tokens import refresh as rt
from gateway.tokens.connection import connect
from gateway.tokens.store import SessionRecord, SessionStore, _tag, _ua_fields

PREFIX = "gw:"
SHORT_UA = "curl/8.5.0"
DAY_MS = 86_400_000

# Filler sessions with SessionStore.create's layout. KEYS unused (standalone Redis only, never a
# cluster). ARGV: prefix, first index, count, now_ms, exp_ms, max_ms, sessions per user, then the
# User-Agent's field/value pairs as the store writes them (ua, ua1, ...: 64-byte chunks).
_BULK = """
local p, first, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now, exp, max, per = ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
local ua = {}
for i = 8, #ARGV do ua[#ua + 1] = ARGV[i] end
for i = first, first + n - 1 do
  local sid = string.format('F%021d', i)
  local digest = redis.sha1hex(sid)
  local user = string.format('fill%08d', math.floor(i / per))
  local key = p .. 's:{' .. sid .. '}'
  redis.call('HSET', key, 'sub', user, 'r', 'user', 'c', now, 'u', now, 'x', exp, 'm', max,
             'g', 0, 'h', string.sub(digest .. digest, 1, 32), 'k', string.sub(digest, 1, 16),
             'ip', '203.0.113.7', 'e', '{"email":"' .. user .. '@example.com"}', unpack(ua))
  redis.call('PEXPIREAT', key, exp)
  local ukey = p .. 'u:{' .. user .. '}'
  redis.call('ZADD', ukey, max, sid)
  redis.call('PEXPIREAT', ukey, max)
end
return n
"""


def record(sid: str, user: str, ua: str, now_ms: int) -> SessionRecord:
    return SessionRecord(
        sid=sid, sub=user, roles=("user",), extra=f'{{"email":"{user}@example.com"}}',
        created_ms=now_ms, last_used_ms=now_ms, expires_ms=now_ms + 14 * DAY_MS,
        max_expires_ms=now_ms + 30 * DAY_MS, ip="203.0.113.7", user_agent=ua, revoked=None,
    )


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def used_memory(redis: Any) -> int:
    return int((await redis.info("memory"))["used_memory"])


def _fields(r: SessionRecord, body_hash: bytes, mac_key: bytes) -> list[Any]:
    """The hash fields SessionStore.create writes (checked against it by `_same_layout`)."""
    fields: list[Any] = [
        "sub", r.sub, "r", ",".join(r.roles), "c", r.created_ms, "u", r.last_used_ms,
        "x", r.expires_ms, "m", r.max_expires_ms, "g", 0, "h", body_hash, "k", mac_key,
        "ip", r.ip, *_ua_fields(r.user_agent),
    ]
    return fields + (["e", r.extra] if r.extra else [])


async def create_pipelined(redis: Any, store: SessionStore, records: list[SessionRecord],
                           digests: list[bytes]) -> None:
    """What SessionStore.create sends (create.lua, then the user-index commands), for a batch of
    sessions in one pipeline instead of two round trips each."""
    async with redis.pipeline(transaction=False) as pipe:
        for r, digest in zip(records, digests):
            key = f"{PREFIX}s:{{{r.sid}}}"
            fields = _fields(r, digest, os.urandom(16))
            await store._create(keys=[key], args=[r.expires_ms, *fields], client=pipe)
            user = f"{PREFIX}u:{{{_tag(r.sub)}}}"
            pipe.zremrangebyscore(user, "-inf", r.created_ms)
            pipe.zadd(user, {r.sid: r.max_expires_ms})
            pipe.pexpireat(user, r.max_expires_ms, nx=True)
            pipe.pexpireat(user, r.max_expires_ms, gt=True)
        await pipe.execute()


async def _same_layout(redis: Any, store: SessionStore, ua: str) -> None:
    """A session written by the pipeline path must look exactly like one from store.create:
    the same hash fields with values of the same sizes, an expiry, and an expiring user index."""
    now_ms = int(time.time() * 1000)
    a = record(rt.new_sid(), "layout-a", ua, now_ms)
    b = record(rt.new_sid(), "layout-b", ua, now_ms)
    await store.create(a, os.urandom(32), os.urandom(16), 100)
    await create_pipelined(redis, store, [b], [os.urandom(32)])

    async def shape(r: SessionRecord) -> tuple[Any, ...]:
        key, user = f"{PREFIX}s:{{{r.sid}}}", f"{PREFIX}u:{{{_tag(r.sub)}}}"
        raw = await redis.hgetall(key)
        return (tuple(sorted((k, len(v)) for k, v in raw.items())), await redis.pttl(key) > 0,
                await redis.zcard(user), await redis.pttl(user) > 0)

    if await shape(a) != await shape(b):
        raise RuntimeError("the pipelined create no longer matches SessionStore.create: "
                           f"{await shape(a)} != {await shape(b)}")
    for r in (a, b):
        await redis.delete(f"{PREFIX}s:{{{r.sid}}}", f"{PREFIX}u:{{{_tag(r.sub)}}}")


async def _same_fields(redis: Any, probe: str, filler: str) -> None:
    """A bulk-loaded filler session must have the fields and encoding of one from store.create."""
    async def shape(sid: str) -> tuple[Any, ...]:
        key = f"{PREFIX}s:{{{sid}}}"
        return tuple(sorted(await redis.hkeys(key))), await redis.object("encoding", key)

    if await shape(probe) != await shape(filler):
        raise RuntimeError("the bulk loader no longer matches SessionStore.create: "
                           f"{await shape(probe)} != {await shape(filler)}")


async def create_sessions(store: SessionStore, n: int, ua: str, per_user: int,
                          budget: float) -> tuple[int, float, list[tuple[str, bytes]]]:
    """n sessions, 1000 per pipeline; returns (created, seconds, the first sessions as probes)."""
    redis = store.redis
    now_ms = int(time.time() * 1000)
    created, start = 0, time.monotonic()
    probes: list[tuple[str, bytes]] = []
    while created < n and time.monotonic() - start < budget:
        batch = min(1000, n - created)
        records, digests = [], []
        for i in range(created, created + batch):
            sid = rt.new_sid()
            token = rt.mint(sid, 0, (now_ms + 14 * DAY_MS) // 1000, (now_ms + 30 * DAY_MS) // 1000)
            records.append(record(sid, f"user{i // per_user:07d}", ua, now_ms))
            digests.append(token.digest)
        await create_pipelined(redis, store, records, digests)
        probes.extend((r.sid, d) for r, d in zip(records[:256 - len(probes)], digests))
        created += batch
    return created, time.monotonic() - start, probes


async def memory_per_session(redis: Any, n: int, ua: str, budget: float) -> dict[str, Any]:
    await redis.flushall()
    await redis.execute_command("MEMORY", "PURGE")
    store = SessionStore(redis, PREFIX)
    await _same_layout(redis, store, ua)
    before = await used_memory(redis)
    created, seconds, probes = await create_sessions(store, n, ua, per_user=2, budget=budget)
    after = await used_memory(redis)
    sid = probes[0][0]
    session_key = f"{PREFIX}s:{{{sid}}}"
    record0 = await store.get(sid)
    assert record0 is not None
    user_key = f"{PREFIX}u:{{{_tag(record0.sub)}}}"
    return {
        "sessions": created, "users": (created + 1) // 2, "user_agent_chars": len(ua),
        "create_seconds": round(seconds, 2), "creates_per_s": round(created / seconds),
        "used_memory_delta": after - before,
        "bytes_per_session": round((after - before) / created),
        "keys": int(await redis.dbsize()),
        "session_hash_encoding": (await redis.object("encoding", session_key)).decode(),
        "session_hash_memory_usage": await redis.memory_usage(session_key),
        "user_index_encoding": (await redis.object("encoding", user_key)).decode(),
        "user_index_memory_usage": await redis.memory_usage(user_key),
    }


async def rotate_round(store: SessionStore, probes: list[list[Any]], count: int,
                       samples: list[float], deadline: float) -> None:
    """One client, back to back over the probe sessions: latency without queueing."""
    blob = os.urandom(85)
    for i in range(count):
        if time.monotonic() >= deadline:
            return
        probe = probes[i % len(probes)]
        sid, gen, digest = probe
        successor = os.urandom(32)
        t0 = time.perf_counter()
        result = await store.rotate(sid, gen, digest, successor, int(time.time() * 1000),
                                    14 * DAY_MS, 10_000, blob)
        samples.append(time.perf_counter() - t0)
        if result.kind != "rotated":
            raise RuntimeError(f"rotate of a probe session returned {result.kind}")
        probe[1], probe[2] = gen + 1, successor


async def load_level(redis: Any, level: int, budget: float) -> tuple[list[list[Any]], int, float]:
    """200 probe sessions through the real store, then filler sessions up to `level`."""
    store = SessionStore(redis, PREFIX)
    now_ms = int(time.time() * 1000)
    probes: list[list[Any]] = []
    for i in range(200):  # the probes go through the real login path
        sid = rt.new_sid()
        token = rt.mint(sid, 0, (now_ms + 14 * DAY_MS) // 1000, (now_ms + 30 * DAY_MS) // 1000)
        await store.create(record(sid, f"probe{i // 2:04d}", BROWSER_UA, now_ms), token.digest,
                           rt.new_mac_key(), 100)
        probes.append([sid, 0, token.digest])
    bulk = redis.register_script(_BULK)
    loaded, t0 = len(probes), time.monotonic()
    while loaded < level and time.monotonic() - t0 < budget:
        n = min(20_000, level - loaded)
        await bulk(args=[PREFIX, loaded, n, now_ms, now_ms + 14 * DAY_MS,
                         now_ms + 30 * DAY_MS, 2, *_ua_fields(BROWSER_UA)])
        if loaded == len(probes):
            await _same_fields(redis, probes[0][0], f"F{loaded:021d}")
        loaded += n
    return probes, loaded, time.monotonic() - t0


async def scale(redis_url: str, levels: list[int], rotations: int, rounds: int,
                budget: float) -> dict[str, Any]:
    """Each level lives in its own logical database of the same server (Redis keeps one keyspace
    dict per database), and the levels are measured in interleaved rounds: a level measured
    minutes after another would compare the machine's noise at two moments, not the levels."""
    clients = [connect(RedisConfig(url=_with_db(redis_url, db), pool_size=4, timeout=30.0))
               for db in range(len(levels))]
    try:
        await clients[0].flushall()
        await clients[0].execute_command("MEMORY", "PURGE")
        stores, probes, out = [], [], []
        for level, redis in zip(levels, clients):
            before = await used_memory(redis)
            level_probes, loaded, load_seconds = await load_level(redis, level, budget)
            if loaded < level:
                out.append({"level": level, "reached": loaded, "note": "load budget exhausted"})
                break
            stores.append(SessionStore(redis, PREFIX))
            probes.append(level_probes)
            out.append({"level": level, "sessions": loaded, "keys": int(await redis.dbsize()),
                        "load_seconds": round(load_seconds, 2),
                        "used_memory_mb": round((await used_memory(redis) - before) / 2**20, 1)})
        await asyncio.sleep(2.0)  # let the incremental rehash of the big keyspace finish
        deadline = time.monotonic() + 60
        for i, store in enumerate(stores):  # warm-up, not recorded: connections, script cache
            await rotate_round(store, probes[i], 200, [], deadline)
        samples: list[list[float]] = [[] for _ in stores]
        round_p50: list[list[float]] = [[] for _ in stores]
        for _ in range(rounds):
            for i, store in enumerate(stores):
                mark = len(samples[i])
                await rotate_round(store, probes[i], rotations // rounds, samples[i], deadline)
                if len(samples[i]) > mark:
                    round_p50[i].append(summary_ms(samples[i][mark:])["p50_ms"])
        for i in range(len(stores)):
            out[i].update({"rotations": len(samples[i]), "rounds": len(round_p50[i]),
                           **summary_ms(samples[i]),
                           "round_p50_ms": [min(round_p50[i]), max(round_p50[i])]
                           if round_p50[i] else None})
        await clients[0].flushall()
        return {"levels": out, "interleaved_rounds": rounds}
    finally:
        for c in clients:
            await c.aclose()


def _with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


async def run(redis_url: str, quick: bool) -> dict[str, Any]:
    redis = connect(RedisConfig(url=redis_url, pool_size=64, timeout=30.0))
    try:
        info = await redis.info("server")
        config = await redis.config_get("hash-max-listpack-*")
        n = 10_000 if quick else 100_000
        levels = [1_000, 10_000, 100_000] if quick else [1_000, 100_000, 1_000_000]
        return {
            "redis_version": info["redis_version"],
            "redis_config": {_str(k): _str(v) for k, v in config.items()},
            "memory": [await memory_per_session(redis, n, BROWSER_UA, budget=120),
                       await memory_per_session(redis, n, SHORT_UA, budget=120)],
            "scale": await scale(redis_url, levels, rotations=2_000 if quick else 10_000,
                                 rounds=10, budget=150),
        }
    finally:
        await redis.flushall()
        await redis.aclose()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--flush-ok", action="store_true", help="this Redis may be wiped")
    p.add_argument("--quick", action="store_true", help="10k sessions; levels 1k/10k/100k")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if not args.flush_ok:
        p.error("--flush-ok is required: this benchmark runs FLUSHALL on that Redis")
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    write_json(args.json, asyncio.run(run(args.redis_url, args.quick)))


if __name__ == "__main__":
    main()
