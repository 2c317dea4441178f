"""The real `gateway serve` process: health, readiness against a real Redis, draining on SIGTERM,
atomic reload on SIGHUP (and refusing a bad config), several workers on one port, and JSON
answers to requests aiohttp cannot even parse."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import gateway_yaml
from tests.support.gateway_process import GatewayProcess
from tests.support.processes import (
    children,
    connection_owners,
    log_records,
    wait_for,
    wait_refusing,
)
from tests.support.raw_http import raw_request
from tests.support.redis_server import start_redis
from tests.support.tokens import write_users
from tests.support.upstream import Upstream

SECRET = "process-test-secret-that-is-long-enough-0123456789"
HS256 = f"algorithm: HS256\nsecret: '{SECRET}'\n"


def route(name: str, path: str, url: str) -> str:
    return f"- {{name: {name}, path: {path}, upstream: {url}, auth: public}}\n"


async def get(url: str, **kwargs: Any) -> tuple[int, Any, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.get(url, **kwargs) as r:
        body = await r.read()
        try:
            parsed: Any = json.loads(body)
        except ValueError:
            parsed = body
        return r.status, parsed, dict(r.headers)


async def wait_exit(gw: GatewayProcess, timeout: float = 20.0) -> int:
    assert gw.proc is not None
    return await asyncio.to_thread(gw.proc.wait, timeout)


@pytest.fixture
async def other_upstream() -> Any:
    up = await Upstream().start()
    yield up
    await up.stop()


# --- health and readiness -----------------------------------------------------------------
async def test_readyz_follows_the_session_store(process_gateway, make_yaml, upstream):
    redis = start_redis()
    try:
        gw = await process_gateway(make_yaml(upstream.url, redis_url=redis.url))
        status, body, headers = await get(f"{gw.url}/healthz")
        assert (status, body) == (200, {"status": "ok"})
        assert headers["Cache-Control"] == "no-store"
        status, body, headers = await get(f"{gw.url}/readyz")
        assert (status, body) == (200, {"status": "ready", "session_store": True})
        assert headers["Cache-Control"] == "no-store"

        redis.stop()
        results: list[tuple[int, Any]] = []

        async def probe() -> None:
            status, body, _ = await get(f"{gw.url}/readyz")
            results.append((status, body))

        for _ in range(40):
            await probe()
            if results[-1][0] == 503:
                break
            await asyncio.sleep(0.1)
        assert results[-1] == (503, {"status": "unavailable", "session_store": False})
        # Liveness does not depend on Redis: the process must not be restarted for it.
        assert (await get(f"{gw.url}/healthz"))[0] == 200

        redis.restart()
        for _ in range(60):
            await probe()
            if results[-1][0] == 200:
                break
            await asyncio.sleep(0.1)
        assert results[-1] == (200, {"status": "ready", "session_store": True})
    finally:
        redis.stop()
        shutil.rmtree(redis.workdir, ignore_errors=True)


# --- SIGTERM -------------------------------------------------------------------------------
async def test_sigterm_drains_in_flight_requests(process_gateway, make_yaml, upstream):
    gw = await process_gateway(make_yaml(upstream.url))
    in_flight = asyncio.ensure_future(get(f"{gw.url}/public/slow?s=2"))
    await wait_for(lambda: any(r.path == "/public/slow" for r in upstream.received))
    gw.signal(signal.SIGTERM)

    await wait_refusing(gw.port)
    assert not in_flight.done(), "the slow request finished before new connections were refused"
    status, body, _ = await in_flight
    assert status == 200
    assert body["path"] == "/public/slow?s=2"
    assert await wait_exit(gw) == 0
    messages = [r.get("message") for r in log_records(gw)]
    assert "stopped" in messages


# --- SIGHUP --------------------------------------------------------------------------------
async def test_sighup_reloads_atomically(process_gateway, make_yaml, upstream, other_upstream):
    a, b = upstream, other_upstream
    gw = await process_gateway(make_yaml(a.url, routes=route("public", "/public", a.url)))
    assert (await get(f"{gw.url}/added/x"))[0] == 404

    new_text = make_yaml(b.url, routes=route("public", "/public", b.url)
                         + route("added", "/added", b.url)).replace("{port}", str(gw.port))
    gw.config_path.write_text(new_text)

    # One client keeps requesting while the config is swapped under it.
    statuses: list[int] = []
    order: list[str] = []

    async def hammer() -> None:
        async with aiohttp.ClientSession() as session:
            for i in range(400):
                rid = f"seq-{i}"
                async with session.get(f"{gw.url}/public/x", headers={"X-Request-Id": rid}) as r:
                    statuses.append(r.status)
                    await r.read()
                order.append(rid)
                if sum(1 for x in b.received if x.path == "/public/x") >= 10:
                    return

    task = asyncio.ensure_future(hammer())
    await wait_for(lambda: len(statuses) >= 10)
    gw.signal(signal.SIGHUP)
    await asyncio.wait_for(task, 30)

    assert set(statuses) == {200}
    served_by = []
    for rid in order:
        in_a = any(x.header("X-Request-Id") == rid for x in a.received)
        in_b = any(x.header("X-Request-Id") == rid for x in b.received)
        assert in_a != in_b, rid
        served_by.append("a" if in_a else "b")
    switch = served_by.index("b")
    assert switch > 0 and set(served_by[switch:]) == {"b"}, served_by  # one switch, never back
    status, body, _ = await get(f"{gw.url}/added/y?z=1")
    assert status == 200 and body["path"] == "/added/y?z=1"
    assert b.last.raw_path == "/added/y?z=1"
    assert any(r.get("message", "").startswith("configuration reloaded") for r in log_records(gw))


async def test_requests_are_answered_while_a_reload_is_built(process_gateway, upstream, tmp_path):
    # Production argon2 parameters (64 MiB): building the new config spends one such hash (the
    # unknown-user calibration), and the running config must keep answering meanwhile.
    users = write_users(tmp_path / "users.yaml", cheap=False)
    gw = await process_gateway(gateway_yaml(upstream.url, users,
                                            routes=route("public", "/public", upstream.url)))

    def messages() -> list[str]:
        return [r.get("message", "") for r in log_records(gw)]

    async def hammer() -> None:
        async with aiohttp.ClientSession() as session:
            for i in range(5000):
                async with session.get(f"{gw.url}/healthz", headers={"X-Request-Id": f"h-{i}"}) as r:
                    assert r.status == 200
                    await r.read()
                if i % 10 == 0 and any(m.startswith("configuration reloaded") for m in messages()):
                    return

    task = asyncio.ensure_future(hammer())
    await asyncio.sleep(0.2)
    gw.signal(signal.SIGHUP)
    await asyncio.wait_for(task, 30)
    records = log_records(gw)
    found = [r.get("message", "") for r in records]
    start = next(i for i, m in enumerate(found) if m.startswith("reloading configuration"))
    end = next(i for i, m in enumerate(found) if m.startswith("configuration reloaded"))
    answered = [r for r in records[start:end] if str(r.get("request_id", "")).startswith("h-")]
    assert answered, "no request was answered while the reload was being built"


async def test_invalid_reload_is_rejected_with_located_errors(process_gateway, make_yaml,
                                                              upstream, other_upstream):
    gw = await process_gateway(make_yaml(upstream.url, routes=route("public", "/public",
                                                                    upstream.url)))
    path = gw.config_path
    good = path.read_text()
    bad = good.replace(f"upstream: {upstream.url}", "upstream: ftp://nowhere.invalid")
    bad += "  - {name: public, path: /other, upstream: http://127.0.0.1:1, bogus: 1}\n"
    assert bad != good
    path.write_text(bad)
    gw.signal(signal.SIGHUP)

    def rejected() -> list[str]:
        return [r["message"] for r in log_records(gw)
                if r.get("message", "").startswith("reload rejected")]

    await wait_for(lambda: len(rejected()) >= 3)
    text = "\n".join(rejected())
    where = re.escape(str(path))
    assert re.search(rf"{where}:\d+:\d+: routes\[0\]\.upstream", text), text
    assert re.search(rf"{where}:\d+:\d+: routes\[1\]", text), text
    assert "bogus" in text
    assert all(r["level"] == "error" for r in log_records(gw)
               if r.get("message", "").startswith("reload rejected"))
    # Still serving the old config, from the same process.
    assert gw.proc is not None and gw.proc.poll() is None
    status, _body, _ = await get(f"{gw.url}/public/still")
    assert status == 200 and upstream.last.raw_path == "/public/still"
    assert (await get(f"{gw.url}/other"))[0] == 404

    # Unparseable YAML is rejected the same way.
    path.write_text("routes: [\n  - {name: x\n")
    gw.signal(signal.SIGHUP)
    await wait_for(lambda: any("invalid YAML" in m for m in rejected()))
    assert (await get(f"{gw.url}/public/still"))[0] == 200

    # A good config afterwards is taken.
    path.write_text(good.replace(f"upstream: {upstream.url}", f"upstream: {other_upstream.url}"))
    gw.signal(signal.SIGHUP)
    await wait_for(lambda: any(r.get("message", "").startswith("configuration reloaded")
                               for r in log_records(gw)))
    assert (await get(f"{gw.url}/public/moved"))[0] == 200
    assert other_upstream.last.raw_path == "/public/moved"


# --- several workers -----------------------------------------------------------------------
async def _owners(gw: GatewayProcess, pids: set[int], n: int, path: str) -> tuple[dict[int, int],
                                                                                   list[int]]:
    """Open n connections, make one keep-alive request on each, and map each to its worker."""
    writers: list[asyncio.StreamWriter] = []
    statuses: list[int] = []
    try:
        for _ in range(n):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writers.append(writer)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 10)
            statuses.append(int(line.split()[1]))
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        ports = {w.get_extra_info("sockname")[1] for w in writers}
        return connection_owners(gw.port, ports, pids), statuses
    finally:
        for w in writers:
            w.close()


async def test_workers_share_one_port_reload_and_drain(process_gateway, make_yaml, upstream,
                                                       redis_server):
    text = make_yaml(upstream.url, redis_url=redis_server.url, tokens=HS256)
    gw = await process_gateway(text, workers=2)
    assert gw.proc is not None
    supervisor = gw.proc.pid

    def listening_pids() -> set[int]:
        return {r["pid"] for r in log_records(gw)
                if r.get("message", "").startswith("listening on")}

    await wait_for(lambda: len(listening_pids()) == 2, timeout=20)
    workers = children(supervisor)
    assert len(workers) == 2 and workers == listening_pids()

    owners, statuses = await _owners(gw, workers, 24, "/healthz")
    assert set(statuses) == {200}
    assert set(owners.values()) == workers, owners  # both workers accept on the one port

    # SIGHUP to the supervisor reaches every worker.
    new_text = make_yaml(upstream.url, redis_url=redis_server.url, tokens=HS256,
                         routes=route("fresh", "/fresh", upstream.url)).replace("{port}",
                                                                                str(gw.port))
    gw.config_path.write_text(new_text)
    gw.signal(signal.SIGHUP)

    def reloaded_pids() -> set[int]:
        return {r["pid"] for r in log_records(gw)
                if r.get("message", "").startswith("configuration reloaded")}

    await wait_for(lambda: reloaded_pids() == workers, timeout=15)
    owners, statuses = await _owners(gw, workers, 24, "/fresh/x")
    assert set(statuses) == {200}
    assert set(owners.values()) == workers
    owners, statuses = await _owners(gw, workers, 8, "/public/x")
    assert set(statuses) == {404}

    # SIGTERM drains every worker's in-flight requests, then everything exits.
    slow = [asyncio.ensure_future(raw_request(
        gw.port, f"GET /fresh/slow?s=2&i={i} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
        .encode(), timeout=20)) for i in range(6)]
    await wait_for(lambda: sum(r.path == "/fresh/slow" for r in upstream.received) == 6)
    gw.signal(signal.SIGTERM)
    responses = await asyncio.gather(*slow)
    assert [r.status for r in responses] == [200] * 6
    assert await wait_exit(gw) == 0
    assert all(not Path(f"/proc/{pid}").exists() or pid not in children(supervisor)
               for pid in workers)
    stopped = {r["pid"] for r in log_records(gw) if r.get("message") == "stopped"}
    assert stopped == workers


async def test_reload_signals_while_workers_start_are_held_not_fatal(process_gateway, make_yaml,
                                                                    upstream, redis_server):
    # An operator (or config management) reloads right after a start. SIGHUP's default action
    # ends a process: every one relayed before a worker's loop handles it must wait and become
    # a reload. (A single process holds it from `serve` on, after its imports.)
    workers = 2
    text = make_yaml(upstream.url, redis_url=redis_server.url, tokens=HS256)
    gw = await process_gateway(text, workers=workers, wait=False)

    def records_with(prefix: str) -> list[dict[str, Any]]:
        return [r for r in log_records(gw) if r.get("message", "").startswith(prefix)]

    # The supervisor itself: once it relays (before that it is still importing Python).
    await wait_for(lambda: records_with("supervising"), timeout=20)
    sent = 0
    for _ in range(400):  # every 20 ms, through the workers' imports, config load and bind
        assert gw.proc is not None and gw.proc.poll() is None, gw.logs()
        gw.signal(signal.SIGHUP)
        sent += 1
        if len({r["pid"] for r in records_with("listening on")}) == workers:
            break
        await asyncio.sleep(0.02)
    assert sent > 5
    await wait_for(lambda: len({r["pid"] for r in records_with("configuration reloaded")})
                   == workers, timeout=20)
    assert not records_with("worker"), [r["message"] for r in records_with("worker")]
    assert (await get(f"{gw.url}/healthz"))[0] == 200
    assert gw.proc is not None and gw.proc.poll() is None


async def test_workers_refuse_embedded_store(tmp_path, make_yaml, upstream):
    from tests.support.gateway_process import write_config
    from tests.support.ports import free_port

    path = write_config(tmp_path, make_yaml(upstream.url, tokens=HS256).replace(
        "{port}", str(free_port())))
    gw = GatewayProcess(path, 0, workers=2)
    with pytest.raises(RuntimeError, match="shared Redis"):
        await asyncio.to_thread(gw.start, 10)
    assert gw.proc is not None and gw.proc.returncode == 2


# --- protocol-level errors -----------------------------------------------------------------
PROTOCOL_ERRORS = [
    (b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n",
     431, "headers_too_large"),
    (b"GET /healthz HTTP/1.1\r\nHost: gw\r\n" + b"X" * 10_000 + b": 1\r\n\r\n",
     431, "headers_too_large"),
    (b"GET /healthz HTTP/1.1\r\nHost: gw\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(101))
     + b"\r\n", 431, "headers_too_large"),
    (b"GET /public/" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n", 414, "uri_too_long"),
    (b"GET /public/" + b"a" * 10_000, 414, "uri_too_long"),  # no line end yet
    (b"GARBAGE\r\n\r\n", 400, "invalid_request"),
    (b"GET / HTTP/9.9\r\nHost: gw\r\n\r\n", 400, "invalid_request"),
    (b"GET /\x00 HTTP/1.1\r\nHost: gw\r\n\r\n", 400, "invalid_request"),
    (b"GET / HTTP/1.1\r\nHost: gw\r\nBad Header: y\r\n\r\n", 400, "invalid_request"),
    (b"POST /public/x HTTP/1.1\r\nHost: gw\r\nContent-Length: abc\r\n\r\n", 400,
     "invalid_request"),
    ((b"POST /public/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\nTransfer-Encoding: chunked"
     b"\r\n\r\n0\r\n\r\n"), 400, "invalid_request"),
    (b"POST /public/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n", 400,
     "invalid_request"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "invalid_request"),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "invalid_request"),
]


async def test_protocol_errors_are_json(process_gateway, make_yaml, upstream):
    gw = await process_gateway(make_yaml(upstream.url))
    for raw, status, code in PROTOCOL_ERRORS:
        r = await raw_request(gw.port, raw, timeout=5)
        assert r.status == status, (raw[:40], r.status, r.body)
        assert r.header("Content-Type").startswith("application/json")  # type: ignore[union-attr]
        body = json.loads(r.body)
        assert body["error"] == code and body["error_description"], raw[:40]
        assert r.header("Cache-Control") == "no-store"
        assert r.all("Server") == ["edge-gateway"]  # no Python or aiohttp version
    assert upstream.received == []  # nothing unparseable was forwarded
    records = log_records(gw)
    assert not [r for r in records if r.get("level") == "error" or "traceback" in r]
    assert (await get(f"{gw.url}/healthz"))[0] == 200
