"""Several "machines" on this one: Linux network namespaces joined by bridges.

Each host is a network namespace with its own loopback, interfaces, routes
and ports, so real ``meshollama start`` processes run in them on the default
ports (4001, 11434) exactly as a user runs them on real machines. Recipe and
measured facts: ``shared/reference/multi-host.md``.

* :meth:`Net.lan` makes one LAN segment (a bridge) with hosts on it;
* :meth:`Net.nat` puts a host behind its own NAT router (nftables
  masquerade) whose WAN leg sits on a given LAN;
* :meth:`Net.spawn` runs a process inside a host; :meth:`Net.run` runs a
  command there to completion (curl, a Python client).

Only 198.18.0.0/15 (the benchmarking range) is used, and no namespace has a
route off this machine. Names carry a per-run prefix so two runs never
collide, and :meth:`Net.close` (always called by the fixture, even when a
test fails) kills every process left in any of our namespaces and deletes
them all. Needs root, ``ip`` (iproute2) and, for NAT, ``nft`` (nftables):
:func:`missing` says which is absent so tests skip with that reason.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import trio


def missing(*, nat: bool = False) -> str | None:
    """Why namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces); run as root, as CI does"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`): apt-get install iproute2"
    if nat and shutil.which("nft") is None:
        return "needs nftables (`nft`): apt-get install nftables"
    probe = f"mo-probe-{uuid.uuid4().hex[:6]}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create network namespaces: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
    return r


@dataclass
class Host:
    name: str  # the namespace
    ip: str  # its address on its LAN


_OURS = re.compile(r"^mo(\d+)-[0-9a-f]{4}-")


