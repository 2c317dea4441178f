"""What the gateway's own per-request stages cost, in-process, one stage at a time: the work a
proxied GET adds to what aiohttp already does (and what the floor proxy does instead: one
`jwt.decode`). Each figure is the best of 5 bounded loops, in µs per call.

  python bench/micro_edge.py [--seconds 0.2] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jwt
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from bench.benchlib import AUDIENCE, HS256_SECRET, ISSUER, write_json
from gateway.clock import SystemClock
from gateway.config.model import GatewayConfig
from gateway.metrics import Metrics
from gateway.middlewares import JsonAccessLogger, new_request_id
from gateway.pipeline.authn import Authenticator
from gateway.pipeline.forwarded import TrustedProxies
from gateway.pipeline.identity import HeaderPlan
from gateway.pipeline.revocations import RevocationList
from gateway.pipeline.router import Router, normalise_path
from gateway.request_state import IDENTITY, REQUEST_ID, ROUTE_NAME, UPSTREAM_DURATION
from gateway.serve import JsonFormatter
from gateway.tokens.signer import KeyRing


def best_us(fn: Callable[[], object], seconds: float) -> float:
    best = float("inf")
    for _ in range(5):
        n, start = 0, time.perf_counter()
        while n < 200_000:
            for _ in range(64):
                fn()
            n += 64
            if time.perf_counter() - start >= seconds:
                break
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return round(best, 2)


def run(seconds: float) -> dict[str, Any]:
    config = GatewayConfig.model_validate({
        "users": {"file": "unused.yaml"},
        "tokens": {"algorithm": "HS256", "secret": HS256_SECRET, "issuer": ISSUER,
                   "audience": AUDIENCE},
        "routes": [{"name": "api", "path": "/api", "upstream": "http://127.0.0.1:9",
                    "auth": "required"}],
    })
    clock = SystemClock()
    ring = KeyRing.from_config(config.tokens, clock)
    token, _ = ring.access_token(sub="bench0", sid="sid-bench", roles=("user",))
    authn = Authenticator(ring, RevocationList(clock), clock, 10_000)
    router = Router(config.routes)
    plan = HeaderPlan(config.identity, (), TrustedProxies(()))
    route = config.routes[0]
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda key, default=None: (
        ("127.0.0.1", 40000) if key == "peername" else default)
    # What wrk sends: Host and the bearer token, nothing else.
    request = make_mocked_request("GET", "/api/bench", headers=CIMultiDict(
        {"Host": "127.0.0.1:8080", "Authorization": f"Bearer {token}"}), transport=transport)
    identity = authn.verify(token)
    request[REQUEST_ID] = new_request_id(None)
    request[ROUTE_NAME] = "api"
    request[IDENTITY] = identity
    request[UPSTREAM_DURATION] = 0.0012
    metrics = Metrics()

    # The access log exactly as `gateway serve` sets it up, writing to memory instead of stderr.
    sink = io.StringIO()
    handler = logging.StreamHandler(sink)
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("gateway.access")
    access.handlers[:], access.propagate = [handler], False
    access.setLevel(logging.INFO)
    access_logger = JsonAccessLogger(access, "")
    response = web.Response(text='{"ok":true}')

    def access_log() -> None:
        access_logger.log(request, response, 0.0021)
        if sink.tell() > 1 << 22:
            sink.seek(0)
            sink.truncate()

    def route_match() -> object:
        path = normalise_path(request.raw_path.partition("?")[0])
        return router.match("GET", path, request.headers.get("Host"))

    def authenticate() -> object:
        bearer = request.headers.getall("Authorization", [])
        return authn.verify(authn.credential(bearer, {}, None) or "")

    def headers() -> object:
        return plan.build(request.headers, route, identity, peer=request.remote,
                          scheme=request.scheme, request_id=request[REQUEST_ID])

    def metric_hooks() -> None:
        metrics.in_flight.inc()
        metrics.in_flight.dec()
        metrics.observe_request("api", 200, 0.0021, 0.0012)

    stages = {
        "request id (new_request_id)": lambda: new_request_id(None),
        "route (normalise_path + Router.match)": route_match,
        "authenticate (bearer + verify, cache hit)": authenticate,
        "identity headers (HeaderPlan.build)": headers,
        "metrics (in-flight gauge + observe_request)": metric_hooks,
        "access log (JsonAccessLogger.log, redacted, written)": access_log,
    }
    out = {name: best_us(fn, seconds) for name, fn in stages.items()}
    total = round(sum(out.values()), 2)
    floor = best_us(lambda: jwt.decode(token, HS256_SECRET, algorithms=["HS256"],
                                       audience=AUDIENCE), seconds)
    return {"stages_us": out, "gateway_stages_total_us": total,
            "floor_jwt_decode_us": floor,
            "note": "single-process metrics (2 workers use prometheus multiprocess files)"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=0.2, help="per loop (5 loops per stage)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    write_json(args.json, run(args.seconds))


if __name__ == "__main__":
    main()
