"""A closed mesh across four LAN hosts, set up as docs/security.md tells a user to.

h1 holds the mesh authority (``meshollama mesh init``); h2 and h3 start with
``--authority`` and are let in by ``meshollama admit`` on h1; h4 is a stranger
on the same LAN who dials in with the printed join line. Then h3 goes down,
h2 is revoked, and h3 comes back: it must learn the revocation from its
first contact and refuse h2 too.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
import trio

from tests.multihost.nodes import http, peers, start_fake, start_node, wait_for

pytestmark = pytest.mark.slow

MODELS = {"h1": "alpha:latest", "h2": "beta:latest", "h3": "gamma:latest", "h4": "delta:latest"}


async def cli(net, host, *args: str) -> str:
    r = await net.run(host, [sys.executable, "-m", "meshollama", *args], timeout=30)
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0, f"meshollama {' '.join(args)}: {out}{r.stderr.decode(errors='replace')}"
    return out


async def status(net, host) -> dict:
    r = await http(net, host, "GET", "/api/mesh/status", timeout=20)
    return json.loads("".join(r["lines"]))


async def alive(net, host) -> set[str]:
    return {pid for pid, p in (await peers(net, host)).items() if p.get("state") == "alive" and not p.get("is_self")}


async def test_a_closed_mesh_admits_refuses_revokes_and_catches_up(net, tmp_path):
    with trio.fail_after(240):
        _, hosts = net.lan("198.18.9", ["h1", "h2", "h3", "h4"])
        h1h, h2h, h3h, h4h = hosts
        for host, (name, model) in zip(hosts, MODELS.items()):
            await start_fake(net, host, tmp_path, [model], name)

        out = await cli(net, h1h, "mesh", "init", "--data-dir", str(tmp_path / "h1"))
        authority = re.search(r"mesh authority: (ed25519:\S+)", out).group(1)
        ids = {}
        for name, host in (("h2", h2h), ("h3", h3h)):
            ids[name] = json.loads(await cli(net, host, "id", "--json", "--data-dir", str(tmp_path / name)))["peer_id"]

        h1 = await start_node(net, h1h, tmp_path, "h1", "--no-mdns", "--backend", "ollama")
        join = h1.join_line().split()[2:]
        closed = ["--authority", authority, *join, "--no-mdns", "--backend", "ollama"]
        h2 = await start_node(net, h2h, tmp_path, "h2", *closed)
        h3 = await start_node(net, h3h, tmp_path, "h3", *closed)
        h4 = await start_node(net, h4h, tmp_path, "h4", *join, "--no-mdns", "--backend", "ollama")  # a stranger

        # Not admitted yet: h1 refuses both, and lists neither.
        async def both_refused():
            return all(f"peer {ids[n]} not admitted" in h1.text() for n in ("h2", "h3"))

        await wait_for(both_refused)
        assert not await alive(net, h1h)

        for name in ("h2", "h3"):
            await cli(net, h1h, "admit", ids[name], "--data-dir", str(tmp_path / "h1"))
        members = {h1.peer_id, h2.peer_id, h3.peer_id}

        async def all_in():
            for host, node in ((h1h, h1), (h2h, h2), (h3h, h3)):
                if await alive(net, host) != members - {node.peer_id}:
                    return False
            return True

        await wait_for(all_in)
        r = await http(net, h2h, "POST", "/api/chat",
                       {"model": "gamma", "messages": [{"role": "user", "content": "hi"}], "stream": False})
        assert r["status"] == 200 and r["headers"]["x-meshollama-peer"] == h3.peer_id, r

        # The stranger got nothing: no member lists it, it sees no member's model,
        # and nothing it asks reaches a member.
        assert h4.peer_id not in await alive(net, h1h)
        assert not await alive(net, h4h)
        r = await http(net, h4h, "POST", "/api/chat",
                       {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "stream": False})
        assert r["status"] == 404, r

        # h3 goes down; h2 is revoked while it is away.
        await net.stop(h3.proc)
        await cli(net, h1h, "revoke", h2.peer_id, "--data-dir", str(tmp_path / "h1"))
        cut = trio.current_time()
        await wait_for(lambda: _gone(net, h1h, h2h, h1, h2))
        assert trio.current_time() - cut < 5, "a revoked peer must be cut off within 5 s"
        version = (await status(net, h1h))["mesh"]["admission"]["policy_version"]

        # h3 comes back with its old policy; h2 still knows its address and dials it.
        h3 = await start_node(net, h3h, tmp_path, "h3", *closed)
        back = trio.current_time()

        async def caught_up():
            st = (await status(net, h3h))["mesh"]["admission"]
            return st["policy_version"] == version and h2.peer_id not in await alive(net, h3h) \
                and h1.peer_id in await alive(net, h3h)

        await wait_for(caught_up)
        assert trio.current_time() - back < 10
        assert h2.peer_id not in await alive(net, h3h)


async def _gone(net, h1h, h2h, h1, h2) -> bool:
    return h2.peer_id not in await alive(net, h1h) and h1.peer_id not in await alive(net, h2h)
