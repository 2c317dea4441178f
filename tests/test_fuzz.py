"""Fuzzing (hypothesis, bounded to ~20 s): access-token verification with mutated, re-signed
and random tokens; and the refresh and token endpoints' body parsing with random bodies."""

from __future__ import annotations

import asyncio
import base64
import json
import string
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import jwt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.clock import SystemClock
from gateway.config import load_config_text
from gateway.errors import InvalidToken
from gateway.pipeline.authn import Authenticator
from gateway.pipeline.revocations import RevocationList
from gateway.tokens.claims import Identity
from gateway.tokens.signer import KeyRing, generate_private_pem

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ISSUER, AUDIENCE = "fuzz-issuer", "fuzz-aud"
B64URL = string.ascii_letters + string.digits + "-_"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --- (a) access-token verification -----------------------------------------------------------
class Signer:
    """An Authenticator over a real key ring, and raw signing with that ring's key (so any
    header and claims, valid JSON or not, can be made to pass the signature check)."""

    def __init__(self, directory: Path, algorithm: str):
        directory.mkdir(parents=True, exist_ok=True)
        users = directory / "users.yaml"
        users.write_text("users: {}\n")
        if algorithm == "HS256":
            key_line = f"secret: '{'s' * 40}'"
        else:
            pem = directory / "key.pem"
            pem.write_bytes(generate_private_pem(algorithm))
            key_line = f"signing_key_file: '{pem}'"
        config = load_config_text(
            f"users: {{file: '{users}'}}\nroutes: []\n"
            f"tokens: {{issuer: {ISSUER}, audience: {AUDIENCE}, algorithm: {algorithm}, "
            f"{key_line}, extra_claims: [email]}}\n", "fuzz.yaml")
        clock = SystemClock()
        self.keyring = KeyRing.from_config(config.tokens, clock)
        self.revocations = RevocationList(clock)
        self.authn = Authenticator(self.keyring, self.revocations, clock, cache_size=64)
        key = self.keyring.active
        self.kid, self.alg = key.kid, key.alg
        self._algorithm = jwt.get_algorithm_by_name(key.alg)
        self._key = key.sign_with

    def raw(self, header: bytes, payload: bytes) -> str:
        signing_input = f"{b64(header)}.{b64(payload)}".encode()
        signature = self._algorithm.sign(signing_input, self._key)
        return f"{signing_input.decode()}.{b64(signature)}"

    def token(self, claims: dict[str, Any], **header: Any) -> str:
        head = {"alg": self.alg, "kid": self.kid, "typ": "JWT", **header}
        return self.raw(json.dumps(head).encode(), json.dumps(claims).encode())

    def valid_claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now,
                                  "nbf": now, "exp": now + 300, "jti": "j1", "sid": "s1",
                                  "roles": ["user"]}
        claims.update(overrides)
        return claims


@pytest.fixture(scope="module", params=["EdDSA", "ES256", "RS256", "HS256"])
def signer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Signer:
    return Signer(tmp_path_factory.mktemp(f"keys-{request.param}"), request.param)


def verify_only_token_errors(signer: Signer, token: str) -> Identity | None:
    """Verify twice (the second from the cache): an Identity, or InvalidToken and its
    subclasses TokenExpired / TokenRevoked; any other exception fails the test."""
    results: list[Identity | type[InvalidToken]] = []
    for _ in range(2):
        try:
            results.append(signer.authn.verify(token))
        except InvalidToken as e:
            results.append(type(e))
    assert results[0] == results[1]
    return results[0] if isinstance(results[0], Identity) else None


JSON_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10), st.sampled_from([10**400, -(10**400), 2**63, 1e308]),
)
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8)
CLAIM_NAMES = st.sampled_from(["iss", "aud", "sub", "iat", "nbf", "exp", "jti", "sid", "roles",
                               "email"])


