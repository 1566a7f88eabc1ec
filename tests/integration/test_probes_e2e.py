"""Real nodes: ``/readyz`` follows the backend, and a node joins by API URL
(``--bootstrap http://HOST:PORT``) on loopback; the multi-host version of the
join is tests/multihost/test_bootstrap_url.py."""

from __future__ import annotations

import socket
from functools import partial

import httpx
import pytest
import trio

from tests.fakes.fake_ollama import serve_fake

from .cluster import cluster

pytestmark = pytest.mark.slow


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


async def test_readyz_follows_the_backend_and_a_node_joins_by_api_url(tmp_path):
    with trio.fail_after(60):
        async with trio.open_nursery() as fn, cluster(tmp_path) as c:
            fake = await fn.start(partial(serve_fake, ["m:1b"], name="a"))
            a = await c.start("a", "--backend", "ollama", "--ollama-url", fake.url)
            b = await c.start("b", "--backend", "ollama", "--ollama-url", f"http://127.0.0.1:{_dead_port()}",
                              "--bootstrap", a.api)
            async with httpx.AsyncClient(timeout=5) as client:
                async def ready(node) -> httpx.Response:
                    return await client.get(f"{node.api}/readyz")

                async def a_ready() -> bool:
                    return (await ready(a)).status_code == 200

                await c.wait_until(a_ready)

                async def b_joined() -> bool:
                    report = (await ready(b)).json()
                    return report["checks"]["mesh"]["ok"]

                await c.wait_until(b_joined)
                r = await ready(b)
                assert r.status_code == 503
                assert r.json()["checks"]["backend"] == {"ok": False, "detail": "ollama backend does not answer"}
                # Joined through a's /healthz: b routes a's model over the mesh although its own backend is down.
                chat = await client.post(f"{b.api}/api/chat", json={"model": "m:1b", "stream": False,
                                                                    "messages": [{"role": "user", "content": "hi"}]})
                assert chat.status_code == 200 and chat.headers["x-meshollama-peer"] == a.peer_id
            fn.cancel_scope.cancel()
