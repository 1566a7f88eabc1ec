"""The fake Ollama over an on-disk models directory: what a pull installs shows up like in Ollama."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import httpx
import trio

from meshollama.models import manifest as mf
from meshollama.models.ollama_dir import OllamaDir
from tests.fakes.fake_ollama import run_fake_process, serve_fake

from .test_ollama_dir import put_model

DEADLINE = 20


def tags(body: dict) -> dict[str, dict]:
    return {m["name"]: m for m in body["models"]}


async def test_models_in_the_directory_are_listed_served_and_deleted(tmp_path: Path) -> None:
    root = tmp_path / "ollama"
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            fake = await nursery.start(partial(serve_fake, ["llama3:latest"], name="F", token_delay=0,
                                               models_dir=root))
            async with httpx.AsyncClient(base_url=fake.url, timeout=10) as client:
                assert list(tags((await client.get("/api/tags")).json())) == ["llama3:latest"]
                held = put_model(root, "registry.ollama.ai/library/SmolLM2/135m",
                                 [(mf.MODEL, b"GGUF weights"), (mf.TEMPLATE, b"{{ .Prompt }}")])
                listed = tags((await client.get("/api/tags")).json())
                assert set(listed) == {"llama3:latest", "SmolLM2:135m"}
                entry = listed["SmolLM2:135m"]
                assert entry["digest"] == held.digest.removeprefix("sha256:") == mf.sha256_digest(held.raw)[7:]
                assert entry["size"] == held.total_size() == 12 + 13 + 8  # model, template, config
                r = await client.post("/api/chat", json={"model": "smollm2:135m", "stream": False,
                                                         "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200 and r.json()["message"]["content"].startswith("hello from F")
                r = await client.post("/api/show", json={"model": "smollm2:135m"})
                assert r.status_code == 200
                assert [m["name"] for m in (await client.get("/api/ps")).json()["models"]] == ["SmolLM2:135m"]
                assert "SmolLM2:135m" in fake.state()["models"]
                # a manifest replaced on disk (a new pull) changes the digest at once
                newer = put_model(root, "registry.ollama.ai/library/SmolLM2/135m", [(mf.MODEL, b"GGUF v2")])
                assert tags((await client.get("/api/tags")).json())["SmolLM2:135m"]["digest"] == newer.digest[7:]
                r = await client.request("DELETE", "/api/delete", json={"model": "smollm2:135m"})
                assert r.status_code == 200
                assert OllamaDir(root).manifest("smollm2:135m") is None
                assert list(tags((await client.get("/api/tags")).json())) == ["llama3:latest"]
                # removed by hand: gone from the listing too
                put_model(root, "registry.ollama.ai/me/other/latest", [(mf.MODEL, b"GGUF other")])
                assert "me/other:latest" in tags((await client.get("/api/tags")).json())
                (root / "manifests/registry.ollama.ai/me/other/latest").unlink()
                assert list(tags((await client.get("/api/tags")).json())) == ["llama3:latest"]
                r = await client.post("/api/generate", json={"model": "me/other", "prompt": "x", "stream": False})
                assert r.status_code == 404
            nursery.cancel_scope.cancel()


async def test_the_subprocess_takes_models_dir(tmp_path: Path) -> None:
    root = tmp_path / "ollama"
    held = put_model(root, "registry.ollama.ai/library/tiny/latest", [(mf.MODEL, b"GGUF tiny")])
    with trio.fail_after(DEADLINE):
        async with (run_fake_process(["llama3:latest"], name="P", models_dir=root) as proc,
                    httpx.AsyncClient(base_url=proc.url, timeout=10) as client):
            listed = tags((await client.get("/api/tags")).json())
            assert listed["tiny:latest"]["digest"] == held.digest[7:]
            r = await client.post("/api/generate", json={"model": "tiny", "prompt": "x", "stream": False})
            assert r.status_code == 200 and r.json()["response"].startswith("hello from P")
