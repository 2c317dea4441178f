"""What the upstream is told about the caller: spoofed identity headers never arrive (on any route,
any case, duplicated, named in Connection), ours are injected, credentials are withheld."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from gateway.users.file import add_user
from tests.conftest import PASSWORD, gateway_yaml
from tests.support.edge import AUDIENCE, ISSUER, bearer, craft, login

SPOOF = "spoofed-by-client"


def _routes(url: str) -> str:
    return textwrap.dedent(f"""\
        - {{name: public, path: /public, upstream: {url}, auth: public}}
        - {{name: optional, path: /optional, upstream: {url}, auth: optional}}
        - {{name: api, path: /api, upstream: {url}, auth: required}}
        - {{name: fwd, path: /fwd, upstream: {url}, auth: required, forward_authorization: true}}
        - {{name: fwd-public, path: /fwd-public, upstream: {url}, auth: public,
            forward_authorization: true}}
        - {{name: idt, path: /idt, upstream: {url}, auth: required, identity_token: true}}
        - {{name: idt-opt, path: /idt-opt, upstream: {url}, auth: optional, identity_token: true}}
    """)


CLAIMS_CONFIG = "identity: {claims: {department: X-Dept, groups: X-Groups, level: X-Level}}\n"
CLAIMS_TOKENS = "extra_claims: [department, groups, level]\n"


@pytest.fixture
async def client(gateway, upstream):
    return await gateway(routes=_routes(upstream.url), extra=CLAIMS_CONFIG, tokens=CLAIMS_TOKENS)


def _spoofed_headers() -> list[tuple[str, str]]:
    """Every way a client might try to name an identity header itself."""
    return [
        ("X-User-Id", SPOOF), ("x-user-id", SPOOF + "-2"), ("X-USER-ID", SPOOF + "-3"),
        ("x-user-roles", SPOOF), ("X-User-Roles", "admin"), ("X-SESSION-ID", SPOOF),
        ("X-Session-Id", SPOOF + "-2"), ("X-Auth-Anything", SPOOF), ("x-auth-admin", "1"),
        ("X-User-Whatever", SPOOF), ("X-User-", SPOOF), ("X-Dept", SPOOF), ("x-groups", SPOOF),
        ("X-LEVEL", SPOOF), ("X-Identity-Token", SPOOF), ("x-identity-token", SPOOF + "-2"),
        # Underscored twins: CGI/WSGI-style upstreams read X_User_Id as X-User-Id.
        ("X_User_Id", SPOOF), ("x_user_roles", SPOOF), ("X_Session_Id", SPOOF),
        ("X_Auth_Admin", SPOOF), ("X_Dept", SPOOF), ("X_Identity_Token", SPOOF),
        # Forwarding headers the gateway does not set: frameworks rewrite scheme, port and URL
        # prefix from them, and oauth2-proxy-style backends read X-Forwarded-User as identity.
        ("X-Forwarded-Port", SPOOF), ("X-Forwarded-Prefix", SPOOF), ("X-Forwarded-Ssl", SPOOF),
        ("X-Forwarded-Scheme", SPOOF), ("X-Forwarded-Server", SPOOF),
        ("X-Forwarded-User", SPOOF), ("X-Forwarded-Email", SPOOF), ("X_Forwarded_Port", SPOOF),
        ("X-Forwarded-For", SPOOF), ("X-Forwarded-Proto", SPOOF), ("X-Forwarded-Host", SPOOF),
    ]


IDENTITY_NAMES = {"x-user-id", "x-user-roles", "x-session-id", "x-dept", "x-groups", "x-level",
                  "x-identity-token"}


def _no_spoof_arrived(received: Any) -> None:
    for name, value in received.headers:
        assert SPOOF not in value, (name, value)
        normalised = name.lower().replace("_", "-")
        if normalised.startswith(("x-user-", "x-auth-")):
            assert normalised in IDENTITY_NAMES, name
    values = [v for k, v in received.headers if k.lower() == "x-user-roles"]
    assert "admin" not in ",".join(values)
    for name in IDENTITY_NAMES:
        count = sum(1 for k, _ in received.headers if k.lower().replace("_", "-") == name)
        assert count <= 1, (name, received.headers)


@pytest.mark.parametrize("path,who", [
    ("/public/x", None), ("/public/x", "alice"), ("/optional/x", None), ("/optional/x", "alice"),
    ("/api/x", "alice"), ("/fwd/x", "alice"), ("/idt/x", "alice"), ("/idt-opt/x", None),
])
async def test_spoofed_identity_headers_never_reach_the_upstream(client, upstream, path, who):
    headers = _spoofed_headers()
    if who:
        headers.append(("Authorization", f"Bearer {craft(client, sub=who, sid='real-sid')}"))
    r = await client.get(path, headers=headers)
    assert r.status == 200, await r.text()
    got = upstream.last
    _no_spoof_arrived(got)
    authenticated = who is not None and not path.startswith("/public")
    if authenticated:
        assert got.header("X-User-Id") == who
        assert got.header("X-User-Roles") == "user"
        assert got.header("X-Session-Id") == "real-sid"
    else:
        assert not {"x-user-id", "x-user-roles", "x-session-id", "x-dept", "x-identity-token"} \
            & got.header_names()


async def test_harmless_headers_still_pass(client, upstream):
    """Control for the stripping tests: ordinary and look-alike headers are not over-stripped."""
    r = await client.get("/api/x", headers={
        **bearer(craft(client)), "X-Userid": "a", "X-Users-Id": "b", "X-Authz": "c",
        "X-Custom": "d", "Accept": "text/plain",
    })
    assert r.status == 200
    got = upstream.last
    assert (got.header("X-Userid"), got.header("X-Users-Id"), got.header("X-Authz"),
            got.header("X-Custom")) == ("a", "b", "c", "d")


@pytest.mark.parametrize("path", ["/public/x", "/optional/x", "/api/x"])
async def test_headers_named_in_connection_are_dropped(client, upstream, path):
    token = craft(client)
    r = await client.get(path, headers=[
        ("Authorization", f"Bearer {token}"), ("Connection", "keep-alive, X-Hop-Secret"),
        ("Connection", "x-other-hop"), ("X-Hop-Secret", "s1"), ("X-Other-Hop", "s2"),
        ("X-Kept", "k"), ("Keep-Alive", "timeout=5"), ("TE", "trailers"), ("Trailer", "X-T"),
        ("Proxy-Authorization", "Basic YTpi"), ("Proxy-Connection", "keep-alive"),
    ])
    assert r.status == 200
    names = upstream.last.header_names()
    assert not {"x-hop-secret", "x-other-hop", "keep-alive", "te", "trailer",
                "proxy-authorization", "proxy-connection"} & names
    assert upstream.last.header("X-Kept") == "k"
    # Control: without the Connection listing the same header is forwarded.
    r = await client.get(path, headers={**bearer(token), "X-Hop-Secret": "s1"})
    assert upstream.last.header("X-Hop-Secret") == "s1"


async def test_connection_naming_an_identity_header_does_not_remove_ours(client, upstream):
    r = await client.get("/api/x", headers={**bearer(craft(client, sub="alice")),
                                            "Connection": "X-User-Id, X-User-Roles"})
    assert r.status == 200
    assert upstream.last.header("X-User-Id") == "alice"
    assert upstream.last.header("X-User-Roles") == "user"


# --- what we inject --------------------------------------------------------------------------
async def test_identity_headers_from_a_real_login(client, upstream):
    tokens = await login(client, "bob")
    claims = jwt.decode(tokens["access_token"], options={"verify_signature": False})
    r = await client.get("/api/x", headers=bearer(tokens["access_token"]))
    assert r.status == 200
    got = upstream.last
    assert got.header("X-User-Id") == "bob"
    assert got.header("X-User-Roles") == "user,admin"
    assert got.header("X-Session-Id") == claims["sid"]


async def test_roles_header_is_empty_for_no_roles(client, upstream):
    await client.get("/api/x", headers=bearer(craft(client, roles=[])))
    assert upstream.last.header("X-User-Roles") == ""


async def test_configurable_header_names(gateway, upstream):
    client = await gateway(extra=(
        "identity: {headers: {user_id: X-Remote-User, roles: X-Remote-Groups, "
        "session_id: X-Remote-Session}}\n"))
    token = craft(client, sub="alice", roles=["user", "ops"], sid="s-1")
    r = await client.get("/api/x", headers={
        **bearer(token), "X-Remote-User": SPOOF, "x-remote-groups": SPOOF,
        "X-REMOTE-SESSION": SPOOF, "X-User-Id": SPOOF,
    })
    assert r.status == 200
    got = upstream.last
    assert got.header("X-Remote-User") == "alice"
    assert got.header("X-Remote-Groups") == "user,ops"
    assert got.header("X-Remote-Session") == "s-1"
    assert "x-user-id" not in got.header_names()
    assert all(SPOOF not in v for _, v in got.headers)
    # Anonymous on a public route: the renamed headers are stripped too.
    r = await client.get("/public/x", headers={"X-Remote-User": SPOOF, "X-Remote-Session": SPOOF})
    assert r.status == 200
    assert not {"x-remote-user", "x-remote-session"} & upstream.last.header_names()


async def test_claims_from_token_become_headers(client, upstream):
    token = craft(client, department="eng", groups=["a", "b"], level=3, secret_claim="no")
    r = await client.get("/api/x", headers=bearer(token))
    assert r.status == 200
    got = upstream.last
    assert got.header("X-Dept") == "eng"
    assert got.header("X-Groups") == "a,b"
    assert got.header("X-Level") == "3"
    assert "secret_claim" not in str(got.headers)


async def test_claim_header_absent_when_claim_missing(client, upstream):
    await client.get("/api/x", headers={**bearer(craft(client)), "X-Dept": SPOOF})
    assert "x-dept" not in upstream.last.header_names()


@pytest.fixture
def users_with_claims(tmp_path: Path) -> Path:
    path = tmp_path / "users.yaml"
    add_user(str(path), "dora", PASSWORD, ("user",))
    data = yaml.safe_load(path.read_text())
    data["users"]["dora"]["claims"] = {
        "department": "eng\r\nX-Injected: yes", "groups": ["blue", "green"], "level": 7,
        "not_configured": "hidden",
    }
    path.write_text(yaml.safe_dump(data))
    return path


async def test_claims_from_users_file_reach_the_upstream(gateway, upstream, users_with_claims):
    text = gateway_yaml(upstream.url, users_with_claims, extra=CLAIMS_CONFIG,
                        tokens=CLAIMS_TOKENS, routes=_routes(upstream.url))
    client = await gateway(config_text=text)
    tokens = await login(client, "dora")
    r = await client.get("/api/x", headers={**bearer(tokens["access_token"]), "X-Dept": SPOOF})
    assert r.status == 200
    got = upstream.last
    assert got.header("X-User-Id") == "dora"
    # A claim cannot smuggle a header line: control characters are removed from the value.
    assert got.header("X-Dept") == "engX-Injected: yes"
    assert "x-injected" not in got.header_names()
    assert got.header("X-Groups") == "blue,green"
    assert got.header("X-Level") == "7"
    assert "hidden" not in str(got.headers)


# --- credentials ------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/public/x", "/optional/x", "/api/x"])
async def test_authorization_is_not_forwarded_by_default(client, upstream, path):
    token = craft(client)
    r = await client.get(path, headers=bearer(token))
    assert r.status == 200
    assert "authorization" not in upstream.last.header_names()
    assert token not in str(upstream.last.headers)


async def test_forward_authorization_passes_it(client, upstream):
    token = craft(client, sub="alice")
    r = await client.get("/fwd/x", headers=bearer(token))
    assert r.status == 200
    assert upstream.last.header("Authorization") == f"Bearer {token}"
    assert upstream.last.header("X-User-Id") == "alice"
    r = await client.get("/fwd-public/x", headers={"Authorization": "Basic YTpi"})
    assert r.status == 200
    assert upstream.last.header("Authorization") == "Basic YTpi"


async def test_identity_token_verifies_against_the_jwks(client, upstream):
    access = craft(client, sub="alice", roles=["user", "ops"], sid="sid-1")
    r = await client.get("/idt/x", headers={**bearer(access), "X-Identity-Token": SPOOF})
    assert r.status == 200
    token = upstream.last.header("X-Identity-Token")
    assert token and token != access and SPOOF not in token
    jwks = await (await client.get("/.well-known/jwks.json")).json()
    header = jwt.get_unverified_header(token)
    key = jwt.PyJWKSet.from_dict(jwks)[header["kid"]]
    claims = jwt.decode(token, key, algorithms=[header["alg"]], audience="idt", issuer=ISSUER)
    assert (claims["sub"], claims["sid"], claims["roles"]) == ("alice", "sid-1", ["user", "ops"])
    assert 0 < claims["exp"] - claims["iat"] <= 60  # tokens.identity_token_ttl
    # Meant for that upstream only: it is not an access token for the gateway's audience.
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(token, key, algorithms=[header["alg"]], audience=AUDIENCE)
    r = await client.get("/api/x", headers=bearer(token))
    assert r.status == 401


async def test_identity_token_only_where_configured(client, upstream):
    await client.get("/api/x", headers={**bearer(craft(client)), "X-Identity-Token": SPOOF})
    assert "x-identity-token" not in upstream.last.header_names()
    await client.get("/idt-opt/x", headers={"X-Identity-Token": SPOOF})
    assert "x-identity-token" not in upstream.last.header_names()


# --- cookies ----------------------------------------------------------------------------------
COOKIES = "cookies: {enabled: true, secure: false}\n"
#: Cookie values with "~", which no JWT, session id or base64url token contains: finding one in
#: what the upstream received can only mean the cookie leaked (two letters could be by chance).
AT, ST, RT = "at~cookie", "st~cookie", "rt~cookie"


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("path", ["/public/x", "/optional/x", "/api/x"])
async def test_gateway_cookies_are_removed_other_cookies_pass(gateway, upstream, path, enabled):
    client = await gateway(extra=COOKIES if enabled else "")
    r = await client.get(path, headers={
        **bearer(craft(client)),
        "Cookie": f"a=1; gw_access={AT}; gw_session={ST}; theme=dark; gw_refresh={RT}; "
                  "gw_csrf=C; b=2",
    })
    assert r.status == 200
    cookie = upstream.last.header("Cookie")
    assert cookie == "a=1; theme=dark; b=2"
    for secret in (AT, ST, RT):
        assert secret not in str(upstream.last.headers)


async def test_cookie_header_of_only_gateway_cookies_is_dropped(gateway, upstream):
    client = await gateway(extra=COOKIES)
    r = await client.get("/public/x", headers={"Cookie": "gw_access=AT; gw_session=ST"})
    assert r.status == 200
    assert "cookie" not in upstream.last.header_names()


async def test_renamed_gateway_cookies_are_removed(gateway, upstream):
    client = await gateway(extra=("cookies: {enabled: true, secure: false, access_name: my_at, "
                                  "session_name: my_st, refresh_name: my_rt}\n"))
    await client.get("/public/x", headers={"Cookie": "my_at=AT; gw_access=x; my_st=ST; my_rt=RT"})
    assert upstream.last.header("Cookie") == "gw_access=x"
