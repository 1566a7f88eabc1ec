"""Choosing this node's backend from the configuration.

Decide first, act after: :func:`decide` is a pure function of the configured
kind and two facts (does an Ollama answer at ``ollama.url``; can llama.cpp be
imported), tested with a table. :func:`create_backend` gathers the facts and
builds the objects; :func:`select_backend` is the same with a non-blocking
probe, for callers already inside trio.

``backend.kind``:

* ``ollama``: an :class:`~.ollama.OllamaBackend` at ``ollama.url``, even if
  Ollama is not up yet (it announces models once it is);
* ``embedded``: llama.cpp in-process (``backends/embedded.py``); a
  :class:`~meshollama.errors.ConfigError` if llama-cpp-python is missing;
* ``none``: a pure gateway, :class:`~.base.NoBackend`;
* ``auto``: Ollama if ``ollama.spawn`` is set or an Ollama answers
  ``/api/version`` at ``ollama.url``; else embedded if llama.cpp imports;
  else none, with a warning saying how to get a backend.

With ``ollama.spawn`` the result also carries a
:class:`~.spawn.ManagedOllama` in :attr:`Selected.services`: the node starts
every service (``await nursery.start(service.serve)``) before the backend.
If an Ollama already answers at ``ollama.url``, it is used and none is
spawned (a second one could not bind the port and would restart forever).
"""

from __future__ import annotations

import os

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import trio

from ..errors import ConfigError
from .base import Backend, NoBackend
from .ollama import DEFAULT_URL, OllamaBackend, split_url
from .spawn import ManagedOllama

log = logging.getLogger("meshollama.backend")

KINDS = ("auto", "ollama", "embedded", "none")


class Service(Protocol):
    """Something else the node must run for its backend (e.g. a managed Ollama)."""

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None: ...


@dataclass(frozen=True)
class Decision:
    kind: str  # "ollama" | "embedded" | "none"
    spawn: bool  # start and supervise `ollama serve`
    reason: str  # one line for the start-up log


@dataclass(frozen=True)
class Selected:
    """The backend to serve, plus services the node must start before it."""

    backend: Backend
    services: tuple[Service, ...] = ()
    reason: str = ""


def decide(kind: str, *, spawn: bool, ollama_up: bool | None, embedded_ok: bool) -> Decision:
    """Pure choice of backend. ``ollama_up`` None means "not probed" (treated as down)."""
    if kind not in KINDS:
        raise ConfigError("backend.kind", f"must be one of {', '.join(KINDS)}, not {kind!r}")
    if spawn and kind in ("embedded", "none"):
        raise ConfigError("ollama.spawn", f"--spawn-ollama needs backend.kind 'ollama' or 'auto', not {kind!r}")
    if kind == "none":
        return Decision("none", False, "backend.kind is none: gateway only")
    if kind == "embedded":
        if not embedded_ok:
            raise ConfigError(
                "backend.kind", "'embedded' needs llama-cpp-python: pip install 'meshollama[embedded]'"
            )
        return Decision("embedded", False, "backend.kind is embedded")
    if spawn:
        if ollama_up:
            return Decision("ollama", False, "an Ollama already answers at ollama.url: using it, not spawning")
        return Decision("ollama", True, "ollama.spawn is set: running our own `ollama serve`")
    if kind == "ollama":
        return Decision("ollama", False, "backend.kind is ollama")
    if ollama_up:
        return Decision("ollama", False, "auto: Ollama answers at ollama.url")
    if embedded_ok:
        return Decision("embedded", False, "auto: no Ollama at ollama.url, llama-cpp-python available")
    return Decision(
        "none",
        False,
        "auto: no Ollama at ollama.url and llama-cpp-python not installed, so this node serves no "
        "models (gateway only); start Ollama there, pass --spawn-ollama, or install meshollama[embedded]",
    )


def _needs_probe(kind: str, spawn: bool) -> bool:
    return kind == "auto" or spawn


def _settings(config: Any) -> tuple[str, Any]:
    return str(config.backend.kind), config.ollama


def embedded_available() -> bool:
    """Whether ``backends/embedded.py`` says llama.cpp can be used here."""
    try:
        module = importlib.import_module(".embedded", __package__)
        return bool(module.available())
    except ImportError:
        return False
    except Exception:  # a broken optional backend must not stop the node
        log.exception("checking the embedded backend failed; treating it as unavailable")
        return False


