"""Tool calls: found in a model's streamed output, rendered back into prompts (sans-IO).

A tools-capable template (Ollama's library templates, Hermes/Qwen style) tells
the model to answer a call as ``<tool_call>{"name": ..., "arguments": {...}}
</tool_call>``. :class:`ToolCallParser` watches the text as it streams: text
before the tag goes to the client at once, a possible partial tag at the end
of a delta is held back (``<tool`` might become ``<tool_call>``), and once a
tag is seen the JSON after it is buffered until it parses, then becomes a
:class:`ToolCall`. Like Ollama's ``tools.Parser``:

* a call is only a call when it names one of the request's tools; anything
  else is handed back as ordinary content, so nothing the model wrote is lost;
* templates whose tag is ``{`` (no tag of their own) only count calls that
  open the answer: once real text was sent, the rest is content too;
* several calls in a row (one tag each, or a JSON list) are all returned,
  with ``index`` numbering them in order.

Unlike Ollama, which drops everything after the tag that is not a call to a
known tool, such text is handed back as content: nothing the model wrote is
lost silently.

:func:`tool_tag` derives the tag from the template text; :func:`call_id`
makes Ollama's ``call_xxxxxxxx`` identifiers.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_DECODER = json.JSONDecoder()
# Tags a model writes as text before its calls. Not <|python_tag|> (Llama 3.x
# Jinja templates mention it, but it is a control token, never detokenised as
# text; those models' calls are bare JSON, tag "{" as Ollama derives for llama3.2).
_KNOWN_TAGS = ("<tool_call>", "[TOOL_CALLS]", "<function_call>", "<|tool_call|>")
_CLOSERS = {"<tool_call>": "</tool_call>", "<function_call>": "</function_call>", "<|tool_call|>": "<|/tool_call|>"}
_ID_CHARS = string.ascii_lowercase + string.digits


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: the function's name and its arguments object."""

    index: int
    name: str
    arguments: Mapping[str, Any]
    id: str = ""

    def native(self) -> dict[str, Any]:
        """``message.tool_calls[i]`` on /api/chat: arguments are an object."""
        return {"id": self.id, "function": {"index": self.index, "name": self.name,
                                             "arguments": dict(self.arguments)}}

    def openai(self) -> dict[str, Any]:
        """``tool_calls[i]`` on /v1/chat/completions (streamed or not): arguments are a JSON string."""
        return {"id": self.id, "index": self.index, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(
                    dict(self.arguments), ensure_ascii=False, separators=(",", ":"))}}


def call_id(rng: random.Random | None = None) -> str:
    """``call_`` and eight lower-case letters or digits, as Ollama names calls."""
    r = rng or random
    return "call_" + "".join(r.choice(_ID_CHARS) for _ in range(8))


def tool_tag(template: str) -> str:
    """The text a template's model writes before a call, or ``{`` when it names none."""
    for tag in _KNOWN_TAGS:
        if tag in template:
            return tag
    return "{"


def tool_names(tools: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    out = set()
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            out.add(fn["name"])
    return frozenset(out)


def _call_from(value: Any, names: frozenset[str]) -> tuple[str, dict[str, Any]] | None:
    """(name, arguments) from one decoded JSON object, if it is a call to a known tool."""
    if not isinstance(value, Mapping):
        return None
    if isinstance(value.get("function"), Mapping):
        value = value["function"]
    name = value.get("name")
    if not isinstance(name, str) or name not in names:
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):  # some models write the OpenAI form, a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return None
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        return None
    return name, dict(args)


