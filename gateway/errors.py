"""The one error tree: every failure a client can see is a GatewayError with its status and code.

Only `middlewares.py` turns these into HTTP responses; everything else raises them.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error that becomes a JSON response `{"error", "error_description"}`."""

    status: int = 500
    code: str = "server_error"
    description: str = "The gateway could not handle the request."
    #: RFC 6750 error attribute for WWW-Authenticate; None means no challenge header.
    bearer_error: str | None = None

    def __init__(self, description: str | None = None, *, headers: dict[str, str] | None = None):
        super().__init__(description or self.description)
        self.description = description or self.description
        self.headers: dict[str, str] = dict(headers or {})


# --- request shape -------------------------------------------------------------------------
class BadRequest(GatewayError):
    status, code, description = 400, "invalid_request", "The request is malformed."


class InvalidPath(BadRequest):
    code, description = "invalid_path", "The request path is not acceptable."


class HeadersTooLarge(GatewayError):
    status, code, description = 431, "headers_too_large", "Request headers are too large."


class UriTooLong(GatewayError):
    status, code, description = 414, "uri_too_long", "The request line is too long."


class PayloadTooLarge(GatewayError):
    status, code, description = 413, "payload_too_large", "The request body exceeds the route's limit."


class NoRoute(GatewayError):
    status, code, description = 404, "no_route", "No route matches this request."


class MethodNotAllowed(GatewayError):
    status, code, description = 405, "method_not_allowed", "The route does not accept this method."


class RequestTimeout(GatewayError):
    status, code, description = 408, "request_timeout", "The client was too slow sending the request."


# --- authentication at the edge (RFC 6750) -------------------------------------------------
class AuthError(GatewayError):
    status = 401


class MissingToken(AuthError):
    code, description = "missing_token", "This route requires a bearer access token."
    bearer_error = ""  # challenge without an error attribute (RFC 6750 §3.1)


class InvalidToken(AuthError):
    code, description = "invalid_token", "The access token is invalid."
    bearer_error = "invalid_token"


class TokenExpired(InvalidToken):
    code, description = "token_expired", "The access token has expired; refresh it."


class TokenRevoked(InvalidToken):
    code, description = "token_revoked", "The session of this access token was revoked."


class InsufficientScope(AuthError):
    status, code = 403, "insufficient_scope"
    description = "The access token does not carry a role this route requires."
    bearer_error = "insufficient_scope"


class CsrfRejected(GatewayError):
    status, code, description = 403, "csrf_rejected", "Cross-site request rejected."


# --- token service -------------------------------------------------------------------------
class InvalidCredentials(GatewayError):
    status, code, description = 401, "invalid_credentials", "Unknown user or wrong password."


class RateLimited(GatewayError):
    status, code, description = 429, "rate_limited", "Too many attempts; retry later."

    def __init__(self, retry_after: int, description: str | None = None):
        super().__init__(description, headers={"Retry-After": str(max(1, retry_after))})
        self.retry_after = max(1, retry_after)


class RefreshError(GatewayError):
    status = 401


class InvalidRefreshToken(RefreshError):
    code, description = "invalid_refresh_token", "The refresh token is not valid."


class RefreshTokenExpired(RefreshError):
    code, description = "refresh_token_expired", "The refresh token has expired; log in again."


class RefreshTokenReused(RefreshError):
    code = "refresh_token_reused"
    description = "This refresh token was already used; the session has been revoked."


class SessionRevoked(RefreshError):
    code, description = "session_revoked", "The session has been revoked; log in again."


class SessionNotFound(GatewayError):
    status, code, description = 404, "session_not_found", "No such session."


class InvalidGrant(BadRequest):
    """RFC 6749 §5.2: credentials or refresh token not accepted at the token endpoint."""

    code, description = "invalid_grant", "The grant is invalid, expired or revoked."


class UnsupportedGrantType(BadRequest):
    code, description = "unsupported_grant_type", "The grant type is not supported."


# --- dependencies --------------------------------------------------------------------------
class StoreUnavailable(GatewayError):
    status, code = 503, "session_store_unavailable"
    description = "The session store is unavailable; retry shortly."


class VerifierUnavailable(GatewayError):
    status, code, description = 503, "user_service_unavailable", "The user service is unavailable."


class BadGateway(GatewayError):
    status, code, description = 502, "bad_gateway", "The upstream could not be reached."


class GatewayTimeout(GatewayError):
    status, code, description = 504, "gateway_timeout", "The upstream did not answer in time."


def all_error_types() -> list[type[GatewayError]]:
    """Every concrete error class (for the documented-codes test and README table).

    Concrete = declares its own `code`: AuthError and RefreshError only group their subclasses
    (their inherited `server_error` with a 401 is never sent)."""
    out: list[type[GatewayError]] = []
    todo: list[type[GatewayError]] = [GatewayError]
    while todo:
        cls = todo.pop()
        if "code" in vars(cls):
            out.append(cls)
        todo.extend(cls.__subclasses__())
    return out
