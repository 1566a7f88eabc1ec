from __future__ import annotations

import random

import pytest

from meshollama.backends import modelfile as m
from meshollama.backends.modelfile import Modelfile
from meshollama.errors import BadRequest, RequestError

INVALID_COMMAND = m.ERR_INVALID_COMMAND
INVALID_ROLE = m.ERR_INVALID_ROLE


def cmds(text: str) -> list[tuple[str, str, str]]:
    return m._commands(text)


# --- the grammar, cases from Ollama's parser/parser_test.go -------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("FROM foo", [("from", "foo", "")]),
        ("FROM /path/to/model/fp16.bin", [("from", "/path/to/model/fp16.bin", "")]),
        ("FROM llama3:7b-instruct-q4_K_M", [("from", "llama3:7b-instruct-q4_K_M", "")]),
        ("PARAMETER param1 value1\nFROM foo", [("parameter", "value1", "param1"), ("from", "foo", "")]),
        (
            "PARAMETER what the \nFROM lemons make lemonade ",
            [("parameter", "the", "what"), ("from", "lemons make lemonade", "")],
        ),
        ("\nFROM foo\nSYSTEM \"\"\"\nThis is a\nmultiline system.\n\"\"\"\n\t\t\t",
         [("from", "foo", ""), ("system", "\nThis is a\nmultiline system.\n", "")]),
        ('FROM foo\nSYSTEM """This is a\nmultiline system."""', [("from", "foo", ""), ("system", "This is a\nmultiline system.", "")]),
        ('FROM foo\nSYSTEM """"""\n', [("from", "foo", ""), ("system", "", "")]),
        ('FROM foo\nSYSTEM ""\n', [("from", "foo", ""), ("system", "", "")]),
        ("FROM foo\nSYSTEM \"'\"\n", [("from", "foo", ""), ("system", "'", "")]),
        ('FROM foo\nSYSTEM """\'\'"\'""\'""\'"\'\'\'\'\'""\'""\'"""\n',
         [("from", "foo", ""), ("system", "''\"'\"\"'\"\"'\"'''''\"\"'\"\"'", "")]),
        ('FROM foo\nSYSTEM """\nThis is a multiline system with "quotes".\n"""\n',
         [("from", "foo", ""), ("system", '\nThis is a multiline system with "quotes".\n', "")]),
        ("FROM foo\nMESSAGE system You are a file parser. Always parse things.",
         [("from", "foo", ""), ("message", "You are a file parser. Always parse things.", "system")]),
        ('FROM foo\nMESSAGE system """\nmulti\n"""\n', [("from", "foo", ""), ("message", "\nmulti\n", "system")]),
        ("# comment\nfRoM foo # not a comment\n  # indented comment\n", [("from", "foo # not a comment", "")]),
        ("\ufeffFROM foo\r\nSYSTEM hi\r\n", [("from", "foo", ""), ("system", "hi", "")]),
        ("FROM foo\nSYSTEM a\x07b\tc\n", [("from", "foo", ""), ("system", "ab\tc", "")]),
    ],
)
def test_commands(text: str, expected: list[tuple[str, str, str]]) -> None:
    assert cmds(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("\nFROM foo\nBADCOMMAND param1 value1\n", f"(line 3): {INVALID_COMMAND}"),
        ("FROM\n", f"(line 2): {INVALID_COMMAND}"),
        ("FROM1 x\n", f"(line 1): {INVALID_COMMAND}"),
        ("\nFROM foo\nMESSAGE badguy I'm a bad guy!\n", f"(line 3): {INVALID_ROLE}"),
        ("\nFROM foo\nMESSAGE system\n", "unexpected EOF: system"),
        ("\nFROM foo\nMESSAGE system", "unexpected EOF"),
        ("\nFROM foo\nPARAMETER param1\n", "unexpected EOF: param1"),
        ("FROM foo\nPARAMETER te-mp 1\n", "unexpected EOF: te"),
        ('\nFROM foo\nSYSTEM """This is a multiline system.""\n\t\t\t', "unexpected EOF"),
        ('\nFROM foo\nSYSTEM "\n\t\t\t', "unexpected EOF"),
        ("FROM", "unexpected EOF"),
    ],
)
def test_syntax_errors(text: str, message: str) -> None:
    with pytest.raises(BadRequest) as e:
        m.parse(text)
    assert e.value.message == message
    assert e.value.status == 400


