"""GGUF model files: names, digests and the metadata Ollama shows.

Pure helpers for the embedded backend. Nothing here needs llama.cpp: the
header is read with :mod:`struct`, so ``/api/tags`` and ``/api/show`` work
before (and without) loading a model. The functions that read files are
blocking; callers run them in a worker thread.
"""

from __future__ import annotations

import hashlib
import re
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

# llama_ftype -> Ollama's quantization_level spelling.
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S",
    15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS",
    20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S",
    25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M",
    30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
}

_QUANT_IN_NAME = re.compile(
    r"(?<![A-Za-z0-9])(I?Q\d_[A-Z0-9_]*|F16|F32|BF16)(?![A-Za-z0-9])", re.IGNORECASE
)
_SIZE_IN_NAME = re.compile(r"(?<![A-Za-z0-9.])(\d+(?:\.\d+)?)([KMBT])(?![A-Za-z])", re.IGNORECASE)
_BAD_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")

GGUF_MAGIC = b"GGUF"
SMALL_ARRAY = 16  # arrays longer than this are kept as their length only


def name_from_filename(path: str | Path) -> str:
    """``/models/My Model.Q4_K_M.gguf`` -> ``my-model.q4_k_m:latest``.

    The stem is lower-cased, runs of characters Ollama does not allow become
    ``-``, and the result is cut to Ollama's 80-character limit for a model
    part. Empty results become ``model``.
    """
    stem = Path(path).stem
    name = _BAD_CHARS.sub("-", stem).strip("-.").lower()
    name = name.lstrip(".-")[:80].rstrip("-.") or "model"
    return f"{name}:latest"


class DigestCache:
    """sha256 of files, computed once per (path, size, mtime).

    Thread-safe; :meth:`digest` blocks while hashing, so call it from a worker
    thread (``trio.to_thread.run_sync``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[tuple[str, int, int], str] = {}

    def cached(self, path: str | Path) -> str | None:
        try:
            key = _stat_key(path)
        except OSError:
            return None
        with self._lock:
            return self._known.get(key)

    def digest(self, path: str | Path) -> str:
        key = _stat_key(path)
        with self._lock:
            hit = self._known.get(key)
        if hit is not None:
            return hit
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        value = h.hexdigest()
        with self._lock:
            self._known[key] = value
        return value


def _stat_key(path: str | Path) -> tuple[str, int, int]:
    st = Path(path).stat()
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


# --- GGUF header --------------------------------------------------------------


@dataclass(frozen=True)
class GgufHeader:
    """The key/value metadata of a GGUF file plus its parameter count.

    Arrays longer than :data:`SMALL_ARRAY` are stored as ``ArrayLen(n)``.
    """

    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    parameter_count: int = 0


@dataclass(frozen=True)
class ArrayLen:
    """Placeholder for a long array (tokenizer vocabularies) that was skipped."""

    length: int


class GgufError(ValueError):
    """The file is not a GGUF file we can read."""


_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
    10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9


def read_header(path: str | Path) -> GgufHeader:
    """Parse the metadata and tensor shapes of a GGUF file (blocking)."""
    with open(path, "rb") as f:
        return parse_header(f)


def parse_header(f: BinaryIO) -> GgufHeader:
    if f.read(4) != GGUF_MAGIC:
        raise GgufError("not a GGUF file")
    (version,) = _unpack(f, "<I")
    if version < 2:
        raise GgufError(f"GGUF version {version} is not supported")
    n_tensors, n_kv = _unpack(f, "<QQ")
    if n_kv > 1_000_000 or n_tensors > 10_000_000:
        raise GgufError("implausible GGUF header")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = _read_str(f)
        (vtype,) = _unpack(f, "<I")
        meta[key] = _read_value(f, vtype)
    params = 0
    for _ in range(n_tensors):
        _read_str(f)
        (n_dims,) = _unpack(f, "<I")
        if n_dims > 8:
            raise GgufError("tensor with too many dimensions")
        dims = _unpack(f, f"<{n_dims}Q")
        _unpack(f, "<IQ")  # type, offset
        count = 1
        for d in dims:
            count *= d
        params += count
    return GgufHeader(version=version, metadata=meta, parameter_count=params)


def _unpack(f: BinaryIO, fmt: str) -> tuple:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise GgufError("truncated GGUF header")
    return struct.unpack(fmt, data)


def _read_str(f: BinaryIO) -> str:
    (n,) = _unpack(f, "<Q")
    if n > 64 * 1024 * 1024:
        raise GgufError("implausible string length")
    data = f.read(n)
    if len(data) != n:
        raise GgufError("truncated GGUF header")
    return data.decode("utf-8", errors="replace")


def _read_value(f: BinaryIO, vtype: int) -> Any:
    if vtype in _SCALARS:
        return _unpack(f, _SCALARS[vtype])[0]
    if vtype == _STRING:
        return _read_str(f)
    if vtype == _ARRAY:
        itype, n = _unpack(f, "<IQ")
        if n <= SMALL_ARRAY:
            return [_read_value(f, itype) for _ in range(n)]
        if itype in _SCALARS:  # fixed size: skip in one seek
            f.seek(struct.calcsize(_SCALARS[itype]) * n, 1)
        else:
            for _ in range(n):
                _read_value(f, itype)
        return ArrayLen(n)
    raise GgufError(f"unknown GGUF value type {vtype}")


# --- what Ollama shows --------------------------------------------------------


def human_number(n: int) -> str:
    """Ollama's ``format.HumanNumber``: 134515008 -> ``134.52M``, 8e9 -> ``8B``."""
    for limit, unit, digits in ((10**12, "T", 1), (10**9, "B", 1), (10**6, "M", 2)):
        if n >= limit:
            value = n / limit
            if value == int(value):
                return f"{int(value)}{unit}"
            return f"{value:.{digits}f}{unit}"
    if n >= 1000:
        return f"{n / 1000:.0f}K"
    return str(n)


