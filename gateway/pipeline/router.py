"""Normalised request path -> Route. Normalisation happens before matching, so what is matched
is exactly what the upstream receives: no `..`, encoded dot or doubled slash can reach a route
without that route's checks."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.config.model import Route
from gateway.errors import InvalidPath, MethodNotAllowed, NoRoute

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
# Starts the parameters of a path segment, literal or encoded (hex is upper-cased by then).
_PARAMS = re.compile(r";|%3B")
# Characters allowed literally in a path (RFC 3986 pchar plus "/"), everything else is rejected.
_PCHAR = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/%"
)


def normalise_path(raw: str) -> str:
    """RFC 3986 normalisation of the path of a request target (no query).

    Decodes percent-encoded unreserved characters, upper-cases the rest, removes dot segments
    and empty segments. Rejects what different servers read differently: encoded `/`, `\\` or
    NUL, literal backslashes, bytes outside pchar, and `..;` style dot segments with parameters.
    """
    if not raw.startswith("/"):
        raise InvalidPath("The request target must be an absolute path.")
    if not _PCHAR.issuperset(raw):
        raise InvalidPath("The path contains characters that must be percent-encoded.")
    if "%" in raw:
        raw = _decode_unreserved(raw)
    trailing = raw.endswith("/")
    out: list[str] = []
    for segment in raw.split("/"):
        if segment == "" or segment == ".":
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        # `..;x` is `..` to some servers; so is `..%3B` to those that decode before they split.
        if _PARAMS.split(segment, 1)[0] in (".", ".."):
            raise InvalidPath("Dot segments with parameters are not accepted.")
        out.append(segment)
    last = raw.rsplit("/", 1)[-1]
    if last in (".", ".."):
        trailing = True
    if not out:
        return "/"
    return "/" + "/".join(out) + ("/" if trailing else "")


def _decode_unreserved(raw: str) -> str:
    parts = raw.split("%")
    out = [parts[0]]
    for part in parts[1:]:
        if len(part) < 2 or part[0] not in _HEX or part[1] not in _HEX:
            raise InvalidPath("The path has an invalid percent-encoding.")
        byte = int(part[:2], 16)
        if byte in (0x2F, 0x5C):
            raise InvalidPath("Encoded slashes and backslashes are not accepted in paths.")
        if byte < 0x20 or byte == 0x7F:
            raise InvalidPath("Encoded control characters are not accepted in paths.")
        out.append((chr(byte) if byte in _UNRESERVED else "%" + part[:2].upper()) + part[2:])
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Match:
    route: Route
    #: The normalised path, with the route prefix removed when the route strips it.
    upstream_path: str


class Router:
    """Longest segment-aware prefix wins; host and method filters narrow the candidates."""

    def __init__(self, routes: Iterable[Route]):
        self._by_path: dict[str, list[Route]] = {}
        for route in routes:
            self._by_path.setdefault(route.path, []).append(route)
        # Host-specific routes are tried before host-agnostic ones on the same path.
        for candidates in self._by_path.values():
            candidates.sort(key=lambda r: r.host is None)

    def match(self, method: str, path: str, host: str | None) -> Match:
        """`path` must already be normalised. Raises NoRoute or MethodNotAllowed."""
        hostname, _, port = (host or "").lower().partition(":")
        # `admin.example.com.` is the same name, fully qualified: it must meet the same route.
        hostname = hostname.rstrip(".")
        allowed: set[str] = set()
        prefix = path.rstrip("/") or "/"
        while True:
            for route in self._by_path.get(prefix, ()):
                if route.host is not None and not _host_matches(route.host, hostname, port):
                    continue
                if route.methods is not None and method not in route.methods:
                    allowed.update(route.methods)
                    continue
                return Match(route, _strip(path, prefix) if route.strip_prefix else path)
            if allowed:
                # The longest prefix decides: another method must not fall through to a shorter
                # (perhaps public) route and reach this path without this route's checks.
                raise MethodNotAllowed(headers={"Allow": ", ".join(sorted(allowed))})
            if prefix == "/":
                break
            prefix = prefix.rsplit("/", 1)[0] or "/"
        raise NoRoute()

    def routes(self) -> list[Route]:
        return [r for rs in self._by_path.values() for r in rs]


def _strip(path: str, prefix: str) -> str:
    if prefix == "/":
        return path
    return path[len(prefix) :] or "/"


def _host_matches(pattern: str, hostname: str, port: str) -> bool:
    want_host, _, want_port = pattern.partition(":")
    if want_port and want_port != port:
        return False
    if want_host.startswith("*."):
        return hostname.endswith(want_host[1:]) and len(hostname) > len(want_host) - 1
    return hostname == want_host
