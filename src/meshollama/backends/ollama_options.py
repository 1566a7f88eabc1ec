"""Ollama's option values: Go durations, ``keep_alive``, ``think``, sampling (sans-IO).

Each parser takes a decoded JSON value and returns a plain Python value, or
raises the :class:`~meshollama.errors.RequestError` Ollama would answer (§1.9
of ``shared/reference/ollama-api.md``). :func:`sampling` maps a request's
``options`` object to the :class:`Sampling` settings the engine uses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import BadRequest, RequestError
from .ollama_api import json_type


# --- durations and think (§1.9) --------------------------------------------------

_DURATION = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_go_duration(text: str) -> float:
    """Go's ``time.ParseDuration`` in seconds; raises ValueError with Go's text."""
    s = text.strip()
    sign = -1.0 if s.startswith("-") else 1.0
    body = s.lstrip("+-")
    if body == "0":
        return 0.0
    total, pos = 0.0, 0
    for m in _DURATION.finditer(body):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    if not body or pos != len(body):
        raise ValueError(f'time: invalid duration "{text}"')
    return sign * total


def parse_keep_alive(value: Any) -> float | None:
    """Seconds; ``None`` when absent; negative means forever. 400 on a bad value."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRequest("Unsupported type: 'bool'")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        if value == "":
            return None
        try:
            return parse_go_duration(value)
        except ValueError as e:
            raise BadRequest(str(e)) from None
    raise BadRequest(f"Unsupported type: '{json_type(value)}'")


_THINK_LEVELS = ("high", "medium", "low", "max")


def parse_think(value: Any) -> bool:
    """True when thinking is asked for; 400 ``invalid think value`` on nonsense."""
    if value is None or value is False:
        return False
    if value is True:
        return True
    if isinstance(value, str):
        if value in _THINK_LEVELS:
            return True
        if value == "":
            return False
    raise BadRequest(f'invalid think value: {json.dumps(value)} (must be "high", "medium", "low", true, or false)')


# --- sampling options (§1.9) ------------------------------------------------------

_FLOAT_OPTIONS = (
    "temperature", "top_p", "min_p", "typical_p", "repeat_penalty",
    "presence_penalty", "frequency_penalty",
)
_INT_OPTIONS = (
    "top_k", "seed", "num_predict", "num_ctx", "num_keep", "repeat_last_n",
    "num_batch", "num_gpu", "main_gpu", "num_thread", "draft_num_predict",
)
_BOOL_OPTIONS = ("use_mmap",)


@dataclass(frozen=True)
class Sampling:
    """Sampling settings for one request, with Ollama's defaults.

    ``max_tokens`` None means "until the context is full" (num_predict < 0).
    ``num_ctx`` is recorded but the embedded backend keeps the context it was
    loaded with (it does not reload per request; see embedded.py).
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    num_ctx: int | None = None


def sampling(options: Mapping[str, Any] | None) -> Sampling:
    """Map Ollama ``options`` to :class:`Sampling`; 500 on a wrong value type, like Ollama."""
    opts = dict(options or {})
    kw: dict[str, Any] = {}
    for key in _FLOAT_OPTIONS:
        if key in opts and opts[key] is not None:
            v = opts[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise RequestError(f'option "{key}" must be of type float32', 500)
            kw[key] = float(v)
    ints: dict[str, int] = {}
    for key in _INT_OPTIONS:
        if key in opts and opts[key] is not None:
            v = opts[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise RequestError(f'option "{key}" must be of type integer', 500)
            ints[key] = int(v)
    for key in _BOOL_OPTIONS:
        if key in opts and opts[key] is not None and not isinstance(opts[key], bool):
            raise RequestError(f'option "{key}" must be of type boolean', 500)
    if opts.get("stop") is not None:
        stop = opts["stop"]
        if not isinstance(stop, list):
            raise RequestError('option "stop" must be of type array', 500)
        if not all(isinstance(s, str) for s in stop):
            raise RequestError('option "stop" must be of an array of strings', 500)
        kw["stop"] = tuple(s for s in stop if s)
    if "top_k" in ints:
        kw["top_k"] = ints["top_k"]
    if ints.get("seed", -1) >= 0:
        kw["seed"] = ints["seed"] & 0xFFFFFFFF
    if ints.get("num_predict", -1) >= 0:
        kw["max_tokens"] = ints["num_predict"]
    if ints.get("num_ctx", 0) > 0:
        kw["num_ctx"] = ints["num_ctx"]
    return Sampling(**kw)
