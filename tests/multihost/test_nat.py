"""Two homes behind two NAT routers (nftables masquerade) and a public host:
``inet`` 198.18.100.0/24 with the public host at .1, routers at .11/.12,
homes 198.18.1.10 and 198.18.2.10. Nothing outside can dial a home."""

from __future__ import annotations

import json

import trio

from tests.multihost.nodes import http, peers, start_fake, start_node, wait_for


async def homes(net, tmp_path, *, public_models=("beta:latest", "common:latest")):
    bridge, (public,) = net.lan("198.18.100", ["pub"], name="inet")
    home1 = net.nat(bridge, "198.18.100.11", "198.18.1", "home1", index=1)
    home2 = net.nat(bridge, "198.18.100.12", "198.18.2", "home2", index=2)
    await start_fake(net, public, tmp_path, list(public_models), "pub")
    await start_fake(net, home1, tmp_path, ["alpha:latest"], "home1")
    await start_fake(net, home2, tmp_path, ["gamma:latest", "common:latest"], "home2")
    return public, home1, home2


async def test_without_a_relay_a_peer_behind_nat_is_unreachable_and_requests_fail_over_or_fail_clearly(
        nat_net, tmp_path):
    net = nat_net
    with trio.fail_after(120):
        public, home1, home2 = await homes(net, tmp_path)
        pub = await start_node(net, public, tmp_path, "pub", "--no-mdns", "--backend", "ollama")
        join = pub.join_line().split()[2:]
        n1 = await start_node(net, home1, tmp_path, "home1", *join, "--no-mdns", "--backend", "ollama")
        n2 = await start_node(net, home2, tmp_path, "home2", *join, "--no-mdns", "--backend", "ollama")

        async def home2_unreachable_from_home1():
            view = await peers(net, home1)
            return view.get(n2.peer_id, {}).get("state") == "unreachable" and view.get(pub.peer_id, {}).get(
                "state") == "alive"

        await wait_for(home2_unreachable_from_home1)
        # home2's models are known (gossip through pub) but not routed to.
        r = await http(net, home1, "POST", "/api/generate", {"model": "common", "prompt": "hi", "stream": False},
                       timeout=40)
        assert r["status"] == 200 and r["headers"]["x-meshollama-peer"] == pub.peer_id, r
        r = await http(net, home1, "POST", "/api/generate", {"model": "gamma", "prompt": "hi", "stream": False},
                       timeout=40)
        assert r["status"] in (502, 503) and "error" in json.loads(r["lines"][0]), r
        assert n1.peer_id  # and nothing hung: both answered within the deadline
