"""Config value kinds: how one value is checked, typed (YAML, flags) or as
environment text, and the validators behind them (``meshollama.config``'s schema
uses them)."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import multiaddr

from .errors import ConfigError
from .mesh import bootstrap_url

# --- kinds: how one value is checked, typed (YAML, flags) or as env text -----


def _got(value: Any) -> str:
    text = repr(str(value) if isinstance(value, Path) else value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Kind:
    """``check`` returns the value, raises TypeError for "not the expected form"
    (answered with the generic message) or ValueError with a message of its own."""

    expected = "a value"

    def check(self, raw: Any) -> Any:
        raise NotImplementedError

    def parse(self, text: str) -> Any:
        """Environment text to the typed value ``check`` takes."""
        return text

    def value(self, key: str, raw: Any, *, from_text: bool = False) -> Any:
        try:
            return self.check(self.parse(raw) if from_text else raw)
        except TypeError:
            raise ConfigError(key, f"expected {self.expected}, got {_got(raw)}") from None
        except ValueError as e:
            raise ConfigError(key, str(e)) from None


class _Str(_Kind):
    def __init__(self, expected: str = "a non-empty string", test: Callable[[str], str] = str.strip,
                 empty: bool = False):
        self.expected, self.test, self.empty = expected, test, empty

    def check(self, raw: Any) -> str:
        if isinstance(raw, str) and not raw.strip() and self.empty:
            return ""
        if not isinstance(raw, str) or not raw.strip():
            raise TypeError
        return self.test(raw.strip())


class _Choice(_Str):
    def __init__(self, *options: str):
        super().__init__("one of " + ", ".join(options), self._pick)
        self.options = options

    def _pick(self, text: str) -> str:
        if text.lower() not in self.options:
            raise TypeError
        return text.lower()


class _Num(_Kind):
    """An int or float in a range. Floats take ints; neither takes a bool (an int in Python)."""

    def __init__(self, typ: type, lo: float, hi: float | None = None, *, open_lo: bool = False):
        self.typ, self.lo, self.hi, self.open_lo = typ, lo, hi, open_lo
        bound = f"between {lo:g} and {hi:g}" if hi is not None else f"{'>' if open_lo else '>='} {lo:g}"
        self.expected = f"{'an integer' if typ is int else 'a number'} {bound}"

    def check(self, raw: Any) -> Any:
        types = (int,) if self.typ is int else (int, float)
        if isinstance(raw, bool) or not isinstance(raw, types) or not math.isfinite(raw):
            raise TypeError
        if raw < self.lo or (self.open_lo and raw == self.lo) or (self.hi is not None and raw > self.hi):
            raise TypeError
        return self.typ(raw)

    def parse(self, text: str) -> Any:
        try:
            return self.typ(text)
        except ValueError:
            raise TypeError from None


def _int(lo: int) -> _Num:
    return _Num(int, lo)


def _positive() -> _Num:
    return _Num(float, 0, open_lo=True)


_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True,
               "0": False, "false": False, "no": False, "off": False}


class _Bool(_Kind):
    expected = "true or false"

    def check(self, raw: Any) -> bool:
        if not isinstance(raw, bool):
            raise TypeError
        return raw

    def parse(self, text: str) -> bool:
        if text.lower() not in _BOOL_WORDS:
            raise ValueError(f"expected one of 1/0/true/false/yes/no/on/off, got {_got(text)}")
        return _BOOL_WORDS[text.lower()]


class _Path(_Kind):
    def __init__(self, optional: bool = False):
        self.optional = optional
        self.expected = "a file system path" + (" or null" if optional else "")

    def check(self, raw: Any) -> Path | None:
        if raw is None and self.optional:
            return None
        raw = os.fspath(raw) if isinstance(raw, os.PathLike) else raw
        if not isinstance(raw, str) or not raw.strip():
            raise TypeError
        return Path(raw.strip()).expanduser()

    def parse(self, text: str) -> str | None:
        return None if text == "" and self.optional else text  # an empty variable: no file


class _List(_Kind):
    """A YAML list, or comma-separated text; items are checked and named ``key[i]``."""

    def __init__(self, item: _Kind, min_len: int = 0):
        self.item, self.min_len = item, min_len
        self.expected = f"a list (each {item.expected})" + (", at least one" if min_len else "")

    def value(self, key: str, raw: Any, *, from_text: bool = False) -> tuple[Any, ...]:
        items = [p.strip() for p in raw.split(",") if p.strip()] if from_text else raw
        if not isinstance(items, (list, tuple)) or len(items) < self.min_len:
            raise ConfigError(key, f"expected {self.expected}, got {_got(raw)}")
        return tuple(self.item.value(f"{key}[{i}]", v) for i, v in enumerate(items))


# --- tests for particular strings (TypeError: not the expected form) ----------


def _multiaddr(text: str) -> list[str]:
    """Protocol names of a multiaddr, or ValueError with the library's reason."""
    try:
        return [p.name for p in multiaddr.Multiaddr(text).protocols()]
    except (multiaddr.exceptions.Error, ValueError, TypeError) as e:
        reason = re.sub(r"^Invalid MultiAddr '.*?': | \(string: .*\)$", "", str(e))
        raise ValueError(f"not a valid multiaddr {text!r}: {reason}") from None


