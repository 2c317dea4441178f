"""Sessions, rate-limit counters and the revocation feed in Redis, behind intent-named methods.

Keys (prefix `gw:` by default) are hash-tagged so each Lua script touches one cluster slot:
  {p}s:{sid}      session hash (the only copy of a session; TTL = its idle expiry)
  {p}g:{sid}      encrypted successor token during the reuse-grace window (TTL = grace)
  {p}u:{user}     sorted set of a user's sids scored by absolute expiry (the per-user index)
  {p}revoked      sorted set of revoked sids scored by when their last access token expires
  {p}rl:...       fixed-window rate-limit counters
Redis errors are translated here, once, into StoreUnavailable.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import importlib.resources
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.exceptions import RedisError

from gateway.errors import StoreUnavailable
from gateway.tokens.pipelined import PipelinedConnection

T = TypeVar("T")
#: Seconds without traffic on the revocation channel before it is pinged (and given up on when
#: the PONG does not come back within as long again).
_FEED_IDLE = 10.0


def _lua(name: str) -> str:
    return importlib.resources.files("gateway.tokens").joinpath(f"lua/{name}.lua").read_text()


def _tag(value: str) -> str:
    """A hash-tag-safe rendering of an arbitrary string (user names may contain braces)."""
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


@dataclass(frozen=True, slots=True)
class SessionRecord:
    sid: str
    sub: str
    roles: tuple[str, ...]
    extra: str
    created_ms: int
    last_used_ms: int
    expires_ms: int
    max_expires_ms: int
    ip: str
    user_agent: str
    revoked: str | None


@dataclass(frozen=True, slots=True)
class RotateResult:
    kind: str  # rotated | grace | reused | verify | revoked | expired | missing | invalid
    sub: str = ""
    roles: tuple[str, ...] = ()
    extra: str = ""
    expires_ms: int = 0
    blob: bytes = b""
    mac_key: bytes = b""


def _s(value: bytes | None) -> str:
    return value.decode() if value else ""


def _roles(value: bytes | None) -> tuple[str, ...]:
    return tuple(r for r in _s(value).split(",") if r)


#: Redis keeps a hash in its compact listpack encoding only while every value is at most
#: `hash-max-listpack-value` bytes (64 by default); a single longer one (a browser User-Agent is
#: over 100) turns the whole session into a hashtable, twice the memory. So the User-Agent is
#: stored in chunks of at most 64 bytes as fields ua, ua1, ua2, ... (the other fields stay whole:
#: the README's Redis notes say which can outgrow 64 bytes).
_CHUNK = 64
#: 1 KiB: more than the 256 characters the token service keeps can take (4 bytes at most each).
_UA_MAX_BYTES = 1024


def _ua_fields(user_agent: str) -> list[Any]:
    """`ua`, first chunk[, `ua1`, next chunk, ...]: cut at character boundaries, so every chunk
    is UTF-8 by itself (a gateway of the previous version, reading only `ua` during a rolling
    upgrade, shows a prefix rather than failing to decode)."""
    data = user_agent.encode()
    if len(data) > _UA_MAX_BYTES:
        data = data[:_UA_MAX_BYTES].decode(errors="ignore").encode()  # drop a cut character
    fields: list[Any] = []
    start = 0
    while True:
        end = min(start + _CHUNK, len(data))
        while end < len(data) and data[end] & 0xC0 == 0x80:  # a continuation byte: back off
            end -= 1
        fields += [f"ua{len(fields) // 2}" if fields else "ua", data[start:end]]
        start = end
        if start >= len(data):
            return fields


def _user_agent(raw: dict[bytes, bytes]) -> str:
    """The User-Agent from its chunks (one `ua` field in sessions of the previous layout). Bytes
    are joined before decoding; a revoked session has lost `ua`, so no stray tail is read."""
    parts: list[bytes] = []
    name = b"ua"
    while name in raw and len(parts) < len(raw):
        parts.append(raw[name])
        name = b"ua%d" % len(parts)
    return b"".join(parts).decode()


class SessionStore:
    def __init__(self, redis: Any, prefix: str,
                 observe: Callable[[str, float, bool], None] | None = None):
        self.redis = redis
        self.prefix = prefix
        #: Told (operation, seconds, failed) after every Redis round trip: latency/error metrics.
        self.observe = observe
        self.channel = f"{prefix}revocations"
        self._revoked_key = f"{prefix}revoked"
        self._rotate = redis.register_script(_lua("rotate"))
        self._revoke = redis.register_script(_lua("revoke"))
        self._create = redis.register_script(_lua("create"))
        self._hit = redis.register_script(_lua("hit"))
        #: connect()'s pipelined connection to the same server (gateway.tokens.pipelined), when
        #: it made one: the hot-path scripts go over it, with none of a pooled command's overhead.
        self._lane: PipelinedConnection | None = getattr(redis, "lane", None)

    # --- keys ------------------------------------------------------------------------------
    def _session_keys(self, sid: str) -> list[str]:
        return [f"{self.prefix}s:{{{sid}}}", f"{self.prefix}g:{{{sid}}}"]

    def _user_key(self, sub: str) -> str:
        return f"{self.prefix}u:{{{_tag(sub)}}}"

    def _script(self, script: Any, keys: list[str], args: list[Any]) -> Awaitable[Any]:
        if self._lane is not None:
            return self._lane.evalsha(script.sha, script.script, keys, args)
        call: Awaitable[Any] = script(keys=keys, args=args)
        return call

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        started = time.monotonic()
        failed = False
        try:
            return await fn()
        except (RedisError, OSError, TimeoutError) as e:
            failed = True
            raise StoreUnavailable() from e
        finally:
            if self.observe is not None:
                # `SessionStore.rotate.<locals>.<lambda>` -> "rotate": the intent, not the command.
                op = fn.__qualname__.split(".")[1].lstrip("_") if "." in fn.__qualname__ else "call"
                self.observe(op, time.monotonic() - started, failed)

    # --- sessions --------------------------------------------------------------------------
    async def create(
        self, record: SessionRecord, body_hash: bytes, mac_key: bytes, max_per_user: int
    ) -> list[str]:
        """Store a new session and index it; returns sids evicted beyond `max_per_user`."""
        fields: list[Any] = [
            "sub", record.sub, "r", ",".join(record.roles), "c", record.created_ms,
            "u", record.last_used_ms, "x", record.expires_ms, "m", record.max_expires_ms,
            "g", 0, "h", body_hash, "k", mac_key, "ip", record.ip,
            *_ua_fields(record.user_agent),
        ]
        if record.extra:
            fields += ["e", record.extra]
        keys = self._session_keys(record.sid)
        await self._call(lambda: self._create(keys=keys[:1], args=[record.expires_ms, *fields]))
        return await self._index_add(record.sub, record.sid, record.max_expires_ms,
                                     record.created_ms, max_per_user)

    async def _index_add(self, sub: str, sid: str, max_ms: int, now_ms: int, cap: int) -> list[str]:
        key = self._user_key(sub)

        async def run() -> list[str]:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zremrangebyscore(key, "-inf", now_ms)
                pipe.zadd(key, {sid: max_ms})
                pipe.zrange(key, 0, -1)
                # GT alone never sets an expiry on a key that has none (a new index): NX does.
                pipe.pexpireat(key, max_ms, nx=True)
                pipe.pexpireat(key, max_ms, gt=True)
                res = await pipe.execute()
            # Oldest by absolute expiry come first; everything past the cap is evicted, but
            # never the session just created (expiries tie when logins share a millisecond).
            members = [m.decode() for m in res[2] if m.decode() != sid]
            if len(members) + 1 <= cap:
                return []
            # The index is scored by absolute end, so sessions that idled out are still listed:
            # forget those first, and count only live ones against the cap.
            async with self.redis.pipeline(transaction=False) as pipe:
                for member in members:
                    pipe.exists(self._session_keys(member)[0])
                alive = await pipe.execute()
            dead = [m for m, live in zip(members, alive, strict=True) if not live]
            if dead:
                await self.redis.zrem(key, *dead)
            members = [m for m, live in zip(members, alive, strict=True) if live]
            return members[: max(0, len(members) + 1 - cap)]

        return await self._call(run)

    async def rotate(
        self, sid: str, gen: int, presented: bytes, successor: bytes,
        now_ms: int, idle_ms: int, grace_ms: int, blob: bytes,
    ) -> RotateResult:
        keys = self._session_keys(sid)
        args = [gen, presented, successor, now_ms, idle_ms, max(1, grace_ms), blob]
        reply = await self._call(lambda: self._script(self._rotate, keys, args))
        kind = reply[0].decode()
        if kind in ("rotated", "grace"):
            return RotateResult(
                kind, sub=_s(reply[2]), roles=_roles(reply[3]), extra=_s(reply[4]),
                expires_ms=int(reply[1]) if kind == "rotated" else 0,
                blob=reply[1] if kind == "grace" else b"", mac_key=reply[5] or b"",
            )
        if kind == "reused":
            return RotateResult(kind, sub=_s(reply[1]))
        if kind == "verify":
            return RotateResult(kind, mac_key=reply[1] or b"", sub=_s(reply[2]))
        return RotateResult(kind)

    async def revoke(self, sid: str, reason: str) -> str | None:
        """Mark a session revoked (atomically with its grace blob); returns its user or None."""
        reply = await self._call(lambda: self._revoke(keys=self._session_keys(sid), args=[reason]))
        return _s(reply) or None

    async def unindex(self, sub: str, sids: list[str]) -> None:
        if sids:
            await self._call(lambda: self.redis.zrem(self._user_key(sub), *sids))

    async def get(self, sid: str) -> SessionRecord | None:
        raw = await self._call(lambda: self.redis.hgetall(self._session_keys(sid)[0]))
        return self._record(sid, raw)

    async def holder(self, sid: str, digest: bytes) -> str | None:
        """The user of a live session whose current (or just-rotated) token has this digest."""
        key = self._session_keys(sid)[0]
        h, p, sub, rv = await self._call(lambda: self.redis.hmget(key, "h", "p", "sub", "rv"))
        if not sub or rv:
            return None
        if (h and hmac.compare_digest(h, digest)) or (p and hmac.compare_digest(p, digest)):
            return _s(sub)
        return None

    async def is_active(self, sid: str) -> bool:
        key = self._session_keys(sid)[0]
        raw = await self._call(lambda: self.redis.hmget(key, "sub", "rv"))
        return bool(raw[0]) and not raw[1]

    async def user_sids(self, sub: str, now_ms: int) -> list[str]:
        raw = await self._call(
            lambda: self.redis.zrangebyscore(self._user_key(sub), now_ms, "+inf")
        )
        return [m.decode() for m in raw]

    async def user_sessions(self, sub: str, now_ms: int) -> list[SessionRecord]:
        sids = await self.user_sids(sub, now_ms)
        out: list[SessionRecord] = []
        stale: list[str] = []
        for sid in sids:
            record = await self.get(sid)
            if (record is not None and not record.revoked and record.sub == sub
                    and record.expires_ms > now_ms):
                out.append(record)
            else:
                stale.append(sid)
        await self.unindex(sub, stale)
        return out

    @staticmethod
    def _record(sid: str, raw: dict[bytes, bytes]) -> SessionRecord | None:
        if not raw or b"sub" not in raw:
            return None
        def num(k: bytes) -> int:
            return int(raw.get(k, b"0"))

        return SessionRecord(
            sid=sid, sub=_s(raw[b"sub"]), roles=_roles(raw.get(b"r")), extra=_s(raw.get(b"e")),
            created_ms=num(b"c"), last_used_ms=num(b"u"), expires_ms=num(b"x"),
            max_expires_ms=num(b"m"), ip=_s(raw.get(b"ip")), user_agent=_user_agent(raw),
            revoked=_s(raw.get(b"rv")) or None,
        )

    # --- revocation feed -------------------------------------------------------------------
    async def announce_revoked(self, sids: list[str], until_ms: int, now_ms: int) -> None:
        """Record revoked sids until their last access token expires, and tell every instance."""
        if not sids:
            return

        async def run() -> None:
            await self.redis.zadd(self._revoked_key, {sid: until_ms for sid in sids})
            await self.redis.zremrangebyscore(self._revoked_key, "-inf", now_ms)
            # The set outlives no entry: it expires with its latest one (NX for a new key).
            await self.redis.pexpireat(self._revoked_key, until_ms, nx=True)
            await self.redis.pexpireat(self._revoked_key, until_ms, gt=True)
            await self.redis.publish(self.channel, " ".join(f"{s}:{until_ms}" for s in sids))

        await self._call(run)

    async def revoked_set(self, now_ms: int) -> list[tuple[str, int]]:
        raw = await self._call(
            lambda: self.redis.zrangebyscore(self._revoked_key, now_ms, "+inf", withscores=True)
        )
        return [(m.decode(), int(score)) for m, score in raw]

    async def subscribe(self) -> AsyncIterator[list[tuple[str, int]]]:
        """Yields batches of (sid, until_ms) as revocations are published. Raises on disconnect."""
        # Classic PUBLISH is broadcast to every node of a Redis Cluster, so the one node a
        # cluster client's pubsub() connects to hears every revocation (asyncio RedisCluster has
        # pubsub() from redis-py 8.0; connection.connect refuses cluster mode without it).
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            pinged = False
            while True:
                # A blocking read under our own idle bound: redis-py's per-read timeouts can
                # swallow a cancellation (seen with redis-py 8.1 on Python 3.11 after a
                # reconnect), which would leave this feed impossible to stop on shutdown.
                try:
                    msg = await asyncio.wait_for(
                        pubsub.get_message(ignore_subscribe_messages=True, timeout=None),
                        _FEED_IDLE,
                    )
                except TimeoutError:
                    if pinged:  # not even the PONG came back: a half-open connection
                        raise ConnectionError("no reply on the revocation channel") from None
                    pinged = True
                    await pubsub.ping()
                    continue
                pinged = False
                if msg is None or msg.get("type") != "message":
                    continue
                batch: list[tuple[str, int]] = []
                for item in _s(msg["data"]).split():
                    sid, _, until = item.rpartition(":")
                    if sid and until.isdigit():
                        batch.append((sid, int(until)))
                yield batch
        finally:
            with contextlib.suppress(Exception):  # a broken connection cannot close cleanly
                await pubsub.aclose()

    # --- rate limits -----------------------------------------------------------------------
    async def hit(self, kind: str, subject: str, window_ms: int, increment: int = 1) -> tuple[int, int]:
        """Count one event (or peek with 0); returns (count in window, ms until the window resets)."""
        key = f"{self.prefix}rl:{kind}:{{{_tag(subject)}}}"
        n, ttl = await self._call(lambda: self._hit(keys=[key], args=[window_ms, increment]))
        return int(n), int(ttl)

    async def ping(self) -> bool:
        await self._call(lambda: self.redis.ping())
        return True