def details(header: GgufHeader | None, filename: str | Path) -> dict[str, Any]:
    """Ollama's ``details`` object, best effort from metadata, else the file name."""
    md = header.metadata if header else {}
    family = md.get("general.architecture") if isinstance(md.get("general.architecture"), str) else ""
    quant = ""
    ftype = md.get("general.file_type")
    if isinstance(ftype, int) and ftype in FILE_TYPES:
        quant = FILE_TYPES[ftype]
    stem = Path(filename).stem
    if not quant:
        m = _QUANT_IN_NAME.search(stem)
        quant = m.group(1).upper() if m else ""
    size = ""
    if header and header.parameter_count:
        size = human_number(header.parameter_count)
    elif isinstance(md.get("general.size_label"), str):
        size = md["general.size_label"]
    else:
        m = _SIZE_IN_NAME.search(stem)
        size = f"{m.group(1)}{m.group(2).upper()}" if m else ""
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family] if family else None,
        "parameter_size": size,
        "quantization_level": quant,
    }


def model_info(header: GgufHeader | None) -> dict[str, Any]:
    """``/api/show``'s ``model_info``: metadata minus the chat template; long arrays as ``[]``."""
    if header is None:
        return {}
    out: dict[str, Any] = {}
    for key, value in header.metadata.items():
        if key.startswith("tokenizer.chat_template"):
            continue
        out[key] = [] if isinstance(value, ArrayLen) else value
    if header.parameter_count:
        out["general.parameter_count"] = header.parameter_count
    return dict(sorted(out.items()))


def chat_template(header: GgufHeader | None) -> str:
    md = header.metadata if header else {}
    value = md.get("tokenizer.chat_template")
    return value if isinstance(value, str) else ""


def context_length(header: GgufHeader | None) -> int:
    md = header.metadata if header else {}
    arch = md.get("general.architecture")
    value = md.get(f"{arch}.context_length")
    return value if isinstance(value, int) else 0
