"""The configuration as frozen, typed objects; every check that needs only the value lives here."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    field_validator,
    model_validator,
)
from pydantic_core import core_schema
from yarl import URL

from gateway.config.units import parse_duration, parse_size

Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]


class FrozenMap(Mapping[str, str]):
    """A read-only, hashable str -> str mapping: frozen models must hold no dict that can change."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | None = None) -> None:
        self._items = dict(items or {})

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({self._items!r})"

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(
            cls, handler.generate_schema(dict[str, str]),
            serialization=core_schema.plain_serializer_function_ser_schema(dict),
        )

_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_METHOD = re.compile(r"^[A-Z]+$")
_HOST = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d{1,5})?$")


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)


def _as_tuple(value: object) -> object:
    """Accept a scalar where a list is expected (`upstream: http://a` or a list of URLs)."""
    return (value,) if isinstance(value, str) else value


def _header_name(value: str) -> str:
    if not _HEADER_NAME.match(value):
        raise ValueError(f"{value!r} is not a valid HTTP header name")
    return value


class Listen(Frozen):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    #: Clients connecting from these networks may supply X-Forwarded-* (appended to, not replaced).
    trusted_proxies: tuple[str, ...] = ()
    #: Time allowed for a client to send the request head; slow-header clients are cut off.
    header_timeout: Duration = 10.0
    #: Longest pause allowed between two pieces of a request body; slow-body clients are cut off.
    body_timeout: Duration = 30.0
    #: Idle keep-alive connections are closed after this long.
    keepalive_timeout: Duration = 75.0
    #: Time allowed for in-flight requests to finish on SIGTERM.
    drain_timeout: Duration = 30.0
    max_line_size: Size = 8190
    max_field_size: Size = 8190
    max_headers: int = Field(100, ge=1)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not an IP address or CIDR network") from None
        return value


class Sentinel(Frozen):
    addresses: tuple[str, ...] = Field(min_length=1)
    service_name: str = "mymaster"
    password: str | None = None


#: The longest wait between two tries of one Redis command (redis-py's ExponentialBackoff cap).
RETRY_BACKOFF_CAP = 0.5


class RedisConfig(Frozen):
    url: str = "memory://"
    key_prefix: str = "gw:"
    #: Each command waits at most this long; a dead or stalled Redis fails fast as a 503.
    timeout: Duration = 1.0
    connect_timeout: Duration = 1.0
    pool_size: int = Field(64, ge=1)
    retries: int = Field(1, ge=0, le=10)
    sentinel: Sentinel | None = None
    cluster: bool = False

    @property
    def retry_window(self) -> float:
        """How long after a command first reached Redis its last retry can still arrive: each
        retry follows a timeout, a backoff and a reconnect. The embedded store never retries."""
        if self.url == "memory://":
            return 0.0
        return self.retries * (self.timeout + RETRY_BACKOFF_CAP + self.connect_timeout)

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not re.match(r"^(memory|redis|rediss|unix)://", value):
            raise ValueError("expected memory://, redis://, rediss:// or unix://")
        return value

    @property
    def embedded(self) -> bool:
        return self.url.startswith("memory://") and self.sentinel is None


Algorithm = Literal["EdDSA", "ES256", "RS256", "HS256"]


