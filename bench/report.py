"""What a run's results.json becomes: the markdown report (tables, the issue's targets with a
verdict each, the micro figures, the profile summary), the chart, and --publish into docs/."""

from __future__ import annotations

import math
import shutil
import statistics
from pathlib import Path
from typing import Any

from bench.benchlib import REPO

DOC = REPO / "docs" / "benchmarks.md"
IMAGE = REPO / "docs" / "img" / "benchmarks.png"
START, END = "<!-- bench:results:start -->", "<!-- bench:results:end -->"
_COLOURS = {"upstream": "#9e9e9e", "nginx": "#2e7d32", "floor": "#ef6c00", "gateway": "#1565c0"}


def _target(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((t for t in results.get("targets", []) if t["name"] == name), None)


def _kind(results: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((t for t in results.get("targets", []) if t["kind"] == kind), None)


def _f(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}"
    return str(value)


def _heading(results: dict[str, Any]) -> list[str]:
    meta = results.get("meta", {})
    quick = meta.get("mode") == "quick"
    title = ("Latest run: QUICK SMOKE RUN (a few seconds per target; proves the suite works, "
             "the figures are noisy and not the measurement)" if quick else "Latest run: full run")
    load = meta.get("load_average_start")
    load_text = f"{load[0]:.2f}" if load else "?"
    lines = [f"### {title}", "",
             (f"{meta.get('started', '?')}, commit `{meta.get('commit', '?')}`, "
             f"{meta.get('cpus', '?')} × {meta.get('cpu_model', '?')} (shared by wrk, the "
             f"upstream, Redis and the target), load average at start {load_text}. "
             f"`{meta.get('wrk', '')}`.")]
    if results.get("error"):
        lines += ["", f"**The run stopped early: {results['error']}** (partial results below)."]
    return lines


def targets_table(results: dict[str, Any]) -> list[str]:
    floor, nginx = _kind(results, "floor"), _kind(results, "nginx")
    rows = [("| target | req/s | p50 ms | p99 ms | × floor | × nginx proxy | CPU target | "
            "target CPU µs/req | CPU upstream | CPU wrk | CPU redis | non-2xx / socket err | "
            "RSS/worker MB |"),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in results.get("targets", []):
        cores = t.get("cpu_cores", {})
        vs_floor = t["rps"] / floor["rps"] if floor else None
        vs_nginx = t["rps"] / nginx["rps"] if nginx else None
        rss = t.get("rss_mb_per_worker")
        rows.append(
            f"| {t['name']} | {_f(t['rps'])} | {_f(t['p50_ms'], 2)} | {_f(t['p99_ms'], 2)} | "
            f"{_f(vs_floor, 2)}× | {_f(vs_nginx, 3)}× | {_f(cores.get('target'), 2)} | "
            f"{_f(t.get('target_cpu_us_per_request'))} | "
            f"{_f(cores.get('upstream'), 2)} | {_f(cores.get('wrk'), 2)} | "
            f"{_f(cores.get('redis'), 2)} | {t['non_2xx']} / {t['socket_errors']} | "
            f"{', '.join(_f(r) for r in rss) if rss else '–'} |")
    rows += ["", ("CPU columns are cores used on average during the measured run (utime+stime from "
             "/proc, all processes of the target including a supervisor's workers; wrk's from "
             "its rusage); target CPU µs/req is the target's CPU time divided by the requests it "
             "answered, the figure least disturbed by other load on the machine. × columns "
             "divide this row's req/s by the floor proxy's and by nginx proxy_pass's in the "
             "same run.")]
    return rows


def checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured figure and a verdict."""
    out: list[dict[str, Any]] = []
    floor = _kind(results, "floor")

    def add(check: str, figure: str, target: str, ok: bool | None) -> None:
        out.append({"check": check, "figure": figure, "target": target,
                    "verdict": "–" if ok is None else ("pass" if ok else "FAIL")})

    for alg in ("HS256", "EdDSA"):
        one, two = _target(results, f"gateway {alg} 1w"), _target(results, f"gateway {alg} 2w")
        if one and floor:
            ratio = _ratio(one, floor)
            add(f"proxied GET, {alg}, 1 worker vs floor", f"{ratio:.3f}×",
                "≥ 1.0× (aim 1.3×)", ratio >= 1.0)
            mine, theirs = one.get("target_cpu_us_per_request"), floor.get(
                "target_cpu_us_per_request")
            if mine and theirs:
                add(f"… the same as CPU per request (floor µs / gateway µs), {alg}",
                    f"{theirs / mine:.2f}× ({mine:.0f} vs {theirs:.0f} µs)",
                    "(context: ≥ 1.0× means cheaper than the floor)", None)
        if one and two:
            ratio = _ratio(two, one)
            add(f"proxied GET, {alg}, 2 workers vs 1", f"{ratio:.3f}×", "≥ 1.6×", ratio >= 1.6)
            cores = sum((two.get("cpu_cores") or {}).values())
            cpus = results.get("meta", {}).get("cpus") or 2
            mine, theirs = one.get("target_cpu_us_per_request"), two.get(
                "target_cpu_us_per_request")
            if cores and mine and theirs:
                ceiling = two["rps"] * cpus / cores / one["rps"]
                add(f"… what the box allows: {cpus} cores ÷ the CPU per request of the 2-worker "
                    f"run (gateway + wrk + upstream + Redis), over the 1-worker req/s, {alg}",
                    f"{ceiling:.2f}× (the run used {cores:.2f} of {cpus} cores); gateway CPU "
                    f"per request 2w vs 1w: {theirs:.0f} vs {mine:.0f} µs",
                    "(context: the most 2 workers can reach here)", None)
    micro = results.get("micro", {})
    for key in ("refresh_1w", "refresh_2w"):
        r = micro.get(key)
        if r:
            per = r["per_s"] / r["workers"]
            cpu = r.get("per_gateway_cpu_s")
            add(f"refresh exchanges/s per worker ({r['workers']} worker(s), real Redis)",
                f"{per:,.0f}/s (≈{_f(cpu)} per gateway CPU-second)", "≥ 1,500/s", per >= 1500)
    rounds = micro.get("refresh_rounds")
    if rounds:
        n = rounds["round_trips_per_exchange"]
        add("Redis round trips per refresh exchange", f"{n:g} ({_commands(rounds)})", "1",
            n <= 1.0)
    redis = micro.get("redis", {})
    for m in redis.get("memory", []):
        add(f"Redis bytes per session incl. indexes (UA {m['user_agent_chars']} chars, "
            f"{m['sessions']:,} sessions)", f"{m['bytes_per_session']:,} B "
            f"(hash {m['session_hash_encoding']})", "≤ 1,024 B", m["bytes_per_session"] <= 1024)
    levels = [lv for lv in redis.get("scale", {}).get("levels", []) if "p50_ms" in lv]
    if len(levels) >= 2:
        first, last = levels[0], levels[-1]
        change = last["p50_ms"] / first["p50_ms"] - 1
        add(f"refresh p50 at {last['sessions']:,} vs {first['sessions']:,} sessions",
            f"{last['p50_ms']:.3f} vs {first['p50_ms']:.3f} ms ({change:+.0%})",
            "within 20% (at 1M)", abs(change) <= 0.20)
    rss = [r for t in results.get("targets", []) for r in t.get("rss_mb_per_worker") or []]
    rss += [r for k in ("refresh_1w", "refresh_2w") for r in micro.get(k, {}).get(
        "rss_mb_per_worker", [])]
    rss = [r for r in rss if r is not None]
    if rss:
        add("gateway RSS per worker after the run", f"max {max(rss):.0f} MB", "< 100 MB",
            max(rss) < 100)
    return out


def _commands(rounds: dict[str, Any]) -> str:
    top = rounds.get("top_level_commands", {})
    return ", ".join(f"{k}×{v / rounds['exchanges']:g}" for k, v in top.items()) or "none"


def _background(rounds: dict[str, Any]) -> dict[str, int]:
    # Older result files counted only PINGs as background.
    if "background_commands" in rounds:
        return dict(rounds["background_commands"])
    return {"PING": rounds["background_pings"]} if rounds.get("background_pings") else {}


def _clients(micro: dict[str, Any]) -> str:
    names = sorted({micro[k].get("client", "aiohttp, Python") for k in ("refresh_1w", "refresh_2w")
                    if k in micro})
    return ", ".join(names) or "aiohttp, Python"


def micro_tables(results: dict[str, Any]) -> list[str]:
    micro = results.get("micro", {})
    lines: list[str] = []
    verify = micro.get("verify")
    if verify:
        lines += ["#### Access-token verification (one core, in-process)", "",
                  ("| algorithm | token bytes | cache hit | cache miss (Authenticator) | "
                  "KeyRing.verify | bare jwt.decode |"), "|---|---:|---:|---:|---:|---:|"]
        for alg, v in verify.items():
            lines.append(f"| {alg} | {v['token_bytes']} | "
                         + " | ".join(f"{v[k]['us_per_op']:.2f} µs ({v[k]['ops_per_s']:,}/s)"
                                      for k in ("cache_hit", "cache_miss", "keyring_verify",
                                                "pyjwt_decode")) + " |")
        lines.append("")
    edge = micro.get("edge")
    if edge:
        lines += ["#### The gateway's own per-request stages (one core, in-process, best of 5)", "",
                  "| stage | µs per request |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in edge["stages_us"].items()]
        lines += [f"| **all of the above** | **{edge['gateway_stages_total_us']:.2f}** |",
                  (f"| *for comparison: the floor's `jwt.decode` (HS256), every request* | "
                  f"*{edge['floor_jwt_decode_us']:.2f}* |"), ""]
    store = micro.get("store")
    rows = []
    if store:
        for key, label in (("store_rotate", "SessionStore.rotate (in-process client)"),
                           ("service_refresh", (f"TokenService.refresh, {store['algorithm']} "
                                               "(in-process)"))):
            r = store[key]
            rows.append(f"| {label} | {r['clients']} | {r['exchanges_per_s']:,} | "
                        f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | – | – |")
    for key in ("refresh_1w", "refresh_2w"):
        r = micro.get(key)
        if r:
            rows.append(f"| POST /auth/refresh via the gateway, EdDSA, {r['workers']} worker(s) | "
                        f"{r['clients']} | {r['per_s']:,.0f} | {r['p50_ms']:.2f} | "
                        f"{r['p99_ms']:.2f} | {_f(r.get('gateway_cores'), 2)} | "
                        f"{_f(r.get('per_gateway_cpu_s'))} |")
    if rows:
        lines += ["#### Refresh exchanges against a real Redis", "",
                  ("| path | concurrent clients | exchanges/s | p50 ms | p99 ms | gateway cores "
                  "| exchanges per gateway CPU-s |"), "|---|---:|---:|---:|---:|---:|---:|",
                  *rows, "", (f"The load generator ({_clients(micro)}) runs on the same two "
                  "cores; the last column is the load-generator-independent capacity of one "
                  "worker core."), ""]
    rounds = micro.get("refresh_rounds")
    if rounds:
        lines += [f"Redis MONITOR over {rounds['exchanges']} sequential refreshes: "
                  f"{rounds['round_trips_per_exchange']:g} top-level command(s) per exchange "
                  f"({_commands(rounds)}); inside the script: "
                  + (", ".join(f"{k}×{v / rounds['exchanges']:g}"
                               for k, v in rounds.get("script_commands", {}).items()) or "none")
                  + ". Background commands in the same window"
                  + (f" ({rounds['monitor_seconds']:g} s)" if "monitor_seconds" in rounds else "")
                  + " (sent on a timer whatever the traffic, so not counted per exchange): "
                  + (", ".join(f"{k}×{v}" for k, v in _background(rounds).items()) or "none")
                  + ".", ""]
    login = micro.get("login_1w")
    if login:
        a = login["argon2"]
        lines += ["#### Logins", "",
                  (f"POST /auth/login, 1 worker, {login['clients']} concurrent clients: "
                  f"**{login['per_s']:.1f} logins/s**, p50 {login['p50_ms']:.0f} ms, p99 "
                  f"{login['p99_ms']:.0f} ms, gateway {_f(login.get('gateway_cores'), 2)} cores. "
                  f"argon2 parameters (read from the users file's hasher): {a['type']}, "
                  f"t={a['time_cost']}, m={a['memory_cost_kib'] // 1024} MiB, "
                  f"p={a['parallelism']}, hash {a['hash_len']} B, salt {a['salt_len']} B; one "
                  f"verify takes {a['verify_ms_one_thread']} ms with no other login running."), ""]
    redis = micro.get("redis", {})
    if redis.get("memory"):
        lines += ["#### Redis memory per session", "",
                  ("| sessions (users) | User-Agent | used_memory delta | bytes/session | "
                  "session hash | MEMORY USAGE hash | user index |"),
                  "|---|---|---:|---:|---|---:|---|"]
        for m in redis["memory"]:
            lines.append(
                f"| {m['sessions']:,} ({m['users']:,}) | {m['user_agent_chars']} chars | "
                f"{m['used_memory_delta'] / 2**20:.1f} MiB | **{m['bytes_per_session']:,}** | "
                f"{m['session_hash_encoding']} | {m['session_hash_memory_usage']} B | "
                f"{m['user_index_encoding']}, {m['user_index_memory_usage']} B |")
        cfg = redis.get("redis_config", {})
        lines += ["", f"Redis {redis.get('redis_version')}, "
                  + ", ".join(f"{k} {v}" for k, v in sorted(cfg.items())) + ".", ""]
    levels = redis.get("scale", {}).get("levels", [])
    if levels:
        rounds = redis.get("scale", {}).get("interleaved_rounds")
        lines += ["#### Refresh latency by number of sessions (one client, back to back)", "",
                  (f"Each level in its own database of one Redis, measured in {rounds} "
                   "interleaved rounds (the levels take turns), so the noise of the machine "
                   "falls on every level alike." if rounds else ""), "",
                  ("| sessions | keys | used memory | load time | rotations | p50 ms | p99 ms | "
                  "p50 of one round, min–max |"),
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for lv in levels:
            if "p50_ms" not in lv:
                lines.append(f"| {lv['level']:,} | – | – | – | – | not reached "
                             f"({lv.get('reached', 0):,} loaded: {lv.get('note')}) | | |")
                continue
            lines.append(f"| {lv['sessions']:,} | {lv['keys']:,} | {lv['used_memory_mb']:,} MiB | "
                         f"{lv['load_seconds']} s | {lv['rotations']:,} | {lv['p50_ms']:.3f} | "
                         f"{lv['p99_ms']:.3f} | {_span(lv.get('round_p50_ms'))} |")
        lines.append("")
    return lines


def profile_lines(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    titles = {"proxy": "Profile: proxied GET", "refresh": "Profile: POST /auth/refresh"}
    for key, prof in results.get("profiles", {}).items():
        lines += [f"#### {titles.get(key, key)}", ""]
        if "skipped" in prof:
            lines += [f"Skipped: {prof['skipped']}", ""]
            continue
        lines += [(f"py-spy, {prof['rate_hz']} Hz for {prof['seconds']:g} s, `{prof['target']}`; "
                  f"{prof['samples']:,} samples (idle excluded; a thread that is runnable but "
                  "waiting for a core still counts)."), "",
                  "| share | area (leaf frame) |", "|---:|---|"]
        lines += [f"| {p:.1f}% | {k} |" for k, p in prof["areas"][:12]]
        lines += ["", "| self | function (file:line) |", "|---:|---|"]
        lines += [f"| {p:.1f}% | `{k}` |" for k, p in prof["self"][:12]]
        lines.append("")
    return lines


def markdown(results: dict[str, Any], image: str) -> str:
    lines = _heading(results) + ["", f"![requests/s and p99 by target]({image})", "",
                                 *targets_table(results), ""]
    found = checks(results)
    if found:
        lines += ["#### The issue's targets", "", "| check | figure | target | verdict |",
                  "|---|---|---|---|"]
        lines += [f"| {c['check']} | {c['figure']} | {c['target']} | {c['verdict']} |"
                  for c in found]
        lines.append("")
    lines += micro_tables(results) + profile_lines(results)
    return "\n".join(lines).rstrip() + "\n"


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = results["targets"]
    names = [t["name"] for t in targets][::-1]
    colours = [_COLOURS.get(t["kind"], "#555555") for t in targets][::-1]
    fig, axes = plt.subplots(1, 3, figsize=(16, 0.5 * len(targets) + 1.9), sharey=True)
    panels = (("rps", "requests/s (log scale; higher is better)", True, "{:,.0f}"),
              ("p99_ms", "p99 latency, ms (lower is better)", False, "{:,.1f}"),
              ("target_cpu_us_per_request", "target CPU µs per request (log; lower is better)",
               True, "{:,.0f}"))
    for ax, (key, label, log, fmt) in zip(axes, panels):
        values = [t.get(key) or 0 for t in targets][::-1]
        bars = ax.barh(names, values, color=colours)
        ax.set_xlabel(label)
        if log:
            ax.set_xscale("log")
        ax.grid(axis="x", alpha=0.3, which="both")
        for bar, v in zip(bars, values):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + fmt.format(v),
                    va="center", fontsize=8)
        ax.margins(x=0.25)
    left = axes[0]
    floor = _kind(results, "floor")
    if floor:
        left.axvline(floor["rps"], color=_COLOURS["floor"], linestyle="--", linewidth=1)
    meta = results.get("meta", {})
    mode = "QUICK SMOKE RUN, noisy" if meta.get("mode") == "quick" else "full run"
    fig.suptitle(f"Edge gateway on loopback: {meta.get('wrk', '')}; {meta.get('cpus', '?')} cores "
                 f"shared with wrk, upstream and Redis ({mode}, {meta.get('started', '')[:10]})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def publish(results: dict[str, Any], out: Path) -> None:
    """Replace the results block of docs/benchmarks.md and the chart beside it."""
    IMAGE.parent.mkdir(parents=True, exist_ok=True)
    if (out / "benchmarks.png").exists():
        shutil.copyfile(out / "benchmarks.png", IMAGE)
    block = f"{START}\n{markdown(results, image='img/benchmarks.png')}{END}"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)


def _span(pair: list[float] | None) -> str:
    return f"{pair[0]:.3f}–{pair[1]:.3f}" if pair else "–"


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    """a's req/s over b's: the median of the per-round ratios when both ran in the same rounds
    (each pair measured minutes apart), else the ratio of the median runs."""
    ra, rb = a.get("rps_runs"), b.get("rps_runs")
    if ra and rb and len(ra) == len(rb):
        return float(statistics.median(x / y for x, y in zip(ra, rb)))
    return float(a["rps"] / b["rps"])
