"""Turns py-spy's collapsed stacks (`--format raw`) into a short text account of where the
gateway's CPU time goes: share by area (who owns the leaf frame), top functions by self time
(with file:line), and top functions by inclusive time.

  python bench/profile_summary.py profile.txt [--top 25]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")

# First match wins: leaf frame's file -> area.
AREAS = (
    ("gateway/middlewares.py", "gateway: middleware + access log"),
    ("gateway/metrics.py", "gateway: metrics hooks"),
    ("gateway/pipeline/proxy.py", "gateway: proxy"),
    ("gateway/pipeline/identity.py", "gateway: header plan"),
    ("gateway/pipeline/", "gateway: other pipeline stages"),
    ("gateway/tokens/", "gateway: tokens"),
    ("gateway/", "gateway: other"),
    ("prometheus_client/", "prometheus_client"),
    ("logging/", "logging (stdlib)"),
    ("json/", "json (stdlib)"),
    ("jwt/", "PyJWT"),
    ("cryptography/", "cryptography"),
    ("multidict/", "multidict"),
    ("yarl/", "yarl"),
    ("aiohttp/client", "aiohttp client"),
    ("aiohttp/connector", "aiohttp client"),
    ("aiohttp/", "aiohttp server + shared"),
    # Before asyncio/: redis-py's own redis/asyncio/*.py would otherwise count as the stdlib's.
    ("redis/", "redis-py"),
    ("asyncio/", "asyncio (stdlib)"),
    ("uvloop/", "uvloop"),
)


def _parse(line: str) -> tuple[list[str], int] | None:
    stack, _, count = line.rstrip("\n").rpartition(" ")
    if not stack or not count.isdigit():
        return None
    return stack.split(";"), int(count)


def _short(file: str) -> str:
    for marker in ("site-packages/", "/lib/python3", "/work/main/", "/bench/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            if marker == "/lib/python3":
                file = file.split("/", 1)[1] if "/" in file else file
    return file


def _frame(raw: str) -> tuple[str, str, str]:
    m = _FRAME.match(raw)
    if m is None:
        return raw, "?", ""
    return m.group("func"), _short(m.group("file")), m.group("line") or ""


def _area(file: str) -> str:
    for prefix, name in AREAS:
        if file.startswith(prefix) or f"/{prefix}" in file:
            return name
    return "other: " + file.split("/", 1)[0]


def summarise(text: str, top: int = 25) -> dict[str, Any]:
    self_line: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        parsed = _parse(line)
        if parsed is None:
            continue
        frames, count = parsed
        total += count
        func, file, lineno = _frame(frames[-1])
        self_line[f"{func} ({file}:{lineno})"] += count
        areas[_area(file)] += count
        seen = set()
        for raw in frames:
            f, fl, _ = _frame(raw)
            key = f"{f} ({fl})"
            if key not in seen:
                seen.add(key)
                inclusive[key] += count

    def pct(counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in counter.most_common(n)] if total else []

    return {"samples": total, "areas": pct(areas, 30), "self": pct(self_line, top),
            "inclusive": pct(inclusive, top)}


def as_text(summary: dict[str, Any]) -> str:
    out = [f"samples: {summary['samples']}", "", "CPU by area (leaf frame):"]
    out += [f"  {p:5.1f}%  {k}" for k, p in summary["areas"]]
    out += ["", "Top self time (leaf frame, file:line):"]
    out += [f"  {p:5.1f}%  {k}" for k, p in summary["self"]]
    out += ["", "Top inclusive time (function anywhere on the stack):"]
    out += [f"  {p:5.1f}%  {k}" for k, p in summary["inclusive"]]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("raw", type=Path)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    sys.stdout.write(as_text(summarise(args.raw.read_text(), args.top)))


if __name__ == "__main__":
    main()
