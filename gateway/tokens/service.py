"""Login, refresh, logout: the session lifecycle policy (TTLs, grace, families, rate limits)."""

from __future__ import annotations

import json
import logging
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.clock import Clock
from gateway.config.model import GatewayConfig
from gateway.errors import (
    InvalidCredentials,
    InvalidRefreshToken,
    RateLimited,
    RefreshTokenExpired,
    RefreshTokenReused,
    SessionNotFound,
    SessionRevoked,
)
from gateway.tokens import refresh as rt
from gateway.tokens.claims import Identity
from gateway.tokens.signer import KeyRing
from gateway.tokens.store import RotateResult, SessionRecord, SessionStore
from gateway.users import Credentials, UserRecord

audit_log = logging.getLogger("gateway.audit")

#: Called for each audit event: (event name, fields). Wired to logs and metrics by app.py.
AuditSink = Callable[[str, Mapping[str, Any]], None]


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    expires_in: int
    refresh_token: str
    refresh_expires_in: int
    sid: str
    sub: str

    def body(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token, "token_type": "Bearer",
            "expires_in": self.expires_in, "refresh_token": self.refresh_token,
            "refresh_expires_in": self.refresh_expires_in,
        }


@dataclass(frozen=True, slots=True)
class ClientInfo:
    ip: str
    user_agent: str


