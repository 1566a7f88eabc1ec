"""``meshollama keys create|list|revoke``: the gateway's API keys on this node.

They edit ``<data_dir>/api_keys.json`` directly, so they work whether or not
the node runs; a running node picks the change up within a second. A new key
is printed once, on stdout alone (``KEY=$(meshollama keys create ...)``);
the file keeps only its SHA-256. Creating the first key closes a gateway
that was open to everyone; revoking the last one does not reopen it (delete
the file for that).
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .gateway.keystore import KEY_FILE, create, read_file, revoke
from .gateway.roles import ROLE_NAMES

S = argparse.SUPPRESS
_NAME = re.compile(r"[A-Za-z0-9._@+-]{0,64}\Z")
audit = logging.getLogger("meshollama.audit")


def add_parser(subparsers: Any, common: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Add ``keys`` to the top-level subparsers; ``common`` adds --config/--data-dir
    (as ``cli.py`` does for every command), else they are added here."""

    def flags(sp: argparse.ArgumentParser) -> None:
        if common is not None:
            common(sp)
        else:
            sp.add_argument("--config", default=S, help="YAML config file (also MESHOLLAMA_CONFIG)")
            sp.add_argument("--data-dir", default=S, help="identity and state directory (default ~/.meshollama)")

    keys = subparsers.add_parser("keys", help="create, list and revoke the gateway's API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    make = keys_sub.add_parser("create", help="create a key and print it (once)")
    flags(make)
    make.add_argument("--role", required=True, choices=ROLE_NAMES,
                      help="admin: everything; user: inference and listings; readonly: listings")
    make.add_argument("--name", default="", help="a label for metrics and the audit log (letters, digits, ._@+-)")
    listing = keys_sub.add_parser("list", help="list the keys (never the keys themselves)")
    flags(listing)
    listing.add_argument("--json", action="store_true")
    drop = keys_sub.add_parser("revoke", help="revoke a key; a running node refuses it within a second")
    flags(drop)
    drop.add_argument("id", metavar="ID", help="the key's 8-hex-digit id (see keys list)")


def key_file(args: argparse.Namespace) -> tuple[Path, Any]:
    from .cli import _load

    config = _load(args)
    return Path(config.node.data_dir) / KEY_FILE, config


def run(args: argparse.Namespace) -> int:
    """Exit codes: 0 ok, 1 no such key or an unusable key file (raised as KeyFileError), 2 bad usage."""
    path, config = key_file(args)
    if args.keys_command == "create":
        return _create(path, config, args.role, args.name)
    if args.keys_command == "list":
        return _list(path, args.json)
    if args.keys_command == "revoke":
        return _revoke(path, config, args.id.lower())
    raise AssertionError(args.keys_command)


def _audit(config: Any, message: str) -> None:
    if not logging.getLogger().handlers:  # a bare CLI process: let the record reach stderr
        from . import logs

        logs.setup(config.node.log_level, config.node.log_format)
    if audit.level == logging.NOTSET:
        audit.setLevel(logging.INFO)
    audit.info("%s by=%s", message, _os_user())


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (a container without a passwd entry)
        return "?"


def _create(path: Path, config: Any, role: str, name: str) -> int:
    if not _NAME.match(name):
        print("meshollama: --name: up to 64 letters, digits and ._@+- only", file=sys.stderr)
        return 2
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    first = read_file(path) is None
    plaintext, entry = create(path, role, name)
    print(plaintext)
    print(f"created key {entry.id} (role {entry.role}{', name ' + name if name else ''}) in {path}; "
          "it is shown only this once: store it now", file=sys.stderr)
    if first:
        print("the gateway now requires an API key from every caller", file=sys.stderr)
    _audit(config, f"key created id={entry.id} name={name or '-'} role={entry.role}")
    return 0


def _list(path: Path, as_json: bool) -> int:
    entries = read_file(path)
    rows = [{k: v for k, v in e.to_dict().items() if k != "sha256"} for e in entries or ()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if entries is None:
        print(f"no key file ({path}): the gateway takes no keys from it", file=sys.stderr)
        return 0
    table = [("ID", "NAME", "ROLE", "CREATED")] + [(r["id"], r["name"] or "-", r["role"], r["created"]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for row in table:
        print("  ".join(row[i].ljust(widths[i]) for i in range(3)) + "  " + row[3])
    if not rows:
        print(f"no keys: the gateway refuses every caller (delete {path} to open it)", file=sys.stderr)
    return 0


def _revoke(path: Path, config: Any, ident: str) -> int:
    gone = revoke(path, ident)
    if gone is None:
        print(f"meshollama: no key {ident} in {path} (see meshollama keys list)", file=sys.stderr)
        return 1
    print(f"revoked key {gone.id}{' (' + gone.name + ')' if gone.name else ''}", file=sys.stderr)
    _audit(config, f"key revoked id={gone.id} name={gone.name or '-'} role={gone.role}")
    return 0
