"""Announcing less, across hosts (issue 13): four namespace hosts on one LAN,
default cadence (a 30 s refresh), so nothing here can pass by waiting for the
next periodic announcement.

* A node joining through one peer learns every other node at once by pulling
  that peer's signed table (``mesh.sync``), and everyone learns it from its
  one announcement, long before any refresh.
* An idle mesh stays quiet: over a window much shorter than the refresh no
  node announces anything.
* A model appearing on one host is announced at once and routed to.
"""

from __future__ import annotations

import json

import pytest
import trio

from meshollama.mesh import load_client
from tests.multihost.nodes import http, peers, start_fake, start_node, wait_for

pytestmark = pytest.mark.slow  # real processes on several namespace hosts


async def _status(net, host) -> dict:
    out = await http(net, host, "GET", "/api/mesh/status", timeout=20)
    return json.loads("".join(out["lines"]))["mesh"]


async def test_a_joiner_learns_the_mesh_from_one_peer_and_an_idle_mesh_is_quiet(net, tmp_path):
    with trio.fail_after(150):
        _, hosts = net.lan("198.18.13", ["q1", "q2", "q3", "q4"])
        await start_fake(net, hosts[3], tmp_path, ["delta:latest"], "q4")
        q1 = await start_node(net, hosts[0], tmp_path, "q1", "--no-mdns", "--backend", "none",
                              "--refresh-interval", "30")
        boot = ["--bootstrap", q1.info["p2p_addrs"][0]]
        q2 = await start_node(net, hosts[1], tmp_path, "q2", "--no-mdns", "--backend", "none", *boot,
                              "--refresh-interval", "30")
        q3 = await start_node(net, hosts[2], tmp_path, "q3", "--no-mdns", "--backend", "none", *boot,
                              "--refresh-interval", "30")
        ids = [q1.peer_id, q2.peer_id, q3.peer_id]

        async def all_see(hs, wanted):
            for h in hs:
                view = await peers(net, h)
                if any(view.get(pid, {}).get("state") != "alive" for pid in wanted):
                    return False
            return True

        started = trio.current_time()
        await wait_for(lambda: all_see(hosts[:3], ids))
        assert trio.current_time() - started < 20  # not a 30 s refresh

        # q4 joins through q3 only: it pulls q3's table (q1 and q2 in it) and announces itself once.
        q4 = await start_node(net, hosts[3], tmp_path, "q4", "--no-mdns", "--backend", "ollama",
                              "--bootstrap", q3.info["p2p_addrs"][0], "--refresh-interval", "30")
        joined = trio.current_time()
        await wait_for(lambda: all_see(hosts, [*ids, q4.peer_id]))
        assert trio.current_time() - joined < 20
        s4 = await _status(net, hosts[3])
        assert s4["synced"].get("pulled", 0) >= 1, s4
        assert s4["refresh_interval"] == 30.0

        # Everyone knows delta lives on q4 and routes to it, from q1, which never talked to q4 directly first.
        r = await http(net, hosts[0], "POST", "/api/chat",
                       {"model": "delta", "messages": [{"role": "user", "content": "hi"}], "stream": False})
        assert r["status"] == 200, r
        assert r["headers"]["x-meshollama-peer"] == q4.peer_id

        # Idle now: over 8 s (well inside the 30 s refresh, and far more than the old 0.5 s
        # cadence's 16 beats) the three idle gateways announce nothing.
        before = [await _status(net, h) for h in hosts[:3]]
        await trio.sleep(8)
        after = [await _status(net, h) for h in hosts[:3]]
        sent = [sum(a["announced"].values()) - sum(b["announced"].values()) for a, b in zip(after, before)]
        assert max(sent) <= 2, (sent, after)  # a refresh, or a load change the chat left, at most
        assert all(a["heartbeats_sent"] == sum(a["announced"].values()) for a in after)