class Tokens(Frozen):
    issuer: str = "edge-gateway"
    audience: tuple[str, ...] = ("edge-gateway",)
    algorithm: Algorithm = "EdDSA"
    #: PEM private key of the active signing key (asymmetric algorithms).
    signing_key_file: str | None = None
    #: PEM public (or private) keys still accepted for verification after a rotation.
    verify_key_files: tuple[str, ...] = ()
    #: HS256 shared secret (use ${ENV}); `previous_secrets` keep verifying after a rotation.
    secret: str | None = Field(None, repr=False)
    previous_secrets: tuple[str, ...] = Field((), repr=False)
    access_ttl: Duration = 900.0
    refresh_ttl: Duration = 14 * 86400.0
    session_max_lifetime: Duration = 30 * 86400.0
    reuse_grace: Duration = 10.0
    leeway: Duration = 30.0
    max_token_bytes: Size = 8192
    verify_cache_size: int = Field(10_000, ge=0)
    #: Claims copied from the user record into access tokens.
    extra_claims: tuple[str, ...] = ()
    identity_token_ttl: Duration = 60.0

    @field_validator("audience", mode="before")
    @classmethod
    def _aud(cls, value: object) -> object:
        return _as_tuple(value)

    @model_validator(mode="after")
    def _keys(self) -> Tokens:
        if self.algorithm == "HS256":
            if self.signing_key_file or self.verify_key_files:
                raise ValueError("HS256 uses `secret`, not key files")
            if self.secret is not None and len(self.secret.encode()) < 32:
                raise ValueError("HS256 secret must be at least 32 bytes")
        elif self.secret or self.previous_secrets:
            raise ValueError(f"{self.algorithm} uses key files, not `secret`")
        if self.access_ttl <= 0 or self.refresh_ttl <= 0:
            raise ValueError("access_ttl and refresh_ttl must be positive")
        if self.session_max_lifetime < self.refresh_ttl:
            raise ValueError("session_max_lifetime must be at least refresh_ttl")
        if self.reuse_grace >= self.refresh_ttl:
            raise ValueError("reuse_grace must be shorter than refresh_ttl")
        return self

    @property
    def ephemeral(self) -> bool:
        """No key material configured: a key is generated at start (single process only)."""
        return self.signing_key_file is None and self.secret is None


class RateLimit(Frozen):
    window: Duration = 300.0
    #: Failed logins per username per window.
    per_user: int = Field(10, ge=1)
    #: Login attempts per client IP per window.
    per_ip: int = Field(100, ge=1)


class Auth(Frozen):
    prefix: str = "/auth"
    #: realm of the WWW-Authenticate challenge (RFC 6750).
    realm: str = Field("gateway", pattern=r'^[^"\\]*$')
    rate_limit: RateLimit = RateLimit()
    max_sessions_per_user: int = Field(100, ge=1)
    #: Where sign-out redirects; empty serves the signed-out page.
    sign_out_redirect: str | None = None
    #: Hosts a browser may be sent back to after sign-in besides this gateway itself.
    allowed_return_hosts: tuple[str, ...] = ()

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not re.match(r"^/[A-Za-z0-9._~/-]*[A-Za-z0-9._~-]$", value) or "//" in value:
            raise ValueError("expected a path like /auth (leading slash, no trailing slash)")
        return value


class Verifier(Frozen):
    url: str
    timeout: Duration = 3.0

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value)


class Users(Frozen):
    file: str | None = None
    verifier: Verifier | None = None

    @model_validator(mode="after")
    def _one(self) -> Users:
        if (self.file is None) == (self.verifier is None):
            raise ValueError("set exactly one of `file` or `verifier`")
        return self


class Cookies(Frozen):
    enabled: bool = False
    #: Secure cookies are only sent over https; set false only for local plain-http development.
    secure: bool = True
    #: HttpOnly, SameSite=Lax, Path=/: the access token for browser routes.
    access_name: str = "gw_access"
    #: HttpOnly, SameSite=Strict, Path={auth prefix}: the refresh token of API logins.
    refresh_name: str = "gw_refresh"
    #: HttpOnly, SameSite=Lax, Path=/: the refresh token of browser sign-ins. It must reach
    #: browser routes for inline silent refresh; the gateway strips it before any upstream.
    session_name: str = "gw_session"
    csrf_name: str = "gw_csrf"
    domain: str | None = None


class IdentityHeaders(Frozen):
    user_id: str = "X-User-Id"
    roles: str = "X-User-Roles"
    session_id: str = "X-Session-Id"

    @field_validator("user_id", "roles", "session_id")
    @classmethod
    def _name(cls, value: str) -> str:
        return _header_name(value)


class Identity(Frozen):
    headers: IdentityHeaders = IdentityHeaders()
    strip_prefixes: tuple[str, ...] = ("X-User-", "X-Auth-")
    #: claim name -> header name, for claims copied from the token into upstream headers.
    claims: FrozenMap = FrozenMap()
    #: Header carrying the gateway-signed identity token on routes with `identity_token: true`.
    token_header: str = "X-Identity-Token"

    @field_validator("token_header")
    @classmethod
    def _token_header(cls, value: str) -> str:
        return _header_name(value)

    @field_validator("claims")
    @classmethod
    def _claims(cls, value: FrozenMap) -> FrozenMap:
        for header in value.values():
            _header_name(header)
        return value


