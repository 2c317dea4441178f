"""create_app(config, *, redis, clock): the only place that wires the packages together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from gateway.api.auth import AuthApi
from gateway.api.browser import Browser
from gateway.api.health import healthz, jwks, readyz
from gateway.clock import Clock, SystemClock
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.errors import MethodNotAllowed
from gateway.metrics import Metrics
from gateway.middlewares import make_middleware, server_header
from gateway.pipeline.authn import Authenticator
from gateway.pipeline.edge import Edge
from gateway.pipeline.forwarded import TrustedProxies
from gateway.pipeline.head import check_head, expect_continue
from gateway.pipeline.identity import HeaderPlan
from gateway.pipeline.proxy import Proxy
from gateway.pipeline.revocations import RevocationList
from gateway.pipeline.router import Router, normalise_path
from gateway.pipeline.upstream import UpstreamPool
from gateway.request_state import ROUTE_NAME
from gateway.tokens.connection import connect
from gateway.tokens.service import TokenService
from gateway.tokens.signer import KeyRing
from gateway.tokens.store import SessionStore
from gateway.users import Credentials
from gateway.users.file import FileUsers
from gateway.users.verifier import HttpVerifier

log = logging.getLogger("gateway")
audit_log = logging.getLogger("gateway.audit")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything derived from one config; swapped whole on reload."""

    config: GatewayConfig
    keyring: KeyRing
    service: TokenService
    edge: Edge
    #: exact normalised path -> method -> handler, for the endpoints the gateway serves itself
    own: dict[str, dict[str, Handler]]
    #: `{auth prefix}/sessions/` followed by one path segment (a session id)
    own_prefix: str
    own_prefixed: dict[str, Handler]


class RuntimeHolder:
    """The current Runtime; a reload replaces it atomically between two requests."""

    def __init__(self, runtime: Runtime):
        self.current = runtime


@dataclass(slots=True)
class Shared:
    """What survives a reload: connections, the revocation list, metrics."""

    redis: Any
    store: SessionStore
    session: aiohttp.ClientSession
    upstreams: UpstreamPool
    revocations: RevocationList
    clock: Clock
    metrics: Metrics


HOLDER = web.AppKey("holder", RuntimeHolder)
SHARED = web.AppKey("shared", Shared)
CONFIG_PATH = web.AppKey("config_path", str)


def build_runtime(config: GatewayConfig, shared: Shared, keyring: KeyRing | None = None) -> Runtime:
    clock = shared.clock
    keyring = keyring or KeyRing.from_config(config.tokens, clock)
    users: Credentials
    if config.users.file:
        users = FileUsers(config.users.file)
    else:
        assert config.users.verifier is not None
        users = HttpVerifier(config.users.verifier, shared.session)
    service = TokenService(config, keyring, shared.store, users, clock, shared.metrics.audit)
    authn = Authenticator(keyring, shared.revocations, clock, config.tokens.verify_cache_size)
    trusted = TrustedProxies(config.listen.trusted_proxies)
    c = config.cookies
    # Stripped even with cookies off: a browser still holding them (cookies were on before a
    # reload) must not hand its session's refresh token to an upstream.
    gateway_cookies = (c.access_name, c.refresh_name, c.session_name, c.csrf_name)
    plan = HeaderPlan(config.identity, gateway_cookies, trusted)
    api = AuthApi(config, service, authn, trusted)
    browser = Browser(config, api, keyring, clock) if config.cookies.enabled else None

    async def session_refreshed_at(sid: str) -> float | None:
        record = await shared.store.get(sid)
        return record.last_used_ms / 1000 if record and not record.revoked else None

    proxy = Proxy(shared.upstreams, shared.session, clock, session_refreshed_at,
                  shared.revocations.watch, body_timeout=config.listen.body_timeout)
    edge = Edge(
        config=config, router=Router(config.routes), authn=authn, plan=plan, proxy=proxy,
        keyring=keyring, clock=clock, browser=browser, session_active=shared.store.is_active,
    )
    ready = readyz(shared.store.ping)
    own: dict[str, dict[str, Handler]] = {
        "/healthz": {"GET": healthz, "HEAD": healthz},
        "/readyz": {"GET": ready, "HEAD": ready},
        "/.well-known/jwks.json": {"GET": jwks(keyring, max_age=min(300, int(config.tokens.access_ttl)))},
    }
    if config.metrics.enabled and config.metrics.port is None:
        own[config.metrics.path] = {"GET": shared.metrics.handler}
    for route in api.routes():
        if "{" not in route.path:
            own.setdefault(route.path, {})[route.method] = route.handler
    if browser is not None:
        for path, methods in browser.routes().items():
            own.setdefault(path, {}).update(methods)
    sessions = f"{config.auth.prefix}/sessions/"
    return Runtime(config, keyring, service, edge, own, sessions, {"DELETE": api.delete_session})


async def dispatch(request: web.Request) -> web.StreamResponse:
    """The gateway's own endpoints by exact path; everything else takes the edge path."""
    check_head(request)
    runtime = request.app[HOLDER].current
    # Normalised once, here: the gateway's own endpoints and the routes see the same path.
    path = normalise_path(request.raw_path.partition("?")[0])
    methods = runtime.own.get(path)
    if methods is not None:
        request[ROUTE_NAME] = path  # the gateway's own endpoints: a fixed set of metric labels
    elif path.startswith(runtime.own_prefix):
        sid = path[len(runtime.own_prefix):]
        if sid and "/" not in sid:
            methods = runtime.own_prefixed
            request[ROUTE_NAME] = runtime.own_prefix + "{sid}"
    if methods is None:
        return await runtime.edge.handle(request, path)
    handler = methods.get(request.method)
    if handler is None:
        raise MethodNotAllowed(headers={"Allow": ", ".join(sorted(methods))})
    return await handler(request)


