"""The request headers an upstream receives: strip first (hop-by-hop, spoofed identity, the
client's credentials), then inject ours. Compiled once from config; one pass per request."""

from __future__ import annotations

import re

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config.model import Identity as IdentityConfig
from gateway.config.model import Route
from gateway.pipeline.forwarded import TrustedProxies, forwarded_for
from gateway.tokens.claims import Identity

# RFC 9110 §7.6.1 hop-by-hop fields, plus what we always set ourselves.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authorization", "proxy-authenticate", "expect",
})
_FORWARDED = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded",
                        "x-real-ip", "x-request-id", "host"})
_VERDICT_CACHE = 1024
_DEFAULT_NAMES = ("X-User-Id", "X-User-Roles", "X-Session-Id", "X-Identity-Token")


class HeaderPlan:
    def __init__(self, config: IdentityConfig, gateway_cookies: tuple[str, ...],
                 trusted: TrustedProxies):
        names = config.headers
        self._user_id, self._roles, self._sid = names.user_id, names.roles, names.session_id
        self._claims = tuple(config.claims.items())
        self._token_header = config.token_header
        # The default names are stripped too: a backend may still read them after a rename.
        self._strip_exact = frozenset(
            _folded(n) for n in (names.user_id, names.roles, names.session_id,
                                 config.token_header, *config.claims.values(), *_DEFAULT_NAMES)
        ) | HOP_BY_HOP | _FORWARDED
        # Every X-Forwarded-* (Port, Prefix, Ssl, User, ...): frameworks rewrite URLs from them
        # and some backends read identity from them; the gateway sets For/Proto/Host itself.
        self._strip_prefixes = ("x-forwarded-", *(_folded(p) for p in config.strip_prefixes))
        self._gateway_cookies = frozenset(gateway_cookies)
        # A gateway cookie name wherever a cookie parser may start a name, not only at the start
        # of a `;` part: aiohttp reads `a=1 gw_access=x` and `a=1, gw_access=x` as two cookies.
        alternatives = "|".join(re.escape(n) for n in sorted(gateway_cookies))
        self._gateway_cookie = re.compile(rf'(?:^|[\s",=])(?:{alternatives})(?=[\s=]|$)')
        self._trusted = trusted
        self._verdicts: dict[str, bool] = {}

    def stripped(self, name: str) -> bool:
        """True when a client-sent header of this name never reaches an upstream."""
        verdict = self._verdicts.get(name)
        if verdict is None:
            folded = _folded(name)
            verdict = folded in self._strip_exact or folded.startswith(self._strip_prefixes)
            if len(self._verdicts) < _VERDICT_CACHE:
                self._verdicts[name] = verdict
        return verdict

    def build(
        self, headers: CIMultiDictProxy[str], route: Route, identity: Identity | None, *,
        peer: str | None, scheme: str, request_id: str, identity_token: str | None = None,
    ) -> CIMultiDict[str]:
        connection_named = _connection_tokens(headers.getall("Connection", ()))
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in headers.items():
            if self.stripped(name) or (connection_named and name.lower() in connection_named):
                continue
            if name.lower() == "authorization" and not route.forward_authorization:
                continue
            if name.lower() == "cookie" and self._gateway_cookies:
                value = self._without_gateway_cookies(value)
                if not value:
                    continue
            out.add(name, value)
        host = headers.get("Host")
        if route.preserve_host and host:
            out["Host"] = host  # otherwise the proxy sets the upstream's own authority
        out.update(self._trusted.headers(
            peer, scheme, host, forwarded_for(headers),
            headers.get("X-Forwarded-Proto"), headers.get("X-Forwarded-Host"),
        ))
        out["X-Request-Id"] = request_id
        if identity is not None:
            out[self._user_id] = identity.sub
            out[self._roles] = ",".join(identity.roles)
            out[self._sid] = identity.sid
            for claim, header in self._claims:
                claimed = identity.extra.get(claim)
                if claimed is not None:
                    out[header] = _header_value(claimed)
            if identity_token is not None:
                out[self._token_header] = identity_token
        return out

    def _without_gateway_cookies(self, value: str) -> str:
        kept = [
            part for part in value.split(";")
            if not self._gateway_cookie.search(part)
        ]
        return ";".join(kept).strip()


def _folded(name: str) -> str:
    """Header names as CGI-style upstreams (WSGI, PHP, Rack) see them: case and `_` vs `-`
    folded, so `X_User_Id` cannot pass as a different header and be read as `X-User-Id`."""
    return name.lower().replace("_", "-")


def _connection_tokens(values: list[str] | tuple[str, ...]) -> frozenset[str]:
    if not values:
        return frozenset()
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


def _header_value(value: object) -> str:
    text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
    # Never let a claim value smuggle a header line.
    return "".join(c for c in text if c >= " " and c != "\x7f")
