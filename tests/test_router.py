"""Path normalisation and routing: what is matched is what the upstream receives, and no spelling
of a path reaches a route's upstream without that route's checks."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gateway.config.model import Route
from gateway.errors import InvalidPath, MethodNotAllowed, NoRoute
from gateway.pipeline.router import Router, normalise_path
from tests.conftest import PASSWORD
from tests.support.raw_http import RawResponse, raw_request
from tests.support.upstream import Upstream

UNRESERVED = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def route(name: str, path: str, **kw: Any) -> Route:
    return Route.model_validate({"name": name, "path": path, "upstream": "http://127.0.0.1:9",
                                 "auth": "public", **kw})


# --- normalise_path ---------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "normal"), [
    ("/", "/"),
    ("/admin", "/admin"),
    ("/public/../admin", "/admin"),
    ("/public/%2e%2e/admin", "/admin"),
    ("/public/%2E%2E/admin", "/admin"),
    ("/public/.%2e/admin", "/admin"),
    ("/public/%2e./admin", "/admin"),
    ("//admin", "/admin"),
    ("///admin//x", "/admin/x"),
    ("/public/./../admin", "/admin"),
    ("/public/x/../../admin", "/admin"),
    ("/../../admin", "/admin"),
    ("/%61dmin", "/admin"),
    ("/%41%44MIN", "/ADMIN"),
    ("/a/./b/.", "/a/b/"),
    ("/a/b/..", "/a/"),
    ("/a/%2e", "/a/"),
    ("/a/..", "/"),
    ("/..", "/"),
    ("/a/b/", "/a/b/"),
    ("/a%7e%7E", "/a~~"),
    ("/a%20b", "/a%20b"),
    ("/caf%c3%a9", "/caf%C3%A9"),
    ("/a%25%2e", "/a%25."),  # %25 is "%": stays encoded, so it cannot start a second decoding
    ("/x;y/z", "/x;y/z"),
    ("/public;x/../admin", "/admin"),
    ("/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,="),
])
def test_normalise(raw: str, normal: str) -> None:
    assert normalise_path(raw) == normal
    assert normalise_path(normal) == normal


@pytest.mark.parametrize("raw", [
    "",
    "admin",
    "http://127.0.0.1/admin",
    "/public/..%2fadmin",
    "/public/%2e%2e%2fadmin",
    "/public%2F..%2Fadmin",
    "/public/..%5cadmin",
    "/public/..\\admin",
    "/public/..;/admin",
    "/public/..;x=1/admin",
    "/public/.;/admin",
    "/public/%2e%2e;/admin",
    "/public/%2e%2e%3b/admin",
    "/public/..%3B/admin",
    "/public/..%00/admin",
    "/a%0a",
    "/a%7f",
    "/a%",
    "/a%2",
    "/a%zz",
    "/a%u002e",
    "/a b",
    "/a#b",
    "/a?b",
    "/caf\u00e9",
    "/a\x00",
])
def test_normalise_rejects(raw: str) -> None:
    with pytest.raises(InvalidPath):
        normalise_path(raw)


SEGMENTS = [
    "", ".", "..", "%2e", "%2E", "%2e%2e", ".%2e", "%2E.", "a", "b", "api", "admin", "%61",
    "%41pi", "x;y", ";", "..;", ".;", "%3B", "..%3b", "%2f", "%5C", "%00", "%7e", "~", "%",
    "%z", "%c3%a9", "a%20b", "%25", "%252e", "\\", "\u00e9", "?", " ", ":@!$&'()*+,=",
]
raw_paths = st.one_of(
    st.builds(lambda segs, slash: "/" + "/".join(segs) + slash,
              st.lists(st.sampled_from(SEGMENTS), max_size=8), st.sampled_from(["", "/"])),
    st.text(alphabet="/.%2eEfA;a\\:~ 0", max_size=30).map(lambda s: "/" + s),
    st.text(max_size=20),
)


@given(raw_paths)
@settings(max_examples=300, deadline=None)
def test_normalised_paths_are_canonical(raw: str) -> None:
    try:
        path = normalise_path(raw)
    except InvalidPath:
        return
    assert path.startswith("/")
    assert "//" not in path
    assert not any(seg in (".", "..") for seg in path.split("/"))
    for escape in path.split("%")[1:]:
        assert int(escape[:2], 16) not in UNRESERVED and escape[:2] == escape[:2].upper()
    assert normalise_path(path) == path


@given(st.lists(st.sampled_from(["a", "b", "api", "x;y", "~u", "%C3%A9"]), max_size=5),
       st.sampled_from(["", "/"]))
@settings(max_examples=100, deadline=None)
def test_paths_already_normal_are_unchanged(segments: list[str], slash: str) -> None:
    path = "/" + "/".join(segments) + (slash if segments else "")
    assert normalise_path(path) == path


# --- Router -----------------------------------------------------------------------------------
def test_prefixes_match_whole_segments() -> None:
    router = Router([route("api", "/api")])
    for path in ("/api", "/api/", "/api/x", "/api/x/y/"):
        assert router.match("GET", path, None).route.name == "api"
    for path in ("/apix", "/ap", "/", "/x/api", "/api-v2/x"):
        with pytest.raises(NoRoute):
            router.match("GET", path, None)


def test_longest_prefix_wins_whatever_the_order() -> None:
    routes = [route("root", "/"), route("api", "/api"), route("admin", "/api/admin"),
              route("deep", "/api/admin/keys")]
    for ordering in (routes, routes[::-1]):
        router = Router(ordering)
        assert router.match("GET", "/", None).route.name == "root"
        assert router.match("GET", "/apix", None).route.name == "root"
        assert router.match("GET", "/api/x", None).route.name == "api"
        assert router.match("GET", "/api/adminx", None).route.name == "api"
        assert router.match("GET", "/api/admin", None).route.name == "admin"
        assert router.match("GET", "/api/admin/users/1", None).route.name == "admin"
        assert router.match("GET", "/api/admin/keys/", None).route.name == "deep"


def test_a_route_path_with_trailing_slash_is_the_same_prefix() -> None:
    router = Router([route("api", "/api/")])
    assert router.match("GET", "/api", None).route.name == "api"
    with pytest.raises(NoRoute):
        router.match("GET", "/apix", None)


@pytest.mark.parametrize(("pattern", "host", "matches"), [
    ("api.example.com", "api.example.com", True),
    ("api.example.com", "API.Example.COM", True),
    ("api.example.com", "api.example.com:8443", True),
    ("api.example.com", "www.example.com", False),
    ("api.example.com", "api.example.com.evil.net", False),
    # The fully qualified spelling is the same name: it must not miss a host's (stricter) route.
    ("api.example.com", "api.example.com.", True),
    ("api.example.com", "API.example.com.:8443", True),
    ("*.example.com", "a.example.com.", True),
    ("api.example.com", None, False),
    ("api.example.com:8443", "api.example.com:8443", True),
    ("api.example.com:8443", "api.example.com", False),
    ("api.example.com:8443", "api.example.com:9443", False),
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "a.b.example.com:80", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "evilexample.com", False),
    ("*.example.com", "a.example.com.evil.net", False),
    ("*.example.com:8443", "a.example.com:8443", True),
    ("*.example.com:8443", "a.example.com:443", False),
])
def test_host_filter(pattern: str, host: str | None, matches: bool) -> None:
    router = Router([route("hosted", "/x", host=pattern)])
    if matches:
        assert router.match("GET", "/x/y", host).route.name == "hosted"
    else:
        with pytest.raises(NoRoute):
            router.match("GET", "/x/y", host)


def test_host_specific_routes_come_before_host_agnostic_ones() -> None:
    router = Router([route("any", "/app"), route("tenant", "/app", host="*.tenants.example"),
                     route("root", "/")])
    assert router.match("GET", "/app/x", "a.tenants.example").route.name == "tenant"
    assert router.match("GET", "/app/x", "other.example").route.name == "any"
    assert router.match("GET", "/app/x", None).route.name == "any"
    # A longer host-specific prefix for another host does not hide the shorter route.
    router = Router([route("admin-host", "/admin", host="admin.example"), route("root", "/")])
    assert router.match("GET", "/admin", "www.example").route.name == "root"
    assert router.match("GET", "/admin", "admin.example").route.name == "admin-host"
    assert router.match("GET", "/admin", "admin.example.").route.name == "admin-host"


def test_method_filter() -> None:
    router = Router([route("read", "/items", methods=["GET", "HEAD"]),
                     route("write", "/items", methods=["post", "DELETE"])])
    assert router.match("GET", "/items/1", None).route.name == "read"
    assert router.match("POST", "/items", None).route.name == "write"
    with pytest.raises(MethodNotAllowed) as e:
        router.match("PATCH", "/items/1", None)
    assert e.value.status == 405
    assert e.value.headers == {"Allow": "DELETE, GET, HEAD, POST"}
    with pytest.raises(NoRoute) as no:
        router.match("GET", "/other", None)
    assert (no.value.status, no.value.code) == (404, "no_route")


def test_another_method_does_not_fall_through_to_a_shorter_route() -> None:
    """An admin route limited to POST must not let GET /admin reach the public catch-all."""
    router = Router([route("site", "/"), route("admin", "/admin", methods=["POST"],
                                               auth="required", roles=["admin"])])
    assert router.match("POST", "/admin/x", None).route.name == "admin"
    with pytest.raises(MethodNotAllowed) as e:
        router.match("GET", "/admin/x", None)
    assert e.value.headers == {"Allow": "POST"}
    assert router.match("GET", "/administrator", None).route.name == "site"


def test_method_filter_only_counts_routes_whose_host_matches() -> None:
    router = Router([route("other-host", "/api", host="b.example", methods=["POST"]),
                     route("root", "/")])
    assert router.match("GET", "/api", "a.example").route.name == "root"
    with pytest.raises(MethodNotAllowed):
        router.match("GET", "/api", "b.example")


@pytest.mark.parametrize(("prefix", "path", "upstream_path"), [
    ("/api", "/api/x/y", "/x/y"),
    ("/api", "/api", "/"),
    ("/api", "/api/", "/"),
    ("/api/v1", "/api/v1/users/", "/users/"),
    ("/", "/x", "/x"),
])
def test_strip_prefix(prefix: str, path: str, upstream_path: str) -> None:
    stripping = Router([route("r", prefix, strip_prefix=True)])
    assert stripping.match("GET", path, None).upstream_path == upstream_path
    keeping = Router([route("r", prefix)])
    assert keeping.match("GET", path, None).upstream_path == path


prefixes = st.lists(st.sampled_from(["a", "b", "api", "admin"]), max_size=3).map(
    lambda segs: "/" + "/".join(segs))
route_tables = st.lists(st.tuples(prefixes, st.booleans()), min_size=1, max_size=6,
                        unique_by=lambda t: t[0])
route_paths = st.builds(
    lambda segs, slash: "/" + "/".join(segs) + slash,
    st.lists(st.sampled_from(["a", "b", "api", "apix", "admin", "%61dmin", "%61", "..", ".",
                              "%2e%2e", "", "x"]), max_size=6),
    st.sampled_from(["", "/"]),
)


@given(route_tables, route_paths)
@settings(max_examples=300, deadline=None)
def test_router_picks_the_longest_segment_prefix(table: list[tuple[str, bool]], raw: str) -> None:
    routes = [route(f"r{i}", prefix, strip_prefix=strip) for i, (prefix, strip) in enumerate(table)]
    router = Router(routes)
    try:
        path = normalise_path(raw)
    except InvalidPath:
        assume(False)
        return
    # The model: among routes whose prefix is a whole-segment prefix of the path, the longest.
    candidates = [r for r in routes
                  if r.path == "/" or path == r.path or path.startswith(r.path + "/")]
    if not candidates:
        with pytest.raises(NoRoute):
            router.match("GET", path, None)
        return
    best = max(candidates, key=lambda r: len(r.path))
    match = router.match("GET", path, None)
    assert match.route.name == best.name
    if best.strip_prefix and best.path != "/":
        assert match.upstream_path == (path[len(best.path):] or "/")
    else:
        assert match.upstream_path == path


# --- end to end: what the client got and what the upstream received --------------------------
# routes of the `gateway` fixture: /public (public), /optional, /api (required),
# /admin (required, role admin)
NORMALISED_TO_ADMIN = {
    "/public/../admin": "/admin",
    "/public/%2e%2e/admin": "/admin",
    "/public/%2E%2E/admin": "/admin",
    "/public/.%2e/admin": "/admin",
    "//admin": "/admin",
    "///admin//users": "/admin/users",
    "/public/./../admin": "/admin",
    "/public/x/../../admin/": "/admin/",
    "/public/..//admin": "/admin",
    "/%61dmin": "/admin",
    "/%61%64%6D%69%6E/x": "/admin/x",
    "/public;x/../admin": "/admin",
    "/public/%2e%2e/admin?next=/public": "/admin?next=/public",
}
REJECTED = [
    "/public/..%2fadmin",
    "/public/%2e%2e%2fadmin",
    "/public%2f..%2fadmin",
    "/public/..%5cadmin",
    "/public/..\\admin",
    "/public/..;/admin",
    "/public/%2e%2e;/admin",
    "/public/..%3b/admin",
    "/public/..%00/admin",
    "http://127.0.0.1/public/../admin",
]


async def raw_get(client: Any, target: str, token: str | None = None) -> RawResponse:
    port = client.server.port
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return await raw_request(port, (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}Connection: close\r\n\r\n"
    ).encode("latin-1"))


async def login(client: Any, user: str) -> str:
    r = await client.post("/auth/login", json={"username": user, "password": PASSWORD})
    assert r.status == 200, await r.text()
    return str((await r.json())["access_token"])


def error_code(r: RawResponse) -> str | None:
    import json

    try:
        return str(json.loads(r.body)["error"])
    except (ValueError, KeyError):
        return None


@pytest.mark.parametrize(("user", "status", "code"), [
    (None, 401, "missing_token"),
    ("alice", 403, "insufficient_scope"),
])
async def test_bypass_spellings_get_the_admin_routes_checks(
    gateway: Any, upstream: Upstream, user: str | None, status: int, code: str
) -> None:
    client = await gateway()
    token = await login(client, user) if user else None
    got = {}
    for target in NORMALISED_TO_ADMIN:
        r = await raw_get(client, target, token)
        got[target] = (r.status, error_code(r))
    assert got == {target: (status, code) for target in NORMALISED_TO_ADMIN}
    assert upstream.received == []


@pytest.mark.parametrize("user", [None, "bob"])
async def test_ambiguous_spellings_are_refused(gateway: Any, upstream: Upstream,
                                               user: str | None) -> None:
    client = await gateway()
    token = await login(client, user) if user else None
    got = {}
    for target in REJECTED:
        r = await raw_get(client, target, token)
        got[target] = (r.status, error_code(r))
    assert got == {target: (400, "invalid_path") for target in REJECTED}
    assert upstream.received == []


async def test_an_admin_gets_through_and_the_upstream_sees_the_normalised_path(
    gateway: Any, upstream: Upstream
) -> None:
    client = await gateway()
    token = await login(client, "bob")
    for target, normal in NORMALISED_TO_ADMIN.items():
        upstream.received.clear()
        r = await raw_get(client, target, token)
        assert r.status == 200, (target, r.body)
        assert [rec.raw_path for rec in upstream.received] == [normal], target
        assert upstream.last.header("X-User-Id") == "bob"


async def test_public_spellings_reach_the_public_route_normalised(
    gateway: Any, upstream: Upstream
) -> None:
    client = await gateway()
    for target, normal in [("/admin/../public/x", "/public/x"), ("//public//x/./y", "/public/x/y"),
                           ("/%70ublic/a%2Fb", None), ("/public/%7Euser", "/public/~user")]:
        upstream.received.clear()
        r = await raw_get(client, target)
        if normal is None:
            assert (r.status, error_code(r)) == (400, "invalid_path")
            assert upstream.received == []
        else:
            assert r.status == 200, (target, r.body)
            assert [rec.raw_path for rec in upstream.received] == [normal]
            assert upstream.last.header("X-User-Id") is None


async def test_no_route_and_segment_prefixes_end_to_end(gateway: Any, upstream: Upstream) -> None:
    client = await gateway()
    for target in ("/adminx", "/publicity", "/", "/nothing/here", "/public/../nothing"):
        r = await raw_get(client, target)
        assert (r.status, error_code(r)) == (404, "no_route"), target
    assert upstream.received == []


async def test_method_mismatch_is_405_and_never_falls_back(
    gateway: Any, upstream: Upstream
) -> None:
    url = upstream.url
    client = await gateway(routes=f"""\
