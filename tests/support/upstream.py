"""A real upstream HTTP server (aiohttp) in the test's event loop that records what it received."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from tests.support.ports import free_port


@dataclass
class Received:
    method: str
    path: str
    raw_path: str
    headers: list[tuple[str, str]]
    body_size: int

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def header_names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


@dataclass
class Upstream:
    """Echo upstream: JSON of what it got; special paths for streaming, slowness and WS."""

    port: int = field(default_factory=free_port)
    received: list[Received] = field(default_factory=list)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def last(self) -> Received:
        return self.received[-1]

    async def _record(self, request: web.Request) -> Received:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        rec = Received(request.method, request.path, request.raw_path,
                       list(request.headers.items()), size)
        self.received.append(rec)
        return rec

    async def echo(self, request: web.Request) -> web.StreamResponse:
        rec = await self._record(request)
        if request.path.endswith("/slow"):
            await asyncio.sleep(float(request.query.get("s", "3")))
        if request.path.endswith("/cookies"):
            resp = web.json_response({"ok": True})
            resp.headers.add("Set-Cookie", "a=1; Path=/")
            resp.headers.add("Set-Cookie", "b=2; Path=/")
            return resp
        if request.path.endswith("/stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(int(request.query.get("n", "3"))):
                await resp.write(f"data: {i}\n\n".encode())
                await asyncio.sleep(float(request.query.get("gap", "0.2")))
            return resp
        body: dict[str, Any] = {"method": rec.method, "path": rec.raw_path,
                                "headers": rec.headers, "body_size": rec.body_size}
        return web.json_response(body)

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        self.received.append(Received("GET", request.path, request.raw_path,
                                      list(request.headers.items()), 0))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    async def start(self) -> Upstream:
        app = web.Application(client_max_size=0)
        app.router.add_get("/ws", self.ws)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
