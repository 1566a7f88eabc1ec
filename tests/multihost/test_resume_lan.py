"""Mid-stream resume across LAN hosts: the host serving a stream dies (SIGKILL)
or freezes (SIGSTOP) halfway through the answer, and the client, on a third
host's gateway, still gets one whole answer, word for word, from both."""

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


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
async def test_a_stream_survives_the_death_of_its_host(net, tmp_path, how):
    with trio.fail_after(180):
        _, (gwh, ah, bh) = net.lan("198.18.12", ["gw", "a", "b"])
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
        body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "count"}]}
        out_log = tmp_path / "client.out"
        client = await net.spawn(gwh, [sys.executable, "-m", "tests.multihost.client", "POST",
                                       "http://127.0.0.1:11434/api/chat", json.dumps(body)], log=out_log)

        async def serving():  # the holder whose heartbeat says its one slot is taken
            view = await peers(net, gwh)
            busy = [p for p in nodes if view.get(p, {}).get("load", {}).get("in_flight")]
            return busy[0] if busy else None

        victim = nodes[await wait_for(serving)]
        await trio.sleep(1.0)  # a second of tokens (10 of 60) reaches the client first
        victim.proc.send_signal(how)
        try:
            await client.wait()
        finally:
            if how == signal.SIGSTOP:
                victim.proc.send_signal(signal.SIGCONT)
            else:
                await victim.proc.wait()  # reaped here, in async context (the fixture's cleanup is sync)
        out = json.loads(out_log.read_text())
        assert out["status"] == 200, out
        lines = [json.loads(line) for line in out["lines"]]
        assert "error" not in lines[-1], lines[-1]
        text = "".join(line["message"]["content"] for line in lines)
        assert text == TEXT, text  # not a word twice, none missing
        assert lines[-1]["done"] is True and sum(1 for line in lines if line["done"]) == 1
        survivor = (set(nodes) - {victim.peer_id}).pop()
        assert lines[-1]["meshollama"]["peers"] == [victim.peer_id, survivor]
        assert lines[-1]["eval_count"] == WORDS