def mutate(token: str, data: st.DataObject) -> str:
    """One to three random edits: flip, delete, insert, duplicate or swap segments, truncate."""
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["flip", "delete", "insert", "segments", "truncate"]))
        i = data.draw(st.integers(0, max(0, len(token) - 1)))
        if kind == "flip" and token:
            token = token[:i] + data.draw(st.sampled_from(B64URL + ".=+/ ")) + token[i + 1:]
        elif kind == "delete":
            token = token[:i] + token[i + data.draw(st.integers(1, 8)):]
        elif kind == "insert":
            token = token[:i] + data.draw(st.text(alphabet=B64URL + ".", max_size=6)) + token[i:]
        elif kind == "segments":
            parts = token.split(".")
            token = ".".join(data.draw(st.lists(st.sampled_from(parts), min_size=1, max_size=5)))
        else:
            token = token[:i]
    return token


@FUZZ
@given(data=st.data())
def test_mutated_valid_tokens(signer: Signer, data: st.DataObject) -> None:
    token = signer.token(signer.valid_claims())
    assert verify_only_token_errors(signer, token) is not None  # the starting point is valid
    verify_only_token_errors(signer, mutate(token, data))


@FUZZ
@given(token=st.one_of(
    st.text(max_size=200),
    st.text(alphabet=B64URL + ".", max_size=300),
    st.lists(st.binary(max_size=60).map(b64), min_size=1, max_size=5).map(".".join),
))
@example(token="a\ud800.b.c")
@example(token="x" * 100_000)
@example(token="..")
def test_random_strings(signer: Signer, token: str) -> None:
    assert verify_only_token_errors(signer, token) is None


@FUZZ
@given(overrides=st.dictionaries(CLAIM_NAMES, JSON_VALUES, max_size=4),
       drop=st.lists(CLAIM_NAMES, max_size=2), revoked=st.booleans())
@example(overrides={"exp": 10**400}, drop=[], revoked=False)
@example(overrides={"exp": float("nan")}, drop=[], revoked=False)
@example(overrides={"iat": float("-inf")}, drop=[], revoked=False)
@example(overrides={"aud": [1, {}]}, drop=[], revoked=False)
@example(overrides={"iss": ["fuzz-issuer"]}, drop=[], revoked=False)
def test_signed_tokens_with_hostile_claims(signer: Signer, overrides: dict[str, Any],
                                           drop: list[str], revoked: bool) -> None:
    """Claims that pass the signature (as if a key leaked or a bug signed them) are still
    checked: odd types, huge, infinite or NaN times, missing claims."""
    claims = signer.valid_claims(**overrides)
    for name in drop:
        claims.pop(name, None)
    sid = claims.get("sid")
    if revoked and isinstance(sid, str):
        signer.revocations.add([(sid, int(time.time() * 1000) + 60_000)])
    try:
        token = signer.token(claims)
    except ValueError:  # json.dumps refuses out-of-range floats only with allow_nan=False
        return
    identity = verify_only_token_errors(signer, token)
    if identity is not None:
        assert identity.exp == claims["exp"] and identity.exp > time.time() - 60
        assert identity.sub == claims["sub"] and identity.sid == claims["sid"]
        assert not (revoked and isinstance(sid, str))


@FUZZ
@given(header=st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit", "jku", "x5u",
                                               "b64", "zip", "cty"]), JSON_VALUES, max_size=4),
       raw_header=st.one_of(st.none(), st.binary(max_size=30)))
@example(header={"alg": "none"}, raw_header=None)
@example(header={"kid": ["k"]}, raw_header=None)
@example(header={"crit": ["exp"]}, raw_header=None)
@example(header={"b64": False}, raw_header=None)
def test_signed_tokens_with_hostile_headers(signer: Signer, header: dict[str, Any],
                                            raw_header: bytes | None) -> None:
    claims = json.dumps(signer.valid_claims()).encode()
    if raw_header is not None:
        token = signer.raw(raw_header, claims)
    else:
        head = {"alg": signer.alg, "kid": signer.kid, **header}
        token = signer.raw(json.dumps(head).encode(), claims)
    identity = verify_only_token_errors(signer, token)
    if identity is not None:  # only a header naming our key with its own algorithm passes
        assert raw_header is None
        assert header.get("alg", signer.alg) == signer.alg
        assert header.get("kid", signer.kid) == signer.kid
        assert "crit" not in header


