"""How a model's chat template turns messages and tools into a prompt (pure).

Two kinds of template exist, and a model uses exactly one:

* **Ollama's Go templates** (``.Messages``, ``.Tools``, ``.System``...): the
  built-in ``smollm2:135m`` ships Ollama's library template for SmolLM2, and
  any model in the model directory may carry one in a Modelfile (``TEMPLATE``)
  or a ``<stem>.template`` file. Rendered by :mod:`.gotemplate` with the data
  Ollama's ``chatPrompt`` builds: consecutive messages of one role collated,
  every system message also gathered into ``.System``.
* **The GGUF's own Jinja template** (``tokenizer.chat_template``), rendered by
  llama-cpp-python's formatter in :mod:`.llama_engine` (it needs the model's
  BOS/EOS text), with ``tools`` passed through for templates that use them.

What a template can do is read off it as Ollama does: ``tools`` when it uses
``.Tools`` (Jinja: mentions ``tools`` or ``tool_call``), ``insert`` for
``.Suffix``; the tag a model writes before a call comes from the template
(:func:`.toolcalls.tool_tag`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from ..errors import RequestError
from . import gotemplate
from .toolcalls import tool_tag

DEFAULT_TEMPLATE_FILE = "smollm2.gotmpl"


@functools.cache
def builtin_template(name: str = DEFAULT_TEMPLATE_FILE) -> str:
    """A Go template shipped with meshollama (``backends/templates/``).

    Without the file's final newline: an editor's, not the template's. Kept,
    it ended every prompt, so a fresh answer started after a blank line and
    a prefilled assistant message (``Ollama continues a final assistant
    message``, what mid-stream resume sends) was cut off by a line break."""
    return resources.files(__package__).joinpath("templates", name).read_text(encoding="utf-8").removesuffix("\n")


@dataclass(frozen=True)
class ChatTemplate:
    """A model's template, and what it implies. ``kind`` is ``"go"`` or ``"jinja"``."""

    kind: str
    text: str
    system: str = ""  # the Modelfile's SYSTEM: used when a request has no system message
    _go: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def go(cls, text: str, system: str = "") -> ChatTemplate:
        try:
            parsed = gotemplate.parse(text)
        except gotemplate.TemplateError as e:
            raise ValueError(f"bad template: {e}") from e
        return cls("go", text, system, parsed)

    @classmethod
    def jinja(cls, text: str, system: str = "") -> ChatTemplate:
        return cls("jinja", text, system)

    @property
    def capabilities(self) -> tuple[str, ...]:
        """Capabilities beyond completion, in Ollama's order."""
        caps = []
        if self.kind == "go":
            if self._go.uses("Tools"):
                caps.append("tools")
            if self._go.uses("Suffix"):
                caps.append("insert")
        elif "tools" in self.text or "tool_call" in self.text:
            caps.append("tools")
        return tuple(caps)

    @property
    def tool_tag(self) -> str:
        return tool_tag(self.text)

    def messages(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The request's messages, with the Modelfile's system prompt first when it has none."""
        out = [dict(m) for m in messages]
        if self.system and not any(m.get("role") == "system" for m in out):
            out.insert(0, {"role": "system", "content": self.system})
        return out

    def render_go(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]],
                  think: bool = False) -> str:
        """The prompt as Ollama renders a Go template (``server/prompt.go`` ``chatPrompt``)."""
        try:
            return self._go.render(go_data(self._go, messages, tools, think))
        except gotemplate.TemplateError as e:
            raise RequestError(f"template: {e}", 500) from None


def go_data(tmpl: Any, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]],
            think: bool) -> dict[str, Any]:
    """The values a Go template sees. Templates without ``.Messages`` (older ones)
    get the last user turn as ``.Prompt``, as Ollama's legacy path does for one turn."""
    collated = collate(messages)
    system = "\n\n".join(m["Content"] for m in collated if m["Role"] == "system")
    data: dict[str, Any] = {"System": system, "Messages": collated, "Tools": list(tools),
                            "Response": "", "Think": think, "ThinkLevel": "", "IsThinkSet": think}
    if not tmpl.uses("Messages"):
        prompt = next((m["Content"] for m in reversed(collated) if m["Role"] == "user"), "")
        data.update(Prompt=prompt, Messages=[])
    return data


def collate(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Ollama's ``collate``: consecutive messages of one role (tool results apart)
    become one, contents joined by a blank line; fields renamed as Go templates see them."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role = str(m.get("role") or "")
        content = str(m.get("content") or "")
        calls = [_go_call(c) for c in m.get("tool_calls") or ()]
        if out and out[-1]["Role"] == role and role != "tool" and not calls and not out[-1]["ToolCalls"]:
            out[-1]["Content"] += "\n\n" + content
            continue
        out.append({"Role": role, "Content": content, "Thinking": str(m.get("thinking") or ""),
                    "Images": [], "ToolCalls": calls, "ToolName": str(m.get("tool_name") or ""),
                    "ToolCallID": str(m.get("tool_call_id") or "")})
    return out


def _go_call(call: Mapping[str, Any]) -> dict[str, Any]:
    fn = call.get("function") or {}
    return {"ID": str(call.get("id") or ""),
            "Function": {"Index": int(fn.get("index") or 0), "Name": str(fn.get("name") or ""),
                         "Arguments": dict(fn.get("arguments") or {})}}
