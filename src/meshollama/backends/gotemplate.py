"""A small interpreter for the subset of Go's text/template that Ollama chat templates use.

Why: a model's TEMPLATE is a Go text/template; to build the prompt Ollama would build, byte
for byte, without a Go toolchain, we interpret it here in pure Python.

Supported: text and ``{{ }}`` actions, ``{{-``/``-}}`` trim markers, ``{{/* */}}`` comments;
pipelines ``a | f b``; ``.``, ``.X.Y``, ``$``, ``$x.Y``, ``(pipe).X``; ``$x := p``, ``$x = p``
(scoped like Go, until the enclosing ``end``); string, raw string, char, int, float, bool and
nil literals; ``if``/``else if``/``else``; ``range`` over lists, dicts (sorted keys) and ints
with ``$v :=``/``$i, $v :=``, ``else``, ``break``, ``continue``; ``with``/``else with``;
``define``/``template``/``block``. Functions: and, or (lazy, return the deciding value), not,
eq (several args), ne, lt, le, gt, ge, len, index, slice, print, printf (%v %s %q %d %t %f %e %g
%x with flags), println, and Ollama's json, currentDate, yesterdayDate, toTypeScriptType.
Not supported: html, js, urlquery, call, methods, custom delimiters, 3-index slice.

Data: a dict with Go-style keys. ``.Name`` on a dict tries ``Name``, ``name``, ``snake_name``,
``lowername``, ``$lowername``; a missing key, or a field of nil, is nil (Go errors on the latter).
Printing is Go's fmt: lists ``[a b]``, dicts ``map[k:v]``, floats like ``%v``; nil prints ""
(Go prints ``<no value>`` for any nil interface). ``render`` first turns ``Tools`` and
``Messages`` into the values Ollama's template.Execute passes, whose String() methods print
json.Marshal output: tools in Ollama's struct field order (type, items, function{name,
description, parameters{type, $defs, items, required, properties}}) with unknown keys dropped
and omitempty applied; parameter properties sorted by key, nested properties in given order;
tool call arguments sorted, numbers as float64, ``{}`` when nil. JSON is Go's: compact, with
``<``, ``>``, ``&``, U+2028/9 escaped. One deliberate deviation: Ollama since v0.14 prints
``{{ .Function }}`` and ``{{ .Function.Parameters }}`` as Go struct syntax (ollama#14601); we
print the JSON that Ollama printed before and that its pending fix prints.
"""

from __future__ import annotations

import bisect
import datetime as _dt
import json as _json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any


class TemplateError(ValueError):
    """A parse or execution error; the message starts with ``line N:`` where known."""


# --- values: the Go types behind Ollama's template data -------------------------------------------


class _Struct(dict[str, Any]):  # a Go struct or ordered map: JSON keeps key order, omits empty `omit` keys
    def __init__(self, items: Iterable[tuple[str, Any]], omit: Iterable[str] = ()) -> None:
        super().__init__(items)
        self.omit = frozenset(omit)


class _JSONMap(dict[str, Any]):  # Ollama's templateArgs/templateProperties: prints JSON, "{}" when nil
    def __init__(self, items: Any = None) -> None:
        super().__init__(items or {})
        self.nil = items is None


class _Slice(list[Any]):  # a Go slice: nil prints [] and marshals to null; a stringer prints JSON
    def __init__(self, items: Any = None, stringer: bool = False) -> None:
        super().__init__(items or ())
        self.nil, self.stringer = items is None, stringer


def _lookup(obj: Any, name: str) -> Any:
    if not isinstance(obj, Mapping):
        return None
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()
    for key in (name, name[:1].lower() + name[1:], snake, name.lower(), "$" + name.lower()):
        if key in obj:
            return obj[key]
    return None


def _str(obj: Any, name: str) -> Any:
    value = _lookup(obj, name)
    return "" if value is None else value


def _slice_of(value: Any) -> Any:
    return _Slice(value) if isinstance(value, list) else _Slice() if value is None else value


