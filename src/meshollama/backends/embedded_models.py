"""The embedded backend's settings and catalog: one :class:`ServedModel` per model the store lists.

A served model is a GGUF file plus what its Modelfile (side file, standalone
Modelfile, or the built-in default's template) says: template, system
prompt, default options and messages. Its :class:`~.prompts.ChatTemplate`
decides its capabilities. Runtime state (loaded ``Llama`` instances, slots)
lives here too, touched only from the trio thread.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from . import gguf, model_store
from .llama_engine import DEFAULT_MODEL_NAME, FALLBACK_TEMPLATE, LlamaInstance, default_model_path
from .modelfile import Modelfile
from .prompts import ChatTemplate, builtin_template

log = logging.getLogger(__name__)


# --- settings ---------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedSettings:
    """What the embedded backend needs from ``Config.embedded`` (see :meth:`from_config`)."""

    model_dir: Path | None = None
    default_model: bool = True
    parallel: int = 1
    max_queue: int = 512
    n_ctx: int = 8192
    n_threads: int = 0
    embedding: bool = True
    rescan_interval: float = 30.0

    @classmethod
    def from_config(cls, cfg: Any) -> EmbeddedSettings:
        """Duck-typed: reads the attributes of ``cfg``, or of ``cfg.embedded`` for a whole Config.

        Given a whole Config, an unset ``model_dir`` means ``<node.data_dir>/models``.
        """
        data_dir = None
        if not hasattr(cfg, "n_ctx") and hasattr(cfg, "embedded"):
            data_dir = getattr(getattr(cfg, "node", None), "data_dir", None)
            cfg = cfg.embedded
        d = cls()
        model_dir = getattr(cfg, "model_dir", None)
        if not model_dir and data_dir:
            model_dir = Path(data_dir) / "models"
        return cls(
            model_dir=Path(model_dir).expanduser() if model_dir else None,
            default_model=bool(getattr(cfg, "default_model", d.default_model)),
            parallel=max(1, int(getattr(cfg, "parallel", d.parallel))),
            max_queue=max(0, int(getattr(cfg, "max_queue", d.max_queue))),
            n_ctx=max(256, int(getattr(cfg, "n_ctx", d.n_ctx))),
            n_threads=max(0, int(getattr(cfg, "n_threads", d.n_threads))),
            embedding=bool(getattr(cfg, "embedding", d.embedding)),
            rescan_interval=float(getattr(cfg, "rescan_interval", d.rescan_interval)),
        )


# --- one served model -------------------------------------------------------------------------


class ServedModel:
    """Catalog entry and runtime state of one model. Touched only from the trio thread."""

    def __init__(self, entry: model_store.StoreEntry, parallel: int) -> None:
        self.entry = entry
        self.name = entry.name
        self.path = entry.gguf
        self.size = entry.size
        self.mtime_ns = max(entry.mtime_ns, entry.source_mtime_ns)
        self.modelfile: Modelfile = entry.modelfile or Modelfile()
        self.digest = ""
        self.header: gguf.GgufHeader | None = None
        self._chat: ChatTemplate | None = None
        self.idle: list[LlamaInstance] = []
        self.count = 0  # generation instances alive (idle or in use)
        self.slots = trio.CapacityLimiter(parallel)
        self.embedder: LlamaInstance | None = None
        self.embed_slot = trio.CapacityLimiter(1)
        self.load_lock = trio.Lock()
        self.users = 0
        self.unload_pending = False
        self.n_ctx = 0  # the context it was loaded with (0 until loaded)

    @property
    def loaded(self) -> bool:
        return self.count > 0 or self.embedder is not None

    def drop_idle(self) -> None:
        for inst in self.idle:
            inst.close()
        self.count -= len(self.idle)
        self.idle.clear()
        if self.embedder is not None and self.embed_slot.borrowed_tokens == 0:
            self.embedder.close()
            self.embedder = None

    @property
    def chat(self) -> ChatTemplate:
        """The Modelfile's Go template if it has one, else the GGUF's Jinja one."""
        if self._chat is None:
            self._chat = chat_template(self.modelfile, self.header, self.name)
        return self._chat

    def described(self, digest: str, header: gguf.GgufHeader | None) -> None:
        self.digest, self.header = digest, header
        self._chat = None

    def options(self, request: Mapping[str, Any] | None) -> dict[str, Any]:
        """The Modelfile's PARAMETERs under the request's own options (the request wins)."""
        return {**self.modelfile.options(), **dict(request or {})}

    def stop_words(self) -> list[str]:
        stops = self.modelfile.options().get("stop")
        if stops:
            return list(stops)
        text = self.chat.text
        return ["<|im_end|>"] if "<|im_end|>" in text else []

    @property
    def license(self) -> str:
        if self.modelfile.licenses:
            return "\n".join(self.modelfile.licenses)
        return str((self.header.metadata if self.header else {}).get("general.license", ""))

    def capabilities(self, embedding: bool) -> tuple[str, ...]:
        """Ollama's order: completion, tools/insert from the template, then embedding."""
        return ("completion", *self.chat.capabilities) + (("embedding",) if embedding else ())


def chat_template(mf: Modelfile, header: gguf.GgufHeader | None, name: str) -> ChatTemplate:
    system = mf.system or ""
    if mf.template:
        try:
            return ChatTemplate.go(mf.template, system)
        except Exception as e:  # a hand-written Modelfile: never let it stop the catalog
            log.warning("embedded: %s: %s; using the GGUF's own template", name, e)
    return ChatTemplate.jinja(gguf.chat_template(header) or FALLBACK_TEMPLATE, system)


def scan(model_dir: Path | None, default_model: bool) -> list[model_store.StoreEntry]:
    """Every model to serve (blocking: lists and stats files, reads Modelfiles)."""
    default = None
    if default_model:
        path = default_model_path()
        if path is not None:
            default = (DEFAULT_MODEL_NAME, path, builtin_template())
    return model_store.scan(model_dir, default)


def file_facts(path: Path, digests: gguf.DigestCache) -> tuple[str, gguf.GgufHeader | None]:
    """(sha256, GGUF header) of a model file (blocking)."""
    try:
        header = gguf.read_header(path)
    except (OSError, gguf.GgufError) as e:
        log.warning("embedded: cannot read GGUF header of %s: %s", path, e)
        header = None
    return digests.digest(path), header
