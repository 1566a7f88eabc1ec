"""Ollama's model manifest: a JSON document naming the sha256-addressed blobs of a model.

This is what crosses the mesh first in a pull. The manifest's own sha256 is the
model digest Ollama shows in ``/api/tags``; for an embedded-engine model (whose
announced digest is its GGUF's sha256) the node synthesises a manifest whose
model layer is that GGUF (:mod:`.embedded_dir`). :func:`parse` bounds
everything a peer can put in one, since a manifest arrives from the network.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from ..errors import BadRequest

MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
MODEL = "application/vnd.ollama.image.model"
TEMPLATE = "application/vnd.ollama.image.template"
SYSTEM = "application/vnd.ollama.image.system"
PARAMS = "application/vnd.ollama.image.params"
LICENSE = "application/vnd.ollama.image.license"
MESSAGES = "application/vnd.ollama.image.messages"
ADAPTER = "application/vnd.ollama.image.adapter"
PROJECTOR = "application/vnd.ollama.image.projector"

MAX_MANIFEST_BYTES = 1 << 20
MAX_LAYERS = 64
MAX_BLOB_BYTES = 1 << 44  # 16 TiB: any real model, and far from overflowing anything
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")


def is_digest(value: Any) -> bool:
    """``sha256:<64 lower-case hex>``: the only digest form that crosses the mesh."""
    return isinstance(value, str) and DIGEST_RE.match(value) is not None


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_filename(digest: str) -> str:
    """``sha256:abc`` -> ``sha256-abc``, as Ollama names files in ``blobs/``.

    Only ever called with a digest :func:`is_digest` accepted, so the result is
    a plain file name: no ``/``, no ``..``."""
    if not is_digest(digest):
        raise BadRequest("invalid digest format")
    return digest.replace(":", "-", 1)


@dataclass(frozen=True)
class Layer:
    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest; ``raw`` is kept byte for byte, so a copy has the same digest."""

    raw: bytes
    config: Layer | None
    layers: tuple[Layer, ...]

    @property
    def digest(self) -> str:
        return sha256_digest(self.raw)

    def blobs(self) -> tuple[Layer, ...]:
        """Config first, then the layers, each digest once."""
        seen: set[str] = set()
        out = []
        for layer in ((self.config,) if self.config else ()) + self.layers:
            if layer.digest not in seen:
                seen.add(layer.digest)
                out.append(layer)
        return tuple(out)

    def total_size(self) -> int:
        return sum(layer.size for layer in self.blobs())

    def model_layer(self) -> Layer | None:
        return next((la for la in self.layers if la.media_type == MODEL), None)

    def matches(self, announced: str) -> bool:
        """Whether this manifest is the one a peer announced as ``announced``
        (a hex digest, with or without ``sha256:``): its own digest (Ollama), or
        its model layer's (the embedded engine announces its GGUF's)."""
        want = announced.lower().removeprefix("sha256:")
        model = self.model_layer()
        return self.digest == "sha256:" + want or (model is not None and model.digest == "sha256:" + want)


def _layer(obj: Any, what: str) -> Layer:
    if not isinstance(obj, dict):
        raise BadRequest(f"manifest: {what} is not an object")
    digest, size, media = obj.get("digest"), obj.get("size"), obj.get("mediaType")
    if not is_digest(digest):
        raise BadRequest(f"manifest: {what} has an invalid digest")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_BLOB_BYTES:
        raise BadRequest(f"manifest: {what} has an invalid size")
    if not isinstance(media, str) or len(media) > 200:
        raise BadRequest(f"manifest: {what} has an invalid mediaType")
    return Layer(digest, size, media)


def parse(raw: bytes) -> Manifest:
    """A manifest from bytes a peer sent; :class:`BadRequest` if it is not one."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BadRequest("manifest too large")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("manifest is not JSON") from None
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise BadRequest("manifest: unsupported schemaVersion")
    layers = doc.get("layers")
    if not isinstance(layers, list) or not 0 < len(layers) <= MAX_LAYERS:
        raise BadRequest("manifest: layers missing or too many")
    config = _layer(doc["config"], "config") if doc.get("config") is not None else None
    return Manifest(raw, config, tuple(_layer(la, f"layer {i}") for i, la in enumerate(layers)))


def build(config: Layer | None, layers: list[Layer]) -> Manifest:
    """A manifest in Ollama's layout (same key order, compact JSON, as Ollama writes it)."""
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE}
    if config is not None:
        doc["config"] = {"mediaType": config.media_type, "digest": config.digest, "size": config.size}
    doc["layers"] = [{"mediaType": la.media_type, "digest": la.digest, "size": la.size} for la in layers]
    return parse(json.dumps(doc, separators=(",", ":")).encode())
