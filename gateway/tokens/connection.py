"""Builds the redis.asyncio client the config asks for: embedded, single server, Sentinel or Cluster."""

from __future__ import annotations

from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff

from gateway.config.model import RETRY_BACKOFF_CAP, RedisConfig
from gateway.tokens.pipelined import PipelinedConnection


class GatewayRedis(aioredis.Redis):
    """redis.asyncio's client plus `lane`: one pipelined connection to the same server that the
    session store sends its hot-path scripts over (None where that server is reached over TLS).
    Closing the client closes the lane too."""

    lane: PipelinedConnection | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        if self.lane is not None:
            await self.lane.aclose()
        await super().aclose(close_connection_pool)


def _options(config: RedisConfig) -> dict[str, Any]:
    return {
        "socket_timeout": config.timeout,
        "socket_connect_timeout": config.connect_timeout,
        "retry": Retry(ExponentialBackoff(cap=RETRY_BACKOFF_CAP, base=0.05), config.retries),
        "decode_responses": False,
        "health_check_interval": 15,
    }


def connect(config: RedisConfig) -> Any:
    """A client for the configured topology. `memory://` is fakeredis: same commands, same Lua."""
    if config.embedded:
        import fakeredis  # imported here: only the embedded mode needs it

        return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), decode_responses=False)
    if config.sentinel is not None:
        hosts = []
        for address in config.sentinel.addresses:
            host, _, port = address.rpartition(":")
            hosts.append((host.strip("[]") or "127.0.0.1", int(port or 26379)))
        sentinel = Sentinel(
            hosts,
            sentinel_kwargs={"socket_timeout": config.timeout,
                             "socket_connect_timeout": config.connect_timeout,
                             "password": config.sentinel.password},
            **_options(config),
        )
        return sentinel.master_for(
            config.sentinel.service_name, max_connections=config.pool_size
        )
    if config.cluster:
        if not hasattr(RedisCluster, "pubsub"):
            # The revocation feed subscribes through the cluster client; asyncio RedisCluster
            # has pub/sub from redis-py 8.0. Without it revocations would silently not spread.
            raise RuntimeError("redis.cluster needs redis-py >= 8.0 (asyncio cluster pub/sub)")
        opts = _options(config)
        opts.pop("health_check_interval")
        return RedisCluster.from_url(config.url, max_connections=config.pool_size, **opts)
    client = cast(GatewayRedis, GatewayRedis.from_url(config.url, max_connections=config.pool_size,
                                                      **_options(config)))
    client.lane = PipelinedConnection.for_pool(
        client.connection_pool, timeout=config.timeout, connect_timeout=config.connect_timeout,
        retries=config.retries)
    return client
