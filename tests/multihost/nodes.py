"""Real ``meshollama start`` processes (and stand-in Ollamas) inside namespace hosts."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tests.integration.cluster import wait_until
from tests.netns import Host, Net

HEARTBEAT = "0.5"
# Lines that mean peers dial the wrong address (themselves, or a loopback
# address of another host): a healthy mesh has none.
BAD_LOG = re.compile(r"failed to upgrade security|handshake|Peer ID mismatch|InvalidTag", re.IGNORECASE)


@dataclass
class MeshNode:
    host: Host
    name: str
    data_dir: Path
    log: Path
    proc: trio.Process
    info: dict = field(default_factory=dict)

    @property
    def peer_id(self) -> str:
        return self.info["peer_id"]

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def join_line(self) -> str:
        m = re.search(r"others join with: (meshollama start .*)", self.text())
        assert m, f"{self.name} printed no join line:\n{self.text()[-3000:]}"
        return m.group(1).strip()


async def start_fake(net: Net, host: Host, tmp: Path, models: list[str], name: str, *, port: int = 11435,
                     token_delay: float = 0.0, extra: tuple[str, ...] = ()) -> None:
    """A stand-in Ollama on ``127.0.0.1:port`` inside ``host``, up when this returns."""
    port_file = tmp / f"{name}-fake.port"
    port_file.unlink(missing_ok=True)
    args = [sys.executable, "-m", "tests.fakes.fake_ollama", "--port", str(port), "--models", ",".join(models),
            "--name", name, "--port-file", str(port_file)]
    if token_delay:
        args += ["--token-delay", str(token_delay)]
    args += list(extra)
    proc = await net.spawn(host, args, log=tmp / f"{name}-fake.log")
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None:
            raise AssertionError(f"fake ollama in {host.name} exited:\n{(tmp / f'{name}-fake.log').read_text()}")
        await trio.sleep(0.05)


async def start_node(net: Net, host: Host, tmp: Path, name: str, *extra: str, env: dict | None = None) -> MeshNode:
    """``meshollama start`` in ``host`` with default ports and flags plus ``extra``;
    returns once it wrote node.json."""
    data_dir = tmp / name
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "node.json").unlink(missing_ok=True)
    log = tmp / f"{name}.log"
    args = [sys.executable, "-m", "meshollama", "start", "--data-dir", str(data_dir),
            "--heartbeat-interval", HEARTBEAT, "--log-level", "info", *extra]
    proc = await net.spawn(host, args, log=log, env={"MESHOLLAMA_CONFIG": "", **(env or {})})
    node = MeshNode(host, name, data_dir, log, proc)
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}:\n{node.text()[-4000:]}")
        try:
            info = json.loads((data_dir / "node.json").read_text())
            if info.get("pid") == proc.pid and "others join with" in node.text():
                node.info = info
                return node
        except (OSError, ValueError):
            pass
        await trio.sleep(0.05)


async def http(net: Net, host: Host, method: str, path: str, body: dict | None = None,
               *, port: int = 11434, timeout: float = 60.0) -> dict:
    """One request with httpx from inside ``host`` to its own gateway."""
    args = [sys.executable, "-m", "tests.multihost.client", method, f"http://127.0.0.1:{port}{path}"]
    if body is not None:
        args.append(json.dumps(body))
    r = await net.run(host, args, timeout=timeout)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return json.loads(r.stdout)


async def peers(net: Net, host: Host) -> dict[str, dict]:
    out = await http(net, host, "GET", "/api/mesh/peers", timeout=20)
    data = json.loads("".join(out.get("lines", []))) if out.get("status") == 200 else {}
    listed = data.get("peers", data) if isinstance(data, dict) else data
    return {p["peer_id"]: p for p in listed or []}


async def wait_for(predicate, step: float = 0.2):
    """Poll an async predicate until truthy (the caller bounds it with fail_after)."""
    return await wait_until(predicate, step)
