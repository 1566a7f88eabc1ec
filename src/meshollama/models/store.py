"""Where a node's models live on disk, as the model-distribution code sees it.

Two implementations: :class:`~.ollama_dir.OllamaDir` (Ollama's models
directory: ``manifests/<host>/<namespace>/<model>/<tag>`` and
``blobs/sha256-<hex>``) and :class:`~.embedded_dir.EmbeddedDir` (the embedded
engine's ``model_dir``). Every method blocks (disk I/O): callers use
``trio.to_thread.run_sync``.

Serving (``manifest``/``blob``) answers only for what the store holds, found
by name or digest in its own index: nothing a peer sends is ever joined to a
path, so no request can reach a file outside the store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from .manifest import Manifest

PARTIAL_DIR = ".meshollama/partial"
"""Under the store's root: blobs being pulled (``sha256-<hex>`` data plus a
``.json`` state file), on the same filesystem as ``blobs/`` so a verified blob
is committed with one rename. Ollama and the embedded scan both ignore it."""


@runtime_checkable
class Store(Protocol):
    kind: str  # "ollama" or "embedded"
    root: Path  # the models directory itself

    def manifest(self, name: str) -> Manifest | None:
        """The manifest of a model this store holds (by any spelling of its name), or None."""
        ...

    def blob(self, digest: str) -> Path | bytes | None:
        """A blob of a held model, for serving: a file to read, small synthesised
        bytes (embedded templates, configs), or None if this store has no such blob.
        ``digest`` is ``sha256:<hex>`` as :func:`~.manifest.is_digest` accepts."""
        ...

    def has_blob(self, digest: str) -> bool:
        """Whether the blob is already committed here (a pull skips it)."""
        ...

    def partial_dir(self) -> Path:
        """``root / PARTIAL_DIR``, created if missing."""
        ...

    def commit_blob(self, digest: str, verified: Path) -> None:
        """Move a verified file (in :meth:`partial_dir`) to where this store keeps blobs."""
        ...

    def install(self, name: str, manifest: Manifest) -> None:
        """Make ``name`` a model of this store, every blob of ``manifest`` being
        committed already: write the manifest (Ollama) or the Modelfile (embedded),
        atomically, so a reader sees the model whole or not at all."""
        ...

    def free_bytes(self) -> int:
        """Free space on the store's filesystem, for a pull's up-front check and placement."""
        ...
