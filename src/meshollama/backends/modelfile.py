"""Ollama Modelfiles: parse them as Ollama does, and write them back (sans-IO).

The embedded backend stores model customisations (template, system prompt,
parameters, messages, licenses) as Modelfiles beside its GGUF files (see
:mod:`.model_store`), so people can read and edit them with the syntax they
know from Ollama. The grammar is Ollama's ``parser/parser.go`` ported state for
state, because its quirks are the spec: commands are case-insensitive, a value
runs to the end of the line, ``"..."`` and ``\"\"\"...\"\"\"`` values may span lines,
there are no escapes, ``#`` starts a comment only where a command could start,
and non-printable characters other than spaces, tabs and line breaks are
dropped. Errors carry Ollama's texts (``(line 3): command must be one of ...``,
``unknown parameter 'x'``, ``invalid float value [abc]``).

Where this deliberately differs from Ollama:

* ``ADAPTER``, ``DRAFT``, ``RENDERER`` and ``PARSER`` raise a 501: llama.cpp as
  embedded here cannot apply LoRA adapters or draft models, and Ollama's
  renderers and parsers are Go code we do not have. Silently dropping them
  would serve a different model than the file describes.
* More than one ``FROM`` is an error (Ollama merges them into a multi-file
  model, which only makes sense for safetensors or split GGUFs).
* ``PARAMETER template x`` is an unknown parameter, not a second ``TEMPLATE``.

:func:`format` is stricter than Ollama's ``Modelfile.String``: every value is
written so that :func:`parse` gives it back unchanged (verified by re-parsing),
and a value that cannot be written that way raises instead of being mangled.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass
from typing import Any, TypeAlias

from ..errors import BadRequest, RequestError

log = logging.getLogger(__name__)

ParamValue: TypeAlias = int | float | bool | tuple[str, ...]
"""A typed parameter value; ``stop`` (the only list) is a tuple of strings."""

# api.Options field kinds, by JSON name (api/types.go ``Options`` and ``Runner``).
_INT = frozenset({
    "num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx",
    "num_batch", "num_gpu", "main_gpu", "num_thread", "draft_num_predict",
})
_FLOAT = frozenset({
    "top_p", "min_p", "typical_p", "temperature", "repeat_penalty",
    "presence_penalty", "frequency_penalty",
})
_BOOL = frozenset({"use_mmap"})
_LIST = frozenset({"stop"})
PARAMETERS = _INT | _FLOAT | _BOOL | _LIST

# Ollama warns about and drops these (parser.go ``deprecatedParameters``).
DEPRECATED_PARAMETERS = frozenset({
    "penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only",
    "use_mlock", "mirostat", "mirostat_tau", "mirostat_eta",
})

MESSAGE_ROLES = ("system", "user", "assistant")
_COMMANDS = frozenset({
    "from", "license", "template", "system", "adapter", "draft", "renderer",
    "parser", "parameter", "message", "requires",
})
_UNSUPPORTED = frozenset({"adapter", "draft", "renderer", "parser"})

ERR_INVALID_COMMAND = (
    'command must be one of "from", "license", "template", "system", "adapter", "draft", '
    '"renderer", "parser", "parameter", "message", or "requires"'
)
ERR_INVALID_ROLE = 'message role must be one of "system", "user", or "assistant"'
ERR_MISSING_FROM = "no FROM line"
ERR_REQUIRES = "requires must be a valid semver (e.g. 0.14.0)"


def unsupported(what: str) -> RequestError:
    """501: a valid Ollama feature this backend does not implement (see module doc)."""
    return RequestError(f"{what} is not supported by the embedded backend", 501)


@dataclass(frozen=True)
class Modelfile:
    """What a Modelfile says, after Ollama's semantics are applied.

    ``None`` means "not set" (inherit); an empty string is kept as written, and
    Ollama's create treats an empty TEMPLATE or SYSTEM as "not set" too.
    Repeated TEMPLATE/SYSTEM/REQUIRES lines: the last wins; LICENSE and MESSAGE
    lines accumulate; a repeated PARAMETER replaces the earlier value (keeping
    its position), except ``stop``, whose values accumulate.
    """

    from_: str | None = None
    template: str | None = None
    system: str | None = None
    parameters: tuple[tuple[str, ParamValue], ...] = ()
    messages: tuple[tuple[str, str], ...] = ()
    licenses: tuple[str, ...] = ()
    requires: str | None = None

    def options(self) -> dict[str, Any]:
        """Parameters as a JSON-ready ``options`` object (``stop`` as a list)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.parameters}

    def is_empty(self) -> bool:
        """True when it overrides nothing (``from_`` aside)."""
        return self == Modelfile(from_=self.from_)


# --- the state machine of parser.go ParseFile ---------------------------------------

_NIL, _NAME, _VALUE, _PARAM, _MESSAGE, _COMMENT = range(6)
_EOF = "unexpected EOF"  # Go's io.ErrUnexpectedEOF


def _is_alpha(c: str) -> bool:
    return ("a" <= c <= "z") or ("A" <= c <= "Z")


