"""Content-addressed GGUFs under ``model_dir/blobs/`` for :mod:`.model_store`.

``blobs/sha256-<hex>`` files are uploaded (:class:`BlobWriter`) or hard-linked
by copy/create (:func:`ensure_blob`) so a model outlives the file it came
from; :func:`prune_blobs` removes those no Modelfile references. Like the rest
of the store, everything here blocks and a file only appears by renaming a
finished ``.partial-*`` temporary. The layout constants, the store's lock and
the atomic-write helpers live here too, so the store builds on this module.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Self

from ..errors import BadRequest, RequestError
from . import gguf
from . import modelfile as mfile

log = logging.getLogger(__package__ + ".model_store")  # one logger for the whole store

SUFFIX = ".Modelfile"
BLOBS = "blobs"
PARTIAL = ".partial-"
DIGEST = re.compile(r"sha256[:-]([0-9a-fA-F]{64})\Z")
_BLOB_NAME = re.compile(r"sha256-[0-9a-f]{64}\Z")
_LINK_FALLBACK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOTSUP}
LOCK = threading.RLock()
"""Taken by every mutation of a model directory within this process."""


def quote(s: str) -> str:  # Go's %q, near enough
    return json.dumps(s, ensure_ascii=False)


def resolve(model_dir: Path, text: str) -> Path:
    """A Modelfile's FROM path: absolute, or relative to ``model_dir``."""
    path = Path(text).expanduser()
    return path if path.is_absolute() else model_dir / path


def normalize_digest(digest: Any) -> str:
    """``sha256-ABC…`` or ``sha256:abc…`` -> ``sha256:abc…``; else 400 ``invalid digest format``.

    Ollama accepts ``^sha256[:-][0-9a-fA-F]{64}$``; the hash is the same in any case.
    """
    m = DIGEST.match(digest) if isinstance(digest, str) else None
    if m is None:
        raise BadRequest("invalid digest format")
    return "sha256:" + m.group(1).lower()


def blob_path(model_dir: Path, digest: str) -> Path:
    """Where the blob ``digest`` lives, whether or not it exists (400 on a bad digest)."""
    return model_dir / BLOBS / ("sha256-" + normalize_digest(digest)[7:])


def has_blob(model_dir: Path, digest: str) -> bool:
    """``HEAD /api/blobs/:digest``: 400 on a bad digest, else whether the blob is there."""
    return blob_path(model_dir, digest).is_file()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def finish(tmp: Path, dest: Path, fileobj: Any) -> None:
    """Flush, fsync and close ``fileobj`` (open on ``tmp``), then rename ``tmp`` to ``dest``."""
    fileobj.flush()
    os.fsync(fileobj.fileno())
    fileobj.close()
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)
    _fsync_dir(dest.parent)


class BlobWriter:
    """``POST /api/blobs/:digest``: stream to a temporary file, verify, rename into place.

    The digest is checked here (400 ``invalid digest format``). A ``with`` block
    aborts unless :meth:`commit` ran. A wrong sha256 is Ollama's 400 ``digest
    mismatch, expected "<as sent>", got "sha256:<hex>"``; unlike Ollama,
    ``sha256-<hex>`` and upper-case hex compare by value instead of always
    mismatching.
    """

    def __init__(self, model_dir: Path, digest: str) -> None:
        self.given = digest
        self.path = blob_path(model_dir, digest)
        self.digest = normalize_digest(digest)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=PARTIAL)
        self._file = os.fdopen(fd, "wb")
        self._tmp: Path | None = Path(tmp)
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        if self._tmp is None:
            raise ValueError("blob writer is closed")
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    def commit(self) -> Path:
        """Verify the sha256 and move the blob into place; returns its path."""
        if self._tmp is None:
            raise ValueError("blob writer is closed")
        got = "sha256:" + self._hash.hexdigest()
        if got != self.digest:
            self.abort()
            raise BadRequest(f"digest mismatch, expected {quote(self.given)}, got {quote(got)}")
        finish(self._tmp, self.path, self._file)
        self._tmp = None
        return self.path

    def abort(self) -> None:
        """Delete the temporary file; harmless after :meth:`commit` or a second time."""
        if self._tmp is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def _blob_hex(model_dir: Path, path: Path) -> str | None:
    """The digest's hex if ``path`` is a blob of ``model_dir`` (its name says it)."""
    ok = _BLOB_NAME.match(path.name) and path.parent.resolve() == (model_dir / BLOBS).resolve()
    return path.name[7:] if ok else None


