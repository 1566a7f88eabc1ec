"""Ollama Modelfiles: parse and write them as Ollama does, and build them from /api/create (sans-IO).

The embedded backend stores model customisations (template, system prompt,
parameters, messages, licenses) as Modelfiles beside its GGUF files (see
:mod:`.model_store`), so people can read and edit them in the syntax they know
from Ollama. The grammar is Ollama's ``parser/parser.go`` ported state for
state, because its quirks are the spec: commands are case-insensitive, a value
runs to the end of the line, ``"..."`` and ``\"\"\"...\"\"\"`` values may span lines,
there are no escapes, ``#`` starts a comment only where a command could start,
and non-printable characters other than spaces, tabs and line breaks vanish.
Errors carry Ollama's texts (``(line 3): command must be one of ...``,
``unknown parameter 'x'``, ``invalid float value [abc]``), as 400s.

Deliberate differences from Ollama:

* ``ADAPTER``, ``DRAFT``, ``RENDERER`` and ``PARSER`` raise a 501: llama.cpp as
  embedded here applies no LoRA adapters or draft models, and Ollama's
  renderers and parsers are Go code we lack. Dropping them silently would
  serve a different model than the file describes.
* More than one ``FROM`` is an error (Ollama merges them into one multi-file
  model, which only makes sense for safetensors or split GGUFs).
* ``PARAMETER template x`` is an unknown parameter, not a second ``TEMPLATE``.
* :func:`format` writes every value so that :func:`parse` gives it back
  exactly (checked by re-parsing), and raises for a value the syntax cannot
  carry, where Ollama's ``Modelfile.String`` would write something that reads
  back differently.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from ..errors import BadRequest, RequestError

log = logging.getLogger(__name__)

ParamValue: TypeAlias = int | float | bool | tuple[str, ...]
"""A typed parameter value; ``stop`` (the only list option) is a tuple of strings."""

# api.Options and api.Runner fields by JSON name, by Go kind (api/types.go).
_INT = frozenset({"num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch",
                  "num_gpu", "main_gpu", "num_thread", "draft_num_predict"})
_FLOAT = frozenset({"top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty",
                    "frequency_penalty"})
_BOOL = frozenset({"use_mmap"})
PARAMETERS = _INT | _FLOAT | _BOOL | {"stop"}
# Ollama warns about these and drops them (parser.go ``deprecatedParameters``).
DEPRECATED_PARAMETERS = frozenset({"penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only",
                                   "use_mlock", "mirostat", "mirostat_tau", "mirostat_eta"})
MESSAGE_ROLES = ("system", "user", "assistant")
_COMMANDS = frozenset({"from", "license", "template", "system", "adapter", "draft", "renderer", "parser",
                       "parameter", "message", "requires"})
_UNSUPPORTED = frozenset({"adapter", "draft", "renderer", "parser"})

ERR_INVALID_COMMAND = ('command must be one of "from", "license", "template", "system", "adapter", '
                       '"draft", "renderer", "parser", "parameter", "message", or "requires"')
ERR_INVALID_ROLE = 'message role must be one of "system", "user", or "assistant"'
ERR_MISSING_FROM = "no FROM line"
ERR_REQUIRES = "requires must be a valid semver (e.g. 0.14.0)"


def unsupported(what: str) -> RequestError:
    """501: a valid Ollama feature this backend does not implement (see the module doc)."""
    return RequestError(f"{what} is not supported by the embedded backend", 501)


@dataclass(frozen=True)
class Modelfile:
    """What a Modelfile says, with Ollama's semantics applied.

    ``None`` means "not set"; an empty string is kept as written (Ollama's
    create treats an empty TEMPLATE or SYSTEM as not set). Repeated TEMPLATE,
    SYSTEM or REQUIRES: the last wins; LICENSE and MESSAGE lines accumulate; a
    repeated PARAMETER replaces the value at its first position, except
    ``stop``, whose values accumulate.
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


# --- the state machine of parser.go ParseFile -----------------------------------------------

_NIL, _NAME, _VALUE, _PARAM, _MESSAGE, _COMMENT = range(6)
_EOF = "unexpected EOF"  # Go's io.ErrUnexpectedEOF


