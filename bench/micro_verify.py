"""Access-token verification per request: `Authenticator.verify` with the cache hit and missed,
for HS256 and EdDSA, beside bare `jwt.decode` (what the floor proxy pays on every request).

  python bench/micro_verify.py [--seconds 1.0] [--json out.json]
Each loop is bounded by time and by a maximum count; one process, one core, no I/O.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jwt

from bench.benchlib import AUDIENCE, HS256_SECRET, ISSUER, write_json
from gateway.clock import SystemClock
from gateway.config.model import Tokens
from gateway.pipeline.authn import Authenticator
from gateway.pipeline.revocations import RevocationList
from gateway.tokens.signer import KeyRing

MAX_OPS = 2_000_000


def rate(fn: Callable[[int], object], seconds: float) -> dict[str, float]:
    """Calls fn(i) until `seconds` pass (checked every 256 calls); µs per call and calls/s."""
    for i in range(200):  # warm-up
        fn(i)
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    while n < MAX_OPS:
        for _ in range(256):
            fn(n)
            n += 1
        if time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - start
    return {"ops": n, "us_per_op": round(elapsed / n * 1e6, 2), "ops_per_s": round(n / elapsed)}


def keyring(alg: str, clock: SystemClock) -> KeyRing:
    raw: dict[str, object] = {"algorithm": alg, "issuer": ISSUER, "audience": AUDIENCE}
    if alg == "HS256":
        raw["secret"] = HS256_SECRET
    return KeyRing.from_config(Tokens.model_validate(raw), clock)


def measure(alg: str, clock: SystemClock, seconds: float) -> dict[str, object]:
    ring = keyring(alg, clock)
    # Distinct tokens (distinct jti) so the miss loop never repeats one.
    tokens = [ring.access_token(sub="alice", sid=f"sid{i:06d}", roles=("user",))[0]
              for i in range(4096)]
    hit = Authenticator(ring, RevocationList(clock), clock, cache_size=10_000)
    miss = Authenticator(ring, RevocationList(clock), clock, cache_size=0)
    key: Any = ring.active.verify_with
    return {
        "token_bytes": len(tokens[0]),
        "cache_hit": rate(lambda i: hit.verify(tokens[0]), seconds),
        "cache_miss": rate(lambda i: miss.verify(tokens[i % 4096]), seconds),
        "keyring_verify": rate(lambda i: ring.verify(tokens[i % 4096]), seconds),
        "pyjwt_decode": rate(lambda i: jwt.decode(
            tokens[i % 4096], key, algorithms=[ring.active.alg], audience=AUDIENCE), seconds),
    }


def run(seconds: float) -> dict[str, object]:
    clock = SystemClock()
    return {alg: measure(alg, clock, seconds) for alg in ("HS256", "EdDSA")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=1.0, help="per loop")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    write_json(args.json, run(args.seconds))


if __name__ == "__main__":
    main()
