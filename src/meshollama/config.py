"""Layered, validated, frozen configuration.

Four layers, lowest first: built-in defaults, a YAML file, environment
variables ``MESHOLLAMA_<SECTION>_<KEY>``, and overrides from command-line flags
(only the flags the user typed). Each value is checked where it enters, so an
error names the key and the layer it came from; rules between keys are checked
once on the merged result, which is a tree of frozen dataclasses.

The section dataclasses are the schema (``config_schema``): each field carries
its kind (the validator, ``config_kinds``) and a one-line doc in ``metadata``;
environment names and the parsing of every layer derive from them. ``Config()`` gives the defaults
without validation (handy in tests); start-up goes through :func:`load_config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import yaml

from .config_kinds import (
    _got,
    _Kind,
)
from .config_schema import (
    BackendConfig,
    Config,
    EmbeddedConfig,
    GatewayConfig,
    MeshConfig,
    ModelsConfig,
    NodeConfig,
    OllamaConfig,
    P2PConfig,
    TracingConfig,
)
from .errors import ConfigError

__all__ = [
    "ENV_PREFIX", "CONFIG_ENV", "OTHER_ENV", "Config", "NodeConfig", "P2PConfig", "GatewayConfig",
    "MeshConfig", "BackendConfig", "OllamaConfig", "EmbeddedConfig", "ModelsConfig", "TracingConfig", "load_config", "check_file", "config_to_dict",
]

ENV_PREFIX = "MESHOLLAMA_"
CONFIG_ENV = "MESHOLLAMA_CONFIG"  # the config file path, when --config is not given
# MESHOLLAMA_ variables that are not config keys: the file path, and the key the
# client commands (`meshollama peers/status`) send to a gateway.
# MESHOLLAMA_TEST_FAULTS=1 arms the fault suite's hook (SIGUSR2 fails the libp2p host); never set in use.
OTHER_ENV = frozenset({CONFIG_ENV, "MESHOLLAMA_API_KEY", "MESHOLLAMA_TEST_FAULTS"})


# Read off the dataclasses: section -> class, dotted key -> kind, env name -> dotted key.
_SECTIONS: dict[str, Any] = {f.name: f.default_factory for f in dataclasses.fields(Config)}
_KINDS: dict[str, _Kind] = {
    f"{s}.{f.name}": f.metadata["kind"] for s, cls in _SECTIONS.items() for f in dataclasses.fields(cls)
}
_ENV_KEYS: dict[str, str] = {ENV_PREFIX + k.replace(".", "_").upper(): k for k in _KINDS}


# --- the layers ---------------------------------------------------------------


def _unknown(key: str) -> ConfigError:
    section = key.partition(".")[0]
    if section not in _SECTIONS:
        return ConfigError(section, f"unknown section {section!r} (known: {', '.join(_SECTIONS)})")
    known = ", ".join(f.name for f in dataclasses.fields(_SECTIONS[section]))
    return ConfigError(key, f"unknown key (known: {known})")


def _checked(key: str, raw: Any, where: str, *, from_text: bool = False) -> Any:
    """One value through its kind; the error also says which layer it came from."""
    if key not in _KINDS:
        raise _unknown(key)
    try:
        return _KINDS[key].value(key, raw.strip() if from_text else raw, from_text=from_text)
    except ConfigError as e:
        raise ConfigError(e.key, f"{e.message} ({where})") from None


class _Loader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys, where YAML would silently keep the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # the base class reports unhashable keys
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_text(path: Path, key: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(key, f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(key, f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None


def _from_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(_read_text(path, "file"), Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("file", f"{path}: invalid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        got = type(data).__name__
        raise ConfigError("file", f"{path}: expected a mapping of sections at the top, got {got}")
    out: dict[str, Any] = {}
    for section, keys in data.items():
        if str(section) not in _SECTIONS:
            raise _unknown(str(section))
        if keys is None:  # a section whose keys are all commented out
            continue
        if not isinstance(keys, dict):
            raise ConfigError(str(section), f"expected a mapping of keys, got {_got(keys)} (in {path})")
        for name, raw in keys.items():
            out[f"{section}.{name}"] = _checked(f"{section}.{name}", raw, f"in {path}")
    return out


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in OTHER_ENV:
            continue
        if var not in _ENV_KEYS:
            close = difflib.get_close_matches(var, [*_ENV_KEYS, *sorted(OTHER_ENV)], n=1, cutoff=0.8)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(var, f"unknown environment variable{hint} (see docs/configuration.md)")
        out[_ENV_KEYS[var]] = _checked(_ENV_KEYS[var], env[var], f"from {var}", from_text=True)
    return out


def _from_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    # A flag parsed without a type= arrives as a string: read it as env text.
    return {key: _checked(key, raw, "from the command line", from_text=isinstance(raw, str))
            for key, raw in overrides.items()}


# --- assembling ---------------------------------------------------------------


def _read_key_file(path: Path) -> tuple[str, ...]:
    key, keys = "gateway.api_key_file", []
    for n, line in enumerate(_read_text(path, key).splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            if any(c.isspace() for c in line):
                raise ConfigError(key, f"{path} line {n}: an API key must not contain whitespace")
            keys.append(line)
    if not keys:  # almost surely a mistake, and serving without auth is the wrong way to fail
        raise ConfigError(key, f"{path}: no keys in file (one key per line, '#' starts a comment)")
    return tuple(keys)


def _build(values: Mapping[str, Any]) -> Config:
    by_section: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    for key, value in values.items():
        section, _, name = key.partition(".")
        by_section[section][name] = value
    cfg = Config(**{s: cls(**by_section[s]) for s, cls in _SECTIONS.items()})

    p = cfg.p2p
    if not p.gossip_degree_low <= p.gossip_degree <= p.gossip_degree_high:
        raise ConfigError("p2p.gossip_degree", (
            "expected gossip_degree_low <= gossip_degree <= gossip_degree_high, "
            f"got {p.gossip_degree_low} <= {p.gossip_degree} <= {p.gossip_degree_high}"))
    if p.max_request_bytes > p.max_buffered_bytes:
        raise ConfigError("p2p.max_request_bytes", (
            f"expected at most p2p.max_buffered_bytes ({p.max_buffered_bytes}), got {p.max_request_bytes}"))
    if p.max_inbound_per_peer > p.max_inbound_streams:
        raise ConfigError("p2p.max_inbound_per_peer", (
            f"expected at most p2p.max_inbound_streams ({p.max_inbound_streams}), "
            f"got {p.max_inbound_per_peer}"))
    g = cfg.gateway
    if (g.tls_cert is None) != (g.tls_key is None):
        raise ConfigError("gateway.tls_cert", "expected both gateway.tls_cert and gateway.tls_key, or neither")
    if g.tls_client_ca is not None and g.tls_cert is None:
        raise ConfigError("gateway.tls_client_ca", "client certificates need TLS: set gateway.tls_cert and tls_key")
    if g.jwt_secret_file is not None and g.jwt_public_key_file is not None:
        raise ConfigError("gateway.jwt_secret_file", "expected one of jwt_secret_file and jwt_public_key_file")
    if g.api_key_file is not None:
        merged = tuple(dict.fromkeys(g.api_keys + _read_key_file(g.api_key_file)))
        cfg = dataclasses.replace(cfg, gateway=dataclasses.replace(g, api_keys=merged))
    return cfg


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults < YAML file < ``MESHOLLAMA_*`` environment < overrides, validated once.

    ``env`` defaults to ``os.environ``; its ``MESHOLLAMA_CONFIG`` names the file
    when ``path`` is None. ``overrides`` maps dotted keys (``"p2p.bootstrap"``)
    to values of flags the user typed; typed values are checked like YAML,
    strings like environment text. Raises :class:`ConfigError` naming the key.
    """
    env = os.environ if env is None else env
    if path is None:
        path = env.get(CONFIG_ENV) or None
    values = _from_file(Path(path).expanduser()) if path is not None else {}
    values.update(_from_env(env))
    values.update(_from_overrides(overrides or {}))
    return _build(values)


def check_file(path: str | os.PathLike[str]) -> Config:
    """Validate one YAML file alone, without environment or flags (``meshollama config check``)."""
    return load_config(path, env={})


def config_to_dict(cfg: Config, *, redact: bool = True) -> dict[str, dict[str, Any]]:
    """Nested plain dict (paths as str, tuples as lists, None kept) for printing or YAML.

    API keys read ``"***"`` unless ``redact=False``: this output lands in logs and bug reports.
    """
    out: dict[str, dict[str, Any]] = {}
    for section in _SECTIONS:
        values = dataclasses.asdict(getattr(cfg, section))
        if redact and "api_keys" in values:
            values["api_keys"] = ["***"] * len(values["api_keys"])
        if redact and section == "tracing":  # collector credentials
            values["headers"] = [h.split("=", 1)[0] + "=***" for h in values["headers"]]
            # Refused by the loader; a TracingConfig built in code may still carry one.
            values["otlp_endpoint"] = re.sub(r"(?<=//)[^/?#]*@", "***@", values["otlp_endpoint"])
        out[section] = {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
                        for k, v in values.items()}
    return out