def _step(c: str, state: int) -> tuple[int, str, str | None]:
    """parser.go ``parseRuneForState``: (next state, rune to keep or "", error)."""
    space, newline = c in " \t", c in "\r\n"
    if state == _NIL:
        if c == "#":
            return _COMMENT, "", None
        return (_NIL, "", None) if space or newline else (_NAME, c, None)
    if state == _NAME:
        if _is_alpha(c):
            return _NAME, c, None
        return (_VALUE, "", None) if space else (_NIL, "", ERR_INVALID_COMMAND)
    if state == _VALUE:
        return (_NIL, c, None) if space or newline else (_VALUE, c, None)
    if state in (_PARAM, _MESSAGE):
        if _is_alpha(c) or (state == _PARAM and (c.isdigit() and c.isascii() or c == "_")):
            return state, c, None
        return (_VALUE, "", None) if space else (_NIL, "", _EOF)
    return (_NIL, "", None) if newline else (_COMMENT, "", None)


def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def _trim(s: str) -> str:
    # Only these whitespace characters can reach the buffer (others are not printable).
    return s.strip(" \t\r\n")


def _printable(c: str) -> bool:
    return c == " " or c.isprintable()  # Go's strconv.IsPrint: L, M, N, P, S and ' '


def _commands(text: str) -> list[tuple[str, str, str]]:
    """(command, argument, role) triples; parameter commands are ``("parameter", arg, name)``."""
    if text.startswith("\ufeff"):
        text = text[1:]
    out: list[tuple[str, str, str]] = []
    buf: list[str] = []
    state, line = _NIL, 1
    command, extra = "", ""
    for c in text:
        if c in "\r\n":
            line += 1
        nxt, keep, err = _step(c, state)
        if err == _EOF:
            raise BadRequest(f"{_EOF}: {''.join(buf)}")
        if err is not None:
            raise BadRequest(f"(line {line}): {err}")
        if nxt != state:
            word = "".join(buf)
            if state == _NAME:
                command = word.lower()
                if command not in _COMMANDS:
                    raise BadRequest(f"(line {line}): {ERR_INVALID_COMMAND}")
                if command == "parameter":
                    nxt = _PARAM
                elif command == "message":
                    nxt = _MESSAGE
            elif state == _PARAM:
                extra = word
            elif state == _MESSAGE:
                if word not in MESSAGE_ROLES:
                    raise BadRequest(f"(line {line}): {ERR_INVALID_ROLE}")
                extra = word
            elif state == _VALUE:
                value, ok = _unquote(_trim(word))
                if not ok or c in " \t":  # an open quote, or a space inside the value
                    buf.append(c)
                    continue
                out.append((command, value, extra))
                extra = ""
            buf = []
            state = nxt
        if keep and _printable(keep):
            buf.append(keep)
    if state == _VALUE:
        value, ok = _unquote(_trim("".join(buf)))
        if not ok:
            raise BadRequest(_EOF)
        out.append((command, value, extra))
    elif state not in (_NIL, _COMMENT):
        raise BadRequest(_EOF)
    return out


# --- parameter values (api.FormatParams) --------------------------------------------

_INT_RE = re.compile(r"[+-]?[0-9]+\Z")
_FLOAT_RE = re.compile(
    r"[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)\Z", re.IGNORECASE
)
_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_FALSE = ("0", "f", "F", "FALSE", "false", "False")


def _go_int(text: str) -> int | None:
    if not _INT_RE.match(text):
        return None
    value = int(text)
    return value if -(2**63) <= value < 2**63 else None


def _go_float32(text: str) -> float | None:
    if not _FLOAT_RE.match(text):
        return None
    value = float(text)
    try:
        struct.pack("<f", value)  # strconv.ParseFloat(s, 32) fails out of float32 range
    except OverflowError:
        return None
    return value


def parse_parameter(name: str, text: str) -> ParamValue:
    """One ``PARAMETER name value`` line, typed as Ollama's ``api.FormatParams`` does."""
    if name not in PARAMETERS:
        raise BadRequest(f"unknown parameter '{name}'")
    if name in _LIST:
        return (text,)
    if name in _INT:
        i = _go_int(text)
        if i is None:
            raise BadRequest(f"invalid int value [{text}]")
        return i
    if name in _FLOAT:
        f = _go_float32(text)
        if f is None:
            raise BadRequest(f"invalid float value [{text}]")
        return f
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise BadRequest(f"invalid bool value [{text}]")


def coerce_parameter(name: str, value: Any) -> ParamValue:
    """A JSON ``parameters`` value from ``/api/create``, typed like a PARAMETER line.

    Strings go through :func:`parse_parameter`; numbers and bools are checked
    against the option's kind (an integral float is fine for an int option).
    """
    if isinstance(value, str):
        return parse_parameter(name, value)
    if name not in PARAMETERS:
        raise BadRequest(f"unknown parameter '{name}'")
    shown = _json_text(value)
    if name in _LIST:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise BadRequest(f"invalid string array value [{shown}]")
    if name in _BOOL:
        if isinstance(value, bool):
            return value
        raise BadRequest(f"invalid bool value [{shown}]")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"invalid {'int' if name in _INT else 'float'} value [{shown}]")
    if name in _INT:
        if isinstance(value, float) and not value.is_integer():
            raise BadRequest(f"invalid int value [{shown}]")
        return int(value)
    return float(value)


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# --- semantics (parser.go Modelfile.CreateRequest) ----------------------------------