def _step(c: str, state: int) -> tuple[int, str, str | None]:
    """``parseRuneForState``: (next state, character to keep or "", error text)."""
    space, newline, alpha = c in " \t", c in "\r\n", c.isascii() and c.isalpha()
    if state == _NIL:
        return (_COMMENT, "", None) if c == "#" else (_NIL, "", None) if space or newline else (_NAME, c, None)
    if state == _NAME:
        return (_NAME, c, None) if alpha else (_VALUE, "", None) if space else (_NIL, "", ERR_INVALID_COMMAND)
    if state == _VALUE:
        return (_NIL, c, None) if space or newline else (_VALUE, c, None)
    if state in (_PARAM, _MESSAGE):
        if alpha or (state == _PARAM and (c.isascii() and c.isdigit() or c == "_")):
            return state, c, None
        return (_VALUE, "", None) if space else (_NIL, "", _EOF)
    return (_NIL, "", None) if newline else (_COMMENT, "", None)


def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def _open_quote(word: str) -> bool:
    """Whether ``word`` (surrounding whitespace ignored) is a quote still open,
    checked in place: a copy per space made long SYSTEM prompts quadratic."""
    i, j = 0, len(word)
    while i < j and word[i] in " \t\r\n":
        i += 1
    while j > i and word[j - 1] in " \t\r\n":
        j -= 1
    if word.startswith('"""', i, j):
        return not (j - i >= 6 and word.endswith('"""', i, j))
    if word.startswith('"', i, j):
        return not (j - i >= 2 and word.endswith('"', i, j))
    return False


def _commands(text: str) -> list[tuple[str, str, str]]:
    """(command, value, extra) triples; extra is a PARAMETER's name or a MESSAGE's role."""
    out: list[tuple[str, str, str]] = []
    word = ""  # grown in place (CPython appends to an unshared str without copying)
    state, line, command, extra = _NIL, 1, "", ""
    for c in text.removeprefix("\ufeff"):
        if c in "\r\n":
            line += 1
        nxt, keep, err = _step(c, state)
        if err == _EOF:
            raise BadRequest(f"{_EOF}: {word}")
        if err is not None:
            raise BadRequest(f"(line {line}): {err}")
        if nxt != state:
            if state == _NAME:
                command = word.lower()
                if command not in _COMMANDS:
                    raise BadRequest(f"(line {line}): {ERR_INVALID_COMMAND}")
                nxt = {"parameter": _PARAM, "message": _MESSAGE}.get(command, nxt)
            elif state == _PARAM:
                extra = word
            elif state == _MESSAGE:
                if word not in MESSAGE_ROLES:
                    raise BadRequest(f"(line {line}): {ERR_INVALID_ROLE}")
                extra = word
            elif state == _VALUE:
                # Only ' ', tab, CR and LF can reach the buffer as whitespace (Go's TrimSpace).
                if c in " \t" or _open_quote(word):  # a space within the value, or inside an open quote
                    word += c
                    continue
                value, _ = _unquote(word.strip(" \t\r\n"))
                out.append((command, value, extra))
                extra = ""
            word = ""
            state = nxt
        if keep and (keep == " " or keep.isprintable()):  # Go's strconv.IsPrint
            word += keep
    if state == _VALUE:
        value, ok = _unquote(word.strip(" \t\r\n"))
        if not ok:
            raise BadRequest(_EOF)
        out.append((command, value, extra))
    elif state not in (_NIL, _COMMENT):
        raise BadRequest(_EOF)
    return out


# --- values -------------------------------------------------------------------------------

_INT_RE = re.compile(r"[+-]?[0-9]+\Z")
_FLOAT_RE = re.compile(r"[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)\Z",
                       re.IGNORECASE)
_BOOLS = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
          "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}
_SEMVER_ID = r"(0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
_SEMVER = re.compile(rf"v(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*)(-{_SEMVER_ID}(\.{_SEMVER_ID})*)?"
                     r"(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?)?)?\Z")


