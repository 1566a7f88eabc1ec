"""Stand-in Ollama model stores on disk, for model-distribution tests.

``write_model`` lays out what ``ollama pull`` leaves behind (a manifest under
``manifests/registry.ollama.ai/library/<model>/<tag>`` and ``blobs/sha256-*``)
with random bytes, so every test model has its own digests. ``ollama_node``
runs a stand-in Ollama over such a directory and a real node in front of it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from meshollama.models.manifest import CONFIG_MEDIA_TYPE, MODEL, TEMPLATE, Layer, build

from tests.fakes.fake_ollama import serve_fake


@dataclass
class StoredModel:
    name: str
    manifest_digest: str  # hex, as /api/tags shows it
    model_layer: Layer
    model_bytes: bytes


def _blob(root: Path, data: bytes, media: str) -> Layer:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / digest.replace(":", "-")).write_bytes(data)
    return Layer(digest, len(data), media)


def write_model(root: Path, name: str, size: int, *, seed: bytes | None = None) -> StoredModel:
    """A model of ``size`` random bytes (plus a template and a config) in Ollama's layout."""
    data = os.urandom(size) if seed is None else _seeded(seed, size)
    model = _blob(root, data, MODEL)
    template = _blob(root, b"{{ .Prompt }}", TEMPLATE)
    config = _blob(root, json.dumps({"model_format": "gguf", "model_family": "test",
                                     "rootfs": {"type": "layers", "diff_ids": [model.digest]}}).encode(),
                   CONFIG_MEDIA_TYPE)
    manifest = build(config, [model, template])
    base, _, tag = name.partition(":")
    path = root / "manifests" / "registry.ollama.ai" / "library" / base / (tag or "latest")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(manifest.raw)
    return StoredModel(name, manifest.digest.removeprefix("sha256:"), model, data)


def copy_model(src: Path, dst: Path, stored: StoredModel) -> None:
    """Another holder of the same model: the same manifest and blobs under ``dst``."""
    for path in src.rglob("*"):
        if path.is_file() and ".meshollama" not in path.parts:
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())


def corrupt(root: Path, layer: Layer, offset: int) -> None:
    """Flip one byte of a blob on disk (its manifest still names the good digest)."""
    path = root / "blobs" / layer.digest.replace(":", "-")
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _seeded(seed: bytes, size: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest() * 64
        counter += 1
    return bytes(out[:size])


def node_env(models_dir: Path, **extra: str) -> dict[str, str]:
    env = {"MESHOLLAMA_OLLAMA_MODELS_DIR": str(models_dir), "MESHOLLAMA_OLLAMA_REFRESH_INTERVAL": "0.5"}
    env.update(extra)
    return env


async def ollama_node(c, nursery, name: str, models_dir: Path, *, bootstrap=None, **env: str):
    """A stand-in Ollama over ``models_dir`` and a real node using it."""
    models_dir.mkdir(parents=True, exist_ok=True)
    fake = await nursery.start(partial(serve_fake, [], name=name, models_dir=models_dir))
    node = await c.start(name, "--backend", "ollama", "--ollama-url", fake.url, bootstrap=bootstrap,
                         env=node_env(models_dir, **env))
    return node, fake