class ToolCallParser:
    """Splits streamed model output into content and tool calls (see the module docstring)."""

    def __init__(self, tag: str, names: Iterable[str], *, rng: random.Random | None = None) -> None:
        self.tag = tag
        self.closer = _CLOSERS.get(tag, "")
        self.names = frozenset(names)
        self._rng = rng
        self._buf = ""
        self._calling = False  # inside a call: waiting for its JSON to complete
        self._done = False  # after text that rules calls out (tag "{"), all is content
        self._sent_text = False
        self._after_call = False  # the closing tag of the last call may still come
        self.count = 0

    # -- public --------------------------------------------------------------------

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content to send now, calls completed by this text)."""
        if self._done:
            return text, []
        self._buf += text
        return self._scan(final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end of generation: whatever is held back, and any last call."""
        if self._done:
            return "", []
        content, calls = self._scan(final=True)
        rest, self._buf = self._buf, ""
        return content + rest, calls

    # -- scanning --------------------------------------------------------------------

    def _scan(self, *, final: bool) -> tuple[str, list[ToolCall]]:
        content: list[str] = []
        calls: list[ToolCall] = []
        while self._buf:
            if self._after_call and not self._skip_closer(final):
                break
            if not self._calling:
                if not self._look_for_tag(content, final):
                    break
                continue
            found = self._take_json(final)
            if found is None:
                break  # wait for more text
            if found is False:  # not a call after all: give the raw text back, tag included
                self._calling = False
                raw, self._buf = self._buf, ""
                content.append(raw if self.tag in ("{", "[") else self.tag + raw)
                if self.tag == "{":
                    self._done = True
                break
            calls.extend(found)
        text = "".join(content)
        if text.strip():
            self._sent_text = True
        return text, calls

    def _look_for_tag(self, content: list[str], final: bool) -> bool:
        """Move text before the tag into ``content``; True when a call starts here."""
        buf = self._buf
        if self.tag in ("{", "["):
            stripped = buf.lstrip()
            if self._sent_text or (stripped and stripped[0] not in "{["):
                self._done = True
                content.append(buf)
                self._buf = ""
                return False
            if not stripped:
                if final:
                    content.append(buf)
                    self._buf = ""
                return False
            self._buf = stripped
            self._calling = True
            return True
        i = buf.find(self.tag)
        if i >= 0:
            content.append(buf[:i])
            self._buf = buf[i + len(self.tag):]
            self._calling = True
            return True
        keep = 0 if final else _partial_suffix(buf, self.tag)
        content.append(buf[: len(buf) - keep])
        self._buf = buf[len(buf) - keep:]
        return False

    def _skip_closer(self, final: bool) -> bool:
        """Drop the closing tag after a call; False while it may still be arriving."""
        stripped = self._buf.lstrip()
        if stripped.startswith(self.closer):
            self._buf = stripped[len(self.closer):]
        elif not final and self.closer.startswith(stripped):
            return False  # whitespace or part of the closer so far
        self._after_call = False
        return True

    def _take_json(self, final: bool) -> list[ToolCall] | None | bool:
        """Calls from the JSON at the front of the buffer; None: incomplete; False: not a call."""
        text = self._buf.lstrip()
        if not text:
            return False if final else None
        try:
            value, end = _DECODER.raw_decode(text)
        except json.JSONDecodeError:
            if final or text[0] not in "{[":
                return False
            return None
        values = value if isinstance(value, list) else [value]
        parsed = [_call_from(v, self.names) for v in values]
        if any(p is None for p in parsed) or not isinstance(value, (list, Mapping)):
            return False
        # An empty list is the model saying "no call" (smollm2's template asks for
        # ``<tool_call>[]</tool_call>`` then): consumed, like Ollama, with no calls.
        self._buf = text[end:]
        self._calling = False
        self._after_call = bool(self.closer)
        out = []
        for name, args in parsed:  # type: ignore[misc]
            out.append(ToolCall(self.count, name, args, call_id(self._rng)))
            self.count += 1
        return out


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that could begin ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def arguments_object(value: Any) -> dict[str, Any]:
    """A request's tool-call arguments as an object (OpenAI sends a JSON string)."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError:
            return {}
    return dict(value) if isinstance(value, Mapping) else {}


def names_by_id(messages: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Tool-call id -> function name, from the assistant turns of a history."""
    out: dict[str, str] = {}
    for m in messages:
        for call in m.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(fn, Mapping) and isinstance(call.get("id"), str):
                out[call["id"]] = str(fn.get("name") or "")
    return out
