"""Tests for meshollama.backends.gotemplate, the Go text/template subset used by Ollama templates.

Golden data in gotemplate_data/:
- ollama_templates/: the *.gotmpl files of Ollama's template/ directory with the expected
  renders from its template/testdata (Ollama commit fb30760996871fa9460115c753afd2c60d4ab0f7),
  checked byte for byte as Ollama's TestTemplate does.
- go_golden.json: cases rendered by Go's real text/template through a copy of Ollama's
  template.Execute (gen_golden.go); "values" cases go through Ollama's data building
  (reproduced by ``ollama_values`` below), "data" cases run on the map as given.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest

from meshollama.backends.gotemplate import Template, TemplateError, parse

DATA = Path(__file__).parent / "gotemplate_data"
REPO_TEMPLATES = sorted((DATA / "ollama_templates").glob("*.gotmpl"))
GOLDEN = json.loads((DATA / "go_golden.json").read_text(encoding="utf-8"))

# Deliberate differences from Go, each documented in the module docstring.
NO_VALUE = "<no value>"  # Go prints this for a nil interface (missing key, JSON null); we print ""
LENIENT = {"field-chain-lowercase"}  # Go: "nil pointer evaluating interface {}.X"; we give nil

# The three conversations of Ollama's TestTemplate (template/template_test.go).
REPO_CASES: dict[str, list[dict[str, str]]] = {
    "user": [{"role": "user", "content": "Hello, how are you?"}],
    "user-assistant-user": [
        {"role": "user", "content": "Hello, how are you?"},
        {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
        {"role": "user", "content": "I'd like to show off how chat templating works!"},
    ],
    "system-user-assistant-user": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello, how are you?"},
        {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
        {"role": "user", "content": "I'd like to show off how chat templating works!"},
    ],
}
# Ollama's TestTemplate drops one trailing space from these templates' output before comparing.
TRAILING_SPACE = {"chatqa.gotmpl", "llama2-chat.gotmpl", "mistral-instruct.gotmpl",
                  "openchat.gotmpl", "vicuna.gotmpl"}


def ollama_values(values: dict[str, Any]) -> dict[str, Any]:
    """The data Ollama's template.Execute hands a template that uses .Messages (or a suffix).

    ``values`` holds API-shaped messages and tools. System messages are joined into .System
    and also stay in .Messages; consecutive messages of one role (except "tool") are merged
    with "\\n\\n" (only Content is merged: the later message's other fields are dropped).
    """
    think = bool(values.get("think"))
    base = {"Response": "", "Think": think, "ThinkLevel": "", "IsThinkSet": False}
    if values.get("prompt") and values.get("suffix"):
        return {"Prompt": values["prompt"], "Suffix": values["suffix"], **base}
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for m in values.get("messages") or []:
        if m["role"] == "system":
            system.append(m.get("content", ""))
        if messages and messages[-1]["Role"] == m["role"] and m["role"] != "tool":
            messages[-1]["Content"] += "\n\n" + m.get("content", "")
            continue
        messages.append({"Role": m["role"], "Content": m.get("content", ""),
                         "Thinking": m.get("thinking", ""), "ToolCalls": m.get("tool_calls"),
                         "ToolName": m.get("tool_name", ""), "ToolCallID": m.get("tool_call_id", "")})
    return {"System": "\n\n".join(system), "Messages": messages, "Tools": values.get("tools"), **base}


def render(text: str, data: dict[str, Any] | None = None) -> str:
    return parse(text).render(data or {})


# --- golden: Ollama's own templates and expected renders ------------------------------------------


@pytest.mark.parametrize("case", sorted(REPO_CASES))
@pytest.mark.parametrize("path", REPO_TEMPLATES, ids=lambda p: p.name)
def test_ollama_repo_templates(path: Path, case: str) -> None:
    tmpl = parse(path.read_text(encoding="utf-8"))
    assert tmpl.uses("Messages")  # so Ollama takes the .Messages path
    got = tmpl.render(ollama_values({"messages": REPO_CASES[case]}))
    if path.name in TRAILING_SPACE and got.endswith(" "):
        got = got[:-1]
    assert got == (DATA / "ollama_templates" / "testdata" / path.name / case).read_text(encoding="utf-8")


def test_repo_golden_set_is_complete() -> None:
    names = {p.name for p in REPO_TEMPLATES}
    assert len(names) == 20
    assert {"chatml.gotmpl", "llama3-instruct.gotmpl", "mistral-instruct.gotmpl", "phi-3.gotmpl",
            "gemma-instruct.gotmpl", "gemma3-instruct.gotmpl", "command-r.gotmpl"} <= names


# --- golden: rendered by Go -----------------------------------------------------------------------


@pytest.mark.parametrize("case", GOLDEN, ids=lambda c: c["name"])
def test_go_golden(case: dict[str, Any]) -> None:
    data = case["data"] if "data" in case else ollama_values(case["values"])
    if case["name"] in LENIENT:
        assert parse(case["template"]).render(data) == "ab||"
    elif case.get("error"):
        with pytest.raises(TemplateError, match=r"^line \d+: "):
            parse(case["template"]).render(data)
    else:
        assert parse(case["template"]).render(data) == case["expected"].replace(NO_VALUE, "")


def test_go_golden_errors_report_the_same_line() -> None:
    for case in GOLDEN:
        if case.get("error") and case["name"] not in LENIENT:
            go_line = case["error"].split(":")[2]  # "template: :LINE[:COL]: ..."
            with pytest.raises(TemplateError) as err:
                parse(case["template"]).render(case.get("data") or {})
            assert str(err.value).startswith(f"line {go_line}: "), (case["name"], str(err.value))


# --- tools: a hermes/qwen style template end to end ----------------------------------------------

HERMES = """{{- if or .System .Tools }}<|im_start|>system
{{ .System }}
{{- if .Tools }}
<tools>
{{- range .Tools }}
{"type": "function", "function": {{ .Function }}}
{{- end }}
</tools>
{{- end }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ if .Content }}{{ .Content }}
{{- else if .ToolCalls }}<tool_call>
{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
{{ end }}</tool_call>
{{- end }}{{ if not $last }}<|im_end|>
{{ end }}
{{- else if eq .Role "tool" }}<|im_start|>user
<tool_response>
{{ .Content }}
</tool_response><|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}"""

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city", "strict": True,
    "parameters": {"type": "object", "required": ["city"], "additionalProperties": False,
                   "properties": {"unit": {"type": "string", "enum": ["c", "f"]},
                                  "city": {"type": "string", "description": "City"}}}}}


def test_hermes_tools_template_renders_tools_calls_and_results() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"index": 0, "name": "get_weather", "arguments": {"unit": "c", "city": "Paris"}}}]},
        {"role": "tool", "content": "21", "tool_name": "get_weather"},
    ]
    got = render(HERMES, ollama_values({"messages": messages, "tools": [WEATHER_TOOL]}))
    assert got == """<|im_start|>system