# --- semantics -------------------------------------------------------------------------


def test_parse_everything() -> None:
    mf = m.parse(
        "FROM ./x.gguf\n"
        'TEMPLATE """{{ .System }}\n{{ .Prompt }}"""\n'
        "TEMPLATE second\n"
        "SYSTEM one\nsystem two\n"
        "PARAMETER temperature 0.7\n"
        "PARAMETER stop <|im_end|>\n"
        "PARAMETER num_ctx 4096\n"
        'PARAMETER stop "\n"\n'
        "PARAMETER temperature 1\n"
        "PARAMETER use_mmap false\n"
        "PARAMETER mirostat 2\n"  # deprecated: dropped
        "MESSAGE user hi: there\n"
        "MESSAGE assistant hello\n"
        "LICENSE MIT\nLICENSE \"\"\"Apache\n2.0\"\"\"\n"
        "REQUIRES v0.14.0\n"
    )
    assert mf == Modelfile(
        from_="./x.gguf",
        template="second",
        system="two",
        parameters=(("temperature", 1.0), ("stop", ("<|im_end|>", "\n")), ("num_ctx", 4096), ("use_mmap", False)),
        messages=(("user", "hi: there"), ("assistant", "hello")),
        licenses=("MIT", "Apache\n2.0"),
        requires="0.14.0",
    )
    assert mf.options() == {"temperature": 1.0, "stop": ["<|im_end|>", "\n"], "num_ctx": 4096, "use_mmap": False}


def test_from_required_unless_side_file() -> None:
    with pytest.raises(BadRequest, match="^no FROM line$"):
        m.parse("SYSTEM hi\n")
    with pytest.raises(BadRequest, match="^no FROM line$"):
        m.parse("")
    assert m.parse("SYSTEM hi\n", require_from=False) == Modelfile(system="hi")


def test_only_one_from() -> None:
    with pytest.raises(BadRequest, match="only one FROM"):
        m.parse("FROM a\nFROM b\n")


@pytest.mark.parametrize("command", ["ADAPTER", "draft", "Renderer", "PARSER"])
def test_unsupported_commands_are_501(command: str) -> None:
    with pytest.raises(RequestError) as e:
        m.parse(f"FROM x\n{command} y\n")
    assert e.value.status == 501
    assert e.value.message == f"{command.upper()} is not supported by the embedded backend"


@pytest.mark.parametrize(
    "name, text, value",
    [
        ("num_ctx", "4096", 4096),
        ("seed", "-1", -1),
        ("num_predict", "+5", 5),
        ("main_gpu", "0", 0),
        ("temperature", "0.7", 0.7),
        ("top_p", ".5", 0.5),
        ("min_p", "1e-3", 0.001),
        ("repeat_penalty", "2", 2.0),
        ("use_mmap", "T", True),
        ("use_mmap", "0", False),
        ("use_mmap", "FALSE", False),
        ("stop", "a b", ("a b",)),
    ],
)
def test_parameter_types(name: str, text: str, value: object) -> None:
    got = m.parse_parameter(name, text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("foo", "1", "unknown parameter 'foo'"),
        ("Temperature", "1", "unknown parameter 'Temperature'"),
        ("num_ctx", "4k", "invalid int value [4k]"),
        ("num_ctx", "1.0", "invalid int value [1.0]"),
        ("num_ctx", "1_000", "invalid int value [1_000]"),
        ("seed", str(2**63), f"invalid int value [{2**63}]"),
        ("temperature", "warm", "invalid float value [warm]"),
        ("temperature", "1e39", "invalid float value [1e39]"),
        ("temperature", "1_0", "invalid float value [1_0]"),
        ("use_mmap", "yes", "invalid bool value [yes]"),
    ],
)
def test_parameter_errors(name: str, text: str, message: str) -> None:
    with pytest.raises(BadRequest) as e:
        m.parse(f"FROM x\nPARAMETER {name} {text}\n")
    assert e.value.message == message


