"""WebSockets through a required route live only as long as their session: echoed while valid,
closed with 1008 (policy violation) on revocation or when the access token runs out."""

from __future__ import annotations

import asyncio
import textwrap
import time

import aiohttp
import jwt
import pytest
from aiohttp import WSMsgType

from tests.support.edge import bearer, login, refused

#: Upper bound for any single wait on a socket (the expected events take a fraction of it).
WAIT = 6.0


def _routes(url: str) -> str:
    return textwrap.dedent(f"""\
        - {{name: ws, path: /ws, upstream: {url}, auth: required}}
        - {{name: api, path: /api, upstream: {url}, auth: required}}
    """)


@pytest.fixture
async def client(gateway, upstream):
    return await gateway(routes=_routes(upstream.url))


@pytest.fixture
async def sockets():
    """Sockets a test opened, closed even when it fails (an open relay holds server shutdown)."""
    opened: list[aiohttp.ClientWebSocketResponse] = []
    yield opened
    for ws in opened:
        await ws.close()


async def _open(client, sockets, token: str, **headers: str) -> aiohttp.ClientWebSocketResponse:
    ws = await client.ws_connect("/ws", headers={**bearer(token), **headers})
    sockets.append(ws)
    return ws


async def _closed_with(ws: aiohttp.ClientWebSocketResponse, code: int) -> None:
    """The next frame is the gateway's close with `code` (messages before it are not expected)."""
    msg = await ws.receive(timeout=WAIT)
    assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING), msg
    assert ws.close_code == code, (msg, ws.close_code)


async def test_websocket_echoes_through_a_required_route(client, upstream, sockets):
    tokens = await login(client)
    ws = await _open(client, sockets, tokens["access_token"], **{"X-User-Id": "mallory"})
    await ws.send_str("hello")
    assert (await ws.receive(timeout=WAIT)).data == "hello"
    await ws.send_bytes(b"\x00\x01binary")
    assert (await ws.receive(timeout=WAIT)).data == b"\x00\x01binary"
    handshake = upstream.last
    assert handshake.path == "/ws"
    assert handshake.header("X-User-Id") == "alice"
    assert [v for k, v in handshake.headers if k.lower() == "x-user-id"] == ["alice"]
    assert "authorization" not in handshake.header_names()
    await ws.close()
    assert ws.close_code == 1000


async def test_unauthenticated_upgrade_is_401(client, upstream):
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await client.ws_connect("/ws")
    assert e.value.status == 401
    r = await client.get("/ws", headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                         "Sec-WebSocket-Version": "13",
                                         "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    await refused(r, 401, "missing_token")
    r = await client.get("/ws", headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                         "Sec-WebSocket-Version": "13",
                                         "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                         **bearer("not.a.token")})
    await refused(r, 401, "invalid_token", "invalid_token")
    assert upstream.received == []


async def test_upgrade_with_revoked_token_is_401(client, upstream):
    tokens = await login(client)
    assert (await client.post("/auth/logout", headers=bearer(tokens["access_token"]))).status == 204
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await client.ws_connect("/ws", headers=bearer(tokens["access_token"]))
    assert e.value.status == 401
    assert upstream.received == []


@pytest.mark.parametrize("how", ["logout", "logout-all", "delete-session"])
async def test_revoking_the_session_closes_the_socket_with_1008(client, upstream, sockets, how):
    tokens = await login(client)
    other = await login(client)  # a second session of the same user
    ws = await _open(client, sockets, tokens["access_token"])
    keep = await _open(client, sockets, other["access_token"])
    await ws.send_str("before")
    assert (await ws.receive(timeout=WAIT)).data == "before"

    if how == "logout":
        r = await client.post("/auth/logout", json={"refresh_token": tokens["refresh_token"]})
    elif how == "logout-all":
        r = await client.post("/auth/logout-all", headers=bearer(tokens["access_token"]))
    else:
        sid = jwt.decode(tokens["access_token"], options={"verify_signature": False})["sid"]
        r = await client.delete(f"/auth/sessions/{sid}", headers=bearer(other["access_token"]))
    assert r.status == 204
    await _closed_with(ws, 1008)

    if how == "logout-all":
        await _closed_with(keep, 1008)
    else:
        await keep.send_str("still here")  # the other session's socket is untouched
        assert (await keep.receive(timeout=WAIT)).data == "still here"
        await keep.close()


async def test_expired_access_token_closes_the_socket_with_1008(gateway, upstream, sockets):
    client = await gateway(routes=_routes(upstream.url), tokens="access_ttl: 2s\nleeway: 0s\n")
    tokens = await login(client)
    ws = await _open(client, sockets, tokens["access_token"])
    opened = time.monotonic()
    await ws.send_str("ping")
    assert (await ws.receive(timeout=WAIT)).data == "ping"
    await _closed_with(ws, 1008)
    # Closed when the token ran out (2s), not a whole extra token lifetime later.
    assert time.monotonic() - opened < 3.5


async def test_refreshed_session_keeps_the_socket_open_past_expiry(gateway, upstream, sockets):
    client = await gateway(routes=_routes(upstream.url), tokens="access_ttl: 2s\nleeway: 0s\n")
    tokens = await login(client)
    ws = await _open(client, sockets, tokens["access_token"])
    opened = time.monotonic()
    await asyncio.sleep(1.0)
    r = await client.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert r.status == 200
    await asyncio.sleep(max(0.0, 2.6 - (time.monotonic() - opened)))  # past the first token
    await ws.send_str("alive")
    assert (await ws.receive(timeout=WAIT)).data == "alive"
    # No further refresh: the session's newest token runs out about 3s after opening.
    await _closed_with(ws, 1008)
    assert time.monotonic() - opened < 5.5


def _split_routes(url: str, method: str) -> str:
    # A public webhook (POST) or preflight route (OPTIONS) beside a protected GET socket.
    return textwrap.dedent(f"""\
        - {{name: hook, path: /ws, methods: [{method}], upstream: {url}, auth: public}}
        - {{name: live, path: /ws, methods: [GET], upstream: {url}, auth: required}}
    """)


@pytest.mark.parametrize("method", ["POST", "OPTIONS"])
async def test_a_non_get_upgrade_never_opens_a_socket(gateway, upstream, method):
    """RFC 6455: the handshake is a GET. A POST asking to upgrade was authorized as a POST on
    the public route, so it goes upstream as a plain POST, not as the protected GET socket."""
    client = await gateway(routes=_split_routes(upstream.url, method))
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused_upgrade:
        await client.ws_connect("/ws", method=method)
    assert refused_upgrade.value.status == 200  # the plain answer, not a 101
    got = upstream.last
    assert got.method == method and got.header("Upgrade") is None
    assert got.header("X-User-Id") is None


@pytest.fixture
async def silent_upstream():
    """Accepts connections and reads the request head, never answers."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        try:
            await asyncio.wait_for(reader.read(65536), 30)
            await asyncio.sleep(30)
        except (TimeoutError, OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    for w in writers:
        w.close()
    server.close()
    await server.wait_closed()


async def test_an_upgrade_to_a_silent_upstream_is_a_504(gateway, silent_upstream):
    client = await gateway(routes=f"- {{name: live, path: /live, upstream: {silent_upstream}, "
                                  "auth: public, timeout: 500ms}\n")
    with pytest.raises(aiohttp.WSServerHandshakeError) as timed_out:
        async with asyncio.timeout(WAIT):  # the route's 0.5 s, not the client's patience
            await client.ws_connect("/live/ws")
    assert timed_out.value.status == 504
