"""The benchmark suite: one run on loopback, every process started here stopped here.

Starts a fixed upstream (nginx returning a small JSON body, keep-alive) and Redis, then measures
with wrk, one target after another: the upstream directly, nginx as a plain proxy, the floor
proxy (bench/floor_proxy.py), and the real gateway process with 1 and 2 workers, HS256 and EdDSA
(plus each algorithm with the verify cache off). Then a py-spy profile of the gateway under the
same load, and the micro figures (verification, refresh, logins, Redis memory and scale).

  bench/run [--quick] [--publish] [--repeat N]     (bench/run installs what is missing)
Results go to bench/results/<timestamp>/ (results.json, report.md, benchmarks.png, profile.*).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report
from bench.benchlib import (
    AUDIENCE,
    BENCH,
    HS256_SECRET,
    REPO,
    Proc,
    Procs,
    cpu_seconds,
    free_port,
    gateway_yaml,
    http,
    login,
    rss_mb,
    wait_http,
    wait_port,
    write_users,
)
from bench.profile_summary import as_text, summarise

WRK_THREADS, WRK_CONNECTIONS = 2, 50
PATH = "/api/bench"
USERS = [f"bench{i}" for i in range(8)]
UPSTREAM_BODY = '{"ok":true,"service":"bench-upstream","items":[1,2,3]}'


@dataclass(frozen=True)
class Mode:
    name: str
    warmup: float
    duration: float
    micro_seconds: float
    verify_seconds: float
    profile_seconds: float
    limit_seconds: int


QUICK = Mode("quick", warmup=1, duration=3, micro_seconds=2, verify_seconds=0.3,
             profile_seconds=3, limit_seconds=12 * 60)
FULL = Mode("full", warmup=3, duration=10, micro_seconds=6, verify_seconds=2,
            profile_seconds=10, limit_seconds=30 * 60)


class Suite:
    def __init__(self, mode: Mode, out: Path, tmp: Path, repeat: int,
                 parts: frozenset[str] = frozenset({"http", "profile", "micro"}),
                 ablation: bool = False):
        self.mode, self.out, self.tmp, self.repeat, self.parts = mode, out, tmp, repeat, parts
        self.ablation = ablation
        self.procs = Procs()
        self.results: dict[str, Any] = {"targets": [], "micro": {}}
        self.redis: Proc | None = None
        self.redis_port = 0
        self.upstream: Proc | None = None
        self.upstream_port = 0
        self.users_file = tmp / "users.yaml"
        self.eddsa_key: Path | None = None
        self.hs256_token = ""

    # --- infrastructure ---------------------------------------------------------------------------
    def log(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def start_redis(self) -> None:
        self.redis_port = free_port()
        self.redis = self.procs.start("redis", [
            "redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.tmp), "--protected-mode", "no",
        ], log=self.tmp / "redis.log")
        wait_port(self.redis_port)

    def nginx(self, name: str, body: str) -> tuple[Proc, int]:
        port = free_port()
        conf = self.tmp / f"{name}.conf"
        t = self.tmp
        conf.write_text(f"""\