@pytest.mark.parametrize("text, stored", [("0.14.0", "0.14.0"), ("v1", "1"), ("1.2", "1.2"), ("1.0.0-rc.1+b5", "1.0.0-rc.1+b5")])
def test_requires(text: str, stored: str) -> None:
    assert m.parse(f"FROM x\nREQUIRES {text}\n").requires == stored


@pytest.mark.parametrize("text", ["1.2.3.4", "latest", "01.2.3", "1.2-rc"])
def test_requires_invalid(text: str) -> None:
    with pytest.raises(BadRequest, match=r"^requires must be a valid semver \(e\.g\. 0\.14\.0\)$"):
        m.parse(f"FROM x\nREQUIRES {text}\n")


# --- format ------------------------------------------------------------------------------

TRICKY = [
    "", " ", "plain", " lead", "trail ", '"', '""', '"""', '"quoted"', "a\nb", "\n", "line\n",
    'say "hi"\nthen', "#hash", "tab\there", "ünïcödé ✓", "x\n\"", 'a"\nb"', 'ends with "', "a\r\nb",
]


@pytest.mark.parametrize("value", TRICKY)
def test_format_round_trips_tricky_values(value: str) -> None:
    mf = Modelfile(
        from_=value or "x", template=value, system=value, parameters=(("stop", (value, "b")),),
        messages=(("user", value),), licenses=(value,),
    )
    assert m.parse(m.format(mf)) == mf


def test_format_round_trip_random() -> None:
    rng = random.Random(1234)
    alphabet = ['"', '"', "'", " ", "\t", "\n", "\r", "#", "a", "b", "{", "}", ":", "é"]
    written = 0
    for _ in range(1500):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        mf = Modelfile(from_="x", system=value, parameters=(("stop", (value,)),))
        try:
            text = m.format(mf)
        except BadRequest as e:
            assert "cannot be written to a Modelfile" in e.message
            continue
        assert m.parse(text) == mf, repr(value)
        written += 1
    assert written > 1000


@pytest.mark.parametrize("value", ["bell\x07", 'x"""\ny', '"""\nx', 'a """  \nb'])
def test_format_refuses_unrepresentable(value: str) -> None:
    with pytest.raises(BadRequest, match="cannot be written to a Modelfile"):
        m.format(Modelfile(from_="x", system=value))


def test_format_layout_and_numbers() -> None:
    mf = Modelfile(
        from_="blobs/sha256-00", template="{{ .Prompt }}", system="be brief",
        parameters=(("temperature", 0.1), ("num_ctx", 8192), ("use_mmap", True), ("stop", ("a", "b"))),
        messages=(("system", "s"),), licenses=("MIT",), requires="0.5.0",
    )
    text = m.format(mf, header="written by a test")
    assert text == (
        "# written by a test\n"
        "FROM blobs/sha256-00\n"
        "TEMPLATE {{ .Prompt }}\n"
        "SYSTEM be brief\n"
        "PARAMETER temperature 0.1\n"
        "PARAMETER num_ctx 8192\n"
        "PARAMETER use_mmap true\n"
        "PARAMETER stop a\n"
        "PARAMETER stop b\n"
        "MESSAGE system s\n"
        "LICENSE MIT\n"
        "REQUIRES 0.5.0\n"
    )
    assert m.parse(text) == mf
    assert m.format(Modelfile()) == ""
    assert m.parse(m.format(Modelfile(system="x")), require_from=False) == Modelfile(system="x")
    for v in (1e-05, 1e16, 123.456, float("inf")):
        assert m.parse(m.format(Modelfile(from_="x", parameters=(("temperature", v),)))).parameters[0][1] == v


