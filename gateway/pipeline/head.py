"""Request-head checks the HTTP parser leaves to us, run before anything else: a head that a
next hop could read differently from the gateway is refused with a 400, never passed on."""

from __future__ import annotations

import re

from aiohttp import HttpVersion10, HttpVersion11, web

from gateway.errors import BadRequest

# uri-host [":" port] (RFC 9110 §7.2), limited to what names and addresses use: no userinfo,
# path, comma lists or spaces. Empty is allowed (a target without authority).
_HOST = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~-]+)?(?::[0-9]{1,5})?$")


def check_head(request: web.BaseRequest) -> None:
    """Raise BadRequest for a head the gateway will not serve or forward."""
    if request.version not in (HttpVersion10, HttpVersion11):
        raise BadRequest("Only HTTP/1.0 and HTTP/1.1 requests are served.")
    headers = request.headers
    hosts = headers.getall("Host", [])
    if len(hosts) > 1 or (not hosts and request.version == HttpVersion11):
        raise BadRequest("An HTTP/1.1 request needs exactly one Host header.")
    if hosts and not _HOST.match(hosts[0]):
        raise BadRequest("The Host header is not a host name or address.")
    codings = headers.getall("Transfer-Encoding", [])
    if codings and [c.strip(" \t").lower() for c in codings] != ["chunked"]:
        # The parser accepts `gzip, chunked` and decodes only the chunks: forwarded, the body
        # would silently change meaning.
        raise BadRequest("Only the chunked transfer coding is accepted.")
    for value in headers.values():
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                # Bytes that are not UTF-8 arrive as surrogates and would be dropped on the way
                # out: what the gateway checked (say, a cookie name) is not what it would send.
                raise BadRequest("Header values must be ASCII or UTF-8.") from None


async def expect_continue(request: web.Request) -> None:
    """`Expect: 100-continue` as aiohttp does it; other expectations are ignored (RFC 9110
    §10.1.1 allows it, and Expect is never forwarded) instead of a plain-text 417."""
    if request.version == HttpVersion11 and \
            request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the response proper has not started