# --- (b) the refresh and token endpoints -----------------------------------------------------
FORM = "application/x-www-form-urlencoded"
CONTENT_TYPES = st.one_of(
    st.sampled_from(["application/json", FORM, "text/plain", "", "multipart/form-data",
                     "application/json; charset=latin-1", f"{FORM}; charset=utf-16",
                     "application/jsonx", "*/*", "application/json;;;", "\u00e9/\u00e9"]),
    st.text(alphabet=string.printable.strip("\r\n\x0b\x0c"), max_size=20),
)
FIELD_NAMES = st.one_of(st.sampled_from(["refresh_token", "grant_type", "username", "password",
                                         "client_id", "scope"]), st.text(max_size=6))


def near(token: str) -> st.SearchStrategy[str]:
    """The token itself, one character changed, truncated, or token-shaped noise."""
    return st.one_of(
        st.just(token),
        st.tuples(st.integers(0, len(token) - 1), st.sampled_from(B64URL)).map(
            lambda p: token[:p[0]] + p[1] + token[p[0] + 1:]),
        st.integers(0, len(token)).map(lambda i: token[:i]),
        st.text(alphabet=B64URL, min_size=len(token) - 2, max_size=len(token) + 2),
    )


def field_values(token: str) -> st.SearchStrategy[Any]:
    return st.one_of(JSON_VALUES, st.text(max_size=40), near(token),
                     st.sampled_from(["refresh_token", "password", "a" * 5000, "\x00", "\ud800",
                                      "x\ud800y"]))


def bodies(token: str) -> st.SearchStrategy[bytes]:
    values = field_values(token)
    fields = st.dictionaries(FIELD_NAMES, values, max_size=4)
    as_json = fields.map(lambda d: json.dumps(d).encode())
    any_json = JSON_VALUES.map(lambda v: json.dumps(v).encode())
    as_form = st.lists(st.tuples(FIELD_NAMES, st.text(max_size=20)), max_size=25).map(
        lambda pairs: "&".join(f"{k}={v}" for k, v in pairs).encode("utf-8", "surrogatepass"))
    return st.one_of(as_json, any_json, as_form, st.binary(max_size=300),
                     st.sampled_from([b"[" * 16_000, b'{"a":' * 3000, b"\xff\xfe{}", b"{}" * 9000,
                                      b'{"refresh_token": "\\ud800"}', b"", b"null"]))


def refresh_requests(token: str) -> st.SearchStrategy[tuple[bytes, str]]:
    """(body, content type): well-formed ones carrying near-valid tokens, and anything."""
    return st.one_of(
        near(token).map(lambda t: (json.dumps({"refresh_token": t}).encode(), "application/json")),
        near(token).map(lambda t: (f"refresh_token={t}".encode(), FORM)),
        st.dictionaries(FIELD_NAMES, field_values(token), max_size=4).map(
            lambda d: (json.dumps(d).encode(), "application/json")),
        st.tuples(bodies(token), CONTENT_TYPES),
    )


def token_requests(token: str) -> st.SearchStrategy[tuple[bytes, str]]:
    text = st.text(min_size=1, max_size=8)
    forms = st.lists(st.tuples(FIELD_NAMES, field_values(token).filter(
        lambda v: isinstance(v, str))), max_size=6).map(
        lambda pairs: "&".join(f"{k}={v}" for k, v in pairs).encode("utf-8", "surrogatepass"))
    return st.one_of(
        near(token).map(lambda t: (f"grant_type=refresh_token&refresh_token={t}".encode(), FORM)),
        st.tuples(text, text).map(lambda up: (
            f"grant_type=password&username={up[0]}&password={up[1]}".encode(
                "utf-8", "surrogatepass"), FORM)),
        forms.map(lambda body: (body, FORM)),
        st.tuples(bodies(token), CONTENT_TYPES),
    )


@pytest.fixture
async def auth_client(gateway: Callable[..., Any], tmp_path: Path) -> Any:
    """An in-process gateway with the memory store; logins rate-limited to keep password
    grants (argon2, ~100 ms each) few."""
    client = await gateway(
        extra="auth: {rate_limit: {per_ip: 3, per_user: 2}}\n"
              "cookies: {enabled: true, secure: false}\n")
    return client


async def _login(client: Any) -> str:
    from tests.conftest import PASSWORD

    r = await client.post("/auth/login", json={"username": "alice", "password": PASSWORD})
    assert r.status == 200, await r.text()
    return str((await r.json())["refresh_token"])