def sweep() -> None:
    """Delete namespaces left by a test run that was killed before its
    ``finally`` (the creating pid is in the name and no longer alive)."""
    listed = sh("ip", "netns", "list", check=False).stdout.split("\n")
    for line in listed:
        name = line.split(" ", 1)[0]
        m = _OURS.match(name)
        if not m or _alive(int(m.group(1))):
            continue
        for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        sh("ip", "netns", "del", name, check=False)
        shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Net:
    prefix: str = field(default_factory=lambda: f"mo{os.getpid()}-{uuid.uuid4().hex[:4]}")
    namespaces: list[str] = field(default_factory=list)
    procs: list[trio.Process] = field(default_factory=list)

    def _ns(self, name: str) -> str:
        full = f"{self.prefix}-{name}"
        sh("ip", "netns", "add", full)
        self.namespaces.append(full)
        sh("ip", "-n", full, "link", "set", "lo", "up")
        return full

    def lan(self, subnet: str, names: list[str], *, first: int = 1, name: str = "lan",
            ip6: str | None = None) -> tuple[str, list[Host]]:
        """A bridge for ``subnet`` (``198.18.7``) and hosts ``.first``, ``.first+1``...
        (and ``ip6::first``... when ``ip6`` names a /64 prefix such as ``fd00:7``).
        Returns the bridge's namespace and the hosts."""
        bridge = self._ns(name)
        sh("ip", "-n", bridge, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", bridge, "link", "set", "br0", "up")
        hosts = []
        for i, host_name in enumerate(names):
            ip = f"{subnet}.{first + i}"
            hosts.append(self.attach(bridge, host_name, ip, port=f"p{i}"))
            if ip6:
                sh("ip", "-n", hosts[-1].name, "-6", "addr", "add", f"{ip6}::{first + i}/64", "dev", "eth0", "nodad")
        return bridge, hosts

    def attach(self, bridge: str, host_name: str, ip: str, *, port: str, gateway: str | None = None,
               ifname: str = "eth0", ns: str | None = None) -> Host:
        """A veth from ``bridge``'s br0 to a host (new namespace unless ``ns``)."""
        ns = ns or self._ns(host_name)
        sh("ip", "-n", bridge, "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", ns)
        sh("ip", "-n", bridge, "link", "set", port, "master", "br0")
        sh("ip", "-n", bridge, "link", "set", port, "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", ifname)
        sh("ip", "-n", ns, "link", "set", ifname, "up")
        if gateway:
            sh("ip", "-n", ns, "route", "add", "default", "via", gateway)
        elif ifname == "eth0":
            sh("ip", "-n", ns, "route", "add", "default", "dev", ifname)  # also routes mDNS multicast
        return Host(ns, ip)

    def nat(self, wan_bridge: str, wan_ip: str, lan_subnet: str, host_name: str, *, index: int,
            firewall: bool = False) -> Host:
        """A home: router ``natK`` (WAN ``wan_ip`` on ``wan_bridge``, LAN ``lan_subnet.1``,
        masquerade) and a host ``lan_subnet.10`` behind it. ``firewall``: the
        router silently drops unsolicited inbound SYNs, as home routers do,
        instead of its kernel answering them with a reset (which defeats TCP
        hole punching: the first punch SYN resets the other side's mapping)."""
        router = self._ns(f"nat{index}")
        sh("ip", "-n", wan_bridge, "link", "add", f"w{index}", "type", "veth", "peer", "name", "wan", "netns", router)
        sh("ip", "-n", wan_bridge, "link", "set", f"w{index}", "master", "br0")
        sh("ip", "-n", wan_bridge, "link", "set", f"w{index}", "up")
        sh("ip", "-n", router, "addr", "add", f"{wan_ip}/24", "dev", "wan")
        sh("ip", "-n", router, "link", "set", "wan", "up")
        home = self._ns(host_name)
        sh("ip", "-n", router, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", home)
        sh("ip", "-n", router, "addr", "add", f"{lan_subnet}.1/24", "dev", "lan")
        sh("ip", "-n", router, "link", "set", "lan", "up")
        sh("ip", "-n", home, "addr", "add", f"{lan_subnet}.10/24", "dev", "eth0")
        sh("ip", "-n", home, "link", "set", "eth0", "up")
        sh("ip", "-n", home, "route", "add", "default", "via", f"{lan_subnet}.1")
        sh("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for rule in (
            ["add", "table", "ip", "nat"],
            ["add", "chain", "ip", "nat", "post", "{ type nat hook postrouting priority 100 ; }"],
            ["add", "rule", "ip", "nat", "post", "oifname", "wan", "masquerade"],
        ):
            sh("ip", "netns", "exec", router, "nft", *rule)
        if firewall:
            for rule in (
                ["add", "table", "ip", "fw"],
                ["add", "chain", "ip", "fw", "input", "{ type filter hook input priority 10 ; }"],
                ["add", "rule", "ip", "fw", "input", "iifname", "wan", "ct", "state", "new",
                 "tcp", "flags", "&", "(syn|ack)", "==", "syn", "drop"],
            ):
                sh("ip", "netns", "exec", router, "nft", *rule)
        return Host(home, f"{lan_subnet}.10")

    def hosts_file(self, host: Host, names: dict[str, str]) -> None:
        """Give ``host`` an /etc/hosts of its own mapping ``names`` to IPs (``ip netns
        exec`` bind-mounts /etc/netns/<ns>/hosts over /etc/hosts), as a container's
        DNS would; removed with the namespace."""
        folder = Path("/etc/netns") / host.name
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", "::1 localhost"] + [f"{ip} {name}" for name, ip in names.items()]
        (folder / "hosts").write_text("\n".join(lines) + "\n")

    async def spawn(self, host: Host, args: list[str], *, log: Path, env: dict | None = None) -> trio.Process:
        """Start ``args`` inside ``host``; stdout and stderr go to ``log``."""
        out = open(log, "wb")  # noqa: SIM115 (the process owns it)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = await trio.lowlevel.open_process(
            ["ip", "netns", "exec", host.name, *args], stdout=out, stderr=subprocess.STDOUT, env=full_env,
            cwd=str(Path(__file__).resolve().parents[1]),
        )
        out.close()
        self.procs.append(proc)
        return proc

    async def run(self, host: Host, args: list[str], *, timeout: float = 30.0, input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run a command inside ``host`` to completion (bounded by ``timeout``)."""
        with trio.fail_after(timeout):
            return await trio.run_process(
                ["ip", "netns", "exec", host.name, *args], capture_stdout=True, capture_stderr=True,
                check=False, stdin=input,
            )

    async def stop(self, proc: trio.Process, *, grace: float = 8.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(grace):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    def close(self) -> None:
        """Kill everything we started or that runs in our namespaces, delete them."""
        for proc in self.procs:
            if proc.returncode is None:
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
        for ns in self.namespaces:
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        self.namespaces.clear()
