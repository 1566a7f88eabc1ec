"""Run real ``meshollama start`` processes on loopback for end-to-end tests.

Every node gets its own data dir under the test's tmp_path, OS-chosen ports
(``tcp/0`` and ``:0``), no mDNS, and a short heartbeat interval. The node
writes ``node.json`` once it is up; we wait for that file (a condition, not a
sleep). Processes are always killed on exit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

HEARTBEAT = 0.5


@dataclass
class NodeProc:
    name: str
    data_dir: Path
    args: list[str]
    log_path: Path
    proc: trio.Process | None = None
    info: dict = field(default_factory=dict)

    @property
    def peer_id(self) -> str:
        return self.info["peer_id"]

    @property
    def api(self) -> str:
        return self.info["api_url"]

    @property
    def addr(self) -> str:
        return self.info["p2p_addrs"][0]

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-4000:]
        except OSError:
            return ""


class Cluster:
    def __init__(self, tmp_path: Path, nursery: trio.Nursery) -> None:
        self.tmp = tmp_path
        self.nursery = nursery
        self.nodes: list[NodeProc] = []
        # No keep-alive: each poll is independent, as `meshollama peers` is.
        self.client = httpx.AsyncClient(timeout=10.0, limits=httpx.Limits(max_keepalive_connections=0))

    async def start(self, name: str, *extra: str, bootstrap: NodeProc | None = None,
                    heartbeat: float = HEARTBEAT, data_dir: Path | None = None, wait: bool = True,
                    env: dict | None = None) -> NodeProc:
        data_dir = data_dir or self.tmp / name
        data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            sys.executable, "-m", "meshollama", "start",
            "--data-dir", str(data_dir),
            "--p2p-listen", "/ip4/127.0.0.1/tcp/0",
            "--api-listen", "127.0.0.1:0",
            "--no-mdns",
            "--heartbeat-interval", str(heartbeat),
            "--log-level", "info",
            *extra,
        ]
        if bootstrap is not None:
            args += ["--bootstrap", bootstrap.addr]
        node = NodeProc(name, data_dir, args, self.tmp / f"{name}.log")
        await self._spawn(node, env)
        self.nodes.append(node)
        if wait:
            await self.wait_ready(node)
        return node

    async def _spawn(self, node: NodeProc, env: dict | None = None) -> None:
        (node.data_dir / "node.json").unlink(missing_ok=True)
        full_env = dict(os.environ)
        full_env.update({"PYTHONUNBUFFERED": "1"})
        full_env.pop("MESHOLLAMA_CONFIG", None)
        full_env.update(env or {})
        with open(node.log_path, "ab") as log:
            node.proc = await trio.lowlevel.open_process(node.args, stdout=log, stderr=subprocess.STDOUT, env=full_env)

    async def restart(self, node: NodeProc) -> NodeProc:
        await self._spawn(node)
        await self.wait_ready(node)
        return node

    async def wait_ready(self, node: NodeProc) -> None:
        path = node.data_dir / "node.json"
        while True:
            if node.proc.poll() is not None:
                raise AssertionError(f"node {node.name} exited with {node.proc.returncode}:\n{node.log()}")
            try:
                info = json.loads(path.read_text())
                if info.get("pid") == node.proc.pid:
                    node.info = info
                    return
            except (OSError, ValueError):
                pass
            await trio.sleep(0.05)

    async def peers(self, node: NodeProc) -> list[dict]:
        r = await self.client.get(node.api + "/api/mesh/peers")
        r.raise_for_status()
        data = r.json()
        return data["peers"] if isinstance(data, dict) else data

    async def view(self, node: NodeProc) -> dict[str, dict]:
        return {p["peer_id"]: p for p in await self.peers(node)}

    async def wait_until(self, predicate, step: float = 0.1):
        return await wait_until(predicate, step)

    def signal(self, node: NodeProc, sig: int) -> None:
        node.proc.send_signal(sig)

    async def wait_exit(self, node: NodeProc) -> int:
        return await node.proc.wait()

    async def close(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                try:
                    node.proc.send_signal(signal.SIGCONT)
                    node.proc.kill()
                except ProcessLookupError:
                    pass
        with trio.move_on_after(10) as scope:
            scope.shield = True
            for node in self.nodes:
                if node.proc is not None:
                    await node.proc.wait()
            await self.client.aclose()


async def wait_until(predicate, step: float = 0.1):
    """Poll an async predicate until it returns a truthy value (bounded by the caller's fail_after)."""
    while True:
        value = await predicate()
        if value:
            return value
        await trio.sleep(step)


@asynccontextmanager
async def cluster(tmp_path: Path):
    async with trio.open_nursery() as nursery:
        c = Cluster(tmp_path, nursery)
        try:
            yield c
        finally:
            await c.close()
            nursery.cancel_scope.cancel()
