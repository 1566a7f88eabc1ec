"""API keys with roles: the key file and the store the gateway checks.

A key reads ``mo_<id>_<secret>``: 8 hex digits naming it (for ``keys list``
and ``keys revoke``; the id is not secret) and 43 base64url characters (256
random bits). Only its SHA-256 is kept, in ``<data_dir>/api_keys.json``
(mode 0600, replaced atomically), so the file can be read without exposing a
key; plain SHA-256 is enough for 256-bit secrets, which no one can guess or
brute-force.

Three sources feed one :class:`KeyStore`: that file (re-read when it
changes, so ``meshollama keys create/revoke`` act on a running node), the
shared keys a signed mesh policy hands to :meth:`KeyStore.set_shared`, and
the plain keys of ``gateway.api_keys``/``api_key_file`` (all ``admin``, as
they could do everything before roles existed).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MeshollamaError
from .roles import Role

log = logging.getLogger(__name__)
audit = logging.getLogger("meshollama.audit")

KEY_FILE = "api_keys.json"
RECHECK_SECONDS = 1.0  # a running node stats the key file at most this often
_KEY = re.compile(r"mo_([0-9a-f]{8})_[A-Za-z0-9_-]{43}\Z")
_ID = re.compile(r"[0-9a-f]{8}\Z")
_SHARED_ID = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")  # a policy may name its keys more freely
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


class KeyFileError(MeshollamaError):
    """The API key file cannot be read, parsed or written."""


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def key_id(token: str) -> str | None:
    """The id of a well-formed ``mo_<id>_<secret>`` key, else None."""
    m = _KEY.match(token)
    return m.group(1) if m else None


@dataclass(frozen=True)
class KeyEntry:
    """One accepted key, without the key: who it is and what it may do."""

    id: str
    name: str
    role: Role
    sha256: bytes
    created: str = ""
    source: str = "local"  # "local" (the key file), "shared" (mesh policy) or "config"

    @property
    def label(self) -> str:
        """How metrics and the audit log name it."""
        return self.name or self.id

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "role": str(self.role), "sha256": self.sha256.hex(),
                "created": self.created}


def entry_from_dict(raw: Any, source: str = "local") -> KeyEntry:
    """Validate one stored or shared entry; raises ValueError naming what is wrong."""
    if not isinstance(raw, Mapping):
        raise ValueError("expected an object")
    ident, sha, name = raw.get("id"), raw.get("sha256"), raw.get("name", "")
    role = Role.parse(raw.get("role"))
    if not isinstance(ident, str) or not (_SHARED_ID if source == "shared" else _ID).match(ident):
        raise ValueError(f"id: expected 8 hex digits, got {ident!r}")
    if role is None:
        raise ValueError(f"key {ident}: role must be admin, user or readonly, got {raw.get('role')!r}")
    if not isinstance(sha, str) or not _SHA256.match(sha):
        raise ValueError(f"key {ident}: sha256 must be 64 lower-case hex digits")
    if not isinstance(name, str):
        raise ValueError(f"key {ident}: name must be a string")
    created = raw.get("created", "")
    return KeyEntry(ident, name, role, bytes.fromhex(sha), created if isinstance(created, str) else "", source)


def new_key(role: str | Role, name: str = "", *, created: str | None = None) -> tuple[str, dict[str, str]]:
    """A fresh key and its storable entry ``{"id","name","role","sha256","created"}``.

    The plaintext is for the person who asked, once; keep only the entry.
    """
    parsed = Role.parse(str(role))
    if parsed is None:
        raise ValueError(f"role must be admin, user or readonly, got {role!r}")
    ident = secrets.token_hex(4)
    plaintext = f"mo_{ident}_{secrets.token_urlsafe(32)}"
    if created is None:
        created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    entry = KeyEntry(ident, name, parsed, digest(plaintext), created)
    return plaintext, entry.to_dict()


# --- the file ---------------------------------------------------------------------


def read_file(path: Path) -> list[KeyEntry] | None:
    """The entries of ``path``; None if there is no file. Raises :class:`KeyFileError`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
        items = data["keys"] if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise ValueError('expected {"keys": [...]}')
        return [entry_from_dict(item) for item in items]
    except (ValueError, KeyError) as exc:
        raise KeyFileError(f"{path}: {exc}") from exc