def _floats(v: Any) -> Any:  # JSON numbers decoded into a Go `any` are float64
    if isinstance(v, Mapping):
        return {k: _floats(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_floats(x) for x in v]
    return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


def _props(value: Any, top: bool) -> Any:  # top: templateProperties; nested: ToolPropertiesMap
    if not isinstance(value, Mapping):
        return _JSONMap() if top else value
    pairs = [(k, _prop(v)) for k, v in value.items()]
    return _JSONMap(dict(pairs)) if top else _Struct(pairs)


def _prop(p: Any) -> Any:  # api.ToolProperty; its PropertyType is a string when it has one type
    if not isinstance(p, Mapping):
        return p
    any_of, kind = _lookup(p, "AnyOf"), _lookup(p, "Type")
    if isinstance(kind, list):
        kind = None if not kind else kind[0] if len(kind) == 1 else _Slice(kind)
    fields = [("anyOf", _Slice([_prop(x) for x in any_of] if isinstance(any_of, list) else None)), ("type", kind),
              ("items", _floats(_lookup(p, "Items"))), ("description", _str(p, "Description")),
              ("enum", _slice_of(_floats(_lookup(p, "Enum")))), ("properties", _props(_lookup(p, "Properties"), False)),
              ("required", _slice_of(_lookup(p, "Required")))]
    return _Struct(fields, [k for k, _ in fields])


def _tool(t: Any) -> _Struct:  # Ollama's templateTool
    f = _lookup(t, "Function")
    p = _lookup(f, "Parameters")
    params = _Struct([("type", _str(p, "Type")), ("$defs", _floats(_lookup(p, "Defs"))),
                      ("items", _floats(_lookup(p, "Items"))),
                      ("required", _slice_of(_lookup(p, "Required"))),
                      ("properties", _props(_lookup(p, "Properties"), True))], ("$defs", "items", "required"))
    func = _Struct([("name", _str(f, "Name")), ("description", _str(f, "Description")), ("parameters", params)])
    return _Struct([("type", _str(t, "Type")), ("items", _floats(_lookup(t, "Items"))), ("function", func)],
                   ("items",))


def _message(m: Any) -> _Struct:  # Ollama's templateMessage, with templateToolCall entries
    calls = []
    for c in _lookup(m, "ToolCalls") or ():
        f = _lookup(c, "Function")
        args = _lookup(f, "Arguments")
        args = _JSONMap(_floats(args)) if isinstance(args, Mapping) else args or _JSONMap()
        func = _Struct([("Index", _lookup(f, "Index") or 0), ("Name", _str(f, "Name")), ("Arguments", args)])
        calls.append(_Struct([("ID", _str(c, "ID")), ("Function", func)]))
    return _Struct([("Role", _str(m, "Role")), ("Content", _str(m, "Content")), ("Thinking", _str(m, "Thinking")),
                    ("Images", _slice_of(_lookup(m, "Images"))), ("ToolCalls", _Slice(calls or None)),
                    ("ToolName", _str(m, "ToolName")), ("ToolCallID", _str(m, "ToolCallID"))])


def _prepare(data: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(data)
    if "Tools" in out and (out["Tools"] is None or isinstance(out["Tools"], list)):
        out["Tools"] = _Slice(None if out["Tools"] is None else [_tool(t) for t in out["Tools"]], True)
    if isinstance(out.get("Messages"), list):
        out["Messages"] = [_message(m) for m in out["Messages"]]
    return out


# --- printing: Go's fmt and encoding/json ---------------------------------------------------------


def _float(f: float, for_json: bool = False) -> str:
    if math.isnan(f) or math.isinf(f):
        return "NaN" if math.isnan(f) else "+Inf" if f > 0 else "-Inf"
    if f == 0:
        return "0"
    t = Decimal(repr(abs(f))).normalize().as_tuple()
    ds, sign, dp = "".join(map(str, t.digits)), "-" if f < 0 else "", len(t.digits) + int(t.exponent)
    if (abs(f) < 1e-6 or abs(f) >= 1e21) if for_json else not -4 <= dp - 1 < 6:
        text = f"{ds[0]}{'.' if len(ds) > 1 else ''}{ds[1:]}e{'-' if dp < 1 else '+'}{abs(dp - 1):02d}"
        return sign + (re.sub(r"e-0(\d)$", r"e-\1", text) if for_json else text)
    if dp <= 0:
        return f"{sign}0.{'0' * -dp}{ds}"
    return sign + (ds + "0" * (dp - len(ds)) if dp >= len(ds) else f"{ds[:dp]}.{ds[dp:]}")


def _to_json(v: Any) -> str:
    if v is None or getattr(v, "nil", False):
        return "null"
    if isinstance(v, _Struct):
        return "{" + ",".join(f"{_to_json(k)}:{_to_json(x)}" for k, x in v.items()
                              if k not in v.omit or not (x is None or x is False or x == 0 or x in ("", []))) + "}"
    if isinstance(v, Mapping):
        return "{" + ",".join(f"{_to_json(str(k))}:{_to_json(v[k])}" for k in sorted(v, key=str)) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(map(_to_json, v)) + "]"
    if isinstance(v, (bool, int)):
        return str(v).lower() if isinstance(v, bool) else str(v)
    if isinstance(v, float):
        return _float(v, for_json=True)
    if not isinstance(v, str):
        raise TemplateError(f"json: unsupported type {type(v).__name__}")
    out = _json.dumps(v, ensure_ascii=False)
    for ch in "<>&\u2028\u2029":
        out = out.replace(ch, f"\\u{ord(ch):04x}")
    return out


def _fmt(v: Any, top: bool = False) -> str:
    """Go's fmt ``%v``; at the top of an action nil prints as ""."""
    if v is None:
        return "" if top else "<nil>"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return _float(v)
    if isinstance(v, _JSONMap) and v.nil:
        return "{}"
    if isinstance(v, (_Struct, _JSONMap)) or isinstance(v, _Slice) and v.stringer:
        return _to_json(v)
    if isinstance(v, Mapping):
        return "map[" + " ".join(f"{_fmt(k)}:{_fmt(v[k])}" for k in sorted(v, key=str)) + "]"
    if isinstance(v, (list, tuple)):
        return "[" + " ".join(map(_fmt, v)) + "]"
    return str(v)


# --- functions --------------------------------------------------------------------------------------


def _truth(v: Any) -> bool:
    if isinstance(v, _Struct):  # a Go struct is always true
        return True
    return bool(v) if isinstance(v, (bool, int, float, str, list, tuple, Mapping)) else v is not None


def _kind(v: Any) -> str:
    return "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v).__name__


def _eq(a: Any, *others: Any) -> bool:
    if not others:
        raise TemplateError("missing argument for comparison")
    for b in others:
        if a is not None and b is not None and (_kind(a) != _kind(b) or isinstance(a, (list, dict))):
            raise TemplateError("incompatible types for comparison")
        if a == b:
            return True
    return False


def _lt(a: Any, b: Any) -> bool:
    if _kind(a) != _kind(b) or _kind(a) not in ("number", "str"):
        raise TemplateError("incompatible types for comparison")
    return bool(a < b)


def _index(v: Any, *keys: Any) -> Any:
    for k in keys:
        if isinstance(v, Mapping):
            v = v.get(k)
        elif isinstance(v, (str, list, tuple)):
            seq = v.encode() if isinstance(v, str) else v
            if not isinstance(k, int) or not 0 <= k < len(seq):
                raise TemplateError(f"index out of range: {k}")
            v = seq[k]
        elif v is not None:
            raise TemplateError(f"can't index item of type {type(v).__name__}")
    return v


def _slice(v: Any, *idx: int) -> Any:
    seq = v.encode() if isinstance(v, str) else v
    lo, hi = (list(idx) + [0, len(seq)][len(idx):])[:2] if len(idx) <= 2 else (1, 0)
    if not 0 <= lo <= hi <= len(seq):
        raise TemplateError(f"index out of range: {lo}:{hi}")
    return seq[lo:hi].decode(errors="replace") if isinstance(seq, bytes) else list(seq[lo:hi])


def _sprint(*args: Any) -> str:  # Go's fmt.Sprint: a space between operands when neither is a string
    return "".join((" " if i and not isinstance(a, str) and not isinstance(args[i - 1], str) else "") + _fmt(a)
                   for i, a in enumerate(args))


def _gotype(a: Any) -> str:
    return {bool: "bool", int: "int", float: "float64", str: "string"}.get(type(a), type(a).__name__)


_VERB = re.compile(r"%([-+# 0]*)(\d*)(?:\.(\d+))?(.)", re.DOTALL)
_VERB_TYPES: dict[str, tuple[type, ...]] = {
    "d": (int,), "x": (int,), "X": (int,), "t": (bool,), "q": (str,), "f": (float,), "e": (float,),
    "g": (float,), "s": (str, list, dict), "v": (object,)}


def _printf(fmt: str, *args: Any) -> str:
    rest = list(args)

    def verb(m: re.Match[str]) -> str:
        flags, width, prec, v = m.groups()
        if v == "%" or not rest:
            return "%" if v == "%" else f"%!{v}(MISSING)"
        a, kinds = rest.pop(0), _VERB_TYPES.get(v, ())
        if not isinstance(a, kinds) or (isinstance(a, bool) and bool not in kinds and v != "v"):
            return f"%!{v}({_gotype(a)}={_fmt(a)})"
        if len(width) > 4 or len(prec or "") > 4:  # "%0999999999d" would write a gigabyte
            return f"%!{v}(BADWIDTH)"
        spec = "%" + flags + width + ("." + prec if prec else "")
        text = _json.dumps(a, ensure_ascii=False) if v == "q" else _fmt(a)
        return (spec + v) % a if v in "dxXfe" or v == "g" and prec else (spec + "s") % text

    out = _VERB.sub(verb, fmt)
    return out + ("%!(EXTRA " + ", ".join(f"{_gotype(a)}={_fmt(a)}" for a in rest) + ")" if rest else "")


_TS = {"string": "string", "number": "number", "integer": "number", "boolean": "boolean",
       "array": "any[]", "object": "Record<string, any>", "null": "null"}


def _ts_type(p: Any) -> str:  # api.ToolProperty.ToTypeScriptType
    if not isinstance(p, Mapping):
        return "any"
    if _lookup(p, "AnyOf"):
        return " | ".join(_ts_type(x) for x in _lookup(p, "AnyOf"))
    kind = _lookup(p, "Type")
    return " | ".join(_TS.get(x, "any") for x in ([kind] if isinstance(kind, str) else kind or [])) or "any"


def _date(days: int) -> Callable[..., str]:
    return lambda *_: (_dt.date.today() - _dt.timedelta(days=days)).isoformat()


_FUNCS: dict[str, Callable[..., Any]] = {
    "not": lambda a: not _truth(a), "eq": _eq, "ne": lambda a, b: not _eq(a, b), "lt": _lt,
    "le": lambda a, b: _lt(a, b) or _eq(a, b), "gt": lambda a, b: not (_lt(a, b) or _eq(a, b)),
    "ge": lambda a, b: not _lt(a, b), "index": _index, "slice": _slice, "print": _sprint, "printf": _printf,
    "len": lambda v: 0 if v is None else len(v.encode()) if isinstance(v, str) else len(v),
    "println": lambda *a: " ".join(map(_fmt, a)) + "\n", "json": _to_json, "currentDate": _date(0),
    "yesterdayDate": _date(1), "toTypeScriptType": _ts_type, "and": _truth, "or": _truth,  # and/or: see call
}


# --- the parsed tree ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Lit:
    value: Any


@dataclass(frozen=True)
class _Func:
    name: str


@dataclass(frozen=True)
class _Ref:  # base is None for dot, "$name" for a variable, a _Pipe for "(pipe)"; then fields
    base: str | _Pipe | None
    names: tuple[str, ...]


@dataclass(frozen=True)
class _Pipe:
    decl: tuple[str, ...]
    assign: bool  # "=" rather than ":="
    cmds: tuple[tuple[_Lit | _Func | _Ref, ...], ...]


@dataclass(frozen=True)
class _Action:
    pipe: _Pipe
    line: int


@dataclass(frozen=True)
class _Branch:  # if, with, range
    kind: str
    pipe: _Pipe
    body: tuple[_Node, ...]
    orelse: tuple[_Node, ...]
    line: int


@dataclass(frozen=True)
class _Include:  # {{template "name" pipe}}
    name: str
    pipe: _Pipe | None
    line: int


@dataclass(frozen=True)
class _Jump:  # break, continue
    kind: str
    line: int


_Node = str | _Action | _Branch | _Include | _Jump
_Tok = re.Match[str]
_SPACE, _WS = (" ", "\t", "\r", "\n"), " \t\r\n"
_TOKEN = re.compile(r"""(?P<ws>\s+) | (?P<str>"(?:[^"\\\n]|\\.)*") | (?P<raw>`[^`]*`) | (?P<chr>'(?:[^'\\\n]|\\.)+')
    | (?P<num>[-+]?(?:0[xX][0-9a-fA-F_]+|(?:\d[\d_]*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?))
    | (?P<field>(?:\.[A-Za-z_]\w*)+) | (?P<var>\$\w*(?:\.[A-Za-z_]\w*)*) | (?P<dot>\.)
    | (?P<ident>[A-Za-z_]\w*) | (?P<op>:=|=|\||\(|\)|,)""", re.VERBOSE)
_ESC = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\", "'": "'", '"': '"'}


def _error(src: str, pos: int, msg: str) -> TemplateError:
    return TemplateError(f"line {src.count(chr(10), 0, pos) + 1}: {msg}")


def _lex(src: str) -> list[tuple[int, str | list[_Tok]]]:
    """Text and actions (token lists) with their offsets; trim markers applied, comments dropped."""
    items: list[tuple[int, str | list[_Tok]]] = []
    pos, trim = 0, False
    while True:
        start = src.find("{{", pos)
        text, i = src[pos:] if start < 0 else src[pos:start], start + 2
        text = text.lstrip(_WS) if trim else text
        if start >= 0 and src[i:i + 1] == "-" and src[i + 1:i + 2] in _SPACE:
            text, i = text.rstrip(_WS), i + 2
        if text:
            items.append((pos, text))
        if start < 0:
            return items
        toks: list[_Tok] = []
        comment = src.startswith("/*", i)
        if comment:
            i = src.find("*/", i + 2) + 2
            if i == 1:
                raise _error(src, start, "unclosed comment")
            if not src.startswith("}}", i) and not (src[i:i + 1] in _SPACE and src.startswith("-}}", i + 1)):
                raise _error(src, start, "comment ends before closing delimiter")
        while not src.startswith("}}", i):
            m = _TOKEN.match(src, i)
            if m is None:
                raise _error(src, start, f"unexpected {src[i]!r} in action" if i < len(src) else "unclosed action")
            if m.lastgroup == "ws" and src.startswith("-}}", m.end()):
                i = m.end() + 1
                break
            toks += [] if m.lastgroup == "ws" else [m]
            i = m.end()
        pos, trim = i + 2, src[i - 1] == "-"
        if not comment:
            items.append((start, toks))


def _literal(t: _Tok) -> Any:
    text = t.group()
    if t.lastgroup in ("str", "chr"):
        def esc(m: re.Match[str]) -> str:
            e = m.group(1)
            if e[0] in "xuU01234567":
                return chr(int(e[1:], 16) if e[0] in "xuU" else int(e, 8))
            if e not in _ESC:
                raise ValueError(f"unknown escape sequence \\{e}")
            return _ESC[e]
        value = re.sub(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[0-7]{3}|.)", esc, text[1:-1])
        return value if t.lastgroup == "str" else ord(value[0])
    if t.lastgroup == "raw":
        return text[1:-1]
    text = text.replace("_", "")
    if re.fullmatch(r"[-+]?0[xX][0-9a-fA-F]+", text):
        return int(text, 16)
    return int(text) if re.fullmatch(r"[-+]?\d+", text) else float(text)


class _Parser:
    def __init__(self, src: str) -> None:
        self.src, self.items, self.i = src, _lex(src), 0
        self.vars, self.loops = ["$"], 0
        self.defs: dict[str, tuple[_Node, ...]] = {}
        self.fields: set[str] = set()
        self._newlines: list[int] | None = None

    def fail(self, pos: int, msg: str) -> TemplateError:
        return _error(self.src, pos, msg)

    def line(self, pos: int) -> int:
        """1-based line of ``pos``: a bisect over newline offsets (counting from 0
        for every action made parsing quadratic in the template's size)."""
        if self._newlines is None:
            self._newlines = [m.start() for m in re.finditer("\n", self.src)]
        return bisect.bisect_left(self._newlines, pos) + 1

    def nodes(self) -> tuple[tuple[_Node, ...], tuple[str, list[_Tok], int] | None]:
        """Parse up to an {{end}} or {{else}} (returned with its tokens), or the end (None)."""
        out: list[_Node] = []
        while self.i < len(self.items):
            pos, item = self.items[self.i]
            self.i += 1
            if isinstance(item, str):
                out.append(item)
                continue
            if not item:
                raise self.fail(pos, "missing value for command")
            kw = item[0].group() if item[0].lastgroup == "ident" else ""
            if kw in ("end", "else"):
                return tuple(out), (kw, item, pos)
            node = self.action(kw, item, pos)
            out += [node] if node is not None else []
        return tuple(out), None

    def action(self, kw: str, toks: list[_Tok], pos: int) -> _Node | None:
        if kw in ("if", "with", "range"):
            return self.branch(kw, toks[1:], pos)
        if kw in ("break", "continue"):
            if not self.loops or len(toks) > 1:
                raise self.fail(pos, f"{{{{{kw}}}}} outside {{{{range}}}}")
            return _Jump(kw, self.line(pos))
        if kw not in ("define", "block", "template"):
            return _Action(self.pipe(toks, pos), self.line(pos))
        if len(toks) < 2 or toks[1].lastgroup not in ("str", "raw"):
            raise self.fail(pos, f"{{{{{kw}}}}} needs a quoted template name")
        name, pipe = _literal(toks[1]), self.pipe(toks[2:], pos) if len(toks) > 2 else None
        if kw != "template":
            saved, self.vars, self.loops = (self.vars, self.loops), ["$"], 0
            body, stop = self.nodes()
            self.check_end(kw, pos, stop)
            (self.vars, self.loops), self.defs[name] = saved, body
        return None if kw == "define" else _Include(name, pipe, self.line(pos))

    def check_end(self, kw: str, pos: int, stop: tuple[str, list[_Tok], int] | None) -> None:
        if stop is None:
            raise self.fail(pos, f"unclosed {{{{{kw}}}}}: unexpected EOF")
        if stop[0] != "end" or len(stop[1]) > 1:
            raise self.fail(stop[2], f"unexpected {{{{{' '.join(t.group() for t in stop[1])}}}}} in {{{{{kw}}}}}")

    def branch(self, kw: str, toks: list[_Tok], pos: int) -> _Branch:
        mark, loop = len(self.vars), int(kw == "range")
        self.loops += loop
        pipe = self.pipe(toks, pos, 1 + loop)
        body, stop = self.nodes()
        self.loops -= loop
        orelse: tuple[_Node, ...] = ()
        if stop and stop[0] == "else":
            rest = stop[1][1:]
            if rest and kw != "range" and rest[0].group() == kw:  # else if / else with: shares our {{end}}
                orelse, stop = (self.branch(kw, rest[1:], stop[2]),), ("end", [], 0)
            elif rest:
                raise self.fail(stop[2], "unexpected tokens after {{else}}")
            else:
                orelse, stop = self.nodes()
        del self.vars[mark:]
        self.check_end(kw, pos, stop)
        return _Branch(kw, pipe, body, orelse, self.line(pos))

    def pipe(self, toks: list[_Tok], pos: int, max_decl: int = 1) -> _Pipe:
        n = next((i for i, t in enumerate(toks[:2 * max_decl]) if t.group() in (":=", "=")), 0)
        names = [t.group() for t in toks[:n:2]]
        if n and not (all(t.lastgroup == "var" and "." not in t.group() for t in toks[:n:2])
                      and all(t.group() == "," for t in toks[1:n:2])):
            raise self.fail(pos, "bad variable declaration")
        assign = n > 0 and toks[n].group() == "="
        for name in names if assign else ():
            if name not in self.vars:
                raise self.fail(pos, f'undefined variable "{name}"')
        cmds = self.commands(toks[n + 1 if n else 0:], pos)
        self.vars += [] if assign else names
        return _Pipe(tuple(names), assign, cmds)

    def commands(self, toks: list[_Tok], pos: int) -> tuple[tuple[_Lit | _Func | _Ref, ...], ...]:
        out: list[tuple[_Lit | _Func | _Ref, ...]] = []
        j = 0
        while True:
            args: list[_Lit | _Func | _Ref] = []
            while j < len(toks) and toks[j].group() != "|":
                expr, j = self.operand(toks, j, pos)
                args.append(expr)
            if not args:
                raise self.fail(pos, "missing value for command")
            if not isinstance(args[0], _Func) and (len(args) > 1 or out):
                raise self.fail(pos, "can't give argument to non-function")
            out.append(tuple(args))
            if j == len(toks):
                return tuple(out)
            j += 1

    def chain(self, text: str) -> tuple[str, ...]:
        names = tuple(n for n in text.split(".") if n)
        self.fields.update(n.lower() for n in names)
        return names

    def operand(self, toks: list[_Tok], j: int, pos: int) -> tuple[_Lit | _Func | _Ref, int]:
        t, kind, text = toks[j], toks[j].lastgroup, toks[j].group()
        if text == "(":
            depth, k = 0, j
            for k in range(j, len(toks)):
                depth += {"(": 1, ")": -1}.get(toks[k].group(), 0) if toks[k].lastgroup == "op" else 0
                if depth == 0:
                    break
            if depth:
                raise self.fail(t.start(), "unclosed left paren")
            pipe = _Pipe((), False, self.commands(toks[j + 1:k], pos))
            if k + 1 < len(toks) and toks[k + 1].lastgroup == "field" and toks[k + 1].start() == toks[k].end():
                return _Ref(pipe, self.chain(toks[k + 1].group())), k + 2
            return _Ref(pipe, ()), k + 1
        if kind in ("str", "raw", "chr", "num"):
            try:
                return _Lit(_literal(t)), j + 1
            except (ValueError, IndexError) as e:
                raise self.fail(t.start(), f"bad literal {text}: {e}") from None
        if text in ("true", "false", "nil"):
            return _Lit({"true": True, "false": False}.get(text)), j + 1
        if kind == "ident":
            if text not in _FUNCS:
                raise self.fail(t.start(), f'function "{text}" not defined')
            return _Func(text), j + 1
        if kind in ("dot", "field"):
            return _Ref(None, self.chain(text)), j + 1
        if kind == "var":
            name = text.split(".")[0]
            if name not in self.vars:
                raise self.fail(t.start(), f'undefined variable "{name}"')
            return _Ref(name, self.chain(text[len(name):])), j + 1
        raise self.fail(t.start(), f"unexpected {text!r} in command")


# --- execution ------------------------------------------------------------------------------------


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


_NOPIPE = object()
_Env = list[list[Any]]  # [name, value] pairs, innermost last, like Go's exec state


def _items(v: Any, line: int) -> list[tuple[Any, Any]]:
    if v is None:
        return []
    if isinstance(v, Mapping):
        return [(k, v[k]) for k in sorted(v, key=str)]
    if isinstance(v, (list, tuple)):
        return list(enumerate(v))
    if isinstance(v, int) and not isinstance(v, bool):
        if v > MAX_STEPS:
            raise TemplateError(f"line {line}: range over {v} is more than a template may do")
        return [(i, i) for i in range(v)]
    raise TemplateError(f"line {line}: range can't iterate over {_fmt(v)}")


# Budgets for one render: a template comes from a user's Modelfile and runs in
# a worker thread that cancellation cannot stop, so it must end by itself.
MAX_STEPS = 1_000_000  # nodes executed
MAX_OUTPUT = 16 << 20  # characters written


@dataclass
class _Exec:
    defs: Mapping[str, tuple[_Node, ...]]
    out: list[str] = field(default_factory=list)
    depth: int = 0
    steps: int = 0
    size: int = 0

    def run(self, nodes: tuple[_Node, ...], dot: Any, env: _Env) -> None:
        for n in nodes:
            self.steps += 1
            if self.steps > MAX_STEPS or self.size > MAX_OUTPUT:
                raise TemplateError("template does more work than a prompt needs "
                                    f"(over {MAX_STEPS} steps or {MAX_OUTPUT} characters)")
            if isinstance(n, str):
                self.size += len(n)
                self.out.append(n)
            elif isinstance(n, _Action):
                value = self.pipe(n.pipe, dot, env, n.line)
                if not n.pipe.decl:
                    text = _fmt(value, top=True)
                    self.size += len(text)
                    self.out.append(text)
            elif isinstance(n, _Branch):
                self.branch(n, dot, env)
            elif isinstance(n, _Include):
                if n.name not in self.defs or self.depth > 100:
                    raise TemplateError(f'line {n.line}: no such template "{n.name}" or nested too deep')
                new = self.pipe(n.pipe, dot, env, n.line) if n.pipe else None
                self.depth += 1
                self.run(self.defs[n.name], new, [["$", new]])
                self.depth -= 1
            else:
                raise _Break() if n.kind == "break" else _Continue()

    def branch(self, n: _Branch, dot: Any, env: _Env) -> None:
        mark = len(env)
        try:
            value = self.pipe(n.pipe, dot, env, n.line)
            if n.kind != "range":
                taken = _truth(value)
                self.run(n.body if taken else n.orelse, value if taken and n.kind == "with" else dot, env)
                return
            items = _items(value, n.line)
            if not items:
                self.run(n.orelse, dot, env)
            for key, elem in items:
                inner = len(env)
                for name, v in zip(n.pipe.decl[::-1], (elem, key)):
                    self.set(env, name, v, n.line)
                try:
                    self.run(n.body, elem, env)
                except _Break:
                    break
                except _Continue:
                    pass
                finally:
                    del env[inner:]
        finally:
            del env[mark:]

    def set(self, env: _Env, name: str, value: Any, line: int) -> None:
        for pair in reversed(env):
            if pair[0] == name:
                pair[1] = value
                return
        raise TemplateError(f'line {line}: undefined variable "{name}"')

    def pipe(self, p: _Pipe, dot: Any, env: _Env, line: int) -> Any:
        value: Any = _NOPIPE
        for head, *args in p.cmds:
            if isinstance(head, _Func):
                value = self.call(head.name, args + ([] if value is _NOPIPE else [_Lit(value)]), dot, env, line)
            elif head == _Lit(None):
                raise TemplateError(f"line {line}: nil is not a command")
            else:
                value = self.arg(head, dot, env, line)
        for name in p.decl:
            if p.assign:
                self.set(env, name, value, line)
            else:
                env.append([name, value])
        return value

    def call(self, name: str, args: list[_Lit | _Func | _Ref], dot: Any, env: _Env, line: int) -> Any:
        if name in ("and", "or"):
            if not args:
                raise TemplateError(f"line {line}: wrong number of args for {name}")
            for a in args:
                value = self.arg(a, dot, env, line)
                if _truth(value) == (name == "or"):
                    break
            return value
        try:
            return _FUNCS[name](*(self.arg(a, dot, env, line) for a in args))
        except (TypeError, ValueError, IndexError) as e:
            if isinstance(e, TemplateError) and str(e).startswith("line "):
                raise
            raise TemplateError(f"line {line}: error calling {name}: {e}") from None

    def arg(self, e: _Lit | _Func | _Ref, dot: Any, env: _Env, line: int) -> Any:
        if isinstance(e, _Lit):
            return e.value
        if isinstance(e, _Func):
            return self.call(e.name, [], dot, env, line)
        if isinstance(e.base, _Pipe):
            value = self.pipe(e.base, dot, env, line)
        else:
            value = dot if e.base is None else next((v for k, v in reversed(env) if k == e.base), None)
        for name in e.names:
            if value is not None and not isinstance(value, Mapping):
                raise TemplateError(f"line {line}: can't evaluate field {name} in type {_gotype(value)}")
            value = _lookup(value, name)
        return value


# --- public API -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """A parsed template; make one with :func:`parse`."""

    root: tuple[_Node, ...]
    defs: Mapping[str, tuple[_Node, ...]]
    fields: frozenset[str]

    def render(self, data: Mapping[str, Any]) -> str:
        """Execute with ``data`` as dot and ``$``; raises TemplateError."""
        prepared = _prepare(data)
        ex = _Exec(self.defs)
        try:
            ex.run(self.root, prepared, [["$", prepared]])
        except RecursionError:
            raise TemplateError("template nested too deep") from None
        return "".join(ex.out)

    def uses(self, field: str) -> bool:
        """Whether a field chain (``.X``, ``$.X``, ``$v.X``, ``(p).X``) anywhere names ``field``.

        Case-insensitive, like Ollama's Template.Vars, whose "messages" check picks the chat path.
        """
        return field.lower() in self.fields


MAX_TEMPLATE_BYTES = 1 << 20  # a chat template is a few KB; Ollama's largest are ~10 KB


def parse(text: str) -> Template:
    """Parse ``text``; raises TemplateError (with the line) on bad syntax.

    Templates come from Modelfiles, i.e. from users: nothing but a
    TemplateError may escape (deep nesting would otherwise raise RecursionError
    wherever the model's capabilities are read)."""
    if len(text) > MAX_TEMPLATE_BYTES:
        raise TemplateError(f"template is larger than {MAX_TEMPLATE_BYTES} bytes")
    try:
        p = _Parser(text)
        root, stop = p.nodes()
        if stop is not None:
            raise p.fail(stop[2], f"unexpected {{{{{stop[0]}}}}}")
    except RecursionError:
        raise TemplateError("template nested too deep") from None
    return Template(root, dict(p.defs), frozenset(p.fields))
