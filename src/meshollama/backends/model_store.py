"""Model management on disk for the embedded backend: scan, blobs, copy, create, delete.

All of it blocks (hashing gigabytes, fsync); the backend calls it from a worker
thread. A file only ever appears by renaming a finished temporary
(``.partial-*``, which scans ignore), so a concurrent scan sees the old state or
the new one; mutations within a process take one lock, as a replace touches
several files.

Layout of ``model_dir``:

* ``<stem>.gguf`` is served as ``gguf.name_from_filename`` names it, as before.
* ``<stem>.Modelfile`` beside ``<stem>.gguf`` (same stem) is a *side file*: its
  TEMPLATE, SYSTEM, PARAMETER, MESSAGE, LICENSE and REQUIRES override that
  GGUF's. Its FROM may be absent, ``.``, or a path to that very GGUF; a side
  file with any other FROM, or that does not parse, is ignored with a warning
  (the GGUF is served plain), as it was probably meant for another model.
* Any other ``*.Modelfile`` is a *standalone* model whose file name is its
  name: the shortest name, less an exact ``:latest``, with ``/`` as ``%2F``
  (``me/model:v1`` -> ``me%2Fmodel:v1.Modelfile``; ``%`` cannot occur in a name,
  so this reverses; ``:`` is kept, so this is POSIX-only). Its FROM is a GGUF
  path, absolute or relative to ``model_dir``; a missing or unreadable one
  skips the model with a warning. A hand-written file whose name is no valid
  model name gets a GGUF-style normalised name.
* ``blobs/sha256-<hex>``: content-addressed GGUFs, uploaded (:class:`BlobWriter`)
  or hard-linked by copy/create so a model outlives the file it came from.
  The Modelfiles written here say ``FROM blobs/sha256-<hex>``.
* ``.hidden``: names of the built-in default model that were deleted; the
  wheel is read-only, so deleting hides it, and it disappears as in Ollama.
  Only the default is affected; remove the line to bring it back.

When definitions share a name, a standalone Modelfile beats a GGUF, which beats
the default (so a create onto an existing name wins at once); losers are
skipped with a warning. Creating or copying onto the name of a GGUF model
replaces it as in Ollama: the ``.gguf`` is deleted, unless the new model uses
that very file (then only its side file is written).
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
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Self

from .. import names
from ..errors import BadRequest, ModelNotFound, RequestError
from . import gguf
from . import modelfile as mfile
from .modelfile import Modelfile

log = logging.getLogger(__name__)

SUFFIX = ".Modelfile"
BLOBS = "blobs"
HIDDEN = ".hidden"
_PARTIAL = ".partial-"
_DIGEST = re.compile(r"sha256[:-]([0-9a-fA-F]{64})\Z")
_BLOB_NAME = re.compile(r"sha256-[0-9a-f]{64}\Z")
_LINK_FALLBACK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOTSUP}
_LOCK = threading.RLock()

Kind = Literal["default", "gguf", "modelfile"]


@dataclass(frozen=True)
class StoreEntry:
    """One servable model; entries are values, so comparing them detects changes.

    ``gguf`` is the file to load; ``modelfile`` the overrides (side file,
    standalone Modelfile, or the default's template), whose ``from_`` is only
    informational; ``source`` the file whose removal deletes the model.
    """

    name: str
    gguf: Path
    modelfile: Modelfile | None
    source: Path
    kind: Kind
    size: int
    mtime_ns: int
    source_mtime_ns: int


def find(entries: Iterable[StoreEntry], name: str) -> StoreEntry | None:
    """The entry Ollama would match for ``name`` (defaults filled in, case-insensitive)."""
    key = names.key(name)
    return next((e for e in entries if names.key(e.name) == key), None)


def modelfile_filename(name: str) -> str:
    """``me/model:v1`` -> ``me%2Fmodel:v1.Modelfile``; ``x`` and ``x:latest`` -> ``x.Modelfile``."""
    filename = names.parse(name).shortest().removesuffix(":latest").replace("/", "%2F") + SUFFIX
    if len(filename.encode()) > 255:
        raise BadRequest(f"model name too long to store: {name}")
    return filename


def name_from_modelfile(filename: str) -> str | None:
    """Inverse of :func:`modelfile_filename` (shortest form), or None if no valid name."""
    text = re.sub("%2F", "/", filename.removesuffix(SUFFIX), flags=re.IGNORECASE)
    return names.parse(text).shortest() if filename.endswith(SUFFIX) and names.is_valid(text) else None


def _quote(s: str) -> str:  # Go's %q, near enough
    return json.dumps(s, ensure_ascii=False)


# --- scan ---------------------------------------------------------------------------------------


def _resolve(model_dir: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else model_dir / path


def _samefile(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _read(path: Path, *, side: bool) -> Modelfile | None:
    try:
        return mfile.parse(path.read_text(encoding="utf-8", errors="replace"), require_from=not side)
    except (OSError, RequestError) as e:
        log.warning("model store: ignoring %s: %s", path, getattr(e, "message", e))
        return None


def _side(model_dir: Path, weights: Path) -> Modelfile | None:
    path = weights.with_suffix(SUFFIX)
    mf = _read(path, side=True) if path.is_file() else None
    if mf is None or mf.from_ in (None, ".") or _samefile(_resolve(model_dir, mf.from_), weights):
        return mf
    log.warning("model store: ignoring %s: its FROM %r is not %s", path, mf.from_, weights.name)
    return None


def read_hidden(model_dir: Path) -> set[str]:
    """Name keys listed in ``model_dir/.hidden``."""
    try:
        lines = (model_dir / HIDDEN).read_text(encoding="utf-8").splitlines()
    except OSError:
        return set()
    return {names.key(s.strip()) for s in lines if s.strip() and not s.strip().startswith("#")}


def _entry(name: str, weights: Path, mf: Modelfile | None, source: Path, kind: Kind) -> list[StoreEntry]:
    try:
        st = weights.stat()
        src_mtime = source.stat().st_mtime_ns
        if not weights.is_file() or not os.access(weights, os.R_OK):
            raise OSError("not a readable file")
    except OSError as e:
        log.warning("model store: skipping %s: %s: %s", name, weights, getattr(e, "strerror", None) or e)
        return []
    return [StoreEntry(name, weights, mf, source, kind, st.st_size, st.st_mtime_ns, src_mtime)]


def scan(model_dir: Path | None, default: tuple[str, Path, str | None] | None = None) -> list[StoreEntry]:
    """Every model to serve. Blocking: lists, stats and reads Modelfiles, never opens a GGUF.

    ``default`` is the built-in model as (name, GGUF path, template override or
    None). The default comes first, then GGUF models, then standalone
    Modelfiles, each group in file-name order.
    """
    ggufs: list[StoreEntry] = []
    standalone: list[StoreEntry] = []
    hidden: set[str] = set()
    if model_dir is not None:
        hidden = read_hidden(model_dir)
        try:
            paths = sorted(p for p in model_dir.iterdir() if p.is_file())
        except OSError as e:
            log.warning("model store: cannot list %s: %s", model_dir, e)
            paths = []
        stems = {p.stem for p in paths if p.suffix == ".gguf"}
        for p in paths:
            if p.suffix == ".gguf":
                ggufs += _entry(gguf.name_from_filename(p), p, _side(model_dir, p), p, "gguf")
            elif p.suffix == SUFFIX and p.stem not in stems and not p.name.startswith("."):
                mf = _read(p, side=False)
                if mf is not None and mf.from_ is not None:
                    name = name_from_modelfile(p.name) or gguf.name_from_filename(p)
                    standalone += _entry(name, _resolve(model_dir, mf.from_), mf, p, "modelfile")
    defaults: list[StoreEntry] = []
    if default is not None and names.key(default[0]) not in hidden:
        mf = Modelfile(template=default[2]) if default[2] else None
        defaults = _entry(names.shortest(default[0]), Path(default[1]), mf, Path(default[1]), "default")
    winners: dict[str, StoreEntry] = {}
    for e in (*standalone, *ggufs, *defaults):  # precedence
        if names.key(e.name) in winners:
            log.warning("model store: %s also defines %s; ignoring it", e.source, e.name)
        else:
            winners[names.key(e.name)] = e
    kept = {id(e) for e in winners.values()}
    return [e for e in (*defaults, *ggufs, *standalone) if id(e) in kept]


# --- blobs ---------------------------------------------------------------------------------------


def normalize_digest(digest: Any) -> str:
    """``sha256-ABC…`` or ``sha256:abc…`` -> ``sha256:abc…``; else 400 ``invalid digest format``.

    Ollama accepts ``^sha256[:-][0-9a-fA-F]{64}$``; the hash is the same in any case.
    """
    m = _DIGEST.match(digest) if isinstance(digest, str) else None
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


def _finish(tmp: Path, dest: Path, fileobj: Any) -> None:
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
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=_PARTIAL)
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
            raise BadRequest(f"digest mismatch, expected {_quote(self.given)}, got {_quote(got)}")
        _finish(self._tmp, self.path, self._file)
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
        refs |= {_resolve(model_dir, f).name for f in froms if f and _resolve(model_dir, f).parent.resolve() == blobs}
    return refs


def _prune(model_dir: Path, candidates: Iterable[Path]) -> None:
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
    with _LOCK:
        refs, cutoff = _referenced(model_dir), time.time() - min_age_s
        for path in (model_dir / BLOBS).iterdir():
            stale = path.name.startswith(_PARTIAL) or (_BLOB_NAME.match(path.name) and path.name not in refs)
            try:
                if stale and path.stat().st_ctime < cutoff:
                    path.unlink()
                    removed.append(path)
            except OSError as e:
                log.warning("model store: cannot prune %s: %s", path, e)
    return removed


# --- copy, delete, create ------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_PARTIAL)
    f = os.fdopen(fd, "w", encoding="utf-8")
    try:
        f.write(text)
        _finish(Path(tmp), path, f)
    except BaseException:
        f.close()
        Path(tmp).unlink(missing_ok=True)
        raise


def _hide(model_dir: Path, name: str) -> None:
    if names.key(name) not in read_hidden(model_dir):
        try:
            old = (model_dir / HIDDEN).read_text(encoding="utf-8")
        except FileNotFoundError:
            old = "# built-in models removed with /api/delete; delete a line to restore that model\n"
        _write(model_dir / HIDDEN, old + ("" if old.endswith("\n") else "\n") + name + "\n")


def _place(model_dir: Path, entries: list[StoreEntry], dest: str, weights: Path, overrides: Modelfile,
           hexdigest: str | None) -> None:
    """Make ``dest`` serve ``weights`` with ``overrides``, replacing what ``dest`` was.

    The GGUF model of that name with this very file gets a side file; anything
    else becomes a standalone Modelfile pointing into ``blobs/``, and a GGUF
    model it replaces is deleted, a default it replaces hidden.
    """
    old = find(entries, dest)
    dest = old.name if old is not None else dest  # keep the existing spelling, as getExistingName does
    overrides = replace(overrides, from_=None)
    if old is not None and old.kind == "gguf" and _samefile(old.gguf, weights):
        _write(old.gguf.with_suffix(SUFFIX), mfile.format(overrides, header=f"overrides for {old.gguf.name}"))
        return
    blob = ensure_blob(model_dir, weights, hexdigest)
    target = old.source if old is not None and old.kind == "modelfile" else model_dir / modelfile_filename(dest)
    clash = target.with_suffix(".gguf")
    if clash.exists() and not (old is not None and old.kind == "gguf" and _samefile(old.gguf, clash)):
        raise RequestError(f"cannot store {dest}: {clash.name} is in the way", 409)
    _write(target, mfile.format(replace(overrides, from_=f"{BLOBS}/{blob.name}")))
    if old is not None and old.kind == "gguf":
        old.gguf.unlink(missing_ok=True)
        if old.gguf.with_suffix(SUFFIX) != target:
            old.gguf.with_suffix(SUFFIX).unlink(missing_ok=True)
    elif old is not None and old.kind == "default":
        _hide(model_dir, old.name)
    elif old is not None:
        _prune(model_dir, [old.gguf])


def copy(model_dir: Path, entries: list[StoreEntry], source: Any, destination: Any,
         *, digests: gguf.DigestCache | None = None) -> None:
    """``/api/copy``: ``destination`` gets the weights and overrides of ``source``.

    No gigabytes move: the copy is a standalone Modelfile whose FROM is a hard
    link in ``blobs/``, so deleting ``source`` later leaves it loadable.
    Copying onto an existing name replaces that model; onto itself does nothing.
    """
    for field, value in (("source", source), ("destination", destination)):
        if value is not None and not isinstance(value, str):
            raise mfile.type_error(value, field, "string", "CopyRequest")
        if not value or not names.is_valid(value):
            raise BadRequest(f"{field} {_quote(value or '')} is invalid")
    src = find(entries, source)
    if src is None or not src.gguf.is_file():
        raise ModelNotFound(f"model {_quote(source)} not found")
    if names.key(source) != names.key(destination):
        hexdigest = file_hex(model_dir, src.gguf, digests)  # outside the lock: may hash gigabytes
        with _LOCK:
            _place(model_dir, entries, destination, src.gguf, src.modelfile or Modelfile(), hexdigest)


def delete(model_dir: Path, entries: list[StoreEntry], name: Any) -> None:
    """``/api/delete``: remove a standalone Modelfile, or a GGUF and its side file, or hide the default.

    A blob the model used goes too once no Modelfile refers to it (Ollama's
    ``RemoveLayers``); other unreferenced blobs may be uploads awaiting a
    create, and are left to :func:`prune_blobs`.
    """
    if name is not None and not isinstance(name, str):
        raise mfile.type_error(name, "model", "string", "DeleteRequest")
    if not name:
        raise BadRequest("model is required")
    if not names.is_valid(name):
        raise BadRequest(f"name {_quote(name)} is invalid")
    with _LOCK:
        e = find(entries, name)
        if e is None:
            raise ModelNotFound(f"model '{name}' not found")
        if e.kind == "default":
            _hide(model_dir, e.name)
            return
        try:
            e.source.unlink()
        except FileNotFoundError:
            raise ModelNotFound(f"model '{name}' not found") from None
        if e.kind == "gguf":
            e.source.with_suffix(SUFFIX).unlink(missing_ok=True)
        else:
            _prune(model_dir, [e.gguf])


_UNSUPPORTED = (("adapters", "ADAPTER"), ("draft_files", "DRAFT"), ("quantize", "quantization"),
                ("quantization", "quantization"), ("draft_quantize", "quantization"),
                ("renderer", "RENDERER"), ("parser", "PARSER"), ("remote_host", "remote models"))


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == gguf.GGUF_MAGIC
    except OSError:
        return False


def _file_kind(model_dir: Path, filename: str, digest: str) -> str:
    """server/create.go ``detectModelTypeFromFiles``, for one file."""
    if filename.endswith((".safetensors", ".gguf")):
        return filename.rsplit(".", 1)[1]
    return "gguf" if _DIGEST.match(digest) and _is_gguf(blob_path(model_dir, digest)) else ""


def create(model_dir: Path, entries: list[StoreEntry], request: Mapping[str, Any],
           *, digests: gguf.DigestCache | None = None) -> Iterator[dict[str, Any]]:
    """``/api/create``: check the request now, return an iterator of Ollama's status objects.

    What Ollama rejects before its first status line raises here: wrong JSON
    types, ``file path must be relative``, ``invalid digest format``, ``invalid
    model name``, ``neither 'from' or 'files' was specified``, ``unknown type``,
    bad parameters or roles, and a ``from`` that is neither a model nor a file
    in ``model_dir`` (404 ``model 'x' not found``; Ollama would try a pull).
    What Ollama finds while building raises from the iterator after some lines:
    a missing blob (500 ``open <path>: no such file or directory``) or a
    non-GGUF blob (400 ``supplied file was not in GGUF format``). The last
    object is ``{"status": "success"}``; nothing is written before the iterator
    gets there. What llama.cpp here cannot do
    (quantize, adapters, draft models, safetensors, split GGUFs,
    renderer/parser, remote models) is a 501, so a caller can tell "not here"
    from "wrong request".
    """
    for field, gotype in (("model", "string"), ("name", "string"), ("from", "string"),
                          ("files", "map[string]string"), ("adapters", "map[string]string"),
                          ("draft_files", "map[string]string")):
        v = request.get(field)
        if v is not None and not isinstance(v, dict if gotype.startswith("map") else str):
            raise mfile.type_error(v, field, gotype)
        bad = [x for x in v.values() if not isinstance(x, str)] if isinstance(v, dict) else []
        if bad:
            raise mfile.type_error(bad[0], field, "string")
    files: dict[str, str] | None = request.get("files")
    if any(not _valid_fs_path(p) for p in files or {}):
        raise BadRequest("file path must be relative")
    if any(d == "" for f in ("files", "draft_files", "adapters") for d in (request.get(f) or {}).values()):
        raise BadRequest("invalid digest format")
    if request.get("draft_quantize") and not request.get("draft_files"):
        raise BadRequest("--draft-quantize requires a DRAFT model")
    dest = names.parse(request.get("model") or request.get("name") or "").shortest()  # invalid model name
    for field, what in _UNSUPPORTED:
        if request.get(field):
            raise mfile.unsupported(what)
    overrides = mfile.from_request(request)
    if source := request.get("from"):
        base = find(entries, source)
        if base is not None:
            return _stream(model_dir, entries, dest, base.gguf, mfile.merge(base.modelfile or Modelfile(), overrides),
                           digests)
        path = Path(os.path.normpath(model_dir / source))
        if Path(os.path.normpath(model_dir)) in path.parents and path.is_file() and _is_gguf(path):
            return _stream(model_dir, entries, dest, path, overrides, digests)
        if not names.is_valid(source):
            raise BadRequest("invalid model name")
        raise ModelNotFound(f"model '{source}' not found")
    if files is None:
        raise BadRequest("neither 'from' or 'files' was specified")
    kinds = {_file_kind(model_dir, fn, d) for fn, d in files.items()}
    if "safetensors" in kinds:
        raise mfile.unsupported("importing safetensors")
    if kinds != {"gguf"}:
        raise BadRequest("unknown type")
    if len(files) > 1:
        raise mfile.unsupported("a model of several GGUF files")
    return _stream(model_dir, entries, dest, None, overrides, digests, next(iter(files.values())))


def _valid_fs_path(p: str) -> bool:
    """Go's ``io/fs.ValidPath``: unrooted, slash-separated, no empty, ``.`` or ``..`` element."""
    return p == "." or (bool(p) and all(part not in ("", ".", "..") for part in p.split("/")))


def _stream(model_dir: Path, entries: list[StoreEntry], dest: str, weights: Path | None, overrides: Modelfile,
            digests: gguf.DigestCache | None, digest: str = "") -> Iterator[dict[str, Any]]:
    if weights is None:  # from an uploaded blob: Ollama's ggufLayers
        yield {"status": "parsing GGUF"}
        weights = blob_path(model_dir, digest)
        if not weights.is_file():
            raise RequestError(f"open {weights}: no such file or directory", 500)
        if not _is_gguf(weights):
            raise BadRequest("supplied file was not in GGUF format")
    hexdigest = file_hex(model_dir, weights, digests)
    yield {"status": f"using existing layer sha256:{hexdigest}"}
    yield {"status": "writing manifest"}
    with _LOCK:
        _place(model_dir, entries, dest, weights, overrides, hexdigest)
    yield {"status": "success"}
