"""The node's Ed25519 identity, kept in the data dir so the peer ID is stable.

The key is stored in libp2p's protobuf private-key encoding (the same bytes
go-libp2p and js-libp2p use), in ``<data_dir>/identity.key`` with mode 0600.
It is created on first start and reused on every later start. This module
does the file handling; the libp2p key handling (generation, encoding, peer
ID) is in :mod:`meshollama.p2p.keys`, the only place that imports py-libp2p.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import IdentityError
from .p2p import keys

KEY_FILE = "identity.key"


def key_path(data_dir: Path) -> Path:
    return Path(data_dir) / KEY_FILE


def load_or_create(data_dir: Path):
    """Return the node's libp2p ``KeyPair``, creating and saving one on first use."""
    path = key_path(data_dir)
    if path.exists():
        try:
            return keys.key_pair_from_bytes(path.read_bytes())
        except Exception as exc:  # foreign error at the edge -> ours
            raise IdentityError(f"cannot read identity key {path}: {exc}") from exc
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        kp = keys.new_key_pair()
        data = keys.private_key_bytes(kp)
        # Write to a temp file created 0600 and rename, so a crash never leaves
        # a half-written key and the key is never briefly world-readable.
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        os.chmod(path, 0o600)
    except OSError as exc:
        raise IdentityError(f"cannot write identity key {path}: {exc}") from exc
    return kp


# --- private-network pre-shared key (libp2p "swarm.key" format) -------------

PSK_HEADER = "/key/swarm/psk/1.0.0/"


def write_psk(path: Path) -> None:
    """Write a new random 32-byte PSK in the standard swarm.key format, mode 0600."""
    path = Path(path)
    if path.exists():
        raise IdentityError(f"{path} already exists; refusing to overwrite a key")
    text = f"{PSK_HEADER}\n/base16/\n{os.urandom(32).hex()}\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def read_psk(path: Path) -> str:
    """Read a swarm.key file (or a bare 64-hex line) and return the key as 64 hex chars."""
    try:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    except OSError as exc:
        raise IdentityError(f"cannot read PSK file {path}: {exc}") from exc
    if lines and lines[0] == PSK_HEADER:
        if len(lines) != 3 or lines[1] != "/base16/":
            raise IdentityError(f"PSK file {path}: expected '{PSK_HEADER}', '/base16/', then 64 hex chars")
        lines = lines[2:]
    if len(lines) != 1:
        raise IdentityError(f"PSK file {path}: expected one line of 64 hex chars")
    key = lines[0].lower()
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise IdentityError(f"PSK file {path}: key must be 64 hex characters (32 bytes)")
    return key
