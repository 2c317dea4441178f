"""`gateway demo`: the example config plus a demo upstream that shows what a backend receives."""

from __future__ import annotations

import asyncio
import html
import json
import os

from aiohttp import WSMsgType, web
from yarl import URL

from gateway.config import load_config


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({
        "method": request.method,
        "path": request.raw_path,
        "headers": {k: v for k, v in request.headers.items()},
        "body_bytes": len(body),
    })


async def _app_page(request: web.Request) -> web.Response:
    who = html.escape(request.headers.get("X-User-Id", "anonymous"))
    roles = html.escape(request.headers.get("X-User-Roles", ""))
    sid = html.escape(request.headers.get("X-Session-Id", ""))
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Demo app</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head><body>
<h1>Hello, <span id="user">{who}</span></h1>
<p>roles: <span id="roles">{roles}</span> · session: <span id="sid">{sid}</span></p>
<ul id="fetches"></ul>
<p><a href="/auth/sign-out">Sign out</a></p>
<script>
async function burst(n) {{
  const results = await Promise.all([...Array(n).keys()].map(i =>
    fetch('/app/api/item/' + i, {{headers: {{'Accept': 'application/json'}}}})
      .then(async r => r.status + ':' + (r.ok ? (await r.json()).headers['X-User-Id'] : ''))
      .catch(e => 'error:' + e)));
  const ul = document.getElementById('fetches');
  ul.innerHTML = '';
  for (const r of results) {{ const li = document.createElement('li'); li.textContent = r; ul.appendChild(li); }}
  return results;
}}
window.burst = burst;
burst(4);
</script></body></html>"""
    return web.Response(text=page, content_type="text/html")


async def _ws(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def _events(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(5):
        await response.write(f"data: {i}\n\n".encode())
        await asyncio.sleep(0.2)
    return response


def demo_upstream() -> web.Application:
    app = web.Application()
    app.router.add_get("/app", _app_page)
    app.router.add_get("/app/", _app_page)
    app.router.add_get("/ws", _ws)
    app.router.add_get("/events", _events)
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


def run_demo(config_path: str) -> int:
    from gateway.serve import install_uvloop, run_worker, setup_logging

    upstream = URL(os.environ.get("DEMO_UPSTREAM", "http://127.0.0.1:8081"))
    config = load_config(config_path)
    setup_logging(config.logging.level)
    install_uvloop()

    async def main() -> None:
        runner = web.AppRunner(demo_upstream(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, upstream.host, upstream.port).start()
        base = f"http://{config.listen.host}:{config.listen.port}"
        print(json.dumps({"demo": {
            "gateway": base, "upstream": str(upstream), "user": "demo",
            "password": "demo-password",
            "try": [f"curl {base}/public/hello",
                    (f"curl -s -X POST {base}/auth/login -H 'Content-Type: application/json' "
                    "-d '{\"username\":\"demo\",\"password\":\"demo-password\"}'"),
                    f"open {base}/app in a browser"],
        }}, indent=2), flush=True)
        try:
            await run_worker(config_path)
        finally:
            await runner.cleanup()

    asyncio.run(main())
    return 0
