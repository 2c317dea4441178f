"""The real gateway as a separate process (`python -m gateway serve`), for behaviour that crosses
processes: signals, reload, drain, several instances sharing one Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
#: Every gateway process of the test run logs here (the no-secrets-in-logs test reads them).
LOG_DIR = REPO / "test-artifacts" / "logs"


@dataclass
class GatewayProcess:
    config_path: Path
    port: int
    workers: int = 1
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0, *, wait: bool = True) -> GatewayProcess:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"gateway-{self.port}-{int(time.time() * 1000)}.log"
        cmd = [sys.executable, "-m", "gateway", "serve", "-c", str(self.config_path)]
        if self.workers > 1:
            cmd += ["--workers", str(self.workers)]
        # The child keeps its own descriptor; ours is closed at once (no ResourceWarning).
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(REPO), **self.env},
            )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=0.5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"gateway not ready after {timeout}s:\n{self.logs()}")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def logs(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")


def write_config(directory: Path, text: str, name: str = "gateway.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def start_gateway(directory: Path, config_text: str, *, workers: int = 1,
                  env: dict[str, str] | None = None, port: int | None = None,
                  wait: bool = True) -> GatewayProcess:
    port = port or free_port()
    path = write_config(directory, config_text.replace("{port}", str(port)),
                        name=f"gateway-{port}.yaml")
    return GatewayProcess(path, port, workers, env or {}).start(wait=wait)