def parse_parameter(name: str, text: str) -> ParamValue:
    """One ``PARAMETER name value``, typed as Ollama's ``api.FormatParams`` does (Go parsers)."""
    if name not in PARAMETERS:
        raise BadRequest(f"unknown parameter '{name}'")
    if name == "stop":
        return (text,)
    if name in _INT and _INT_RE.match(text) and -(2**63) <= int(text) < 2**63:
        return int(text)
    if name in _FLOAT and _FLOAT_RE.match(text):
        try:
            struct.pack("<f", float(text))  # ParseFloat(s, 32) fails beyond float32's range
            return float(text)
        except OverflowError:
            pass
    if name in _BOOL and text in _BOOLS:
        return _BOOLS[text]
    kind = "int" if name in _INT else "float" if name in _FLOAT else "bool"
    raise BadRequest(f"invalid {kind} value [{text}]")


def coerce_parameter(name: str, value: Any) -> ParamValue:
    """A JSON ``parameters`` value of ``/api/create``, typed like a PARAMETER line.

    Strings go through :func:`parse_parameter`; numbers, bools and string
    lists must fit the option (an integral float is fine for an int option).
    """
    if isinstance(value, str):
        return parse_parameter(name, value)
    if name not in PARAMETERS:
        raise BadRequest(f"unknown parameter '{name}'")
    if name == "stop" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    if name in _BOOL and isinstance(value, bool):
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if name in _FLOAT and number:
        return float(value)
    if name in _INT and number and float(value).is_integer():
        return int(value)
    kind = "string array" if name == "stop" else "int" if name in _INT else "float" if name in _FLOAT else "bool"
    raise BadRequest(f"invalid {kind} value [{json.dumps(value, ensure_ascii=False)}]")


def parse_requires(text: str) -> str:
    """REQUIRES: a semver, kept without its ``v`` (``v0.14.0`` -> ``0.14.0``), as Ollama does."""
    v = text if text.startswith("v") else "v" + text
    if not _SEMVER.match(v):
        raise BadRequest(ERR_REQUIRES)
    return v[1:]


# --- parse and format ---------------------------------------------------------------------


def parse(text: str, *, require_from: bool = True) -> Modelfile:
    """Parse Modelfile ``text``: 400 :class:`BadRequest` with Ollama's texts, 501 for unsupported commands.

    ``require_from=False`` accepts a file without FROM (the side files of
    :mod:`.model_store`, which only override the GGUF beside them).
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
        elif command in ("template", "system"):
            template, system = (arg, system) if command == "template" else (template, arg)
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
            value, old = parse_parameter(extra, arg), params.get(extra)
            params[extra] = old + value if isinstance(old, tuple) and isinstance(value, tuple) else value
    if from_ is None and require_from:
        raise BadRequest(ERR_MISSING_FROM)
    return Modelfile(from_, template, system, tuple(params.items()), tuple(messages), tuple(licenses), requires)


def _quote(value: str, what: str) -> str:
    """The first of bare, ``"v"``, ``\"\"\"v\"\"\"`` that parses back to exactly ``value``."""
    for candidate in ['""'] if value == "" else [value, f'"{value}"', f'"""{value}"""']:
        try:
            if _commands(f"SYSTEM {candidate}\n") == [("system", value, "")]:
                return candidate
        except BadRequest:
            pass
    raise BadRequest(f"{what} cannot be written to a Modelfile: it has control characters "
                     "or a line that ends in quotes")


