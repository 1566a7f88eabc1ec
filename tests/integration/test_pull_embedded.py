"""Models over the mesh with the real embedded model: node B starts with an
empty model directory, pulls smollm2:135m from node A with the ollama client
(progress events, same digest), then answers a chat itself with A stopped."""

from __future__ import annotations

import signal

import httpx
import ollama
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


async def test_b_pulls_the_model_from_a_and_answers_alone(tmp_path):
    with trio.fail_after(240):
        async with cluster(tmp_path) as c:
            a = await c.start("a", "--backend", "embedded")
            b_models = tmp_path / "b-models"
            b = await c.start("b", "--backend", "embedded", "--model-dir", str(b_models), bootstrap=a,
                              env={"MESHOLLAMA_EMBEDDED_DEFAULT_MODEL": "false"})

            async def b_sees_a_serving() -> bool:
                return bool((await c.view(b)).get(a.peer_id, {}).get("models"))

            await c.wait_until(b_sees_a_serving)
            tags = httpx.get(a.api + "/api/tags").json()["models"]
            a_digest = next(m["digest"] for m in tags if m["name"] == "smollm2:135m")
            assert not list(b_models.glob("*.Modelfile"))

            client = ollama.Client(host=b.api)
            events = await trio.to_thread.run_sync(lambda: list(client.pull("smollm2:135m", stream=True)))
            statuses = [e.status for e in events]
            assert statuses[0] == "pulling manifest" and statuses[-1] == "success", statuses
            assert "verifying sha256 digest" in statuses and "writing manifest" in statuses
            model_layer = [e for e in events if e.digest == "sha256:" + a_digest]
            assert model_layer and model_layer[-1].completed == model_layer[-1].total > 50_000_000

            # B holds it now, with A's digest, in its own model directory.
            assert list(b_models.glob("*.Modelfile")) and list((b_models / "blobs").glob("sha256-*"))

            async def b_announces_it() -> bool:
                mine = (await c.view(b)).get(b.peer_id, {}).get("models", [])
                return any(m["name"] == "smollm2:135m" and m["digest"] == a_digest for m in mine)

            await c.wait_until(b_announces_it)

            c.signal(a, signal.SIGTERM)
            assert await c.wait_exit(a) == 0
            async with httpx.AsyncClient(timeout=120) as http:
                r = await http.post(b.api + "/api/chat", json={
                    "model": "smollm2:135m", "stream": False, "options": {"num_predict": 8, "temperature": 0},
                    "messages": [{"role": "user", "content": "Say hello."}]})
            assert r.status_code == 200, r.text
            assert r.headers["x-meshollama-peer"] == b.peer_id
            assert r.json()["message"]["content"].strip()
