"""The JSON access and audit lines, in-process: the access line is written field by field but must
be exactly the JSON object it always was; `gateway.logs.emit` writes ready lines straight to the
handlers `gateway serve` installs, still redacted, and gives every other handler a LogRecord."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway.logs import JsonFormatter, emit
from gateway.metrics import Metrics
from gateway.middlewares import JsonAccessLogger
from gateway.request_state import AUTH_FAILURE, IDENTITY, REQUEST_ID, ROUTE_NAME, UPSTREAM_DURATION
from gateway.tokens.claims import Identity

REFRESH_SHAPED = "Ab-_" * 25 + "xyz"
JWT_SHAPED = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXZhbHVl"


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def sink() -> Iterator[tuple[logging.Logger, io.StringIO, Capture]]:
    """A logger under its own name with the handler `gateway serve` installs (writing to memory)
    on its parent, plus a capturing handler of another kind."""
    parent = logging.getLogger("test-log-lines")
    logger = logging.getLogger("test-log-lines.child")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    capture = Capture()
    saved = (parent.handlers[:], parent.propagate, parent.level, logger.handlers[:], logger.level)
    parent.handlers[:], parent.propagate = [handler], False
    parent.setLevel(logging.DEBUG)
    logger.handlers[:] = [capture]
    logger.setLevel(logging.INFO)
    try:
        yield logger, stream, capture
    finally:
        parent.handlers[:], parent.propagate, _, logger.handlers[:], _ = saved
        parent.setLevel(saved[2])
        logger.setLevel(saved[4])


def request(path: str) -> web.Request:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda key, default=None: (
        ("203.0.113.9", 40000) if key == "peername" else default)
    return make_mocked_request("POST", path, headers=CIMultiDict({"Host": "gw.test"}),
                               transport=transport)


def expected(req: web.Request, response: web.StreamResponse, seconds: float) -> dict[str, Any]:
    """The access line as the gateway has always written it (json.dumps of this dict)."""
    identity = req.get(IDENTITY)
    upstream = req.get(UPSTREAM_DURATION)
    line: dict[str, Any] = {
        "request_id": req.get(REQUEST_ID), "remote": req.remote, "method": req.method,
        "path": req.raw_path.partition("?")[0][:2048], "route": req.get(ROUTE_NAME),
        "status": response.status, "bytes": response.body_length,
        "duration_ms": round(seconds * 1000, 3),
        "upstream_ms": round(upstream * 1000, 3) if upstream is not None else None,
        "user_id": identity.sub if identity else None,
        "session_id": identity.sid if identity else None,
    }
    if req.get(AUTH_FAILURE):
        line["auth_failure"] = req.get(AUTH_FAILURE)
    return line


ALICE = Identity("al\"ice\\ \u00e9\u2603", ("user",), "sid-1", "jti-1", 1.0, 2.0)
CASES = [
    ("/api/x?token=secret", {REQUEST_ID: "req-1", ROUTE_NAME: "api", UPSTREAM_DURATION: 0.0012,
                             IDENTITY: ALICE}),
    ("/auth/refresh", {REQUEST_ID: "0123abcd", ROUTE_NAME: "/auth/refresh"}),
    ("/api/%22quoted%22/\u00fcnicode/\"raw\"\\back", {REQUEST_ID: "r", ROUTE_NAME: "api",
                                                      AUTH_FAILURE: "expired"}),
    ("/", {}),  # an error aiohttp answered before the middleware ran: no id, no route
]


@pytest.mark.parametrize(("path", "state"), CASES)
def test_access_line_is_the_same_json_object_field_for_field(
    sink: Any, path: str, state: dict[Any, Any],
) -> None:
    logger, stream, capture = sink
    req = request(path)
    for key, value in state.items():
        req[key] = value
    response = web.Response(status=201, text='{"ok":true}')
    JsonAccessLogger(logger, "").log(req, response, 0.0123456)
    line = stream.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    parsed = json.loads(line)
    assert parsed.pop("time").endswith("Z")
    want = expected(req, response, 0.0123456)
    assert parsed == want
    # Byte for byte what json.dumps made of the dict, key order included.
    assert line.split(",", 1)[1] == json.dumps(want, separators=(",", ":"))[1:] + "\n"
    assert [r.getMessage() for r in capture.records] == [line.rstrip("\n")]


def test_access_line_masks_token_shaped_values(sink: Any) -> None:
    logger, stream, _ = sink
    req = request(f"/api/{JWT_SHAPED}/{REFRESH_SHAPED}")
    req[REQUEST_ID] = REFRESH_SHAPED  # a client-chosen X-Request-Id
    JsonAccessLogger(logger, "").log(req, web.Response(text="x"), 0.001)
    parsed = json.loads(stream.getvalue())
    assert parsed["path"] == "/api/[redacted]/[redacted]"
    assert parsed["request_id"] == "[redacted]"
    assert JWT_SHAPED not in stream.getvalue() and REFRESH_SHAPED not in stream.getvalue()


def test_emit_follows_levels_and_propagation(sink: Any) -> None:
    logger, stream, capture = sink
    logger.setLevel(logging.WARNING)
    if logger.isEnabledFor(logging.INFO):  # what every caller checks first
        emit(logger, '{"a":1}')
    assert stream.getvalue() == "" and capture.records == []
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        emit(logger, '{"a":2}')
    finally:
        logger.propagate = True
    assert stream.getvalue() == "" and [r.getMessage() for r in capture.records] == ['{"a":2}']
    logger.parent.handlers[0].setLevel(logging.WARNING)
    emit(logger, '{"a":3}')
    assert stream.getvalue() == ""
    logger.parent.handlers[0].setLevel(logging.NOTSET)
    emit(logger, '{"a":4}')
    assert stream.getvalue() == '{"a":4}\n'
    record = capture.records[-1]
    assert (record.name, record.levelno, record.getMessage()) == (
        "test-log-lines.child", logging.INFO, '{"a":4}')


def test_emit_reports_a_broken_stream_and_does_not_raise(sink: Any) -> None:
    logger, stream, _ = sink
    stream.close()
    with mock.patch.object(logging.StreamHandler, "handleError") as handle_error:
        emit(logger, '{"a":1}')
    assert handle_error.call_count == 1


def test_audit_line_and_counters(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.audit")
    metrics = Metrics()
    for _ in range(3):
        metrics.audit("refresh", {"user": "alice", "sid": "s-1", "ip": "203.0.113.9"})
    metrics.audit("refresh_token_reused", {"user": "alice", "sid": "s-1", "ip": "::1"})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.audit"]
    assert [(a["event"], a["user"], a["sid"]) for a in lines] == [
        ("refresh", "alice", "s-1")] * 3 + [("refresh_token_reused", "alice", "s-1")]
    assert all(a["time"].endswith("Z") and len(a["time"]) == 20 for a in lines)
    assert list(lines[0]) == ["time", "event", "user", "sid", "ip"]
    registry = metrics.registry
    assert registry is not None
    value = registry.get_sample_value
    assert value("gateway_refreshes_total", {"result": "success"}) == 3
    assert value("gateway_refreshes_total", {"result": "reused"}) == 1
    assert value("gateway_refresh_reuse_detected_total") == 1
    assert value("gateway_audit_events_total", {"event": "refresh"}) == 3
    assert value("gateway_revocations_total", {"reason": "refresh_token_reused"}) == 1