- {{name: site, path: /, upstream: '{url}', auth: public}}
- {{name: admin, path: /admin, upstream: '{url}', auth: required, roles: [admin],
   methods: [POST, PUT]}}
""")
    r = await client.get("/admin/users")
    assert r.status == 405
    assert r.headers["Allow"] == "POST, PUT"
    assert (await r.json())["error"] == "method_not_allowed"
    r = await client.post("/admin/users")
    assert (r.status, (await r.json())["error"]) == (401, "missing_token")
    assert upstream.received == []
    r = await client.get("/administrators")
    assert r.status == 200
    assert upstream.last.raw_path == "/administrators"


async def test_host_filter_and_strip_prefix_end_to_end(gateway: Any, upstream: Upstream) -> None:
    url = upstream.url
    client = await gateway(routes=f"""\
- {{name: tenant, path: /svc, host: '*.tenants.example', upstream: '{url}/t', auth: public,
   strip_prefix: true}}
- {{name: svc, path: /svc, upstream: '{url}', auth: public}}
""")
    port = client.server.port
    r = await raw_request(port, (
        b"GET /svc/../svc/%61/b HTTP/1.1\r\nHost: one.tenants.example:8080\r\n"
        b"Connection: close\r\n\r\n"))
    assert r.status == 200
    assert upstream.last.raw_path == "/t/a/b"
    r = await raw_request(port, (
        b"GET /svc/a HTTP/1.1\r\nHost: tenants.example\r\nConnection: close\r\n\r\n"))
    assert r.status == 200
    assert upstream.last.raw_path == "/svc/a"
