"""The `gateway` command: serve, check, route, demo, keys, users, sessions."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
import time
from pathlib import Path

from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.config.loader import Loc, source_map
from gateway.errors import GatewayError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--workers", type=int, default=1, help="processes sharing the port")

    p = sub.add_parser("check", help="validate a config and print its route table")
    p.add_argument("-c", "--config", required=True)

    p = sub.add_parser("route", help="explain which route a request would take")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("method")
    p.add_argument("path")
    p.add_argument("--host")

    p = sub.add_parser("demo", help="the example config with a demo upstream and demo user")
    p.add_argument("-c", "--config", default=str(_repo_config()))

    keys = sub.add_parser("keys", help="signing keys").add_subparsers(dest="action", required=True)
    p = keys.add_parser("generate", help="write a new signing key pair")
    p.add_argument("--alg", default="EdDSA", choices=["EdDSA", "ES256", "RS256", "HS256"])
    p.add_argument("--out", required=True, help="directory for the key files")

    users = sub.add_parser("users", help="the users file").add_subparsers(dest="action", required=True)
    p = users.add_parser("add", help="add or replace a user (prompts for the password)")
    p.add_argument("name")
    p.add_argument("--roles", default="")
    p.add_argument("--file", required=True)
    p.add_argument("--password-stdin", action="store_true")

    sessions = sub.add_parser("sessions", help="sessions in Redis").add_subparsers(
        dest="action", required=True)
    p = sessions.add_parser("list", help="a user's live sessions")
    p.add_argument("user")
    p.add_argument("-c", "--config", required=True)
    p = sessions.add_parser("revoke", help="revoke one session or all of a user's")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--user")
    group.add_argument("--session")
    p.add_argument("-c", "--config", required=True)

    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _repo_config() -> Path:
    return Path(__file__).resolve().parent.parent / "config" / "gateway.yaml"


def _serve(args: argparse.Namespace) -> int:
    from gateway.serve import serve

    return serve(args.config, args.workers)


def _check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    problems = _runtime_problems(config)
    if problems:
        source = source_map(args.config)
        for loc, message in problems:
            print(source.problem(loc, message, at_key=len(loc) == 1), file=sys.stderr)
        return 1
    print(f"{args.config}: OK ({len(config.routes)} routes)")
    print(_route_table(config))
    for advisory in config.advisories:
        print(f"warning: {advisory}", file=sys.stderr)
    return 0


def _runtime_problems(config: GatewayConfig) -> list[tuple[Loc, str]]:
    """What only loading the keys and users file can tell, and where in the config it stems from."""
    from gateway.clock import SystemClock
    from gateway.tokens.signer import KeyFileError, KeyRing
    from gateway.users.file import FileUsers, UsersFileError

    problems: list[tuple[Loc, str]] = []
    try:
        KeyRing.from_config(config.tokens, SystemClock())
    except KeyFileError as e:
        # The message names the file; point at it when only one key file is configured.
        single = config.tokens.signing_key_file and not config.tokens.verify_key_files
        problems.append((("tokens", "signing_key_file") if single else ("tokens",), str(e)))
    if config.users.file:
        try:
            FileUsers(config.users.file)
        except UsersFileError as e:
            problems.append((("users", "file"), str(e)))
    return problems


def _route_table(config: GatewayConfig) -> str:
    rows = [("NAME", "HOST", "PATH", "METHODS", "AUTH", "ROLES", "UPSTREAM")]
    for r in config.routes:
        roles = ",".join(r.roles) + ((" all:" + ",".join(r.roles_all)) if r.roles_all else "")
        rows.append((r.name, r.host or "*", r.path + ("/*" if r.path != "/" else "*"),
                     ",".join(r.methods) if r.methods else "*",
                     r.auth + (" browser" if r.browser else ""), roles or "-",
                     " ".join(r.upstream)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def _route(args: argparse.Namespace) -> int:
    from gateway.pipeline.router import Router, normalise_path

    config = load_config(args.config)
    try:
        path = normalise_path(args.path.partition("?")[0])
        match = Router(config.routes).match(args.method.upper(), path, args.host)
    except GatewayError as e:
        print(f"{args.method.upper()} {args.path}: {e.status} {e.code}: {e.description}")
        return 1
    r = match.route
    print(f"{args.method.upper()} {args.path}")
    print(f"  normalised path: {path}")
    print(f"  route:           {r.name} (path {r.path}, host {r.host or '*'})")
    print(f"  auth:            {r.auth}" + (" (browser sign-in)" if r.browser else "")
          + (" (session checked in Redis per request)" if r.check_session else ""))
    print(f"  methods:         {', '.join(r.methods) if r.methods else 'any'}")
    if r.roles:
        print(f"  roles (any):     {', '.join(r.roles)}")
    if r.roles_all:
        print(f"  roles (all):     {', '.join(r.roles_all)}")
    print(f"  upstream:        {', '.join(r.upstream)} path {match.upstream_path}")
    print(f"  timeout:         {r.timeout:g}s, max body {r.max_body} bytes")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return run_demo(args.config)


def _keys(args: argparse.Namespace) -> int:
    import secrets

    from gateway.tokens.signer import asymmetric_key, generate_private_pem, public_pem

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d%H%M%S")
    if args.alg == "HS256":
        path = out / f"hs256-{stamp}.secret"
        if not _write_private(path, secrets.token_urlsafe(48).encode()):
            return 1
        print(f"wrote {path}\nuse it as: tokens: {{algorithm: HS256, secret: ${{GATEWAY_SECRET}}}}")
        return 0
    pem = generate_private_pem(args.alg)
    key = asymmetric_key(args.alg, pem, "generated", for_signing=True)
    private = out / f"{args.alg.lower()}-{stamp}.pem"
    public = out / f"{args.alg.lower()}-{stamp}.pub.pem"
    if not _write_private(private, pem):
        return 1
    public.write_bytes(public_pem(pem))
    print(f"wrote {private} (private, mode 0600) and {public}\nkid: {key.kid}")
    print(f"tokens:\n  algorithm: {args.alg}\n  signing_key_file: {private}")
    return 0


def _write_private(path: Path, data: bytes) -> bool:
    """Create a 0600 file; never overwrite a key (names carry the second they were made)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"{path} already exists; not overwriting it (try again in a second)", file=sys.stderr)
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def _users(args: argparse.Namespace) -> int:
    from gateway.users.file import UsersFileError, add_user

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if password != getpass.getpass("again: "):
            print("passwords differ", file=sys.stderr)
            return 1
    if len(password) < 8:
        print("the password must have at least 8 characters", file=sys.stderr)
        return 1
    roles = tuple(r.strip() for r in args.roles.split(",") if r.strip())
    try:
        add_user(args.file, args.name, password, roles)
    except UsersFileError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{args.name}: saved to {args.file} with roles {', '.join(roles) or '(none)'}")
    return 0


