"""Gateway processes from async tests: start without blocking the loop (the upstreams live in it),
stop every one at teardown, and see which process owns which connection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway_process import GatewayProcess, start_gateway


@pytest.fixture
async def process_gateway(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """`await process_gateway(config_text, workers=1)` -> a started GatewayProcess."""
    started: list[GatewayProcess] = []

    async def start(config_text: str, **kwargs: Any) -> GatewayProcess:
        gw = await asyncio.to_thread(start_gateway, tmp_path, config_text, **kwargs)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        workers = children(gw.proc.pid) if gw.proc is not None else set()
        await asyncio.to_thread(gw.stop)
        for pid in workers:  # a supervisor that died first must not leave its workers behind
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if str(gw.config_path).encode() in cmdline:  # still ours, not a reused PID
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry))
    return found


def connection_owners(server_port: int, client_ports: set[int], pids: set[int]) -> dict[int, int]:
    """client port -> PID of the process holding the server side of that loopback connection."""
    inode_to_client: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if local_port == server_port and remote_port in client_ports and fields[9] != "0":
                inode_to_client[f"socket:[{fields[9]}]"] = remote_port
    owners: dict[int, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link in inode_to_client:
                owners[inode_to_client[link]] = pid
    return owners


def log_records(gw: GatewayProcess) -> list[dict[str, Any]]:
    records = []
    for line in gw.logs().splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0,
                   interval: float = 0.05) -> None:
    """Poll `predicate` until true; bounded in time."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(interval)


async def refuses_connections(port: int) -> bool:
    """True when nothing accepts on 127.0.0.1:port (a draining gateway has closed its socket)."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except (ConnectionRefusedError, ConnectionResetError):
        # Reset: the connection sat in the backlog of a listener that then closed.
        return True
    writer.close()
    return False


async def wait_refusing(port: int, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not await refuses_connections(port):
            await asyncio.sleep(0.05)