@pytest.mark.parametrize("gateway_large", [True, False], ids=["all-large", "holders-large"])
async def test_past_full_view_a_gateway_asks_holders_for_their_load_over_the_lan(net, tmp_path, gateway_large):
    """``p2p.full_view_up_to`` 0 makes three hosts a "large" mesh: holders do not announce
    load changes, and the gateway asks them over ``/meshollama/load/1`` as it routes.
    Tables differ: a gateway that is not "large" itself asks holders that say they are (``lq``)."""
    with trio.fail_after(150):
        _, hosts = net.lan("198.18.14" if gateway_large else "198.18.16", ["g", "a", "b"])
        large = {"MESHOLLAMA_P2P_FULL_VIEW_UP_TO": "0"}
        for host, name in zip(hosts[1:], ["a", "b"]):
            await start_fake(net, host, tmp_path, ["echo:latest"], name, token_delay=0.05)
        g = await start_node(net, hosts[0], tmp_path, "g", "--no-mdns", "--backend", "none",
                             env=large if gateway_large else None)
        boot = ["--bootstrap", g.info["p2p_addrs"][0]]
        a = await start_node(net, hosts[1], tmp_path, "a", "--no-mdns", "--backend", "ollama", *boot, env=large)
        b = await start_node(net, hosts[2], tmp_path, "b", "--no-mdns", "--backend", "ollama", *boot, env=large)

        async def both_hold():
            view = await peers(net, hosts[0])
            return all(any(m["name"].startswith("echo") for m in view.get(n.peer_id, {}).get("models", []))
                       for n in (a, b))

        await wait_for(both_hold)
        served = []
        for _ in range(6):
            r = await http(net, hosts[0], "POST", "/api/chat",
                           {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "stream": False})
            assert r["status"] == 200, r
            served.append(r["headers"]["x-meshollama-peer"])
            await trio.sleep(load_client.FRESH)  # answers are reused for a second: ask again
        assert set(served) <= {a.peer_id, b.peer_id}
        sg = await _status(net, hosts[0])
        assert sg["load_sampling"] is gateway_large and sg["load_queries"].get("answered", 0) >= 2, sg
        answered = [(await _status(net, h))["load_queries"].get("served_answered", 0) for h in hosts[1:]]
        assert sum(answered) >= 2, answered
        for h in hosts[1:]:  # load changes are not announced in a large mesh
            assert "load" not in (await _status(net, h))["announced"]


async def test_a_model_no_announcement_carries_is_found_through_the_dht_across_hosts(net, tmp_path):
    """A holder with more models than one announcement carries (``announce.fit``): the
    gateway on another host finds the ones left out through DHT provider records, asks
    the holder over ``/meshollama/holds/1`` and routes to it."""
    with trio.fail_after(180):
        _, hosts = net.lan("198.18.15", ["g", "a", "b"])
        many = [f"m{i:03d}:latest" for i in range(270)]
        await start_fake(net, hosts[1], tmp_path, many, "a")
        b = await start_node(net, hosts[2], tmp_path, "b", "--no-mdns", "--backend", "none")
        boot = ["--bootstrap", b.info["p2p_addrs"][0]]
        a = await start_node(net, hosts[1], tmp_path, "a", "--no-mdns", "--backend", "ollama", *boot)
        await start_node(net, hosts[0], tmp_path, "g", "--no-mdns", "--backend", "none", *boot)

        async def g_heard_a():
            entry = (await peers(net, hosts[0])).get(a.peer_id, {})
            return entry.get("state") == "alive" and len(entry.get("models", [])) >= 200 and entry

        entry = await wait_for(g_heard_a)
        assert entry["more_models"] is True
        hidden = sorted(set(many) - {m["name"] for m in entry["models"]})
        assert hidden, "every model fit in one announcement"

        async def a_provided_the_hidden():  # paced (mesh.providing.Pace); the left-out ones first
            return ((await _status(net, hosts[1]))["dht_models"] or {}).get("provided", 0) >= len(hidden)

        await wait_for(a_provided_the_hidden)
        r = await http(net, hosts[0], "POST", "/api/chat",
                       {"model": hidden[0], "messages": [{"role": "user", "content": "hi"}], "stream": False})
        assert r["status"] == 200, r
        assert r["headers"]["x-meshollama-peer"] == a.peer_id
        sg = await _status(net, hosts[0])
        assert sg["holder_lookups"].get("found", 0) >= 1 and sg["holder_lookups"].get("lookup", 0) >= 1, sg
        assert (await _status(net, hosts[1]))["load_queries"].get("served_answered", 0) >= 1
