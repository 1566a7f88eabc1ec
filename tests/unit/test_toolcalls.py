"""The tool-call parser, fed scripted model output in every possible split."""

from __future__ import annotations

import json
import random

import pytest

from meshollama.backends.toolcalls import ToolCallParser, arguments_object, call_id, names_by_id, tool_tag

NAMES = {"get_weather", "add"}


def run(text: str, tag: str = "<tool_call>", *, step: int | None = None) -> tuple[str, list]:
    """Feed ``text`` in pieces of ``step`` characters (all at once when None)."""
    p = ToolCallParser(tag, NAMES, rng=random.Random(1))
    content, calls = [], []
    pieces = [text] if step is None else [text[i:i + step] for i in range(0, len(text), step)]
    for piece in pieces:
        c, k = p.feed(piece)
        content.append(c)
        calls.extend(k)
    c, k = p.finish()
    content.append(c)
    calls.extend(k)
    return "".join(content), [(k.index, k.name, dict(k.arguments)) for k in calls]


CASES = [
    # (model output, content the client sees, calls)
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "", [(0, "get_weather", {"city": "Paris"})]),
    ('Let me check.<tool_call>{"name":"get_weather","arguments":{"city":"Oslo"}}</tool_call>',
     "Let me check.", [(0, "get_weather", {"city": "Oslo"})]),
    ('<tool_call>{"name":"add","arguments":{"a":1,"b":2}}</tool_call>\n'
     '<tool_call>{"name":"get_weather","parameters":{"city":"Rome"}}</tool_call>',
     "\n", [(0, "add", {"a": 1, "b": 2}), (1, "get_weather", {"city": "Rome"})]),
    ('<tool_call>[{"name":"add","arguments":{"a":1}},{"function":{"name":"add","arguments":"{\\"a\\":2}"}}]</tool_call>',
     "", [(0, "add", {"a": 1}), (1, "add", {"a": 2})]),
    # An unknown function is not a call: the client sees what the model wrote.
    ('<tool_call>{"name":"rm_rf","arguments":{}}</tool_call>', '<tool_call>{"name":"rm_rf","arguments":{}}</tool_call>', []),
    # Output cut off inside a call: nothing is lost.
    ('<tool_call>{"name":"add","argu', '<tool_call>{"name":"add","argu', []),
    ("no tools here, just < and <tool text", "no tools here, just < and <tool text", []),
    ('<tool_call>not json</tool_call>', "<tool_call>not json</tool_call>", []),
    # smollm2's template: a list after the tag; an empty one is "no call".
    ('<tool_call>[\n{"name": "add", "arguments": {"a": 1}}\n]</tool_call>', "", [(0, "add", {"a": 1})]),
    ("<tool_call>[]</tool_call>", "", []),
]


@pytest.mark.parametrize("text,content,calls", CASES)
@pytest.mark.parametrize("step", [None, 1, 2, 3, 7])
def test_parser_any_split(text, content, calls, step):
    assert run(text, step=step) == (content, calls)


def test_brace_tag_counts_only_calls_that_open_the_answer():
    out = '{"name": "add", "arguments": {"a": 1}}'
    for step in (None, 1, 5):
        assert run(out, "{", step=step) == ("", [(0, "add", {"a": 1})])
        assert run("  " + out, "{", step=step) == ("", [(0, "add", {"a": 1})])
        assert run("Sure: " + out, "{", step=step) == ("Sure: " + out, [])


def test_text_before_a_tag_streams_at_once_and_partial_tags_are_held():
    p = ToolCallParser("<tool_call>", NAMES)
    assert p.feed("Hello <to") == ("Hello ", [])
    assert p.feed("ol") == ("", [])
    assert p.feed("bar") == ("<toolbar", [])
    assert p.finish() == ("", [])


def test_ids_and_wire_shapes():
    assert call_id(random.Random(3)).startswith("call_") and len(call_id()) == 13
    p = ToolCallParser("<tool_call>", NAMES, rng=random.Random(1))
    _, [call] = p.feed('<tool_call>{"name":"add","arguments":{"a":1}}</tool_call>')
    assert call.native() == {"id": call.id, "function": {"index": 0, "name": "add", "arguments": {"a": 1}}}
    wire = call.openai()
    assert wire["type"] == "function" and wire["index"] == 0 and wire["id"] == call.id
    assert json.loads(wire["function"]["arguments"]) == {"a": 1}


def test_tag_from_template_and_history_helpers():
    assert tool_tag("... <tool_call>\n{...}\n</tool_call>") == "<tool_call>"
    assert tool_tag("{{ range .ToolCalls }}{{ .Function.Name }}{{ end }}") == "{"
    assert tool_tag("{%- if tools %}<|python_tag|>{% endif %}") == "{"  # a control token, not text
    assert arguments_object('{"x": 1}') == {"x": 1}
    assert arguments_object("not json") == {} and arguments_object({"y": 2}) == {"y": 2}
    history = [{"role": "assistant", "tool_calls": [{"id": "call_1", "function": {"name": "add"}}]}]
    assert names_by_id(history) == {"call_1": "add"}