def write_file(path: Path, entries: Iterable[KeyEntry]) -> None:
    """Replace ``path`` atomically (a reader sees the old file or the new, never half), mode 0600."""
    path = Path(path)
    body = json.dumps({"version": 1, "keys": [e.to_dict() for e in entries]}, indent=2) + "\n"
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise KeyFileError(f"cannot write {path}: {exc.strerror or exc}") from exc
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize read-modify-write between two ``meshollama keys`` run at once."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; a rare race loses one change
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def create(path: Path, role: str | Role, name: str = "") -> tuple[str, KeyEntry]:
    """Add a new key to the file (created if absent); returns its plaintext and entry."""
    with _locked(Path(path)):
        entries = read_file(path) or []
        taken = {e.id for e in entries}
        while True:
            plaintext, raw = new_key(role, name)
            if raw["id"] not in taken:
                break
        entry = entry_from_dict(raw)
        write_file(path, [*entries, entry])
    return plaintext, entry


def revoke(path: Path, ident: str) -> KeyEntry | None:
    """Remove key ``ident`` from the file; None if it is not there."""
    with _locked(Path(path)):
        entries = read_file(path) or []
        gone = [e for e in entries if e.id == ident]
        if gone:
            write_file(path, [e for e in entries if e.id != ident])
    return gone[0] if gone else None


# --- the store the gateway checks ----------------------------------------------------


class KeyStore:
    """Every accepted key, matched in constant time.

    ``configured`` is what closes the gateway: any config key, any shared
    key, or the key file existing at all. An existing but empty file keeps
    the gateway closed, so revoking the last key locks everyone out rather
    than opening the gateway to all; delete the file to open it again.
    An unreadable or corrupt file also closes it, with an error logged.
    """

    def __init__(self, path: Path | None, config_keys: Iterable[str] = (), *,
                 recheck: float = RECHECK_SECONDS) -> None:
        self.path = path
        self.recheck = recheck
        self._config = tuple(
            KeyEntry(f"config-{n}", f"config-{n}", Role.ADMIN, digest(k), source="config")
            for n, k in enumerate(dict.fromkeys(k for k in config_keys if k), 1)
        )
        self._local: tuple[KeyEntry, ...] = ()
        self._shared: tuple[KeyEntry, ...] = ()
        self._required = False  # the mesh policy says keys are required, even with none left
        self._file_present = False
        self._signature: object = None
        self._checked_at: float | None = None
        if path is not None:
            self._signature = self._stat()
            self._reload(announce=False)

    @classmethod
    def for_config(cls, config: Any) -> KeyStore:
        """The store of a node: ``<node.data_dir>/api_keys.json`` plus ``gateway.api_keys``."""
        return cls(Path(config.node.data_dir) / KEY_FILE, config.gateway.api_keys or ())

    @property
    def configured(self) -> bool:
        return bool(self._config or self._shared or self._file_present or self._required)

    def entries(self) -> tuple[KeyEntry, ...]:
        return self._config + self._local + self._shared

    def set_shared(self, entries: Iterable[Mapping[str, Any]], *, required: bool = False) -> int:
        """Replace the mesh-wide keys (``{"id","name","role","sha256"}`` each).

        An entry that does not validate is skipped with a warning, so one
        odd entry (a role from a newer version) costs that key, not the
        others. Returns how many were accepted.
        """
        accepted = []
        for raw in entries:
            try:
                accepted.append(entry_from_dict(raw, source="shared"))
            except ValueError as exc:
                log.warning("shared API key skipped: %s", exc)
        self._shared = tuple(accepted)
        self._required = required or bool(accepted)
        return len(accepted)

    def match(self, token: str) -> KeyEntry | None:
        """The entry of ``token``, compared against every candidate (no early exit)."""
        candidate = digest(token)
        found = None
        for entry in self.entries():
            if hmac.compare_digest(candidate, entry.sha256):
                found = entry
        return found

    def refresh(self, now: float) -> None:
        """Re-read the key file if it changed; stats it at most once per ``recheck`` seconds.

        The file is replaced, never rewritten in place, so a new inode, mtime
        or size tells every change apart, even two within one second.
        """
        if self.path is None:
            return
        if self._checked_at is not None and now - self._checked_at < self.recheck:
            return
        self._checked_at = now
        signature = self._stat()
        if signature != self._signature:
            self._signature = signature
            self._reload(announce=True)

    def _stat(self) -> object:
        try:
            st = os.stat(self.path)  # type: ignore[arg-type]
        except FileNotFoundError:
            return None
        except OSError as exc:
            return ("error", str(exc))  # read_file below reports it
        return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)

    def _reload(self, *, announce: bool) -> None:
        before = {e.id for e in self._local}
        try:
            entries = read_file(self.path)  # type: ignore[arg-type]
        except KeyFileError as exc:
            log.error("%s; refusing every key from it until it is fixed", exc)
            entries, self._file_present = [], True  # fail closed
        else:
            self._file_present = entries is not None
        self._local = tuple(entries or ())
        after = {e.id for e in self._local}
        if announce and before != after:
            audit.info("key file reloaded path=%s added=%s removed=%s", self.path,
                       ",".join(sorted(after - before)) or "-", ",".join(sorted(before - after)) or "-")