def _sessions(args: argparse.Namespace) -> int:
    return asyncio.run(_sessions_async(args))


async def _sessions_async(args: argparse.Namespace) -> int:
    from gateway.clock import SystemClock
    from gateway.metrics import Metrics
    from gateway.serve import setup_logging
    from gateway.tokens.connection import connect
    from gateway.tokens.service import TokenService
    from gateway.tokens.signer import KeyRing
    from gateway.tokens.store import SessionStore

    config = load_config(args.config)
    # An operator's revocation is an audit event: one JSON line on stderr, like the gateway's.
    setup_logging(config.logging.level)
    if config.redis.embedded:
        print("the embedded store (memory://) lives inside the gateway process; "
              "sessions commands need a shared Redis", file=sys.stderr)
        return 1
    clock = SystemClock()
    redis = connect(config.redis)
    store = SessionStore(redis, config.redis.key_prefix)
    metrics = Metrics()
    service = TokenService(config, KeyRing.from_config(config.tokens, clock), store,
                           _NoUsers(), clock, metrics.audit)
    try:
        if args.action == "list":
            records = await service.sessions(args.user)
            for r in records:
                print(f"{r.sid}  created {_ts(r.created_ms)}  last used {_ts(r.last_used_ms)}  "
                      f"expires {_ts(r.expires_ms)}  {r.ip}  {r.user_agent}")
            if not records:
                print(f"{args.user}: no live sessions")
        elif args.session:
            done = await service.revoke(args.session, "admin", admin=True)
            print(f"{args.session}: {'revoked' if done else 'no such live session'}")
        else:
            count = await service.revoke_user(args.user, "admin", admin=True)
            print(f"{args.user}: {count} session(s) revoked")
    except GatewayError as e:
        print(f"{e.code}: {e.description}", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()
    return 0


class _NoUsers:
    async def authenticate(self, username: str, password: str) -> None:
        return None

    def current(self, sub: str) -> bool:
        return True


def _ts(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ms / 1000))


_COMMANDS = {
    "serve": _serve, "check": _check, "route": _route, "demo": _demo, "keys": _keys,
    "users": _users, "sessions": _sessions,
}
