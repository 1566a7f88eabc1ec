"""Two homes behind two NAT routers (nftables masquerade) and a public host:
``inet`` 198.18.100.0/24 with the public host at .1, routers at .11/.12,
homes 198.18.1.10 and 198.18.2.10. Nothing outside can dial a home."""

from __future__ import annotations

import json

import pytest
import trio

from tests.multihost.nodes import http, peers, start_fake, start_node, wait_for

pytestmark = pytest.mark.slow  # real processes on several namespace hosts


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
        assert r["status"] == 503 and "error" in json.loads(r["lines"][0]), r
        assert n1.peer_id  # and nothing hung: both answered within the deadline


async def _relayed_mesh(net, tmp_path, *, firewall: bool):
    bridge, (public,) = net.lan("198.18.100", ["relay"], name="inet")
    home1 = net.nat(bridge, "198.18.100.11", "198.18.1", "home1", index=1, firewall=firewall)
    home2 = net.nat(bridge, "198.18.100.12", "198.18.2", "home2", index=2, firewall=firewall)
    await start_fake(net, home1, tmp_path, ["alpha:latest", "common:latest"], "home1")
    await start_fake(net, home2, tmp_path, ["gamma:latest", "common:latest"], "home2")
    relay = await start_node(net, public, tmp_path, "relay", "--no-mdns", "--backend", "none", "--relay-service")
    join = relay.join_line().split()[2:]
    n1 = await start_node(net, home1, tmp_path, "home1", *join, "--no-mdns", "--backend", "ollama")
    n2 = await start_node(net, home2, tmp_path, "home2", *join, "--no-mdns", "--backend", "ollama")

    async def both_alive_with_circuits():
        v1, v2 = await peers(net, home1), await peers(net, home2)
        return (v1.get(n2.peer_id, {}).get("state") == "alive" and v2.get(n1.peer_id, {}).get("state") == "alive"
                and any("/p2p-circuit/" in a for a in v1[n2.peer_id]["addrs"]))

    await wait_for(both_alive_with_circuits)
    return relay, (home1, n1), (home2, n2)


async def _ask(net, host, model, *, stream):
    return await http(net, host, "POST", "/api/generate", {"model": model, "prompt": "hi", "stream": stream},
                      timeout=40)


async def test_homes_behind_two_nats_answer_each_others_models_through_a_relay(nat_net, tmp_path):
    net = nat_net
    with trio.fail_after(150):
        relay, (home1, n1), (home2, n2) = await _relayed_mesh(net, tmp_path, firewall=False)
        # Each home learned that it is behind NAT and advertises a circuit address through the relay.
        view = await peers(net, home1)
        assert any(a.startswith(f"/ip4/198.18.100.1/tcp/4001/p2p/{relay.peer_id}/p2p-circuit/p2p/{n2.peer_id}")
                   for a in view[n2.peer_id]["addrs"]), view[n2.peer_id]
        for stream in (False, True):
            r = await _ask(net, home1, "gamma", stream=stream)
            assert r["status"] == 200 and r["headers"]["x-meshollama-peer"] == n2.peer_id, r
            chunks = [json.loads(line) for line in r["lines"]]
            assert chunks[-1]["done"] is True and "hello from home2" in "".join(c["response"] for c in chunks)
            r = await _ask(net, home2, "alpha", stream=stream)
            assert r["status"] == 200 and r["headers"]["x-meshollama-peer"] == n1.peer_id, r

        # Plain masquerade answers punch SYNs with resets: no direct path, so
        # with the relay gone a request for gamma (home2 only) ends with an
        # explicit error, and one for common stays at home.
        await net.stop(relay.proc)
        r = await _ask(net, home1, "gamma", stream=False)
        assert r["status"] == 503 and "error" in json.loads(r["lines"][0]), r
        r = await _ask(net, home1, "common", stream=False)
        assert r["status"] == 200 and r["headers"]["x-meshollama-peer"] == n1.peer_id, r


async def test_a_hole_punched_connection_outlives_the_relay(nat_net, tmp_path):
    """After DCUtR, py-libp2p 0.8.1 kept each home's pubsub stream on the relayed
    connection; when the relay went, the peer stayed (a direct connection remained)
    and its stream stayed dead, so heartbeats from home2 never reached home1 until a
    write failed and lost its message (4 of 10 runs failed here).
    ``p2p.safe_pubsub`` reopens the stream on the live
    connection (12 of 12)."""
    net = nat_net
    with trio.fail_after(180):
        relay, (home1, n1), (home2, n2) = await _relayed_mesh(net, tmp_path, firewall=True)

        async def direct():  # DCUtR moved home1<->home2 off the relay
            r = await net.run(home1, ["ss", "-tnH", "state", "established", "dst", "198.18.100.12"])
            return r.stdout.strip()

        await wait_for(direct, step=0.5)
        await net.stop(relay.proc)

        # The mesh must keep hearing home2 over the direct connection (a heartbeat
        # newer than the relay's end), not only answer before it expires.
        stopped = trio.current_time()

        async def heard_directly():  # a heartbeat from home2 newer than the relay's end, and alive
            view = (await peers(net, home1)).get(n2.peer_id, {})
            age = view.get("seconds_since_heartbeat")
            return view.get("state") == "alive" and age is not None and age < trio.current_time() - stopped - 0.5

        # Idle, home2 says nothing new until its next refresh (p2p.refresh_interval,
        # 30 s with two peers, up to 10 % early): wait for it, and a little more.
        with trio.fail_after(45):
            await wait_for(heard_directly)
        for stream in (False, True):
            r = await _ask(net, home1, "gamma", stream=stream)
            assert r["status"] == 200 and r["headers"]["x-meshollama-peer"] == n2.peer_id, r
