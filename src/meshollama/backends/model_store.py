"""Model management on disk for the embedded backend: scan, copy, create, delete.

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
* ``blobs/sha256-<hex>``: content-addressed GGUFs, uploaded
  (:class:`.model_blobs.BlobWriter`) or hard-linked by copy/create so a model
  outlives the file it came from (:mod:`.model_blobs`). The Modelfiles written
  here say ``FROM blobs/sha256-<hex>``.
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

import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from .. import names
from ..errors import BadRequest, ModelNotFound, RequestError
from . import gguf, gotemplate
from . import modelfile as mfile
from .model_blobs import (
    BLOBS,
    DIGEST,
    LOCK,
    PARTIAL,
    SUFFIX,
    blob_path,
    ensure_blob,
    file_hex,
    finish,
    prune,
    quote,
    resolve,
)
from .modelfile import Modelfile

log = logging.getLogger(__name__)

HIDDEN = ".hidden"

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


# --- scan ---------------------------------------------------------------------------------------


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
    if mf is None or mf.from_ in (None, ".") or _samefile(resolve(model_dir, mf.from_), weights):
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
                    standalone += _entry(name, resolve(model_dir, mf.from_), mf, p, "modelfile")
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




# --- copy, delete, create ------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=PARTIAL)
    f = os.fdopen(fd, "w", encoding="utf-8")
    try:
        f.write(text)
        finish(Path(tmp), path, f)
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
        prune(model_dir, [old.gguf])


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
            raise BadRequest(f"{field} {quote(value or '')} is invalid")
    src = find(entries, source)
    if src is None or not src.gguf.is_file():
        raise ModelNotFound(f"model {quote(source)} not found")
    if names.key(source) != names.key(destination):
        hexdigest = file_hex(model_dir, src.gguf, digests)  # outside the lock: may hash gigabytes
        with LOCK:
            _place(model_dir, entries, destination, src.gguf, src.modelfile or Modelfile(), hexdigest)


def delete(model_dir: Path, entries: list[StoreEntry], name: Any) -> None:
    """``/api/delete``: remove a standalone Modelfile, or a GGUF and its side file, or hide the default.

    A blob the model used goes too once no Modelfile refers to it (Ollama's
    ``RemoveLayers``); other unreferenced blobs may be uploads awaiting a
    create, and are left to :func:`.model_blobs.prune_blobs`.
    """
    if name is not None and not isinstance(name, str):
        raise mfile.type_error(name, "model", "string", "DeleteRequest")
    if not name:
        raise BadRequest("model is required")
    if not names.is_valid(name):
        raise BadRequest(f"name {quote(name)} is invalid")
    with LOCK:
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
            prune(model_dir, [e.gguf])


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
    return "gguf" if DIGEST.match(digest) and _is_gguf(blob_path(model_dir, digest)) else ""


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
    if overrides.template:  # Ollama parses it at create: a bad one is a 400, not a silent fallback
        try:
            gotemplate.parse(overrides.template)
        except gotemplate.TemplateError as e:
            raise BadRequest(f"template error: {e}") from None
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
    with LOCK:
        _place(model_dir, entries, dest, weights, overrides, hexdigest)
    yield {"status": "success"}
