"""The real embedded model (SmolLM2-135M via llama.cpp) answering through a node's gateway."""

from __future__ import annotations

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


async def test_ollama_client_streams_a_real_answer_and_embeds(tmp_path):
    import ollama

    with trio.fail_after(240):
        async with cluster(tmp_path) as c:
            node = await c.start("e", "--backend", "embedded")
            client = ollama.Client(host=node.api)

            def calls():
                parts = list(client.chat(model="smollm2:135m", stream=True, options={"num_predict": 24, "seed": 1},
                                         messages=[{"role": "user", "content": "Why is the sky blue?"}]))
                emb = client.embed(model="smollm2:135m", input=["the sky is blue"])
                tags = client.list()
                return parts, emb, tags

            parts, emb, tags = await trio.to_thread.run_sync(calls)
            text = "".join(p.message.content or "" for p in parts)
            assert text.strip(), "the model produced no text"
            final = parts[-1]
            assert final.done and final.done_reason in ("stop", "length")
            assert final.eval_count and final.eval_count > 0
            assert final.total_duration and final.total_duration >= final.eval_duration > 0
            assert all(p.message.role == "assistant" for p in parts)
            # SmolLM2-135M's hidden size is 576
            assert len(emb.embeddings) == 1 and len(emb.embeddings[0]) == 576
            assert "smollm2:135m" in {m.model for m in tags.models}
