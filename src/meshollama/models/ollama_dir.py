"""Ollama's models directory as a :class:`~.store.Store`.

Layout (Ollama's ``server/manifest``): ``manifests/<host>/<namespace>/<model>/<tag>``
holds a manifest's raw bytes, ``blobs/sha256-<hex>`` the blobs it names.
Names match ignoring case, as in Ollama; a new manifest keeps the spelling it
was installed under, an existing one the spelling already on disk.

What a peer sends reaches a path only through :func:`meshollama.names.parse`
(whose parts cannot contain ``/`` or start with ``.``), plus a check that the
result resolves inside ``manifests/``; blobs are served only when a manifest
held here names them, by a path built from the validated digest alone.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from .. import names
from ..errors import BadRequest
from .manifest import MAX_MANIFEST_BYTES, Manifest, blob_filename, is_digest, parse
from .store import PARTIAL_DIR

log = logging.getLogger(__name__)

MANIFESTS = "manifests"
BLOBS = "blobs"
TMP_PREFIX = ".partial-"  # a leading dot: no valid name part, so Ollama and models() skip it
SYSTEM_MODELS_DIR = Path("/usr/share/ollama/.ollama/models")  # the Linux installer's service user


def find_models_dir(configured: str | None, env: Mapping[str, str]) -> Path:
    """Where Ollama keeps its models: ``configured``, else ``$OLLAMA_MODELS``, else
    ``~/.ollama/models``; on Linux, when that is missing and the system service's
    directory exists, that one."""
    if configured:
        return Path(configured).expanduser()
    if env.get("OLLAMA_MODELS"):
        return Path(env["OLLAMA_MODELS"]).expanduser()
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    default = home / ".ollama" / "models"
    if sys.platform.startswith("linux") and not default.exists() and SYSTEM_MODELS_DIR.is_dir():
        return SYSTEM_MODELS_DIR
    return default


# --- file helpers (shared with .embedded_dir) -----------------------------------------------------


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_regular(path: Path) -> bool:
    """A regular file, not a symlink (``lstat``)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def commit_file(verified: Path, blobs: Path, digest: str) -> Path:
    """fsync ``verified``, rename it to ``blobs/sha256-<hex>``, fsync ``blobs``."""
    dest = blobs / blob_filename(digest)  # BadRequest unless is_digest
    if not is_regular(verified):
        raise FileNotFoundError(f"not a regular file: {verified}")
    fd = os.open(verified, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(verified, 0o644)
    blobs.mkdir(parents=True, exist_ok=True)
    os.replace(verified, dest)
    fsync_dir(blobs)
    return dest


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def free_space(path: Path) -> int:
    """Free bytes on the filesystem of ``path`` (or of its nearest existing parent)."""
    for p in (path, *path.parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return 0


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; ValueError if larger."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path.name} is larger than {limit} bytes")
    return data


# --- the store ------------------------------------------------------------------------------------


def _child(parent: Path, part: str) -> Path | None:
    """``parent/part``, or the entry of ``parent`` equal to ``part`` ignoring case."""
    exact = parent / part
    if exact.exists():
        return exact
    try:
        return next((p for p in sorted(parent.iterdir()) if p.name.lower() == part.lower()), None)
    except OSError:
        return None


class OllamaDir:
    """The Ollama models directory ``root`` (see :func:`find_models_dir`)."""

    kind = "ollama"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def manifests(self) -> Path:
        return self.root / MANIFESTS

    @property
    def blobs_dir(self) -> Path:
        return self.root / BLOBS

    def _inside(self, path: Path) -> bool:
        try:
            return path.resolve().is_relative_to(self.manifests.resolve())
        except (OSError, RuntimeError):
            return False

    def manifest_path(self, name: str) -> Path:
        """Where the manifest of ``name`` goes if new (original case); BadRequest on a bad name."""
        n = names.parse(name)
        return self.manifests / n.host / n.namespace / n.model / n.tag

    def find_manifest(self, name: str) -> Path | None:
        """The manifest file of ``name`` (any case), or None; never raises on a bad name."""
        try:
            n = names.parse(name)
        except BadRequest:
            return None
        path: Path | None = self.manifests
        for part in (n.host, n.namespace, n.model, n.tag):
            path = _child(path, part) if path is not None else None
        if path is None or not path.is_file() or not self._inside(path):
            return None
        return path

    def _read(self, path: Path) -> Manifest:
        return parse(read_bounded(path, MAX_MANIFEST_BYTES))

    def manifest(self, name: str) -> Manifest | None:
        path = self.find_manifest(name)
        if path is None:
            return None
        try:
            return self._read(path)
        except (OSError, ValueError, BadRequest) as e:
            log.warning("ollama models: ignoring %s: %s", path, getattr(e, "message", e))
            return None

    def _files(self) -> Iterator[tuple[names.ModelName, Path]]:
        """(name, manifest file) for every ``host/namespace/model/tag`` file with a valid name."""
        def subdirs(p: Path) -> list[Path]:
            try:
                return sorted(c for c in p.iterdir() if c.is_dir())
            except OSError:
                return []

        for host in subdirs(self.manifests):
            for ns in subdirs(host):
                for model in subdirs(ns):
                    try:
                        tags = sorted(model.iterdir())
                    except OSError:
                        continue
                    for tag in tags:
                        text = f"{host.name}/{ns.name}/{model.name}:{tag.name}"
                        if names.is_valid(text) and tag.is_file() and self._inside(tag):
                            yield names.parse(text), tag

    def models(self) -> list[tuple[str, Manifest]]:
        """Every model held: (shortest name, manifest); unreadable manifests skipped with a warning."""
        out = []
        for name, path in self._files():
            try:
                out.append((name.shortest(), self._read(path)))
            except (OSError, ValueError, BadRequest) as e:
                log.warning("ollama models: ignoring %s: %s", path, getattr(e, "message", e))
        return out

    def referenced(self) -> set[str]:
        """Digests of every blob some held manifest names (config included)."""
        return {layer.digest for _, m in self.models() for layer in m.blobs()}

    def blob(self, digest: str) -> Path | None:
        if not is_digest(digest) or digest not in self.referenced():
            return None
        path = self.blobs_dir / blob_filename(digest)
        return path if is_regular(path) else None

    def has_blob(self, digest: str) -> bool:
        return is_digest(digest) and is_regular(self.blobs_dir / blob_filename(digest))

    def partial_dir(self) -> Path:
        path = self.root / PARTIAL_DIR
        path.mkdir(parents=True, exist_ok=True)
        return path

    def commit_blob(self, digest: str, verified: Path) -> None:
        commit_file(verified, self.blobs_dir, digest)

    def install(self, name: str, manifest: Manifest) -> None:
        """Write ``manifest.raw`` as the manifest of ``name`` (atomically), so Ollama lists it
        with the same digest. Every blob must be committed, with its size; else BadRequest."""
        for layer in manifest.blobs():
            path = self.blobs_dir / blob_filename(layer.digest)
            if not is_regular(path) or path.stat().st_size != layer.size:
                raise BadRequest(f"cannot install {name}: blob {layer.digest} is missing or has the wrong size")
        path = self.find_manifest(name) or self.manifest_path(name)
        self.manifests.mkdir(parents=True, exist_ok=True)
        existing = next(p for p in path.parents if p.exists())
        if not (self._inside(existing) and existing.is_relative_to(self.manifests)):  # a symlink out
            raise BadRequest(f"cannot install {name}: its manifest path leaves {self.manifests}")
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self._inside(path.parent):
            raise BadRequest(f"cannot install {name}: its manifest path leaves {self.manifests}")
        write_atomic(path, manifest.raw)

    def free_bytes(self) -> int:
        return free_space(self.root)