def _text(value: str | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def format(mf: Modelfile, *, header: str | None = None) -> str:
    """Write ``mf`` so that ``parse(format(mf))`` gives ``mf`` back; ``header`` becomes ``#`` lines.

    Order: FROM, TEMPLATE, SYSTEM, PARAMETER, MESSAGE, LICENSE (as ``ollama show
    --modelfile``), then REQUIRES. Raises :class:`BadRequest` for a value the
    syntax cannot carry (see :func:`_quote`), an unknown parameter or a bad role.
    """
    lines = [f"# {h}".rstrip() for h in header.splitlines()] if header else []
    for command, value in (("FROM", mf.from_), ("TEMPLATE", mf.template), ("SYSTEM", mf.system)):
        if value is not None:
            lines.append(f"{command} {_quote(value, command)}")
    for name, pv in mf.parameters:
        if name not in PARAMETERS:
            raise BadRequest(f"unknown parameter '{name}'")
        lines += [f"PARAMETER {name} {_quote(_text(v), name)}" for v in (pv if isinstance(pv, tuple) else (pv,))]
    for role, content in mf.messages:
        if role not in MESSAGE_ROLES:
            raise BadRequest(ERR_INVALID_ROLE)
        lines.append(f"MESSAGE {role} {_quote(content, 'MESSAGE')}")
    lines += [f"LICENSE {_quote(lic, 'LICENSE')}" for lic in mf.licenses]
    if mf.requires is not None:
        lines.append(f"REQUIRES {_quote(mf.requires, 'REQUIRES')}")
    return "".join(line + "\n" for line in lines)


# --- /api/create fields -----------------------------------------------------------------------


def _json_type(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", dict: "object", list: "array"}.get(type(v), "value")


def type_error(value: Any, field: str, gotype: str, struct: str = "CreateRequest") -> BadRequest:
    """Go's ``json: cannot unmarshal X into Go struct field S.f of type T`` (400)."""
    return BadRequest(f"json: cannot unmarshal {_json_type(value)} into Go struct field {struct}.{field} "
                      f"of type {gotype}")


def from_request(req: Mapping[str, Any]) -> Modelfile:
    """The overrides an ``/api/create`` body asks for (``from_`` unset), type-checked.

    Empty ``template``/``system`` mean "not set", as in Ollama; deprecated
    parameters are dropped with a warning; other unknown ones are the 400
    ``unknown parameter 'x'`` (they could not be written to a Modelfile).
    """
    for field in ("template", "system", "requires"):
        if req.get(field) is not None and not isinstance(req[field], str):
            raise type_error(req[field], field, "string")
    params: dict[str, ParamValue] = {}
    raw = req.get("parameters")
    if raw is not None and not isinstance(raw, dict):
        raise type_error(raw, "parameters", "map[string]interface {}")
    for k, v in (raw or {}).items():
        if k in DEPRECATED_PARAMETERS:
            log.warning("modelfile: parameter %s is deprecated; ignoring it", k)
        else:
            params[k] = coerce_parameter(k, v)
    messages = req.get("messages")
    messages = [] if messages is None else messages
    if not isinstance(messages, list):
        raise type_error(messages, "messages", "[]api.Message")
    for m in messages:
        if not isinstance(m, dict):
            raise type_error(m, "messages", "api.Message")
        for k in ("role", "content"):
            if m.get(k) is not None and not isinstance(m[k], str):
                raise type_error(m[k], f"messages.{k}", "string")
        if m.get("role") not in MESSAGE_ROLES:
            raise BadRequest(ERR_INVALID_ROLE)
    lic = req.get("license")
    licenses = [] if lic in (None, "") else [lic] if isinstance(lic, str) else lic
    bad = [x for x in licenses if not isinstance(x, str)] if isinstance(licenses, list) else [lic]
    if bad:  # Ollama re-decodes ``license`` as []string
        raise BadRequest(f"json: cannot unmarshal {_json_type(bad[0])} into Go value of type string")
    return Modelfile(
        template=req.get("template") or None, system=req.get("system") or None,
        parameters=tuple(params.items()), messages=tuple((m["role"], m.get("content") or "") for m in messages),
        licenses=tuple(licenses), requires=parse_requires(req["requires"]) if req.get("requires") else None,
    )


def merge(base: Modelfile, new: Modelfile) -> Modelfile:
    """Ollama's create over an existing model: template, system, requires and a non-empty
    message list replace; parameters merge by name (new wins); licenses accumulate."""
    return Modelfile(
        from_=new.from_ if new.from_ is not None else base.from_,
        template=new.template if new.template is not None else base.template,
        system=new.system if new.system is not None else base.system,
        parameters=tuple({**dict(base.parameters), **dict(new.parameters)}.items()),
        messages=new.messages or base.messages,
        licenses=base.licenses + tuple(x for x in new.licenses if x not in base.licenses),
        requires=new.requires or base.requires,
    )