class TokenService:
    def __init__(
        self, config: GatewayConfig, keyring: KeyRing, store: SessionStore,
        users: Credentials, clock: Clock, audit: AuditSink,
    ):
        self._tokens = config.tokens
        self._auth = config.auth
        self.keyring = keyring
        self.store = store
        self.users = users
        self._clock = clock
        self._audit = audit

    def _now_ms(self) -> int:
        return int(self._clock.now() * 1000)

    # --- login -----------------------------------------------------------------------------
    async def login(self, username: str, password: str, client: ClientInfo) -> TokenPair:
        limit = self._auth.rate_limit
        window_ms = int(limit.window * 1000)
        ip_count, ip_reset = await self.store.hit("ip", client.ip, window_ms)
        if ip_count > limit.per_ip:
            self._audit("login_rate_limited", {"ip": client.ip, "by": "ip"})
            raise RateLimited(ip_reset // 1000 + 1)
        # The attempt is counted before the password is checked, so concurrent guesses cannot
        # all pass a check made before any of them failed; a correct password gives it back.
        # One counter for every spelling of a name: a user service that matches names
        # case-insensitively must not give "Alice", "ALICE", "alice" a limit each.
        subject = unicodedata.normalize("NFKC", username).casefold()
        user_count, user_reset = await self.store.hit("user", subject, window_ms)
        if user_count > limit.per_user:
            await self.store.hit("user", subject, window_ms, -1)  # refused: not a failure
            self._audit("login_rate_limited", {"user": username, "ip": client.ip, "by": "user"})
            raise RateLimited(user_reset // 1000 + 1)
        try:
            user = await self.users.authenticate(username, password)
        except Exception:
            await self.store.hit("user", subject, window_ms, -1)  # the verifier failed, not you
            raise
        if user is None:
            self._audit("login_failure", {"user": username, "ip": client.ip})
            raise InvalidCredentials()
        await self.store.hit("user", subject, window_ms, -1)
        pair = await self._start_session(user, client)
        self._audit("login_success", {"user": user.sub, "sid": pair.sid, "ip": client.ip})
        return pair

    async def _start_session(self, user: UserRecord, client: ClientInfo) -> TokenPair:
        now_ms = self._now_ms()
        # Whole seconds, as the token carries them: the session ends exactly when its token does.
        max_ms = (now_ms + int(self._tokens.session_max_lifetime * 1000)) // 1000 * 1000
        exp_ms = min((now_ms + int(self._tokens.refresh_ttl * 1000)) // 1000 * 1000, max_ms)
        sid, mac_key = rt.new_sid(), rt.new_mac_key()
        token = rt.mint(sid, 0, exp_ms // 1000, max_ms // 1000)
        extra = self._extra(user.claims)
        record = SessionRecord(
            sid=sid, sub=user.sub, roles=user.roles, extra=json.dumps(extra) if extra else "",
            created_ms=now_ms, last_used_ms=now_ms, expires_ms=exp_ms, max_expires_ms=max_ms,
            ip=client.ip[:64], user_agent=client.user_agent[:256], revoked=None,
        )
        evicted = await self.store.create(record, token.digest, mac_key,
                                          self._auth.max_sessions_per_user)
        if evicted:
            await self._revoke_many(user.sub, evicted, "evicted")
        return self._pair(token, mac_key, user.sub, user.roles, extra, now_ms)

    def _extra(self, claims: Mapping[str, Any]) -> dict[str, Any]:
        return {k: claims[k] for k in self._tokens.extra_claims if k in claims}

    def _pair(
        self, token: rt.RefreshToken, mac_key: bytes, sub: str, roles: tuple[str, ...],
        extra: Mapping[str, Any], now_ms: int,
    ) -> TokenPair:
        # Stamped with the time taken before the session step, not after it: a revocation that
        # lands between the step and this line (another instance, while this one stalls) keeps
        # its sid listed until access_ttl after the revocation, which must outlast this token.
        access, ttl = self.keyring.access_token(sub=sub, sid=token.sid, roles=roles, extra=extra,
                                                issued_at=now_ms / 1000)
        return TokenPair(access, ttl, token.token(mac_key),
                         max(0, token.expires - now_ms // 1000), token.sid, sub)

    # --- refresh ---------------------------------------------------------------------------
    async def refresh(self, presented: str, client: ClientInfo) -> TokenPair:
        token = rt.parse(presented)
        if token is None:
            raise InvalidRefreshToken()
        now_ms = self._now_ms()
        if token.expires * 1000 <= now_ms:
            raise RefreshTokenExpired()
        # The successor is minted before the one atomic step: it becomes valid only if that
        # step rotates, and is sealed so concurrent presenters of the same token receive it too.
        expires = (now_ms + int(self._tokens.refresh_ttl * 1000)) // 1000
        successor = rt.mint(token.sid, token.generation + 1, expires, token.session_end)
        result = await self.store.rotate(
            token.sid, token.generation, token.digest, successor.digest, now_ms,
            expires * 1000 - now_ms, int(self._tokens.reuse_grace * 1000),
            rt.seal(token, successor),
        )
        if result.kind == "rotated":
            return await self._issue(successor, result, client, now_ms)
        if result.kind == "grace":
            shared = rt.unseal(token, result.blob)
            if shared is None:
                raise InvalidRefreshToken()
            return await self._issue(shared, result, client, now_ms)
        if result.kind == "reused" or (result.kind == "verify" and token.genuine(result.mac_key)):
            if result.kind == "verify":
                await self.store.revoke(token.sid, "reused")
            await self._after_revoke(result.sub, [token.sid])
            self._audit("refresh_token_reused",
                        {"user": result.sub, "sid": token.sid, "ip": client.ip})
            raise RefreshTokenReused()
        if result.kind == "revoked":
            raise SessionRevoked()
        if result.kind == "expired":
            raise RefreshTokenExpired()
        raise InvalidRefreshToken()

    async def _issue(
        self, token: rt.RefreshToken, result: RotateResult, client: ClientInfo, now_ms: int
    ) -> TokenPair:
        roles = result.roles
        current = self.users.current(result.sub)
        if current is None:  # deleted or disabled since login: the session ends here
            await self.revoke(token.sid, "user_disabled")
            raise SessionRevoked("The user is no longer allowed to sign in.")
        if isinstance(current, UserRecord):
            roles = current.roles
        if result.kind == "rotated":
            self._audit("refresh", {"user": result.sub, "sid": token.sid, "ip": client.ip})
        extra = json.loads(result.extra) if result.extra else {}
        return self._pair(token, result.mac_key, result.sub, roles, extra, now_ms)

    # --- logout and session management -----------------------------------------------------
    async def logout(self, refresh_tokens: Iterable[str], access_sid: str | None) -> None:
        """Ends every session the caller proves it holds: each refresh token's live session and
        the access token's. A refresh token that holds nothing never shadows the access token:
        a stale cookie from another session must not leave the caller's own session live."""
        ended = {await self._logout_refresh_token(t) for t in refresh_tokens}
        if access_sid is not None and access_sid not in ended:
            await self.revoke(access_sid, "logout")

    async def _logout_refresh_token(self, presented: str) -> str | None:
        """The sid ended, or None when the token holds no live session (idempotent)."""
        token = rt.parse(presented)
        if token is None:
            return None  # nothing we issued, nothing to end
        # Only a holder of the session's live token may end it: a sid alone is not enough.
        if await self.store.holder(token.sid, token.digest) is None:
            return None
        await self.revoke(token.sid, "logout")
        return token.sid

    async def revoke(self, sid: str, reason: str, *, admin: bool = False) -> bool:
        sub = await self.store.revoke(sid, reason)
        if sub is None:
            return False
        await self._after_revoke(sub, [sid])
        self._audit("session_revoked_admin" if admin else "logout",
                    {"user": sub, "sid": sid, "reason": reason})
        return True

    async def revoke_user(self, sub: str, reason: str, *, admin: bool = False) -> int:
        sids = await self.store.user_sids(sub, self._now_ms())
        await self._revoke_many(sub, sids, reason)
        self._audit("session_revoked_admin" if admin else "logout_all",
                    {"user": sub, "count": len(sids), "reason": reason})
        return len(sids)

    async def _revoke_many(self, sub: str, sids: list[str], reason: str) -> None:
        for sid in sids:
            await self.store.revoke(sid, reason)
        await self._after_revoke(sub, sids)

    async def _after_revoke(self, sub: str, sids: list[str]) -> None:
        now_ms = self._now_ms()
        # Access tokens of these sessions stay cryptographically valid until they expire (plus
        # the verifier's leeway): every instance keeps the sids in memory until then, and one
        # more leeway for the clock skew between the instance that signed and this one.
        until = now_ms + int((self._tokens.access_ttl + 2 * self._tokens.leeway) * 1000)
        await self.store.announce_revoked(sids, until, now_ms)
        await self.store.unindex(sub, sids)

    async def sessions(self, sub: str) -> list[SessionRecord]:
        return await self.store.user_sessions(sub, self._now_ms())

    async def revoke_own(self, identity: Identity, sid: str) -> None:
        record = await self.store.get(sid)
        if record is None or record.sub != identity.sub or record.revoked:
            raise SessionNotFound()
        await self.revoke(sid, "logout")