Be brief.
<tools>
{"type": "function", "function": {"name":"get_weather","description":"Weather for a city","parameters":{"type":"object","required":["city"],"properties":{"city":{"type":"string","description":"City"},"unit":{"type":"string","enum":["c","f"]}}}}}
</tools><|im_end|>
<|im_start|>user
Weather in Paris?<|im_end|>
<|im_start|>assistant
<tool_call>
{"name": "get_weather", "arguments": {"city":"Paris","unit":"c"}}
</tool_call><|im_end|>
<|im_start|>user
<tool_response>
21
</tool_response><|im_end|>
<|im_start|>assistant
"""


def test_hermes_without_tools_or_system_skips_the_system_turn() -> None:
    got = render(HERMES, ollama_values({"messages": [{"role": "user", "content": "hi"}]}))
    assert got == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tool_json_printing() -> None:
    data = ollama_values({"messages": [], "tools": [WEATHER_TOOL]})
    tool_json = ('{"type":"function","function":{"name":"get_weather","description":"Weather for a city",'
                 '"parameters":{"type":"object","required":["city"],"properties":{"city":{"type":"string",'
                 '"description":"City"},"unit":{"type":"string","enum":["c","f"]}}}}}')
    assert render("{{ range .Tools }}{{ . }}{{ end }}", data) == tool_json
    assert render("{{ .Tools }}", data) == f"[{tool_json}]"
    assert render("{{ json .Tools }}", data) == f"[{tool_json}]"
    assert render("{{ range .Tools }}{{ .Function.Parameters.Required }}{{ end }}", data) == "[city]"
    assert render("{{ .Tools }}", {"Tools": None}) == "null"  # Ollama's nil templateTools
    assert render("{{ .Tools }}", {"Tools": []}) == "[]"


def test_tool_call_arguments_are_sorted_json_with_go_numbers() -> None:
    args = {"n": 3, "big": 10**7, "s": "<a&b>"}
    msgs = [{"Role": "assistant", "ToolCalls": [{"Function": {"Name": "f", "Arguments": args}}]}]
    tmpl = ("{{ range .Messages }}{{ range .ToolCalls }}{{ .Function.Arguments }} "
            "{{ range $k, $v := .Function.Arguments }}{{ $k }}={{ $v }};{{ end }}{{ end }}{{ end }}")
    want = '{"big":10000000,"n":3,"s":"\\u003ca\\u0026b\\u003e"} big=1e+07;n=3;s=<a&b>;'
    assert render(tmpl, {"Messages": msgs}) == want


def test_json_escapes_like_go_1_22() -> None:
    assert render(r'{{ json "a\bb\fc\x01<>&" }}') == r'"a\bb\fc\u0001\u003c\u003e\u0026"'


# --- language table tests -------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "want"), [
    ("a  {{- 1 }}  b", "a1  b"),
    ("a  {{ 1 -}}  \n\n b", "a  1b"),
    ("a\n\t {{- 1 -}} \r\n b", "a1b"),
    ("x {{- /* c */ -}} y", "xy"),
    ("{{-3}}", "-3"),
    ("{{ 1 }}\n{{- 2 }}\n{{ 3 -}}\n", "12\n3"),
])
def test_trim_markers(text: str, want: str) -> None:
    assert render(text) == want


@pytest.mark.parametrize(("text", "want"), [
    ('{{ $x := "a" }}{{ if true }}{{ $x := "b" }}{{ $x }}{{ end }}{{ $x }}', "ba"),
    ('{{ $x := "a" }}{{ if true }}{{ $x = "b" }}{{ end }}{{ $x }}', "b"),
    ('{{ $x := "" }}{{ range .L }}{{ $x = printf "%s%s" $x . }}{{ end }}{{ $x }}', "pq"),
    ("{{ range .L }}{{ $y := . }}{{ $y }}{{ end }}", "pq"),
    ('{{ if $v := .S }}{{ $v }}{{ else }}{{ $v }}!{{ end }}', "s"),
    ('{{ with $v := .L }}{{ len $v }}{{ end }}', "2"),
    ('{{ define "t" }}{{ $ }}{{ end }}{{ range .L }}{{ template "t" . }}{{ end }}', "pq"),
])
def test_variable_scoping(text: str, want: str) -> None:
    assert render(text, {"L": ["p", "q"], "S": "s"}) == want


@pytest.mark.parametrize(("text", "line"), [
    ("{{ if true }}{{ $x := 1 }}{{ end }}\n{{ $x }}", 2),
    ("{{ range .L }}{{ $x := 1 }}{{ end }}\n\n{{ $x }}", 3),
    ("{{ $y = 1 }}", 1),
])
def test_variable_is_gone_after_its_end(text: str, line: int) -> None:
    with pytest.raises(TemplateError, match=f'^line {line}: undefined variable "\\$[xy]"'):
        parse(text)


@pytest.mark.parametrize(("text", "want"), [
    ('{{ eq .R "user" "system" }}', "true"),
    ('{{ eq .R "a" "b" "c" }}', "false"),
    ('{{ eq .R "user" }}', "true"),
    ('{{ eq 1 2 3 1 }}', "true"),
    ('{{ if eq .R "tool" "user" }}yes{{ end }}', "yes"),
    ('{{ eq .Missing "" }}', "false"),
    ('{{ ne .R "user" }}', "false"),
])
def test_eq_with_several_arguments(text: str, want: str) -> None:
    assert render(text, {"R": "user"}) == want


def test_eq_of_different_types_is_an_error() -> None:
    with pytest.raises(TemplateError, match="^line 2: error calling eq: incompatible types"):
        render('\n{{ eq "1" 1 }}')


@pytest.mark.parametrize(("text", "want"), [
    ("{{ range $i, $v := .L }}{{ $i }}:{{ $v }} {{ end }}", "0:a 1:b 2:c "),
    ("{{ range $i, $_ := .L }}{{ if $i }},{{ end }}{{ . }}{{ end }}", "a,b,c"),
    ("{{ range $i, $m := .L }}{{ len (slice $.L $i) }}{{ end }}", "321"),
    ("{{ range $k, $v := .M }}{{ $k }}={{ $v }} {{ end }}", "a=1 b=2 "),
    ("{{ range .Empty }}x{{ else }}none{{ end }}", "none"),
    ("{{ range $i := 3 }}{{ $i }}{{ end }}", "012"),  # Go 1.22 range over int
    ('{{ range .L }}{{ if eq . "b" }}{{ break }}{{ end }}{{ . }}{{ end }}', "a"),
    ('{{ range .L }}{{ if eq . "b" }}{{ continue }}{{ end }}{{ . }}{{ end }}', "ac"),
])
def test_range(text: str, want: str) -> None:
    assert render(text, {"L": ["a", "b", "c"], "M": {"b": 2, "a": 1}, "Empty": []}) == want


@pytest.mark.parametrize(("text", "want"), [
    ("{{ with .S }}<{{ . }}>{{ end }}", "<s>"),
    ("{{ with .E }}<{{ . }}>{{ else }}empty{{ end }}", "empty"),
    ("{{ with .E }}a{{ else with .S }}b{{ . }}{{ end }}", "bs"),  # Go 1.23 else with
    ("{{ and .S .E }}|{{ and .S 0 }}|{{ or .E .S }}|{{ or .E 0 }}", "|0|s|0"),
    ("{{ and .E (index .Nil 0) }}", ""),  # short-circuit: index never runs
    ('{{ printf "%s=%d %v %q %05.1f" "a" 3 .L "x" 2.25 }}', 'a=3 [a b] "x" 002.2'),
    ('{{ print "a" "b" 1 2 }}|{{ println "a" 1 }}', "ab1 2|a 1\n"),
    ('{{ len "né" }} {{ slice "abc" 1 2 }} {{ index .L 1 }} {{ index .M "k" }} {{ index .M "zz" }}', "3 b b v "),
    ("{{ not .E }} {{ not .S }} {{ lt 1 2 }} {{ ge 1.5 2.5 }} {{ gt \"b\" \"a\" }} {{ le 2 2 }}", "true false true false true true"),
    ('{{ .S | printf "%s!" | printf "<%s>" }}', "<s!>"),
    ("{{ (index .Ms 0).Name }} {{ $.S }}", "n s"),
    ("{{ .T }} {{ .F }} {{ .N }} {{ .I }} {{ .X }} {{ .L }} {{ .M }} {{ .Nil }}", "true false  3 1e+06 [a b] map[k:v] "),
    ('{{ "a\\tb" }} {{ `raw\\n` }} {{ 0x10 }} {{ \'a\' }} {{ print nil }}', "a\tb raw\\n 16 97 <nil>"),
])
def test_functions_and_printing(text: str, want: str) -> None:
    data = {"S": "s", "E": "", "L": ["a", "b"], "M": {"k": "v"}, "Ms": [{"Name": "n"}],
            "T": True, "F": False, "N": None, "I": 3, "X": 1e6, "Nil": None}
    assert render(text, data) == want


def test_define_template_block() -> None:
    text = '{{ define "turn" }}[{{ .Role }}]{{ end }}{{ range .Messages }}{{ template "turn" . }}{{ end }}{{ block "tail" . }}end{{ end }}'
    assert render(text, {"Messages": [{"Role": "user"}, {"Role": "assistant"}]}) == "[user][assistant]end"


def test_field_lookup_falls_back_to_json_keys() -> None:
    data = {"X": {"function": {"name": "n"}, "tool_call_id": "id1", "anyOf": 1, "$defs": 2}}
    assert render("{{ .X.Function.Name }} {{ .X.ToolCallID }} {{ .X.AnyOf }} {{ .X.Defs }} {{ .X.Nope }}", data) == "n id1 1 2 "


def test_dates() -> None:
    today = datetime.date.today()
    assert render("{{ currentDate }} {{ yesterdayDate }}") == f"{today} {today - datetime.timedelta(days=1)}"


def test_to_typescript_type() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": ["string", "null"]}, "c": {"anyOf": [{"type": "array"}, {"type": "object"}]}, "d": {}}}}}]
    text = "{{ range .Tools }}{{ range $k, $p := .Function.Parameters.Properties }}{{ $k }}: {{ toTypeScriptType $p }}; {{ end }}{{ end }}"
    assert render(text, {"Tools": tools}) == "a: number; b: string | null; c: any[] | Record<string, any>; d: any; "


# --- uses() -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "field", "want"), [
    ("{{ .Prompt }}", "Prompt", True),
    ("{{ .Prompt }}", "Response", False),
    ("{{ range .Messages }}{{ .Content }}{{ end }}", "Content", True),
    ("{{ range $i, $_ := .Messages }}{{ end }}", "Messages", True),
    ("{{ if $.Tools }}x{{ end }}", "Tools", True),
    ("{{ range .Tools }}{{ .Function.Name }}{{ end }}", "Name", True),
    ("{{ with .A }}{{ else }}{{ if .Think }}{{ end }}{{ end }}", "Think", True),
    ('{{ define "x" }}{{ .Suffix }}{{ end }}', "Suffix", True),
    ("{{ (index .Messages 0).Role }}", "Role", True),
    ("{{ printf \"%s\" (len .Tools) }}", "Tools", True),
    ("{{ .messages }}", "Messages", True),  # case-insensitive, like Ollama's Template.Vars
    ("{{ $tools := 1 }}{{ $tools }}", "Tools", False),
    ("{{/* .Tools */}}Tools", "Tools", False),
])
def test_uses(text: str, field: str, want: bool) -> None:
    assert parse(text).uses(field) is want


def test_uses_on_repo_templates() -> None:
    command_r = parse((DATA / "ollama_templates" / "command-r.gotmpl").read_text(encoding="utf-8"))
    chatml = parse((DATA / "ollama_templates" / "chatml.gotmpl").read_text(encoding="utf-8"))
    assert command_r.uses("Tools") and command_r.uses("System") and not command_r.uses("Suffix")
    assert not chatml.uses("Tools") and not chatml.uses("System") and not chatml.uses("Response")


# --- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "match"), [
    ("a\nb {{ .X ", r"^line 2: unclosed action"),
    ("{{ if .X }}\n{{ else }}\n{{ else }}{{ end }}", r"^line 3: unexpected \{\{else\}\}"),
    ("x\n\n{{ end }}", r"^line 3: unexpected \{\{end\}\}"),
    ("{{ range .L }}\nx", r"^line 1: unclosed \{\{range\}\}"),
    ("\n{{ nope }}", r'^line 2: function "nope" not defined'),
    ("{{ continue }}", r"^line 1: \{\{continue\}\} outside \{\{range\}\}"),
    ("{{/* x", r"^line 1: unclosed comment"),
    ("{{ .X .Y }}", r"^line 1: can't give argument to non-function"),
    ("{{ (len .X }}", r"^line 1: unclosed left paren"),
    ('{{ "\\q" }}', r"^line 1: bad literal"),
    ("{{ }}", r"^line 1: missing value for command"),
    ("{{ template x }}", r"^line 1: \{\{template\}\} needs a quoted template name"),
])
def test_parse_errors(text: str, match: str) -> None:
    with pytest.raises(TemplateError, match=match):
        parse(text)


@pytest.mark.parametrize(("text", "match"), [
    ("\n{{ index .L 3 }}", r"^line 2: error calling index: index out of range: 3"),
    ("{{ .S.X }}", r"^line 1: can't evaluate field X in type string"),
    ('{{ template "missing" }}', r'^line 1: no such template "missing"'),
    ("{{ range .S }}{{ end }}", r"^line 1: range can't iterate over s"),
    ("{{ lt .S 1 }}", r"^line 1: error calling lt: incompatible types"),
    ("{{ slice .L 2 1 }}", r"^line 1: error calling slice: index out of range"),
])
def test_execution_errors(text: str, match: str) -> None:
    with pytest.raises(TemplateError, match=match):
        render(text, {"L": ["a"], "S": "s"})


def test_template_error_is_a_value_error_and_template_is_reusable() -> None:
    assert issubclass(TemplateError, ValueError)
    tmpl = parse("{{ .A }}")
    assert isinstance(tmpl, Template)
    assert tmpl.render({"A": 1}) == "1" and tmpl.render({"A": 2}) == "2"


# --- hostile templates (a Modelfile's TEMPLATE is user input) ---------------------------------


def test_deep_nesting_is_a_template_error_not_a_recursion_error():
    with pytest.raises(TemplateError):
        parse("{{if 1}}" * 3000 + "{{end}}" * 3000)
    with pytest.raises(TemplateError):
        parse("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}")


@pytest.mark.parametrize("text", [
    "{{ range 100000000000 }}x{{ end }}",
    '{{ define "a" }}{{ template "b" }}{{ template "b" }}{{ end }}'
    '{{ define "b" }}{{ template "c" }}{{ template "c" }}{{ end }}'
    + "".join(f'{{{{ define "{c}" }}}}{{{{ template "{n}" }}}}{{{{ template "{n}" }}}}{{{{ end }}}}'
              for c, n in zip("cdefghijklmnopqrstuvwxy", "defghijklmnopqrstuvwxyz"))
    + '{{ define "z" }}xxxxxxxx{{ end }}{{ template "a" }}',
])
def test_runaway_templates_stop_with_an_error(text):
    """2^24 includes, or a range of 10^11: the step budget ends them with an error."""
    with pytest.raises(TemplateError, match="range over|more work"):
        parse(text).render({})


def test_printf_widths_are_capped():
    assert parse('{{ printf "%0999999999d" 1 }}').render({}) == "%!d(BADWIDTH)"
    assert parse('{{ printf "%05d" 1 }}').render({}) == "00001"


def test_line_numbers_come_from_a_bisect_not_a_recount():
    text = "{{ .A }}\n" * 1000 + "{{ .B"  # counting lines from 0 per action was quadratic
    with pytest.raises(TemplateError, match="line 1001"):
        parse(text)
    with pytest.raises(TemplateError, match="larger than"):
        parse("x" * (2 << 20))
