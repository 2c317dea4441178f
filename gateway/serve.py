"""Running the gateway: one worker process, or N on one port (SO_REUSEPORT) under a supervisor
that relays SIGTERM/SIGINT (drain and exit) and SIGHUP (reload) to every worker."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from aiohttp import web
from prometheus_client import multiprocess

from gateway.app import Reloader, create_app
from gateway.config import GatewayConfig, load_config
from gateway.logs import JsonFormatter
from gateway.metrics import Metrics
from gateway.middlewares import GatewayRunner, JsonAccessLogger, server_header

log = logging.getLogger("gateway")


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own access logger would duplicate ours; its server logger stays at warning.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def runner_for(app: web.Application, config: GatewayConfig) -> GatewayRunner:
    listen = config.listen
    return GatewayRunner(
        app,
        header_timeout=listen.header_timeout,
        handle_signals=False,
        handler_cancellation=True,
        access_log_class=JsonAccessLogger,
        access_log=logging.getLogger("gateway.access") if config.logging.access_log else None,
        keepalive_timeout=listen.keepalive_timeout,
        max_line_size=listen.max_line_size,
        max_field_size=listen.max_field_size,
        max_headers=listen.max_headers,
        shutdown_timeout=listen.drain_timeout,
    )


async def run_worker(config_path: str, *, reuse_port: bool = False,
                     ready: asyncio.Event | None = None) -> None:
    config = load_config(config_path)
    metrics = Metrics()
    app = create_app(config, config_path=config_path, metrics=metrics)
    runner = runner_for(app, config)
    await runner.setup()
    site = web.TCPSite(runner, config.listen.host, config.listen.port, reuse_port=reuse_port,
                       backlog=1024)
    await site.start()
    admin: web.AppRunner | None = None
    if config.metrics.enabled and config.metrics.port is not None:
        admin_app = web.Application()
        admin_app.router.add_get(config.metrics.path, metrics.handler)
        admin_app.on_response_prepare.append(server_header)
        admin = web.AppRunner(admin_app, handle_signals=False, access_log=None)
        await admin.setup()
        await web.TCPSite(admin, config.metrics.host, config.metrics.port,
                          reuse_port=reuse_port).start()
    for advisory in config.advisories:
        log.warning("%s", advisory)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reloader = Reloader(app)
    loop.add_signal_handler(signal.SIGHUP, reloader.request)
    release_hangups()  # one that came while starting is delivered now: the file may be newer
    log.info("listening on http://%s:%s (pid %d)", config.listen.host, config.listen.port,
             os.getpid())
    if ready is not None:
        ready.set()
    await stop.wait()
    await reloader.wait()
    log.info("draining in-flight requests (up to %.0fs)", config.listen.drain_timeout)
    # Stops accepting, lets in-flight requests finish, then closes Redis and upstream pools.
    if admin is not None:
        await admin.cleanup()
    await runner.cleanup()
    log.info("stopped")


def hold_hangups() -> None:
    """SIGHUP's default action ends the process, and a reload may be sent the moment a gateway
    starts: until the event loop handles it, SIGHUP stays pending (blocked), then arrives as
    a reload. A supervised worker inherits the block from its supervisor, so it holds from
    the first instruction."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})


def release_hangups() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})


def serve(config_path: str, workers: int) -> int:
    hold_hangups()
    config = load_config(config_path)
    setup_logging(config.logging.level)
    supervised = bool(os.environ.get("GATEWAY_WORKER"))
    if workers <= 1 or supervised:
        install_uvloop()
        asyncio.run(run_worker(config_path, reuse_port=supervised))
        return 0
    return supervise(config_path, config, workers)


def supervise(config_path: str, config: GatewayConfig, workers: int) -> int:
    if config.redis.embedded:
        log.error("--workers > 1 needs a shared Redis: memory:// is per process")
        return 2
    if config.tokens.ephemeral:
        log.error("--workers > 1 needs a configured signing key: ephemeral keys differ per process")
        return 2
    metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
    env = {**os.environ, "GATEWAY_WORKER": "1", "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    cmd = [sys.executable, "-m", "gateway", "serve", "-c", config_path]
    procs: list[subprocess.Popen[bytes]] = []
    stopping = False

    def spawn() -> subprocess.Popen[bytes]:
        hold_hangups()  # inherited: the worker holds SIGHUP until its loop takes it
        try:
            return subprocess.Popen(cmd, env=env)
        finally:
            release_hangups()

    def relay(signum: int, _frame: Any) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, relay)
    procs.extend(spawn() for _ in range(workers))
    log.info("supervising %d workers", workers)
    try:
        while True:
            time.sleep(0.2)
            for i, p in enumerate(procs):
                code = p.poll()
                if code is None:
                    continue
                if stopping:
                    continue
                log.error("worker %d exited with %s; restarting", p.pid, code)
                # Its in-flight gauge must stop counting (counters stay: totals survive it).
                multiprocess.mark_process_dead(p.pid, metrics_dir)  # type: ignore[no-untyped-call]
                time.sleep(0.5)
                procs[i] = spawn()
            if stopping and all(p.poll() is not None for p in procs):
                return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for name in os.listdir(metrics_dir):
            os.unlink(os.path.join(metrics_dir, name))
        os.rmdir(metrics_dir)