def _http_url(value: str) -> str:
    try:
        url = URL(value)
    except (ValueError, TypeError):
        raise ValueError(f"{value!r} is not a URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{value!r}: expected an http:// or https:// URL with a host")
    if url.query_string or url.fragment:
        raise ValueError(f"{value!r}: an upstream URL cannot have a query or fragment")
    return value


class Route(Frozen):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")
    path: str
    host: str | None = None
    methods: tuple[str, ...] | None = None
    upstream: tuple[str, ...] = Field(min_length=1)
    auth: Literal["public", "optional", "required"] = "required"
    roles: tuple[str, ...] = ()
    roles_all: tuple[str, ...] = ()
    strip_prefix: bool = False
    timeout: Duration = 30.0
    connect_timeout: Duration = 5.0
    max_body: Size = 10 * 1000**2
    browser: bool = False
    check_session: bool = False
    identity_token: bool = False
    forward_authorization: bool = False
    #: Send the upstream's own Host instead of the client's (the client's goes in X-Forwarded-Host).
    preserve_host: bool = False
    websocket: bool = True

    @field_validator("upstream", mode="before")
    @classmethod
    def _upstreams(cls, value: object) -> object:
        return _as_tuple(value)

    @field_validator("upstream")
    @classmethod
    def _urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_http_url(v) for v in value)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with /")
        segments = value.split("/")[1:]
        if any(s in (".", "..") for s in segments) or "//" in value or "%" in value or "\\" in value:
            raise ValueError("must be a normalised path (no dot segments, //, % or backslash)")
        return value.rstrip("/") or "/"

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.lower()
        if not _HOST.match(value):
            raise ValueError(f"{value!r} is not a host name (optionally *.suffix and :port)")
        return value

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        upper = tuple(m.upper() for m in value)
        for m in upper:
            if not _METHOD.match(m):
                raise ValueError(f"{m!r} is not an HTTP method")
        return upper

    @model_validator(mode="after")
    def _policy(self) -> Route:
        if self.auth == "public" and (self.roles or self.roles_all):
            raise ValueError("a public route cannot require roles")
        if self.auth != "required" and self.check_session:
            raise ValueError("check_session needs auth: required")
        return self


class Metrics(Frozen):
    enabled: bool = True
    #: Path on the main listener; set `port` to serve it on a separate admin listener instead.
    path: str = "/metrics"
    host: str = "127.0.0.1"
    port: int | None = Field(None, ge=0, le=65535)


class Logging(Frozen):
    level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True


class GatewayConfig(Frozen):
    listen: Listen = Listen()
    redis: RedisConfig = RedisConfig()
    tokens: Tokens = Tokens()
    auth: Auth = Auth()
    users: Users
    cookies: Cookies = Cookies()
    identity: Identity = Identity()
    metrics: Metrics = Metrics()
    logging: Logging = Logging()
    routes: tuple[Route, ...] = ()

    @property
    def advisories(self) -> tuple[str, ...]:
        """Valid but risky settings: `gateway check` prints them and every worker logs them."""
        out = []
        if self.tokens.ephemeral:
            out.append("no signing key configured: an ephemeral key is generated at start "
                       "(single process only; tokens do not survive a restart)")
        window = self.redis.retry_window
        if window and self.tokens.reuse_grace <= window:
            # A rotation that ran but whose reply was lost is sent again; within the grace the
            # retry gets the same successor, after it the retry looks like a stolen token.
            out.append(
                f"tokens.reuse_grace ({self.tokens.reuse_grace:g}s) is not longer than the Redis "
                f"retry window ({window:g}s = redis.retries x (timeout + connect_timeout + "
                f"{RETRY_BACKOFF_CAP:g}s backoff)): a refresh retried after a lost reply would "
                "be taken for token reuse and end the session")
        return tuple(out)
