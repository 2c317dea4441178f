"""Shared plumbing for the benchmark suite: loopback ports, processes we own (started in their own
process group, stopped by pid/pgid, never by name), CPU and RSS from /proc, percentiles, and the
fixed gateway config and users file every gateway target uses."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

#: Users every gateway target knows; the password is public and only ever used on loopback.
PASSWORD = "bench-password-123"
#: A current desktop browser's User-Agent (111 chars): what a real session record stores.
BROWSER_UA = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
              "Chrome/124.0.0.0 Safari/537.36")
#: HS256 secret of the bench configs (and of the floor proxy, so both accept the same token).
HS256_SECRET = "bench-hs256-secret-0123456789abcdef-0123456789"
AUDIENCE = "bench"
ISSUER = "http://127.0.0.1/bench"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def http(method: str, url: str, *, body: dict[str, Any] | None = None,
         headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    """One blocking request (set-up and sanity checks only, never timed)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={
        **({"Content-Type": "application/json"} if data else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_http(url: str, timeout: float = 20.0, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        try:
            if http("GET", url, timeout=0.5)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s")


# --- processes -------------------------------------------------------------------------------
@dataclass
class Proc:
    """A process we started, in its own process group so its children go with it."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tree(self) -> list[int]:
        return [self.pid, *descendants(self.pid)]

    def tail(self, n: int = 30) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # Whatever the group still holds (a worker whose supervisor died first) goes too.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass


@dataclass
class Procs:
    """Every process the suite started; `stop_all` runs on exit, error or signal."""

    items: list[Proc] = field(default_factory=list)

    def start(self, name: str, cmd: Sequence[str], *, log: Path | None = None,
              env: dict[str, str] | None = None, cwd: Path | None = None) -> Proc:
        with open(log, "wb") if log else contextlib.nullcontext(subprocess.DEVNULL) as out:
            # The child keeps its own copy of the descriptor; ours closes on leaving.
            popen = subprocess.Popen(
                list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.items.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.items:
            self.items.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(self.items):
            proc.stop()
        self.items.clear()


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = list(children.get(pid, ()))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: index 0 is `state` (field 3 of proc(5))."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2:].split()


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of each live pid (threads included), in seconds."""
    total = 0
    for pid in pids:
        try:
            f = _stat_fields(pid)
        except OSError:
            continue
        total += int(f[11]) + int(f[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / CLK_TCK


def rss_mb(pid: int) -> float | None:
    try:
        resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return round(resident * PAGE_SIZE / 2**20, 1)


# --- numbers ---------------------------------------------------------------------------------
def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary_ms(samples_s: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(samples_s, 50) * 1000, 3),
        "p99_ms": round(percentile(samples_s, 99) * 1000, 3),
        "mean_ms": round(statistics.fmean(samples_s) * 1000, 3) if samples_s else float("nan"),
    }


def write_json(path: Path | None, data: Any) -> None:
    text = json.dumps(data, indent=2, default=str)
    if path is None:
        print(text)
    else:
        path.write_text(text + "\n")


# --- the gateway under test ------------------------------------------------------------------
def write_users(path: Path, names: Sequence[str]) -> None:
    """A users file written the way an operator would (argon2id with the hasher's defaults)."""
    sys.path.insert(0, str(REPO))
    from gateway.users.file import add_user

    for name in names:
        add_user(str(path), name, PASSWORD, ("user",))


def gateway_yaml(*, port: int, redis_url: str, upstream: str, users_file: Path, algorithm: str,
                 key_file: Path | None, verify_cache: int = 10_000, access_log: bool = True,
                 metrics: bool = True) -> str:
    """Production-shaped: real Redis, one `auth: required` route, access log and metrics on.

    Rate limits and the per-user session cap are raised so the login and refresh benchmarks
    measure the work, not the limiter refusing them."""
    if algorithm == "HS256":
        key = f"  secret: {json.dumps(HS256_SECRET)}\n"
    else:
        key = f"  signing_key_file: {key_file}\n"
    return f"""\
listen: {{host: 127.0.0.1, port: {port}}}
redis: {{url: "{redis_url}", key_prefix: "gwb:", pool_size: 64}}
tokens:
  issuer: "{ISSUER}"
  audience: {AUDIENCE}
  algorithm: {algorithm}
{key}  access_ttl: 15m
  verify_cache_size: {verify_cache}
auth:
  rate_limit: {{window: 5m, per_user: 1000000, per_ip: 1000000}}
  max_sessions_per_user: 100000
users: {{file: {users_file}}}
metrics: {{enabled: {str(metrics).lower()}}}
logging: {{level: info, access_log: {str(access_log).lower()}}}
routes:
  - name: api
    path: /api
    upstream: {upstream}
    auth: required
"""


def login(base_url: str, username: str, user_agent: str = "bench") -> dict[str, Any]:
    status, body = http("POST", f"{base_url}/auth/login",
                        body={"username": username, "password": PASSWORD},
                        headers={"User-Agent": user_agent}, timeout=30)
    if status != 200:
        raise RuntimeError(f"login as {username} failed: {status} {body[:200]!r}")
    return dict(json.loads(body))
