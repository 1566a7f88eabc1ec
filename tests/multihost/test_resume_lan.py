"""Streams across LAN hosts when a holder goes away.

The host serving a stream dies (SIGKILL) or freezes (SIGSTOP) halfway through
the answer, and the client, on a third host's gateway, still gets one whole
answer, word for word, from both holders. Or the serving host is drained for
a restart (``meshollama drain`` run on it): its stream finishes there, the
gateway stops sending it new requests, and it exits 0."""

from __future__ import annotations

import json
import signal
import sys

import pytest
import trio

from tests.faults.fates import numbered_text
from tests.multihost.nodes import peers, start_fake, start_node, wait_for

pytestmark = pytest.mark.slow

WORDS = 60
TEXT = numbered_text(WORDS)
MODEL = "shared:latest"
BODY = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "count"}]}


async def _mesh(net, tmp_path, subnet: str):
    """A gateway host and two holders of MODEL (same text, 0.1 s a word);
    returns (gateway host, gateway node, {peer id: holder node}) once the
    gateway sees both serving."""
    _, (gwh, ah, bh) = net.lan(subnet, ["gw", "a", "b"])
    for host, name in ((ah, "a"), (bh, "b")):
        await start_fake(net, host, tmp_path, [MODEL], name, token_delay=0.1,
                         extra=("--text", TEXT, "--tokens", str(WORDS)))
    gw = await start_node(net, gwh, tmp_path, "gw", "--no-mdns", "--backend", "none")
    join = gw.join_line().split()[2:]
    a = await start_node(net, ah, tmp_path, "a", *join, "--no-mdns", "--backend", "ollama")
    b = await start_node(net, bh, tmp_path, "b", *join, "--no-mdns", "--backend", "ollama")
    nodes = {a.peer_id: a, b.peer_id: b}

    async def both_serve() -> bool:
        view = await peers(net, gwh)
        return all(view.get(p, {}).get("state") == "alive" and view[p].get("models") for p in nodes)

    await wait_for(both_serve)
    return gwh, gw, nodes


async def _stream_in_background(net, gwh, out_log):
    return await net.spawn(gwh, [sys.executable, "-m", "tests.multihost.client", "POST",
                                 "http://127.0.0.1:11434/api/chat", json.dumps(BODY)], log=out_log)


async def _serving(net, gwh, nodes):
    """The holder whose heartbeat says its one slot is taken."""

    async def busy():
        view = await peers(net, gwh)
        found = [p for p in nodes if view.get(p, {}).get("load", {}).get("in_flight")]
        return found[0] if found else None

    return nodes[await wait_for(busy)]


def _answer(out_log) -> list[dict]:
    out = json.loads(out_log.read_text())
    assert out["status"] == 200, out
    lines = [json.loads(line) for line in out["lines"]]
    assert "error" not in lines[-1], lines[-1]
    assert "".join(line["message"]["content"] for line in lines) == TEXT  # not a word twice, none missing
    assert lines[-1]["done"] is True and sum(1 for line in lines if line["done"]) == 1
    assert lines[-1]["eval_count"] == WORDS
    return lines


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
async def test_a_stream_survives_the_death_of_its_host(net, tmp_path, how):
    with trio.fail_after(180):
        gwh, _, nodes = await _mesh(net, tmp_path, "198.18.12")
        out_log = tmp_path / "client.out"
        client = await _stream_in_background(net, gwh, out_log)
        victim = await _serving(net, gwh, nodes)
        await trio.sleep(1.0)  # a second of tokens (10 of 60) reaches the client first
        victim.proc.send_signal(how)
        try:
            await client.wait()
        finally:
            if how == signal.SIGSTOP:
                victim.proc.send_signal(signal.SIGCONT)
            else:
                await victim.proc.wait()  # reaped here, in async context (the fixture's cleanup is sync)
        lines = _answer(out_log)
        survivor = (set(nodes) - {victim.peer_id}).pop()
        assert lines[-1]["meshollama"]["peers"] == [victim.peer_id, survivor]


async def test_a_drained_host_finishes_its_stream_takes_no_new_work_and_exits_0(net, tmp_path):
    with trio.fail_after(180):
        gwh, _, nodes = await _mesh(net, tmp_path, "198.18.13")
        out_log = tmp_path / "client.out"
        client = await _stream_in_background(net, gwh, out_log)
        drained = await _serving(net, gwh, nodes)
        r = await net.run(drained.host, [sys.executable, "-m", "meshollama", "drain", "--data-dir",
                                         str(drained.data_dir)], timeout=120)
        assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
        assert "drained: the node has stopped" in r.stdout.decode()
        assert await drained.proc.wait() == 0
        await client.wait()
        lines = _answer(out_log)
        assert "meshollama" not in lines[-1]  # finished where it started: the drain waited for it
        assert f"peer {drained.peer_id} left the mesh" in (tmp_path / "gw.log").read_text()
        # New work goes to the other holder.
        other = (set(nodes) - {drained.peer_id}).pop()
        client = await _stream_in_background(net, gwh, tmp_path / "after.out")
        await client.wait()
        after = json.loads((tmp_path / "after.out").read_text())
        assert after["status"] == 200 and after["headers"]["x-meshollama-peer"] == other, after