def _version_ok(response: httpx.Response) -> bool:
    try:
        return response.status_code == 200 and isinstance(response.json().get("version"), str)
    except (ValueError, AttributeError):
        return False


async def probe_ollama(url: str, timeout: float = 1.0) -> bool:
    """True if an Ollama answers ``GET /api/version`` at ``url`` within ``timeout``."""
    try:
        base, host = split_url(url)
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
            return _version_ok(await client.get(base + "/api/version", headers={"host": host}))
    except (httpx.HTTPError, ConfigError):
        return False


def probe_ollama_blocking(url: str, timeout: float = 1.0) -> bool:
    """:func:`probe_ollama` without trio, for :func:`create_backend` called outside an await."""
    try:
        base, host = split_url(url)
        with httpx.Client(timeout=timeout, trust_env=False) as client:
            return _version_ok(client.get(base + "/api/version", headers={"host": host}))
    except (httpx.HTTPError, ConfigError):
        return False


def create_backend(config: Any, *, ollama_up: bool | None = None, embedded_ok: bool | None = None) -> Selected:
    """Build the backend ``config`` asks for (reads ``config.backend`` and ``config.ollama``).

    When the choice depends on whether Ollama answers and ``ollama_up`` is not
    given, this probes with a *blocking* request (at most ``probe_timeout``,
    instant when nothing listens); inside trio prefer :func:`select_backend`.
    """
    kind, ollama = _settings(config)
    spawn = bool(getattr(ollama, "spawn", False))
    url = str(getattr(ollama, "url", DEFAULT_URL))
    probe_timeout = float(getattr(ollama, "probe_timeout", 1.0))
    if ollama_up is None and _needs_probe(kind, spawn):
        ollama_up = probe_ollama_blocking(url, probe_timeout)
    return _build(config, kind, spawn, ollama_up, embedded_ok)


async def select_backend(config: Any) -> Selected:
    """:func:`create_backend` with the Ollama probe done without blocking trio."""
    kind, ollama = _settings(config)
    spawn = bool(getattr(ollama, "spawn", False))
    ollama_up = None
    if _needs_probe(kind, spawn):
        url = str(getattr(ollama, "url", DEFAULT_URL))
        ollama_up = await probe_ollama(url, float(getattr(ollama, "probe_timeout", 1.0)))
    return _build(config, kind, spawn, ollama_up, None)


def _build(config: Any, kind: str, spawn: bool, ollama_up: bool | None, embedded_ok: bool | None) -> Selected:
    if embedded_ok is None:
        # Only look when it can matter: importing llama.cpp is slow.
        matters = kind == "embedded" or (kind == "auto" and not spawn and not ollama_up)
        embedded_ok = embedded_available() if matters else False
    decision = decide(kind, spawn=spawn, ollama_up=ollama_up, embedded_ok=embedded_ok)
    (log.warning if decision.kind == "none" and kind == "auto" else log.info)("backend: %s", decision.reason)
    if decision.kind == "none":
        return Selected(NoBackend(), (), decision.reason)
    if decision.kind == "embedded":
        module = importlib.import_module(".embedded", __package__)
        # The whole config, not config.embedded: model_dir defaults to <data_dir>/models.
        return Selected(module.EmbeddedBackend.from_config(config), (), decision.reason)
    ollama = config.ollama
    url = str(getattr(ollama, "url", DEFAULT_URL))
    num_parallel = int(getattr(ollama, "num_parallel", 1))
    backend = OllamaBackend(
        url,
        num_parallel=num_parallel,
        refresh_interval=float(getattr(ollama, "refresh_interval", 5.0)),
        probe_timeout=float(getattr(ollama, "probe_timeout", 1.0)),
        connect_timeout=float(getattr(getattr(config, "gateway", None), "connect_timeout", 5.0)),
    )
    services: tuple[Service, ...] = ()
    if decision.spawn:
        _, host_port = split_url(url)
        env = dict(os.environ)
        if getattr(ollama, "models_dir", None):  # the spawned Ollama reads the store pulls write into
            env["OLLAMA_MODELS"] = str(ollama.models_dir)
        managed = ManagedOllama(str(getattr(ollama, "binary", "ollama")), host_port, num_parallel=num_parallel,
                                env=env)
        managed.resolve()  # a missing binary is a start-up error, reported before anything runs
        services = (managed,)
    return Selected(backend, services, decision.reason)
