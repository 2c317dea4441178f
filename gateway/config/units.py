"""Parsing of human-written durations (`30s`, `15m`, `14d`) and sizes (`1MB`)."""

from __future__ import annotations

import math
import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}

_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, None: 1,
}


def parse_duration(value: object) -> float:
    """Seconds from a number (seconds) or a string like `500ms`, `30s`, `15m`, `2h`, `14d`."""
    if isinstance(value, bool):
        # ValueError, not TypeError: pydantic turns only ValueError into a validation error.
        raise ValueError("expected a duration like 30s, 15m or 14d")  # noqa: TRY004
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError(f"expected a duration like 30s, 15m or 14d, got {value!r}")
    if not math.isfinite(seconds):
        raise ValueError(f"expected a finite duration, got {value!r}")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from an integer or a string like `512KB`, `1MB`, `1MiB` (KB = 1000, KiB = 1024)."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 1048576 or 1MB")  # noqa: TRY004
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        unit = m.group(2).lower() if m.group(2) else None
        size = int(m.group(1)) * _SIZE_UNITS[unit]
    else:
        raise ValueError(f"expected a size like 1048576 or 1MB, got {value!r}")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size