worker_processes 1;
daemon off;
pid {t}/{name}.pid;
error_log {t}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {t}/{name}-body;
  proxy_temp_path {t}/{name}-proxy;
  fastcgi_temp_path {t}/{name}-fastcgi;
  uwsgi_temp_path {t}/{name}-uwsgi;
  scgi_temp_path {t}/{name}-scgi;
  keepalive_timeout 75s;
  keepalive_requests 1000000;
{body.replace("PORT", str(port))}
}}
""")
        proc = self.procs.start(name, ["nginx", "-p", str(self.tmp), "-e",
                                       str(self.tmp / f"{name}-startup.log"), "-c", str(conf)],
                                log=self.tmp / f"{name}.out")
        wait_port(port)
        return proc, port

    def start_upstream(self) -> None:
        self.upstream, self.upstream_port = self.nginx("upstream", f"""\
  server {{
    listen 127.0.0.1:PORT backlog=4096;
    location / {{
      default_type application/json;
      return 200 '{UPSTREAM_BODY}';
    }}
  }}""")

    def start_nginx_proxy(self) -> tuple[Proc, int]:
        return self.nginx("nginx-proxy", f"""\
  upstream bench_upstream {{
    server 127.0.0.1:{self.upstream_port};
    keepalive 64;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:PORT backlog=4096;
    location / {{
      proxy_pass http://bench_upstream;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}""")

    def prepare_keys_and_users(self) -> None:
        write_users(self.users_file, USERS)
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "keys", "generate", "--alg", "EdDSA", "--out",
             str(self.tmp / "keys")], cwd=REPO, capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(REPO)}, check=True,
        ).stdout
        m = re.search(r"signing_key_file: (\S+)", out)
        if m is None:
            raise RuntimeError(f"could not find the generated key in: {out}")
        self.eddsa_key = Path(m.group(1))

    def start_gateway(self, algorithm: str, workers: int, verify_cache: int = 10_000,
                      access_log: bool = True, metrics: bool = True) -> tuple[Proc, int, Path]:
        port = free_port()
        cfg = self.tmp / f"gateway-{algorithm}-{workers}-{port}.yaml"
        cfg.write_text(gateway_yaml(
            port=port, redis_url=self.redis_url, upstream=f"http://127.0.0.1:{self.upstream_port}",
            users_file=self.users_file, algorithm=algorithm, key_file=self.eddsa_key,
            verify_cache=verify_cache, access_log=access_log, metrics=metrics))
        # The access log (JSON lines on stderr) goes to a real file on disk, as it would to a
        # log collector; stdout shares it.
        log_path = self.tmp / f"{cfg.stem}.log"
        cmd = [sys.executable, "-m", "gateway", "serve", "-c", str(cfg), "--workers", str(workers)]
        proc = self.procs.start(f"gateway-{algorithm}-w{workers}", cmd, log=log_path, cwd=REPO,
                                env={"PYTHONPATH": str(REPO)})
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=30, proc=proc)
        if workers > 1:
            # Every worker must have its SO_REUSEPORT socket listening before load starts: wrk's
            # keep-alive connections stay with whichever listener the kernel gave them.
            deadline = time.monotonic() + 30
            while listeners(port) < workers and time.monotonic() < deadline:
                if not proc.alive():
                    raise RuntimeError(f"gateway exited:\n{proc.tail()}")
                time.sleep(0.1)
            if listeners(port) < workers:
                raise RuntimeError(f"only {listeners(port)} of {workers} workers listen on {port}")
        return proc, port, log_path

    @staticmethod
    def workers(proc: Proc) -> list[int]:
        """Gateway worker pids: the process itself, or the supervisor's children."""
        return proc.tree()[1:] or [proc.pid]

    # --- wrk --------------------------------------------------------------------------------------
    def wrk(self, url: str, seconds: float, token: str | None,
            watch: dict[str, list[int]]) -> dict[str, Any]:
        cmd = ["wrk", f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}", f"-d{max(1, round(seconds))}s",
               "--latency", "--timeout", "5s", "-s", str(BENCH / "report.lua")]
        if token:
            cmd += ["-H", f"Authorization: Bearer {token}"]
        cmd.append(url)
        before = {name: cpu_seconds(pids) for name, pids in watch.items()}
        out_path = self.tmp / "wrk.out"
        t0 = time.monotonic()
        proc = self.procs.start("wrk", cmd, log=out_path)
        status, usage = _wait4(proc, seconds + 30)
        wall = time.monotonic() - t0
        self.procs.items.remove(proc)
        cpu = {name: round(cpu_seconds(pids) - before[name], 2) for name, pids in watch.items()}
        if usage is not None:
            cpu["wrk"] = round(usage.ru_utime + usage.ru_stime, 2)
        text = out_path.read_text(errors="replace")
        m = re.search(r"^BENCH_JSON (\{.*\})$", text, re.MULTILINE)
        if status != 0 or m is None:
            raise RuntimeError(f"wrk failed ({status}):\n{text[-2000:]}")
        raw = json.loads(m.group(1))
        secs = raw["duration_us"] / 1e6
        errors = sum(raw[k] for k in raw if k.startswith("errors_"))
        return {
            "rps": round(raw["requests"] / secs, 1), "requests": raw["requests"],
            "seconds": round(secs, 2), "p50_ms": raw["p50_us"] / 1000,
            "p90_ms": raw["p90_us"] / 1000, "p99_ms": raw["p99_us"] / 1000,
            "p999_ms": raw["p999_us"] / 1000, "max_ms": raw["max_us"] / 1000,
            "non_2xx": raw["errors_status"], "socket_errors": errors - raw["errors_status"],
            "cpu_s": cpu, "cpu_cores": {k: round(v / wall, 2) for k, v in cpu.items()},
            "target_cpu_us_per_request": round(cpu["target"] / raw["requests"] * 1e6, 1)
            if cpu.get("target") and raw["requests"] else None,
            "wall_s": round(wall, 2),
        }

    def measure(self, name: str, kind: str, port: int, token: str | None,
                watch: dict[str, list[int]], **extra: Any) -> dict[str, Any]:
        """One warm-up and one measured run of this target in this round; the target's entry
        keeps every round's run and shows the median one."""
        url = f"http://127.0.0.1:{port}{PATH}"
        self.log(f"{name}: warm-up {self.mode.warmup:g}s, then {self.mode.duration:g}s")
        self.wrk(url, self.mode.warmup, token, {})
        run = self.wrk(url, self.mode.duration, token, watch)
        result = next((t for t in self.results["targets"] if t["name"] == name), None)
        if result is None:
            result = {"name": name, "kind": kind, "runs": []}
            self.results["targets"].append(result)
        result["runs"].append(run)
        runs = result["runs"]
        best = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]  # the median run
        result.update({**extra, **best})
        if len(runs) > 1:
            result["rps_runs"] = [r["rps"] for r in runs]  # in round order
        self.log(f"{name}: {run['rps']:.0f} req/s, p50 {run['p50_ms']:.2f} ms, "
                 f"p99 {run['p99_ms']:.2f} ms, non-2xx {run['non_2xx']}")
        return result

    def base_watch(self) -> dict[str, list[int]]:
        assert self.upstream is not None and self.redis is not None
        return {"upstream": self.upstream.tree(), "redis": [self.redis.pid]}

    # --- targets ----------------------------------------------------------------------------------
    def run_targets(self) -> None:
        """Every target once per round, `--repeat` rounds: a ratio of two targets then compares
        runs minutes apart at most, and the machine's drift falls on every target alike."""
        for n in range(self.repeat):
            if self.repeat > 1:
                self.log(f"round {n + 1} of {self.repeat}")
            self.run_round()
        for t in self.results["targets"]:
            del t["runs"]

    def run_round(self) -> None:
        assert self.upstream is not None
        self.measure("upstream (nginx, direct)", "upstream", self.upstream_port, None,
                     {"target": self.upstream.tree()})
        proxy, port = self.start_nginx_proxy()
        self.measure("nginx proxy_pass", "nginx", port, None,
                     {"target": proxy.tree(), **self.base_watch()})
        self.procs.stop(proxy)

        self.gateway_target("HS256", 1)
        self.floor_target()
        self.gateway_target("HS256", 2)
        self.gateway_target("EdDSA", 1)
        self.gateway_target("EdDSA", 2)
        self.gateway_target("HS256", 1, verify_cache=0)
        self.gateway_target("EdDSA", 1, verify_cache=0)
        if self.ablation:  # what each production feature costs (not production configs)
            self.gateway_target("HS256", 1, access_log=False)
            self.gateway_target("HS256", 1, metrics=False)
            self.gateway_target("HS256", 1, access_log=False, metrics=False)

    def floor_target(self) -> None:
        port = free_port()
        proc = self.procs.start("floor", [
            sys.executable, str(BENCH / "floor_proxy.py"), "--port", str(port),
            "--upstream", f"http://127.0.0.1:{self.upstream_port}", "--secret", HS256_SECRET,
            "--audience", AUDIENCE], log=self.tmp / "floor.log")
        wait_port(port)
        url = f"http://127.0.0.1:{port}{PATH}"
        ok = http("GET", url, headers={"Authorization": f"Bearer {self.hs256_token}"})[0]
        refused = http("GET", url)[0]
        if ok != 200 or refused != 401:
            raise RuntimeError(f"floor proxy sanity check: {ok} with token, {refused} without")
        self.measure("floor proxy (aiohttp+PyJWT HS256)", "floor", port, self.hs256_token,
                     {"target": proc.tree(), **self.base_watch()}, workers=1, algorithm="HS256")
        self.procs.stop(proc)

    def gateway_target(self, algorithm: str, workers: int, verify_cache: int = 10_000,
                       access_log: bool = True, metrics: bool = True) -> None:
        proc, port, log_file = self.start_gateway(algorithm, workers, verify_cache, access_log,
                                                  metrics)
        base = f"http://127.0.0.1:{port}"
        token = login(base, USERS[0])["access_token"]
        if algorithm == "HS256" and not self.hs256_token:
            self.hs256_token = token
        ok = http("GET", base + PATH, headers={"Authorization": f"Bearer {token}"})[0]
        refused = http("GET", base + PATH)[0]
        if ok != 200 or refused != 401:
            raise RuntimeError(f"gateway sanity check failed: {ok} with token, {refused} without")
        pids = self.workers(proc)
        name = f"gateway {algorithm} {workers}w" + ("" if verify_cache else " no-cache")
        name += ("" if access_log else " no-access-log") + ("" if metrics else " no-metrics")
        lines_before = _count_lines(log_file)
        result = self.measure(name, "gateway", port, token,
                              {"target": proc.tree(), **self.base_watch()},
                              workers=workers, algorithm=algorithm, verify_cache=verify_cache,
                              access_log=access_log, metrics=metrics)
        result["rss_mb_per_worker"] = [rss_mb(p) for p in pids]
        result["log_lines_incl_warmup"] = _count_lines(log_file) - lines_before
        self.procs.stop(proc)

    # --- profile ----------------------------------------------------------------------------------
    def spy(self, pid: int, seconds: float, fmt: str, path: Path) -> Proc:
        return self.procs.start("py-spy", [
            "py-spy", "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
            "--rate", "200", "--nonblocking", "--format", fmt, "-o", str(path)],
            log=self.tmp / f"py-spy-{path.name}.log")

    def finish_spy(self, spy: Proc, seconds: float) -> None:
        try:
            spy.popen.wait(seconds + 30)
        except subprocess.TimeoutExpired:
            pass
        self.procs.stop(spy)

    def summarise_profile(self, key: str, target: str, raw: Path, seconds: float) -> None:
        profiles = self.results.setdefault("profiles", {})
        if not raw.exists():
            log = self.tmp / f"py-spy-{raw.name}.log"
            profiles[key] = {"skipped": log.read_text()[-500:] if log.exists() else "no output"}
            return
        summary = summarise(raw.read_text())
        raw.with_name(raw.stem + "-summary.txt").write_text(as_text(summary))
        profiles[key] = {"target": target, "rate_hz": 200, "seconds": seconds, **summary}

    def profile(self) -> None:
        """The proxied GET under the same wrk load: collapsed stacks, then a flame graph."""
        if shutil.which("py-spy") is None:
            self.results["profiles"] = {"proxy": {"skipped": "py-spy is not installed"}}
            return
        proc, port, _ = self.start_gateway("HS256", 1)
        token = login(f"http://127.0.0.1:{port}", USERS[0])["access_token"]
        url = f"http://127.0.0.1:{port}{PATH}"
        self.wrk(url, self.mode.warmup, token, {})
        seconds = self.mode.profile_seconds
        for fmt, path in (("raw", self.out / "profile-proxy.txt"),
                          ("flamegraph", self.out / "profile-proxy.svg")):
            self.log(f"profile: py-spy --format {fmt} for {seconds:g}s under wrk load")
            spy = self.spy(proc.pid, seconds, fmt, path)
            self.wrk(url, seconds + 1, token, {})
            self.finish_spy(spy, seconds)
        self.procs.stop(proc)
        self.summarise_profile("proxy", "gateway HS256 1w, proxied GET (verify cache on)",
                               self.out / "profile-proxy.txt", seconds)

    def profile_refresh(self, url: str, pid: int) -> None:
        """POST /auth/refresh under concurrent clients, sampled once their timed loop starts."""
        if shutil.which("py-spy") is None:
            return
        seconds = self.mode.profile_seconds
        ready = self.tmp / "refresh-ready"
        ready.unlink(missing_ok=True)
        self.log(f"profile: py-spy on POST /auth/refresh for {seconds:g}s")
        driver = self.procs.start("micro_http", [
            sys.executable, str(BENCH / "micro_http.py"), "--url", url, "--phase", "refresh",
            "--users", ",".join(USERS), "--clients", "32", "--seconds", str(seconds + 2),
            "--ready-file", str(ready), "--json", str(self.tmp / "refresh-profile.json")],
            log=self.tmp / "refresh-profile.log", cwd=REPO, env={"PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + 120
        while not ready.exists() and driver.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if ready.exists():
            raw = self.out / "profile-refresh.txt"
            self.finish_spy(self.spy(pid, seconds, "raw", raw), seconds)
            self.summarise_profile("refresh", "gateway EdDSA 1w, POST /auth/refresh", raw,
                                   seconds)
        try:
            driver.popen.wait(seconds + 60)
        except subprocess.TimeoutExpired:
            pass
        self.procs.stop(driver)

    # --- micro figures ----------------------------------------------------------------------------
    def micro(self, script: str, *args: str, timeout: float = 600) -> dict[str, Any]:
        out = self.tmp / f"{script}-{len(self.results['micro'])}.json"
        proc = self.procs.start(script, [sys.executable, str(BENCH / f"{script}.py"), *args,
                                         "--json", str(out)],
                                log=self.tmp / f"{script}.log", cwd=REPO,
                                env={"PYTHONPATH": str(REPO)})
        try:
            code = proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        self.procs.stop(proc)
        if code != 0 or not out.exists():
            raise RuntimeError(f"{script} {' '.join(args)} failed ({code}):\n{proc.tail()}")
        return dict(json.loads(out.read_text()))

    def run_micro(self) -> None:
        m, quick = self.results["micro"], self.mode.name == "quick"
        self.log("micro: token verification (cache hit / miss)")
        m["verify"] = self.micro("micro_verify", "--seconds", str(self.mode.verify_seconds))
        self.log("micro: the gateway's own per-request stages, in-process")
        m["edge"] = self.micro("micro_edge", "--seconds", str(self.mode.verify_seconds / 2))
        self.log("micro: SessionStore.rotate and TokenService.refresh in-process")
        m["store"] = self.micro("micro_store", "--redis-url", self.redis_url, "--seconds",
                                str(self.mode.micro_seconds), "--clients", "32")
        seconds = str(self.mode.micro_seconds)
        users = ",".join(USERS)
        for workers in (1, 2):
            proc, port, _ = self.start_gateway("EdDSA", workers)
            url = f"http://127.0.0.1:{port}"
            pids = ",".join(str(p) for p in self.workers(proc))
            if workers == 1:
                self.log("micro: logins/s through the gateway (EdDSA, 1 worker)")
                m["login_1w"] = self.micro("micro_http", "--url", url, "--phase", "login",
                                           "--users", users, "--clients", "8", "--seconds",
                                           seconds, "--cpu-pids", pids)
                self.log("micro: Redis round trips per refresh exchange (MONITOR)")
                m["refresh_rounds"] = self.micro("micro_http", "--url", url, "--phase", "rounds",
                                                 "--users", users, "--redis-url", self.redis_url)
            self.log(f"micro: refresh exchanges/s through the gateway (EdDSA, {workers} worker(s))")
            m[f"refresh_{workers}w"] = self.micro(
                "micro_http", "--url", url, "--phase", "refresh", "--users", users,
                "--clients", str(32 * workers), "--seconds", seconds, "--cpu-pids", pids)
            m[f"refresh_{workers}w"]["workers"] = workers
            m[f"refresh_{workers}w"]["rss_mb_per_worker"] = [rss_mb(int(p))
                                                             for p in pids.split(",")]
            if workers == 1 and "profile" in self.parts:
                self.profile_refresh(url, int(pids))
            self.procs.stop(proc)
        self.log("micro: Redis memory per session and refresh latency by session count"
                 + (" (quick: 10k sessions, levels up to 100k)" if quick else ""))
        m["redis"] = self.micro("micro_redis", "--redis-url", self.redis_url, "--flush-ok",
                                *(["--quick"] if quick else []), timeout=900)

    # --- the whole run ----------------------------------------------------------------------------
    def run(self) -> None:
        self.results["meta"] = environment(self.mode, self.repeat)
        self.log(f"mode {self.mode.name}: results in {self.out}")
        self.start_redis()
        self.start_upstream()
        self.prepare_keys_and_users()
        if "http" in self.parts:
            self.run_targets()
        if "profile" in self.parts:
            self.profile()
        if "micro" in self.parts:
            self.run_micro()
        self.results["meta"]["load_average_end"] = os.getloadavg()
        self.results["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _wait4(proc: Proc, timeout: float) -> tuple[int | None, Any]:
    """Reap the process ourselves to read its rusage (its own CPU time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.popen.returncode = os.waitstatus_to_exitcode(status)
            return proc.popen.returncode, usage
        time.sleep(0.05)
    proc.stop()
    return None, None


def listeners(port: int) -> int:
    """Sockets listening on 127.0.0.1:port (one per SO_REUSEPORT worker), from /proc/net/tcp."""
    want = f"0100007F:{port:04X}"
    count = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == want and fields[3] == "0A":  # local address, state LISTEN
                count += 1
    return count


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return 0


def _version(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (r.stdout + r.stderr).strip().splitlines()[0] if (r.stdout + r.stderr).strip() else "?"


def environment(mode: Mode, repeat: int) -> dict[str, Any]:
    def pkg(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    commit = _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "gateway"],
                                capture_output=True, text=True, check=False).stdout.strip())
    cpu_model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "mode": mode.name, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": commit + ("+dirty" if dirty else ""), "cpus": os.cpu_count(),
        "cpu_model": cpu_model, "kernel": platform.release(),
        "load_average_start": os.getloadavg(),
        "wrk": f"wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} -d{mode.duration:g}s --latency "
               f"(warm-up {mode.warmup:g}s, repeat {repeat})",
        "versions": {
            "python": platform.python_version(), "nginx": _version(["nginx", "-v"]),
            "redis": _version(["redis-server", "--version"]), "wrk": _version(["wrk", "-v"]),
            "aiohttp": pkg("aiohttp"), "pyjwt": pkg("pyjwt"), "uvloop": pkg("uvloop"),
            "redis-py": pkg("redis"), "cryptography": pkg("cryptography"),
            "argon2-cffi": pkg("argon2-cffi"), "py-spy": _version(["py-spy", "--version"]),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few seconds per target (smoke test)")
    p.add_argument("--publish", action="store_true",
                   help="copy the table and chart into docs/benchmarks.md and docs/img/")
    p.add_argument("--repeat", type=int, default=1, help="runs per target; the median is kept")
    p.add_argument("--out", type=Path, help="results directory (default bench/results/<ts>)")
    p.add_argument("--ablation", action="store_true",
                   help="add gateway targets with the access log and/or metrics off")
    p.add_argument("--only", default="http,profile,micro",
                   help="comma-separated parts to run: http, profile, micro (default: all)")
    args = p.parse_args(argv)
    parts = frozenset(x.strip() for x in args.only.split(",") if x.strip())
    if not parts or not parts <= {"http", "profile", "micro"}:
        p.error("--only takes http, profile and/or micro")
    for binary in ("nginx", "wrk", "redis-server", "redis-cli"):
        if shutil.which(binary) is None:
            print(f"{binary} is not installed: run bench/run (it installs it)", file=sys.stderr)
            return 2
    mode = QUICK if args.quick else FULL
    out = args.out or BENCH / "results" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    suite = Suite(mode, out, tmp, max(1, args.repeat), parts, args.ablation)

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    def too_long(_signum: int, _frame: Any) -> None:
        raise TimeoutError(f"the suite exceeded its {mode.limit_seconds}s limit")

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, stop)
    signal.signal(signal.SIGALRM, too_long)
    signal.alarm(mode.limit_seconds)
    failed: BaseException | None = None
    try:
        suite.run()
    except BaseException as e:  # noqa: BLE001 - report, clean up, keep partial results
        failed = e
        suite.results["error"] = f"{type(e).__name__}: {e}"
    finally:
        signal.alarm(0)
        suite.procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    (out / "results.json").write_text(json.dumps(suite.results, indent=2, default=str) + "\n")
    if suite.results["targets"]:
        report.chart(suite.results, out / "benchmarks.png")
    text = report.markdown(suite.results, image="benchmarks.png")
    (out / "report.md").write_text(text)
    print("\n" + text)
    if failed is not None:
        print(f"bench: FAILED: {suite.results['error']} (partial results in {out})",
              file=sys.stderr)
        return 1
    if args.publish:
        report.publish(suite.results, out)
        print(f"published to {report.DOC} and {report.IMAGE}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
