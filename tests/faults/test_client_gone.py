"""A client that leaves mid-stream cancels the work on the serving peer.

Real ``meshollama start`` processes on loopback: A is a gateway only, B serves
the model from a slow stand-in Ollama. A client streams through A, reads the
first chunks and hangs up; B's Ollama must see its client (B's backend) go
away long before the answer would have ended.
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import trio

from tests.fakes.fake_ollama import serve_fake
from tests.integration.cluster import cluster

pytestmark = pytest.mark.slow

MODEL = "slowpoke:latest"
TOKENS = 200
TOKEN_DELAY = 0.2  # the whole answer takes 40 s
CANCEL_WITHIN = 5.0  # seconds from the hang-up to B's Ollama seeing it

PAYLOADS = {
    "/api/chat": {"model": MODEL, "messages": [{"role": "user", "content": "talk"}], "stream": True},
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "talk"}], "stream": True},
}


async def test_a_client_leaving_mid_stream_cancels_the_remote_work(tmp_path):
    with trio.fail_after(90):
        async with trio.open_nursery() as fn, cluster(tmp_path) as c:
            try:
                fb = await fn.start(partial(serve_fake, [MODEL], name="B", token_delay=TOKEN_DELAY, tokens=TOKENS))
                a = await c.start("a", "--backend", "none")
                b = await c.start("b", "--backend", "ollama", "--ollama-url", fb.url, bootstrap=a)

                async def a_knows_the_model():
                    r = await c.client.get(a.api + "/api/tags")
                    return r.status_code == 200 and MODEL in {m["name"] for m in r.json()["models"]}

                with trio.fail_after(20):
                    await c.wait_until(a_knows_the_model)

                for path, payload in PAYLOADS.items():
                    before = fb.aborted
                    chunks = 0
                    async with c.client.stream("POST", a.api + path, content=json.dumps(payload)) as r:
                        assert r.status_code == 200, (path, await r.aread())
                        assert r.headers.get("x-meshollama-peer") == b.peer_id  # served across the mesh
                        async for line in r.aiter_lines():
                            chunks += bool(line.strip())
                            if chunks == 2:
                                break
                    # the response is closed unread: the connection to A is gone
                    assert chunks == 2, path
                    left = trio.current_time()
                    with trio.fail_after(CANCEL_WITHIN):
                        await fb.wait_for(lambda before=before: fb.aborted > before)
                    record = next(x for x in reversed(fb.requests) if x.path == path)
                    assert record.outcome == "aborted", (path, record.outcome)
                    assert trio.current_time() - left < TOKENS * TOKEN_DELAY / 4
                    with trio.fail_after(CANCEL_WITHIN):
                        await fb.wait_for(lambda: fb.active == 0)
            finally:
                fn.cancel_scope.cancel()
