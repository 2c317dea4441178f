"""Who the client is, and the X-Forwarded-* headers we send: a client's own forwarded headers
are believed (and appended to) only when it connects from a configured trusted proxy."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from multidict import MultiMapping

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    def __init__(self, networks: Iterable[str]):
        self._networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(n, strict=False) for n in networks
        )

    def trusts(self, address: str | None) -> bool:
        if not self._networks or not address:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._networks)

    def client_ip(self, peer: str | None, xff: str | None) -> str:
        """The first address, from the right, that is not one of our trusted proxies."""
        peer = peer or "unknown"
        if not xff or not self.trusts(peer):
            return peer
        for hop in reversed([h.strip() for h in xff.split(",")]):
            if not hop:
                continue
            if not self.trusts(hop):
                return hop if _is_ip(hop) else peer
        return peer

    def headers(
        self, peer: str | None, scheme: str, host: str | None,
        xff: str | None, xfp: str | None, xfh: str | None,
    ) -> dict[str, str]:
        peer = peer or "unknown"
        if self.trusts(peer):
            return {
                "X-Forwarded-For": f"{xff}, {peer}" if xff else peer,
                "X-Forwarded-Proto": xfp or scheme,
                "X-Forwarded-Host": xfh or host or "",
            }
        return {"X-Forwarded-For": peer, "X-Forwarded-Proto": scheme, "X-Forwarded-Host": host or ""}


def forwarded_for(headers: MultiMapping[str]) -> str | None:
    """Every X-Forwarded-For line as one list: several lines of a list-valued header are one
    value (RFC 9110 §5.3), so reading only the first would drop hops, or let a client's own
    line stand in front of the one a trusted proxy added."""
    lines = headers.getall("X-Forwarded-For", ())
    joined = ", ".join(line.strip() for line in lines if line.strip())
    return joined or None


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
