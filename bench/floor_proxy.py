"""The stack's floor: a bare aiohttp reverse proxy that checks an HS256 JWT with PyJWT, on uvloop.

No routing, no header policy, no access log, no metrics, no verify cache: what any proxy built on
this stack must at least pay per request. The gateway is measured against it.
  python bench/floor_proxy.py --port 9000 --upstream http://127.0.0.1:9001 --secret S --audience A
"""

import argparse

import aiohttp
import jwt
import uvloop
from aiohttp import web

HOP = {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "host",
       "authorization", "content-length", "proxy-authorization", "proxy-authenticate"}


def main() -> None:
    p = argparse.ArgumentParser()
    for flag in ("--port", "--upstream", "--secret", "--audience"):
        p.add_argument(flag, required=True)
    args = p.parse_args()
    app = web.Application()

    async def client(app: web.Application):  # type: ignore[no-untyped-def]
        app["client"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app["client"].close()

    async def handle(request: web.Request) -> web.Response:
        try:
            token = request.headers.get("Authorization", "").removeprefix("Bearer ")
            claims = jwt.decode(token, args.secret, algorithms=["HS256"], audience=args.audience)
        except jwt.PyJWTError:
            return web.json_response({"error": "invalid_token"}, status=401)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        headers["X-User-Id"] = claims["sub"]
        body = await request.read() if request.body_exists else None
        async with app["client"].request(request.method, args.upstream + request.raw_path,
                                         headers=headers, data=body) as upstream:
            payload = await upstream.read()
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP}
            return web.Response(status=upstream.status, body=payload, headers=out)

    app.cleanup_ctx.append(client)
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=int(args.port), access_log=None, print=None,
                loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
