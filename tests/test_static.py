"""The code stays as STYLE.md asks: ruff clean everywhere, the package clean under mypy strict.

Both run as part of the suite (a few seconds) so a finding fails CI like any broken test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)


def test_ruff_finds_nothing() -> None:
    done = _run("ruff", "check", "--no-cache", "--output-format", "concise", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_package_is_mypy_strict_clean(tmp_path: Path) -> None:
    done = _run("mypy", "--cache-dir", str(tmp_path / "mypy"))  # files and strict: pyproject
    assert done.returncode == 0, done.stdout + done.stderr
