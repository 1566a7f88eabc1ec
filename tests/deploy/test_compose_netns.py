"""deploy/docker/compose.yaml, run as written, without Docker.

Each compose service becomes a network namespace on one bridge (198.18.12.0/24),
with an /etc/hosts that maps every service name to its address, as Docker's
embedded DNS does (``ip netns exec`` bind-mounts /etc/netns/<ns>/hosts over
/etc/hosts). Each node runs exactly its service's command after the image's
ENTRYPOINT, with the image's ENV under the service's ``environment``, parsed
from the Dockerfile and compose.yaml; only container paths are mapped (the
venv's, the data volume to a temp dir). The ``ollama`` service is the
stand-in Ollama on its port 11434. ``depends_on: service_healthy`` is honoured
by running the service's own healthcheck command until it passes.

What Docker would add and this does not: the image build itself, the
published host port, restart policies and stop signals (checked as text in
test_deploy_files.py).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import trio

from tests.deploy import deploy_files as df
from tests.netns import Net, missing, sweep

pytestmark = pytest.mark.slow
SUBNET = "198.18.12"
MODEL = "llama3:latest"


@pytest.fixture
def net():
    why = missing()
    if why:
        pytest.skip(why)
    sweep()
    n = Net()
    try:
        yield n
    finally:
        for ns in n.namespaces:
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        n.close()


def hosts_file(ns: str, names: dict[str, str]) -> None:
    folder = Path("/etc/netns") / ns
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["127.0.0.1 localhost", "::1 localhost"] + [f"{ip} {name}" for name, ip in names.items()]
    (folder / "hosts").write_text("\n".join(lines) + "\n")


async def in_ns(net: Net, host, argv: list[str], env: dict[str, str], *, timeout: float = 20.0):
    """Run ``argv`` in ``host`` with exactly ``env`` added (``env`` the command)."""
    pairs = [f"{k}={v}" for k, v in env.items()]
    return await net.run(host, ["env", *pairs, *argv], timeout=timeout)


async def test_compose_file_as_written_forms_a_mesh(net, tmp_path):
    compose = df.compose()
    _, stages = df.dockerfile_stages()
    image = stages[-1]
    entrypoint = df.exec_form(image.last("ENTRYPOINT"))
    services = compose["services"]
    names = list(services)
    _, hosts = net.lan(SUBNET, names)
    host = dict(zip(names, hosts))
    addresses = {name: h.ip for name, h in host.items()}
    for h in hosts:
        hosts_file(h.name, addresses)

    def paths(name: str) -> dict[str, str]:
        data = tmp_path / name
        data.mkdir(exist_ok=True)
        return {"/opt/meshollama/.venv/bin/": f"{df.VENV_BIN}/", "/opt/meshollama/healthcheck.py": str(df.HEALTHCHECK),
                "/var/lib/meshollama": str(data)}

    started: dict[str, tuple[list[str], dict[str, str]]] = {}

    async def healthy(name: str, *, ready: bool = False) -> bool:
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD", test
        argv = [df.translate(a, paths(name)) for a in test[1:]] + (["--ready"] if ready else [])
        r = await in_ns(net, host[name], argv, started[name][1])
        return r.returncode == 0

    with trio.fail_after(60):
        # the ollama service: the stand-in, on its own "container" at ollama:11434
        port_file = tmp_path / "ollama.port"
        await net.spawn(host["ollama"], [sys.executable, "-m", "tests.fakes.fake_ollama", "--host", "0.0.0.0",
                                         "--port", "11434", "--models", MODEL, "--name", "ollama",
                                         "--no-host-check", "--port-file", str(port_file)],
                        log=tmp_path / "ollama.log")
        while not port_file.exists():
            await trio.sleep(0.05)

        for name in [n for n in names if n.startswith("node")]:
            svc = services[name]
            for dep, how in (svc.get("depends_on") or {}).items() if isinstance(svc.get("depends_on"), dict) else ():
                if how.get("condition") == "service_healthy":
                    while not await healthy(dep):
                        await trio.sleep(0.2)
            argv, env = df.local_command(svc, image.env(), entrypoint, paths(name))
            started[name] = (argv, env)
            await net.spawn(host[name], argv, log=tmp_path / f"{name}.log", env=env)

        seen: list[str] = []  # the last observation, for the failure message

        async def all_see_each_other() -> bool:
            ids = {}
            for name in started:
                r = await in_ns(net, host[name], [sys.executable, "-c", (
                    "import json,urllib.request;"
                    "print(json.load(urllib.request.urlopen('http://127.0.0.1:11434/healthz',timeout=3))['peer_id'])")],
                    {})
                if r.returncode != 0:
                    seen[:] = [f"{name} /healthz: {r.stderr.decode()[-300:]}"]
                    return False
                ids[name] = r.stdout.decode().strip()
            for name in started:
                r = await in_ns(net, host[name], [sys.executable, "-c", (
                    "import json,urllib.request;"
                    "d=json.load(urllib.request.urlopen('http://127.0.0.1:11434/api/mesh/peers',timeout=3));"
                    "d=d['peers'] if isinstance(d,dict) else d;"
                    "print(' '.join(p['peer_id'] for p in d if p.get('state')=='alive'))")], {})
                if r.returncode != 0 or not set(ids.values()) <= set(r.stdout.decode().split()):
                    seen[:] = [f"{name} sees {r.stdout.decode().split()} of {ids} {r.stderr.decode()[-900:]}"]
                    return False
            return True

        try:
            while not await all_see_each_other():
                await trio.sleep(0.3)
            # every node is ready (joined, backend answering) by its own healthcheck script's --ready
            for name in started:
                while not await healthy(name, ready=True):
                    await trio.sleep(0.3)
            # a request to node3 reaches the Ollama behind node1, across the mesh, by the service names
            r = await in_ns(net, host["node3"], ["curl", "-sS", "-m", "20", "http://node3:11434/api/chat", "-d",
                                                 '{"model":"llama3","stream":false,'
                                                 '"messages":[{"role":"user","content":"hi"}]}'], {})
            assert r.returncode == 0, r.stderr.decode()
            assert "hello from ollama" in r.stdout.decode(), r.stdout.decode()
        except BaseException:
            print("last observation:", *seen)
            for name in started:
                log = (tmp_path / f"{name}.log").read_text(errors="replace")[-2500:]
                print(f"--- {name}: {' '.join(started[name][0])}\n{log}")
            raise
        finally:
            with trio.CancelScope(shield=True):  # also after fail_after fired
                for proc in net.procs:
                    await net.stop(proc, grace=5)
    # the joins went through the bootstrap URL, not by chance (mDNS is off in the file)
    for name in ("node2", "node3"):
        text = (tmp_path / f"{name}.log").read_text(errors="replace")
        assert "connected to bootstrap peer" in text, text[-2000:]

