"""Hostile HTTP/1.x on a raw socket against the real gateway process, in front of a recording
upstream: smuggling, malformed framing, oversized and odd request heads, Host abuse, old
protocol versions and pipelined attacks.

Every case must end in a 4xx (JSON where the gateway answers) or a closed connection; never a
5xx; and nothing ambiguous may reach the upstream. A request hidden in a body always targets
`/api/smuggled` (auth required, sent without a token) or `/public/smuggled`, so if the gateway
ever parsed it as a request of its own it would answer it itself (401), and if it were passed
through as bytes the upstream would record a path containing "smuggled".
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.gateway_process import GatewayProcess, start_gateway
from tests.support.raw_client import Exchange, ThreadedUpstream, UpstreamLog, exchange

pytestmark = pytest.mark.integration

H = b"Host: gw.test\r\n"
SMUGGLED = b"GET /api/smuggled HTTP/1.1\r\nHost: gw.test\r\n\r\n"
SMUGGLED_PUBLIC = b"GET /public/smuggled HTTP/1.1\r\nHost: gw.test\r\n\r\n"


def post(headers: bytes, body: bytes, path: bytes = b"/public/first",
         version: bytes = b"HTTP/1.1") -> bytes:
    return b"POST " + path + b" " + version + b"\r\n" + H + headers + b"\r\n" + body


def get(path: bytes = b"/public/first", headers: bytes = b"", host: bytes | None = H,
        line_end: bytes = b" HTTP/1.1\r\n") -> bytes:
    return b"GET " + path + line_end + (host or b"") + headers + b"\r\n"


# Each of these must be refused (4xx or a closed connection) without reaching the upstream.
REJECTED: dict[str, bytes] = {
    # --- request smuggling: framing the gateway and another parser could read differently ---
    "cl_and_te": post(b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
                      b"0\r\n\r\n" + SMUGGLED_PUBLIC),
    "te_and_cl": post(b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
                      b"0\r\n\r\n" + SMUGGLED_PUBLIC),
    "two_different_content_lengths": post(
        b"Content-Length: 0\r\nContent-Length: " + str(len(SMUGGLED_PUBLIC)).encode() + b"\r\n",
        SMUGGLED_PUBLIC),
    "content_length_list": post(b"Content-Length: 0, 48\r\n", SMUGGLED_PUBLIC),
    "content_length_signed": post(b"Content-Length: +48\r\n", SMUGGLED_PUBLIC),
    "content_length_negative": post(b"Content-Length: -1\r\n", SMUGGLED_PUBLIC),
    "content_length_hex": post(b"Content-Length: 0x30\r\n", SMUGGLED_PUBLIC),
    "content_length_space_before_colon": post(b"Content-Length : 48\r\n", SMUGGLED_PUBLIC),
    "te_xchunked": post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n" + SMUGGLED_PUBLIC),
    "te_chunked_identity": post(b"Transfer-Encoding: chunked, identity\r\n",
                                b"0\r\n\r\n" + SMUGGLED_PUBLIC),
    "te_identity_chunked": post(b"Transfer-Encoding: identity, chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n"),
    "te_gzip_chunked": post(b"Transfer-Encoding: gzip, chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n"),
    "te_twice": post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                     b"0\r\n\r\n" + SMUGGLED_PUBLIC),
    "te_space_before_colon": post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n" + SMUGGLED_PUBLIC),
    "te_vertical_tab": post(b"Transfer-Encoding:\x0bchunked\r\n", b"0\r\n\r\n" + SMUGGLED_PUBLIC),
    "te_obs_fold": post(b"Transfer-Encoding:\r\n chunked\r\n", b"0\r\n\r\n" + SMUGGLED_PUBLIC),
    "te_on_http10": post(b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n" + SMUGGLED_PUBLIC,
                         version=b"HTTP/1.0"),
    "obs_fold_other_header": get(headers=b"X-Note: a\r\n folded\r\n"),
    "leading_whitespace_header_line": get(headers=b" X-Note: a\r\n"),
    "bare_lf_line_endings": b"GET /public/first HTTP/1.1\nHost: gw.test\n\n",
    "bare_lf_in_headers": get(headers=b"X-A: 1\nX-B: 2\r\n"),
    "bare_cr_in_headers": get(headers=b"X-A: 1\rX-B: 2\r\n"),
    "chunk_size_not_hex": post(b"Transfer-Encoding: chunked\r\n", b"zz\r\nabc\r\n0\r\n\r\n"),
    "chunk_size_negative": post(b"Transfer-Encoding: chunked\r\n", b"-3\r\nabc\r\n0\r\n\r\n"),
    "chunk_size_overflow": post(b"Transfer-Encoding: chunked\r\n",
                                b"1" + b"0" * 20 + b"\r\nabc\r\n0\r\n\r\n"),
    "chunk_size_0x_prefix": post(b"Transfer-Encoding: chunked\r\n", b"0x3\r\nabc\r\n0\r\n\r\n"),
    "chunk_extension_bare_lf": post(b"Transfer-Encoding: chunked\r\n", b"3;x\nabc\r\n0\r\n\r\n"),
    "chunk_data_without_crlf": post(b"Transfer-Encoding: chunked\r\n",
                                    b"3\r\nabcX" + SMUGGLED_PUBLIC),
    # --- oversized heads ---
    "request_line_too_long": get(path=b"/public/" + b"a" * 20_000),
    "header_too_long": get(headers=b"X-Big: " + b"a" * 20_000 + b"\r\n"),
    "too_many_headers": get(headers=b"".join(b"X-H%d: v\r\n" % i for i in range(300))),
    # --- methods ---
    "method_with_bad_char": b"G(T /public/first HTTP/1.1\r\n" + H + b"\r\n",
    "method_lowercase": b"get /public/first HTTP/1.1\r\n" + H + b"\r\n",
    "method_unknown": b"FROB /public/first HTTP/1.1\r\n" + H + b"\r\n",
    "method_overlong": b"A" * 300 + b" /public/first HTTP/1.1\r\n" + H + b"\r\n",
    # --- NUL, control and non-UTF-8 bytes ---
    "nul_in_path": get(path=b"/public/a\x00b"),
    "nul_in_header": get(headers=b"X-A: a\x00b\r\n"),
    "control_char_in_header": get(headers=b"X-A: a\x01b\r\n"),
    "non_utf8_in_path": get(path=b"/public/\xff\xfe"),
    "non_utf8_header_value": get(headers=b"X-A: \xff\xfe\r\n"),
    "latin1_header_value": get(headers=b"X-A: caf\xe9\r\n"),
    "non_utf8_header_name": get(headers=b"X-\xff: a\r\n"),
    # A gateway cookie name with a byte the gateway cannot decode: it must not be forwarded
    # with that byte dropped, i.e. as the gateway's own access cookie.
    "non_utf8_cookie_name": get(headers=b"Cookie: gw_acc\xffess=leaked; other=1\r\n"),
    # --- request targets ---
    "absolute_form": get(path=b"http://evil/admin"),
    "absolute_form_to_a_route": get(path=b"http://evil/public/first"),
    "authority_form_connect": b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n",
    "asterisk_form": b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n",
    "target_without_slash": get(path=b"public/first"),
    # --- Host abuse (the `ph` route forwards Host as sent) ---
    "missing_host_http11": get(path=b"/ph/a", host=None),
    "two_hosts": get(path=b"/ph/a", host=b"Host: gw.test\r\nHost: evil.test\r\n"),
    "host_with_path": get(path=b"/ph/a", host=b"Host: evil.test/admin\r\n"),
    "host_with_userinfo": get(path=b"/ph/a", host=b"Host: user@evil.test\r\n"),
    "host_with_userinfo_and_port": get(path=b"/ph/a", host=b"Host: gw.test:80@evil.test\r\n"),
    "host_with_space": get(path=b"/ph/a", host=b"Host: gw.test evil.test\r\n"),
    "host_with_comma": get(path=b"/ph/a", host=b"Host: gw.test,evil.test\r\n"),
    # --- protocol versions ---
    "http09_style_line": b"GET /public/first\r\n\r\n",
    "http_version_0_9": get(line_end=b" HTTP/0.9\r\n"),
    "http_version_1_2": get(line_end=b" HTTP/1.2\r\n"),
    "http_version_2_0": get(line_end=b" HTTP/2.0\r\n"),
    "http_version_3_0": get(line_end=b" HTTP/3.0\r\n"),
    "http_version_junk": get(line_end=b" HTTX/1.1\r\n"),
    "http2_preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
}


@dataclass
class Gateway:
    process: GatewayProcess
    upstream: ThreadedUpstream
    log: UpstreamLog

    def send(self, data: bytes, **kw: object) -> Exchange:
        self.log.mark()
        return exchange(self.process.port, data, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, users_file: Path) -> Iterator[Gateway]:
    from tests.conftest import gateway_yaml

    upstream = ThreadedUpstream().start()
    process: GatewayProcess | None = None
    try:
        url = upstream.url
        routes = textwrap.dedent(f"""\
            - {{name: public, path: /public, upstream: {url}, auth: public}}
            - {{name: api, path: /api, upstream: {url}, auth: required}}
            - {{name: ph, path: /ph, upstream: {url}, auth: public, preserve_host: true}}
        """)
        text = gateway_yaml(url, users_file, routes=routes,
                            extra="cookies: {enabled: true, secure: false}\n")
        process = start_gateway(tmp_path_factory.mktemp("hostile"), text)
        yield Gateway(process, upstream, UpstreamLog(upstream))
    finally:
        if process is not None:
            process.stop()
        upstream.stop()


def assert_well_formed_errors(ex: Exchange) -> None:
    """No 5xx; every error the gateway wrote is the JSON error shape."""
    for r in ex.responses:
        assert r.status < 500, (r.status, r.body)
        if r.status >= 400:
            assert (r.header("Content-Type") or "").startswith("application/json"), r.headers
            assert set(json.loads(r.body)) == {"error", "error_description"}, r.body


def assert_refused(ex: Exchange) -> None:
    assert_well_formed_errors(ex)
    if ex.responses:
        assert 400 <= ex.responses[-1].status < 500, ex.statuses
    else:
        assert ex.closed, f"neither an answer nor a closed connection: {ex.raw[:200]!r}"


def assert_nothing_smuggled(g: Gateway) -> None:
    assert not [r for r in g.upstream.received if "smuggled" in r.path], "smuggled request passed"


def last_error(ex: Exchange) -> str:
    return str(json.loads(ex.responses[-1].body)["error"])


# --- control: the harness sees a normal request through ---------------------------------------
def test_control_plain_and_chunked_requests_pass(gw: Gateway) -> None:
    ex = gw.send(get(path=b"/public/control"))
    assert ex.statuses == [200]
    assert [r.path for r in gw.log.since()] == ["/public/control"]
    ex = gw.send(post(b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n"))
    assert ex.statuses == [200]
    (got,) = gw.log.since()
    assert (got.method, got.path, got.body_size) == ("POST", "/public/first", 3)


@pytest.mark.parametrize("name", list(REJECTED))
def test_hostile_request_is_refused_before_the_upstream(gw: Gateway, name: str) -> None:
    ex = gw.send(REJECTED[name])
    assert_refused(ex)
    assert gw.log.since() == [], f"{name} reached the upstream: {gw.log.since()}"
    assert_nothing_smuggled(gw)


@pytest.mark.parametrize("value", [b"  chunked", b"\tchunked", b"CHUNKED"])
def test_chunked_with_optional_whitespace_or_case_is_framed_once(gw: Gateway, value: bytes) -> None:
    """Whitespace around and case of `chunked` are allowed (RFC 9112 OWS); the gateway decodes
    the body itself and sends its own framing, and what follows is a request of its own that
    passes every check (here: 401 without a token), never bytes passed through."""
    data = post(b"Transfer-Encoding:" + value + b"\r\n", b"3\r\nabc\r\n0\r\n\r\n" + SMUGGLED)
    ex = gw.send(data, expect=2)
    assert_well_formed_errors(ex)
    assert ex.statuses == [200, 401], ex.raw[:300]
    assert last_error(ex) == "missing_token"
    (got,) = gw.log.since()
    assert (got.method, got.path, got.body_size) == ("POST", "/public/first", 3)
    assert_nothing_smuggled(gw)


def test_body_that_looks_like_a_request_stays_a_body(gw: Gateway) -> None:
    data = post(b"Content-Length: " + str(len(SMUGGLED)).encode() + b"\r\n", SMUGGLED)
    ex = gw.send(data)
    assert ex.statuses == [200]
    (got,) = gw.log.since()
    assert (got.path, got.body_size) == ("/public/first", len(SMUGGLED))
    assert_nothing_smuggled(gw)


# --- old protocol versions that are still HTTP ----------------------------------------------
def test_http10_request_is_served_and_closed(gw: Gateway) -> None:
    ex = gw.send(b"GET /public/old HTTP/1.0\r\n\r\n")
    assert ex.statuses == [200] and ex.closed
    assert [r.path for r in gw.log.since()] == ["/public/old"]


# --- Expect ----------------------------------------------------------------------------------
def test_expect_100_continue(gw: Gateway) -> None:
    ex = gw.send(post(b"Expect: 100-continue\r\nContent-Length: 3\r\n", b"abc"), expect=2)
    assert ex.statuses == [100, 200]
    (got,) = gw.log.since()
    assert got.body_size == 3 and "expect" not in got.header_names()


def test_unknown_expectation_is_not_a_plain_text_error(gw: Gateway) -> None:
    ex = gw.send(post(b"Expect: teapot\r\nContent-Length: 3\r\n", b"abc"))
    assert_well_formed_errors(ex)
    assert len(ex.responses) == 1
    if ex.statuses == [200]:  # ignoring an unknown expectation is allowed (RFC 9110 10.1.1)
        (got,) = gw.log.since()
        assert "expect" not in got.header_names()
    else:
        assert ex.statuses == [417] and gw.log.since() == []


# --- pipelining ------------------------------------------------------------------------------
PIPELINED_ATTACKS: dict[str, bytes] = {
    "cl_and_te": post(b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
                      b"0\r\n\r\n" + SMUGGLED_PUBLIC, path=b"/public/smuggled-carrier"),
    "nul_in_path": get(path=b"/public/smuggled\x00"),
    "host_with_userinfo": get(path=b"/ph/smuggled", host=b"Host: user@evil.test\r\n"),
    "http09_line": b"GET /public/smuggled\r\n\r\n",
}


@pytest.mark.parametrize("gap", [0.0, 0.2], ids=["one_write", "two_writes"])
@pytest.mark.parametrize("name", list(PIPELINED_ATTACKS))
def test_pipelined_attack_after_a_good_request(gw: Gateway, name: str, gap: float) -> None:
    good = get(path=b"/public/good")
    attack = PIPELINED_ATTACKS[name]
    if gap:
        ex = gw.send(b"", chunks=[good, attack], gap=gap, expect=2)
    else:
        ex = gw.send(good + attack, expect=2)
    assert_refused(ex)
    # The good request may or may not be answered first (a parser may reject the whole
    # buffer), but it is the only one that can reach the upstream.
    assert ex.statuses in ([200, 400], [400], []), ex.statuses
    assert [r.path for r in gw.log.since()] in (["/public/good"], [])
    if gap:
        assert ex.statuses == [200, 400]
    assert_nothing_smuggled(gw)


def test_pipelined_request_without_token_is_checked_on_its_own(gw: Gateway) -> None:
    ex = gw.send(get(path=b"/public/good") + SMUGGLED, expect=2)
    assert ex.statuses == [200, 401]
    assert [r.path for r in gw.log.since()] == ["/public/good"]


@pytest.mark.parametrize("target", [b"http://%5B", b"https://%5B::1", b"http://[", b"%ff%fe",
                                    b"//evil.test", b"http://user@evil.test/"])
def test_hostile_return_target_on_the_sign_in_page(gw: Gateway, target: bytes) -> None:
    """The gateway's own pages parse query values too: an unparseable URL is not a 500."""
    ex = gw.send(get(path=b"/auth/sign-in?return=" + target))
    assert_well_formed_errors(ex)
    assert ex.statuses in ([200], [400]), ex.raw[:300]
    if ex.statuses == [200]:
        assert b'name="return" value="/"' in ex.responses[0].body
    assert gw.log.since() == []


def test_gateway_survived(gw: Gateway) -> None:
    """After all of the above, the same process still serves normally."""
    assert gw.process.proc is not None and gw.process.proc.poll() is None
    ex = gw.send(get(path=b"/public/after"))
    assert ex.statuses == [200]
    assert "Traceback" not in gw.process.logs()