def file_hex(model_dir: Path, path: Path, digests: gguf.DigestCache | None = None) -> str:
    """sha256 hex of a GGUF: free for a blob, else from ``digests`` or by hashing."""
    if hexdigest := _blob_hex(model_dir, path):
        return hexdigest
    if digests is not None:
        return digests.digest(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ensure_blob(model_dir: Path, path: Path, hexdigest: str | None = None) -> Path:
    """``path`` as a blob: itself if it is one, else a hard link in ``blobs/``.

    Copies only where linking fails with EXDEV, EPERM (e.g. protected_hardlinks
    on a wheel's file), EMLINK or ENOTSUP. A link shares the inode: editing the
    GGUF in place would change the blob (replacing the file, as downloads do,
    would not).
    """
    if _blob_hex(model_dir, path):
        return path
    hexdigest = hexdigest or file_hex(model_dir, path)
    dest = model_dir / BLOBS / f"sha256-{hexdigest}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(path, dest)
    except FileExistsError:
        pass  # content-addressed: the same bytes are already there
    except OSError as e:
        if e.errno not in _LINK_FALLBACK:
            raise
        log.info("model store: cannot hard-link %s (%s); copying it", path, e.strerror)
        with BlobWriter(model_dir, f"sha256:{hexdigest}") as w, open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                w.write(block)
            w.commit()
    return dest


def _referenced(model_dir: Path) -> set[str]:
    """Names of the blobs some Modelfile's FROM points at. An unparsable file counts by
    its FROM-looking lines, so a typo never gets weights deleted."""
    refs, blobs = set(), (model_dir / BLOBS).resolve()
    for path in model_dir.glob("*" + SUFFIX):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
            froms = [mfile.parse(text, require_from=False).from_ or ""]
        except OSError:
            continue
        except RequestError:
            froms = re.findall(r'(?im)^\s*from\s+"*(.*?)"*\s*$', text)
        refs |= {resolve(model_dir, f).name for f in froms if f and resolve(model_dir, f).parent.resolve() == blobs}
    return refs


def prune(model_dir: Path, candidates: Iterable[Path]) -> None:
    """Remove those of ``candidates`` that are blobs no Modelfile references."""
    refs = _referenced(model_dir)
    for path in candidates:
        if _blob_hex(model_dir, path) and path.name not in refs:
            log.info("model store: removing unreferenced blob %s", path.name)
            path.unlink(missing_ok=True)


def prune_blobs(model_dir: Path, *, min_age_s: float = 3600.0) -> list[Path]:
    """Remove blobs no Modelfile references and stale ``.partial-*`` files (for start-up).

    Only files whose inode changed over ``min_age_s`` ago (ctime, which a new
    hard link also bumps), so an upload waiting for its ``/api/create`` stays.
    """
    removed: list[Path] = []
    if not (model_dir / BLOBS).is_dir():
        return removed
    with LOCK:
        refs, cutoff = _referenced(model_dir), time.time() - min_age_s
        for path in (model_dir / BLOBS).iterdir():
            stale = path.name.startswith(PARTIAL) or (_BLOB_NAME.match(path.name) and path.name not in refs)
            try:
                if stale and path.stat().st_ctime < cutoff:
                    path.unlink()
                    removed.append(path)
            except OSError as e:
                log.warning("model store: cannot prune %s: %s", path, e)
    return removed
