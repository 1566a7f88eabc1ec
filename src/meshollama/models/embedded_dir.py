"""The embedded engine's ``model_dir`` as a :class:`~.store.Store`.

Serving: a model here is a GGUF plus Modelfile overrides
(:class:`~meshollama.backends.model_store.StoreEntry`), so its manifest is
synthesised the way Ollama's ``/api/create`` would build it: the GGUF as the
model layer, then a template, system, license (one each), params and messages
layer for what the Modelfile sets, and a config blob (``model_format``,
``model_family``, ``model_type``, ``file_type`` from the GGUF's metadata,
``rootfs.diff_ids``). Everything in it comes from the GGUF's bytes and the
overrides, never from file names, times or the host, so one GGUF with the same
overrides gives a byte-identical manifest on every node. The model layer's
digest is the GGUF's sha256, the digest the embedded backend announces.

Installing: blobs are committed to ``model_dir/blobs/sha256-<hex>`` (small
layers too; :func:`~meshollama.backends.model_blobs.prune_blobs` may remove
those later, which only matters to a half-finished pull), then
:func:`~meshollama.backends.model_store.create` writes the standalone
Modelfile (``FROM blobs/sha256-<hex>`` plus the overrides read from the small
blobs) atomically, replacing a model of that name as ``/api/create`` does.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import names
from ..backends import gguf, model_blobs, model_store
from ..backends import modelfile as mfile
from ..backends.model_store import StoreEntry
from ..backends.modelfile import Modelfile
from ..errors import BadRequest
from .manifest import (
    ADAPTER,
    CONFIG_MEDIA_TYPE,
    LICENSE,
    MESSAGES,
    MODEL,
    PARAMS,
    PROJECTOR,
    SYSTEM,
    TEMPLATE,
    Layer,
    Manifest,
    blob_filename,
    build,
    is_digest,
    sha256_digest,
)
from .ollama_dir import commit_file, free_space, is_regular, read_bounded
from .store import PARTIAL_DIR

log = logging.getLogger(__name__)

MAX_SMALL_BLOB = 16 << 20  # a template, system prompt, license, params, messages or config layer
_SUPPORTED = frozenset({MODEL, TEMPLATE, SYSTEM, PARAMS, LICENSE, MESSAGES})
_GO_ESCAPES = (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


def go_json(obj: Any, *, sort_keys: bool = False) -> bytes:
    """JSON as Go's ``json.Encoder`` writes it: compact, HTML characters escaped, a final
    newline; integral floats without ``.0``. ValueError for NaN or infinity, as in Go."""

    def numbers(v: Any) -> Any:
        if isinstance(v, float) and v.is_integer() and abs(v) < 1e21:
            return int(v)
        if isinstance(v, dict):
            return {k: numbers(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [numbers(x) for x in v]
        return v

    text = json.dumps(numbers(obj), ensure_ascii=False, separators=(",", ":"), sort_keys=sort_keys,
                      allow_nan=False)
    for char, escaped in _GO_ESCAPES:
        text = text.replace(char, escaped)
    return (text + "\n").encode()


def config_blob(header: gguf.GgufHeader | None, layers: list[Layer], requires: str | None = None) -> bytes:
    """Ollama's ``ConfigV2`` for a GGUF model, from its metadata only (no file name, host or
    time, unlike Ollama, which also writes ``architecture`` and ``os`` of the machine)."""
    md = header.metadata if header else {}
    family = md.get("general.architecture")
    family = family if isinstance(family, str) else ""
    ftype = md.get("general.file_type")
    size = md.get("general.size_label")
    if header is not None and header.parameter_count:
        size = gguf.human_number(header.parameter_count)
    doc: dict[str, Any] = {
        "model_format": "gguf",
        "model_family": family,
        "model_families": [family] if family else None,
        "model_type": size if isinstance(size, str) else "",
        "file_type": gguf.FILE_TYPES.get(ftype, "") if isinstance(ftype, int) else "",
    }
    if requires:
        doc["requires"] = requires
    doc["rootfs"] = {"type": "layers", "diff_ids": [la.digest for la in layers]}
    return go_json(doc)


def small_layers(mf: Modelfile | None) -> list[tuple[str, bytes]]:
    """(media type, bytes) of the layers Ollama's create writes for these overrides, in its order."""
    mf = mf or Modelfile()
    out: list[tuple[str, bytes]] = []
    if mf.template:
        out.append((TEMPLATE, mf.template.encode()))
    if mf.system:
        out.append((SYSTEM, mf.system.encode()))
    out += [(LICENSE, lic.encode()) for lic in mf.licenses]
    if mf.parameters:
        out.append((PARAMS, go_json(mf.options(), sort_keys=True)))
    if mf.messages:
        out.append((MESSAGES, go_json([{"role": r, "content": c} for r, c in mf.messages])))
    return out