def test_format_rejects_bad_parameters_and_roles() -> None:
    with pytest.raises(BadRequest, match="unknown parameter 'nope'"):
        m.format(Modelfile(parameters=(("nope", 1),)))
    with pytest.raises(BadRequest, match="message role"):
        m.format(Modelfile(messages=(("tool", "x"),)))


# --- /api/create fields ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("num_ctx", 4096, 4096),
        ("num_ctx", 4096.0, 4096),
        ("num_ctx", "4096", 4096),
        ("temperature", 1, 1.0),
        ("temperature", 0.5, 0.5),
        ("use_mmap", False, False),
        ("use_mmap", "true", True),
        ("stop", ["a", "b"], ("a", "b")),
        ("stop", "a", ("a",)),
    ],
)
def test_coerce_parameter(name: str, value: object, expected: object) -> None:
    got = m.coerce_parameter(name, value)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("nope", 1, "unknown parameter 'nope'"),
        ("num_ctx", 1.5, "invalid int value [1.5]"),
        ("num_ctx", True, "invalid int value [true]"),
        ("temperature", None, "invalid float value [null]"),
        ("use_mmap", 1, "invalid bool value [1]"),
        ("stop", [1], "invalid string array value [[1]]"),
    ],
)
def test_coerce_parameter_errors(name: str, value: object, message: str) -> None:
    with pytest.raises(BadRequest) as e:
        m.coerce_parameter(name, value)
    assert e.value.message == message


def test_from_request() -> None:
    mf = m.from_request({
        "template": "T", "system": "", "parameters": {"temperature": 0.2, "stop": ["x"], "mirostat": 1},
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "images": None}],
        "license": ["A", "B"], "requires": "v0.1.0",
    })
    assert mf == Modelfile(
        template="T", parameters=(("temperature", 0.2), ("stop", ("x",))),
        messages=(("user", "q"), ("assistant", "a")), licenses=("A", "B"), requires="0.1.0",
    )
    assert m.from_request({"license": "MIT"}).licenses == ("MIT",)
    assert m.from_request({}) == Modelfile()


@pytest.mark.parametrize(
    "body, message",
    [
        ({"template": 1}, "json: cannot unmarshal number into Go struct field CreateRequest.template of type string"),
        ({"parameters": []}, "json: cannot unmarshal array into Go struct field CreateRequest.parameters of type map[string]interface {}"),
        ({"messages": {}}, "json: cannot unmarshal object into Go struct field CreateRequest.messages of type []api.Message"),
        ({"messages": [{"role": 1}]}, "json: cannot unmarshal number into Go struct field CreateRequest.messages.role of type string"),
        ({"messages": [{"role": "tool", "content": "x"}]}, INVALID_ROLE),
        ({"license": 3}, "json: cannot unmarshal number into Go value of type string"),
        ({"license": ["a", {}]}, "json: cannot unmarshal object into Go value of type string"),
        ({"parameters": {"top_k": "many"}}, "invalid int value [many]"),
        ({"requires": "soon"}, "requires must be a valid semver (e.g. 0.14.0)"),
    ],
)
def test_from_request_errors(body: dict, message: str) -> None:
    with pytest.raises(BadRequest) as e:
        m.from_request(body)
    assert e.value.message == message and e.value.status == 400


def test_merge_follows_ollama_create() -> None:
    base = Modelfile(
        from_="x", template="T0", system="S0", parameters=(("temperature", 0.1), ("stop", ("a",))),
        messages=(("user", "old"),), licenses=("MIT",), requires="0.1.0",
    )
    new = Modelfile(system="S1", parameters=(("stop", ("b",)), ("top_k", 5)), licenses=("MIT", "GPL"))
    assert m.merge(base, new) == Modelfile(
        from_="x", template="T0", system="S1",
        parameters=(("temperature", 0.1), ("stop", ("b",)), ("top_k", 5)),
        messages=(("user", "old"),), licenses=("MIT", "GPL"), requires="0.1.0",
    )
    assert m.merge(base, Modelfile(messages=(("user", "new"),))).messages == (("user", "new"),)
