"""Three machines on one LAN (namespaces on a bridge, 198.18.7.1-3, MTU 1500),
each running ``meshollama start`` as a user would: default ports, a stand-in
Ollama on 127.0.0.1:11435 with a model only that machine has."""

from __future__ import annotations

import json

import pytest
import trio

from meshollama.backends.embedded import available, default_model_path
from tests.multihost.nodes import BAD_LOG, http, peers, start_fake, start_node, wait_for

pytestmark = pytest.mark.slow  # real processes on several namespace hosts

MODELS = {"h1": "alpha:latest", "h2": "beta:latest", "h3": "gamma:latest"}


async def _lan(net, tmp_path):
    # fd00:7::/64 is a ULA prefix: like 198.18/15, it never leaves this machine.
    _, hosts = net.lan("198.18.7", ["h1", "h2", "h3"], ip6="fd00:7")
    for host, (name, model) in zip(hosts, MODELS.items()):
        await start_fake(net, host, tmp_path, [model], name)
    return hosts


async def _all_see_all(net, hosts, ids, *, state="alive"):
    async def ok():
        for h in hosts:
            view = await peers(net, h)
            if any(view.get(pid, {}).get("state") != state for pid in ids):
                return False
        return True

    await wait_for(ok)


async def test_three_lan_hosts_join_with_the_printed_line_and_route_across(net, tmp_path):
    with trio.fail_after(150):
        hosts = await _lan(net, tmp_path)
        h1 = await start_node(net, hosts[0], tmp_path, "h1", "--no-mdns", "--backend", "ollama")
        line = h1.join_line()
        # The printed address is h1's LAN address, not loopback.
        assert "/ip4/198.18.7.1/tcp/4001/p2p/" + h1.peer_id in line, line
        assert h1.info["p2p_addrs"][0].startswith("/ip4/198.18.7.1/"), h1.info
        assert f"/ip6/fd00:7::1/tcp/4001/p2p/{h1.peer_id}" in h1.info["p2p_addrs"], h1.info  # IPv6 too
        assert not any("/127." in a or "/0.0.0.0/" in a or "/::1/" in a or "fe80" in a for a in h1.info["p2p_addrs"])
        args = line.split()[2:]  # exactly what was printed, after "meshollama start"
        h2 = await start_node(net, hosts[1], tmp_path, "h2", *args, "--no-mdns", "--backend", "ollama")
        h3 = await start_node(net, hosts[2], tmp_path, "h3", *args, "--no-mdns", "--backend", "ollama")
        nodes = [h1, h2, h3]
        await _all_see_all(net, hosts, [n.peer_id for n in nodes])

        # gamma lives on h3 only; h2 asks its own gateway.
        async def gamma_routable():
            view = await peers(net, hosts[1])
            return any(m["name"].startswith("gamma") for m in view[h3.peer_id]["models"])

        await wait_for(gamma_routable)
        r = await http(net, hosts[1], "POST", "/api/chat",
                       {"model": "gamma", "messages": [{"role": "user", "content": "hi"}], "stream": False})
        assert r["status"] == 200, r
        assert r["headers"]["x-meshollama-peer"] == h3.peer_id
        assert "hello from h3" in json.loads(r["lines"][0])["message"]["content"]

        r = await http(net, hosts[1], "POST", "/api/generate", {"model": "gamma", "prompt": "hi"})
        assert r["status"] == 200, r
        assert r["headers"]["x-meshollama-peer"] == h3.peer_id
        chunks = [json.loads(line) for line in r["lines"]]
        assert len(chunks) > 2 and chunks[-1]["done"] is True and not any(c.get("done") for c in chunks[:-1])

        # What h2 knows of h3: its LAN address only, nothing loopback.
        view = await peers(net, hosts[1])
        assert sorted(view[h3.peer_id]["addrs"]) == sorted(
            [f"/ip4/198.18.7.3/tcp/4001/p2p/{h3.peer_id}", f"/ip6/fd00:7::3/tcp/4001/p2p/{h3.peer_id}"])

        # A healthy run: nobody dialled a wrong address (itself, another host's loopback).
        for n in nodes:
            bad = [line for line in n.text().splitlines() if BAD_LOG.search(line)]
            assert not bad, f"{n.name}: " + "\n".join(bad[:5])


