"""Prometheus metrics and the audit sink (one structured log line and one counter per event).

Each Metrics owns its registry, so tests and several apps in one process never share state. With
`PROMETHEUS_MULTIPROC_DIR` set (multi-worker serving) prometheus-client writes per-process files
and /metrics aggregates them, so totals stay correct whichever worker answers.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway.errors import GatewayError, RefreshError, RefreshTokenReused
from gateway.logs import emit

audit_log = logging.getLogger("gateway.audit")

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_STATUS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
_LOGIN = {"login_success": "success", "login_failure": "failure", "login_rate_limited": "rate_limited"}
#: Audit lines: compact, and any value JSON has no type for (a date, an enum) as its str().
_AUDIT_JSON = json.JSONEncoder(separators=(",", ":"), default=str)


class Metrics:
    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self._children: dict[tuple[str, int], tuple[Any, Any, Any]] = {}
        self._latency_children: dict[str, Any] = {}
        self._audit_children: dict[str, tuple[Any, ...]] = {}
        self._audit_second = -1
        self._audit_stamp = ""
        # In multiprocess mode values go to the shared directory, not to a registry.
        registry = None if self.multiprocess else CollectorRegistry()
        self.registry = registry
        kw: dict[str, Any] = {"registry": registry}
        self.requests = Counter("gateway_requests_total", "Requests by route and status class",
                                ["route", "status"], **kw)
        self.duration = Histogram("gateway_request_duration_seconds", "Request latency by route",
                                  ["route"], buckets=_LATENCY, **kw)
        self.upstream = Histogram("gateway_upstream_duration_seconds",
                                  "Time to upstream response headers by route", ["route"],
                                  buckets=_LATENCY, **kw)
        self.in_flight = Gauge("gateway_in_flight_requests", "Requests being handled",
                               multiprocess_mode="livesum", **kw)
        self.token_failures = Counter("gateway_token_validation_failures_total",
                                      "Access tokens refused, by reason", ["reason"], **kw)
        self.logins = Counter("gateway_logins_total", "Login attempts by result", ["result"], **kw)
        self.refreshes = Counter("gateway_refreshes_total", "Refresh outcomes by result",
                                 ["result"], **kw)
        self.reuse = Counter("gateway_refresh_reuse_detected_total",
                             "Refresh tokens presented again after the grace window", **kw)
        self.revocations = Counter("gateway_revocations_total", "Sessions revoked, by reason",
                                   ["reason"], **kw)
        self.revocations_seen = Counter("gateway_revocations_received_total",
                                        "Revoked sessions learned from the Redis feed", **kw)
        self.redis_errors = Counter("gateway_redis_errors_total",
                                    "Session store calls that failed (Redis down, timeout)",
                                    ["op"], **kw)
        self.redis_latency = Histogram("gateway_redis_latency_seconds", "Session store call latency",
                                       ["op"], buckets=_LATENCY, **kw)
        self.audit_events = Counter("gateway_audit_events_total", "Audit events by name", ["event"],
                                    **kw)

    # --- hooks ------------------------------------------------------------------------------
    def observe_request(self, route: str, status: int, seconds: float, upstream: float | None) -> None:
        # Labelled children are looked up once per (route, status class): labels() costs
        # a lock and a tuple build on every call.
        key = (route, status // 100)
        children = self._children.get(key)
        if children is None:
            children = (self.requests.labels(route, _STATUS.get(key[1], "5xx")),
                        self.duration.labels(route), self.upstream.labels(route))
            if len(self._children) < 10_000:
                self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        if upstream is not None:
            children[2].observe(upstream)

    def token_failure(self, reason: str) -> None:
        self.token_failures.labels(reason).inc()

    def revocations_received(self, count: int) -> None:
        self.revocations_seen.inc(count)

    def store_call(self, op: str, seconds: float, failed: bool) -> None:
        latency = self._latency_children.get(op)
        if latency is None:  # a handful of operations: looked up once each
            latency = self._latency_children[op] = self.redis_latency.labels(op)
        latency.observe(seconds)
        if failed:
            self.redis_errors.labels(op).inc()

    def _event_counters(self, event: str) -> tuple[Any, ...]:
        counters = [self.audit_events.labels(event)]
        if event in _LOGIN:
            counters.append(self.logins.labels(_LOGIN[event]))
        elif event == "refresh":
            counters.append(self.refreshes.labels("success"))
        elif event == "refresh_token_reused":
            counters += [self.reuse, self.refreshes.labels("reused")]
        return tuple(counters)

    def audit(self, event: str, fields: Mapping[str, Any]) -> None:
        """One structured line per security event; never a token, password or cookie."""
        counters = self._audit_children.get(event)
        if counters is None:  # a fixed set of event names
            counters = self._audit_children[event] = self._event_counters(event)
        for counter in counters:
            counter.inc()
        if event in ("logout", "logout_all", "session_revoked_admin", "refresh_token_reused"):
            self.revocations.labels(str(fields.get("reason", event))).inc(
                int(fields.get("count", 1))
            )
        if audit_log.isEnabledFor(logging.INFO):
            now = int(time.time())
            if now != self._audit_second:  # strftime once per second, not per event
                self._audit_second = now
                self._audit_stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
            emit(audit_log, _AUDIT_JSON.encode({"time": self._audit_stamp, "event": event,
                                                **fields}))

    def refused(self, error: GatewayError) -> None:
        """Refresh outcomes other than success and reuse (those two are audit events); the token
        endpoint reports a refused refresh as invalid_grant, raised while handling the original."""
        for e in (error, error.__context__):
            if isinstance(e, RefreshError):
                if not isinstance(e, RefreshTokenReused):
                    self.refreshes.labels(e.code).inc()
                return

    async def handler(self, request: web.Request) -> web.Response:
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            assert self.registry is not None
            registry = self.registry
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST,
                                                "Cache-Control": "no-store"})