def _listen_addr(text: str) -> str:
    if _multiaddr(text) not in (["ip4", "tcp"], ["ip6", "tcp"]):
        raise TypeError
    return text


def _bootstrap_addr(text: str) -> str:
    if bootstrap_url.is_url(text):  # a node's API: its /healthz says whom to dial
        return bootstrap_url.check_url(text)
    names = _multiaddr(text)
    if len(names) < 2 or names[-1] != "p2p" or names.count("p2p") > 1:
        raise TypeError
    return text


def _host_port(text: str) -> str:
    m = re.fullmatch(r"(?:\[([^\]]+)\]|[^:\[\]\s]+):(\d{1,5})", text)
    if m is None or int(m[2]) > 65535:
        raise TypeError
    if m[1] is not None:
        try:
            ipaddress.IPv6Address(m[1])
        except ValueError:
            raise TypeError from None
    return text


def _http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TypeError
    return text.rstrip("/")  # callers join paths onto it


def _api_key(text: str) -> str:
    if any(c.isspace() for c in text):
        raise TypeError
    return text


def _authority(text: str) -> str:
    # The format is checked here without importing the crypto (trust.keys has the codec).
    m = re.fullmatch(r"ed25519:([A-Za-z0-9_-]{43})", text)
    if m is None:
        raise TypeError
    return text


def _host_name(text: str) -> str:
    if text != "*" and not re.fullmatch(r"(\*\.)?[A-Za-z0-9.\-\[\]:]+", text):
        raise TypeError
    return text.lower()


def _origin(text: str) -> str:
    if text != "*" and (urlsplit(text).scheme not in ("http", "https") or not urlsplit(text).netloc):
        raise TypeError
    return text.rstrip("/")


def _announce_addr(text: str) -> str:
    names = _multiaddr(text)
    if len(names) < 2 or names[0] not in ("ip4", "ip6", "dns", "dns4", "dns6") or names[1] != "tcp":
        raise TypeError
    if names[2:]:  # our /p2p/ id is added for us; relay addresses come from reservations
        raise TypeError
    if names[0] in ("ip4", "ip6") and ipaddress.ip_address(multiaddr.Multiaddr(text).value_for_protocol(names[0])).is_unspecified:
        raise ValueError(f"{text!r} is a wildcard: announce an address others can dial")
    return text


_LISTEN = _List(_Str("a multiaddr /ip4/<address>/tcp/<port> or /ip6/<address>/tcp/<port>", _listen_addr), 1)
_ANNOUNCE = _List(_Str("a multiaddr /ip4|ip6|dns4|dns6/<host>/tcp/<port> (no /p2p/: ours is added)", _announce_addr))
_BOOTSTRAP = _List(_Str("a multiaddr ending in /p2p/<peer id>, or a node's API URL http(s)://HOST:PORT",
                        _bootstrap_addr))
_API_KEY = _Str("an API key without whitespace", _api_key)


# --- the schema ---------------------------------------------------------------