async def test_three_lan_hosts_find_each_other_by_mdns_alone(net, tmp_path):
    with trio.fail_after(120):
        hosts = await _lan(net, tmp_path)
        nodes = [await start_node(net, h, tmp_path, name, "--backend", "ollama")
                 for h, name in zip(hosts, MODELS)]
        await _all_see_all(net, hosts, [n.peer_id for n in nodes])
        for h in hosts:
            view = await peers(net, h)
            for n, other in zip(nodes, hosts):
                assert view[n.peer_id]["addrs"][0].startswith(f"/ip4/{other.ip}/tcp/4001/"), view[n.peer_id]
        r = await http(net, hosts[0], "POST", "/api/generate", {"model": "gamma", "prompt": "hi", "stream": False})
        assert r["status"] == 200 and r["headers"]["x-meshollama-peer"] == nodes[2].peer_id, r


async def test_a_host_joins_and_routes_over_ipv6(net, tmp_path):
    with trio.fail_after(90):
        hosts = await _lan(net, tmp_path)
        h1 = await start_node(net, hosts[0], tmp_path, "h1", "--no-mdns", "--backend", "ollama")
        v6 = next(a for a in h1.info["p2p_addrs"] if a.startswith("/ip6/fd00:7::1/"))
        await start_node(net, hosts[1], tmp_path, "h2", "--no-mdns", "--backend", "ollama", "--bootstrap", v6)

        async def alpha_seen():
            return h1.peer_id in await peers(net, hosts[1])

        await wait_for(alpha_seen)
        r = await http(net, hosts[1], "POST", "/api/generate", {"model": "alpha", "prompt": "hi", "stream": False})
        assert r["status"] == 200 and r["headers"]["x-meshollama-peer"] == h1.peer_id, r


@pytest.mark.embedded
@pytest.mark.skipif(not available() or default_model_path() is None,
                    reason="llama-cpp-python or the SmolLM2 model is not installed (run make install)")
async def test_the_real_embedded_model_answers_across_hosts(net, tmp_path):
    """SmolLM2 on one machine, a pure gateway on another: a real generation
    crosses the LAN, streamed, through the printed join line."""
    with trio.fail_after(150):
        _, hosts = net.lan("198.18.9", ["m1", "m2"])
        m1 = await start_node(net, hosts[0], tmp_path, "m1", "--no-mdns", "--backend", "embedded")
        await start_node(net, hosts[1], tmp_path, "m2", *m1.join_line().split()[2:], "--no-mdns", "--backend", "none")

        async def smollm_routable():
            return m1.peer_id in await peers(net, hosts[1])

        await wait_for(smollm_routable)
        r = await http(net, hosts[1], "POST", "/api/chat", {
            "model": "smollm2:135m", "messages": [{"role": "user", "content": "Say hello."}],
            "options": {"num_predict": 8, "temperature": 0}}, timeout=120)
        assert r["status"] == 200 and r["headers"]["x-meshollama-peer"] == m1.peer_id, r
        chunks = [json.loads(line) for line in r["lines"]]
        assert chunks[-1]["done"] is True and chunks[-1]["eval_count"] >= 1
        assert "".join(c["message"]["content"] for c in chunks).strip()
        # what Open WebUI sends (tools) and the Anthropic and Responses APIs cross the LAN too
        weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}}}}
        r = await http(net, hosts[1], "POST", "/api/chat", {
            "model": "smollm2:135m", "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [weather], "stream": False, "options": {"num_predict": 8, "temperature": 0}}, timeout=120)
        assert r["status"] == 200 and json.loads(r["lines"][0])["done"] is True, r
        r = await http(net, hosts[1], "POST", "/v1/messages", {
            "model": "smollm2:135m", "max_tokens": 8, "stream": True,
            "messages": [{"role": "user", "content": "Say hello."}]}, timeout=120)
        assert r["status"] == 200 and r["headers"]["x-meshollama-peer"] == m1.peer_id, r
        assert r["lines"][0] == "event: message_start" and r["lines"][-1].startswith("data: {\"type\":\"message_stop\"")
        r = await http(net, hosts[1], "POST", "/v1/responses", {
            "model": "smollm2:135m", "input": "Say hello.", "max_output_tokens": 8}, timeout=120)
        assert r["status"] == 200 and json.loads(r["lines"][0])["object"] == "response", r