#: Pub/sub delivers at most once (nothing published while a subscriber reconnects, or before it
#: has subscribed, ever arrives), so the revoked set is also re-read this often.
_RESYNC_EVERY = 5.0


async def _load_revoked(shared: Shared) -> None:
    now_ms = int(shared.clock.now() * 1000)
    shared.revocations.add(await shared.store.revoked_set(now_ms))
    shared.revocations.prune()


async def _revocation_feed(app: web.Application) -> None:
    """Keep every instance's revocation list current: follow the channel, and reload the set on
    every (re)connect and every few seconds to cover messages pub/sub dropped."""
    shared = app[SHARED]
    resync = asyncio.ensure_future(_resync(shared))
    backoff = 0.2
    try:
        while True:
            try:
                await _load_revoked(shared)
                backoff = 0.2
                async for batch in shared.store.subscribe():
                    shared.revocations.add(batch)
                    shared.metrics.revocations_received(len(batch))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the feed must survive any Redis failure
                log.warning("revocation feed interrupted (%s); reconnecting", type(e).__name__)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
    finally:
        await _stop(resync)


async def _resync(shared: Shared) -> None:
    while True:
        await asyncio.sleep(_RESYNC_EVERY)
        # The feed loop reports and retries Redis failures; this re-read only fills gaps.
        with contextlib.suppress(Exception):
            await _load_revoked(shared)


async def _stop(task: asyncio.Future[None]) -> None:
    """Cancel and wait. Asked again until it ends: on Python 3.11 a cancellation that races a
    completing `asyncio.wait_for` inside a client library is lost, and the task would run on."""
    for _ in range(100):
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.1)
        if done:
            if not task.cancelled() and task.exception() is not None:
                log.warning("background task ended with %s", type(task.exception()).__name__)
            return
    log.error("a background task did not stop when cancelled")


def create_app(
    config: GatewayConfig, *, redis: Any = None, clock: Clock | None = None,
    config_path: str | None = None, metrics: Metrics | None = None,
) -> web.Application:
    clock = clock or SystemClock()
    metrics = metrics or Metrics()
    app = web.Application(middlewares=[make_middleware(config.auth.realm, metrics)],
                          client_max_size=64 * 1024)
    if config_path:
        app[CONFIG_PATH] = config_path

    async def resources(app: web.Application) -> AsyncIterator[None]:
        client = redis if redis is not None else connect(config.redis)
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=60,
                                         enable_cleanup_closed=True)
        session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                        cookie_jar=aiohttp.DummyCookieJar(),
                                        timeout=aiohttp.ClientTimeout(total=None))
        upstreams = UpstreamPool()
        feed: asyncio.Future[None] | None = None
        try:
            store = SessionStore(client, config.redis.key_prefix, observe=metrics.store_call)
            shared = Shared(client, store, session, upstreams, RevocationList(clock), clock,
                            metrics)
            app[SHARED] = shared
            app[HOLDER] = RuntimeHolder(build_runtime(config, shared))
            try:  # before serving: a (re)started instance refuses revoked sessions at once
                await asyncio.wait_for(_load_revoked(shared), 3.0)
            except Exception as e:  # noqa: BLE001 - Redis down at start: the feed keeps trying
                log.warning("revoked sessions not loaded at start (%s)", type(e).__name__)
            feed = asyncio.ensure_future(_revocation_feed(app))
            yield
        finally:
            if feed is not None:
                await _stop(feed)
            await upstreams.close()
            await session.close()
            if redis is None:
                await client.aclose()

    app.cleanup_ctx.append(resources)
    app.on_response_prepare.append(server_header)
    app.router.add_route("*", "/{tail:.*}", dispatch, expect_handler=expect_continue)
    return app


async def reload(app: web.Application) -> bool:
    """Re-read the config file; on any error log it and keep serving the old config. Parsing
    and building (YAML, keys, the users file's argon2 calibration hash) run in a thread, so
    requests keep being answered meanwhile."""
    runtime = await asyncio.to_thread(_next_runtime, app)
    if runtime is None:
        return False
    app[HOLDER].current = runtime  # one assignment: a request sees the old or the new, whole
    log.info("configuration reloaded from %s", app[CONFIG_PATH])
    return True


class Reloader:
    """SIGHUP handling: one reload at a time, off the event loop; signals that arrive during a
    reload make one more afterwards (the file may have changed again since it was read)."""

    def __init__(self, app: web.Application):
        self._app = app
        self._task: asyncio.Future[None] | None = None
        self._again = False

    def request(self) -> None:
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        again = True
        while again:
            self._again = False
            await reload(self._app)
            again = self._again

    async def wait(self) -> None:
        if self._task is not None:
            await self._task


def _next_runtime(app: web.Application) -> Runtime | None:
    path = app.get(CONFIG_PATH)
    if not path:
        return None
    holder, shared = app[HOLDER], app[SHARED]
    log.info("reloading configuration from %s", path)
    try:
        config = load_config(path)
        current = holder.current
        if config.redis != current.config.redis or config.listen != current.config.listen:
            log.warning("reload: listen and redis changes need a restart; they are ignored")
        keyring = None
        if config.tokens == current.config.tokens and config.tokens.ephemeral:
            keyring = current.keyring  # an ephemeral key must survive a reload
        return build_runtime(config, shared, keyring)
    except ConfigError as e:
        for problem in e.problems:
            log.error("reload rejected: %s", problem)
        return None
    except Exception as e:  # noqa: BLE001 - a bad key or users file must not stop serving
        log.error("reload rejected: %s", e)
        return None