_SEMVER = re.compile(
    r"v(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*)"
    r"(-(0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)(\.(0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*))*)?"
    r"(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?)?)?\Z"
)


def parse_requires(text: str) -> str:
    """REQUIRES: a semver, stored without its ``v`` (``v0.14.0`` -> ``0.14.0``)."""
    v = text if text.startswith("v") else "v" + text
    if not _SEMVER.match(v):
        raise BadRequest(ERR_REQUIRES)
    return v[1:]


def parse(text: str, *, require_from: bool = True) -> Modelfile:
    """Parse Modelfile ``text``; raises :class:`BadRequest` with Ollama's texts.

    ``require_from=False`` accepts a file without FROM (the side files of
    :mod:`.model_store`, which only override a GGUF beside them).
    Unsupported commands raise a 501 :class:`RequestError`.
    """
    from_: str | None = None
    template: str | None = None
    system: str | None = None
    requires: str | None = None
    params: dict[str, ParamValue] = {}
    messages: list[tuple[str, str]] = []
    licenses: list[str] = []
    for command, arg, extra in _commands(text):
        if command == "from":
            if from_ is not None:
                raise BadRequest("only one FROM line is supported")
            from_ = arg
        elif command == "template":
            template = arg
        elif command == "system":
            system = arg
        elif command == "license":
            licenses.append(arg)
        elif command == "message":
            messages.append((extra, arg))
        elif command == "requires":
            requires = parse_requires(arg)
        elif command in _UNSUPPORTED:
            raise unsupported(command.upper())
        elif extra in DEPRECATED_PARAMETERS:
            log.warning("modelfile: parameter %s is deprecated; ignoring it", extra)
        else:
            value = parse_parameter(extra, arg)
            old = params.get(extra)
            params[extra] = old + value if isinstance(old, tuple) and isinstance(value, tuple) else value
    if from_ is None and require_from:
        raise BadRequest(ERR_MISSING_FROM)
    return Modelfile(
        from_=from_, template=template, system=system, parameters=tuple(params.items()),
        messages=tuple(messages), licenses=tuple(licenses), requires=requires,
    )


# --- writing ---------------------------------------------------------------------------


def _quote(value: str, what: str) -> str:
    """The first of bare, ``"v"``, ``\"\"\"v\"\"\"`` that parses back to ``value`` exactly."""
    candidates = ['""'] if value == "" else [value, f'"{value}"', f'"""{value}"""']
    for candidate in candidates:
        try:
            back = _commands(f"SYSTEM {candidate}\n")
        except BadRequest:
            continue
        if back == [("system", value, "")]:
            return candidate
    raise BadRequest(
        f"{what} cannot be written to a Modelfile: it has control characters or a line ending in quotes"
    )


def _param_text(value: int | float | bool | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def format(mf: Modelfile, *, header: str | None = None) -> str:  # noqa: A001 - the brief's name
    """Write ``mf`` so that ``parse(format(mf))`` gives ``mf`` back.

    ``header`` becomes ``#`` comment lines at the top. Order: FROM, TEMPLATE,
    SYSTEM, PARAMETER, MESSAGE, LICENSE, REQUIRES (Ollama's ``show --modelfile``
    order, plus REQUIRES). Raises :class:`BadRequest` for a value the syntax
    cannot carry (see :func:`_quote`).
    """
    lines = [f"# {h}".rstrip() for h in header.splitlines()] if header else []
    if mf.from_ is not None:
        lines.append(f"FROM {_quote(mf.from_, 'FROM')}")
    if mf.template is not None:
        lines.append(f"TEMPLATE {_quote(mf.template, 'TEMPLATE')}")
    if mf.system is not None:
        lines.append(f"SYSTEM {_quote(mf.system, 'SYSTEM')}")
    for name, value in mf.parameters:
        if name not in PARAMETERS:
            raise BadRequest(f"unknown parameter '{name}'")
        for v in value if isinstance(value, tuple) else (value,):
            lines.append(f"PARAMETER {name} {_quote(_param_text(v), f'parameter {name}')}")
    for role, content in mf.messages:
        if role not in MESSAGE_ROLES:
            raise BadRequest(ERR_INVALID_ROLE)
        lines.append(f"MESSAGE {role} {_quote(content, 'MESSAGE')}")
    for lic in mf.licenses:
        lines.append(f"LICENSE {_quote(lic, 'LICENSE')}")
    if mf.requires is not None:
        lines.append(f"REQUIRES {_quote(mf.requires, 'REQUIRES')}")
    return "".join(line + "\n" for line in lines)
