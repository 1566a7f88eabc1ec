"""Bootstrap by API URL across hosts: the way containers and StatefulSet pods
join, knowing a name and a port but no peer id. Host b starts with
``--bootstrap http://<a's LAN address>:11434`` and nothing else; host c is
given a *name* for a, resolved through c's own /etc/hosts (what a container's
DNS does); ``/readyz`` on b turns 200 once it has joined."""

from __future__ import annotations

import json

import pytest
import trio

from tests.multihost.nodes import http, peers, start_fake, start_node, wait_for

pytestmark = pytest.mark.slow


async def test_nodes_join_by_api_url_and_name(net, tmp_path):
    with trio.fail_after(120):
        _, (ah, bh, ch) = net.lan("198.18.44", ["a", "b", "c"])
        for host, name in ((ah, "a"), (bh, "b"), (ch, "c")):
            await start_fake(net, host, tmp_path, [f"m-{name}:1b"], name)
        a = await start_node(net, ah, tmp_path, "a", "--no-mdns", "--backend", "ollama",
                             "--api-listen", "0.0.0.0:11434")
        b = await start_node(net, bh, tmp_path, "b", "--no-mdns", "--backend", "ollama",
                             "--bootstrap", f"http://{ah.ip}:11434")
        # c knows a only by name, as a container knows "node1".
        net.hosts_file(ch, {"node-a.mesh": ah.ip})
        c = await start_node(net, ch, tmp_path, "c", "--no-mdns", "--backend", "ollama",
                             "--bootstrap", "http://node-a.mesh:11434")

        async def all_see_all() -> bool:
            for host, others in ((ah, (b, c)), (bh, (a, c)), (ch, (a, b))):
                view = await peers(net, host)
                if not all(view.get(o.peer_id, {}).get("state") == "alive" for o in others):
                    return False
            return True

        await wait_for(all_see_all)

        async def b_ready() -> bool:
            return (await http(net, bh, "GET", "/readyz", timeout=20)).get("status") == 200

        await wait_for(b_ready)
        ready = await http(net, bh, "GET", "/readyz", timeout=20)
        report = json.loads("".join(ready["lines"]))
        assert report["ready"] is True and report["checks"]["mesh"]["ok"], report
        # The address a announced that b dialled is a's LAN address, never loopback.
        health = json.loads("".join((await http(net, ah, "GET", "/healthz", timeout=20))["lines"]))
        assert health["peer_id"] == a.peer_id
        assert any(ah.ip in addr for addr in health["p2p_addrs"]), health
