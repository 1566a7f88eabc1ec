"""Mid-stream resume with the real embedded model: the serving node is killed
halfway through an answer, and the answer goes on, whole, on the other one."""

from __future__ import annotations

import json
import signal

import httpx
import pytest
import trio

from meshollama.backends.embedded import available, default_model_path

from .cluster import cluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.embedded,
    pytest.mark.skipif(not available() or default_model_path() is None,
                       reason="llama-cpp-python or the SmolLM2 model is not installed (run make install)"),
]

CHAT = {"model": "smollm2:135m", "stream": True,
        "options": {"temperature": 0, "seed": 1, "num_predict": 160},
        "messages": [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]}


async def test_a_killed_node_s_answer_is_finished_by_the_other_one(tmp_path):
    with trio.fail_after(300):
        async with cluster(tmp_path) as c:
            gw = await c.start("gw", "--backend", "none")
            a = await c.start("a", "--backend", "embedded", bootstrap=gw)
            b = await c.start("b", "--backend", "embedded", bootstrap=gw)
            ids = {a.peer_id: a, b.peer_id: b}

            async def both_serve() -> bool:
                view = await c.view(gw)
                return all(view.get(p, {}).get("state") == "alive" and view[p].get("models") for p in ids)

            while not await both_serve():
                await trio.sleep(0.2)
            async with httpx.AsyncClient(timeout=120) as client:
                # The answer nobody interrupts, for comparison (greedy decoding: the same on both nodes).
                r = await client.post(gw.api + "/api/chat", json=CHAT)
                reference = "".join(json.loads(x)["message"]["content"] for x in r.text.splitlines())
                assert len(reference.split()) > 40, reference

                parts: list[dict] = []
                async with client.stream("POST", gw.api + "/api/chat", json=CHAT) as resp:
                    victim = ids[resp.headers["x-meshollama-peer"]]
                    async for line in resp.aiter_lines():
                        if not line:
                            continue
                        parts.append(json.loads(line))
                        if len(parts) == 40:
                            c.signal(victim, signal.SIGKILL)  # halfway: the node dies, its stream with it
            text = "".join(p.get("message", {}).get("content", "") for p in parts)
            before = "".join(p["message"]["content"] for p in parts[:40])
            final = parts[-1]
            assert "error" not in final, final
            assert final["done"] is True and sum(1 for p in parts if p.get("done")) == 1
            survivor = (set(ids) - {victim.peer_id}).pop()
            assert final["meshollama"]["peers"] == [victim.peer_id, survivor]
            assert text.startswith(before) and len(text) > len(before)
            # Coherent: the continuation carries on the same text, not a new answer.
            assert text[: len(before) + 20] == reference[: len(before) + 20], (text, reference)
            assert final["eval_count"] >= len(parts) - 1