def synthesise(header: gguf.GgufHeader | None, gguf_hex: str, gguf_size: int,
               mf: Modelfile | None) -> tuple[Manifest, dict[str, bytes]]:
    """The manifest of a GGUF with these overrides, and its small blobs (config included) by digest."""
    small = small_layers(mf)
    layers = [Layer("sha256:" + gguf_hex, gguf_size, MODEL)]
    layers += [Layer(sha256_digest(data), len(data), media) for media, data in small]
    config = config_blob(header, layers, mf.requires if mf else None)
    blobs = {sha256_digest(data): data for _, data in small}
    blobs[sha256_digest(config)] = config
    return build(Layer(sha256_digest(config), len(config), CONFIG_MEDIA_TYPE), layers), blobs


@dataclass(frozen=True)
class _Synth:
    manifest: Manifest
    model_digest: str
    small: dict[str, bytes]


class EmbeddedDir:
    """Store over ``model_dir``; ``entries`` lists the models served now (a fresh scan, or
    the backend's catalog), ``digests`` is the backend's cache of GGUF sha256s."""

    kind = "embedded"

    def __init__(self, model_dir: Path, entries: Callable[[], Iterable[StoreEntry]],
                 digests: gguf.DigestCache) -> None:
        self.root = Path(model_dir)
        self._entries = entries
        self._digests = digests
        self._lock = threading.Lock()
        self._cache: dict[StoreEntry, _Synth | None] = {}

    @property
    def blobs_dir(self) -> Path:
        return self.root / model_blobs.BLOBS

    # -- serving ------------------------------------------------------------------------------------

    def _synth(self, entry: StoreEntry) -> _Synth | None:
        with self._lock:
            if entry in self._cache:
                return self._cache[entry]
        try:
            size = os.stat(entry.gguf).st_size
            hexdigest = self._digests.digest(entry.gguf)  # slow once per file, then cached
            try:
                header = gguf.read_header(entry.gguf)
            except gguf.GgufError as e:
                log.warning("embedded models: cannot read GGUF header of %s: %s", entry.gguf, e)
                header = None
            manifest, small = synthesise(header, hexdigest, size, entry.modelfile)
            synth: _Synth | None = _Synth(manifest, "sha256:" + hexdigest, small)
        except OSError as e:
            log.warning("embedded models: cannot describe %s: %s", entry.name, e)
            return None  # not cached: the file may come back
        except ValueError as e:  # NaN or infinity in its parameters: no JSON for them
            log.warning("embedded models: %s cannot be shared: %s", entry.name, e)
            synth = None
        with self._lock:
            self._cache[entry] = synth
        return synth

    def _held(self) -> list[StoreEntry]:
        entries = list(self._entries())
        with self._lock:
            for stale in set(self._cache) - set(entries):
                del self._cache[stale]
        return entries

    def manifest(self, name: str) -> Manifest | None:
        entry = model_store.find(self._held(), name)
        synth = self._synth(entry) if entry is not None else None
        return synth.manifest if synth is not None else None

    def blob(self, digest: str) -> Path | bytes | None:
        if not is_digest(digest):
            return None
        for entry in self._held():
            synth = self._synth(entry)
            if synth is None:
                continue
            if synth.model_digest == digest:
                return entry.gguf if entry.gguf.is_file() else None
            if digest in synth.small:
                return synth.small[digest]
        return None

    # -- pulling ------------------------------------------------------------------------------------

    def _held_gguf(self, digest: str) -> Path | None:
        """A GGUF served now whose (already computed) sha256 is ``digest``."""
        return next((e.gguf for e in self._held() if "sha256:" + (self._digests.cached(e.gguf) or "") == digest),
                    None)

    def has_blob(self, digest: str) -> bool:
        """Committed in ``blobs/``, or the GGUF of a model served here (install links it)."""
        if not is_digest(digest):
            return False
        return is_regular(self.blobs_dir / blob_filename(digest)) or self._held_gguf(digest) is not None

    def partial_dir(self) -> Path:
        path = self.root / PARTIAL_DIR
        path.mkdir(parents=True, exist_ok=True)
        return path

    def commit_blob(self, digest: str, verified: Path) -> None:
        with model_blobs.LOCK:
            commit_file(verified, self.blobs_dir, digest)

    def _small(self, layer: Layer) -> bytes:
        path = self.blobs_dir / blob_filename(layer.digest)
        if not is_regular(path) or layer.size > MAX_SMALL_BLOB:
            raise BadRequest(f"blob {layer.digest} is missing or too large")
        data = read_bounded(path, MAX_SMALL_BLOB)
        if len(data) != layer.size:
            raise BadRequest(f"blob {layer.digest} has the wrong size")
        return data

    def _text(self, layer: Layer) -> str:
        try:
            return self._small(layer).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"{layer.media_type} layer {layer.digest} is not UTF-8 text") from None

    def _json(self, layer: Layer) -> Any:
        try:
            return json.loads(self._small(layer))
        except ValueError:
            raise BadRequest(f"{layer.media_type} layer {layer.digest} is not JSON") from None

    def overrides(self, manifest: Manifest) -> dict[str, Any]:
        """The ``/api/create`` fields the small layers (and config) of ``manifest`` say."""
        req: dict[str, Any] = {}
        licenses: list[str] = []
        for layer in manifest.layers:
            if layer.media_type in (TEMPLATE, SYSTEM):  # as in Ollama, a later layer replaces
                req["template" if layer.media_type == TEMPLATE else "system"] = self._text(layer)
            elif layer.media_type == LICENSE:
                licenses.append(self._text(layer))
            elif layer.media_type == PARAMS:
                params = self._json(layer)
                if not isinstance(params, dict):
                    raise BadRequest("params layer is not a JSON object")
                for key in [k for k in params if k not in mfile.PARAMETERS]:
                    log.warning("embedded models: dropping parameter %s, which the embedded engine lacks", key)
                    del params[key]
                req["parameters"] = params
            elif layer.media_type == MESSAGES:
                messages = self._json(layer)
                if not isinstance(messages, list):
                    raise BadRequest("messages layer is not a JSON list")
                keep = [m for m in messages if isinstance(m, dict) and m.get("role") in mfile.MESSAGE_ROLES]
                if len(keep) < len(messages):
                    log.warning("embedded models: dropping %d messages a Modelfile cannot hold",
                                len(messages) - len(keep))
                req["messages"] = [{"role": m["role"], "content": m.get("content") or ""} for m in keep]
        if licenses:
            req["license"] = licenses
        if manifest.config is not None:
            config = self._json(manifest.config)
            requires = config.get("requires") if isinstance(config, dict) else None
            try:
                if isinstance(requires, str) and requires:
                    req["requires"] = mfile.parse_requires(requires)
            except BadRequest:
                log.warning("embedded models: ignoring requires %r", requires)
        return req

    @staticmethod
    def check(manifest: Manifest) -> Layer:
        """The model layer; BadRequest for what the embedded engine cannot serve."""
        for layer in manifest.layers:
            if layer.media_type in (ADAPTER, PROJECTOR):
                what = "adapter (LoRA)" if layer.media_type == ADAPTER else "projector (vision)"
                raise BadRequest(f"a model with an {what} layer is not supported by the embedded engine")
            if layer.media_type not in _SUPPORTED:
                raise BadRequest(f"layer type {layer.media_type} is not supported by the embedded engine")
        models = [la for la in manifest.layers if la.media_type == MODEL]
        if not models:
            raise BadRequest("a manifest without a model layer is not supported by the embedded engine")
        if len(models) > 1:
            raise BadRequest("a model of several GGUF files is not supported by the embedded engine")
        return models[0]

    def install(self, name: str, manifest: Manifest) -> None:
        """Write the standalone Modelfile of ``name``: ``FROM blobs/sha256-<hex>`` and the
        overrides from the committed small blobs (via :func:`model_store.create`)."""
        dest = names.parse(name).shortest()
        model = self.check(manifest)
        blob = self.blobs_dir / blob_filename(model.digest)
        with model_blobs.LOCK:
            if not is_regular(blob) and (held := self._held_gguf(model.digest)) is not None:
                model_blobs.ensure_blob(self.root, held, model.digest[7:])
        if not is_regular(blob) or blob.stat().st_size != model.size:
            raise BadRequest(f"cannot install {name}: blob {model.digest} is missing or has the wrong size")
        request = {"model": dest, "files": {"model.gguf": model.digest}, **self.overrides(manifest)}
        for _ in model_store.create(self.root, list(self._held()), request, digests=self._digests):
            pass

    def free_bytes(self) -> int:
        return free_space(self.root)
