"""Schema-constrained answers are valid JSON: strings cannot hold raw control characters.

llama-cpp-python's schema converter allowed them (``char ::= [^"\\\\]``): the embedded
model once answered ``{"colour": ",<newline><newline>"}`` to an OpenAI json_schema request
(``tests/clients/test_replay.py`` caught it). The engine tightens the rule before use."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("llama_cpp")

from llama_cpp.llama_grammar import LlamaGrammar, json_schema_to_gbnf  # noqa: E402

from meshollama.backends.llama_engine import _LOOSE_CHAR, _strict_strings  # noqa: E402

SCHEMAS = [
    {"type": "object", "properties": {"colour": {"type": "string"}, "hex": {"type": "string"}},
     "required": ["colour", "hex"]},
    {"type": "array", "items": {"type": "string"}},
    {"type": "string"},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_every_string_rule_excludes_control_characters(schema):
    loose = json_schema_to_gbnf(json.dumps(schema))
    strict = _strict_strings(loose)
    chars = [line for line in strict.splitlines() if line.startswith("char ::=")]
    assert chars and all("\\x00-\\x1F" in line for line in chars), strict
    assert not any(line.startswith(_LOOSE_CHAR) for line in strict.splitlines())
    LlamaGrammar.from_string(strict, verbose=False)  # still a grammar llama.cpp accepts