async def post_is_4xx_json_or_tokens(client: Any, path: str, body: bytes, content_type: str,
                                     headers: dict[str, str]) -> str:
    """The error code (or "tokens"); fails on a 5xx or a body that is not the JSON shape."""
    hdrs = dict(headers)
    if content_type:
        hdrs["Content-Type"] = content_type
    r = await client.post(path, data=body, headers=hdrs, skip_auto_headers={"Content-Type"})
    text = await r.text()
    assert r.status < 500, (r.status, text, path, body[:200], content_type)
    payload = json.loads(text)
    if r.status == 200:
        assert set(payload) >= {"access_token", "refresh_token", "token_type"}
        return "tokens"
    assert 400 <= r.status < 500 and r.content_type == "application/json", (r.status, text)
    assert set(payload) == {"error", "error_description"}
    return str(payload["error"])


REFRESH_HEADERS = st.fixed_dictionaries({}, optional={
    "Cookie": st.sampled_from(["gw_refresh=abc", "gw_session=x; gw_refresh=y", "gw_refresh="]),
    "Origin": st.sampled_from(["http://[", "http://evil", "null", "http://127.0.0.1", "\u00e9"]),
    "X-Forwarded-For": st.sampled_from(["1.2.3.4", "garbage", ""]),
    "User-Agent": st.text(alphabet=string.printable.strip("\r\n\x0b\x0c"), max_size=20),
})


async def test_refresh_endpoint_random_bodies(auth_client: Any) -> None:
    token = await _login(auth_client)
    seen: Counter[str] = Counter()
    send = blocking_sender(seen)

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(request=refresh_requests(token), headers=REFRESH_HEADERS)
    @example(request=(b"[" * 16_000, "application/json"), headers={})
    @example(request=(b"", FORM), headers={"Cookie": "gw_refresh=a", "Origin": "http://["})
    @example(request=(b'{"refresh_token": "\\ud800"}', "application/json"), headers={})
    def run(request: tuple[bytes, str], headers: dict[str, str]) -> None:
        body, content_type = request
        send(post_is_4xx_json_or_tokens(
            auth_client, "/auth/refresh", body, content_type, headers))

    await asyncio.to_thread(run)
    # The fuzz got past body parsing into the token service, not only to 400s.
    assert {"invalid_request", "invalid_refresh_token"} <= set(seen), seen


async def test_token_endpoint_random_bodies(auth_client: Any) -> None:
    token = await _login(auth_client)
    seen: Counter[str] = Counter()
    send = blocking_sender(seen)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(request=token_requests(token))
    @example(request=(b"grant_type=password&username=\xff&password=x", FORM))
    @example(request=(b"grant_type=refresh_token&refresh_token=" + b"A" * 200, FORM))
    @example(request=(b"grant_type=password&username=alice&password=%00", FORM))
    def run(request: tuple[bytes, str]) -> None:
        body, content_type = request
        send(post_is_4xx_json_or_tokens(
            auth_client, "/auth/token", body, content_type, {}))

    await asyncio.to_thread(run)
    assert {"invalid_request", "invalid_grant"} <= set(seen), seen


async def test_login_endpoint_hostile_json(auth_client: Any) -> None:
    """Credentials that are JSON strings but not encodable text (lone surrogates), NUL, huge."""
    for fields in ({"username": "\ud800", "password": "x"}, {"username": "a", "password": "\udfff"},
                   {"username": "a\x00", "password": "x"}, {"username": ["a"], "password": "x"}):
        body = json.dumps(fields).encode()
        await post_is_4xx_json_or_tokens(auth_client, "/auth/login", body, "application/json", {})


def blocking_sender(seen: Counter[str]) -> Callable[[Coroutine[Any, Any, str]], None]:
    """Hypothesis drives a sync function (run in a thread); each example's request runs on
    the test's own loop, where the in-process gateway lives. Answers are counted in `seen`."""
    loop = asyncio.get_running_loop()

    def send(coro: Coroutine[Any, Any, str]) -> None:
        seen[asyncio.run_coroutine_threadsafe(coro, loop).result(30)] += 1

    return send
